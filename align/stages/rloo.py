"""`align rloo`: REINFORCE leave-one-out (Ahmadian et al. 2024) with TRL's RLOOTrainer, from an SFT artifact.

Steps: reward checked first (reward artifact, judge, whole groups per batch); prompt card; SFT artifact merged
into the base in memory; a fresh LoRA through `peft_config`, so the KL reference is the same model with the
adapter disabled; `num_generations` replies per prompt scored by `align.rewards`, each baselined by the mean
of the others in its group; publish the adapter with the reward artifact as a parent. `align eval` judges it.
"""

from __future__ import annotations

from typing import Any

from align.artifacts import Artifact, Registry
from align.recipe import Recipe
from align.stages import online


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one RLOO policy adapter. Returns the artifact on the main process, None elsewhere."""
    return online.train_and_publish(recipe, registry, resume=resume, say=say, trainer="RLOO",
                                     normalize_advantages=recipe.rloo.normalize_advantages)
