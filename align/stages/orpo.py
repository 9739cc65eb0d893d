"""`align orpo`: odds-ratio preference optimisation (Hong et al. 2024) with TRL's experimental ORPOTrainer,
starting from an SFT artifact; no reference model (the chosen reply's NLL is what keeps the policy fluent).

The body (open replies, metrics before and after, publish) is `align.stages.reference_free`, shared with `simpo`.
"""

from __future__ import annotations

from typing import Any

from align.artifacts import Artifact, Registry
from align.recipe import Recipe
from align.stages import reference_free


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one ORPO policy adapter. Returns the artifact on the main process, None elsewhere."""
    return reference_free.run(recipe, registry, trainer="ORPOTrainer", config="ORPOConfig",
                              settings={"beta": recipe.orpo.beta}, say=say, resume=resume)
