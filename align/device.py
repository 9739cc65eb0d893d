"""The hardware a stage trains on, and the recipe defaults that depend on it: decided here and nowhere else."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import RecipeError

if TYPE_CHECKING:
    from align.recipe import Recipe


# CPU flags of native bf16 arithmetic: AVX512-BF16 (dot products) and AMX (tile matmuls). Without them torch
# emulates bf16 with fp32 conversions and autocast is slower than fp32, so only these CPUs get bf16.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native bf16 flags this CPU reports in /proc/cpuinfo (Linux); none elsewhere or when unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return []
    flags = {word for line in cpuinfo.splitlines() if line.startswith("flags") for word in line.split()}
    return [flag for flag in CPU_BF16_FLAGS if flag in flags]


def detect_device() -> dict[str, Any]:
    """What this process will train on. Imports torch, so only stage commands call it. On CPU, `bf16` is True
    only where the CPU has native bf16 units (`cpu_bf16_flags`); `ALIGN_CPU_BF16=0` turns that off."""
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported()}
    flags = cpu_bf16_flags() if os.environ.get("ALIGN_CPU_BF16", "1") != "0" else []
    return {"type": "cpu", "name": f"cpu ({', '.join(flags)})" if flags else "cpu", "bf16": bool(flags)}


# Below this hidden size bf16 autocast on a CPU costs more than it saves: its per-op casts and oneDNN's
# per-shape kernel set-up outweigh matmuls that small (stories260K, hidden 64: a tiny SFT trained 1.4x slower
# in bf16; SmolLM2-135M, hidden 576: forward+backward 1.4-1.7x faster). docs/BENCHMARKS.md has the figures.
CPU_BF16_MIN_HIDDEN = 256


def resolve_precision(requested: str, device: dict[str, Any], field: str, hidden_size: int | None = None) -> str:
    """`auto` made concrete for this device and model, or a RecipeError (naming `field`) for what it cannot do.

    On GPUs bf16 where supported, else fp16. On CPUs bf16 autocast (fp32 master weights and optimizer state:
    see `models.weight_dtype`) where the CPU has native bf16 units and the model is large enough for it to pay
    (`hidden_size` >= CPU_BF16_MIN_HIDDEN; unknown size: fp32), else fp32; fp16 never on CPU."""
    on_gpu = device["type"] == "cuda"
    if requested == "auto":
        if on_gpu:
            return "bf16" if device["bf16"] else "fp16"
        large = hidden_size is not None and hidden_size >= CPU_BF16_MIN_HIDDEN
        return "bf16" if device["bf16"] and large else "fp32"
    if requested == "fp16" and not on_gpu:
        raise RecipeError(f"{field}: fp16 needs a GPU and this machine has none; use bf16, fp32 or auto")
    if requested == "bf16" and not device["bf16"]:
        what = device["name"] if on_gpu else "this CPU has no native bf16 units (avx512_bf16 or AMX)"
        raise RecipeError(f"{field}: {what} does not support bf16 fast; use {'fp16' if on_gpu else 'fp32'} or auto")
    return requested


def resolve_device_defaults(recipe: Recipe, device: dict[str, Any], hidden_size: int | None = None) -> Recipe:
    """Fill every `auto`/None that depends on the hardware, and refuse what the hardware cannot do.

    TRL defaults bf16=True and activation checkpointing on (about 1.6x slower on CPU), so we decide here
    instead: on CPU no checkpointing and bf16 autocast only where the CPU has bf16 units (else fp32); on GPUs
    bf16 (else fp16) with checkpointing.
    """
    resolved = recipe.model_copy(deep=True)  # keeps the recipe's path and overrides (pydantic copies private attrs)
    train = resolved.train
    on_gpu = device["type"] == "cuda"
    train.precision = resolve_precision(train.precision, device, f"{recipe.path}: train.precision", hidden_size)
    if train.activation_checkpointing is None:
        train.activation_checkpointing = on_gpu
    if train.optim is None:
        train.optim = "adamw_torch_fused" if on_gpu else "adamw_torch"
    return resolved
