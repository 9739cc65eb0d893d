"""The stage registry: every stage declares itself here once, and everything that needs to know what a stage is
(the CLI commands, recipe sections, `eval`'s "is this a policy", `export`, `report`, `bench`, the README's
command table, manifest validation) reads `STAGES`.

A stage is one module `align/stages/<name>.py` with `run(recipe, registry, *, resume, say)`, one entry below
(naming its metrics and manifest models, defined in `align/stages/outputs.py`) and one recipe section named
like it. This module imports neither an ML library nor pydantic, so `align --help` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from align.errors import ArtifactError

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.manifest import Manifest
    from align.recipe import Recipe

RowKind = Literal["sft", "preference", "prompts", "unpaired"]
Product = Literal["policy", "reward", "dataset"]


@dataclass(frozen=True)
class Stage:
    """What a stage is: its command and recipe section (`name`), the rows it reads, what it publishes."""

    name: str
    summary: str  # one line: the CLI help and the README's command table
    reads: RowKind
    produces: Product
    task_type: Literal["CAUSAL_LM", "SEQ_CLS"] | None  # of the adapter it trains; None: it trains none
    manifest_model: str  # the class in align.stages.outputs: its metrics and manifest (`manifest`)
    headline: tuple[str, ...]  # the metrics that say how a run went (bench tables); fields of its metrics model
    resumable: bool = True
    # The settings (in its section, first set one wins) that hold its pull towards the parent: the report
    # labels its reward-KL frontier points with them.
    kl_settings: tuple[str, ...] = ()
    # Accelerate distributed types it runs under (align.launch checks a recipe's preset and each launched rank),
    # and why it refuses the others.
    distributed: tuple[str, ...] = ("MULTI_GPU", "MULTI_CPU", "FSDP", "DEEPSPEED")
    distributed_note: str = ""

    @property
    def manifest(self) -> type[Manifest]:
        """The model of the manifest this stage publishes (imported on first use: pydantic models cost start-up)."""
        return getattr(importlib.import_module("align.stages.outputs"), self.manifest_model)

    @property
    def section(self) -> str:
        """The recipe section holding this stage's own settings (a field of `align.recipe.Recipe`)."""
        return self.name

    @property
    def sections(self) -> frozenset[str]:
        """The optional recipe sections this stage takes: its own, launch, and lora + train when it trains."""
        return frozenset({self.section, "launch", *(("lora", "train") if self.task_type else ())})

    def run(self, recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
        module = importlib.import_module(f"align.stages.{self.name}")
        return module.run(recipe, registry, resume=resume, say=say)


DATA_PARALLEL = ("MULTI_GPU", "MULTI_CPU")
PPO_SHARDING_NOTE = (
    "its rollouts decode with align's own loop, each rank its own prompts for its own number of steps, and its "
    "roles switch adapters between forward passes of one model; sharded parameters (FSDP, ZeRO-3) are gathered by "
    "collective calls in every forward, which ranks reach a different number of times, and a DeepSpeed engine "
    "owns the model's forward and optimizer step. Use ddp (every rank holds the whole model, one base shared by "
    "all four roles) or model.quantization to fit a larger model")

# ---- the registry -----------------------------------------------------------------------------------------

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("sft", "Supervised fine-tuning with LoRA: a data card of conversations -> a versioned adapter.",
          reads="sft", produces="policy", task_type="CAUSAL_LM", manifest_model="SftManifest",
          headline=("eval_loss_before", "eval_loss")),
    Stage("pairs", "Preference pairs: sample K replies per prompt from a policy, label them with a judge -> a "
          "versioned card.", reads="prompts", produces="dataset", task_type=None, manifest_model="PairsManifest",
          headline=("pairs_train", "pairs_eval", "judge_mean", "replies_per_second"),
          resumable=False, distributed=DATA_PARALLEL,
          distributed_note="it trains nothing: each rank samples its share of the prompts with a whole model"),
    Stage("reward", "Reward model with LoRA + score head on preference pairs -> a versioned reward adapter.",
          reads="preference", produces="reward", task_type="SEQ_CLS", manifest_model="RewardManifest",
          headline=("eval_accuracy_before", "eval_accuracy", "eval_pairs")),
    Stage("dpo", "Direct preference optimisation from an SFT artifact; the reference is the same model, adapter "
          "off.", reads="preference", produces="policy", task_type="CAUSAL_LM", manifest_model="DpoManifest",
          headline=("eval_reward_accuracy", "eval_reward_margin"), kl_settings=("beta",)),
    Stage("kto", "KTO (TRL) from an SFT artifact on thumbs-up/down rows (or pairs, split into both); the "
          "reference is the same model, adapter off.", reads="unpaired", produces="policy", task_type="CAUSAL_LM",
          manifest_model="KtoManifest", headline=("eval_reward_margin", "eval_kl"), kl_settings=("beta",)),
    Stage("orpo", "ORPO (TRL): odds-ratio preference optimisation from an SFT artifact, no reference model.",
          reads="preference", produces="policy", task_type="CAUSAL_LM", manifest_model="OrpoManifest",
          headline=("eval_reward_accuracy", "eval_reward_margin")),
    Stage("simpo", "SimPO (TRL's CPO trainer): length-normalised preference optimisation, no reference model.",
          reads="preference", produces="policy", task_type="CAUSAL_LM", manifest_model="SimpoManifest",
          headline=("eval_reward_accuracy", "eval_reward_margin")),
    Stage("ppo", "PPO from an SFT artifact with a reward artifact: policy, value and reward adapters on one base "
          "model.", reads="prompts", produces="policy", task_type="CAUSAL_LM", manifest_model="PpoManifest",
          headline=("eval_score_before", "eval_score", "kl_last"), kl_settings=("target_kl", "kl_coef"),
          distributed=DATA_PARALLEL, distributed_note=PPO_SHARDING_NOTE),
    Stage("grpo", "GRPO (TRL): group-relative policy optimisation with a reward artifact and/or a reward "
          "function.", reads="prompts", produces="policy", task_type="CAUSAL_LM", manifest_model="GrpoManifest",
          headline=("reward_first", "reward_last", "kl_last"), kl_settings=("beta",)),
    Stage("rloo", "RLOO (TRL): REINFORCE with a leave-one-out baseline, with a reward artifact and/or a reward "
          "function.", reads="prompts", produces="policy", task_type="CAUSAL_LM", manifest_model="RlooManifest",
          headline=("reward_first", "reward_last", "kl_last"), kl_settings=("beta",)),
)}


def stage_manifest(stage: str, source: str = "manifest") -> type[Manifest]:
    """The manifest model of `stage`; an ArtifactError naming `source` for a stage align does not know."""
    if stage not in STAGES:
        raise ArtifactError(f"{source}: field stage: '{stage}' is not a stage this align knows "
                            f"({', '.join(STAGES)})")
    return STAGES[stage].manifest


def stages_producing(product: Product) -> tuple[str, ...]:
    return tuple(name for name, stage in STAGES.items() if stage.produces == product)
