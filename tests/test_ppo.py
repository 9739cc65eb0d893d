"""`align ppo` on stories260K: the roles on one base model, efficacy against the tiny reward model with guards
against reward hacking, interrupt/resume reproducibility, the separate-models holder, and user errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, interrupt_after_first_checkpoint

PPO = REPO / "recipes" / "tiny" / "ppo.yaml"
STORY_PROMPTS = REPO / "data_cards" / "tiny-story-prompts.yaml"
# A short run for the mechanics tests: 3 steps of 16 prompts, checkpoints every step.
SHORT = ["--set", "train.max_steps=3", "--set", "ppo.rollout_batch_size=16", "--set", "train.save_steps=1",
         "--set", "data.eval_limit=8", "--set", "ppo.max_new_tokens=24"]


def manifest(registry: Path, name: str, version: int) -> dict:
    return json.loads((registry / name / f"v{version}" / "manifest.json").read_text())


def history(registry: Path, name: str, version: int) -> list[dict]:
    return json.loads((registry / name / f"v{version}" / "log_history.json").read_text())


@pytest.fixture(scope="session")
def ppo_artifact(reward_artifact: Path, sft_registry: Path, run_align: Callable) -> Path:
    """tiny-ppo@v1: PPO of tiny-sft@latest against tiny-rm@latest with the tiny recipe."""
    result = run_align("ppo", PPO, "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    return sft_registry / "tiny-ppo" / "v1"


def test_shared_roles_match_the_artifacts(reward_artifact: Path, sft_registry: Path) -> None:
    """On one base: the reward adapter scores exactly as the reward artifact does alone, the value head starts as
    the reward head, and the fresh policy adapter starts as the reference (the SFT model)."""
    import torch

    from align import models, scoring
    from align.artifacts import Registry
    from align.generation import generate_samples
    from align.ppo.roles import build_roles
    from align.ppo.rollout import layout
    from align.recipe import load_recipe
    from align.rewards import RewardModel

    registry = Registry(sft_registry)
    recipe = load_recipe(PPO)
    start = models.resolve_starting_point(recipe, registry)
    tokenizer = models.load_tokenizer(start.base, "none", saved_in=start.parent.path)
    reward = registry.resolve("tiny-rm@latest")
    torch.manual_seed(0)
    roles = build_roles(recipe, registry, start, models.load_starting_model(start, registry),
                        RewardModel.of(reward, "ppo.reward_model"), torch.float32)
    prompts = [[{"role": "user", "content": "Once upon a time, a little dog"}]] * 3
    replies = [" was very happy and played with his friends.", " was sad and cried all day.", " saw a tree."]
    scorer, score_tokenizer = models.load_reward_model(reward, registry)
    items = [(p, [{"role": "assistant", "content": r}]) for p, r in zip(prompts, replies, strict=True)]
    expected = scoring.score_replies(scorer, score_tokenizer, items, chat_template="none", max_length=128)
    with torch.no_grad():
        shared = roles.reward_scores(prompts, replies, batch_size=2)
    assert shared == pytest.approx(expected, abs=1e-5)
    assert expected[0] > expected[1]  # the reward model prefers the happy continuation

    samples = generate_samples(roles.policy, tokenizer, prompts, chat_template="none", max_new_tokens=8,
                               temperature=1.0, seed=3)
    input_ids, attention, positions, response_mask, width = layout(samples, tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs, _, values = roles.actor_critic(input_ids, attention, positions, width, 1.0)
        reference = roles.reference_logprobs(input_ids, attention, positions, width, 1.0)
    assert torch.allclose(logprobs[response_mask], reference[response_mask], atol=1e-5)
    assert values.shape == response_mask.shape and values[response_mask].abs().sum() > 0

    # Switching roles (PEFT's set_adapter, and leaving disable_adapter) must not freeze a trained adapter.
    trainable = {name.split(".")[-2] for name, p in roles.actor_critic.named_parameters()
                 if p.requires_grad and ".lora_" in name}
    assert trainable == {"policy", "value"} and roles.actor_critic.value_head.weight.requires_grad


def test_ppo_raises_the_judge_score_without_reward_hacking(ppo_artifact: Path, sft_registry: Path,
                                                            run_align: Callable) -> None:
    m = json.loads((ppo_artifact / "manifest.json").read_text())
    roles = {p["role"]: p["ref"] for p in m["parents"]}
    assert roles == {"model": "tiny-sft@v2", "reward": "tiny-rm@v1"}
    assert m["data"][0]["name"] == "tiny-story-prompts" and m["ppo"]["kl_coef"] > 0
    assert (ppo_artifact / "adapter" / "adapter_config.json").is_file()
    assert (ppo_artifact / "value" / "adapter_config.json").is_file()
    assert (ppo_artifact / "value" / "value_head.safetensors").is_file()
    steps = json.loads((ppo_artifact / "log_history.json").read_text())
    assert [s["step"] for s in steps] == list(range(1, m["metrics"]["global_step"] + 1))
    for key in ("reward", "score", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl",
                "response_length", "tokens_per_second"):
        assert all(isinstance(s[key], float) for s in steps), key
    assert m["metrics"]["eval_score"] > m["metrics"]["eval_score_before"]

    result = run_align("eval", "tiny-ppo@v1", "--data", STORY_PROMPTS, "--limit", "64", "--num-samples", "4",
                       "--reward", "tiny-rm@latest", "--registry", sft_registry)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((ppo_artifact / "eval.json").read_text())
    assert report["judge_delta"] >= 0.25, report
    assert report["policy"]["reward"] > report["parent_model"]["reward"]
    assert report["policy"]["distinct_2"] >= 0.4
    assert report["ref_nll_rise"] <= 0.3
    assert 0 < report["kl_per_token"] <= 1.0 and report["kl"] > 0


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path: Path, reward_artifact: Path,
                                                          sft_registry: Path, run_align: Callable) -> None:
    clean = run_align("ppo", PPO, "--registry", sft_registry, *SHORT, "--set", "name=ppo-clean")
    assert clean.returncode == 0, clean.stderr[-3000:]

    interrupt_after_first_checkpoint(["ppo", PPO, "--registry", sft_registry, *SHORT, "--set", "name=ppo-cut"],
                                     sft_registry, "ppo-cut", tmp_path / "cache")

    resumed = run_align("ppo", PPO, "--registry", sft_registry, *SHORT, "--set", "name=ppo-cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert manifest(sft_registry, "ppo-cut", 1)["resumed_from"].startswith("checkpoint-")
    expected, got = history(sft_registry, "ppo-clean", 1), history(sft_registry, "ppo-cut", 1)
    assert len(got) == len(expected) == 3
    for a, b in zip(expected, got, strict=True):
        for key in ("reward", "score", "kl", "policy_loss", "value_loss", "clipfrac", "response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a["step"])


def test_separate_models_give_the_same_run(reward_artifact: Path, sft_registry: Path, run_align: Callable,
                                           stories_dir: Path) -> None:
    """Four model copies instead of adapters on one: the same code path, the same numbers."""
    shared = run_align("ppo", PPO, "--registry", sft_registry, *SHORT, "--set", "train.max_steps=2",
                       "--set", "name=ppo-shared")
    separate = run_align("ppo", PPO, "--registry", sft_registry, *SHORT, "--set", "train.max_steps=2",
                         "--set", "name=ppo-separate", "--set", "ppo.models=separate")
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert separate.returncode == 0, separate.stderr[-3000:]
    shared_metrics, separate_metrics = (manifest(sft_registry, name, 1)["metrics"] for name in ("ppo-shared",
                                                                                               "ppo-separate"))
    assert separate_metrics["models"] == "separate"
    # The separate holder's three extra copies of the weights (reference, value, reward) are what sharing saves.
    from transformers import AutoModelForCausalLM

    one_copy = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(stories_dir).parameters())
    saved = (separate_metrics["weights_mib"] - shared_metrics["weights_mib"]) * 2**20
    assert saved == pytest.approx(3 * one_copy, rel=0.1)
    for a, b in zip(history(sft_registry, "ppo-shared", 1), history(sft_registry, "ppo-separate", 1), strict=True):
        for key in ("reward", "score", "kl", "policy_loss", "value_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


@pytest.mark.parametrize(("overrides", "message"), [
    (["ppo.reward_model=tiny-sft@latest"], "not a reward model"),
    (["ppo.rollout_batch_size=20"], "ppo.rollout_batch_size"),
    (["ppo.reward_model=null"], "give a reward"),
    (["ppo.kl_coef=0"], "kl_coef"),
    (["ppo.kl_estimator=k2"], "kl_estimator"),
    (["train.report_to=nosuchtracker"], "report_to"),
    (["train.report_to=trackio"], "pip install trackio"),  # not installed: no tracker is a dependency of align
    ([f"ppo.reward_model={REPO.parent / 'shared' / 'models' / 'stories260K'}"], "use ppo.models: separate"),
])
def test_user_errors_exit_2_and_publish_nothing(overrides: list[str], message: str, reward_artifact: Path,
                                                sft_registry: Path, run_align: Callable) -> None:
    args = [arg for override in overrides for arg in ("--set", override)]
    result = run_align("ppo", PPO, "--registry", sft_registry, *args, "--set", "name=ppo-bad")
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (sft_registry / "ppo-bad").exists() or not list((sft_registry / "ppo-bad").glob("v*"))


def test_prompt_order_covers_each_prompt_once_per_pass_and_splits_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    from align.ppo.trainer import prompt_indices

    seen = []
    for step in range(5):  # 5 steps x 2 ranks x 4 prompts = 40 = two passes over 20 prompts
        for rank in range(2):
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            seen.append(prompt_indices(20, step, 4, seed=1))
    first_pass = [i for chunk in seen[:5] for i in chunk]
    second_pass = [i for chunk in seen[5:] for i in chunk]
    assert sorted(first_pass) == sorted(second_pass) == list(range(20))
    assert first_pass != second_pass  # reshuffled for the second pass
    assert seen[0] != seen[1]  # ranks answer different prompts at the same step
    monkeypatch.setenv("RANK", "1")
    assert prompt_indices(20, 3, 4, seed=1) == seen[7]  # a pure function: a resumed run picks the same


def test_two_processes_train_and_publish_once(reward_artifact: Path, sft_registry: Path,
                                              run_align: Callable) -> None:
    """`launch.num_processes: 2`: two gloo ranks under accelerate, DDP over the policy and value adapters."""
    result = run_align("ppo", PPO, "--registry", sft_registry, *SHORT, "--set", "train.max_steps=2",
                       "--set", "launch.num_processes=2", "--set", "name=ppo-ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (sft_registry / "ppo-ddp").glob("v*")) == ["v1"]
    m = manifest(sft_registry, "ppo-ddp", 1)
    assert m["world_size"] == 2 and m["metrics"]["global_step"] == 2
    steps = history(sft_registry, "ppo-ddp", 1)
    assert steps[-1]["epoch"] == pytest.approx(2 * 2 * 16 / 800)  # two ranks x 16 prompts per step


def test_a_whole_reward_model_directory_works_with_separate_models(reward_artifact: Path, sft_registry: Path,
                                                              run_align: Callable, tmp_path: Path) -> None:
    """`ppo.reward_model` may name a plain sequence-classification model (here: tiny-rm exported and merged)."""
    exported = tmp_path / "tiny-rm-merged"
    assert run_align("export", "tiny-rm@v1", "--merge", exported, "--registry", sft_registry).returncode == 0
    args = [*SHORT, "--set", "train.max_steps=1", "--set", f"ppo.reward_model={exported}"]
    result = run_align("ppo", PPO, "--registry", sft_registry, *args, "--set", "ppo.models=separate",
                       "--set", "name=ppo-dir")
    assert result.returncode == 0, result.stderr[-3000:]
    m = manifest(sft_registry, "ppo-dir", 1)
    assert [p["role"] for p in m["parents"]] == ["model"]  # a directory is not an artifact parent...
    assert m["reward_model"]["location"] == str(exported)  # ...but the manifest records it, with file hashes
    assert all(f["sha256"] for f in m["reward_model"]["files"])
    # The export records the reward artifact's statistics, so the directory normalises as the artifact would.
    stats = json.loads((exported / "align_export.json").read_text())["normalisation"]
    first = history(sft_registry, "ppo-dir", 1)[0]
    assert first["reward"] == pytest.approx((first["score"] - stats["mean"]) / stats["std"], abs=1e-5)


def test_sequence_reward_combines_normalised_score_judge_and_eos_penalty() -> None:
    from align.manifest import Normalisation
    from align.rewards import combine

    # (2 - 1) / 2 + 0.5 * 0.8 = 0.9; (0 - 1) / 2 + 0.5 * -0.2 - 1 (no EOS) = -1.6
    got = combine([2.0, 0.0], Normalisation(mean=1.0, std=2.0), [0.8, -0.2], 0.5, [True, False], 1.0)
    assert got == pytest.approx([0.9, -1.6])
    assert combine(None, None, [0.3], 2.0, [False], None) == pytest.approx([0.6])  # judge only, no penalty set
    assert combine([3.0], None, None, 1.0, [True], 1.0) == pytest.approx([3.0])  # raw score without statistics
