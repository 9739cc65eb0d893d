"""`align dpo`: direct preference optimisation with TRL's DPOTrainer, starting from an SFT artifact.

Steps: preference card -> pairs; SFT artifact merged into the base in memory; a fresh LoRA through
`peft_config`, so TRL's reference model is this same model with the adapter disabled (no second copy of
the weights); preference accuracy and margins on the eval split before and after; publish the adapter.

Open replies (cut-off replies get no EOS or end of turn): `align.stages.open_end`, shared with `kto`.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from align import training
from align.artifacts import Artifact, Registry
from align.recipe import DpoSection, Recipe
from align.stages.open_end import OpenFlags, open_completion_ids, open_end_subclass, open_flags

__all__ = ["OpenFlags", "loss_at_reference", "open_completion_ids", "open_end_trainer", "open_flags", "run"]
_SIDES = ("chosen", "rejected")


@cache
def open_end_trainer() -> type:
    """DPOTrainer that leaves flagged completions open; built on first use so the CLI starts without TRL."""
    from trl import DPOTrainer

    return open_end_subclass(DPOTrainer, _SIDES)


def loss_at_reference(settings: DpoSection) -> float | None:
    """DPO's eval loss while the policy still is its reference (a fresh LoRA adapts nothing: B = 0), when it
    does not depend on the data: every log-ratio is 0, so the sigmoid loss is -log sigmoid(0) = ln 2 for either
    label (label smoothing mixes two equal terms), times its weight. None for the other losses: evaluate."""
    if list(settings.loss_type) != ["sigmoid"]:
        return None
    return math.log(2) * (settings.loss_weights[0] if settings.loss_weights else 1.0)


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one DPO policy adapter. Returns the artifact on the main process, None elsewhere."""
    inputs = training.prepare(recipe, registry, resume=resume, say=say)
    recipe, run_state, settings = inputs.recipe, inputs.run, inputs.recipe.dpo
    from trl import DPOConfig

    flags = {"train": open_flags(inputs.data.train), "eval": open_flags(inputs.data.eval)}
    opened = sum(a + b for split in flags.values() for a, b in split)
    if opened:
        say(f"{opened} cut-off replies stay open (no EOS or end of turn appended)")
    trainer = training.build_trainer(open_end_trainer(), DPOConfig, inputs,
                                     trainer_kwargs={"open_flags": flags},
                                     beta=settings.beta, loss_type=list(settings.loss_type),
                                     loss_weights=settings.loss_weights, label_smoothing=settings.label_smoothing,
                                     precompute_ref_log_probs=settings.precompute_ref_log_probs)

    # Before training the policy is the reference: every implicit reward is 0, so this is the floor. For the
    # sigmoid loss that floor is known exactly, which saves a pass over the eval split (~50 s on the demo).
    before_loss = loss_at_reference(settings)
    if before_loss is None:
        before_loss = trainer.evaluate().get("eval_loss")
    train_metrics = training.train(trainer, run_state)
    after = trainer.evaluate()
    metrics = {
        "eval_loss_before": before_loss,
        "eval_loss": after.get("eval_loss"),
        "eval_reward_accuracy": after.get("eval_rewards/accuracies"),
        "eval_reward_margin": after.get("eval_rewards/margins"),
        "eval_reward_chosen": after.get("eval_rewards/chosen"),
        "eval_reward_rejected": after.get("eval_rewards/rejected"),
        "open_replies": opened,
    }
    return training.publish_adapter(trainer, inputs, metrics=metrics,
                                    train_metrics=train_metrics, details={"dpo": settings.model_dump()})
