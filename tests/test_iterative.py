"""Iterative (online) DPO with `make iterate`: round k samples pairs from round k-1's policy and trains from it,
so every round publishes, starts from the one before, and lineage shows them all."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

SMALL = {"ARGS_pairs": "--set data.limit=48 --set data.eval_limit=16 --set pairs.max_new_tokens=16",
         "ARGS_dpo": "--set train.max_steps=4"}


def make_iterate(registry: Path, rounds: int) -> subprocess.CompletedProcess:
    args = ["make", "--no-print-directory", "-C", str(REPO), "iterate", "RECIPES=recipes/tiny",
            f"REGISTRY={registry}", f"ROUNDS={rounds}", *(f"{key}={value}" for key, value in SMALL.items())]
    return subprocess.run(args, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def manifest(registry: Path, name: str) -> dict:
    return json.loads((registry / name / "v1" / "manifest.json").read_text())


@pytest.mark.slow
def test_two_rounds_each_publish_and_the_second_starts_from_the_first(tmp_path: Path, sft_registry: Path) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(sft_registry / "tiny-sft", registry / "tiny-sft")
    stamps = registry / ".stamps" / "recipes_tiny"
    stamps.mkdir(parents=True)
    (stamps / "sft.done").touch()  # round 1 starts from the copied SFT artifact
    result = make_iterate(registry, 2)
    assert result.returncode == 0, result.stderr[-3000:]

    first, second = manifest(registry, "tiny-dpo"), manifest(registry, "tiny-dpo-r2")
    assert [(p["role"], p["ref"]) for p in second["parents"]] == [("model", "tiny-dpo@v1"),
                                                                   ("data", "tiny-pairs-r2@v1")]
    # Round 2 merges round 1's chain and adapter first: its reference is round 1's policy.
    assert [entry["ref"] for entry in second["adapter_chain"]] == [
        *[entry["ref"] for entry in first["adapter_chain"]], "tiny-dpo@v1"]
    pairs = manifest(registry, "tiny-pairs-r2")
    assert pairs["parents"][0]["ref"] == "tiny-dpo@v1"  # round 2 samples from round 1's policy
    lineage = result.stdout[result.stdout.index("tiny-dpo-r2@v1 [dpo]"):]
    assert all(ref in lineage for ref in ("model: tiny-dpo@v1", "data: tiny-pairs-r2@v1", "model: tiny-sft@v")), \
        lineage

    again = make_iterate(registry, 2)  # incremental: nothing is re-run
    assert again.returncode == 0 and "align dpo" not in again.stdout and "align pairs" not in again.stdout
    assert sorted(p.name for p in registry.iterdir() if not p.name.startswith(".")) == [
        "tiny-dpo", "tiny-dpo-r2", "tiny-pairs", "tiny-pairs-r2", "tiny-sft"]
