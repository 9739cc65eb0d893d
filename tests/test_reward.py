"""`align reward` and `align score` on stories260K: the reward model learns judge-labelled pairs, its score
head is saved with the adapter, and a reloaded artifact reproduces its scores exactly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO
from safetensors import safe_open

pytestmark = pytest.mark.slow
TINY_REWARD = REPO / "recipes" / "tiny" / "reward.yaml"


def test_reward_model_learns_held_out_pairs_and_names_its_parents(reward_artifact: Path) -> None:
    manifest = json.loads((reward_artifact / "manifest.json").read_text())
    assert manifest["stage"] == "reward"
    assert [(p["role"], p["ref"]) for p in manifest["parents"]] == [("model", "tiny-sft@v2"),
                                                                    ("data", "tiny-pairs@v1")]
    metrics = manifest["metrics"]
    # Plain TRL on this setup reached 0.71 (256 pairs) and 0.81 (756 pairs); ~800 pairs here.
    assert metrics["eval_pairs"] >= 190
    assert metrics["eval_accuracy"] >= 0.75, metrics
    assert metrics["eval_accuracy"] > metrics["eval_accuracy_before"] + 0.15
    assert metrics["eval_margin_mean"] > 0 and metrics["eval_reward_std"] > 0
    assert manifest["adapter"]["normalisation"] == {"mean": metrics["eval_reward_mean"],
                                                     "std": metrics["eval_reward_std"]}


def test_score_head_is_saved_in_the_adapter(reward_artifact: Path) -> None:
    with safe_open(str(reward_artifact / "adapter" / "adapter_model.safetensors"), "pt") as tensors:
        keys = list(tensors.keys())
    assert any(".score." in key for key in keys), keys[:10]


def test_reloaded_reward_model_reproduces_its_eval_scores(reward_artifact: Path, sft_registry: Path,
                                                          run_align: Callable) -> None:
    result = run_align("score", "tiny-rm@latest", "--data", "tiny-pairs@v1", "--output", "jsonl",
                       "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    rescored = [json.loads(line) for line in result.stdout.splitlines()]
    recorded = json.loads((reward_artifact / "eval_scores.json").read_text())
    assert len(rescored) == len(recorded) >= 190
    for new, old in zip(rescored, recorded, strict=True):
        assert new["chosen"] == pytest.approx(old["chosen"], abs=1e-5)
        assert new["rejected"] == pytest.approx(old["rejected"], abs=1e-5)


def test_score_single_replies_as_a_table(reward_artifact: Path, sft_registry: Path, run_align: Callable) -> None:
    result = run_align("score", "tiny-rm@v1", "--prompt", "Once upon a time, there was a little cat. It",
                       "--response", " was very happy and loved to play with its best friend.",
                       "--response", " was sad and angry and cried all day.", "--output", "jsonl",
                       "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    happy, sad = (json.loads(line)["completion"] for line in result.stdout.splitlines())
    assert happy > sad
    table = run_align("score", "tiny-rm@v1", "--data", "tiny-pairs@v1", "--limit", "5", "--registry", sft_registry)
    assert table.returncode == 0 and "accuracy" in table.stdout and "over 5 pairs" in table.stdout


def test_reward_and_score_refuse_the_wrong_inputs(sft_registry: Path, run_align: Callable, tmp_path: Path) -> None:
    sft_card = run_align("reward", TINY_REWARD, "--registry", sft_registry,
                         "--set", f"data.card={REPO}/data_cards/tiny-sft.yaml")
    assert sft_card.returncode == 2 and "`align reward` needs chosen/rejected pairs" in sft_card.stderr
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({"prompt": "Hi", "chosen": f"a{i}", "rejected": f"b{i}"}) + "\n"
                            for i in range(6)) + json.dumps({"prompt": "Hi", "chosen": "x", "rejected": "x"}) + "\n")
    card = tmp_path / "same.yaml"
    card.write_text("name: same\ndescription: d\nlicense: MIT\nsource:\n  path: same.jsonl\nformat: chosen_rejected\n"
                    "eval:\n  size: 2\n")
    identical = run_align("reward", TINY_REWARD, "--registry", sft_registry, "--set", f"data.card={card}")
    assert identical.returncode == 2 and "same.jsonl:7: chosen and rejected are identical" in identical.stderr
    not_reward = run_align("score", "tiny-sft@v1", "--prompt", "hi", "--response", "hello",
                           "--registry", sft_registry)
    assert not_reward.returncode == 2 and "needs a reward artifact" in not_reward.stderr
    neither = run_align("score", "tiny-sft@v1", "--registry", sft_registry)
    assert neither.returncode == 2 and "either --data" in neither.stderr
    sft_as_data = run_align("reward", TINY_REWARD, "--registry", sft_registry, "--set", "data.card=tiny-sft@v1")
    assert sft_as_data.returncode == 2 and "no data card" in sft_as_data.stderr
    assert not list((sft_registry / "tiny-rm").glob("v2")), "a refused run publishes nothing"


@pytest.mark.parametrize(("name", "relative", "fmt", "extra"), [
    ("hh", "data/hh-rlhf/harmless-base-test.jsonl.gz", "hh_rlhf", "on_malformed: skip\n"),
    ("sharegpt", "data/llamafactory/dpo_en_demo.json", "sharegpt_preference", ""),
])
def test_third_party_preference_data_trains(name: str, relative: str, fmt: str, extra: str, shared_dir: Path,
                                            stories_dir: Path, tmp_path: Path, run_align: Callable) -> None:
    """Real third-party pairs load through cards and train a few steps (with reward centring on)."""
    card = tmp_path / f"{name}.yaml"
    card.write_text(f"name: {name}\ndescription: third-party pairs\nlicense: see ../shared\nsource:\n"
                    f"  path: {shared_dir / relative}\nformat: {fmt}\neval:\n  size: 48\n{extra}")
    result = run_align("reward", TINY_REWARD, "--registry", tmp_path / "registry",
                       "--set", f"model.base={stories_dir}", "--set", "model.from=null",
                       "--set", "model.chat_template=auto", "--set", f"data.card={card}",
                       "--set", "data.limit=48", "--set", "train.max_steps=3", "--set", "train.max_length=512",
                       "--set", "reward.center_rewards_coefficient=0.01")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "registry" / "tiny-rm" / "v1" / "manifest.json").read_text())
    assert manifest["metrics"]["global_step"] == 3 and manifest["data"][0]["format"] == fmt
    assert manifest["recipe"]["reward"]["center_rewards_coefficient"] == 0.01


def test_fresh_score_head_is_drawn_from_the_recipe_seed(pairs_artifact: Path, sft_registry: Path,
                                                        tmp_path: Path) -> None:
    """The score head is new weights: they come from `train.seed`, not from whatever the process drew before."""
    import shutil

    import torch

    from align import training
    from align.artifacts import Registry
    from align.recipe import load_recipe

    def head(seed: int, process_seed: int) -> torch.Tensor:
        torch.manual_seed(process_seed)
        recipe = load_recipe(TINY_REWARD, [f"train.seed={seed}", f"name=seeded-{seed}-{process_seed}"])
        inputs = training.prepare(recipe, Registry(registry), resume=False, say=lambda _: None)
        return inputs.model.score.weight.detach().clone()

    registry = shutil.copytree(sft_registry, tmp_path / "registry")  # prepare opens run directories there
    assert torch.equal(head(3, 1), head(3, 2))
    assert not torch.equal(head(3, 1), head(4, 1))
