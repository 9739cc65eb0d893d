"""What is sampled is what is scored: the sampling config generation uses, the stop ids that end a reply, and the
checks PPO makes on its recipe (no nucleus sampling, no adapted output layer). Everything here runs on the real
stories260K model without training."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, copy_reward_artifact

PPO = REPO / "recipes" / "tiny" / "ppo.yaml"
PERIOD = 426  # "." in stories260K's vocabulary: a token it writes in almost every sentence
PROMPT = [{"role": "user", "content": "Once upon a time, a little dog"}]


def _stories(stories_dir: Path) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    tokenizer.pad_token = tokenizer.unk_token
    return model, tokenizer


def test_one_token_samples_follow_the_scored_distribution(stories_dir: Path) -> None:
    """Near-uniform logits over 512 tokens: with transformers' default top_k=50 only 50 ids could appear. The
    sample frequencies must match exp(token_logprobs) at the sampling temperature (chi-square)."""
    import torch

    from align import models
    from align.generation import generate_samples, render_prompt

    model, tokenizer = _stories(stories_dir)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone() * 0.05)  # untied from the embeddings, flattened
    model.generation_config.top_k = 1  # a checkpoint's own setting must not leak into sampling either
    temperature, n = 0.8, 6000
    samples = generate_samples(model, tokenizer, [PROMPT] * n, chat_template="none", max_new_tokens=1,
                               temperature=temperature, seed=5, batch_size=2000)
    counts = Counter(s.reply_ids[0] for s in samples)
    assert len(counts) >= 200, len(counts)

    ids = tokenizer(render_prompt(tokenizer, PROMPT, "none"), return_tensors="pt")["input_ids"]  # [1, P]
    with torch.no_grad():
        hidden = models.decoder(model)(input_ids=ids).last_hidden_state[:, -1:]  # [1, 1, H]
        vocab = torch.arange(head.weight.shape[0]).reshape(1, -1)  # [1, V]: score every token as the reply
        logp = models.token_logprobs(model, hidden.expand(1, vocab.shape[1], -1), vocab, temperature)[0][0]
    expected = logp.exp() * n  # [V]
    assert expected.sum().item() == pytest.approx(n, rel=1e-4)
    # Pool tokens with small expected counts into one cell, as the chi-square approximation needs.
    big = expected >= 5
    observed = torch.tensor([counts.get(i, 0) for i in range(len(expected))], dtype=torch.float64)
    pooled = [] if big.all() else [~big]
    cells_obs = torch.cat([observed[big], *[observed[m].sum().reshape(1) for m in pooled]])
    cells_exp = torch.cat([expected[big].double(), *[expected[m].double().sum().reshape(1) for m in pooled]])
    chi2 = ((cells_obs - cells_exp) ** 2 / cells_exp).sum().item()
    dof = len(cells_obs) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), (chi2, dof)  # ~5 standard deviations above the mean


def test_checkpoint_sampling_settings_do_not_make_samples_greedy(stories_dir: Path, tmp_path: Path) -> None:
    """A base whose generation_config.json ships `top_k: 1` (as real checkpoints ship sampling settings) still
    gives diverse samples: generation pins its own complete sampling config."""
    from align.evaluate import distinct_n
    from align.generation import generate_samples

    model, tokenizer = _stories(stories_dir)
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 3.0
    samples = generate_samples(model, tokenizer, [PROMPT] * 32, chat_template="none", max_new_tokens=32,
                               temperature=1.0, seed=0, batch_size=32)
    assert distinct_n([s.text for s in samples]) > 0.4
    assert model.generation_config.top_k == 1  # the checkpoint's settings are restored afterwards


def test_replies_end_at_every_stop_id(stories_dir: Path) -> None:
    """generation_config.eos_token_id is a list for many models: a reply ends at any of its ids, with no padding
    after it, it counts as ended, and the online reward does not charge the missing-EOS penalty."""
    from align.generation import generate_samples, stop_token_ids
    from align.rewards import RewardSpec, reward_function

    model, tokenizer = _stories(stories_dir)
    model.generation_config.eos_token_id = [2, PERIOD]
    assert stop_token_ids(model, tokenizer) == [2, PERIOD]
    samples = generate_samples(model, tokenizer, [PROMPT] * 16, chat_template="none", max_new_tokens=48,
                               temperature=1.0, seed=1, batch_size=16)
    at_period = [s for s in samples if s.reply_ids[-1] == PERIOD]
    assert len(at_period) >= 8
    for sample in samples:
        stops = [i for i, token in enumerate(sample.reply_ids) if token in (2, PERIOD)]
        assert stops in ([], [len(sample.reply_ids) - 1]), sample.reply_ids  # nothing after the stop token
        assert sample.ended == bool(stops)
        assert tokenizer.pad_token_id not in sample.reply_ids
    assert all(s.text.count(".") <= 1 for s in at_period)

    def judge(prompts: list, replies: list[str]) -> list[float]:
        return [0.0] * len(replies)

    spec = RewardSpec(None, None, "judge", 1.0, missing_eos_penalty=1.0, judge=judge)
    reward = reward_function(spec, registry=None, policy_tokenizer=tokenizer,
                             stop_ids=stop_token_ids(model, tokenizer))
    got = reward(prompts=["a"] * 3, completions=["x"] * 3, completion_ids=[[5, PERIOD], [5, 2], [5, 6]])
    assert got == [0.0, 0.0, -1.0]


@pytest.mark.parametrize(("stage", "override"), [("ppo", "lora.modules_to_save=[lm_head]"),
                                                 ("ppo", "lora.target_modules=[q_proj, v_proj, lm_head]"),
                                                 ("ppo", "ppo.top_p=0.9"), ("grpo", "grpo.top_p=0.9")])
def test_rl_refuses_what_would_score_another_policy(stage: str, override: str, run_align: Callable) -> None:
    """An adapted output layer (PPO's reference would not be adapter-free) and nucleus sampling (log-probs are
    full-softmax) are recipe errors, caught when the recipe is read: exit 2 before any model loads."""
    result = run_align("recipe", "validate", REPO / "recipes" / "tiny" / f"{stage}.yaml", "--set", override)
    assert result.returncode == 2, result.stdout + result.stderr
    field = override.split("=")[0]
    assert field.split(".")[-1] in result.stderr or "lm_head" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_reward_normalisation_is_one_rule() -> None:
    """ppo, grpo and rloo: normalise with the recorded mean/std; none recorded or a std of 0 is an error."""
    from align.errors import ArtifactError
    from align.manifest import Normalisation
    from align.rewards import combine, reward_normalisation

    assert reward_normalisation(Normalisation(mean=1, std=2), "rm@v1", "ppo") == Normalisation(mean=1.0, std=2.0)
    for bad, message in ((None, "records no score mean/std"), (Normalisation(mean=0.0, std=0.0), "std of 0.0"),
                         (Normalisation(mean=0.0, std=float("nan")), "std of nan")):
        with pytest.raises(ArtifactError, match=message):
            reward_normalisation(bad, "rm@v1", "ppo")
    assert combine([3.0], Normalisation(mean=1.0, std=0.5), None, 1.0, [True], None) == [4.0]


def test_ppo_refuses_a_reward_model_without_statistics_before_loading(reward_artifact: Path, sft_registry: Path,
                                                                      run_align: Callable, tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    ref = copy_reward_artifact(sft_registry, registry, "rm-nostats", lambda m: m["adapter"].update(normalisation=None))
    result = run_align("ppo", PPO, "--registry", registry, "--set", f"ppo.reward_model={ref}",
                       "--set", "name=ppo-nostats")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "records no score mean/std" in result.stderr and "normalize_reward: false" in result.stderr
    assert not (registry / "ppo-nostats").exists()  # refused before prepare made a run directory
