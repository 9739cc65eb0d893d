"""`align reward`: a LoRA reward model on preference pairs with TRL's RewardTrainer.

Steps: preference card -> rows; base (or SFT artifact, merged in memory) with a scalar score head; a fresh
`SEQ_CLS` LoRA, which makes PEFT train and save the score head too (with CAUSAL_LM the head is silently
lost, trl #1379); pairwise accuracy on the eval split after training (and before, unless
`reward.eval_before: false`); publish adapter + per-pair scores.
"""

from __future__ import annotations

from typing import Any

from align import scoring, training
from align.artifacts import Artifact, Registry
from align.recipe import Recipe


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one reward adapter. Returns the artifact on the main process, None on other ranks."""
    inputs = training.prepare(recipe, registry, resume=resume, say=say)
    recipe, data, run_state, tokenizer = inputs.recipe, inputs.data, inputs.run, inputs.tokenizer
    chat_template = recipe.model.chat_template
    from trl import RewardConfig, RewardTrainer

    # SEQ_CLS makes PEFT train and save the score head with the adapter.
    trainer = training.build_trainer(RewardTrainer, RewardConfig, inputs,
                                     center_rewards_coefficient=recipe.reward.center_rewards_coefficient)

    # Pairs longer than train.max_length, which TRL's RewardTrainer drops, are already gone (`training.prepare`,
    # counted in rows_dropped): the eval pairs judged here are the ones the trainer itself keeps.
    eval_rows = data.eval

    def eval_scores() -> tuple[list[float], list[float]]:
        scorer = trainer.accelerator.unwrap_model(trainer.model)
        batch = recipe.train.per_device_eval_batch_size
        chosen = scoring.score_replies(scorer, tokenizer, [(r["prompt"], r["chosen"]) for r in eval_rows],
                                       chat_template=chat_template, batch_size=batch)
        rejected = scoring.score_replies(scorer, tokenizer, [(r["prompt"], r["rejected"]) for r in eval_rows],
                                         chat_template=chat_template, batch_size=batch)
        return chosen, rejected

    before = scoring.pairwise_metrics(*eval_scores()) if recipe.reward.eval_before else None
    train_metrics = training.train(trainer, run_state)
    chosen, rejected = eval_scores()
    after = scoring.pairwise_metrics(chosen, rejected)

    metrics = {
        **{f"eval_{key}": value for key, value in after.items()},
        "eval_accuracy_before": before["accuracy"] if before is not None else None,
    }
    scores = [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=True)]
    normalisation = {"mean": after["reward_mean"], "std": after["reward_std"]}
    return training.publish_adapter(trainer, inputs, metrics=metrics,
                                    train_metrics=train_metrics, files={"eval_scores.json": scores},
                                    adapter_extra={"score_head": "saved in the adapter (modules_to_save)",
                                                   "normalisation": normalisation})
