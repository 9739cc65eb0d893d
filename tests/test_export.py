"""`align export --merge` on the real stories260K artifacts: the merged directory loads with plain transformers
and reproduces the adapter model's logits (policy) and scores (reward); refusals write nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from align.artifacts import Registry
from align.errors import ArtifactError

pytestmark = pytest.mark.slow
# fp32 rounding alone: the unmerged model's logits (|logit| up to ~21) are up to 2e-5 from its own fp64
# evaluation, so W x + B(A x) and (W + BA) x cannot agree to 1e-5; 5e-5 is ~2.5e-6 relative.
LOGIT_TOLERANCE = 5e-5
SCORE_TOLERANCE = 1e-5
TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "The dog ran to the park.",
    "Tom and his mom went to the store to buy some apples and a big red ball.",
]


def exported(run_align: Callable, registry: Path, ref: str, out: Path, *extra: str) -> Path:
    result = run_align("export", ref, "--merge", out, "--registry", registry, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def padded(tokenizer: Any, ids: list[list[int]]) -> tuple[Any, Any]:
    """Right-padded [B, T] input ids and attention mask, so the padded positions are exercised too."""
    import torch

    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return input_ids, mask


def masked_logit_diff(a: Any, b: Any, mask: Any) -> float:
    return (a - b).abs()[mask.bool()].max().item()


def no_leftovers(parent: Path, keep: set[str]) -> None:
    """Nothing but `keep` next to OUT: no half-written export and no set-aside old one."""
    assert {p.name for p in parent.iterdir()} == keep


def test_exported_sft_model_reproduces_the_adapter_model(sft_registry: Path, run_align: Callable,
                                                         tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.models import load_artifact_model

    out = exported(run_align, sft_registry, "tiny-sft@latest", tmp_path / "merged")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "align_export.json",
            "tokenizer.json"} <= names
    assert not {"adapter_config.json", "adapter_model.safetensors", "pytorch_model.bin"} & names
    no_leftovers(tmp_path, {"merged"})

    registry = Registry(sft_registry)
    artifact = registry.resolve("tiny-sft@latest")
    reference, _ = load_artifact_model(artifact, registry)
    exact, _ = load_artifact_model(artifact, registry, dtype=torch.float64)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.dtype == torch.float32

    tokenizer, trained = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(artifact.path)
    assert tokenizer.chat_template == trained.chat_template and tokenizer.chat_template
    chat = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time"}]
    for texts in (TEXTS[0], TEXTS[2]):
        assert tokenizer(texts)["input_ids"] == trained(texts)["input_ids"]
    chat_ids = trained.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert tokenizer.apply_chat_template(chat, tokenize=True, return_dict=False) == chat_ids

    input_ids, mask = padded(tokenizer, [*tokenizer(TEXTS)["input_ids"], chat_ids])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask).logits
        with reference.disable_adapter():
            base = reference(input_ids=input_ids, attention_mask=mask).logits
        got = merged(input_ids=input_ids, attention_mask=mask).logits
        exact_logits = exact(input_ids=input_ids, attention_mask=mask).logits
        truth = exact_logits.float()
        # Evaluated in fp64, the export equals base + adapter to 1e-5: only the fp32 storage of W + BA remains.
        merged64 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
        assert masked_logit_diff(merged64(input_ids=input_ids, attention_mask=mask).logits, exact_logits, mask) <= 1e-5
    diff = masked_logit_diff(got, expected, mask)
    merged_error, unmerged_error = masked_logit_diff(got, truth, mask), masked_logit_diff(expected, truth, mask)
    print(f"sft max abs logit diff: {diff:.3g} (vs fp64: merged {merged_error:.3g}, unmerged {unmerged_error:.3g})")
    assert diff <= LOGIT_TOLERANCE
    # Merging adds no error of its own beyond fp32 rounding: it is about as close to exact as the adapter model.
    assert merged_error <= 2 * unmerged_error + 1e-6
    assert masked_logit_diff(got, base, mask) > 1e-2, "the adapter was not merged"

    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id and generation["pad_token_id"] == tokenizer.pad_token_id
    assert generation["bos_token_id"] == tokenizer.bos_token_id
    record = json.loads((out / "align_export.json").read_text())
    assert record["source"]["ref"] == "tiny-sft@v2" and record["merged_adapters"] == ["tiny-sft@v2"]
    assert record["base_model"] == artifact.manifest.base_model.model_dump() and record["packages"]["transformers"]


def test_exported_reward_model_reproduces_its_scores(reward_artifact: Path, sft_registry: Path,
                                                      run_align: Callable, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.models import load_reward_model
    from align.scoring import score_replies

    out = exported(run_align, sft_registry, "tiny-rm@v1", tmp_path / "rm")
    assert not (out / "adapter_config.json").exists()
    registry = Registry(sft_registry)
    reference, trained_tokenizer = load_reward_model(registry.resolve("tiny-rm@v1"), registry)
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert merged.config.num_labels == 1 and merged.config.pad_token_id == tokenizer.pad_token_id is not None

    prompt = [{"role": "user", "content": "Once upon a time, there was a little cat. It"}]
    items = [(prompt, [{"role": "assistant", "content": reply}]) for reply in
             (" was very happy and loved to play with its best friend.", " was sad.", " cried all day long.")]
    expected = score_replies(reference, trained_tokenizer, items, chat_template="none")
    got = score_replies(merged, tokenizer, items, chat_template="none")
    diff = max(abs(a - b) for a, b in zip(got, expected, strict=True))
    print(f"reward max abs score diff: {diff:.3g}")
    assert diff <= SCORE_TOLERANCE
    assert got[0] > got[1], "the trained score head prefers the happy story"
    record = json.loads((out / "align_export.json").read_text())
    assert record["merged_adapters"] == ["tiny-sft@v2", "tiny-rm@v1"] and record["head"] == "score"
    assert record["chat_template"] == "none"


def test_export_refuses_without_writing_and_force_replaces(pairs_artifact: Path, sft_registry: Path,
                                                          run_align: Callable, tmp_path: Path) -> None:
    pairs = run_align("export", "tiny-pairs@v1", "--merge", tmp_path / "out", "--registry", sft_registry)
    assert pairs.returncode == 2 and pairs.stderr.startswith("error: ") and "Traceback" not in pairs.stderr
    assert "tiny-pairs@v1 is a pairs artifact with no adapter" in pairs.stderr
    no_leftovers(tmp_path, set())

    (tmp_path / "afile").write_text("x")
    a_file = run_align("export", "tiny-sft@v1", "--merge", tmp_path / "afile", "--registry", sft_registry)
    assert a_file.returncode == 2 and "is a file" in a_file.stderr and (tmp_path / "afile").read_text() == "x"

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    busy = run_align("export", "tiny-sft@v1", "--merge", out, "--registry", sft_registry)
    assert busy.returncode == 2 and "not empty; pass --force" in busy.stderr and "Traceback" not in busy.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"

    exported(run_align, sft_registry, "tiny-sft@v1", out, "--force")
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / "align_export.json").read_text())["source"]["ref"] == "tiny-sft@v1"
    no_leftovers(tmp_path, {"afile", "out"})


def test_export_never_deletes_what_it_reads_and_cleans_up_after_a_failure(
        sft_registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import align.export as export

    registry = Registry(sft_registry)
    artifact = registry.resolve("tiny-sft@v1")
    for target in (artifact.path, sft_registry, artifact.path / "sub"):
        with pytest.raises(ArtifactError, match="overlaps"):
            export.export_merged(artifact, registry, target, force=True)
    assert (artifact.path / "adapter" / "adapter_config.json").is_file()

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old export")

    def fail(*_: Any) -> dict:
        raise RuntimeError("disk full")  # after the weights and tokenizer are written

    monkeypatch.setattr(export, "_provenance", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export.export_merged(artifact, registry, out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    no_leftovers(tmp_path, {"out"})
