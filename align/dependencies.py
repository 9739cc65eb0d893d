"""The files a recipe run reads, for `align recipe deps` (like `gcc -MD`): make re-runs a stage when one changes.

Artifact references (`from: NAME@latest`, `card: NAME@vN`) are not files here: they are upstream stages, which the
Makefile orders itself. A hub model is not a file either; its revision is in the recipe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from align.recipe import Recipe


def recipe_inputs(recipe: Recipe) -> list[Path]:
    """The recipe file, its data card and the card's files, and a local base model's files."""
    from align.data import card_files, is_artifact_ref, load_card
    from align.models import resolve_base

    files = [recipe.path]
    if not is_artifact_ref(recipe.data.card):
        card = load_card(recipe.relative_path(recipe.data.card))
        files += [card.path, *card_files(card)]
    if recipe.model.base is not None:
        base = resolve_base(recipe.model.base, recipe.path.parent, recipe.model.revision)
        if base.kind != "hub":
            root = Path(base.location)
            files += [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file())
    return files


def make_rule(target: str, files: list[Path]) -> str:
    """`target: files...` plus an empty rule per file, so a deleted prerequisite re-runs the stage instead of
    stopping make. Paths under the working directory are written relative to it, as make sees them."""
    names = [os.path.relpath(path) if str(path).startswith(os.getcwd()) else str(path) for path in files]
    return "\n".join([f"{target}: {' '.join(names)}", *(f"{name}:" for name in names)])
