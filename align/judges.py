"""Independent scorers of (prompt, reply) pairs: for labelling preference pairs and for evaluation.

A judge is named by one string, the same in every recipe and command:
  `vader`                  VADER compound sentiment of the reply, in [-1, 1] (offline lexicon, MIT)
  `reward:NAME@vN`         a reward artifact's score
  `package.module:function` any callable `f(prompts: list[str], replies: list[str]) -> list[float]`
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from align.data import Message
from align.errors import AlignError

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry

JudgeFn = Callable[[list[list[Message]], list[str]], list[float]]


class JudgeError(AlignError):
    """A judge that cannot be found, imported or called as documented."""


def _vader() -> JudgeFn:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise JudgeError("judge 'vader' needs the vaderSentiment package (pip install vaderSentiment)") from None
    analyzer = SentimentIntensityAnalyzer()

    def judge(prompts: list[list[Message]], replies: list[str]) -> list[float]:
        return [analyzer.polarity_scores(reply)["compound"] for reply in replies]

    return judge


def _callable(spec: str) -> JudgeFn:
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is the user's to fix
        raise JudgeError(f"judge '{spec}': cannot import module '{module_name}': {exc}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise JudgeError(f"judge '{spec}': module '{module_name}' has no callable '{attribute}'")

    def judge(prompts: list[list[Message]], replies: list[str]) -> list[float]:
        texts = [prompt[-1]["content"] for prompt in prompts]
        scores = function(texts, replies)
        try:
            values = [float(score) for score in scores]
        except (TypeError, ValueError):
            raise JudgeError(f"judge '{spec}' must return a list of numbers") from None
        if len(values) != len(replies):
            raise JudgeError(f"judge '{spec}' returned {len(values)} scores for {len(replies)} replies")
        return values

    return judge


def load_judge(spec: str, registry: Registry) -> tuple[JudgeFn, Artifact | None]:
    """The judge named by `spec`, and the reward artifact behind it (for the manifest's parents) if any."""
    if spec == "vader":
        return _vader(), None
    if spec.startswith("reward:"):
        from align.rewards import RewardModel

        artifact = registry.resolve(spec[len("reward:"):])
        return RewardModel.of(artifact, f"judge '{spec}'").load(registry).score, artifact
    if ":" in spec and not Path(spec).exists():
        return _callable(spec), None
    raise JudgeError(f"unknown judge '{spec}': use 'vader', 'reward:NAME@vN' or 'package.module:function'")
