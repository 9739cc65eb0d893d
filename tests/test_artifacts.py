"""Registry behaviour: versioning, resolution errors, crash safety, concurrent publishers and lineage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from align.artifacts import (
    Artifact,
    Registry,
    git_state,
    package_versions,
    parent_entry,
    read_manifest,
)
from align.errors import ArtifactError
from align.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "v0"
IDENTITY = ("schema_version", "name", "version", "ref", "created", "files")


def manifest(stage: str = "sft", parents: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    """The fields a stage hands to `publish`: a real manifest of `stage` (written by the tiny chain before
    manifests were typed, so read through the version-0 migration) with its data card renamed `<stage>-card`."""
    recorded = Manifest.read(FIXTURES / f"{stage}.manifest.json").model_dump()
    base = {key: value for key, value in recorded.items() if key not in IDENTITY}
    base["base_model"]["spec"] = "tiny-gpt2"
    base["data"][0]["name"] = f"{stage}-card"
    base["parents"] = parents or []
    return {**base, **extra}


def publish(reg: Registry, name: str, **kwargs: Any) -> Artifact:
    with reg.staging(name) as stage_dir:
        (stage_dir / "adapter").mkdir()
        (stage_dir / "adapter" / "weights.bin").write_bytes(b"w")
        return reg.publish(stage_dir, name, manifest(**kwargs))


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "artifacts")


def test_publish_assigns_versions_and_fills_manifest(reg: Registry) -> None:
    first = publish(reg, "sft")
    second = publish(reg, "sft")
    assert (first.version, second.version) == (1, 2)
    assert second.ref == "sft@v2"
    assert second.path == reg.root / "sft" / "v2"
    assert second.adapter_path == second.path / "adapter"
    on_disk = read_manifest(second.path)
    assert on_disk == second.manifest
    assert (on_disk.name, on_disk.version, on_disk.ref) == ("sft", 2, "sft@v2")
    assert on_disk.created.endswith("+00:00")
    assert on_disk.schema_version == Manifest.SCHEMA_VERSION
    assert reg.versions("sft") == [1, 2]
    assert [a.ref for a in reg.list()] == ["sft@v1", "sft@v2"]
    assert not [p for p in (reg.root / "sft").iterdir() if p.name.startswith(".staging-")]


def test_resolve_forms(reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish(reg, "sft")
    v2 = publish(reg, "sft")
    assert reg.resolve("sft@v1").version == 1
    assert reg.resolve("sft@latest") == v2
    assert reg.resolve("sft") == v2
    assert reg.resolve(str(v2.path)) == v2
    monkeypatch.chdir(tmp_path)
    assert reg.resolve("artifacts/sft/v1").ref == "sft@v1"
    assert reg.resolve("./artifacts/sft/v2/manifest.json") == v2


def test_resolve_errors_are_helpful(reg: Registry, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no artifacts yet"):
        reg.resolve("sft")
    publish(reg, "sft")
    publish(reg, "sft")
    publish(reg, "reward")
    with pytest.raises(ArtifactError, match=r"unknown artifact 'sftt'.*did you mean 'sft'.*known: reward, sft"):
        reg.resolve("sftt@v1")
    with pytest.raises(ArtifactError, match=r"sft@v7 does not exist; sft has v1, v2 \(latest v2\)"):
        reg.resolve("sft@v7")
    with pytest.raises(ArtifactError, match=r"malformed artifact reference 'a@x'"):
        reg.resolve("a@x")
    with pytest.raises(ArtifactError, match=r"did you mean sft@v3\?"):
        reg.resolve("sft@3")
    with pytest.raises(ArtifactError, match="malformed"):
        reg.resolve("bad name!")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ArtifactError, match=r"has no manifest\.json"):
        reg.resolve(str(tmp_path / "plain"))
    with pytest.raises(ArtifactError, match="does not exist"):
        reg.resolve(str(tmp_path / "nowhere"))
    with pytest.raises(ArtifactError, match="invalid artifact name"):
        reg.versions("../escape")


def test_staging_removed_when_body_raises(reg: Registry) -> None:
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), reg.staging("sft") as stage_dir:
            (stage_dir / "partial.bin").write_bytes(b"x")
            raise exc
        assert not stage_dir.exists()
    assert reg.versions("sft") == []


def test_leftover_staging_and_incomplete_dirs_are_not_versions(reg: Registry) -> None:
    publish(reg, "sft")
    # A crash mid-publish leaves a staging dir (even one with a manifest) or, from outside tools, a bare vN.
    crashed = reg.root / "sft" / ".staging-999999999-deadbeef"
    crashed.mkdir()
    (crashed / "manifest.json").write_text(json.dumps(manifest()))
    (reg.root / "sft" / "v2").mkdir()
    assert reg.versions("sft") == [1]
    assert reg.resolve("sft@latest").version == 1
    # The next publish must not land on the manifest-less v2, and it cleans up the dead run's staging dir.
    assert publish(reg, "sft").version == 3
    assert not crashed.exists()


def test_clean_stale_removes_only_dead_owners(reg: Registry) -> None:
    base = reg.root / "sft"
    base.mkdir(parents=True)
    cmd = [sys.executable, "-c", "import os; print(os.getpid())"]
    dead = subprocess.run(cmd, capture_output=True, text=True, check=True)
    stale = base / f".staging-{int(dead.stdout)}-abc123"
    stale.mkdir()
    with reg.staging("sft") as live:
        assert reg.clean_stale("sft") == [stale]
        assert live.exists()
    assert reg.clean_stale("unknown") == []


def test_missing_required_key_is_value_error_and_publishes_nothing(reg: Registry) -> None:
    bad = manifest()
    del bad["recipe_sha256"]
    with pytest.raises(ValueError, match="recipe_sha256"), reg.staging("sft") as stage_dir:
        reg.publish(stage_dir, "sft", bad)
    assert reg.versions("sft") == []
    assert list((reg.root / "sft").iterdir()) == []  # staging removed, lock never taken


PUBLISHES_EACH = 2

WORKER = textwrap.dedent(
    f"""
    import os, sys
    from align.artifacts import Registry
    sys.path.insert(0, sys.argv[2])
    from test_artifacts import manifest
    reg = Registry(sys.argv[1])
    print("ready", flush=True)
    sys.stdin.readline()  # barrier: every process waits here until all have started
    for round in range({PUBLISHES_EACH}):
        with reg.staging("shared") as d:
            (d / "payload").write_text(f"{{os.getpid()}}-{{round}}")
            (d / "adapter").mkdir()
            (d / "adapter" / "weights.bin").write_bytes(os.urandom(64 * 1024))  # a version takes a while to write
            art = reg.publish(d, "shared", manifest())
        print(art.version, flush=True)
    """
)

# `align artifacts list`, `show` and `verify` in a loop, in-process (one interpreter start, many reads), until the
# stop file appears; any error escapes and fails the process. `verify` re-hashes every listed version, so a version
# seen half-written (a file missing or short) fails it. Prints the number of rounds.
READER = textwrap.dedent(
    """
    import contextlib, io, sys
    from pathlib import Path
    from align.cli import app
    root, stop = sys.argv[1], Path(sys.argv[2])
    commands = [["artifacts", "list", "--registry", root], ["artifacts", "show", "shared@latest", "--registry", root],
                ["artifacts", "verify", "shared", "--registry", root]]
    print("ready", flush=True)
    rounds = 0
    while True:
        last = stop.exists()
        for args in commands:
            with contextlib.redirect_stdout(io.StringIO()) as out:
                app(args, standalone_mode=False)
            assert "shared" in out.getvalue(), out.getvalue()
        rounds += 1
        if last:
            break
    print(rounds, flush=True)
    """
)


def test_concurrent_publishers_get_distinct_versions_while_readers_read(reg: Registry, tmp_path: Path) -> None:
    """8 processes publish 2 versions each of one name, racing, while a reader lists, shows and verifies it: versions
    1..17 each published once, complete, and no reader ever errors or sees a half version."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with reg.staging("shared") as d:  # v1, so the readers have something from the start
        (d / "payload").write_text("first")
        reg.publish(d, "shared", manifest())
    stop = tmp_path / "stop"

    def start(code: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", code, str(reg.root), *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    readers = [start(READER, str(stop))]
    procs = [start(WORKER, str(Path(__file__).parent)) for _ in range(8)]
    for proc in [*readers, *procs]:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    got = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        got += [int(line) for line in out.split()]
    stop.touch()
    for reader in readers:
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err[-3000:]
        assert int(out.strip()) >= 2, "the reader never overlapped the publishers"
    total = 1 + 8 * PUBLISHES_EACH
    assert sorted(got) == list(range(2, total + 1))
    assert reg.versions("shared") == list(range(1, total + 1))
    payloads = set()
    for art in reg.list("shared"):
        assert art.manifest.version == art.version
        payloads.add((art.path / "payload").read_text())
    assert len(payloads) == total
    assert not [p for p in (reg.root / "shared").iterdir() if p.name.startswith(".staging-")]


def test_lineage_walks_parents_and_marks_missing(reg: Registry) -> None:
    a = publish(reg, "sft", stage="sft")
    b = publish(reg, "rm", stage="reward", parents=[parent_entry(a, "init")])
    gone = publish(reg, "tmp", stage="sft")
    c = publish(
        reg,
        "dpo",
        stage="dpo",
        parents=[parent_entry(b, "policy"), parent_entry(gone, "reference")],
    )
    shutil.rmtree(gone.path)
    walk = list(reg.lineage(c.ref).walk())
    nodes = [node for _, node in walk]
    assert [(n.ref, depth, n.role, n.missing) for depth, n in walk] == [
        ("dpo@v1", 0, None, False),
        ("rm@v1", 1, "policy", False),
        ("sft@v1", 2, "init", False),
        ("tmp@v1", 1, "reference", True),
    ]
    assert nodes[0].stage == "dpo" and nodes[2].stage == "sft"
    assert nodes[1].base_model == "tiny-gpt2"
    assert nodes[1].data == ("reward-card",)
    assert nodes[0].created == c.manifest.created
    assert not any(n.manifest_changed for n in nodes)


def test_lineage_flags_a_ref_that_now_names_a_different_artifact(reg: Registry) -> None:
    a = publish(reg, "sft")
    entry = parent_entry(a, "init")
    shutil.rmtree(a.path)
    publish(reg, "sft", seed=1)  # v1 again: same ref, different manifest
    child = publish(reg, "rm", stage="reward", parents=[entry])
    assert reg.lineage(child.ref).parents[0].manifest_changed


def test_parent_entry_records_hash(reg: Registry) -> None:
    a = publish(reg, "sft")
    entry = parent_entry(a, "init")
    assert entry.ref == "sft@v1" and entry.role == "init" and entry.version == 1
    assert entry.path == str(a.path)
    assert len(entry.manifest_sha256) == 64


def test_read_manifest_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"manifest\.json: manifest not found"):
        read_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest.json:1: invalid JSON"):
        read_manifest(tmp_path)


def test_metadata_helpers_import_nothing_heavy() -> None:
    code = (
        "import sys, align.artifacts as a\n"
        "v = a.package_versions(); g = a.git_state()\n"
        "assert set(v) >= {'torch', 'transformers', 'align'}, v\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr


def test_package_versions_missing_package() -> None:
    assert package_versions(("surely-not-installed-pkg",)) == {"surely-not-installed-pkg": None}


def test_git_state_outside_repo_and_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    assert git_state(tmp_path / "does-not-exist") == {"commit": None, "dirty": None}


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_state_in_repo(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f.txt").write_text("a")
    git("add", "f.txt")
    git("commit", "-q", "-m", "init")
    state = git_state(tmp_path)
    assert len(state["commit"]) == 40 and state["dirty"] is False
    (tmp_path / "untracked.txt").write_text("u")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "f.txt").write_text("b")
    assert git_state(tmp_path)["dirty"] is True
