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


# ---------------------------------------------------------------- train.max_length: what each trainer drops


def pref_rows(count: int, prompt_words: int, chosen_words: int, rejected_words: int) -> list[dict[str, Any]]:
    return [{"prompt": f"Once upon a time {'the cat ' * prompt_words}{i}",
             "chosen": " the dog ran" + " far" * chosen_words, "rejected": " a fox sat" + " still" * rejected_words}
            for i in range(count)]


def canonical(row: dict[str, str], sft: bool = False) -> dict[str, Any]:
    reply = {"role": "assistant", "content": row["chosen"]}
    if sft:
        return {"prompt": [{"role": "user", "content": row["prompt"]}], "completion": [reply]}
    return {"prompt": [{"role": "user", "content": row["prompt"]}], "chosen": [reply],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


@pytest.mark.parametrize("chat_template", ["none", "auto"])
def test_length_rules_are_trls(chat_template: str, stories_dir: Path, tmp_path: Path) -> None:
    """The rows `align.data.lengths` says a trainer keeps at max_length are exactly the rows TRL's SFT, DPO and
    Reward trainers keep (so prepare can drop them up front, and `data validate` can predict them)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from align import models, training
    from align.data.lengths import length_counter, length_policy, split_fates
    from align.recipe import LoraSection

    tokenizer = models.load_tokenizer(models.resolve_base(str(stories_dir), Path.cwd()), chat_template)
    rows = [canonical(row) for n in (2, 12, 24) for row in pref_rows(3, n, n // 2, n)]
    sft_rows = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in rows]
    count = length_counter(tokenizer, chat_template)
    max_length = 40 if chat_template == "none" else 60
    cases = [("sft", sft_rows, SFTTrainer, SFTConfig), ("dpo", rows, DPOTrainer, DPOConfig),
             ("reward", rows, RewardTrainer, RewardConfig)]
    for stage, stage_rows, trainer_cls, config_cls in cases:
        predicted = split_fates(stage_rows, [count(row) for row in stage_rows], length_policy(stage), max_length)
        head = "SEQ_CLS" if stage == "reward" else "CAUSAL_LM"
        model = (AutoModelForSequenceClassification.from_pretrained(stories_dir, num_labels=1) if head == "SEQ_CLS"
                 else AutoModelForCausalLM.from_pretrained(stories_dir))
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer = trainer_cls(model=model, args=config_cls(output_dir=str(tmp_path / stage), use_cpu=True,
                                                           report_to=[], max_length=max_length),
                              train_dataset=training.as_dataset(stage_rows, chat_template), processing_class=tokenizer,
                              peft_config=models.lora_config(LoraSection(), head))
        assert 0 < len(predicted.kept) < len(stage_rows), f"{stage}: the rows should straddle max_length"
        assert len(trainer.train_dataset) == len(predicted.kept), stage


def write_pref_card(directory: Path, train: list[dict[str, Any]], held: list[dict[str, Any]]) -> Path:
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (directory / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    card = directory / "pairs.yaml"
    card.write_text("name: pairs\ndescription: d\nlicense: MIT\nsource:\n  path: train.jsonl\n  eval_path: eval.jsonl\n"
                    "format: chosen_rejected\n", encoding="utf-8")
    return card


def write_sft_card(directory: Path) -> Path:
    (directory / "sft.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Tell me a story about the cat number {i}"},
        {"role": "assistant", "content": "Once upon a time there was a cat."}]}) + "\n" for i in range(6)))
    card = directory / "sft.yaml"
    card.write_text("name: sft\ndescription: d\nlicense: MIT\nsource:\n  path: sft.jsonl\nformat: messages\n"
                    "eval:\n  size: 2\n", encoding="utf-8")
    return card


REFUSALS = {
    # stage: (recipe, card maker, max_length, fragments)
    "sft": ("sft", lambda d: write_sft_card(d), 8, ("every train row (4)", "`align sft`", "shortest prompt is")),
    "dpo": ("dpo", lambda d: write_pref_card(d, pref_rows(4, 6, 1, 1), pref_rows(2, 6, 1, 1)), 4,
            ("every train row (4)", "`align dpo`", "shortest prompt is")),
    "reward": ("reward", lambda d: write_pref_card(d, pref_rows(4, 6, 1, 1), pref_rows(2, 6, 1, 1)), 6,
               ("every train row (4)", "`align reward`", "shortest pair (its longer sequence) is")),
    "reward eval": ("reward", lambda d: write_pref_card(d, pref_rows(4, 1, 1, 1), pref_rows(2, 30, 1, 1)), 24,
                    ("every eval row (2)", "`align reward`")),
}


def refusal_args(stage: str, card: Path, max_length: int, stories_dir: Path) -> list[str]:
    return ["--set", f"data.card={card}", "--set", f"train.max_length={max_length}", "--set", "model.from=null",
            "--set", f"model.base={stories_dir}", "--set", "data.limit=null"]


def assert_length_refusal(stderr: str, card: Path, max_length: int, fragments: tuple[str, ...]) -> None:
    assert stderr.startswith(f"error: {card}: every ") and "Traceback" not in stderr, stderr[-3000:]
    assert f"train.max_length={max_length}" in stderr and "Raise train.max_length to at least" in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def test_max_length_below_every_row_is_refused_before_weights(stories_dir: Path, tmp_path: Path) -> None:
    """Every example dropped at train.max_length (TRL would fail deep inside with num_samples=0): one DataError
    naming the card, max_length and the shortest row, after the tokenizer loads and before any weights
    (ALIGN_FORBID_WEIGHTS makes a weight load raise). Nothing is published, no run directory is left."""
    from conftest import align_env, align_process

    stage, make_card, max_length, fragments = REFUSALS["sft"]
    card, registry = make_card(tmp_path), tmp_path / "registry"
    result = align_process([stage, REPO / "recipes" / "tiny" / "sft.yaml", "--registry", registry,
                            *refusal_args(stage, card, max_length, stories_dir)],
                           {**align_env(tmp_path / "cache"), "ALIGN_FORBID_WEIGHTS": "1"}, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert_length_refusal(result.stderr, card, max_length, fragments)
    assert not registry.exists() or not any(registry.rglob("*")), "a refused stage must leave nothing behind"


@pytest.mark.parametrize("case", list(REFUSALS))
def test_max_length_refusal_of_each_stage_and_of_data_validate(
        case: str, stories_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same refusal from every stage with a max_length (and for an eval split left empty), and from
    `data validate --recipe`, which predicts it. In-process through the CLI's entry point (`main`), like the
    bad-input catalogue, so the cases cost no interpreter start each."""
    from align.cli import main

    stage, make_card, max_length, fragments = REFUSALS[case]
    card, registry = make_card(tmp_path), tmp_path / "registry"
    monkeypatch.setenv("ALIGN_FORBID_WEIGHTS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = str(REPO / "recipes" / "tiny" / f"{stage}.yaml")
    for argv in ([stage, recipe, "--registry", str(registry)], ["data", "validate", "--recipe", recipe]):
        with pytest.raises(SystemExit) as stopped:
            main([*argv, *refusal_args(stage, card, max_length, stories_dir)])
        stderr = capsys.readouterr().err
        assert stopped.value.code == 2, stderr[-3000:]
        assert_length_refusal(stderr, card, max_length, fragments)
    assert not registry.exists() or not any(registry.rglob("*")), "a refused stage must leave nothing behind"
