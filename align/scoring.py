"""Scoring text with a reward model, and the pairwise metrics of a reward model on preference pairs.

The reward stage's own evaluation and every reader of a reward artifact (`align.rewards`) lay text out with
`reward_batch` and score it through `score_batches`, so a reloaded reward artifact reproduces the scores
recorded at training time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from align.data import Message

Item = tuple[list[Message], list[Message]]  # (prompt, reply): the messages before the reply, and the reply


def reward_input_ids(tokenizer: Any, prompt: list[Message], reply: list[Message], chat_template: str) -> list[int]:
    """Token ids of prompt + reply as TRL's RewardTrainer builds them (chat template, or text + EOS)."""
    if chat_template == "none":
        text = "".join(m["content"] for m in prompt + reply)
        return tokenizer(text + tokenizer.eos_token)["input_ids"]
    return tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=False)


def reward_batch(tokenizer: Any, items: list[Item], chat_template: str,
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


def score_batches(forward: Callable[[Any, Any], Any], encode: Callable[[list[Item]], tuple[Any, Any]],
                  items: list[Item], *, device: Any, batch_size: int = 16) -> list[float]:
    """The scalar reward of each (prompt, reply): `encode` lays out a batch (input_ids, attention_mask [B, T],
    as `reward_batch` does) and `forward` reads its scores [B], without gradients."""
    import torch

    scores: list[float] = []
    for start in range(0, len(items), batch_size):
        input_ids, attention = encode(items[start:start + batch_size])
        with torch.no_grad():
            scores.extend(forward(input_ids.to(device), attention.to(device)).float().tolist())
    return scores


def classifier_scores(model: Any) -> Callable[[Any, Any], Any]:
    """The scores [B] of a transformers sequence classifier with one label (a reward model), per batch."""
    return lambda input_ids, attention: model(input_ids=input_ids, attention_mask=attention).logits[:, 0]  # [B]


def score_replies(model: Any, tokenizer: Any, items: list[Item], *, chat_template: str, batch_size: int = 16,
                  max_length: int | None = None) -> list[float]:
    """The scalar reward of each (prompt, reply) under a sequence classifier, batched as `reward_batch` lays
    them out (the reward stage scores its own model in training through this, in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        return score_batches(classifier_scores(model),
                             lambda batch: reward_batch(tokenizer, batch, chat_template, max_length), items,
                             device=next(model.parameters()).device, batch_size=batch_size)
    finally:
        model.train(was_training)


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


