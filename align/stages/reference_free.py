"""The body `orpo` and `simpo` share (stages never import each other): preference optimisation with no reference
model, through TRL 1.16's experimental ORPOTrainer and CPOTrainer.

Both trainers tokenise in `tokenize_row` (the older TRL layout): the chat template renders each row to text, and
`add_eos_token_if_needed` appends the EOS id to every reply. A reply cut off at the sampling limit
(`chosen_open`/`rejected_open`) must stay open, as in `dpo` (`align.stages.open_end`), so `open_texts` computes each
flagged reply's text as TRL will see it minus what closes it (plain text: the reply itself; chat: the rendering
with `continue_final_message`, cut after the message content), which travels with its row as a column, and
`tokenize_row` tokenises that text and takes the appended EOS back off.

Their rewards are the policy's own (scaled) log-probabilities: before training they are the starting model's
preferences, not 0, so the eval split is measured before and after.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from align import training
from align.artifacts import Artifact, Registry
from align.errors import DataError
from align.generation import to_plain_text_row
from align.recipe import Recipe

_SIDES = ("chosen", "rejected")
_MODULES = {"ORPOTrainer": "trl.experimental.orpo", "CPOTrainer": "trl.experimental.cpo"}  # TRL 1.16's homes
OpenTexts = dict[str, list[str]]  # side -> per row: the reply's open text, "" where it is closed


def open_texts(rows: list[dict[str, Any]], chat_template: str, tokenizer: Any) -> OpenTexts:
    """Per side and row, the text TRL's `tokenize_row` should read for a cut-off reply ("" for a closed one)."""
    from trl.data_utils import maybe_apply_chat_template

    texts: OpenTexts = {side: [] for side in _SIDES}
    for row in rows:
        for side in _SIDES:
            if not row.get(f"{side}_open"):
                texts[side].append("")
            elif chat_template == "none":
                texts[side].append(to_plain_text_row(row)[side])
            else:
                prompt = maybe_apply_chat_template({key: row[key] for key in ("prompt", *_SIDES)}, tokenizer)["prompt"]
                try:
                    rendered = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False,
                                                             continue_final_message=True)
                except ValueError as exc:  # a template that never prints the message content as given
                    raise DataError(f"cannot leave a cut-off chat reply open with this chat template: {exc}") from None
                if not rendered.startswith(prompt):
                    raise DataError("a cut-off reply's rendering does not start with its prompt's; cannot leave it "
                                    "open with this chat template")
                texts[side].append(rendered[len(prompt):])
    return texts


def open_end(trainer_cls: type) -> type:
    """`trainer_cls` (ORPOTrainer or CPOTrainer) taking `open_texts={"train": OpenTexts, "eval": OpenTexts}`."""

    class OpenEnd(trainer_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, open_texts: dict[str, OpenTexts], train_dataset: Any, eval_dataset: Any,
                     **kwargs: Any) -> None:
            datasets = {"train": train_dataset, "eval": eval_dataset}
            for split, texts in open_texts.items():
                if any(any(column) for column in texts.values()):
                    for side, column in texts.items():
                        datasets[split] = datasets[split].add_column(f"_align_{side}_open", column)
            super().__init__(*args, train_dataset=datasets["train"], eval_dataset=datasets["eval"], **kwargs)

        def tokenize_row(self, feature: dict[str, Any], model: Any = None) -> dict:
            opened = [side for side in _SIDES if feature.get(f"_align_{side}_open")]
            batch = super().tokenize_row({**feature, **{side: feature[f"_align_{side}_open"] for side in opened}},
                                         model)
            eos = self.processing_class.eos_token_id
            for side in opened:
                if batch[f"{side}_input_ids"] and batch[f"{side}_input_ids"][-1] == eos:
                    for key in ("input_ids", "attention_mask", "labels"):
                        batch[f"{side}_{key}"] = batch[f"{side}_{key}"][:-1]
            return batch

    OpenEnd.__name__ = OpenEnd.__qualname__ = f"OpenEnd{trainer_cls.__name__}"
    return OpenEnd


@cache
def trainer_class(name: str) -> type:
    """TRL's experimental trainer `name` (ORPOTrainer | CPOTrainer) leaving cut-off replies open."""
    import importlib

    return open_end(getattr(importlib.import_module(_MODULES[name]), name))


def _metric(metrics: dict[str, Any], name: str) -> float | None:
    value = metrics.get(name)
    return None if value is None else float(value)


def run(recipe: Recipe, registry: Registry, *, trainer: str, config: str, settings: dict[str, Any],
        say: Any, resume: bool) -> Artifact | None:
    """Train and publish one reference-free policy adapter with TRL's `trainer` and its `config` (class names),
    `settings` being the config's own fields. Returns the artifact on the main process, None elsewhere."""
    import importlib

    inputs = training.prepare(recipe, registry, resume=resume, say=say)
    recipe, run_state = inputs.recipe, inputs.run
    config_cls = getattr(importlib.import_module(_MODULES[trainer]), config)
    texts = {split: open_texts(getattr(inputs.data, split), recipe.model.chat_template, inputs.tokenizer)
             for split in ("train", "eval")}
    opened = sum(bool(text) for split in texts.values() for column in split.values() for text in column)
    if opened:
        say(f"{opened} cut-off replies stay open (no EOS or end of turn appended)")
    built = training.build_trainer(trainer_class(trainer), config_cls, inputs, trainer_kwargs={"open_texts": texts},
                                   **settings)
    before = built.evaluate()
    train_metrics = training.train(built, run_state)
    after = built.evaluate()
    metrics = {
        "eval_loss_before": _metric(before, "eval_loss"),
        "eval_loss": _metric(after, "eval_loss"),
        "eval_reward_accuracy_before": _metric(before, "eval_rewards/accuracies"),
        "eval_reward_accuracy": _metric(after, "eval_rewards/accuracies"),
        "eval_reward_margin": _metric(after, "eval_rewards/margins"),
        "eval_reward_chosen": _metric(after, "eval_rewards/chosen"),
        "eval_reward_rejected": _metric(after, "eval_rewards/rejected"),
        "eval_nll_loss": _metric(after, "eval_nll_loss"),
        "open_replies": opened,
    }
    if recipe.stage == "orpo":
        metrics["eval_log_odds_ratio"] = _metric(after, "eval_log_odds_ratio")
    if settings.get("cpo_alpha") == 0:  # CPOTrainer logs 0 for an NLL it does not compute
        metrics["eval_nll_loss"] = None
    return training.publish_adapter(built, inputs, metrics=metrics, train_metrics=train_metrics,
                                    details={recipe.stage: getattr(recipe, recipe.stage).model_dump()})
