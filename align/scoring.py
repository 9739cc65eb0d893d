"""Scoring text with a reward model, and the pairwise metrics of a reward model on preference pairs.

The stage's own evaluation and `align score` both go through `score_replies`, so a reloaded reward
artifact reproduces the scores recorded at training time.
"""

from __future__ import annotations

import math
from typing import Any

from align.generation import Message


def reward_input_ids(tokenizer: Any, prompt: list[Message], reply: list[Message], chat_template: str) -> list[int]:
    """Token ids of prompt + reply as TRL's RewardTrainer builds them (chat template, or text + EOS)."""
    if chat_template == "none":
        text = "".join(m["content"] for m in prompt + reply)
        return tokenizer(text + tokenizer.eos_token)["input_ids"]
    return tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=False)


def over_length(tokenizer: Any, rows: list[dict[str, Any]], chat_template: str, max_length: int) -> list[bool]:
    """Per preference row: is prompt + chosen or prompt + rejected longer than `max_length` tokens, as TRL's
    Reward and DPO trainers tokenise them (template, or text + EOS)? RewardTrainer drops such rows; DPOTrainer
    cuts them (its default keeps the start, so the completion loses its end, EOS included)."""
    return [any(len(reward_input_ids(tokenizer, row["prompt"], row[side], chat_template)) > max_length
                for side in ("chosen", "rejected")) for row in rows]


def reward_batch(tokenizer: Any, items: list[tuple[list[Message], list[Message]]], chat_template: str,
                 max_length: int | None = None) -> tuple[Any, Any]:
    """input_ids and attention_mask [B, T] of (prompt, reply) items, right-padded, so each row's last real
    token is where its score is read. Longer than `max_length`, a sequence loses its beginning: the reply,
    which the score is about, stays."""
    import torch

    ids = [reward_input_ids(tokenizer, p, r, chat_template)[-max_length if max_length else 0:] for p, r in items]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)  # [B, T]
    attention = torch.zeros((len(ids), width), dtype=torch.long)  # [B, T]
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention[row, : len(seq)] = 1
    return input_ids, attention


def score_replies(model: Any, tokenizer: Any, items: list[tuple[list[Message], list[Message]]], *,
                  chat_template: str, batch_size: int = 16, max_length: int | None = None) -> list[float]:
    """The scalar reward of each (prompt, reply), batched as `reward_batch` lays them out."""
    import torch

    device = next(model.parameters()).device
    scores: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            input_ids, attention = reward_batch(tokenizer, items[start:start + batch_size], chat_template, max_length)
            with torch.no_grad():
                logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits  # [B, 1]
            scores.extend(logits[:, 0].float().tolist())
    finally:
        model.train(was_training)
    return scores


def pairwise_metrics(chosen: list[float], rejected: list[float]) -> dict[str, float]:
    """Accuracy (chosen scored higher), mean margin, and the mean/std of all scores (for later normalisation)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError("need equally many chosen and rejected scores, at least one")
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    every = chosen + rejected
    mean = sum(every) / len(every)
    return {
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "margin_mean": sum(margins) / len(margins),
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((s - mean) ** 2 for s in every) / len(every)),
        "pairs": len(margins),
    }
