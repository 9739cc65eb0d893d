"""TRL's fused LM head on CPUs: score only the positions that have a label.

TRL's trainers (sft, dpo, kto, grpo, rloo) turn the model's output layer into a fused head that returns per-token
log-probabilities without materialising the logits (`trl.trainer.utils.add_fused_lm_head`). On CUDA it projects only
the positions whose label is not -100; on every other device it projects all of them, prompt and padding included,
and zeroes the unlabelled ones afterwards, because on Neuron a varying number of positions recompiles the graph. An
eager CPU has no graph to recompile, and there the full projection is costly: a 49k-token vocabulary over every
position, then the soft-max statistics in fp32. DPO's replies are about half of each sequence, so on the demo model
this halves the work of the output layer. The log-probabilities of the labelled positions are the same either way;
this only chooses which rows reach the kernel.
"""

from __future__ import annotations

from typing import Any


def compact_on_cpu() -> bool:
    """Make TRL's fused head project only labelled positions on CPUs as well; idempotent. Returns False when this
    TRL has no such switch (a renamed private hook), in which case TRL's own behaviour stays."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    original: Any = getattr(trl_utils, "_use_triton", None)
    if original is None:
        return False
    if getattr(original, "compact_on_cpu", False):
        return True

    def compact(device: Any) -> bool:
        return device.type == "cpu" or original(device)

    compact.compact_on_cpu = True  # type: ignore[attr-defined]
    # In trl.trainer.utils this name only decides whether the fused forward drops unlabelled rows; the kernel module
    # keeps its own binding, so CPUs still run the torch tiles rather than Triton.
    trl_utils._use_triton = compact
    return True
