"""Tokenise once: the rows a trainer stage hands to TRL, as an Arrow dataset on disk that TRL's own caching reuses.

TRL's trainers tokenise their datasets with `datasets.Dataset.map` (render the chat template, tokenise, build
labels, truncate, filter). `datasets` caches each map's result as an Arrow file next to the dataset's own file,
named by a fingerprint of the input dataset and of the function with its arguments, the tokenizer object (its
vocabulary, special tokens and chat template) and every TRL option it reads included. A dataset built in memory
has no file, so nothing was cached and every run tokenised again. `file_backed` writes the rows once under
`$ALIGN_CACHE/datasets/<key>/` and gives TRL that file-backed dataset: from the second run on, in any process,
TRL's maps find their results there (checked by tests/test_data_path.py), and DPO's precomputed reference
log-probs, which TRL caches the same way (keyed by the prepared dataset's fingerprint and a hash of the weights),
are not recomputed either when the same run is resumed or repeated.

What keys what. The directory: the rows exactly as TRL receives them (after the card's limits, split and
align's length drops, in TRL's conversational or plain-text form), and what the files TRL caches beside them
depend on beyond that: the compute precision and device type (reference log-probs from an fp32 run must not serve
a bf16 autocast one, whose weights hash the same on CPU) and the versions of the libraries that tokenise and
compute. Tokenizer, chat template, max_length and the stage's options are in the fingerprints of TRL's map calls.

Why the cache and not the registry: these files are derived, disposable and machine-local (memory-mapped), are
shared by every registry on the machine (tests make dozens), and the registry holds only published, checksummed
artifacts. `rm -rf $ALIGN_CACHE/datasets` is always safe between runs.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.hashing import sha256_json

LIBRARIES = ("datasets", "tokenizers", "transformers", "trl", "torch")
LAYOUT = 1  # bump when what a directory holds changes


@dataclass(frozen=True)
class DatasetCache:
    """Where file-backed datasets live and what, besides the rows, keys them (see the module docstring)."""

    root: Path
    context: dict[str, Any] = field(default_factory=dict)


def cache_key(rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    from align.artifacts import package_versions

    return sha256_json({"layout": LAYOUT, "rows": rows, "context": context,
                        "versions": package_versions(LIBRARIES)})[:32]


def file_backed(rows: list[dict[str, Any]], cache: DatasetCache) -> Any:
    """`Dataset.from_list(rows)`, backed by an Arrow file in the cache so that TRL's `map` calls are cached too.
    Empty rows, or a cache that cannot be written, give the in-memory dataset: slower next time, never wrong."""
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    if not rows:
        return dataset
    directory = cache.root / cache_key(rows, cache.context)
    try:
        opened = _open(directory)
        return opened if opened is not None else _write(dataset, directory)
    except OSError:
        return dataset


def _open(directory: Path) -> Any:
    """The dataset saved in `directory`, or None when there is none (a damaged entry is removed)."""
    from datasets import load_from_disk

    if not (directory / "state.json").is_file():
        return None
    try:
        return load_from_disk(str(directory))
    except (OSError, ValueError):  # files removed or truncated by hand: write it again
        shutil.rmtree(directory, ignore_errors=True)
        return None


def _write(dataset: Any, directory: Path) -> Any:
    """Save into a scratch directory and rename it into place: a reader never sees half a dataset, and when
    another process (another rank, a concurrent stage) got there first, its identical copy is used."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    scratch = directory.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        dataset.save_to_disk(str(scratch))
        try:
            os.rename(scratch, directory)
        except OSError:
            if not (directory / "state.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from datasets import load_from_disk

    return load_from_disk(str(directory))
