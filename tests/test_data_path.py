"""The way rows reach TRL's trainers: tokenised once (a file-backed dataset in $ALIGN_CACHE whose TRL map results
are reused by later processes) and batched by length (fewer pad tokens, an order that a resumed run reproduces)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from align.batching import LengthGroupedSampler, row_lengths
from align.data.tokenized import DatasetCache, file_backed

REPO = Path(__file__).resolve().parents[1]
TINY_SFT = REPO / "recipes" / "tiny" / "sft.yaml"

# Built by `align sft`'s own path (prepare + build_trainer) here and, in a child process, by the script below.
BUILD = """
import json, sys
from pathlib import Path
from align import training
from align.artifacts import Registry
from align.recipe import load_recipe
from trl import SFTConfig, SFTTrainer

recipe = load_recipe(sys.argv[1], list(sys.argv[3:]))
inputs = training.prepare(recipe, Registry(Path(sys.argv[2])), resume=False, say=lambda text: None)
trainer = training.build_trainer(SFTTrainer, SFTConfig, inputs, packing=False, completion_only_loss=True)
print(json.dumps({"train": trainer.train_dataset._fingerprint, "eval": trainer.eval_dataset._fingerprint}))
"""


def build(registry: Path, *overrides: str) -> Any:
    """The tiny SFT recipe's trainer, built in this process as `align sft` builds it."""
    from trl import SFTConfig, SFTTrainer

    from align import training
    from align.artifacts import Registry
    from align.recipe import load_recipe

    inputs = training.prepare(load_recipe(TINY_SFT, list(overrides)), Registry(registry), resume=False,
                              say=lambda text: None)
    return training.build_trainer(SFTTrainer, SFTConfig, inputs, packing=False, completion_only_loss=True)


def cache_files(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*.arrow")}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Iterator[Path]:
    """$ALIGN_CACHE for this module, so that what these tests cache is theirs alone."""
    root = tmp_path_factory.mktemp("align-cache")
    before = os.environ.get("ALIGN_CACHE")
    os.environ["ALIGN_CACHE"] = str(root)
    yield root
    if before is None:
        os.environ.pop("ALIGN_CACHE", None)
    else:
        os.environ["ALIGN_CACHE"] = before


@pytest.fixture(scope="module")
def grouped(cache_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The tiny SFT trainer with the default train.group_by_length, and its registry."""
    registry = tmp_path_factory.mktemp("registry")
    return build(registry), registry


# ---------------------------------------------------------------- tokenise once


def test_trl_prepares_the_rows_from_the_cache_and_a_later_process_reuses_its_work(
        grouped: tuple[Any, Path], cache_root: Path) -> None:
    trainer, registry = grouped
    datasets_dir = cache_root / "datasets"
    for dataset in (trainer.train_dataset, trainer.eval_dataset):
        assert dataset.cache_files and all(Path(f["filename"]).is_relative_to(datasets_dir)
                                           for f in dataset.cache_files)
    written = cache_files(cache_root)
    assert any(name.split("/")[-1].startswith("cache-") for name in written), "TRL's map results are cached"
    # Another process (another string-hash seed) builds the same trainer: every TRL map hits the cache.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "123", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.run([sys.executable, "-c", BUILD, str(TINY_SFT), str(registry)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    fingerprints = json.loads(child.stdout.strip().splitlines()[-1])
    assert fingerprints == {"train": trainer.train_dataset._fingerprint, "eval": trainer.eval_dataset._fingerprint}
    assert cache_files(cache_root) == written, "the second process tokenised again"


def test_what_changes_the_tokens_is_never_served_from_the_cache(grouped: tuple[Any, Path], stories_dir: Path,
                                                                  tmp_path: Path) -> None:
    """Another chat template or max_length over the very same cached rows: TRL's maps miss and tokenise anew."""
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    trainer, _ = grouped
    source = Path(trainer.train_dataset.cache_files[0]["filename"]).parent  # the rows build_trainer cached
    tokenizer = trainer.processing_class
    other_template = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    other_template.pad_token = tokenizer.pad_token
    other_template.chat_template = "{{ 'A chat.' }}" + tokenizer.chat_template
    assert other_template.chat_template != tokenizer.chat_template

    def input_ids(tokenizer: Any, max_length: int, cached: bool) -> list[list[int]]:
        dataset = load_from_disk(str(source))
        dataset = dataset if cached else dataset.from_list(dataset.to_list())  # in memory: nothing cached
        prepared = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(stories_dir), processing_class=tokenizer,
                              train_dataset=dataset, args=SFTConfig(output_dir=str(tmp_path), use_cpu=True,
                                                                    report_to=[], max_length=max_length))
        return prepared.train_dataset["input_ids"]

    built = trainer.train_dataset["input_ids"]
    assert input_ids(tokenizer, trainer.args.max_length, cached=True) == built  # the same settings: the same ids
    for changed, max_length in ((other_template, trainer.args.max_length), (tokenizer, 24)):
        ids = input_ids(changed, max_length, cached=True)
        assert ids == input_ids(changed, max_length, cached=False) and ids != built


def test_the_cache_directory_is_keyed_by_the_rows_and_the_compute(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    fp32 = DatasetCache(tmp_path, {"precision": "fp32", "device": "cpu"})
    first = file_backed(rows, fp32)
    assert file_backed(rows, fp32).cache_files == first.cache_files  # same rows, same file
    others = [file_backed(rows + rows, fp32), file_backed(rows, DatasetCache(tmp_path, {"precision": "bf16",
                                                                                         "device": "cpu"}))]
    assert len({Path(d.cache_files[0]["filename"]).parent for d in [first, *others]}) == 3
    assert not list(tmp_path.glob(".tmp-*")), "scratch directories are renamed into place or removed"
    # A cache that cannot be written gives the same rows in memory.
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    in_memory = file_backed(rows, DatasetCache(blocked / "datasets"))
    assert not in_memory.cache_files and in_memory.to_list() == rows


# ---------------------------------------------------------------- batches by length


def pad_share(trainer: Any) -> float:
    pads = slots = 0
    for batch in trainer.get_train_dataloader():
        pads += int((batch["attention_mask"] == 0).sum())
        slots += batch["attention_mask"].numel()
    return pads / slots


def epoch_order(trainer: Any, epoch: int, global_seed: int) -> list[list[int]]:
    """The batches (lengths and last tokens) a fresh train dataloader yields in `epoch`, whatever the global RNG
    holds (a resumed run restores the RNG state of its checkpoint, not the one its epoch started with)."""
    import torch

    torch.manual_seed(global_seed)
    loader = trainer.get_train_dataloader()
    loader.set_epoch(epoch)
    return [batch["attention_mask"].sum(dim=1).tolist() + batch["input_ids"][:, -1].tolist() for batch in loader]


def test_grouped_batches_pad_less_and_every_epoch_order_is_reproducible(
        grouped: tuple[Any, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    trainer, _ = grouped
    assert type(trainer).__name__ == "SFTTrainer" and isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    random_batches = build(tmp_path_factory.mktemp("registry"), "train.group_by_length=false")
    assert pad_share(trainer) < pad_share(random_batches) / 2
    # Same epoch, same batches, whatever the global RNG: what `--resume` needs to skip exactly what was trained.
    assert epoch_order(trainer, 0, global_seed=1) == epoch_order(trainer, 0, global_seed=2)
    assert epoch_order(trainer, 1, global_seed=1) != epoch_order(trainer, 0, global_seed=1), "epochs are reshuffled"


def test_preference_rows_are_as_long_as_the_longer_reply_with_its_prompt() -> None:
    from datasets import Dataset

    dpo = Dataset.from_dict({"prompt_ids": [[1, 2], [1]], "chosen_ids": [[3] * 5, [3]], "rejected_ids": [[4], [4] * 9],
                             "prompt": ["a", "b"]})
    assert row_lengths(dpo) == [7, 10] and row_lengths(dpo, max_length=8) == [7, 8]
    reward = Dataset.from_dict({"chosen_ids": [[1] * 3], "rejected_ids": [[2] * 4]})
    assert row_lengths(reward) == [4]
    assert row_lengths(Dataset.from_dict({"prompt": ["a"]})) is None  # untokenised: transformers' own sampler
    sampler = LengthGroupedSampler([5, 1, 9, 3, 7, 2, 8, 4], group_size=2, seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(8)) and list(sampler) == first
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(8))
