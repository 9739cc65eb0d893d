"""What rows look like to a person: a compact rendering of one row, and token-length percentiles of many.

Used by `align data preview` and `align data validate`; the tokenizer comes in as a callable so this stays free
of model imports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any


def token_length_percentiles(
    rows: Iterable[dict], count_tokens: Callable[[dict], int], percentiles: Iterable[int] = (50, 90, 99)
) -> dict:
    """Nearest-rank token-length percentiles plus max, mean and count; the tokenizer comes in as a callable."""
    lengths = sorted(count_tokens(row) for row in rows)
    n = len(lengths)
    out: dict[str, float | int] = {}
    for p in percentiles:
        out[f"p{p}"] = lengths[min(n - 1, max(0, -(-p * n // 100) - 1))] if n else 0
    out["max"] = lengths[-1] if n else 0
    out["mean"] = round(sum(lengths) / n, 1) if n else 0.0
    out["count"] = n
    return out


def _render(messages: list[Mapping[str, str]], max_chars: int) -> list[str]:
    lines = []
    for message in messages:
        text = message["content"].replace("\n", "\\n")
        if len(text) > max_chars:
            text = text[: max_chars - 1] + "…"
        lines.append(f"  [{message['role']}] {text}")
    return lines


def describe_row(row: Mapping[str, Any], max_chars: int = 200) -> str:
    """A compact multi-line rendering of a canonical row: the prompt, then the completion or CHOSEN / REJECTED."""
    lines = ["prompt:", *_render(row.get("prompt", []), max_chars)]
    for part, title in (("completion", "completion:"), ("chosen", "CHOSEN:"), ("rejected", "REJECTED:")):
        if part in row:
            lines += [title, *_render(row[part], max_chars)]
    return "\n".join(lines)
