"""Python-function objectives for `bench/frontier.py`, named as judges `bench.objectives:FUNCTION`.

A judge `package.module:function` is imported by align (align/judges.py), so the repository root must be on
PYTHONPATH (bench/frontier.py sets it for its subprocesses; `bench` is a namespace package, no __init__.py).
Each function is `f(prompts: list[str], replies: list[str]) -> list[float]`.
"""

from __future__ import annotations

import re

KEYWORD = "happy"
# Measured on tiny-sft (recipes/tiny/sft.yaml), 64 held-out story openings x 2 replies of 48 tokens at
# temperature 1: "happy" occurs in about 10% of replies (0.12 per reply): sometimes, not always, so pairs and
# group-relative advantages have contrast to learn from and there is room to rise.
_WORD = re.compile(rf"\b{KEYWORD}\b", re.IGNORECASE)


def keyword_count(prompts: list[str], replies: list[str]) -> list[float]:
    """How many times the reply says the whole word "happy" (any case); the prompt is not counted."""
    return [float(len(_WORD.findall(reply))) for reply in replies]
