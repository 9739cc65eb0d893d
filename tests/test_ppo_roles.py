"""PPO's roles as built, before any training: the value model starts on the reward's normalised scale and on the
weights the reward adapter was trained on, and the reward model reads text with its own tokenizer and template
whichever layout holds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, copy_reward_artifact, rerecord_files

PPO = REPO / "recipes" / "tiny" / "ppo.yaml"
PROMPTS = [[{"role": "user", "content": "Once upon a time, a little dog"}],
           [{"role": "user", "content": "The girl found a box"}]] * 2
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
REPLIES = [" was very happy and played with his friends.", " was sad and cried all day.", " saw a tree.",
           " It was a big red box and she loved it."]


def build(registry_root: Path, overrides: list[str]) -> Any:
    import torch

    from align import models
    from align.artifacts import Registry
    from align.ppo.roles import build_roles
    from align.recipe import load_recipe
    from align.rewards import RewardModel

    registry = Registry(registry_root)
    recipe = load_recipe(PPO, overrides)
    start = models.resolve_starting_point(recipe, registry)
    tokenizer = models.load_tokenizer(start.base, recipe.model.chat_template,
                                      saved_in=start.parent.path if start.parent else None)
    reward = registry.resolve(recipe.ppo.reward_model)
    torch.manual_seed(0)
    return build_roles(recipe, registry, start, models.load_starting_model(start, registry),
                       RewardModel.of(reward, "ppo.reward_model"), torch.float32), tokenizer, reward


def value_where_reward_reads(roles: Any) -> list[float]:
    """The value head on the value model's hidden state at the token where the reward model reads its score, for
    REPLIES formatted as the reward model formats them."""
    import torch

    items = [(p, [{"role": "assistant", "content": r}]) for p, r in zip(PROMPTS, REPLIES, strict=True)]
    ids, attention = roles.reward_scorer.reward.encode(items)
    critic = roles.actor_critic
    with torch.no_grad():
        hidden = critic.hidden("value", ids, attention, (attention.cumsum(1) - 1).clamp(min=0))  # [B, T, H]
        last = attention.sum(dim=1) - 1  # [B] right-padded: the last real token
        return critic.value_head(hidden[torch.arange(len(ids)), last]).squeeze(-1).tolist()


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_value_starts_as_the_normalised_reward(layout: str, reward_artifact: Path, sft_registry: Path) -> None:
    """value_from_reward + normalize_reward: the value head predicts (score - mean) / std, not the raw score."""
    import torch

    roles, _, reward = build(sft_registry, [f"ppo.models={layout}"])
    stats = reward.manifest.adapter.normalisation
    with torch.no_grad():
        raw = roles.reward_scores(PROMPTS, REPLIES, batch_size=4)
    normalised = [(s - stats.mean) / stats.std for s in raw]
    assert value_where_reward_reads(roles) == pytest.approx(normalised, abs=1e-4)
    assert roles.actor_critic.value_head.bias.requires_grad


def test_a_rollouts_last_values_sit_on_the_normalised_score_scale(reward_artifact: Path, sft_registry: Path,
                                                                   tmp_path: Path) -> None:
    """Right after the roles are built, the mean value at each reply's last token is close to the mean
    normalised score of the batch. The reward copy records statistics far from its raw scores (mean + 3 std,
    std / 2), so the normalised scores sit around -6 and a value head left on the raw scale would be far off."""
    from align.ppo.rollout import collect
    from align.recipe import load_recipe

    def shift(manifest: dict) -> None:
        stats = manifest["adapter"]["normalisation"]
        manifest["adapter"]["normalisation"] = {"mean": stats["mean"] + 3 * stats["std"], "std": stats["std"] / 2}

    registry = tmp_path / "registry"
    ref = copy_reward_artifact(sft_registry, registry, "rm-shifted", shift)
    roles, tokenizer, _ = build(registry, [f"ppo.reward_model={ref}"])
    settings = load_recipe(PPO).ppo
    prompts = [[{"role": "user", "content": text}] for text in
               ("Once upon a time, a little dog", "The girl found a box", "Tom and his mom went",
                "One day, a bird")] * 8
    rollout = collect(roles, tokenizer, prompts, settings, chat_template="none", reward_fn=None, seed=0,
                      forward_batch_size=16)
    last = rollout.response_mask.sum(dim=1) - 1  # [B]
    values = rollout.values[range(len(last)), last]  # [B]
    scores = rollout.scores  # [B] normalised reward-model scores, around -6 here
    assert scores.mean().item() < -3
    assert abs(values.mean().item() - scores.mean().item()) < 0.5 * scores.std().item() + 0.1, (
        values.mean().item(), scores.mean().item())


def test_separate_value_model_starts_from_the_rewards_own_chain(reward_artifact: Path, sft_registry: Path,
                                                                stories_dir: Path) -> None:
    """A policy from the bare base with a reward model trained on tiny-sft: the value copy of the reward adapter
    must sit on tiny-sft's weights, where it was trained, not on the policy's."""
    roles, _, _ = build(sft_registry, ["ppo.models=separate", "model.from=null",
                                       f"model.base={stories_dir.resolve()}"])
    import torch

    with torch.no_grad():
        raw = roles.reward_scores(PROMPTS, REPLIES, batch_size=4)
    stats = roles.normalisation
    assert value_where_reward_reads(roles) == pytest.approx([(s - stats.mean) / stats.std for s in raw],
                                                            abs=1e-4)


def test_reward_reads_text_its_own_way_in_both_layouts(reward_artifact: Path, sft_registry: Path,
                                                       tmp_path: Path) -> None:
    """A reward model whose tokenizer carries another chat template than the policy's: both layouts score with the
    reward artifact's tokenizer and template, so they agree (and agree with `align score`'s reading)."""
    from align import models, scoring
    from align.artifacts import Registry
    from align.manifest import Manifest

    registry_root = tmp_path / "registry"

    def chat(manifest: dict) -> None:
        manifest["adapter"]["chat_template"] = "auto"  # read with its own tokenizer's template, set below

    copy_reward_artifact(sft_registry, registry_root, "rm-chat", chat)
    target = registry_root / "rm-chat" / "v1"
    tokenizer = models.load_tokenizer(models.BaseModelSpec.from_manifest(Manifest.read(target).base_model), "auto",
                                      saved_in=target)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(target))
    rerecord_files(target)  # made differently, not damaged: its file record describes the new tokenizer
    overrides = ["ppo.reward_model=rm-chat@v1"]
    shared, policy_tokenizer, reward = build(registry_root, [*overrides, "ppo.models=shared"])
    separate, _, _ = build(registry_root, [*overrides, "ppo.models=separate"])
    assert policy_tokenizer.chat_template != CHATML  # the policy's tokenizer would render another text
    scores = [roles.reward_scores(PROMPTS, REPLIES, batch_size=4) for roles in (shared, separate)]
    registry = Registry(registry_root)
    scorer, score_tokenizer = models.load_reward_model(registry.resolve("rm-chat@v1"), registry)
    items = [(p, [{"role": "assistant", "content": r}]) for p, r in zip(PROMPTS, REPLIES, strict=True)]
    expected = scoring.score_replies(scorer, score_tokenizer, items, chat_template="auto",
                                     max_length=reward.manifest.recipe["train"]["max_length"])
    assert scores[0] == pytest.approx(expected, abs=1e-5)
    assert scores[1] == pytest.approx(expected, abs=1e-5)


def test_layers_below_every_adapter_run_once_for_policy_value_and_reference(stories_dir: Path) -> None:
    """With adapters on the top layers only (as the demo's), the shared layout computes the layers below them once
    per batch (`ActorCritic.trunk`) for the policy, the value and the reference, and every number is exactly
    that of whole passes: log-probs, entropies, values, reference log-probs and the gradients."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from align import models
    from align.ppo.roles import ActorCritic, Roles

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(stories_dir)
    config = {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"], "layers_to_transform": [3, 4],
              "init_lora_weights": False}  # non-zero B: the adapters change the numbers
    model = get_peft_model(base, LoraConfig(**config), adapter_name="policy")
    model.add_adapter("value", LoraConfig(**config))
    for name, param in model.named_parameters():
        param.requires_grad_(".policy." in name or ".value." in name)
    critic = ActorCritic(model, model, torch.nn.Linear(base.config.hidden_size, 1))
    roles = Roles(critic, None, None, None, "shared")
    assert models.unadapted_layers(model) == 3

    input_ids = torch.tensor([[0, 0, 1, 403, 251, 310, 263, 131], [1, 38, 201, 263, 431, 227, 471, 263]])
    attention = (input_ids != 0).long()
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    bottom_calls: list[int] = []
    hook = models.decoder(model).layers[0].register_forward_hook(lambda *_: bottom_calls.append(1))

    def run(shared: bool) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        critic.zero_grad(set_to_none=True)
        bottom_calls.clear()
        trunk = critic.trunk(input_ids, attention, positions) if shared else None
        calls_for_trunk = len(bottom_calls)
        logprobs, entropy, values = critic(input_ids, attention, positions, 4, 1.0, trunk=trunk)
        with torch.no_grad():
            reference = roles.reference_logprobs(input_ids, attention, positions, 4, 1.0, trunk=trunk)
        (logprobs.sum() + values.sum()).backward()
        if shared:
            assert trunk is not None and critic.trunk_below == 3
            assert len(bottom_calls) == calls_for_trunk  # nothing after the trunk ran the bottom layers again
        else:
            assert len(bottom_calls) == 3  # policy, value, reference: each a whole pass
        grads = {name: p.grad.clone() for name, p in critic.named_parameters() if p.grad is not None}
        return [logprobs, entropy, values, reference], grads

    try:
        whole, whole_grads = run(shared=False)
        split, split_grads = run(shared=True)
    finally:
        hook.remove()
    for a, b in zip(whole, split, strict=True):
        assert torch.equal(a, b)
    assert whole_grads.keys() == split_grads.keys() and len(whole_grads) > 0
    assert all(torch.equal(whole_grads[name], split_grads[name]) for name in whole_grads)
