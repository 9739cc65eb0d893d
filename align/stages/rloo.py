"""`align rloo`: REINFORCE leave-one-out (Ahmadian et al. 2024) with TRL's RLOOTrainer, from an SFT artifact.

Steps: reward checked first (reward artifact, judge, whole groups per batch); prompt card; SFT artifact merged
into the base in memory; a fresh LoRA through `peft_config`, so the KL reference is the same model with the
adapter disabled; `num_generations` replies per prompt scored by `online_rewards`, each baselined by the mean
of the others in its group; publish the adapter with the reward artifact as a parent. `align eval` judges it.
"""

from __future__ import annotations

from typing import Any

from align import online_rewards, training
from align.artifacts import Artifact, Registry
from align.recipe import Recipe


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one RLOO policy adapter. Returns the artifact on the main process, None elsewhere."""
    reward = online_rewards.resolve(recipe, registry)
    inputs = training.prepare(recipe, registry, resume=resume, say=say, rows="prompts")
    settings = inputs.recipe.rloo
    from trl import RLOOConfig, RLOOTrainer

    reward_fn = online_rewards.reward_function(reward, registry, inputs.tokenizer)
    padding_side, inputs.tokenizer.padding_side = inputs.tokenizer.padding_side, "left"  # TRL generates left-padded
    trainer = training.build_trainer(RLOOTrainer, RLOOConfig, inputs, task_type="CAUSAL_LM",
                                     trainer_kwargs={"reward_funcs": [reward_fn]},
                                     **online_rewards.sampling_config(inputs.recipe),
                                     normalize_advantages=settings.normalize_advantages)
    train_metrics = training.train(trainer, inputs.run)
    inputs.tokenizer.padding_side = padding_side
    metrics = online_rewards.rollout_metrics(trainer.state.log_history)
    return training.publish_adapter(trainer, inputs, task_type="CAUSAL_LM", metrics=metrics,
                                    train_metrics=train_metrics, extra_parents=reward.parents,
                                    details={"rloo": settings.model_dump(), "online_reward": reward.describe()})
