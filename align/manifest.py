"""The manifest every artifact carries (`NAME/vN/manifest.json`), as typed models.

`Manifest` holds what every stage records (where the weights came from, parents, data, recipe, device,
packages, git, duration); each stage's own subclass (in `align.stages.outputs`, named by its registry entry) adds its
metrics model and its details (`adapter`, its settings section). Stages build one and the registry writes it;
everything that reads an artifact gets it back validated, through `Manifest.read`.

Schema history: version 0 (no `schema_version`, written before typed manifests) lacks `adapter.max_length`
(the reward reading length, then only in `recipe.train.max_length`) and may lack metrics that were only
written when measured (they read as null). Version 2 adds `files`, the size and SHA-256 of every file the
artifact was published with (`align artifacts verify`); versions 0 and 1 read with `files: null` (no record).
Version 2 also changed the stages' row counts (see `align.stages.outputs`). Version 3 adds `launch`; version 4
adds `quantization` (the 4/8-bit base of a QLoRA run); older versions read with null (not recorded / plain base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from align.errors import ArtifactError
from align.records import Record, Strict, load_json
from align.stages import stage_manifest

MANIFEST_FILE = "manifest.json"


class BaseFile(Strict):
    name: str
    bytes: int
    sha256: str | None


class BaseIdentity(Strict):
    """A base model as recorded: enough to reload it and to tell whether it changed."""

    spec: str
    kind: Literal["local", "hub", "gguf"]
    location: str
    revision: str | None
    trust_remote_code: bool
    files: list[BaseFile] | None  # None for a hub id (not hashed)


class ChainEntry(Strict):
    """One adapter merged into the base to rebuild a starting model."""

    ref: str
    path: str


class ParentEntry(Strict):
    """An artifact this one was built from, as `role` (model, data, reward, judge, reward_function)."""

    role: str
    ref: str
    name: str
    version: int
    path: str
    manifest_sha256: str


class DataFile(Strict):
    path: str
    sha256: str


class SplitCounts(Strict):
    train: int
    eval: int


class DataSummary(Strict):
    """A data card as a stage read it: counts and hashes of every file."""

    name: str
    card: str
    card_sha256: str
    format: str
    rows: SplitCounts
    rejected: int
    dropped: int
    files: list[DataFile]


class Device(Strict):
    type: Literal["cpu", "cuda"]
    name: str
    bf16: bool


class GitState(Strict):
    commit: str | None
    dirty: bool | None


class Normalisation(Strict):
    """Mean and std of a reward model's scores on its eval pairs (what online stages standardise with)."""

    mean: float
    std: float


class AdapterInfo(Strict):
    """The LoRA adapter a trained stage published under `adapter/`, and how its model reads text."""

    task_type: Literal["CAUSAL_LM", "SEQ_CLS"]
    r: int
    lora_alpha: float
    target_modules: str | list[str]
    chat_template: Literal["auto", "default", "none"]
    max_length: int = Field(description="train.max_length: the tokens the model was trained to read")


class RewardAdapterInfo(AdapterInfo):
    score_head: str
    normalisation: Normalisation | None  # null: no statistics recorded (online stages then need normalize_reward off)


class ValueAdapterInfo(AdapterInfo):
    value: str  # where the PPO value adapter and head are


class LaunchRecord(Strict):
    """How the run was launched (align.launch): the preset or own config, the distributed type its ranks ran
    under (Accelerate's names: NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED) and the machines; world_size beside."""

    preset: str | None  # None: one process, or the recipe's own accelerate_config
    accelerate_config: str | None  # the resolved config's file in the artifact; None: one plain process
    distributed_type: str
    num_machines: int


class QuantizationRecord(Strict):
    """The quantised base an adapter was trained on (`model.quantization`, `align.quantization`): every later load
    of the artifact (eval, reward scoring, export) rebuilds these weights. 4-bit fields are None for 8-bit."""

    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] | None
    compute_dtype: Literal["bf16", "fp16", "fp32"] | None  # resolved: never "auto"
    double_quant: bool | None
    bitsandbytes: str | None  # the version that quantised it


class FileRecord(Strict):
    """One file as it was written: what `align artifacts verify` re-hashes and stages check the size of."""

    sha256: str
    size: int


class Metrics(Strict):
    """A stage's metrics; each stage declares its own subclass (`align.stages.outputs`)."""


class Manifest(Record):
    """What every artifact records. Subclasses fix `stage` to one value and add their metrics and details."""

    SCHEMA_VERSION: ClassVar[int] = 4

    schema_version: int
    name: str
    version: int
    ref: str
    created: str
    stage: str
    base_model: BaseIdentity
    adapter_chain: list[ChainEntry]
    parents: list[ParentEntry]
    data: list[DataSummary]
    recipe: dict[str, Any]  # the recipe as run, every default filled (its own contract is align.recipe.Recipe)
    recipe_path: str
    recipe_overrides: list[str]
    recipe_sha256: str
    seed: int
    metrics: Metrics
    device: Device
    world_size: int
    launch: LaunchRecord | None  # None: written before schema 3, not recorded
    quantization: QuantizationRecord | None  # None: trained on a plain base (or written before schema 4)
    resumed_from: str | None
    packages: dict[str, str | None]
    python: str
    git: GitState
    duration_s: float
    # Every file of the version directory at publish (relative POSIX path -> record), manifest.json excepted;
    # None: written before schema 2, nothing recorded. Files added later have their own record (`integrity`).
    files: dict[str, FileRecord] | None

    @classmethod
    def migrate(cls, data: dict[str, Any], version: int) -> dict[str, Any]:
        if version < 4:
            data.setdefault("quantization", None)
        if version < 3:
            data.setdefault("launch", None)
        if version < 2:
            data.setdefault("files", None)
        if version == 0 and isinstance(data.get("adapter"), dict) and "max_length" not in data["adapter"]:
            train = (data.get("recipe") or {}).get("train") or {}
            data["adapter"] = {**data["adapter"], "max_length": train.get("max_length")}
        return data

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """Read and validate a manifest (given the file or its artifact directory) as its stage's model."""
        path = Path(path)
        file = path / MANIFEST_FILE if path.is_dir() else path
        if not file.is_file():
            raise ArtifactError(f"{file}: manifest not found (not an artifact directory?)")
        return cls.parse(load_json(file), str(file))

    @classmethod
    def parse(cls, data: Any, source: str) -> Manifest:
        """`Manifest.parse` dispatches on `stage` to the stage's own model; a stage's model parses itself."""
        if cls is not Manifest:
            return super().parse(data, source)
        stage = data.get("stage") if isinstance(data, dict) else None
        if not isinstance(stage, str):
            raise ArtifactError(f"{source}: field stage: missing or not a string")
        return stage_manifest(stage, source).parse(data, source)

    @property
    def started_from(self) -> str:
        """The ref of the model this artifact started from, or its base model's spec."""
        return self.adapter_chain[-1].ref if self.adapter_chain else self.base_model.spec
