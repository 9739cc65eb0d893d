"""Replies cut off at max_new_tokens: recorded by `align pairs`, dropped or kept open, and never closed by DPO."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from align.data import get_format, load_card, load_data
from align.data.formats import RowError, convert_row
from align.recipe import PairsSection
from align.stages.pairs import select_pairs

REPO = Path(__file__).resolve().parents[1]
PROMPT = [{"role": "user", "content": "Once upon a time"}]
REPLIES, SCORES = [" best but cut", " good", " bad", " worst but cut"], [0.9, 0.5, -0.5, -0.9]
CUT = [True, False, False, True]


def pick(truncated: str, selection: str = "best_worst") -> list[tuple[str, str, bool, bool]]:
    settings = PairsSection(truncated=truncated, selection=selection)
    rows = select_pairs(PROMPT, REPLIES, SCORES, settings, CUT)
    return [(r["chosen"], r["rejected"], r["chosen_truncated"], r["rejected_truncated"]) for r in rows]


def test_drop_picks_best_and_worst_among_ended_replies_only() -> None:
    assert PairsSection().truncated == "drop"
    assert pick("drop") == [(" good", " bad", False, False)]
    assert all(not (c or r) for *_, c, r in pick("drop", "all_pairs"))
    assert select_pairs(PROMPT, REPLIES[:1] + REPLIES[3:], [0.9, -0.9], PairsSection(), [True, True]) == []


@pytest.mark.parametrize("mode", ["keep_open", "keep"])
def test_kept_cut_off_replies_are_flagged(mode: str) -> None:
    assert pick(mode) == [(" best but cut", " worst but cut", True, True)]


def test_chosen_rejected_reads_open_flags_only_when_present() -> None:
    fmt = get_format("chosen_rejected")
    row = {"prompt": "Once", "chosen": " a", "rejected": " b"}
    assert set(convert_row(fmt, row, {})) == {"prompt", "chosen", "rejected"}  # unchanged for ordinary data
    mapped = {"chosen_open": "chosen_truncated", "rejected_open": "rejected_truncated"}
    flagged = convert_row(fmt, {**row, "chosen_truncated": True, "rejected_truncated": False}, mapped)
    assert (flagged["chosen_open"], flagged["rejected_open"]) == (True, False)
    assert convert_row(fmt, {**row, "chosen_open": "true"}, {})["rejected_open"] is False  # CSV text, one side
    with pytest.raises(RowError, match="field 'chosen_open' must be true or false"):
        convert_row(fmt, {**row, "chosen_open": "maybe"}, {})


# ---------------------------------------------------------------- DPO: what TRL's tokenisation makes of them


def prepared(rows: list[dict[str, Any]], chat_template: str, stories_dir: Path, tmp_path: Path,
             stock: bool = False) -> tuple[Any, Any]:
    """TRL's prepared train dataset for canonical `rows` (as `align dpo` builds it) and the tokenizer; no training."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from align import models, training
    from align.recipe import LoraSection
    from align.stages.dpo import open_end_trainer, open_flags

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if chat_template != "none":
        tokenizer.chat_template = models.DEFAULT_CHAT_TEMPLATE
    extra = {} if stock else {"open_flags": {"train": open_flags(rows)}}
    trainer = (DPOTrainer if stock else open_end_trainer())(
        model=AutoModelForCausalLM.from_pretrained(stories_dir),
        args=DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_length=128),
        train_dataset=training.as_dataset(rows, chat_template), processing_class=tokenizer,
        peft_config=models.lora_config(LoraSection(), "CAUSAL_LM"), **extra)
    return trainer.train_dataset, tokenizer


PAIR = {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": " there was a cat who"}],
        "rejected": [{"role": "assistant", "content": " there was a dog."}]}


@pytest.mark.parametrize("chat_template", ["none", "auto"])
def test_dpo_leaves_an_open_completion_unclosed(chat_template: str, stories_dir: Path, tmp_path: Path) -> None:
    rows = [{**PAIR, "chosen_open": True, "rejected_open": False}, dict(PAIR)]
    ours, tokenizer = prepared(rows, chat_template, stories_dir, tmp_path)
    trl, _ = prepared(rows, chat_template, stories_dir, tmp_path, stock=True)
    eos = tokenizer.eos_token_id
    # TRL closes every completion: EOS (plain text) or the template's `<eos>\n` (align's default chat template).
    closing = [eos] if chat_template == "none" else tokenizer("</s>\n", add_special_tokens=False)["input_ids"]
    assert all(row[f"{side}_ids"][-len(closing):] == closing for row in trl for side in ("chosen", "rejected"))
    # The open one is TRL's tokens minus the closing; everything else is exactly TRL's.
    assert ours[0]["chosen_ids"] == trl[0]["chosen_ids"][:-len(closing)] and eos not in ours[0]["chosen_ids"]
    assert ours[0]["prompt_ids"] == trl[0]["prompt_ids"] and ours[0]["rejected_ids"] == trl[0]["rejected_ids"]
    assert ours[1]["chosen_ids"] == trl[1]["chosen_ids"] and ours[1]["chosen_ids"][-1] in closing


def test_a_template_that_cannot_leave_a_reply_open_is_a_data_error(stories_dir: Path) -> None:
    from transformers import AutoTokenizer

    from align.errors import DataError
    from align.stages.dpo import open_completion_ids

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['text'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="cannot leave a cut-off chat reply open with this chat template"):
        open_completion_ids(tokenizer, PAIR["prompt"], PAIR["chosen"], [])


# ---------------------------------------------------------------- `align pairs` end to end


@pytest.fixture(scope="module")
def stopping_model(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Path:
    """stories260K that also stops at '.': the base never ends a story within a few tokens, so this gives a mix of
    ended and cut-off replies."""
    from transformers import AutoTokenizer

    target = tmp_path_factory.mktemp("model") / "stories260K-stops"
    shutil.copytree(stories_dir, target)
    dot = AutoTokenizer.from_pretrained(target).convert_tokens_to_ids(".")
    config = json.loads((target / "generation_config.json").read_text())
    config["eos_token_id"] = [config["eos_token_id"], dot]
    (target / "generation_config.json").write_text(json.dumps(config))
    return target


def run_pairs(run_align: Callable, registry: Path, model: Path, mode: str) -> Path:
    name = f"cut-{mode.replace('_', '-')}"
    result = run_align("pairs", REPO / "recipes" / "tiny" / "pairs.yaml", "--registry", registry,
                       "--set", f"name={name}", "--set", "model.from=null", "--set", f"model.base={model}",
                       "--set", f"pairs.truncated={mode}", "--set", "pairs.max_new_tokens=10",
                       "--set", "data.limit=24", "--set", "data.eval_limit=8")
    assert result.returncode == 0, result.stderr[-3000:]
    return registry / name / "v1"


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_drop_says_when_every_reply_was_cut_off(run_align: Callable, stories_dir: Path, tmp_path: Path) -> None:
    result = run_align("pairs", REPO / "recipes" / "tiny" / "pairs.yaml", "--registry", tmp_path,
                       "--set", "model.from=null", "--set", f"model.base={stories_dir}",
                       "--set", "pairs.truncated=drop", "--set", "pairs.max_new_tokens=6",
                       "--set", "data.limit=8", "--set", "data.eval_limit=4")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "48 replies were cut off at max_new_tokens=6" in result.stderr
    assert "pairs.truncated: keep_open" in result.stderr and "Traceback" not in result.stderr


def test_pairs_drop_never_pairs_a_cut_off_reply(run_align: Callable, stopping_model: Path, tmp_path: Path) -> None:
    artifact = run_pairs(run_align, tmp_path, stopping_model, "drop")
    rows = jsonl(artifact / "train.jsonl") + jsonl(artifact / "eval.jsonl")
    samples = jsonl(artifact / "samples.jsonl")
    metrics = json.loads((artifact / "manifest.json").read_text())["metrics"]
    cut = sum(flag for item in samples for flag in item["truncated"])
    assert 0 < cut < 4 * len(samples), "the test model should end some replies and cut others"
    assert metrics["replies_truncated"] == cut and metrics["pairs_with_truncated"] == 0
    assert metrics["pairs_dropped_truncated"] >= 0 and rows
    assert all(row["chosen_truncated"] is False and row["rejected_truncated"] is False for row in rows)
    assert "fields" not in (artifact / "card.yaml").read_text()


@pytest.mark.slow
def test_pairs_keep_open_reaches_dpo_unclosed_and_reward_still_trains(
        run_align: Callable, stopping_model: Path, stories_dir: Path, tmp_path: Path) -> None:
    artifact = run_pairs(run_align, tmp_path, stopping_model, "keep_open")
    metrics = json.loads((artifact / "manifest.json").read_text())["metrics"]
    stored = jsonl(artifact / "train.jsonl")
    flags = [row[f"{side}_truncated"] for row in stored for side in ("chosen", "rejected")]
    assert True in flags and False in flags and metrics["pairs_with_truncated"] > 0
    assert metrics["pairs_dropped_truncated"] == 0
    loaded = load_data(load_card(artifact / "card.yaml"))
    assert [(r["chosen_open"], r["rejected_open"]) for r in loaded.train] == [
        (r["chosen_truncated"], r["rejected_truncated"]) for r in stored]

    dataset, tokenizer = prepared(loaded.train, "none", stories_dir, tmp_path)
    for row, source in zip(dataset, stored, strict=True):
        for side in ("chosen", "rejected"):
            assert (row[f"{side}_ids"][-1] == tokenizer.eos_token_id) is not source[f"{side}_truncated"]

    result = run_align("reward", REPO / "recipes" / "tiny" / "reward.yaml", "--registry", tmp_path,
                       "--set", "model.from=null", "--set", f"model.base={stories_dir}",
                       "--set", "data.card=cut-keep-open@v1", "--set", "train.max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
