"""`align pairs`: sampling, judging and selection, and the dataset artifact it publishes."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from align.artifacts import Registry
from align.data import load_card, load_data
from align.judges import JudgeError, load_judge
from align.recipe import PairsSection
from align.stages.pairs import select_pairs

PROMPT = [{"role": "user", "content": "Tell me a story."}]


def test_best_worst_keeps_one_pair_per_prompt() -> None:
    rows = select_pairs(PROMPT, ["ok", "great", "awful", "fine"], [0.1, 0.9, -0.8, 0.2], PairsSection())
    assert [(r["chosen"], r["rejected"], r["chosen_score"], r["rejected_score"]) for r in rows] == [
        ("great", "awful", 0.9, -0.8)]


def test_all_pairs_respects_the_margin() -> None:
    settings = PairsSection(selection="all_pairs", min_margin=0.5)
    rows = select_pairs(PROMPT, ["a", "b", "c"], [1.0, 0.6, 0.0], settings)
    # 1.0-0.6 = 0.4 is not above the margin; 1.0-0.0 and 0.6-0.0 are.
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("a", "c"), ("b", "c")]


def test_ties_and_identical_replies_make_no_pair() -> None:
    assert select_pairs(PROMPT, ["same", "same"], [0.9, -0.9], PairsSection()) == []
    assert select_pairs(PROMPT, ["x", "y"], [0.3, 0.3], PairsSection()) == []


def test_judges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(tmp_path / "registry")
    vader, artifact = load_judge("vader", registry)
    happy, sad = vader([PROMPT, PROMPT], ["What a wonderful, happy day!", "This is terrible and sad."])
    assert artifact is None and happy > 0.5 > -0.5 > sad
    (tmp_path / "my_judges.py").write_text(
        "def length(prompts, replies):\n    return [len(r) for r in replies]\n"
        "def broken(prompts, replies):\n    return ['x' for r in replies]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    length, _ = load_judge("my_judges:length", registry)
    assert length([PROMPT, PROMPT], ["ab", "abcd"]) == [2.0, 4.0]
    broken, _ = load_judge("my_judges:broken", registry)
    with pytest.raises(JudgeError, match="must return a list of numbers"):
        broken([PROMPT], ["a"])
    with pytest.raises(JudgeError, match="cannot import module 'no_such_judges'"):
        load_judge("no_such_judges:score", registry)
    with pytest.raises(JudgeError, match="has no callable 'missing'"):
        load_judge("my_judges:missing", registry)
    with pytest.raises(JudgeError, match="unknown judge 'sentiment'"):
        load_judge("sentiment", registry)
    sys.modules.pop("my_judges", None)


@pytest.mark.slow
def test_pairs_artifact_is_a_loadable_card_with_held_out_prompts(pairs_artifact: Path) -> None:
    manifest = json.loads((pairs_artifact / "manifest.json").read_text())
    assert manifest["stage"] == "pairs" and manifest["pairs"]["judge"] == "vader"
    assert manifest["pairs"]["num_samples"] == 4
    assert [(p["role"], p["ref"]) for p in manifest["parents"]] == [("model", "tiny-sft@v2")]
    loaded = load_data(load_card(pairs_artifact / "card.yaml"))
    metrics = manifest["metrics"]
    assert (len(loaded.train), len(loaded.eval)) == (metrics["pairs_train"], metrics["pairs_eval"])
    assert metrics["pairs_train"] >= 750 and metrics["chosen_mean"] > metrics["judge_mean"] > metrics["rejected_mean"]
    prompts = load_data(load_card(Path(__file__).resolve().parents[1] / "data_cards" / "tiny-story-prompts.yaml"))
    held_out = {row["prompt"][-1]["content"] for row in prompts.eval}
    assert {row["prompt"][-1]["content"] for row in loaded.eval} <= held_out
    assert not {row["prompt"][-1]["content"] for row in loaded.train} & held_out
    # Plain-text continuations keep the space that joins them to the prompt.
    assert all(row["chosen"][0]["content"] for row in loaded.train)
    first = json.loads((pairs_artifact / "train.jsonl").read_text().splitlines()[0])
    assert first["chosen"].startswith(" ") and first["chosen_score"] > first["rejected_score"]
    # Story continuations are mostly cut at max_new_tokens: recorded per reply, and (keep_open) read as open.
    assert metrics["replies_truncated"] > 0 and metrics["pairs_dropped_truncated"] == 0
    assert loaded.train[0]["chosen_open"] is first["chosen_truncated"]


def test_pairs_refuses_a_judge_that_does_not_import(tmp_path: Path, run_align: Callable, stories_dir: Path) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "pairs.yaml"
    result = run_align("pairs", recipe, "--registry", tmp_path, "--set", "pairs.judge=nowhere_module:judge",
                       "--set", "model.from=null", "--set", f"model.base={stories_dir}")
    assert result.returncode == 2 and "cannot import module 'nowhere_module'" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("*/v*"))


@pytest.mark.slow
def test_a_reward_artifact_can_judge(reward_artifact: Path, sft_registry: Path, run_align: Callable) -> None:
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "pairs.yaml"
    result = run_align("pairs", recipe, "--registry", sft_registry, "--set", "name=tiny-rm-pairs",
                       "--set", "pairs.judge=reward:tiny-rm@v1", "--set", "data.limit=16", "--set", "data.eval_limit=8")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((sft_registry / "tiny-rm-pairs" / "v1" / "manifest.json").read_text())
    assert [(p["role"], p["ref"]) for p in manifest["parents"]] == [("model", "tiny-sft@v2"), ("judge", "tiny-rm@v1")]
    assert manifest["metrics"]["pairs_train"] >= 12
