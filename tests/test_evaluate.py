"""The pure pieces of `align eval`, each against a hand-worked example."""

from __future__ import annotations

import math

import pytest
import torch

from align.evaluate import distinct_n, mean_stderr, reply_logprobs, win_rate
from align.generation import Sample


def test_mean_stderr() -> None:
    mean, stderr = mean_stderr([1.0, 2.0, 3.0, 4.0])
    # sample variance of 1..4 is 5/3; stderr = sqrt(5/3 / 4)
    assert mean == 2.5 and stderr == pytest.approx(math.sqrt(5 / 12))
    assert mean_stderr([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError):
        mean_stderr([])


def test_distinct_2_sees_collapse() -> None:
    assert distinct_n(["a b c", "a b d"]) == pytest.approx(3 / 4)  # bigrams ab, bc, ab, bd
    assert distinct_n(["friend friend friend friend"]) == pytest.approx(1 / 3)
    assert distinct_n(["one", ""]) == 0.0


def test_win_rate_counts_ties_half() -> None:
    assert win_rate([1.0, 0.0, 0.5], [0.0, 1.0, 0.5]) == pytest.approx(0.5)
    assert win_rate([2.0, 2.0], [1.0, 1.0]) == 1.0
    with pytest.raises(ValueError):
        win_rate([1.0], [])


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token distribution depends only on the current token: p(next | t) from a table.
    Its decoder's hidden state is the one-hot current token and its head maps it to log p, as a causal LM's
    decoder and output embeddings do (eval projects only the reply positions through the head)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        vocab = table.shape[0]
        self.body = OneHot(vocab)
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(table.log().T)

    def get_decoder(self) -> torch.nn.Module:
        return self.body

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


class OneHot(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        hidden = torch.nn.functional.one_hot(input_ids, self.vocab).float()  # [B, T, V]
        return type("Out", (), {"last_hidden_state": hidden})()


def test_reply_logprobs_reads_the_reply_tokens_only() -> None:
    table = torch.tensor([[0.25, 0.25, 0.5], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1]])  # rows: current token
    model = FixedLogits(table)
    samples = [Sample("x", prompt_ids=[0, 1], reply_ids=[2, 0]), Sample("y", prompt_ids=[2], reply_ids=[1])]
    got = reply_logprobs(model, samples, pad_id=0, batch_size=8)
    # sample 1: p(2 | 1) = 0.3, p(0 | 2) = 0.7; sample 2 (padded in the batch): p(1 | 2) = 0.2
    assert got[0] == pytest.approx([math.log(0.3), math.log(0.7)])
    assert got[1] == pytest.approx([math.log(0.2)])


def test_token_logprobs_in_chunks_equal_the_full_softmax_with_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from align import models
    from align.ppo.losses import entropy_from_logits

    torch.manual_seed(0)
    model = FixedLogits(torch.softmax(torch.randn(11, 11), dim=-1))
    hidden = torch.randn(3, 5, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    monkeypatch.setattr(models, "LOGITS_CHUNK_ELEMENTS", 11 * 4)  # 4 positions per chunk: 15 = 4 + 4 + 4 + 3

    def loss_and_grads(logp: torch.Tensor, entropy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = (logp * torch.arange(5.0)).sum() + 0.5 * entropy.sum()
        return (loss, *torch.autograd.grad(loss, [hidden, model.head.weight]))

    logp, entropy = models.token_logprobs(model, hidden, tokens, temperature=0.7, entropy=True)
    logits = model.head(hidden) / 0.7
    expected_logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(logp, expected_logp)
    torch.testing.assert_close(entropy, entropy_from_logits(logits))
    for got, expected in zip(loss_and_grads(logp, entropy), loss_and_grads(expected_logp, entropy_from_logits(logits)),
                             strict=True):
        torch.testing.assert_close(got, expected)
    assert models.token_logprobs(model, hidden, tokens)[1] is None
