"""Pad tokens in the training batches of SFT, DPO and reward, as each stage's own TRL collator builds them: with
uniformly random batches (`train.group_by_length: false`), with length-grouped ones (align's default), and for SFT
with TRL's padding-free collation. With --time, also the forward+backward seconds of the same batches, the
variants interleaved batch by batch so that a busy machine slows them alike.

    python bench/padding.py [--registry DIR] [--time BATCHES] [--out FILE]

No training: each stage's trainer is built by `training.build_trainer` from the demo recipe and its train
dataloader iterated for one epoch. DPO and reward read demo-pairs@latest from --registry (the registry `make demo`
filled; it is copied, never written); without one, a stand-in built from the demo SFT conversations (its answer as
chosen, the first sentence of another row's answer as rejected) with the base model, which the output says.
DPO's `precompute_ref_log_probs` is turned off here (it only changes what a step computes, not its batches).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from align import training
from align.artifacts import Registry
from align.hashing import sha256_file
from align.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "demo"
STAND_IN_PAIRS = 176  # like the demo: 128 train pairs and 48 eval pairs


def stand_in_card(directory: Path) -> Path:
    """Preference pairs shaped like demo-pairs, from the demo SFT conversations (no model needed)."""
    rows = [json.loads(line) for line in (REPO / "data_cards" / "demo" / "sft.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    with open(directory / "pairs.jsonl", "w", encoding="utf-8") as out:
        for row in rows[:STAND_IN_PAIRS]:
            messages = row["messages"]
            other = rng.choice(rows)["messages"][-1]["content"]
            out.write(json.dumps({"prompt": messages[:-1], "chosen": messages[-1]["content"],
                                  "rejected": other.split(".")[0] + "."}) + "\n")
    card = {"name": "stand-in-pairs", "description": "demo SFT answers against another row's first sentence",
            "license": "MIT", "source": {"path": "pairs.jsonl"}, "format": "chosen_rejected",
            "eval": {"size": 48, "seed": 0}, "sha256": {"pairs.jsonl": sha256_file(directory / "pairs.jsonl")}}
    path = directory / "stand-in-pairs.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def copy_demo_artifacts(source: Path, registry: Path) -> bool:
    """Copy demo-sft and demo-pairs (all versions, no run directories) into a scratch registry; False if absent."""
    if not all((source / name).is_dir() for name in ("demo-sft", "demo-pairs")):
        return False
    for name in ("demo-sft", "demo-pairs"):
        shutil.copytree(source / name, registry / name, ignore=shutil.ignore_patterns(".runs", ".lock"))
    return True


def stage_recipe(stage: str, scratch: Path, stand_in: Path | None) -> Path:
    """The demo recipe of `stage`, with card paths made absolute, DPO's precompute off, and with the stand-in
    pairs on the base model when there is no demo-pairs artifact."""
    data = yaml.safe_load((DEMO / f"{stage}.yaml").read_text())
    card = data["data"]["card"]
    if "@" not in card:
        data["data"]["card"] = str((DEMO / card).resolve())
    if stage != "sft" and stand_in is not None:
        sft = yaml.safe_load((DEMO / "sft.yaml").read_text())
        data["model"] = sft["model"]
        data["data"] = {"card": str(stand_in)}
    if stage == "dpo":
        data["dpo"]["precompute_ref_log_probs"] = False
    path = scratch / f"{stage}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def stage_trainer(inputs: training.StageInputs, padding_free: bool = False) -> Any:
    """The stage's trainer exactly as its `align <stage>` command builds it."""
    recipe = inputs.recipe
    if recipe.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        extra = {"padding_free": True, "max_length": None} if padding_free else {}
        return training.build_trainer(SFTTrainer, SFTConfig, inputs, packing=recipe.train.packing,
                                      completion_only_loss=recipe.sft.completion_only_loss, **extra)
    if recipe.stage == "dpo":
        from trl import DPOConfig

        from align.stages.dpo import open_end_trainer, open_flags

        flags = {"train": open_flags(inputs.data.train), "eval": open_flags(inputs.data.eval)}
        return training.build_trainer(open_end_trainer(), DPOConfig, inputs, trainer_kwargs={"open_flags": flags},
                                      beta=recipe.dpo.beta, loss_type=list(recipe.dpo.loss_type),
                                      precompute_ref_log_probs=False)
    from trl import RewardConfig, RewardTrainer

    return training.build_trainer(RewardTrainer, RewardConfig, inputs,
                                  center_rewards_coefficient=recipe.reward.center_rewards_coefficient)


@dataclasses.dataclass
class Variant:
    name: str
    trainer: Any
    batches: list[dict[str, Any]]
    pads: list[int]
    slots: list[int]
    seconds: list[float] = dataclasses.field(default_factory=list)

    @property
    def share(self) -> float:
        return sum(self.pads) / sum(self.slots)

    @property
    def worst(self) -> float:
        return max(p / s for p, s in zip(self.pads, self.slots, strict=True))


def one_epoch(name: str, trainer: Any) -> Variant:
    """Every batch of epoch 0 of the trainer's own train dataloader, with its pad tokens and token slots."""
    loader = trainer.get_train_dataloader()
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    batches, pads, slots = [], [], []
    for batch in loader:
        mask = batch.get("attention_mask")
        slots.append(batch["input_ids"].numel())
        pads.append(0 if mask is None else int((mask == 0).sum()))  # padding-free batches have no mask
        batches.append(batch)
    return Variant(name, trainer, batches, pads, slots)


def time_steps(variants: list[Variant], count: int) -> None:
    """Forward + backward (`trainer.training_step`) of each variant's first `count` batches, interleaved."""
    for variant in variants:  # what the training loop sets before it calls training_step
        variant.trainer.current_gradient_accumulation_steps = variant.trainer.args.gradient_accumulation_steps
    for index in range(count):
        for variant in variants:
            if index >= len(variant.batches):
                continue
            model = variant.trainer.model
            start = time.perf_counter()
            variant.trainer.training_step(model, variant.batches[index])
            variant.seconds.append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)


def measure_stage(stage: str, scratch: Path, registry: Registry, stand_in: Path | None, steps: int) -> list[str]:
    recipe = load_recipe(stage_recipe(stage, scratch, stand_in))
    inputs = training.prepare(recipe, registry, resume=False, say=lambda text: print(text, file=sys.stderr))
    pristine = inputs.model
    recipe = inputs.recipe

    def with_grouping(group: bool) -> training.StageInputs:
        train = recipe.train.model_copy(update={"group_by_length": group})
        return dataclasses.replace(inputs, recipe=recipe.model_copy(update={"train": train}),
                                   model=copy.deepcopy(pristine))

    variants = [one_epoch("random", stage_trainer(with_grouping(False))),
                one_epoch("grouped", stage_trainer(with_grouping(True)))]
    # TRL refuses padding-free SFT with max_length unless packing; with no row longer than max_length, passing
    # max_length=None changes nothing else.
    if stage == "sft" and not inputs.data.train_truncated:
        variants.append(one_epoch("padding-free", stage_trainer(with_grouping(False), padding_free=True)))
    if steps:
        time_steps(variants, steps)
    rows = []
    for variant in variants:
        seconds = f"{statistics.median(variant.seconds):.2f}" if variant.seconds else "-"
        timed = len(variant.seconds)
        real_tokens = sum(variant.slots[:timed]) - sum(variant.pads[:timed])
        tokens_per_s = f"{real_tokens / sum(variant.seconds):.0f}" if timed else "-"
        batch_size = recipe.train.per_device_train_batch_size
        rows.append(f"| {stage} | {variant.name} | {len(inputs.data.train)} | {batch_size}"
                    f" | {len(variant.batches)} | {variant.share:.1%} | {variant.worst:.1%} | {sum(variant.slots)} "
                    f"| {seconds} | {tokens_per_s} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, help="a registry holding demo-sft and demo-pairs (after make demo)")
    parser.add_argument("--time", type=int, default=0, metavar="BATCHES",
                        help="also time forward+backward of this many batches per variant")
    parser.add_argument("--stages", default="sft,dpo,reward")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lines = []
    with tempfile.TemporaryDirectory(prefix="align-padding-") as scratch_dir:
        scratch = Path(scratch_dir)
        (scratch / "registry").mkdir()
        real = args.registry is not None and copy_demo_artifacts(args.registry, scratch / "registry")
        stand_in = None if real else stand_in_card(scratch)
        registry = Registry(scratch / "registry")
        for stage in args.stages.split(","):
            lines += measure_stage(stage, scratch, registry, stand_in, args.time)
    import torch

    source = (f"demo-pairs from {args.registry}" if real else
              "a stand-in built from the demo SFT rows (no demo-pairs artifact; pass --registry)")
    header = [f"Pad tokens per training batch, one epoch, each stage's own TRL collator; DPO and reward pairs: "
              f"{source}. Forward+backward timed on the first {args.time} batches of each variant, interleaved "
              f"({torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}: noisy when the machine "
              "is shared).", "",
              "| stage | batches | rows | batch size | batches/epoch | pad share | worst batch | token slots | "
              "s/batch (median) | real tokens/s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    table = "\n".join(header + lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
