"""Cut-off replies stay open: what `dpo` and `kto` share (stages never import each other).

A reply that was cut off at the sampling limit (`chosen_open`/`rejected_open` in preference rows, `completion_open`
in unpaired rows, see `align.data.formats`) must not be closed, or the trainer teaches the model to stop where it
was cut. TRL 1.16's DPOTrainer and KTOTrainer close every completion in `_prepare_dataset`: plain text gets the EOS
string appended (their inner `add_eos`), conversational rows are rendered by the chat template, which ends the
assistant turn. Neither has a per-row switch, so `reopened` re-tokenises just the flagged completions after TRL's
preparation: the same text TRL tokenised minus the appended EOS, or the chat template with
`continue_final_message=True` (transformers cuts the rendering right after the message content).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from align.errors import DataError

OpenFlags = list[tuple[bool, ...]]  # per row, per side: is that completion open


def open_flags(rows: list[dict[str, Any]], sides: Sequence[str] = ("chosen", "rejected")) -> OpenFlags:
    """Which completions of each canonical row must stay open (no EOS / end of turn after them)."""
    return [tuple(bool(row.get(f"{side}_open")) for side in sides) for row in rows]


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


def _reopen(example: dict[str, Any], tokenizer: Any, sides: Sequence[str]) -> dict[str, Any]:
    """One prepared row with its open completions re-tokenised (dataset.map function)."""
    return {f"{side}_ids": open_completion_ids(tokenizer, example["prompt"], example[side], example["prompt_ids"])
            for side in sides if example[f"_align_{side}_open"]}


def reopened(dataset: Any, flags: OpenFlags, sides: Sequence[str], prepare: Callable[[Any], Any], tokenizer: Any,
             name: str) -> Any:
    """`prepare(dataset)` (the trainer's own `_prepare_dataset`) with the flagged completions left open; the flags
    travel as columns with their rows through TRL's map and filter, and are removed afterwards."""
    if not any(any(row) for row in flags):
        return prepare(dataset)
    if len(flags) != len(dataset):
        raise ValueError(f"{name}: {len(flags)} open flags for {len(dataset)} rows")
    columns = [f"_align_{side}_open" for side in sides]
    for index, column in enumerate(columns):
        dataset = dataset.add_column(column, [row[index] for row in flags])
    return prepare(dataset).map(_reopen, fn_kwargs={"tokenizer": tokenizer, "sides": tuple(sides)},
                                remove_columns=columns, desc=f"Leaving cut-off replies open in {name} dataset")


def open_end_subclass(trainer: type, sides: Sequence[str],
                      finish: Callable[[Any, Any, OpenFlags, Any, str], Any] | None = None) -> type:
    """`trainer` (TRL's DPOTrainer or KTOTrainer) taking `open_flags={"train": OpenFlags, "eval": OpenFlags}`,
    aligned with the datasets' rows, whose `_prepare_dataset` leaves the flagged completions open (`reopened`).
    `finish(trainer, prepared, flags, args, dataset_name)` rebuilds what the trainer derived from the closed ids."""

    class OpenEnd(trainer):
        def __init__(self, *args: Any, open_flags: dict[str, OpenFlags], **kwargs: Any) -> None:
            self._align_open_flags = open_flags  # read by _prepare_dataset, which the trainer's __init__ calls
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
            def prepare(rows: Any) -> Any:
                return super(OpenEnd, self)._prepare_dataset(rows, processing_class, args, dataset_name)

            flags = self._align_open_flags.get(dataset_name) or []
            prepared = reopened(dataset, flags, sides, prepare, self._tokenizer, dataset_name)
            return finish(self, prepared, flags, args, dataset_name) if finish else prepared

    OpenEnd.__name__ = OpenEnd.__qualname__ = f"OpenEnd{trainer.__name__}"
    return OpenEnd
