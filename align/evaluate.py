"""`align eval`: how a policy artifact differs from its parent on held-out prompts, with fluency guards.

Both models are one object: the parent (base + adapter chain, merged) with the artifact's adapter attached;
`disable_adapter()` gives the parent, which is also the KL/NLL reference (DPO's and PPO's reference). Every
score is a mean over prompts x samples with its standard error, from a fixed sampling seed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align import generation, judges, models, scoring
from align.errors import ArtifactError

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.generation import Sample


@dataclass(frozen=True)
class EvalSettings:
    card: str
    split: str = "eval"
    limit: int | None = 64
    num_samples: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    judge: str = "vader"
    reward: str | None = None


# ---- pure metrics --------------------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n)); stderr 0 for n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("mean of no values")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Share of unique word n-grams among all n-grams of all texts: low values mean repetitive, collapsed text."""
    grams = [tuple(words[i:i + n]) for text in texts for words in [text.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(policy: Sequence[float], baseline: Sequence[float]) -> float:
    """Share of paired samples where the policy scores higher; ties count half."""
    if len(policy) != len(baseline) or not policy:
        raise ValueError("win rate needs equally many, and some, paired scores")
    return sum(1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy, baseline, strict=True)) / len(policy)


def reply_logprobs(model: Any, samples: Sequence[Sample], pad_id: int, batch_size: int = 16) -> list[list[float]]:
    """log p(token) of every reply token given its prompt and the reply so far, one list per sample.

    The vocabulary projection runs only at the positions that predict reply tokens: with a 49k vocabulary,
    projecting every prompt position too made this the slowest part of an evaluation."""
    import torch

    device = next(model.parameters()).device
    out: list[list[float]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        sequences = [s.prompt_ids + s.reply_ids for s in chunk]
        width = max(map(len, sequences))
        reply_width = max(max(len(s.reply_ids) for s in chunk), 1)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [B, T]
        attention = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
        # Position predicting reply token j: the one before it; unused slots point at position 0.
        positions = torch.zeros((len(chunk), reply_width), dtype=torch.long)  # [B, R]
        targets = torch.zeros((len(chunk), reply_width), dtype=torch.long)  # [B, R]
        for row, (seq, sample) in enumerate(zip(sequences, chunk, strict=True)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            first = len(sample.prompt_ids) - 1
            positions[row, : len(sample.reply_ids)] = torch.arange(first, first + len(sample.reply_ids))
            targets[row, : len(sample.reply_ids)] = torch.tensor(sample.reply_ids, dtype=torch.long)
        with torch.no_grad():
            hidden = models.decoder(model)(input_ids=input_ids.to(device),
                                           attention_mask=attention.to(device)).last_hidden_state  # [B, T, H]
            picked = hidden.gather(1, positions.to(device).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            token_logp = models.token_logprobs(model, picked, targets.to(device))[0]  # [B, R]
        for row, sample in enumerate(chunk):
            out.append(token_logp[row, : len(sample.reply_ids)].tolist())
    return out


# ---- the evaluation -------------------------------------------------------------------------------------------


def _side(samples: list[Sample], logp_ref: list[list[float]], judge_scores: list[float],
          reward_scores: list[float] | None) -> dict[str, Any]:
    """Summary of one model's samples; NLL is the reference model's, per token."""
    judge_mean, judge_se = mean_stderr(judge_scores)
    tokens = [len(s.reply_ids) for s in samples]
    summary = {
        "judge": judge_mean, "judge_stderr": judge_se,
        "length_tokens": sum(tokens) / len(tokens),
        "distinct_2": distinct_n([s.text for s in samples]),
        "ref_nll_per_token": -sum(map(sum, logp_ref)) / max(sum(tokens), 1),
    }
    if reward_scores is not None:
        summary["reward"], summary["reward_stderr"] = mean_stderr(reward_scores)
    return summary


def evaluate_artifact(artifact: Artifact, registry: Registry, settings: EvalSettings,
                      card_path: Path) -> dict[str, Any]:
    """Sample from the artifact and its parent on the card's held-out prompts and compare them."""
    from align.data import load_card, load_data

    if artifact.manifest.get("stage") not in ("sft", "dpo", "ppo", "grpo", "rloo"):
        raise ArtifactError(f"{artifact.ref} is a {artifact.manifest.get('stage')} artifact; `align eval` "
                            "compares a policy (sft, dpo, ppo) with its parent")
    rows = getattr(load_data(load_card(card_path)), settings.split)[: settings.limit]
    judge, _ = judges.load_judge(settings.judge, registry)
    reward_artifact = registry.resolve(settings.reward) if settings.reward else None
    model, tokenizer = models.load_artifact_model(artifact, registry)
    chat_template = artifact.manifest["adapter"].get("chat_template", "auto")
    prompts = [row["prompt"] for row in rows for _ in range(settings.num_samples)]
    sampling = {"chat_template": chat_template, "max_new_tokens": settings.max_new_tokens,
                "temperature": settings.temperature, "top_p": settings.top_p, "seed": settings.seed,
                "batch_size": settings.batch_size}

    policy = generation.generate_samples(model, tokenizer, prompts, progress="sampling the artifact", **sampling)
    with model.disable_adapter():
        parent = generation.generate_samples(model, tokenizer, prompts, progress="sampling its parent", **sampling)
        ref_on_policy = reply_logprobs(model, policy, tokenizer.pad_token_id, settings.batch_size)
        ref_on_parent = reply_logprobs(model, parent, tokenizer.pad_token_id, settings.batch_size)
    policy_logp = reply_logprobs(model, policy, tokenizer.pad_token_id, settings.batch_size)

    judge_policy = judge(prompts, [s.text for s in policy])
    judge_parent = judge(prompts, [s.text for s in parent])
    reward_policy = reward_parent = None
    if reward_artifact is not None:
        del model  # one model at a time keeps peak memory at one copy of the weights
        scorer, score_tokenizer = models.load_reward_model(reward_artifact, registry)
        template = reward_artifact.manifest["adapter"].get("chat_template", "auto")
        max_length = reward_artifact.manifest["recipe"]["train"]["max_length"]

        def reward_of(samples: list[Sample]) -> list[float]:
            items = [(p, [{"role": "assistant", "content": s.text}]) for p, s in zip(prompts, samples, strict=True)]
            return scoring.score_replies(scorer, score_tokenizer, items, chat_template=template,
                                         max_length=max_length)

        reward_policy, reward_parent = reward_of(policy), reward_of(parent)

    # KL(policy || parent) per sequence, estimated on the policy's own samples (k1: sum of log-ratios).
    kl = [sum(a) - sum(b) for a, b in zip(policy_logp, ref_on_policy, strict=True)]
    kl_mean, kl_se = mean_stderr(kl)
    policy_side = _side(policy, ref_on_policy, judge_policy, reward_policy)
    parent_side = _side(parent, ref_on_parent, judge_parent, reward_parent)
    wins_on = reward_policy is not None
    result = {
        "artifact": artifact.ref,
        "parent": (artifact.manifest.get("adapter_chain") or [{"ref": artifact.manifest["base_model"]["spec"]}])[-1]
        ["ref"],
        "settings": asdict(settings),
        "prompts": len(rows),
        "samples": len(prompts),
        "policy": policy_side,
        "parent_model": parent_side,
        "judge_delta": policy_side["judge"] - parent_side["judge"],
        "judge_delta_stderr": mean_stderr([a - b for a, b in zip(judge_policy, judge_parent, strict=True)])[1],
        "kl": kl_mean,
        "kl_stderr": kl_se,
        # Per reply token, the unit TRL's GRPO/RLOO logs use; a collapsed policy shows several nats here.
        "kl_per_token": sum(kl) / max(sum(len(s.reply_ids) for s in policy), 1),
        "ref_nll_rise": policy_side["ref_nll_per_token"] - parent_side["ref_nll_per_token"],
        "win_rate": win_rate(reward_policy if wins_on else judge_policy, reward_parent if wins_on else judge_parent),
        "win_rate_by": f"reward:{reward_artifact.ref}" if wins_on else settings.judge,
        "examples": [
            {"prompt": p[-1]["content"], "parent": b.text, "artifact": a.text, "judge_parent": jb, "judge_artifact": ja}
            for p, a, b, ja, jb in list(zip(prompts, policy, parent, judge_policy, judge_parent,
                                            strict=True))[:: settings.num_samples][:8]
        ],
    }
    target = artifact.path / "eval.json"
    scratch = target.with_suffix(".json.tmp")
    from align.training import write_json

    write_json(scratch, result)
    os.replace(scratch, target)
    return result
