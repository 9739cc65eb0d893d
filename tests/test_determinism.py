"""The same recipe and seed on CPU give the same artifact: the session's two tiny SFT runs (tiny-sft v1 and v2)
agree on every metric and every file, timestamps, durations and throughput figures aside."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from align.hashing import sha256_file

pytestmark = pytest.mark.slow

# What a clock decides: wall time, throughput, and when or how long.
TIMING = re.compile(r"runtime|per_second|_time$|duration|^created$")
# Files holding timing figures (compared field by field below); every other file must be byte-identical.
TIMED_FILES = {"manifest.json", "metrics.json", "log_history.json"}


def without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: without_timing(item) for key, item in value.items() if not TIMING.search(key)}
    if isinstance(value, list):
        return [without_timing(item) for item in value]
    return value


def file_hashes(artifact: Path) -> dict[str, str]:
    return {str(path.relative_to(artifact)): sha256_file(path) for path in sorted(artifact.rglob("*"))
            if path.is_file() and path.name not in TIMED_FILES}


def test_same_recipe_and_seed_give_identical_metrics_and_adapter(sft_registry: Path) -> None:
    first, second = sft_registry / "tiny-sft" / "v1", sft_registry / "tiny-sft" / "v2"
    hashes = file_hashes(first)
    assert "adapter/adapter_model.safetensors" in hashes and "samples.json" in hashes
    assert hashes == file_hashes(second)
    for name in ("metrics.json", "log_history.json"):
        assert without_timing(json.loads((first / name).read_text())) == \
            without_timing(json.loads((second / name).read_text())), name
    manifests = [json.loads((path / "manifest.json").read_text()) for path in (first, second)]
    for manifest in manifests:  # identity aside, so the rest of the manifest must match too
        for field in ("version", "ref"):
            manifest.pop(field)
        # The publish-time file record: timed files hash differently, every other file's record must match.
        manifest["files"] = {rel: record for rel, record in manifest["files"].items()
                             if Path(rel).name not in TIMED_FILES}
    assert without_timing(manifests[0]) == without_timing(manifests[1])
    assert manifests[0]["metrics"]["eval_loss"] < manifests[0]["metrics"]["eval_loss_before"]  # it did train
