"""The stage registry: every stage declares itself here once, and everything that needs to know what a stage is
(the CLI commands, recipe sections, `eval`'s "is this a policy", `export`, `report`, `bench`, the README's
command table, manifest validation) reads `STAGES`.

A stage is one module `align/stages/<name>.py` with `run(recipe, registry, *, resume, say)`, one entry below
(with the metrics model and manifest model of what it publishes) and one recipe section named like it.
This module imports no ML library, so `align --help` and `align artifacts list` stay fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from align.errors import ArtifactError
from align.manifest import (
    AdapterInfo,
    BaseIdentity,
    Manifest,
    Metrics,
    Normalisation,
    RewardAdapterInfo,
    ValueAdapterInfo,
)
from align.recipe import DpoSection, GrpoSection, PairsSection, PpoSection, RlooSection
from align.records import Strict

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.recipe import Recipe

RowKind = Literal["sft", "preference", "prompts"]
Product = Literal["policy", "reward", "dataset"]


@dataclass(frozen=True)
class Stage:
    """What a stage is: its command and recipe section (`name`), the rows it reads, what it publishes."""

    name: str
    summary: str  # one line: the CLI help and the README's command table
    reads: RowKind
    produces: Product
    task_type: Literal["CAUSAL_LM", "SEQ_CLS"] | None  # of the adapter it trains; None: it trains none
    manifest: type[Manifest]
    headline: tuple[str, ...]  # the metrics that say how a run went (bench tables); fields of its metrics model
    resumable: bool = True
    # The settings (in its section, first set one wins) that hold its pull towards the parent: the report
    # labels its reward-KL frontier points with them.
    kl_settings: tuple[str, ...] = ()

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


# ---- what the stages publish ------------------------------------------------------------------------------


class TrainedMetrics(Metrics):
    """What every stage that trains an adapter with a TRL trainer records (`training.publish_adapter`)."""

    train_loss: float | None
    train_runtime_s: float | None
    train_samples_per_second: float | None
    global_step: int
    train_rows: int
    eval_rows: int


class SftMetrics(TrainedMetrics):
    eval_loss_before: float | None
    eval_loss: float | None
    perplexity_before: float | None
    perplexity: float | None


class RewardMetrics(TrainedMetrics):
    eval_accuracy: float
    eval_margin_mean: float
    eval_reward_mean: float
    eval_reward_std: float
    eval_pairs: int
    eval_accuracy_before: float
    eval_rows_too_long: int
    train_rows_dropped_too_long: int
    train_rows_used: int


class DpoMetrics(TrainedMetrics):
    eval_loss_before: float | None
    eval_loss: float | None
    eval_reward_accuracy: float | None
    eval_reward_margin: float | None
    eval_reward_chosen: float | None
    eval_reward_rejected: float | None
    open_replies: int
    train_rows_truncated_too_long: int


class OnlineMetrics(TrainedMetrics):
    """GRPO and RLOO (`stages.online.rollout_metrics`): KL per sequence is null when truncated replies are masked."""

    reward_first: float | None
    reward_last: float | None
    kl_last: float | None
    kl_per_token_last: float | None
    completion_length_last: float | None
    clipped_ratio_last: float | None


class PpoMetrics(Metrics):
    """Held-out replies scored before (the SFT model) and after; null where there is nothing to measure."""

    eval_reward_before: float | None
    eval_eos_fraction_before: float | None
    eval_response_length_before: float | None
    eval_score_before: float | None
    eval_reward: float | None
    eval_eos_fraction: float | None
    eval_response_length: float | None
    eval_score: float | None
    reward_first: float
    reward_last: float
    kl_last: float
    kl_per_token_last: float
    kl_coef_last: float
    entropy_last: float
    response_length_last: float
    global_step: int
    train_rows: int
    eval_rows: int
    models: Literal["shared", "separate"]
    weights_mib: float


class PairsMetrics(Metrics):
    prompts_train: int
    prompts_eval: int
    pairs_train: int
    pairs_eval: int
    judge_mean: float
    chosen_mean: float
    rejected_mean: float
    replies_truncated: int
    replies_truncated_fraction: float
    pairs_with_truncated: int
    pairs_dropped_truncated: int
    sampling_s: float
    replies_per_second: float


class OnlineReward(Strict):
    """The reward an online stage optimised (`rewards.RewardSpec.describe`)."""

    name: str
    reward_model: str | None
    normalisation: Normalisation | None
    reward_function: str | None
    reward_function_weight: float | None
    missing_eos_penalty: float | None


class PairsDetails(PairsSection):
    policy: str  # the ref (or base spec) that sampled the replies


class SftManifest(Manifest):
    stage: Literal["sft"]
    metrics: SftMetrics
    adapter: AdapterInfo


class RewardManifest(Manifest):
    stage: Literal["reward"]
    metrics: RewardMetrics
    adapter: RewardAdapterInfo


class DpoManifest(Manifest):
    stage: Literal["dpo"]
    metrics: DpoMetrics
    adapter: AdapterInfo
    dpo: DpoSection


class PpoManifest(Manifest):
    stage: Literal["ppo"]
    metrics: PpoMetrics
    adapter: ValueAdapterInfo
    ppo: PpoSection
    reward_model: BaseIdentity | None  # a plain model directory used as the reward (an artifact is a parent)

    @classmethod
    def migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        data = super().migrate(data, version)
        if version == 0:  # version 0 wrote these only when measured
            data.setdefault("reward_model", None)
            metrics = dict(data.get("metrics") or {})
            for key in PpoMetrics.model_fields:
                if key.startswith("eval_"):
                    metrics.setdefault(key, None)
            data["metrics"] = metrics
        return data


class OnlineManifest(Manifest):
    """GRPO and RLOO: the same outputs, each with its own settings section."""

    metrics: OnlineMetrics
    adapter: AdapterInfo
    online_reward: OnlineReward

    @classmethod
    def migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        data = super().migrate(data, version)
        if version == 0:  # version 0 wrote only the first four rollout metrics when TRL logged no reward
            data["metrics"] = {"completion_length_last": None, "clipped_ratio_last": None,
                               **(data.get("metrics") or {})}
        return data


class GrpoManifest(OnlineManifest):
    stage: Literal["grpo"]
    grpo: GrpoSection


class RlooManifest(OnlineManifest):
    stage: Literal["rloo"]
    rloo: RlooSection


class PairsManifest(Manifest):
    stage: Literal["pairs"]
    metrics: PairsMetrics
    pairs: PairsDetails


# ---- the registry -----------------------------------------------------------------------------------------

STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("sft", "Supervised fine-tuning with LoRA: a data card of conversations -> a versioned adapter.",
          reads="sft", produces="policy", task_type="CAUSAL_LM", manifest=SftManifest,
          headline=("eval_loss_before", "eval_loss")),
    Stage("pairs", "Preference pairs: sample K replies per prompt from a policy, label them with a judge -> a "
          "versioned card.", reads="prompts", produces="dataset", task_type=None, manifest=PairsManifest,
          headline=("pairs_train", "pairs_eval", "judge_mean", "replies_per_second"),
          resumable=False),
    Stage("reward", "Reward model with LoRA + score head on preference pairs -> a versioned reward adapter.",
          reads="preference", produces="reward", task_type="SEQ_CLS", manifest=RewardManifest,
          headline=("eval_accuracy_before", "eval_accuracy", "eval_pairs")),
    Stage("dpo", "Direct preference optimisation from an SFT artifact; the reference is the same model, adapter "
          "off.", reads="preference", produces="policy", task_type="CAUSAL_LM", manifest=DpoManifest,
          headline=("eval_reward_accuracy", "eval_reward_margin"), kl_settings=("beta",)),
    Stage("ppo", "PPO from an SFT artifact with a reward artifact: policy, value and reward adapters on one base "
          "model.", reads="prompts", produces="policy", task_type="CAUSAL_LM", manifest=PpoManifest,
          headline=("eval_score_before", "eval_score", "kl_last"), kl_settings=("target_kl", "kl_coef")),
    Stage("grpo", "GRPO (TRL): group-relative policy optimisation with a reward artifact and/or a reward "
          "function.", reads="prompts", produces="policy", task_type="CAUSAL_LM", manifest=GrpoManifest,
          headline=("reward_first", "reward_last", "kl_last"), kl_settings=("beta",)),
    Stage("rloo", "RLOO (TRL): REINFORCE with a leave-one-out baseline, with a reward artifact and/or a reward "
          "function.", reads="prompts", produces="policy", task_type="CAUSAL_LM", manifest=RlooManifest,
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
