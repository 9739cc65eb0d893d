"""`align sft` end to end on the real stories260K model: versions, manifests, lineage, chaining, efficacy,
interruption and resume. Every run is a real CLI subprocess."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, TINY_SFT

from align.hashing import sha256_file
from align.manifest import Manifest

pytestmark = pytest.mark.slow


def manifest(registry: Path, name: str, version: int) -> dict:
    return json.loads((registry / name / f"v{version}" / "manifest.json").read_text())


def test_two_runs_publish_v1_then_v2_with_complete_manifests(sft_registry: Path) -> None:
    versions = sorted(p.name for p in (sft_registry / "tiny-sft").glob("v*"))
    assert versions == ["v1", "v2"]
    for version in (1, 2):
        m = manifest(sft_registry, "tiny-sft", version)
        assert set(Manifest.model_fields) <= set(m)
        assert (m["name"], m["version"], m["ref"], m["stage"]) == ("tiny-sft", version, f"tiny-sft@v{version}", "sft")
        data_file = REPO / "data_cards" / "demo" / "sft.jsonl"
        assert m["data"][0]["files"] == [{"path": str(data_file), "sha256": sha256_file(data_file)}]
        assert m["base_model"]["kind"] == "local" and all(f["sha256"] for f in m["base_model"]["files"])
        assert m["recipe"]["train"]["precision"] == "fp32" and m["recipe"]["train"]["activation_checkpointing"] is False
        assert m["packages"]["torch"] and m["packages"]["trl"] and m["parents"] == []
        artifact = sft_registry / "tiny-sft" / f"v{version}"
        assert (artifact / "adapter" / "adapter_model.safetensors").is_file()
        assert (artifact / "tokenizer.json").is_file()
        samples = json.loads((artifact / "samples.json").read_text())
        assert len(samples) == 2 and all(s["before"] != s["after"] for s in samples)
    # Same recipe, same data, same seed: the runs are reproducible, so their recipe hashes and losses agree.
    first, second = manifest(sft_registry, "tiny-sft", 1), manifest(sft_registry, "tiny-sft", 2)
    assert first["recipe_sha256"] == second["recipe_sha256"]
    assert first["metrics"]["eval_loss"] == pytest.approx(second["metrics"]["eval_loss"], rel=1e-4)


def test_sft_lowers_held_out_loss(sft_registry: Path) -> None:
    metrics = manifest(sft_registry, "tiny-sft", 1)["metrics"]
    assert metrics["eval_rows"] == 32
    assert metrics["eval_loss"] < 0.7 * metrics["eval_loss_before"], metrics
    assert metrics["perplexity"] < metrics["perplexity_before"]


def test_artifacts_commands(sft_registry: Path, run_align: Callable) -> None:
    listing = run_align("artifacts", "list", "--registry", sft_registry)
    assert listing.returncode == 0 and "tiny-sft@v1" in listing.stdout and "tiny-sft@v2" in listing.stdout
    shown = run_align("artifacts", "show", "tiny-sft@latest", "--registry", sft_registry)
    assert json.loads(shown.stdout)["version"] == 2
    missing = run_align("artifacts", "show", "tiny-sft@v9", "--registry", sft_registry)
    assert missing.returncode == 2 and "v1" in missing.stderr and "Traceback" not in missing.stderr


def test_recipe_from_an_artifact_continues_it(sft_registry: Path, run_align: Callable, tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    text = TINY_SFT.read_text().replace("name: tiny-sft", "name: tiny-sft-more")
    text = text.replace("  base: ../../../shared/models/stories260K", "  from: tiny-sft@v1")
    child.write_text(text.replace("card: ../../data_cards/", f"card: {REPO}/data_cards/"))
    result = run_align("sft", child, "--registry", sft_registry, "--set", "train.max_steps=10")
    assert result.returncode == 0, result.stderr[-3000:]
    m = manifest(sft_registry, "tiny-sft-more", 1)
    assert [(p["role"], p["ref"]) for p in m["parents"]] == [("model", "tiny-sft@v1")]
    assert [entry["ref"] for entry in m["adapter_chain"]] == ["tiny-sft@v1"]
    # The child starts exactly where the parent ended: its loss before training is the parent's loss after.
    parent = manifest(sft_registry, "tiny-sft", 1)["metrics"]
    assert m["metrics"]["eval_loss_before"] == pytest.approx(parent["eval_loss"], abs=1e-4)

    lineage = run_align("artifacts", "lineage", "tiny-sft-more@latest", "--registry", sft_registry)
    assert lineage.returncode == 0, lineage.stderr
    lines = lineage.stdout.splitlines()
    assert "tiny-sft-more@v1" in lines[0] and any("model: tiny-sft@v1" in line for line in lines[1:])

