"""`eval.json`: what `align eval` writes beside an artifact, as typed models (read by compare, report, bench).

Schema history: version 0 (no `schema_version`) wrote the reward fields (`reward`, `reward_stderr`,
`reward_delta`, `reward_delta_stderr`) only when a reward model was given; they read as null. Version 2 adds
`settings.precision` (the resolved one) and `parent_samples_cached` / `parent_samples_key`; older files read as
precision `auto` (then: the checkpoint's own dtype, no autocast — fp32 on every CPU run) and not cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from align.records import Record, Strict

EVAL_FILE = "eval.json"


class EvalSettings(Strict):
    """How `align eval` sampled and judged: the same for the artifact and its parent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    card: str
    split: Literal["train", "eval"] = "eval"
    limit: int | None = Field(64, gt=0)
    num_samples: int = Field(4, gt=0)
    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(32, gt=0)
    judge: str = "vader"
    reward: str | None = None
    # What `align eval --precision` asked for; eval.json records the one it resolved to (never `auto` since v2).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class EvalSide(Strict):
    """One model's samples: judge and reward means with stderrs clustered by prompt, and the fluency guards."""

    judge: float
    judge_stderr: float
    length_tokens: float
    distinct_2: float
    ref_nll_per_token: float
    truncated_share: float
    reward: float | None
    reward_stderr: float | None


class EvalExample(Strict):
    prompt: str
    parent: str
    artifact: str
    judge_parent: float
    judge_artifact: float


class EvalResult(Record):
    """The artifact against its parent on the same prompts and sampling seed."""

    SCHEMA_VERSION: ClassVar[int] = 2

    schema_version: int
    artifact: str
    parent: str
    settings: EvalSettings
    prompts: int
    samples: int
    policy: EvalSide
    parent_model: EvalSide
    judge_delta: float
    judge_delta_stderr: float
    reward_delta: float | None
    reward_delta_stderr: float | None
    # KL(policy || parent) at the sampling temperature; all null, with kl_note saying why, when not measured.
    kl: float | None
    kl_stderr: float | None
    kl_per_token: float | None
    kl_note: str | None
    ref_nll_rise: float
    win_rate: float
    win_rate_stderr: float
    win_rate_by: str
    # The parent's samples (and its log-probs of them) were read from the registry's sample cache, under this key
    # (`align.sample_cache`); key null when the cache was bypassed (`--no-cache`) or could not be written.
    parent_samples_cached: bool = False
    parent_samples_key: str | None = None
    examples: list[EvalExample]

    @classmethod
    def migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version == 0:
            data.setdefault("reward_delta", None)
            data.setdefault("reward_delta_stderr", None)
            for side in ("policy", "parent_model"):
                if isinstance(data.get(side), dict):
                    data[side] = {"reward": None, "reward_stderr": None, **data[side]}
        if version < 2:
            if isinstance(data.get("settings"), dict):
                data["settings"] = {"precision": "auto", **data["settings"]}
            data.setdefault("parent_samples_cached", False)
            data.setdefault("parent_samples_key", None)
        return data

    @classmethod
    def of(cls, artifact_dir: Path) -> EvalResult | None:
        """The eval result stored in an artifact directory, None when it was never evaluated."""
        path = Path(artifact_dir) / EVAL_FILE
        return cls.read(path) if path.is_file() else None
