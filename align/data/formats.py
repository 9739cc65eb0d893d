"""The format registry: each dataset layout a data card may name, its fields and default columns, and its converter.

The converters themselves (and the canonical row shapes they produce) are in `align.data.converters`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from align.data import converters
from align.data.converters import RowError, type_name
from align.errors import DataError


@dataclass(frozen=True)
class Format:
    """One dataset layout: its canonical field names, their default columns, and the converter."""

    name: str
    kind: Literal["sft", "preference", "prompts", "unpaired"]
    fields: dict[str, str]  # canonical field name -> default column (or key) name in the file
    required: tuple[str, ...]
    convert: Callable[..., dict]  # (row, fields, **options) -> canonical row
    description: str
    options: tuple[str, ...] = ()  # card keys the converter also reads (e.g. `label_map`), passed as keywords


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            name="messages",
            kind="sft",
            fields={"messages": "messages", "system": "system"},
            required=("messages",),
            convert=converters.convert_messages,
            description="OpenAI-style `messages: [{role, content}]`; content may be a list of text parts.",
        ),
        Format(
            name="sharegpt",
            kind="sft",
            fields={"conversations": "conversations", "system": "system", "role_key": "from", "content_key": "value"},
            required=("conversations",),
            convert=converters.convert_sharegpt,
            description="ShareGPT `conversations: [{from, value}]` with human/gpt/system roles.",
        ),
        Format(
            name="alpaca",
            kind="sft",
            fields={
                "instruction": "instruction",
                "input": "input",
                "output": "output",
                "system": "system",
                "history": "history",
            },
            required=("instruction", "output"),
            convert=converters.convert_alpaca,
            description="Alpaca `instruction` + optional `input` -> `output`, optional `system` and `history` pairs.",
        ),
        Format(
            name="prompt_completion",
            kind="sft",
            fields={"prompt": "prompt", "completion": "completion", "system": "system"},
            required=("prompt", "completion"),
            convert=converters.convert_prompt_completion,
            description="`prompt` and `completion`, each a string or a list of messages.",
        ),
        Format(
            name="prompts",
            kind="prompts",
            fields={"prompt": "prompt", "system": "system"},
            required=("prompt",),
            convert=converters.convert_prompts,
            description="Prompts only (a string or messages ending with a user turn): for sampling and evaluation.",
        ),
        Format(
            name="chosen_rejected",
            kind="preference",
            fields={"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system",
                    "chosen_open": "chosen_open", "rejected_open": "rejected_open"},
            required=("chosen", "rejected"),
            convert=converters.convert_chosen_rejected,
            description="Preference pairs: `chosen`/`rejected` strings or message lists; `prompt` or a shared prefix; "
                        "optional `chosen_open`/`rejected_open`: true for a cut-off reply DPO must leave unclosed.",
        ),
        Format(
            name="hh_rlhf",
            kind="preference",
            fields={"chosen": "chosen", "rejected": "rejected"},
            required=("chosen", "rejected"),
            convert=converters.convert_hh_rlhf,
            description="Anthropic HH-RLHF: `chosen`/`rejected` transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...'.",
        ),
        Format(
            name="sharegpt_preference",
            kind="preference",
            fields={
                "conversations": "conversations",
                "chosen": "chosen",
                "rejected": "rejected",
                "system": "system",
                "role_key": "from",
                "content_key": "value",
            },
            required=("conversations", "chosen", "rejected"),
            convert=converters.convert_sharegpt_preference,
            description="LLaMA-Factory pairs: `conversations` ending with a human turn, `chosen`/`rejected` turn(s).",
        ),
        Format(
            name="pairwise_label",
            kind="preference",
            fields={
                "prompt": "prompt",
                "answer_a": "answer_a",
                "answer_b": "answer_b",
                "label": "label",
                "system": "system",
            },
            required=("prompt", "answer_a", "answer_b", "label"),
            convert=converters.convert_pairwise_label,
            description="Two answers and a `label` naming the better one (field name, a/b, or an integer read "
                        "through the card's `label_map`); ties are dropped.",
            options=("label_map",),
        ),
        Format(
            name="unpaired",
            kind="unpaired",
            fields={"prompt": "prompt", "completion": "completion", "label": "label", "system": "system",
                    "completion_open": "completion_open"},
            required=("prompt", "completion", "label"),
            convert=converters.convert_unpaired,
            description="Unpaired feedback (thumbs up/down, for KTO): `prompt`, `completion` (strings or message "
                        "lists) and a `label`: true/false (desirable/undesirable, up/down) or, through the card's "
                        "`label_map`, an integer; optional `completion_open`: true for a cut-off reply.",
            options=("label_map",),
        ),
    )
}

# Rows of one kind a stage reading another kind can still train on, converted the one honest way (the stage
# registry's `reads`): a preference pair is one desirable and one undesirable reply to the same prompt.
KIND_CONVERSIONS: dict[tuple[str, str], Callable[[Mapping[str, Any]], list[dict]]] = {
    ("preference", "unpaired"): converters.unpair,
}


def did_you_mean(name: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else the list of known names."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"


def get_format(name: str) -> Format:
    """The registered format called `name`; an unknown name is a DataError listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"unknown data format '{name}'{did_you_mean(name, list(FORMATS))}") from None


def convert_row(fmt: Format, row: Mapping[str, Any], fields: Mapping[str, str],
                options: Mapping[str, Any] | None = None) -> dict:
    """Convert one file row to canonical form; `fields` (from the card) overrides the format's default columns,
    `options` are the card settings the format reads (`fmt.options`, e.g. `label_map`)."""
    if not isinstance(row, Mapping):
        raise RowError(f"row must be an object, got {type_name(row)}")
    return fmt.convert(row, {**fmt.fields, **fields}, **{key: value for key, value in (options or {}).items()
                                                        if key in fmt.options})


def columns_read(fmt: Format, fields: Mapping[str, str]) -> set[str]:
    """The row keys (columns) a format reads under a card's field mapping; `role_key`/`content_key` name keys
    inside messages, not columns."""
    return {column for name, column in {**fmt.fields, **fields}.items() if name not in ("role_key", "content_key")}
