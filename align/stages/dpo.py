"""`align dpo`: direct preference optimisation with TRL's DPOTrainer, starting from an SFT artifact.

Steps: preference card -> pairs; SFT artifact merged into the base in memory; a fresh LoRA through
`peft_config`, so TRL's reference model is this same model with the adapter disabled (no second copy of
the weights); preference accuracy and margins on the eval split before and after; publish the adapter.
"""

from __future__ import annotations

from typing import Any

from align import training
from align.artifacts import Artifact, Registry
from align.recipe import Recipe


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one DPO policy adapter. Returns the artifact on the main process, None elsewhere."""
    inputs = training.prepare(recipe, registry, resume=resume, say=say, rows="preference")
    recipe, run_state, settings = inputs.recipe, inputs.run, inputs.recipe.dpo
    from trl import DPOConfig, DPOTrainer

    trainer = training.build_trainer(DPOTrainer, DPOConfig, inputs, task_type="CAUSAL_LM",
                                     beta=settings.beta, loss_type=list(settings.loss_type),
                                     loss_weights=settings.loss_weights, label_smoothing=settings.label_smoothing,
                                     precompute_ref_log_probs=settings.precompute_ref_log_probs)

    # Before training the policy is the reference: every implicit reward is 0, so this is the floor.
    before = trainer.evaluate()
    train_metrics = training.train(trainer, run_state)
    after = trainer.evaluate()
    metrics = {
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss": after.get("eval_loss"),
        "eval_reward_accuracy": after.get("eval_rewards/accuracies"),
        "eval_reward_margin": after.get("eval_rewards/margins"),
        "eval_reward_chosen": after.get("eval_rewards/chosen"),
        "eval_reward_rejected": after.get("eval_rewards/rejected"),
    }
    return training.publish_adapter(trainer, inputs, task_type="CAUSAL_LM", metrics=metrics,
                                    train_metrics=train_metrics, details={"dpo": settings.model_dump()})
