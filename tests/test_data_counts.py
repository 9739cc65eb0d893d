"""Counts that add up: `align data validate` says where every row goes (ties, `where`, unknown columns, what each
stage drops at its max_length), and every stage's manifest records rows read, dropped by reason and used."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import REPO

REASONS = {"malformed", "tie", "filtered", "limit", "too_long"}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def pair(i: int, rejected_words: int = 1, **extra: Any) -> dict[str, Any]:
    """A plain-text pair: a short prompt, a short chosen reply, a rejected reply of `rejected_words` extra words."""
    return {"prompt": f"Once upon a time {i}", "chosen": " the dog ran", "rejected": " a fox sat" + " still" *
            rejected_words, **extra}


def pairs_card(directory: Path, train: list[dict[str, Any]], held: list[dict[str, Any]], body: str = "") -> Path:
    write_jsonl(directory / "train.jsonl", train)
    write_jsonl(directory / "eval.jsonl", held)
    card = directory / "pairs.yaml"
    card.write_text("name: pairs\ndescription: d\nlicense: MIT\nsource:\n  path: train.jsonl\n  eval_path: eval.jsonl\n"
                    f"format: chosen_rejected\n{body}", encoding="utf-8")
    return card


def accounting(stdout: str) -> dict[str, int]:
    """The last `rows: read N = train T + eval E + dropped D (reason n, ...)` line as numbers."""
    line = [line for line in stdout.splitlines() if "rows: read" in line][-1]
    numbers = dict(re.findall(r"(read|train|eval|malformed|tie|filtered|limit|too_long) (\d+)", line))
    return {key: int(value) for key, value in numbers.items()}


def adds_up(metrics: dict[str, Any]) -> bool:
    return metrics["rows_read"] == metrics["train_rows"] + metrics["eval_rows"] + sum(metrics["rows_dropped"].values())


def test_validate_lists_ties_filtered_rows_unknown_columns_and_accounts_for_every_row(
        tmp_path: Path, run_align: Callable) -> None:
    rows = [{"q": f"q{i}", "a": f"one {i}", "b": f"two {i}", "pref": label, "annotator": "gpt4", "keep": i != 5}
            for i, label in enumerate([1, 2, 0, 2, 1, 1, 0])]
    write_jsonl(tmp_path / "data.jsonl", rows)
    card = tmp_path / "card.yaml"
    card.write_text("name: alpaca-eval-like\ndescription: d\nlicense: MIT\nsource:\n  path: data.jsonl\n"
                    "format: pairwise_label\nfields: {prompt: q, answer_a: a, answer_b: b, label: pref}\n"
                    "label_map: {1: answer_a, 2: answer_b, 0: tie}\nwhere: {keep: true}\neval:\n  size: 1\n")
    result = run_align("data", "validate", card)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"dropped \S*data\.jsonl:3: tie \(label 0\)", out) and "data.jsonl:7: tie (label 0)" in out
    assert "filtered out 1 rows not matching where {keep: True}" in out
    assert "warning:" in out and "does not read: annotator (7 rows)" in out and "keep (" not in out
    assert accounting(out) == {"read": 7, "train": 3, "eval": 1, "malformed": 0, "tie": 2, "filtered": 1,
                               "limit": 0, "too_long": 0}


def test_validate_token_lengths_cover_chosen_and_rejected_and_each_stage_drops(
        tmp_path: Path, run_align: Callable, stories_dir: Path) -> None:
    """Rejected replies far longer than chosen ones: the percentiles count both sequences of every pair (so the
    max is a rejected one), and at a max_length between the two the reward stage drops exactly the long pairs
    while DPO keeps them (its prompts are short) and cuts them."""
    card = pairs_card(tmp_path, [pair(i, 40 if i < 3 else 1) for i in range(8)], [pair(10 + i, 1) for i in range(2)])
    result = run_align("data", "validate", card, "--tokenizer", stories_dir, "--chat-template", "none",
                       "--max-length", "30")
    assert result.returncode == 0, result.stderr
    table = {line.split()[0] + " " + line.split()[1]: line.split()[2:] for line in result.stdout.splitlines()
             if re.match(r"\s+(train|eval) (prompt|sequences)\s", line)}
    assert table["train sequences"][-1] == "16" and table["train prompt"][-1] == "8"  # count: both replies of 8 pairs
    assert int(table["train sequences"][3]) > 40 > int(table["train prompt"][3])  # max: a long rejected reply
    assert "align reward: train: drops 3, keeps 5; eval: drops 0, keeps 2" in result.stdout
    assert "align dpo: train: drops 0, cuts 3, keeps 8; eval: drops 0, cuts 0, keeps 2" in result.stdout


def test_reward_drops_what_validate_predicted_and_its_counts_add_up(
        tmp_path: Path, run_align: Callable, stories_dir: Path) -> None:
    """The reward stage's manifest counts what it trained on (not the rows it read), with what TRL drops at
    train.max_length recorded as rows_dropped.too_long, exactly as `data validate --recipe` predicted."""
    card = pairs_card(tmp_path, [pair(i, 40 if i % 4 == 0 else 1) for i in range(12)],
                      [pair(20 + i, 40 if i == 0 else 1) for i in range(3)])
    settings = ["--set", f"data.card={card}", "--set", "model.from=null", "--set", f"model.base={stories_dir}",
                "--set", "train.max_length=30", "--set", "train.max_steps=1", "--set", "train.eval_steps=null"]
    recipe = REPO / "recipes" / "tiny" / "reward.yaml"
    predicted = run_align("data", "validate", "--recipe", recipe, *settings)
    assert predicted.returncode == 0, predicted.stderr
    assert "align reward: train: drops 3, keeps 9; eval: drops 1, keeps 2" in predicted.stdout
    assert "as `align reward` will record it: rows: read" in predicted.stdout
    expected = accounting(predicted.stdout)

    # Without the baseline pass before training (reward.eval_before: false), which nothing here needs.
    result = run_align("reward", recipe, "--registry", tmp_path / "registry", *settings,
                       "--set", "reward.eval_before=false")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "registry" / "tiny-rm" / "v1" / "manifest.json").read_text())["metrics"]
    assert metrics["eval_accuracy_before"] is None and 0 <= metrics["eval_accuracy"] <= 1
    assert (metrics["rows_read"], metrics["train_rows"], metrics["eval_rows"]) == (15, 9, 2)
    assert metrics["rows_dropped"] == {**dict.fromkeys(REASONS, 0), "too_long": 4} and adds_up(metrics)
    assert {key: expected[key] for key in ("read", "train", "eval", "too_long")} == {
        "read": 15, "train": 9, "eval": 2, "too_long": 4}
    assert metrics["eval_pairs"] == 2 and metrics["train_rows_truncated"] == 0


def test_every_stage_of_the_chain_records_counts_that_add_up(sft_registry: Path, pairs_artifact: Path,
                                                             reward_artifact: Path, dpo_artifact: Path) -> None:
    for artifact in (sft_registry / "tiny-sft" / "v1", pairs_artifact, reward_artifact, dpo_artifact):
        manifest = json.loads((artifact / "manifest.json").read_text())
        metrics = manifest["metrics"]
        assert set(metrics["rows_dropped"]) == REASONS, artifact
        if manifest["stage"] == "pairs":
            metrics = {**metrics, "train_rows": metrics["prompts_train"], "eval_rows": metrics["prompts_eval"]}
        else:
            recipe = manifest["recipe"]
            assert metrics["train_rows"] <= (recipe["data"]["limit"] or metrics["rows_read"]), artifact
        assert adds_up(metrics), (artifact, metrics)
    dpo = json.loads((dpo_artifact / "manifest.json").read_text())["metrics"]
    assert dpo["rows_dropped"]["limit"] > 0 and isinstance(dpo["train_rows_truncated"], int)
