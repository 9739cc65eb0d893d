"""Rollouts: sample replies from the policy, score them, and record what the PPO update needs (no gradients).

A rollout batch is laid out as one tensor per quantity: prompts left-padded to a common width P, replies
right-padded to width R, so response position j of every row is column P + j. Position ids follow the
attention mask, because a left-padded row's first real token must still be position 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from align.generation import generate_samples
from align.rewards import combine

if TYPE_CHECKING:
    from align.data import Message
    from align.generation import Sample
    from align.ppo.roles import Roles
    from align.recipe import PpoSection


@dataclass
class Rollout:
    """One batch of sampled replies and everything measured on them. Shapes: B rows, P prompt, R reply columns."""

    input_ids: torch.Tensor  # [B, P + R]
    attention_mask: torch.Tensor  # [B, P + R]
    position_ids: torch.Tensor  # [B, P + R]
    response_mask: torch.Tensor  # [B, R] bool: real reply tokens (EOS included)
    prompt_width: int
    logprobs: torch.Tensor  # [B, R] policy at sampling time
    ref_logprobs: torch.Tensor  # [B, R]
    values: torch.Tensor  # [B, R]
    scores: torch.Tensor  # [B] the sequence-level reward the update maximises
    reward_model_scores: torch.Tensor | None  # [B] raw reward-model scores, for logging
    ended_with_eos: torch.Tensor  # [B] bool
    texts: list[str] = field(default_factory=list)
    trunk: torch.Tensor | None = None  # [B, P + R, H] the shared bottom layers' output (`ActorCritic.trunk`)

    def rows(self, index: torch.Tensor) -> dict[str, Any]:
        """The model inputs of some rows, for a minibatch forward pass."""
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "position_ids": self.position_ids[index], "prompt_width": self.prompt_width,
                "trunk": self.trunk[index] if self.trunk is not None else None}


def layout(samples: list[Sample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """input_ids, attention_mask, position_ids [B, P+R], response_mask [B, R] and P, from generated samples."""
    width_p = max(len(s.prompt_ids) for s in samples)
    width_r = max(max(len(s.reply_ids) for s in samples), 1)
    input_ids = torch.full((len(samples), width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    response_mask = torch.zeros((len(samples), width_r), dtype=torch.bool)
    for row, sample in enumerate(samples):
        p, r = len(sample.prompt_ids), len(sample.reply_ids)
        input_ids[row, width_p - p:width_p] = torch.tensor(sample.prompt_ids)
        input_ids[row, width_p:width_p + r] = torch.tensor(sample.reply_ids, dtype=torch.long)
        attention[row, width_p - p:width_p + r] = 1
        response_mask[row, :r] = True
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention, position_ids, response_mask, width_p


def sequence_scores(roles: Roles, prompts: list[list[Message]], samples: list[Sample], settings: PpoSection,
                    reward_fn: Any, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The scalar reward of each reply (`rewards.combine`, as GRPO and RLOO use), the raw reward-model
    scores and which replies ended at a stop token (any of the model's, see `generation.stop_token_ids`)."""
    texts = [s.text for s in samples]
    ended = [s.ended for s in samples]
    raw = roles.reward_scores(prompts, texts, batch_size) if roles.reward_scorer is not None else None
    judged = reward_fn(prompts, texts) if reward_fn is not None else None
    total = combine(raw, roles.normalisation, judged, settings.reward_function_weight, ended,
                    settings.missing_eos_penalty)
    return (torch.tensor(total), torch.tensor(raw) if raw is not None else None, torch.tensor(ended))


@torch.no_grad()
def collect(roles: Roles, tokenizer: Any, prompts: list[list[Message]], settings: PpoSection, *, chat_template: str,
            reward_fn: Any, seed: int, forward_batch_size: int) -> Rollout:
    """Sample one reply per prompt from the policy and measure log-probs, reference log-probs, values, rewards."""
    policy = roles.actor_critic
    policy.use("policy")  # the forward passes leave the value adapter active
    samples = generate_samples(policy.policy, tokenizer, prompts, chat_template=chat_template,
                               max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                               top_p=settings.top_p, seed=seed, batch_size=len(prompts))
    device = policy.value_head.weight.device
    input_ids, attention, positions, response_mask, width_p = (t.to(device) if torch.is_tensor(t) else t
                                                               for t in layout(samples, tokenizer.pad_token_id))
    logprobs, ref_logprobs, values, trunks = [], [], [], []
    for start in range(0, len(samples), forward_batch_size):
        rows = slice(start, start + forward_batch_size)
        trunk = policy.trunk(input_ids[rows], attention[rows], positions[rows])  # None: nothing shared
        inputs = (input_ids[rows], attention[rows], positions[rows], width_p, settings.temperature)
        logp, _, value = policy(*inputs, trunk=trunk)
        logprobs.append(logp)
        values.append(value)
        ref_logprobs.append(roles.reference_logprobs(*inputs, trunk=trunk))
        trunks.append(trunk)
    scores, raw, ended = sequence_scores(roles, prompts, samples, settings, reward_fn, forward_batch_size)
    return Rollout(input_ids, attention, positions, response_mask, width_p, torch.cat(logprobs),
                   torch.cat(ref_logprobs), torch.cat(values).float(), scores.to(device),
                   raw.to(device) if raw is not None else None, ended.to(device), [s.text for s in samples],
                   trunk=torch.cat(trunks) if all(t is not None for t in trunks) else None)
