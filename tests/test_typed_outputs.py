"""Typed outputs: every manifest and eval.json the suite's tiny chain wrote reads back strictly through its model,
files written before typed outputs (version 0) still read, and a damaged manifest is one clear error (exit 2)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from align.errors import ArtifactError
from align.eval_result import EvalResult
from align.manifest import Manifest
from align.stages import STAGES

FIXTURES = Path(__file__).parent / "fixtures" / "v0"


def test_every_output_of_the_suite_validates_strictly(dpo_artifact: Path, reward_artifact: Path, sft_registry: Path,
                                                      run_align: Callable, tmp_path: Path) -> None:
    # One evaluation made here (in a copy, so the session's artifacts stay as other tests left them), beside
    # everything published into the session registry so far: the shared chain, plus what earlier test files
    # trained and evaluated there in a full run (ppo, grpo, rloo).
    copy = tmp_path / "registry"
    shutil.copytree(sft_registry, copy, ignore=shutil.ignore_patterns(".runs"))
    result = run_align("eval", "tiny-dpo@v1", "--data", "data_cards/tiny-story-prompts.yaml", "--limit", "2",
                       "--num-samples", "1", "--max-new-tokens", "8", "--reward", "tiny-rm@v1", "--registry", copy)
    assert result.returncode == 0, result.stderr[-2000:]
    manifests = sorted(sft_registry.glob("*/v[0-9]*/manifest.json"))
    stages = set()
    for path in manifests:
        raw = json.loads(path.read_text())
        assert raw["schema_version"] == Manifest.SCHEMA_VERSION, path  # written by today's code: no migration
        manifest = Manifest.read(path)
        assert type(manifest) is STAGES[raw["stage"]].manifest
        assert manifest.model_dump(mode="json") == raw  # nothing dropped, nothing added
        stages.add(manifest.stage)
    assert {"sft", "pairs", "reward", "dpo"} <= stages, stages
    evals = [*sorted(sft_registry.glob("*/v[0-9]*/eval.json")), copy / "tiny-dpo" / "v1" / "eval.json"]
    for path in evals:
        raw = json.loads(path.read_text())
        assert EvalResult.read(path).model_dump(mode="json") == raw, path


@pytest.mark.parametrize("stage", sorted(p.name.split(".")[0] for p in FIXTURES.glob("*.manifest.json")))
def test_version_0_manifests_still_read(stage: str) -> None:
    """Manifests written by the code before typed outputs (the tiny chain's, kept under tests/fixtures/v0)."""
    path = FIXTURES / f"{stage}.manifest.json"
    assert "schema_version" not in json.loads(path.read_text())
    manifest = Manifest.read(path)
    assert manifest.stage == stage and manifest.schema_version == Manifest.SCHEMA_VERSION
    if hasattr(manifest, "adapter"):  # version 0 kept the reading length only in the recipe
        assert manifest.adapter.max_length == manifest.recipe["train"]["max_length"]


def test_version_0_eval_result_still_reads() -> None:
    result = EvalResult.read(FIXTURES / "eval.json")
    assert result.policy.reward is not None and result.settings.judge == "vader"


def test_a_newer_schema_is_refused_by_name(tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "sft.manifest.json").read_text())
    data["schema_version"] = Manifest.SCHEMA_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"schema_version \d+ is newer than this align understands"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize(("edit", "field"), [
    (lambda m: m["metrics"].pop("global_step"), "metrics.global_step: Field required"),
    (lambda m: m["metrics"].update(bogus=1), "metrics.bogus: unknown field"),
    (lambda m: m["adapter"].update(normalisation="high"), "adapter.normalisation"),
    (lambda m: m.update(stage="distill"), "stage: 'distill' is not a stage"),
])
def test_a_damaged_manifest_is_exit_2_naming_the_field(reward_artifact: Path, tmp_path: Path,
                                                       run_align: Callable, edit: Callable, field: str) -> None:
    copy = tmp_path / "registry" / "tiny-rm" / "v1"
    shutil.copytree(reward_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for command in (["artifacts", "show", "tiny-rm@v1"], ["score", "tiny-rm@v1", "--prompt", "hi", "--response", "x"]):
        result = run_align(*command, "--registry", tmp_path / "registry")
        assert result.returncode == 2, result.stderr[-2000:]
        assert "manifest.json" in result.stderr and field in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
