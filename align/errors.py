"""The small family of errors a user can cause; the CLI maps them to exit codes in one place.

Anything that is not an `AlignError` is a bug in align and exits with 1 and a traceback.
"""

from __future__ import annotations


class AlignError(Exception):
    """A problem the user can fix (bad recipe, card, data, or reference): exit code 2, no traceback."""

    exit_code = 2


class RecipeError(AlignError):
    """The recipe file is unreadable, malformed, or fails validation."""


class DataError(AlignError):
    """A data card, a data file or a row in it is missing or malformed."""


class ArtifactError(AlignError):
    """An artifact reference does not resolve, or a registry directory is damaged."""


class ModelError(AlignError):
    """A base model cannot be found or loaded (bad path, hub id unreachable offline, bad GGUF)."""


class StageInterrupted(AlignError):
    """The run was stopped by a signal; checkpoints are kept for `--resume`, nothing was published."""

    exit_code = 143
