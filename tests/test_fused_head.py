"""align.fused_head: TRL's fused LM head projects only labelled positions on CPUs, with the same log-probabilities."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.kernels import chunked_logprob
from trl.trainer import utils as trl_utils

from align.fused_head import compact_on_cpu


def test_only_labelled_rows_reach_the_kernel_and_the_log_probs_do_not_change(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    input_ids = torch.randint(0, 300, (3, 12))
    labels = input_ids.clone()
    labels[:, :7] = -100  # a prompt of 7 tokens
    labels[2, 10:] = -100  # and padding
    rows: list[int] = []
    kernel = trl_utils._ChunkedLogProbFunction

    class Counting:
        @staticmethod
        def apply(hidden: torch.Tensor, *args: object) -> object:
            rows.append(hidden.shape[0])
            return kernel.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Counting)
    # TRL's own switch (the kernel module's), whatever an earlier test in this process left patched
    monkeypatch.setattr(trl_utils, "_use_triton", chunked_logprob._use_triton)

    def scored() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        output = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        output.loss.backward()
        return output.log_probs.detach(), model.model.layers[0].mlp.up_proj.weight.grad.clone()

    log_probs_full, grad_full = scored()
    assert compact_on_cpu() and compact_on_cpu()  # found, and idempotent
    log_probs_compact, grad_compact = scored()
    assert rows == [3 * 11, 5 + 5 + 3]  # every shifted position, then only the labelled ones
    torch.testing.assert_close(log_probs_compact, log_probs_full)
    torch.testing.assert_close(grad_compact, grad_full)
    assert (log_probs_compact[:, :6] == 0).all()  # unlabelled positions stay zero
