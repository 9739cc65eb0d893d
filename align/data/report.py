"""What `align data validate` says about a card beyond its counts, as plain lines: the dropped rows, the columns
no field reads, where every row went, token lengths, and what each stage's trainer will drop at a max_length.

The tokenizer's work is done by the caller (`align.data.lengths`); this module only words the results.
"""

from __future__ import annotations

from typing import Any

from align.data.cards import LoadedData
from align.data.formats import get_format
from align.data.lengths import (
    SPLITS,
    LengthPolicy,
    Lengths,
    apply_max_length,
    length_counter,
    length_policy,
    measure,
    nothing_left,
    recipe_length_policy,
    stage_fates,
)
from align.data.preview import token_length_percentiles
from align.errors import DataError

SHOWN = 20
# The stages that train on each kind of row, with their max_length rules (align.data.lengths).
STAGES_READING = {"sft": ("sft",), "preference": ("reward", "dpo", "kto", "orpo", "simpo"), "prompts": (),
                  "unpaired": ("kto",)}


def unknown_columns_note(data: LoadedData) -> str:
    """One line naming the columns of the rows that the card's format does not read (and how many rows carry
    each): e.g. a thumbs-up/down `label` in a `messages` card, which SFT would otherwise imitate regardless."""
    shown = ", ".join(f"{name} ({count} row{'s' if count != 1 else ''})"
                      for name, count in list(data.unknown_columns.items())[:SHOWN])
    more = f" and {len(data.unknown_columns) - SHOWN} more" if len(data.unknown_columns) > SHOWN else ""
    return (f"{data.card.path}: columns the '{data.card.format}' format does not read: {shown}{more}; every row "
            "is used without them (keep only some rows with `where:` in the card, or map a column in `fields:`)")


def card_lines(data: LoadedData) -> list[str]:
    """Dropped rows (ties) with their place, rows filtered out, unknown columns, and the accounting of every row."""
    lines = [f"  dropped {row.location}: {row.reason}" for row in data.dropped[:SHOWN]]
    if len(data.dropped) > SHOWN:
        lines.append(f"  ... and {len(data.dropped) - SHOWN} more dropped")
    if data.filtered:
        wanted = ", ".join(f"{column}: {value!r}" for column, value in data.card.where.items())
        lines.append(f"  filtered out {data.filtered} rows not matching where {{{wanted}}}")
    if data.unknown_columns:
        lines.append(f"warning: {unknown_columns_note(data)}")
    lines.append(accounting(data))
    return lines


def accounting(data: LoadedData) -> str:
    """`rows: read N = train + eval + dropped (by reason)`: where every row read went."""
    counts = data.counts()
    dropped = counts["rows_dropped"]
    reasons = ", ".join(f"{reason} {count}" for reason, count in dropped.items())
    return (f"rows: read {counts['rows_read']} = train {counts['train_rows']} + eval {counts['eval_rows']} "
            f"+ dropped {sum(dropped.values())} ({reasons})")


def length_lines(data: LoadedData, lengths: Lengths) -> list[str]:
    """Token-length percentiles per split of the prompts and of every sequence a trainer reads (prompt +
    completion; prompt + chosen and prompt + rejected, two per pair)."""
    sequences = "prompt + chosen and prompt + rejected" if get_format(data.card.format).kind == "preference" \
        else "prompt + reply"
    keys = ("p50", "p90", "p99", "max", "mean", "count")
    lines = [f"token lengths ({sequences}; prompt alone as the trainer splits it):",
             f"  {'':<22}" + "".join(f"{key:>8}" for key in keys)]
    for split in SPLITS:
        if not lengths[split]:
            continue
        for label, values in ((f"{split} prompt", [length.prompt for length in lengths[split]]),
                              (f"{split} sequences", [n for length in lengths[split] for n in length.sequences])):
            if values:
                stats = token_length_percentiles(values, lambda n: n)
                lines.append(f"  {label:<22}" + "".join(f"{stats[key]:>8}" for key in keys))
    return lines


def stage_policies(data: LoadedData, recipe: Any = None) -> list[LengthPolicy]:
    """The max_length rules to report: the recipe's stage under its settings, else every stage that reads this
    kind of row under its defaults."""
    if recipe is not None:
        policy = recipe_length_policy(recipe)
        return [policy] if policy is not None else []
    stages = STAGES_READING[get_format(data.card.format).kind]
    return [policy for policy in map(length_policy, stages) if policy is not None]


def drop_lines(data: LoadedData, lengths: Lengths, policies: list[LengthPolicy], max_length: int) -> list[str]:
    """Per stage, what its trainer does at `max_length`: rows dropped and cut per split, the rows it keeps, and
    the refusal it would give if a split were left empty."""
    lines = [f"at train.max_length={max_length}:"]
    for policy in policies:
        fates = stage_fates(data, lengths, policy, max_length)
        parts = []
        for split in SPLITS:
            if getattr(data, split):
                fate = fates[split]
                cut = f", cuts {fate.truncated}" if policy.truncates else ""
                parts.append(f"{split}: drops {len(fate.dropped)}{cut}, keeps {len(fate.kept)}")
        lines.append(f"  align {policy.stage}: " + "; ".join(parts) + f" ({policy.rule(max_length)})")
        error = nothing_left(data, fates, policy, max_length)
        if error is not None:
            lines.append(f"    would stop: {error}")
    return lines


def validation_report(data: LoadedData, tokenizer: Any, chat_template: str, max_length: int | None,
                      recipe: Any = None) -> tuple[list[str], DataError | None]:
    """`align data validate` beyond the card summary: `card_lines`; with a tokenizer, token lengths and (with a
    max_length) what each stage drops; with a recipe (whose chat template and max_length these are), where every
    row goes in its stage, and the refusal the stage itself would give (None when it would run)."""
    lines = card_lines(data)
    if tokenizer is None:
        return lines, None
    lengths = measure(data, length_counter(tokenizer, chat_template))
    lines += length_lines(data, lengths)
    if max_length:
        lines += drop_lines(data, lengths, stage_policies(data, recipe), max_length)
    policy = recipe_length_policy(recipe) if recipe is not None else None
    if policy is None or max_length is None:
        return lines, None
    try:
        used = apply_max_length(data, lengths, policy, max_length)
    except DataError as refusal:
        return lines, refusal
    return [*lines, f"as `align {policy.stage}` will record it: {accounting(used)}"], None
