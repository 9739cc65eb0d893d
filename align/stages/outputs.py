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
from align.recipe import (
    DpoSection,
    GrpoSection,
    KtoSection,
    OrpoSection,
    PairsSection,
    PpoSection,
    RlooSection,
    SimpoSection,
)
from align.records import Strict


class RowCounts(Metrics):
    """Every row a stage read, accounted for (`LoadedData.counts`): rows_read = train_rows + eval_rows (the rows
    used) + the sum of rows_dropped, by reason: malformed (on_malformed: skip), tie, filtered (the card's
    `where`), limit (data.limit / eval_limit), too_long (what the trainer drops at train.max_length). Null where a
    file from before schema 2 did not record it."""

    rows_read: int | None
    rows_dropped: dict[str, int] | None
    train_rows: int
    eval_rows: int

    @classmethod
    def migrate_v1(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        """Schema < 2 metrics with the row counts schema 2 added (unknown: null)."""
        return {"rows_read": None, "rows_dropped": None, **metrics}


class TrainedMetrics(RowCounts):
    """What every stage that trains an adapter with a TRL trainer records (`training.publish_adapter`);
    train_rows_truncated: train rows kept but cut at train.max_length (null when the stage has no max_length)."""

    train_loss: float | None
    train_runtime_s: float | None
    train_samples_per_second: float | None
    global_step: int
    train_rows_truncated: int | None

    @classmethod
    def migrate_v1(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"train_rows_truncated": None, **super().migrate_v1(metrics)}


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
    eval_accuracy_before: float | None  # None: not measured (reward.eval_before: false)

    @classmethod
    def migrate_v1(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        """Schema 1 counted pairs over max_length in their own fields and train/eval_rows before dropping them."""
        metrics = super().migrate_v1(metrics)
        train_dropped = metrics.pop("train_rows_dropped_too_long", 0) or 0
        eval_dropped = metrics.pop("eval_rows_too_long", 0) or 0
        metrics.pop("train_rows_used", None)
        for key, dropped in (("train_rows", train_dropped), ("eval_rows", eval_dropped)):
            if isinstance(metrics.get(key), int):
                metrics[key] -= dropped  # schema 2 counts the rows used
        metrics["train_rows_truncated"] = 0  # the reward stage drops long pairs, it never cuts them
        return metrics


class DpoMetrics(TrainedMetrics):
    eval_loss_before: float | None
    eval_loss: float | None
    eval_reward_accuracy: float | None
    eval_reward_margin: float | None
    eval_reward_chosen: float | None
    eval_reward_rejected: float | None
    open_replies: int

    @classmethod
    def migrate_v1(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        metrics = super().migrate_v1(metrics)
        metrics["train_rows_truncated"] = metrics.pop("train_rows_truncated_too_long", None)
        return metrics


class KtoMetrics(TrainedMetrics):
    """Rewards are beta x log-ratio to the reference on the eval rows; eval_kl is TRL's batch estimate of the
    policy's KL to the reference (mismatched prompt/reply pairs). train_pairs/eval_pairs: the preference pairs a
    paired card's rows were split from (each one desirable + one undesirable row), so rows_read = train_pairs +
    eval_pairs + the rows dropped; null for an unpaired card, whose rows_read counts its rows."""

    eval_loss_before: float | None
    eval_loss: float | None
    eval_reward_chosen: float | None
    eval_reward_rejected: float | None
    eval_reward_margin: float | None
    eval_kl: float | None
    open_replies: int
    train_desirable: int
    train_undesirable: int
    train_pairs: int | None
    eval_pairs: int | None


class ReferenceFreeMetrics(TrainedMetrics):
    """ORPO and SimPO: their rewards are the policy's own (scaled) log-probabilities, with no reference, so the
    accuracy before training is the starting model's preference and is measured, not assumed."""

    eval_loss_before: float | None
    eval_loss: float | None
    eval_reward_accuracy_before: float | None
    eval_reward_accuracy: float | None
    eval_reward_margin: float | None
    eval_reward_chosen: float | None
    eval_reward_rejected: float | None
    eval_nll_loss: float | None
    open_replies: int


class OrpoMetrics(ReferenceFreeMetrics):
    eval_log_odds_ratio: float | None


class SimpoMetrics(ReferenceFreeMetrics):
    pass


class OnlineMetrics(TrainedMetrics):
    """GRPO and RLOO (`stages.online.rollout_metrics`): KL per sequence is null when truncated replies are masked."""

    reward_first: float | None
    reward_last: float | None
    kl_last: float | None
    kl_per_token_last: float | None
    completion_length_last: float | None
    clipped_ratio_last: float | None


class PpoMetrics(RowCounts):
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
    models: Literal["shared", "separate"]
    weights_mib: float


class PairsMetrics(Metrics):
    rows_read: int | None  # prompt rows as RowCounts counts them: read = prompts_train + prompts_eval + dropped
    rows_dropped: dict[str, int] | None
    prompts_train: int
    prompts_eval: int

    @classmethod
    def migrate_v1(cls, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"rows_read": None, "rows_dropped": None, **metrics}

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


class CountedManifest(Manifest):
    """A stage manifest whose metrics count rows (schema 2): older files get their metrics' `migrate_v1`."""

    @classmethod
    def migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        data = super().migrate(data, version)
        metrics = cls.model_fields["metrics"].annotation
        if version < 2 and isinstance(data.get("metrics"), dict) and hasattr(metrics, "migrate_v1"):
            data["metrics"] = metrics.migrate_v1(dict(data["metrics"]))
        return data


class SftManifest(CountedManifest):
    stage: Literal["sft"]
    metrics: SftMetrics
    adapter: AdapterInfo


class RewardManifest(CountedManifest):
    stage: Literal["reward"]
    metrics: RewardMetrics
    adapter: RewardAdapterInfo


class DpoManifest(CountedManifest):
    stage: Literal["dpo"]
    metrics: DpoMetrics
    adapter: AdapterInfo
    dpo: DpoSection


class KtoManifest(CountedManifest):
    stage: Literal["kto"]
    metrics: KtoMetrics
    adapter: AdapterInfo
    kto: KtoSection


class OrpoManifest(CountedManifest):
    stage: Literal["orpo"]
    metrics: OrpoMetrics
    adapter: AdapterInfo
    orpo: OrpoSection


class SimpoManifest(CountedManifest):
    stage: Literal["simpo"]
    metrics: SimpoMetrics
    adapter: AdapterInfo
    simpo: SimpoSection


class PpoManifest(CountedManifest):
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


class OnlineManifest(CountedManifest):
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


class PairsManifest(CountedManifest):
    stage: Literal["pairs"]
    metrics: PairsMetrics
    pairs: PairsDetails
