"""`align sft`: LoRA instruction tuning with TRL's SFTTrainer, loss on the assistant reply only.

Steps, top to bottom: data card -> rows; base (or parent artifact, merged in memory) -> model; fresh LoRA;
eval loss and sample replies before training; train with checkpoints; the same after; publish the adapter.
"""

from __future__ import annotations

from typing import Any

from align import generation, runtime, training
from align.artifacts import Artifact, Registry
from align.recipe import Recipe


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one SFT adapter. Returns the artifact on the main process, None on other ranks."""
    inputs = training.prepare(recipe, registry, resume=resume, say=say)
    recipe, data, run_state, tokenizer = inputs.recipe, inputs.data, inputs.run, inputs.tokenizer
    chat_template = recipe.model.chat_template
    from trl import SFTConfig, SFTTrainer

    trainer = training.build_trainer(SFTTrainer, SFTConfig, inputs,
                                     packing=recipe.train.packing,
                                     completion_only_loss=recipe.sft.completion_only_loss)

    sample_prompts = [row["prompt"] for row in data.eval[: recipe.sft.num_samples]]

    def samples() -> list[str]:
        if not sample_prompts or not runtime.is_main_process():
            return []
        with trainer.accelerator.autocast():  # in the precision the adapter trains in
            return generation.generate(trainer.accelerator.unwrap_model(trainer.model), tokenizer, sample_prompts,
                                       chat_template=chat_template, max_new_tokens=recipe.sft.max_new_tokens,
                                       seed=recipe.train.seed)

    # A fresh LoRA adapter starts as the identity, so "before" is the starting model itself.
    before = trainer.evaluate(metric_key_prefix="eval")
    replies_before = samples()
    train_metrics = training.train(trainer, run_state)
    after = trainer.evaluate(metric_key_prefix="eval")
    replies_after = samples()

    metrics = {
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss": after.get("eval_loss"),
        "perplexity_before": training.perplexity(before.get("eval_loss")),
        "perplexity": training.perplexity(after.get("eval_loss")),
    }
    # Only the main process generated replies, and only it writes files.
    sample_rows = [{"prompt": prompt, "before": b, "after": a} for prompt, b, a in
                   zip(sample_prompts, replies_before, replies_after, strict=True)] if runtime.is_main_process() else []
    return training.publish_adapter(trainer, inputs, metrics=metrics,
                                    train_metrics=train_metrics, files={"samples.json": sample_rows})
