"""`align kto`: Kahneman-Tversky optimisation with TRL's KTOTrainer, starting from an SFT artifact.

Steps: unpaired card -> rows (a preference card's pairs are split by `training.prepare`: each pair gives one
desirable and one undesirable row); SFT artifact merged into the base in memory; a fresh LoRA through
`peft_config`, so the reference is this same model with the adapter disabled; rewards, margin and KL estimate on
the eval rows after training (before, the policy is its reference: every reward and the KL are 0 and the loss is
known); publish the adapter.

Row order: TRL estimates KTO's KL term from mismatched (prompt, reply) pairs, each row's prompt with the previous
row's reply within a batch, and so samples sequentially. Rows split from pairs sit next to their twin (the same
prompt), and a card may be sorted by its label; the rows of both splits are therefore shuffled once here, seeded
by `train.seed`, so a batch mixes prompts and verdicts and its KL pairs really are mismatched.

Cut-off replies (`completion_open`) stay open as in `dpo` (`align.stages.open_end`); the KL completions are
rebuilt from the reopened replies, so the KL term sees the same replies as the rewards.
"""

from __future__ import annotations

import dataclasses
import random
from functools import cache
from typing import Any

from align import training
from align.artifacts import Artifact, Registry
from align.recipe import KtoSection, Recipe
from align.stages.open_end import OpenFlags, open_end_subclass, open_flags

_SIDES = ("completion",)


def _kl_rotation(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """TRL's KL completions for one batch: each row's prompt with the previous row's reply (dataset.map, batched)."""
    ids = batch["completion_ids"]
    return {"KL_completion_ids": ids[-1:] + ids[:-1]}


def _rebuild_kl(trainer: Any, prepared: Any, flags: OpenFlags, args: Any, dataset_name: str) -> Any:
    """TRL derives the KL completions from the closed ids: derive them again from the reopened ones."""
    if not any(any(row) for row in flags) or not trainer.calculate_KL:
        return prepared
    return prepared.map(_kl_rotation, batched=True, batch_size=args.per_device_train_batch_size,
                        desc=f"Rebuilding KL completions of {dataset_name} dataset")


@cache
def open_end_trainer() -> type:
    """KTOTrainer that leaves flagged completions open; built on first use so the CLI starts without TRL."""
    from trl import KTOTrainer

    return open_end_subclass(KTOTrainer, _SIDES, _rebuild_kl)


def shuffled(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """The rows in one order drawn from `seed` (see the module docstring: KTO's batches must mix prompts)."""
    order = list(rows)
    random.Random(seed).shuffle(order)
    return order


def loss_at_reference(settings: KtoSection) -> float | None:
    """KTO's eval loss while the policy still is its reference (a fresh LoRA adapts nothing): every log-ratio and
    the KL estimate are 0, so each row's loss is 1 - sigmoid(0) = 0.5 (both loss types), times its weight; with
    equal weights that is every batch's mean whatever the data. None for unequal weights: evaluate."""
    if settings.desirable_weight != settings.undesirable_weight:
        return None
    return 0.5 * settings.desirable_weight


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one KTO policy adapter. Returns the artifact on the main process, None elsewhere."""
    inputs = training.prepare(recipe, registry, resume=resume, say=say)
    recipe, run_state, settings = inputs.recipe, inputs.run, inputs.recipe.kto
    inputs = dataclasses.replace(inputs, data=dataclasses.replace(
        inputs.data, train=shuffled(inputs.data.train, recipe.train.seed),
        eval=shuffled(inputs.data.eval, recipe.train.seed)))
    from trl import KTOConfig

    flags = {split: open_flags(getattr(inputs.data, split), _SIDES) for split in ("train", "eval")}
    opened = sum(row[0] for split in flags.values() for row in split)
    if opened:
        say(f"{opened} cut-off replies stay open (no EOS or end of turn appended)")
    trainer = training.build_trainer(open_end_trainer(), KTOConfig, inputs, trainer_kwargs={"open_flags": flags},
                                     beta=settings.beta, loss_type=settings.loss_type,
                                     desirable_weight=settings.desirable_weight,
                                     undesirable_weight=settings.undesirable_weight,
                                     precompute_ref_log_probs=settings.precompute_ref_log_probs)
    before_loss = loss_at_reference(settings)
    if before_loss is None:
        before_loss = trainer.evaluate().get("eval_loss")
    train_metrics = training.train(trainer, run_state)
    after = trainer.evaluate()
    desirable = sum(bool(row["label"]) for row in inputs.data.train)
    metrics = {
        "eval_loss_before": before_loss,
        "eval_loss": after.get("eval_loss"),
        "eval_reward_chosen": after.get("eval_rewards/chosen"),
        "eval_reward_rejected": after.get("eval_rewards/rejected"),
        "eval_reward_margin": after.get("eval_rewards/margins"),
        "eval_kl": after.get("eval_kl"),
        "open_replies": opened,
        "train_desirable": desirable,
        "train_undesirable": len(inputs.data.train) - desirable,
        "train_pairs": inputs.pairs["train"] if inputs.pairs else None,
        "eval_pairs": inputs.pairs["eval"] if inputs.pairs else None,
    }
    return training.publish_adapter(trainer, inputs, metrics=metrics, train_metrics=train_metrics,
                                    details={"kto": settings.model_dump()})
