"""`align reward`: a LoRA reward model on preference pairs with TRL's RewardTrainer.

Steps: preference card -> rows; base (or SFT artifact, merged in memory) with a scalar score head; a fresh
`SEQ_CLS` LoRA, which makes PEFT train and save the score head too (with CAUSAL_LM the head is silently
lost, trl #1379); pairwise accuracy before/after on the eval split; publish adapter + per-pair scores.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from align import generation, models, runtime, scoring, training
from align.artifacts import Artifact, Registry
from align.data import load_card, load_data
from align.errors import DataError
from align.recipe import Recipe, detect_device, resolve_device_defaults


def _as_dataset(rows: list[dict[str, Any]], chat_template: str) -> Any:
    from datasets import Dataset

    if chat_template == "none":
        rows = [generation.to_plain_text_row(row) for row in rows]
    return Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows])


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one reward adapter. Returns the artifact on the main process, None on other ranks."""
    card = load_card(recipe.relative_path(recipe.data.card))
    data = load_data(card, limit=recipe.data.limit, eval_limit=recipe.data.eval_limit)
    if not data.train or "chosen" not in data.train[0]:
        raise DataError(f"{card.path}: format '{card.format}' gives no chosen/rejected pairs; a reward model "
                        "needs a preference format (see README, data cards)")
    if not data.eval:
        raise DataError(f"{card.path}: the eval split is empty; a reward model is judged on held-out pairs")
    start = models.resolve_starting_point(recipe, registry)
    device = detect_device()
    recipe = resolve_device_defaults(recipe, device)
    from trl import RewardConfig, RewardTrainer

    run_state = training.open_run(recipe, registry, start, data.summary(), device, resume)
    for note in run_state.notes:
        say(note)

    chat_template = recipe.model.chat_template
    tokenizer = models.load_tokenizer(start.base, chat_template, saved_in=start.parent.path if start.parent else None)
    model = models.load_starting_model(start, registry, models.torch_dtype(recipe.train.precision), head="score")
    model.config.pad_token_id = tokenizer.pad_token_id

    config = RewardConfig(
        **training.trainer_args(run_state),
        max_length=recipe.train.max_length,
        center_rewards_coefficient=recipe.reward.center_rewards_coefficient,
    )
    runtime.wait_for_everyone()
    trainer = RewardTrainer(
        model=model,
        args=config,
        train_dataset=_as_dataset(data.train, chat_template),
        eval_dataset=_as_dataset(data.eval, chat_template),
        processing_class=tokenizer,
        peft_config=models.lora_config(recipe.lora, "SEQ_CLS"),
    )

    def eval_scores() -> tuple[list[float], list[float]]:
        scorer = trainer.accelerator.unwrap_model(trainer.model)
        batch = recipe.train.per_device_eval_batch_size
        chosen = scoring.score_replies(scorer, tokenizer, [(r["prompt"], r["chosen"]) for r in data.eval],
                                       chat_template=chat_template, batch_size=batch)
        rejected = scoring.score_replies(scorer, tokenizer, [(r["prompt"], r["rejected"]) for r in data.eval],
                                         chat_template=chat_template, batch_size=batch)
        return chosen, rejected

    before = scoring.pairwise_metrics(*eval_scores())
    train_metrics = training.train(trainer, run_state)
    chosen, rejected = eval_scores()
    after = scoring.pairwise_metrics(chosen, rejected)

    metrics = {
        **{f"eval_{key}": value for key, value in after.items()},
        "eval_accuracy_before": before["accuracy"],
        "train_loss": train_metrics.get("train_loss"),
        "train_runtime_s": train_metrics.get("train_runtime"),
        "global_step": trainer.state.global_step,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
    }
    adapter_dir = training.save_adapter(trainer, run_state)

    def write_files(staging: Path) -> None:
        shutil.copytree(adapter_dir, staging / "adapter")
        tokenizer.save_pretrained(str(staging))
        training.write_json(staging / "eval_scores.json", [
            {"chosen": c, "rejected": r} for c, r in zip(chosen, rejected, strict=True)
        ])
        training.write_json(staging / "log_history.json", trainer.state.log_history)

    lora = recipe.lora
    adapter = {"task_type": "SEQ_CLS", "r": lora.r, "lora_alpha": lora.lora_alpha,
               "target_modules": lora.target_modules, "chat_template": chat_template,
               "score_head": "saved in the adapter (modules_to_save)",
               "normalisation": {"mean": after["reward_mean"], "std": after["reward_std"]}}
    return training.publish(run_state, write_files=write_files, metrics=metrics, adapter=adapter)
