"""`align export REF --merge OUT`: an artifact as a plain Hugging Face model directory, every adapter merged.

Serving stacks and users without PEFT or align load the result with `AutoModelForCausalLM` (policies) or
`AutoModelForSequenceClassification` (reward models); it is written next to OUT and renamed into place whole.
"""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from align.errors import ArtifactError
from align.manifest import BaseIdentity, ChainEntry, Normalisation
from align.records import Record, Strict
from align.stages import STAGES

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from align.artifacts import Artifact, Registry

EXPORT_FILE = "align_export.json"


class ExportSource(Strict):
    ref: str
    path: str
    stage: str
    created: str


class ExportRecord(Record):
    """`align_export.json`: what an exported directory is, for people and for `ppo.reward_model: DIR`.

    Schema history: version 0 had no `schema_version`; otherwise the same fields."""

    SCHEMA_VERSION: ClassVar[int] = 1

    schema_version: int
    source: ExportSource
    head: Literal["causal_lm", "score"]
    model_class: str
    dtype: str
    base_model: BaseIdentity
    adapter_chain: list[ChainEntry]
    # How inputs were formatted in training ("none": plain text), since the tokenizer may carry a template anyway.
    chat_template: str | None
    # A reward model's score statistics on its eval pairs, so `ppo.reward_model: DIR` normalises as the
    # artifact would (None for policies).
    normalisation: Normalisation | None
    # Everything folded into the weights, oldest first: the chain, then the artifact's own adapter.
    merged_adapters: list[str]
    exported: str
    packages: dict[str, str | None]

    @classmethod
    def of(cls, directory: Path) -> ExportRecord | None:
        """The record beside an exported model directory, None for a directory `align export` did not write."""
        path = Path(directory) / EXPORT_FILE
        return cls.read(path) if path.is_file() else None


def export_merged(artifact: Artifact, registry: Registry, out: Path, *, force: bool = False) -> Path:
    """Write `artifact` (its base, its adapter chain and its own adapter, all merged) to the directory `out`.

    Refuses an artifact without an adapter and an existing non-empty `out` (unless `force`); `out` only ever
    holds a complete export: the new one replaces the old one after it is fully written. Returns `out`.
    """
    out = Path(out).expanduser().absolute()
    _check_exportable(artifact)
    _check_target(out, artifact, registry, force)
    # A sibling, so the final rename stays on one filesystem and is atomic; hidden, so nobody mistakes it for OUT.
    scratch = out.parent / f".{out.name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        scratch.mkdir()
    except OSError as exc:
        raise ArtifactError(f"--merge {out}: cannot create a directory next to it: {exc.strerror or exc}") from None
    try:
        _write_export(artifact, registry, scratch)
        _move_into_place(scratch, out)
    except BaseException:  # KeyboardInterrupt too: a half-written export must not linger
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return out


def _check_exportable(artifact: Artifact) -> None:
    if not (artifact.adapter_path / "adapter_config.json").is_file():
        raise ArtifactError(f"{artifact.ref} is a {artifact.manifest.stage} artifact with no adapter "
                            f"({artifact.adapter_path} is missing); only trained models can be exported")


def _check_target(out: Path, artifact: Artifact, registry: Registry, force: bool) -> None:
    """Refuse an OUT that would lose data: a file, a non-empty directory without --force, or a place where
    --force would delete the artifact, the registry or the base model it is built from."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--merge {out}: is a file, not a directory; choose a directory path")
    base = artifact.manifest.base_model
    sources = [artifact.path.resolve()]
    if base.kind == "local":
        sources.append(Path(base.location).resolve())
    real = out.resolve()
    # Replacing OUT deletes everything under it; writing inside a source would change what it holds.
    for path in [*sources, registry.root.resolve()]:
        if path.is_relative_to(real) or (path in sources and real.is_relative_to(path)):
            raise ArtifactError(f"--merge {out}: overlaps {path}, which the export reads from; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ArtifactError(f"--merge {out}: directory exists and is not empty; pass --force to replace it")


def _write_export(artifact: Artifact, registry: Registry, target: Path) -> None:
    """Merge, then save weights, tokenizer, generation config and provenance into the empty dir `target`."""
    # A reward adapter carries a scalar score head instead of a language-model head.
    head = "score" if STAGES[artifact.manifest.stage].produces == "reward" else "causal_lm"
    model, tokenizer = _merged_model(artifact, registry, head)
    _align_special_tokens(model, tokenizer, head)
    model.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    if head == "causal_lm" and not (target / "generation_config.json").exists():
        # save_pretrained writes it for models that can generate; make sure, as serving stacks read it for stop ids.
        # (A sequence classifier gets none: it cannot generate, so one would only mislead.)
        model.generation_config.save_pretrained(str(target))
    _provenance(artifact, model, head).write(target / EXPORT_FILE)


def _merged_model(artifact: Artifact, registry: Registry, head: str
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The artifact's model exactly as align loads it (base + merged chain + own adapter), own adapter merged.
    An artifact trained on a 4/8-bit base (QLoRA) is merged into that base dequantised: the weights its adapter
    was trained against, written in their compute dtype (merging into the 4-bit weights would re-quantise the
    adapter's small updates away)."""
    from align.models import load_artifact_model

    dtype = _trained_dtype(artifact)
    # The score head (saved through modules_to_save) comes back with the adapter, and pad_token_id is set.
    peft_model, _ = load_artifact_model(artifact, registry, dtype, head=head, dequantize=True)
    # merge_and_unload also swaps each modules_to_save wrapper (the score head) for its trained copy.
    return peft_model.merge_and_unload(), _artifact_tokenizer(artifact)


def _trained_dtype(artifact: Artifact) -> Any:
    """The dtype of the weights the adapter was trained against, so the merged weights are the ones it saw:
    on CPU fp32 whatever the precision (bf16 there is autocast over fp32 weights), on GPUs the precision;
    'auto' (or an older manifest) keeps the base's stored dtype."""
    from align.models import weight_dtype

    precision = (artifact.manifest.recipe.get("train") or {}).get("precision")
    return weight_dtype(precision, artifact.manifest.device.type) if precision in ("fp32", "bf16", "fp16") else None


def _artifact_tokenizer(artifact: Artifact) -> PreTrainedTokenizerBase:
    """The tokenizer saved at the artifact root, as trained: 'none' adds no chat template, where the 'auto' of
    load_artifact_model would add align's default one to a tokenizer trained without any."""
    from align.models import BaseModelSpec, load_tokenizer

    return load_tokenizer(BaseModelSpec.from_manifest(artifact.manifest.base_model), "none", saved_in=artifact.path)


def _align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, head: str) -> None:
    """Make config and generation config agree with the tokenizer: align pads with unk/eos when the base has no
    pad token, and generate() needs pad/eos to stop and to batch."""
    from transformers import GenerationConfig

    model.config.pad_token_id = tokenizer.pad_token_id
    if head != "causal_lm":
        return
    if getattr(model, "generation_config", None) is None:  # the base shipped none: derive it from its config
        model.generation_config = GenerationConfig.from_model_config(model.config)
    generation = model.generation_config
    generation.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    eos = generation.eos_token_id
    # Keep extra stop ids the base declares (e.g. end-of-turn tokens) but always stop at the tokenizer's EOS,
    # which align's chat template puts after every turn.
    eos_ids = [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.insert(0, tokenizer.eos_token_id)
    generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids or None


def _provenance(artifact: Artifact, model: PreTrainedModel, head: Literal["causal_lm", "score"]) -> ExportRecord:
    """What `align_export.json` records: enough to trace the merged weights back to the registry."""
    from align.artifacts import package_versions
    from align.models import adapter_chain

    manifest = artifact.manifest
    adapter = getattr(manifest, "adapter", None)
    return ExportRecord(
        schema_version=ExportRecord.SCHEMA_VERSION,
        source=ExportSource(ref=artifact.ref, path=str(artifact.path), stage=manifest.stage, created=manifest.created),
        head=head, model_class=type(model).__name__,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        base_model=manifest.base_model, adapter_chain=manifest.adapter_chain,
        chat_template=adapter.chat_template if adapter else None,
        normalisation=getattr(adapter, "normalisation", None),
        merged_adapters=[entry.ref for entry in adapter_chain(artifact)],
        exported=datetime.now(UTC).isoformat(timespec="seconds"), packages=package_versions())


def _move_into_place(scratch: Path, out: Path) -> None:
    """Rename the finished export to `out`; an old `out` is set aside first and deleted only after the swap."""
    if not out.exists():
        os.rename(scratch, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(scratch, out)
    except BaseException:
        os.rename(old, out)  # put the previous export back rather than leave nothing
        raise
    shutil.rmtree(old, ignore_errors=True)
