"""Iterative (online) DPO with `make iterate`: round k samples pairs from round k-1's policy and trains from it,
so every round publishes, starts from the one before, and lineage shows them all.

Round 1 is the pipeline's dpo: the session's tiny-dpo (copied with its parents into a private registry, so
nothing is published under names other tests read). The commands `make -n iterate` plans are then run as make
would run them, the align ones in this process (no interpreter start-up per stage)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

SMALL = {"ARGS_pairs": "--set data.limit=24 --set data.eval_limit=8 --set pairs.max_new_tokens=16",
         "ARGS_dpo": "--set train.max_steps=3 --set train.per_device_eval_batch_size=16"}
STAMPS = Path(".stamps") / "recipes_tiny"
ALIGN = "HF_HUB_OFFLINE=1 .venv/bin/align "


def plan(registry: Path, rounds: int | str) -> list[str]:
    """The commands `make iterate` would run (its `setup` prerequisite taken as made)."""
    result = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "iterate",
                             "RECIPES=recipes/tiny", f"REGISTRY={registry}", f"ROUNDS={rounds}",
                             *(f"{key}={value}" for key, value in SMALL.items())],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def execute(line: str, capsys: pytest.CaptureFixture) -> str:
    """One planned command: `align ...` in this process, anything else (stamps, `.d` files) by the shell."""
    if line.startswith(ALIGN) and not re.search(r"[;&|>]", line):
        from align.cli import main

        with pytest.raises(SystemExit) as stopped:
            main(shlex.split(line.removeprefix(ALIGN)))
        captured = capsys.readouterr()
        assert stopped.value.code == 0, captured.err[-3000:]
        return captured.out
    subprocess.run(line, shell=True, cwd=REPO, check=True, timeout=120)
    return ""


def manifest(registry: Path, ref: str) -> dict:
    name, version = ref.split("@")
    return json.loads((registry / name / version / "manifest.json").read_text())


def latest(registry: Path, name: str) -> str:
    return f"{name}@v{max(int(path.name[1:]) for path in (registry / name).glob('v[0-9]*'))}"


@pytest.mark.slow
def test_two_rounds_each_publish_and_the_second_starts_from_the_first(
        tmp_path: Path, sft_registry: Path, dpo_artifact: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    registry = tmp_path / "registry"
    for name in ("tiny-sft", "tiny-pairs", "tiny-dpo"):  # round 1 and everything under it
        shutil.copytree(sft_registry / name, registry / name, ignore=shutil.ignore_patterns(".runs", ".staging-*"))
    (registry / STAMPS).mkdir(parents=True)
    for stage in ("sft", "pairs", "dpo"):  # made in this order, as the pipeline makes them
        (registry / STAMPS / f"{stage}.done").touch()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALIGN_REGISTRY", raising=False)
    round1 = latest(registry, "tiny-dpo")

    # ROUNDS=3 plans rounds 2 and 3, each from the round before, and ends with the last round's lineage.
    three = plan(registry, 3)
    stages = [shlex.split(line.removeprefix(ALIGN)) for line in three if line.startswith(ALIGN)]
    runs = [(args[0], dict(arg.split("=", 1) for arg in args[args.index("--set") + 1::2])) for args in stages
            if args[0] in ("pairs", "dpo")]
    assert [(stage, sets.get("name"), sets["model.from"], sets.get("data.card")) for stage, sets in runs] == [
        ("pairs", "tiny-pairs-r2", "tiny-dpo@latest", None),
        ("dpo", "tiny-dpo-r2", "tiny-dpo@latest", "tiny-pairs-r2@latest"),
        ("pairs", "tiny-pairs-r3", "tiny-dpo-r2@latest", None),
        ("dpo", "tiny-dpo-r3", "tiny-dpo-r2@latest", "tiny-pairs-r3@latest")]
    assert runs[1][1]["train.max_steps"] == "3", "ARGS_dpo applies to every round"
    assert stages[-1][:3] == ["artifacts", "lineage", "tiny-dpo-r3@latest"]

    # Two rounds for real: round 2's pairs and DPO, then the lineage `make iterate` prints.
    planned = plan(registry, 2)
    output = "".join(execute(line, capsys) for line in planned)
    pairs2, dpo2 = latest(registry, "tiny-pairs-r2"), latest(registry, "tiny-dpo-r2")
    assert (pairs2, dpo2) == ("tiny-pairs-r2@v1", "tiny-dpo-r2@v1")
    first, second = manifest(registry, round1), manifest(registry, dpo2)
    assert manifest(registry, pairs2)["parents"][0]["ref"] == round1, "round 2 samples from round 1's policy"
    assert [(p["role"], p["ref"]) for p in second["parents"]] == [("model", round1), ("data", pairs2)]
    # Round 2 merges round 1's chain and adapter first: its start, and so its reference, is round 1's policy.
    assert [entry["ref"] for entry in second["adapter_chain"]] == [
        *[entry["ref"] for entry in first["adapter_chain"]], round1]
    assert second["metrics"]["global_step"] == 3
    lineage = output[output.index(f"{dpo2} [dpo]"):]
    for shown in (f"model: {round1}", f"data: {pairs2}", *(f"{p['role']}: {p['ref']}" for p in first["parents"])):
        assert shown in lineage, lineage
    # Round 1 is reached twice (as round 2's model and through round 2's pairs) and expanded once.
    assert lineage.count(f"model: {round1}") == 2 and f"model: {round1} [dpo]" in lineage
    assert lineage.count("(as above)") == 1

    # Incremental: nothing left to run; a `.d` file ties round 2's pairs to the prompts card; a new round 1
    # makes round 2 due again.
    assert plan(registry, 2) == [planned[-1]]
    assert "data_cards/tiny-story-prompts.yaml" in (registry / STAMPS / "pairs-r2.d").read_text()
    os.utime(registry / STAMPS / "dpo.done")
    assert [line.split()[2] for line in plan(registry, 2) if line.startswith(ALIGN)][:2] == ["pairs", "dpo"]
