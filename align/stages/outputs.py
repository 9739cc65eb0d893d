"""What each stage publishes, as typed models: its metrics and its manifest (the common part is
`align.manifest.Manifest`). Its registry entry in `align.stages` names its manifest model here; this module is
imported only when a manifest is read or written, so `align --help` does not build these models.
"""

from __future__ import annotations

from typing import Any, Literal

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
