"""`align dpo`: direct preference optimisation with TRL's DPOTrainer, starting from an SFT artifact.

Steps: preference card -> pairs; SFT artifact merged into the base in memory; a fresh LoRA through
`peft_config`, so TRL's reference model is this same model with the adapter disabled (no second copy of
the weights); preference accuracy and margins on the eval split before and after; publish the adapter.

Open replies: TRL 1.16's `DPOTrainer._prepare_dataset` closes every completion. Plain text gets the EOS
string appended (its inner `add_eos`), conversational rows are rendered by the chat template, which ends the
assistant turn. A reply that was cut off at the sampling limit (`chosen_open`/`rejected_open` in the rows, see
`align.data.formats`) must not be closed, or DPO teaches the model to stop where it was cut. TRL has no per-row
switch for this, so `open_end_trainer` re-tokenises just those completions after TRL's preparation: the same
text TRL tokenised minus the appended EOS, or the chat template with `continue_final_message=True`
(transformers cuts the rendering right after the message content).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from align import training
from align.artifacts import Artifact, Registry
from align.errors import DataError
from align.recipe import DpoSection, Recipe

OpenFlags = list[tuple[bool, bool]]  # per row: (chosen is open, rejected is open)
_SIDES = ("chosen", "rejected")


def open_flags(rows: list[dict[str, Any]]) -> OpenFlags:
    """Which completions of each canonical preference row must stay open (no EOS / end of turn after them)."""
    return [(bool(row.get("chosen_open")), bool(row.get("rejected_open"))) for row in rows]


def open_completion_ids(tokenizer: Any, prompt: str | list[dict[str, str]], completion: str | list[dict[str, str]],
                        prompt_ids: list[int]) -> list[int]:
    """The completion's token ids as TRL's `tokenize_fn` makes them, minus what closes it.

    Plain text: TRL tokenises `prompt + completion + eos_token`; the EOS is a special token, so the same text
    without it tokenises identically up to there. Chat: the template renders `prompt + [reply]` and transformers'
    `continue_final_message` stops the rendering after the reply's content, dropping the end-of-turn tokens."""
    if isinstance(prompt, list):
        try:
            ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True,
                                                continue_final_message=True)["input_ids"]
        except ValueError as exc:  # e.g. a template that never prints the message content as given
            raise DataError(f"cannot leave a cut-off chat reply open with this chat template: {exc}") from None
    else:
        eos = tokenizer.eos_token
        text = completion[: -len(eos)] if eos and completion.endswith(eos) else completion
        ids = tokenizer(text=prompt + text)["input_ids"]
    if ids[: len(prompt_ids)] != prompt_ids:
        raise DataError("a cut-off reply's tokens do not start with its prompt's tokens; cannot leave it open")
    return ids[len(prompt_ids):]


def _reopen(example: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """One prepared row with its open completions re-tokenised (dataset.map function)."""
    out = {}
    for side in _SIDES:
        if example[f"_align_{side}_open"]:
            out[f"{side}_ids"] = open_completion_ids(tokenizer, example["prompt"], example[side], example["prompt_ids"])
    return out


@cache
def open_end_trainer() -> type:
    """DPOTrainer that leaves flagged completions open; built on first use so the CLI starts without TRL."""
    from trl import DPOTrainer

    class OpenEndDPOTrainer(DPOTrainer):
        """`open_flags={"train": OpenFlags, "eval": OpenFlags}`, aligned with the datasets' rows."""

        def __init__(self, *args: Any, open_flags: dict[str, OpenFlags], **kwargs: Any) -> None:
            self._align_open_flags = open_flags  # read by _prepare_dataset, which DPOTrainer.__init__ calls
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            flags = self._align_open_flags.get(dataset_name) or []
            if not any(any(pair) for pair in flags):
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if len(flags) != len(dataset):
                raise ValueError(f"{dataset_name}: {len(flags)} open flags for {len(dataset)} rows")
            columns = [f"_align_{side}_open" for side in _SIDES]
            for index, column in enumerate(columns):  # columns travel with their rows through TRL's map/filter
                dataset = dataset.add_column(column, [pair[index] for pair in flags])
            prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            return prepared.map(_reopen, fn_kwargs={"tokenizer": self._tokenizer}, remove_columns=columns,
                                desc=f"Leaving cut-off replies open in {dataset_name} dataset")

    return OpenEndDPOTrainer


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
