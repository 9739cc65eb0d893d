"""The parent's samples of `align eval`, sampled once per registry: `ROOT/.cache/samples/<key>.json`.

`align eval` compares a policy with its parent, and every policy trained from one parent (the demo's DPO and
PPO both start from its SFT) is compared with the same parent on the same prompts with the same seed: the
parent's samples, and the parent's own temperature-1 log-probs of them (the reference NLL of the parent side),
are the same numbers each time. They are cached here, keyed by everything that decides them:

- the parent's weights: the base model's recorded identity (file SHA-256s; a hub id and revision when it has no
  files) and, in order, the recorded SHA-256 of every file of each adapter of the chain merged into it (not
  their refs: two refs to the same bytes are one parent, one ref rewritten is another);
- the tokenizer the artifact reads with (vocabulary and rules, chat template, special ids);
- the prompts, in order, and the complete sampling config (chat template mode, max_new_tokens, temperature,
  top_p, seed, batch_size: batch composition changes padding and so the numbers; the stop ids);
- the compute: resolved precision and device type (which fixes the weight dtype);
- the code: align's, torch's, transformers' and peft's versions and the source of the modules that sample and
  score (an edited checkout must not reuse samples its old code drew).

Nothing that depends on the artifact's own adapter is cached. Entries are written atomically under a file lock,
so two evaluations running together sample the parent once and never see half a file; an entry that does not
read back whole and consistent is ignored and rewritten. `.cache` is not an artifact name (names start with a
letter or digit), so the registry's listing and `align artifacts verify` do not see it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from align import integrity
from align.hashing import sha256_file, sha256_json
from align.manifest import BaseIdentity, ChainEntry, Manifest
from align.records import Strict, write_atomic

if TYPE_CHECKING:
    from align.artifacts import Registry
    from align.generation import Sample

CACHE_DIR = Path(".cache") / "samples"
# Bumped when what an entry holds, or how its key is made, changes: older entries then simply miss.
FORMAT = 1
# The modules whose code decides the cached numbers: sampling, the reply log-probs, and model loading/projection.
CODE_MODULES = ("generation.py", "evaluate.py", "models.py")
CODE_PACKAGES = ("align", "torch", "transformers", "peft")


# ---- the key: pure functions of what decides the samples ---------------------------------------------------------


def cache_key(identity: dict[str, Any]) -> str:
    """SHA-256 of the identity's canonical JSON (sorted keys, no whitespace): equal identities, equal keys."""
    return sha256_json(identity)


def base_weights(base: BaseIdentity) -> dict[str, Any]:
    """What identifies a base model's weights: its files' names, sizes and SHA-256s. Where those are not all
    known (a hub id has no files; checkpoints over the hashing limit record sizes only) its location and
    revision stand in. Not its spec: `../models/x` and `/abs/models/x` are the same weights."""
    files = [[f.name, f.bytes, f.sha256] for f in base.files or []]
    known = base.files is not None and all(f.sha256 for f in base.files)
    identity: dict[str, Any] = {"kind": base.kind, "files": files, "trust_remote_code": base.trust_remote_code}
    if not known:
        identity |= {"location": base.location, "revision": base.revision}
    return identity


def adapter_files(files: dict[str, str]) -> dict[str, str]:
    """Of a version's recorded files (relative path -> SHA-256), those that make its adapter's weights: every file
    under `adapter/` but the model card PEFT writes there (prose, not weights)."""
    return {path: digest for path, digest in sorted(files.items())
            if path.startswith("adapter/") and path != "adapter/README.md"}


def parent_identity(*, base: BaseIdentity, chain: list[dict[str, str]], tokenizer: dict[str, Any],
                    prompts: list[Any], sampling: dict[str, Any], precision: str, device_type: str,
                    code: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides the parent's samples and their log-probs, as one JSON-able dict (`cache_key`'s
    input). `chain`: each merged adapter's `adapter_files`, oldest first. `prompts` enter as their hash."""
    return {
        "format": FORMAT,
        "model": {"base": base_weights(base), "chain": chain},
        "tokenizer": tokenizer,
        "prompts_sha256": sha256_json(prompts),
        "prompts": len(prompts),
        "sampling": sampling,
        "compute": {"precision": precision, "device": device_type},
        "code": code,
    }


# ---- reading the identity's parts from an artifact, a tokenizer and this installation -----------------------------


def chain_files(chain: list[ChainEntry], registry: Registry) -> list[dict[str, str]]:
    """Each chain adapter's `adapter_files`, from its version's manifest record; hashed from disk for a version
    written before file records (schema < 2). Stages check these sizes before loading (`integrity.check_loadable`);
    `align artifacts verify` checks the contents against the same records."""
    out = []
    for entry in chain:
        adapter_dir = integrity.chain_adapter_dir(entry, registry)
        recorded = Manifest.read(adapter_dir.parent).files
        if recorded is not None:
            out.append(adapter_files({path: record.sha256 for path, record in recorded.items()}))
        else:
            on_disk = {f"adapter/{p.relative_to(adapter_dir).as_posix()}": sha256_file(p)
                       for p in sorted(adapter_dir.rglob("*")) if p.is_file()}
            out.append(adapter_files(on_disk))
    return out


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What decides how the tokenizer encodes prompts and decodes replies: its class, its vocabulary and rules
    (the fast tokenizer's serialised pipeline, less the padding and truncation state calls leave on it), chat
    template and special ids. Not its files: a stage re-saving an unchanged tokenizer may write other bytes."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("padding", None)
        pipeline.pop("truncation", None)
        vocabulary = sha256_json(pipeline)
    else:
        vocabulary = sha256_json(sorted(tokenizer.get_vocab().items()))
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    return {"class": type(tokenizer).__name__, "vocabulary": vocabulary, "chat_template": tokenizer.chat_template,
            "special_ids": special,
            "clean_up_tokenization_spaces": getattr(tokenizer, "clean_up_tokenization_spaces", None)}


def code_identity() -> dict[str, Any]:
    """The installed versions of align and the libraries that sample, and the SHA-256 of the modules of align
    that do (a checkout edited without a version bump still misses)."""
    from align.artifacts import package_versions

    here = Path(__file__).parent
    return {"versions": package_versions(CODE_PACKAGES),
            "sources": {name: sha256_file(here / name) for name in CODE_MODULES}}


# ---- entries ------------------------------------------------------------------------------------------------------


class CachedSample(Strict):
    text: str
    prompt_ids: list[int]
    reply_ids: list[int]
    ended: bool


class CachedParent(Strict):
    """One cache entry: the parent's samples and its temperature-1 log-probs of each reply token."""

    format: int
    key: str
    created: str
    identity: dict[str, Any]  # what the key hashes, kept for whoever inspects the cache
    samples: list[CachedSample]
    ref_logprobs: list[list[float]]


def entry_path(root: Path, key: str) -> Path:
    return Path(root) / CACHE_DIR / f"{key}.json"


def consistent(entry: CachedParent, key: str, count: int) -> bool:
    """An entry is usable when it is of this format and key and holds `count` samples, each with one log-prob per
    reply token: anything else (an old format, a hand-edited file) is recomputed, never trusted."""
    return (entry.format == FORMAT and entry.key == key and len(entry.samples) == count
            and len(entry.ref_logprobs) == count
            and all(len(s.reply_ids) == len(lp) for s, lp in zip(entry.samples, entry.ref_logprobs, strict=True)))


def read_entry(path: Path, key: str, count: int) -> tuple[list[Sample], list[list[float]]] | None:
    """The samples and log-probs cached at `path`, or None when absent, unreadable, malformed or inconsistent."""
    from align.generation import Sample

    try:
        entry = CachedParent.model_validate_json(path.read_bytes())
    except (OSError, ValueError, ValidationError):
        return None
    if not consistent(entry, key, count):
        return None
    samples = [Sample(s.text, s.prompt_ids, s.reply_ids, s.ended) for s in entry.samples]
    return samples, entry.ref_logprobs


def write_entry(path: Path, key: str, identity: dict[str, Any], samples: list[Sample],
                ref_logprobs: list[list[float]]) -> None:
    """Write an entry atomically (temporary file, fsync, rename): a reader sees the old entry or the new one."""
    entry = CachedParent(format=FORMAT, key=key, created=datetime.now(UTC).isoformat(timespec="seconds"),
                         identity=identity, ref_logprobs=ref_logprobs,
                         samples=[CachedSample(text=s.text, prompt_ids=s.prompt_ids, reply_ids=s.reply_ids,
                                               ended=s.ended) for s in samples])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, entry.model_dump_json() + "\n")


@contextmanager
def locked(path: Path) -> Iterator[bool]:
    """Hold `path`'s lock (`<key>.json.lock`) while the entry is read or computed and written, so a second
    evaluation of the same parent waits and reads it instead of sampling it again. Yields False, holding
    nothing, when the lock cannot be created (a read-only registry): the caller then samples without the cache."""
    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{path}.lock")
        lock.acquire()
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
