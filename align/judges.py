"""Independent scorers of (prompt, reply) pairs: for labelling preference pairs and for evaluation.

A judge is named by one string, the same in every recipe and command:
  `vader`                  VADER compound sentiment of the reply, in [-1, 1] (offline lexicon, MIT)
  `reward:NAME@vN`         a reward artifact's score
  `package.module:function` any callable `f(prompts: list[str], replies: list[str]) -> list[float]`
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from align.data import Message
from align.errors import AlignError

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.rewards import RewardModel

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


def _user_function(spec: str, near: Path | None) -> Callable[..., object]:
    """The callable `package.module:function` names, importable from the recipe's directory (`near`) and the
    working directory: the `align` console script, unlike `python -m`, puts neither on the import path."""
    module_name, _, attribute = spec.partition(":")
    for directory in (Path.cwd(), *([near] if near is not None else [])):
        if str(directory) not in sys.path:
            sys.path.insert(0, str(directory))  # kept: the function may import its siblings when called
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is the user's to fix
        where = f"{near} (the recipe's directory) or {Path.cwd()}" if near else str(Path.cwd())
        raise JudgeError(f"judge '{spec}': cannot import module '{module_name}' from {where}: {exc}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise JudgeError(f"judge '{spec}': module '{module_name}' has no callable '{attribute}'")
    return function


def _callable(spec: str, near: Path | None) -> JudgeFn:
    function = _user_function(spec, near)

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


def load_judge(spec: str, registry: Registry, near: Path | None = None) -> tuple[JudgeFn, Artifact | None]:
    """The judge named by `spec`, and the reward artifact behind it (for the manifest's parents) if any.
    `near`: the recipe's directory, where a `module:function` judge may live."""
    if spec == "vader":
        return _vader(), None
    if spec.startswith("reward:"):
        reward = _reward_judge(spec, registry)
        return reward.load(registry).score, reward.artifact
    if _is_python_spec(spec):
        return _callable(spec, near), None
    raise _unknown(spec)


def check_judge(spec: str, registry: Registry, near: Path | None = None) -> None:
    """Everything `load_judge` would refuse, without loading any weights (for `align recipe validate`)."""
    if spec == "vader":
        _vader()
    elif spec.startswith("reward:"):
        _reward_judge(spec, registry)
    elif _is_python_spec(spec):
        _user_function(spec, near)
    else:
        raise _unknown(spec)


def _reward_judge(spec: str, registry: Registry) -> RewardModel:
    from align.rewards import RewardModel

    return RewardModel.of(registry.resolve(spec[len("reward:"):]), f"judge '{spec}'")


def _is_python_spec(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


def _unknown(spec: str) -> JudgeError:
    return JudgeError(f"unknown judge '{spec}': use 'vader', 'reward:NAME@vN' or 'package.module:function'")
