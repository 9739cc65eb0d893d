"""The pure pieces of `align eval`, each against a hand-worked example."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from align.eval_result import EvalResult
from align.evaluate import (
    clustered_mean_stderr,
    distinct_n,
    kl_fields,
    kl_note,
    mean_stderr,
    paired_delta,
    reply_logprobs,
    win_rate,
    win_rate_stderr,
)
from align.generation import Sample


def test_mean_stderr() -> None:
    mean, stderr = mean_stderr([1.0, 2.0, 3.0, 4.0])
    # sample variance of 1..4 is 5/3; stderr = sqrt(5/3 / 4)
    assert mean == 2.5 and stderr == pytest.approx(math.sqrt(5 / 12))
    assert mean_stderr([7.0]) == (7.0, 0.0)
    with pytest.raises(ValueError):
        mean_stderr([])


def test_clustered_mean_stderr_is_the_stderr_of_per_prompt_means() -> None:
    # prompt-major: prompt 1 -> (1, 3), prompt 2 -> (2, 6), prompt 3 -> (4, 4); per-prompt means 2, 4, 4
    mean, stderr = clustered_mean_stderr([1.0, 3.0, 2.0, 6.0, 4.0, 4.0], group_size=2)
    # mean 10/3; sample variance of (2, 4, 4) = (16/9 + 4/9 + 4/9) / 2 = 4/3; stderr = sqrt(4/3 / 3) = 2/3
    assert mean == pytest.approx(10 / 3) and stderr == pytest.approx(2 / 3)
    # one sample per prompt is the plain standard error
    assert clustered_mean_stderr([1.0, 2.0, 3.0, 4.0], group_size=1) == pytest.approx(mean_stderr([1.0, 2.0, 3.0, 4.0]))
    assert clustered_mean_stderr([5.0, 7.0], group_size=2) == (6.0, 0.0)  # one prompt: no spread to measure
    for values, size in (([], 2), ([1.0, 2.0, 3.0], 2), ([1.0], 0)):
        with pytest.raises(ValueError):
            clustered_mean_stderr(values, size)


def test_clustered_stderr_is_larger_when_samples_of_a_prompt_agree() -> None:
    # 4 prompts x 4 samples, each prompt's samples identical: 16 values but only 4 independent ones
    values = [0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4
    naive = mean_stderr(values)[1]  # sqrt((16 * 0.25 / 15) / 16) = sqrt(1/60)
    clustered = clustered_mean_stderr(values, group_size=4)[1]  # sqrt((4 * 0.25 / 3) / 4) = sqrt(1/12)
    assert naive == pytest.approx(math.sqrt(1 / 60)) and clustered == pytest.approx(math.sqrt(1 / 12))
    assert clustered > 2 * naive  # sqrt(5) times: the naive one claimed 4x the evidence there was


def test_paired_delta_cancels_prompt_difficulty() -> None:
    # 2 prompts x 2 samples; prompt 2 scores 10 higher for both models, the policy is ahead by 1, 1 | 2, 0
    policy, parent = [1.0, 1.0, 12.0, 10.0], [0.0, 0.0, 10.0, 10.0]
    delta, stderr = paired_delta(policy, parent, group_size=2)
    # per-prompt mean differences 1 and 1: no spread, so stderr 0; the sides' own stderrs are ~5 each
    assert delta == pytest.approx(1.0) and stderr == pytest.approx(0.0)
    assert clustered_mean_stderr(policy, 2)[1] > 4
    with pytest.raises(ValueError):
        paired_delta([1.0], [1.0, 2.0], group_size=1)


def test_distinct_2_sees_collapse() -> None:
    assert distinct_n(["a b c", "a b d"]) == pytest.approx(3 / 4)  # bigrams ab, bc, ab, bd
    assert distinct_n(["friend friend friend friend"]) == pytest.approx(1 / 3)
    assert distinct_n(["one", ""]) == 0.0


def test_win_rate_counts_ties_half() -> None:
    assert win_rate([1.0, 0.0, 0.5], [0.0, 1.0, 0.5]) == pytest.approx(0.5)
    assert win_rate([2.0, 2.0], [1.0, 1.0]) == 1.0
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_win_rate_stderr_over_per_prompt_win_shares() -> None:
    # 2 prompts x 2 samples: wins 1, 1 | tie, loss -> per-prompt shares 1 and 0.25
    policy, baseline = [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]
    assert win_rate(policy, baseline) == pytest.approx(0.625)
    # stderr of (1, 0.25): sample sd = 0.75 / sqrt(2), over sqrt(2) prompts = 0.375
    assert win_rate_stderr(policy, baseline, group_size=2) == pytest.approx(0.375)
    assert win_rate_stderr(policy, baseline, group_size=1) == pytest.approx(mean_stderr([1.0, 1.0, 0.5, 0.0])[1])


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
    from align.models import entropy_from_logits

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
        # Chunks sum the weight and hidden gradients in another order: fp32 rounding (~4e-6 relative seen on
        # gradients of magnitude ~7) is above assert_close's default 1.3e-6, and is not a difference in the math.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert models.token_logprobs(model, hidden, tokens)[1] is None


def test_kl_note_says_when_the_full_softmax_kl_is_not_what_was_sampled() -> None:
    assert kl_note(temperature=1.0, top_p=1.0) is None and kl_note(temperature=0.7, top_p=1.0) is None
    assert "greedy" in kl_note(temperature=0.0, top_p=1.0)
    assert "top_p" in kl_note(temperature=1.0, top_p=0.9)
    nulls = kl_fields(None, None, group_size=2, note="greedy")
    assert nulls == {"kl": None, "kl_stderr": None, "kl_per_token": None, "kl_note": "greedy"}


def _logp_at(probs: list[float], token: int, temperature: float) -> float:
    """log softmax(log p / T)[token] by hand: p^(1/T) renormalised."""
    powered = [p ** (1 / temperature) for p in probs]
    return math.log(powered[token] / sum(powered))


def test_eval_kl_is_at_the_sampling_temperature() -> None:
    """The policy sampled from softmax(logits / T): the KL to the parent must compare both models at T, and the
    per-sequence KL must be the sum of those per-token log-ratios. At T = 1 (what eval used whatever T was)
    the numbers differ."""
    t = 0.3
    policy_table = [[0.25, 0.25, 0.5], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]  # rows: current token
    parent_table = [[0.4, 0.4, 0.2], [0.3, 0.3, 0.4], [0.2, 0.5, 0.3]]
    policy, parent = FixedLogits(torch.tensor(policy_table)), FixedLogits(torch.tensor(parent_table))
    # 2 prompts x 2 samples, prompt-major
    samples = [Sample("a", [0, 1], [2, 0]), Sample("b", [0, 1], [1]),
               Sample("c", [2], [1, 1, 2]), Sample("d", [2], [0])]
    policy_logp = reply_logprobs(policy, samples, pad_id=0, batch_size=3, temperature=t)
    parent_logp = reply_logprobs(parent, samples, pad_id=0, batch_size=3, temperature=t)

    def by_hand(table: list[list[float]], sample: Sample) -> list[float]:
        seq = sample.prompt_ids + sample.reply_ids
        start = len(sample.prompt_ids)
        return [_logp_at(table[seq[i - 1]], seq[i], t) for i in range(start, len(seq))]

    for sample, got_policy, got_parent in zip(samples, policy_logp, parent_logp, strict=True):
        # the model computes in fp32, the hand computation in fp64
        assert got_policy == pytest.approx(by_hand(policy_table, sample), abs=1e-6)
        assert got_parent == pytest.approx(by_hand(parent_table, sample), abs=1e-6)
    ratios = [[a - b for a, b in zip(by_hand(policy_table, s), by_hand(parent_table, s), strict=True)]
              for s in samples]
    per_sequence = [sum(r) for r in ratios]
    fields = kl_fields(policy_logp, parent_logp, group_size=2, note=None)
    assert fields["kl"] == pytest.approx(sum(per_sequence) / 4, abs=1e-5)
    assert fields["kl_stderr"] == pytest.approx(clustered_mean_stderr(per_sequence, 2)[1], abs=1e-5)
    assert fields["kl_per_token"] == pytest.approx(sum(per_sequence) / 7, abs=1e-5)  # 7 reply tokens
    assert fields["kl_note"] is None
    # the temperature matters: at T = 1 the same replies give another KL
    at_one = kl_fields(reply_logprobs(policy, samples, pad_id=0), reply_logprobs(parent, samples, pad_id=0),
                       group_size=2, note=None)
    assert abs(at_one["kl"] - fields["kl"]) > 0.1


def test_eval_kl_on_a_real_model_uses_the_sampling_temperature_for_both_models(stories_dir: Path) -> None:
    """stories260K with a random (non-identity) LoRA adapter as the policy, adapters off as the parent, replies
    sampled at T = 0.7: eval's KL must be the mean over replies of sum_t [log_softmax(policy logits / T) -
    log_softmax(parent logits / T)] at the sampled tokens, from a plain full forward pass; the reference NLL's
    log-probs stay at T = 1; greedy decoding records no KL."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from align.evaluate import EvalSettings, reference_logprobs_and_kl
    from align.generation import generate_samples

    t = 0.7
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"],
                                            init_lora_weights=False)).eval()
    prompts = [[{"role": "user", "content": text}] for text in ("Once upon a time", "Tom had a red ball")
               for _ in range(2)]  # prompt-major, 2 samples each
    policy = generate_samples(model, tokenizer, prompts, chat_template="none", max_new_tokens=6, temperature=t,
                              seed=1, batch_size=4)
    with model.disable_adapter():
        parent = generate_samples(model, tokenizer, prompts, chat_template="none", max_new_tokens=6,
                                  temperature=t, seed=1, batch_size=4)
    settings = EvalSettings(card="unused", num_samples=2, temperature=t, batch_size=3)
    ref_on_policy, ref_on_parent, kl = reference_logprobs_and_kl(model, policy, parent, tokenizer.pad_token_id,
                                                                 settings)

    def by_hand(sample: Sample, temperature: float) -> torch.Tensor:
        """log_softmax(logits / T) of the reply tokens, one unpadded sequence through the whole model."""
        ids = torch.tensor([sample.prompt_ids + sample.reply_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(sample.prompt_ids) - 1: -1]  # [R, V]
        return torch.log_softmax(logits / temperature, dim=-1).gather(-1, ids[0, len(sample.prompt_ids):, None])[:, 0]

    per_sequence, tokens = [], 0
    for index, sample in enumerate(policy):
        policy_t = by_hand(sample, t)
        with model.disable_adapter():
            parent_t, parent_1 = by_hand(sample, t), by_hand(sample, 1.0)
            parent_1_on_parent = by_hand(parent[index], 1.0)
        assert ref_on_policy[index] == pytest.approx(parent_1.tolist(), abs=1e-4)  # the NLL guard: T = 1
        assert ref_on_parent[index] == pytest.approx(parent_1_on_parent.tolist(), abs=1e-4)
        per_sequence.append(float((policy_t - parent_t).sum()))
        tokens += len(sample.reply_ids)
    assert sum(per_sequence) > 1.0  # the random adapter moves the distribution: a KL worth testing
    assert kl["kl"] == pytest.approx(sum(per_sequence) / len(policy), abs=1e-4)
    assert kl["kl_stderr"] == pytest.approx(clustered_mean_stderr(per_sequence, 2)[1], abs=1e-4)
    assert kl["kl_per_token"] == pytest.approx(sum(per_sequence) / tokens, abs=1e-4)
    assert kl["kl_note"] is None
    # what eval recorded before (both models at T = 1 whatever T sampled) is another number here (~29 vs ~42)
    at_one = EvalSettings(card="unused", num_samples=2, temperature=1.0, batch_size=3)
    assert abs(reference_logprobs_and_kl(model, policy, parent, tokenizer.pad_token_id, at_one)[2]["kl"]
               - kl["kl"]) > 1e-2

    greedy = EvalSettings(card="unused", num_samples=2, temperature=0.0, batch_size=3)
    assert reference_logprobs_and_kl(model, policy, parent, tokenizer.pad_token_id, greedy)[2]["kl"] is None


def _eval_result(**changes: object) -> EvalResult:
    """An eval.json as `evaluate_artifact` writes it (greedy by default: no KL), for the display code."""
    side = {"judge": 0.1, "judge_stderr": 0.02, "length_tokens": 9.0, "distinct_2": 0.8, "ref_nll_per_token": 2.0,
            "truncated_share": 0.0, "reward": None, "reward_stderr": None}
    result = {"schema_version": EvalResult.SCHEMA_VERSION, "artifact": "p@v1", "parent": "sft@v1", "prompts": 3,
              "samples": 6, "examples": [],
              "settings": {"card": "c.yaml", "num_samples": 2, "seed": 0, "judge": "vader", "temperature": 0.0,
                           "top_p": 1.0},
              "policy": {**side, "judge": 0.3}, "parent_model": side, "judge_delta": 0.2, "judge_delta_stderr": 0.05,
              "reward_delta": None, "reward_delta_stderr": None,
              "win_rate": 0.625, "win_rate_stderr": 0.125, "win_rate_by": "vader", "ref_nll_rise": 0.1,
              **kl_fields(None, None, 2, kl_note(0.0, 1.0))}
    return EvalResult.model_validate({**result, **changes})


def test_eval_and_report_tables_show_an_unmeasured_kl_as_a_dash() -> None:
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from align.console import eval_table
    from align.report.extract import frontier_series
    from align.report.html import render_comparison
    from align.report.plots import plot_frontier

    def text(result: EvalResult) -> str:
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(eval_table(result))
        return console.export_text()

    greedy = text(_eval_result())
    assert "KL to parent (nats/seq)" in greedy and "greedy" in greedy and "0.625 ± 0.125" in greedy
    kl_rows = [line for line in greedy.splitlines() if "KL to parent" in line]
    assert kl_rows and all("–" in line for line in kl_rows)
    sampled = text(_eval_result(kl=1.5, kl_stderr=0.25, kl_per_token=0.1, kl_note=None))
    assert "1.500 ± 0.250" in sampled and "0.1000" in sampled

    evals = [(SimpleNamespace(ref="p@v1"), _eval_result())]  # the report reads only .ref of an artifact
    html = render_comparison(evals)
    assert "0.625 ± 0.125" in html and "<td>–</td>" in html
    assert plot_frontier(frontier_series(evals))[:4] == b"\x89PNG"  # no KL: the point is left out, nothing fails


def test_eval_precision_is_the_stages_rule_with_the_models_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--precision` resolves by `device.resolve_precision`, given the base model's hidden size (what decides
    whether bf16 pays on a CPU), and what the device cannot do is a RecipeError naming the option."""
    from types import SimpleNamespace

    from align import models
    from align.device import resolve_precision
    from align.errors import RecipeError
    from align.eval_result import EvalSettings
    from align.evaluate import eval_precision
    from align.manifest import BaseIdentity

    base = BaseIdentity(spec="m", kind="local", location="/m", revision=None, trust_remote_code=False, files=[])
    artifact = SimpleNamespace(manifest=SimpleNamespace(base_model=base))
    devices = [{"type": "cpu", "name": "cpu (avx512_bf16)", "bf16": True},
               {"type": "cpu", "name": "cpu", "bf16": False},
               {"type": "cuda", "name": "gpu", "bf16": True}, {"type": "cuda", "name": "old", "bf16": False}]
    for hidden in (64, 576, None):
        monkeypatch.setattr(models, "hidden_size", lambda _base, size=hidden: size)
        for device in devices:
            for requested in ("auto", "fp32", "bf16", "fp16"):
                settings = EvalSettings(card="c", precision=requested)
                try:
                    expected = resolve_precision(requested, device, "align eval --precision", hidden)
                except RecipeError:
                    with pytest.raises(RecipeError, match=r"^align eval --precision: "):
                        eval_precision(settings, artifact, device)
                    continue
                assert eval_precision(settings, artifact, device) == expected, (hidden, device, requested)


def test_version_1_eval_result_reads_as_uncached_with_precision_auto() -> None:
    raw = _eval_result().model_dump(mode="json", exclude={"parent_samples_cached", "parent_samples_key"})
    raw["settings"].pop("precision")
    raw["schema_version"] = 1
    result = EvalResult.parse(raw, "eval.json")
    assert result.settings.precision == "auto" and result.parent_samples_cached is False
    assert result.parent_samples_key is None and result.schema_version == EvalResult.SCHEMA_VERSION
