"""`align simpo`: simple preference optimisation (Meng et al. 2024) with TRL's experimental CPOTrainer and its
`loss_type="simpo"`, starting from an SFT artifact; no reference model: the reward is the policy's average
log-probability of a reply, scaled by beta, and the loss asks the chosen one to beat the rejected by gamma.

`simpo.cpo_alpha > 0` adds CPO's NLL term on the chosen reply (CPO-SimPO). The body (open replies, metrics
before and after, publish) is `align.stages.reference_free`, shared with `orpo`.
"""

from __future__ import annotations

from typing import Any

from align.artifacts import Artifact, Registry
from align.recipe import Recipe
from align.stages import reference_free


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Train and publish one SimPO policy adapter. Returns the artifact on the main process, None elsewhere."""
    settings = recipe.simpo
    return reference_free.run(recipe, registry, trainer="CPOTrainer", config="CPOConfig",
                              settings={"loss_type": "simpo", "beta": settings.beta, "simpo_gamma": settings.gamma,
                                        "cpo_alpha": settings.cpo_alpha}, say=say, resume=resume)
