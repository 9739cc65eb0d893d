"""The hardware a stage trains on, and the recipe defaults that depend on it: decided here and nowhere else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from align.errors import RecipeError

if TYPE_CHECKING:
    from align.recipe import Recipe


def detect_device() -> dict[str, Any]:
    """What this process will train on. Imports torch, so only stage commands call it."""
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "bf16": torch.cuda.is_bf16_supported()}
    return {"type": "cpu", "name": "cpu", "bf16": False}


def resolve_device_defaults(recipe: Recipe, device: dict[str, Any]) -> Recipe:
    """Fill every `auto`/None that depends on the hardware, and refuse what the hardware cannot do.

    TRL defaults bf16=True (raises on CPU) and activation checkpointing on (about 1.6x slower on CPU), so
    we decide here instead: fp32 without checkpointing on CPU, bf16 (else fp16) with checkpointing on GPUs.
    """
    resolved = recipe.model_copy(deep=True)  # keeps the recipe's path and overrides (pydantic copies private attrs)
    train = resolved.train
    on_gpu = device["type"] == "cuda"
    if train.precision == "auto":
        train.precision = ("bf16" if device["bf16"] else "fp16") if on_gpu else "fp32"
    elif train.precision in ("bf16", "fp16") and not on_gpu:
        raise RecipeError(
            f"{recipe.path}: train.precision: {train.precision} needs a GPU and this machine has none; use fp32 or auto"
        )
    elif train.precision == "bf16" and not device["bf16"]:
        raise RecipeError(f"{recipe.path}: train.precision: {device['name']} does not support bf16; use fp16 or auto")
    if train.activation_checkpointing is None:
        train.activation_checkpointing = on_gpu
    if train.optim is None:
        train.optim = "adamw_torch_fused" if on_gpu else "adamw_torch"
    return resolved
