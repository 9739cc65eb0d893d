"""Artifact integrity and registry robustness: file records at publish and for files added later, `align artifacts
verify`, damaged artifacts refused before any weights load, and registries that cannot be written (a file, a
read-only directory, a full disk)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, SHARED, align_env, align_process
from test_artifacts import FIXTURES, manifest, publish

from align.artifacts import MAX_NAME_LENGTH, Registry
from align.integrity import ADDED_FILES, AddedFiles, check_loadable, safetensors_problem
from align.manifest import Manifest

TINY_SFT = REPO / "recipes" / "tiny" / "sft.yaml"
TINY_DPO = REPO / "recipes" / "tiny" / "dpo.yaml"
STORY_PROMPTS = REPO / "data_cards" / "tiny-story-prompts.yaml"
WEIGHTS = "adapter/adapter_model.safetensors"


def safetensors_bytes(values: int = 4) -> bytes:
    """A well-formed .safetensors file: one F32 tensor of `values` numbers."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [values], "data_offsets": [0, 4 * values]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * (4 * values)


def damage(path: Path, how: str) -> None:
    """`truncated`: its second half cut off. `garbage`: the same number of bytes, none of them safetensors."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes((b"\xa5 not a tensor file " * (len(data) // 20 + 1))[: len(data)])


def run(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """`python -m align ARGS` with extra environment variables (ALIGN_FORBID_WEIGHTS=1 proves no weights loaded)."""
    return align_process(args, {**align_env(tmp_path / "cache"), **env}, timeout=300)


def refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 2 with one `error:` line naming every fragment (notes about the data may come before it)."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in error, result.stderr


# ---- records -------------------------------------------------------------------------------------------------------


def test_publish_records_every_file_but_the_manifest(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    with reg.staging("sft") as staging:
        (staging / "adapter").mkdir()
        (staging / WEIGHTS).write_bytes(safetensors_bytes())
        (staging / "metrics.json").write_text("{}")
        artifact = reg.publish(staging, "sft", {**manifest(), "files": None})  # a stage cannot decide `files`
    on_disk = json.loads((artifact.path / "manifest.json").read_text())
    assert on_disk["schema_version"] == Manifest.SCHEMA_VERSION >= 2  # files are recorded from schema 2 on
    assert set(on_disk["files"]) == {WEIGHTS, "metrics.json"}
    for rel, record in on_disk["files"].items():
        data = (artifact.path / rel).read_bytes()
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert Manifest.read(artifact.path).files == artifact.manifest.files


def test_manifests_before_schema_2_read_with_no_file_record() -> None:
    assert Manifest.read(FIXTURES / "sft.manifest.json").files is None  # schema 0
    raw = Manifest.read(FIXTURES / "dpo.manifest.json").model_dump(mode="json")  # as schema 1 wrote it
    del raw["files"]
    assert Manifest.parse({**raw, "schema_version": 1}, "v1").files is None


def test_added_files_are_recorded_and_published_files_cannot_be_replaced(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    artifact = publish(reg, "sft")
    reg.add_file(artifact, "eval.json", '{"a": 1}')
    reg.add_file(artifact, "bench/result.json", b"first")
    reg.add_file(artifact, "eval.json", '{"a": 2}')  # a second evaluation replaces the first, and its record
    added = AddedFiles.read(artifact.path / ADDED_FILES)
    assert added.files["eval.json"].sha256 == hashlib.sha256(b'{"a": 2}').hexdigest()
    assert added.files["bench/result.json"].size == 5
    assert (artifact.path / "eval.json").read_text() == '{"a": 2}'
    assert not [p for p in artifact.path.rglob(".*tmp*")]  # no scratch file left
    for bad in ("adapter/weights.bin", "manifest.json", ADDED_FILES, "../escape.json", "/abs.json"):
        with pytest.raises(ValueError, match=r"cannot be replaced|relative path"):
            reg.add_file(artifact, bad, "x")
    assert (artifact.path / "adapter" / "weights.bin").read_bytes() == b"w"


@pytest.mark.parametrize(("content", "problem"), [
    (safetensors_bytes(), None),
    (safetensors_bytes()[:-3], "data should end at byte"),
    (safetensors_bytes() + b"extra", "data should end at byte"),
    (b"\x05\0\0", "too short"),
    (b"\xa5 not a tensor file " * 4, "header length"),
    ((12).to_bytes(8, "little") + b"not json at all!", "not JSON"),
    ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
], ids=["sound", "truncated", "trailing bytes", "tiny", "garbage", "header not JSON", "header a list"])
def test_safetensors_header_check(content: bytes, problem: str | None, tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    found = safetensors_problem(path)
    assert found is None if problem is None else problem in found, found


# ---- align artifacts verify ----------------------------------------------------------------------------------------


def test_verify_reports_each_problem_and_passes_intact_and_old_artifacts(tmp_path: Path, run_align: Callable) -> None:
    reg = Registry(tmp_path / "reg")
    publish(reg, "intact")
    with reg.staging("hurt") as staging:
        files = {WEIGHTS: safetensors_bytes(), "gone.txt": b"g", "grown.txt": b"g", "same.txt": b"abc"}
        for rel, data in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_bytes(data)
        hurt = reg.publish(staging, "hurt", manifest())
    reg.add_file(hurt, "eval.json", "{}")
    (hurt.path / "gone.txt").unlink()
    (hurt.path / "grown.txt").write_bytes(b"gg")
    (hurt.path / "same.txt").write_bytes(b"abd")  # same size: only the hash tells
    (hurt.path / "eval.json").write_text("[]")
    (hurt.path / "stray.txt").write_text("s")
    old = reg.root / "old" / "v1"
    old.mkdir(parents=True)
    shutil.copy(FIXTURES / "sft.manifest.json", old / "manifest.json")

    result = run_align("artifacts", "verify", "--registry", reg.root)
    assert result.returncode == 2, result.stderr
    lines = result.stdout.splitlines()
    assert "hurt@v1: gone.txt: missing" in lines
    assert "hurt@v1: grown.txt: size changed: 2 bytes, recorded 1" in lines
    assert any(line.startswith("hurt@v1: same.txt: content changed") for line in lines)
    assert any(line.startswith("hurt@v1: eval.json: content changed") for line in lines)  # added after publish
    assert "note hurt@v1: stray.txt: present but recorded nowhere" in lines
    assert "ok intact@v1: 1 recorded file(s) match" in lines
    assert "ok old@v1: no file record (written before schema 2); safetensors headers checked" in lines
    assert not any(line.startswith("ok hurt") for line in lines)
    assert result.stderr.strip() == "error: 4 damaged file(s) in 1 of 3 artifact version(s): hurt@v1"

    ok = run_align("artifacts", "verify", "intact", "old@v1", "--registry", reg.root)
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 2, ok.stdout + ok.stderr
    (old / "adapter").mkdir()
    (old / WEIGHTS).write_bytes(safetensors_bytes()[:-2])  # no record, but a broken header is still damage
    refused(run_align("artifacts", "verify", "old", "--registry", reg.root), "1 damaged file(s)")


def test_eval_json_is_recorded_and_the_suite_artifacts_verify(sft_registry: Path, run_align: Callable,
                                                              tmp_path: Path) -> None:
    """Everything the session chain published verifies; `align eval` writes eval.json through the registry, so
    it is recorded and a later edit of it is found."""
    copy = tmp_path / "registry"
    shutil.copytree(sft_registry, copy, ignore=shutil.ignore_patterns(".runs"))
    result = run_align("eval", "tiny-sft@v1", "--data", STORY_PROMPTS, "--limit", "1", "--num-samples", "1",
                       "--max-new-tokens", "4", "--registry", copy)
    assert result.returncode == 0, result.stderr[-3000:]
    added = AddedFiles.read(copy / "tiny-sft" / "v1" / ADDED_FILES)
    assert added.files["eval.json"].size == (copy / "tiny-sft" / "v1" / "eval.json").stat().st_size
    verified = run_align("artifacts", "verify", "--registry", copy)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "ok tiny-sft@v2:" in verified.stdout and "no file record" not in verified.stdout
    (copy / "tiny-sft" / "v1" / "eval.json").write_text("{}")
    refused(run_align("artifacts", "verify", "tiny-sft@v1", "--registry", copy), "tiny-sft@v1")


# ---- damaged artifacts are refused before any weights load ---------------------------------------------------------


def damaged_copy(session: Path, registry: Path, source: str, name: str, how: str, schema_1: bool) -> Path:
    """In a private registry holding copies of the session's tiny-sft and tiny-pairs, a copy of `source` (NAME/vN)
    as NAME@v1 whose adapter weights are damaged `how`; `schema_1`: its manifest as written before file records."""
    for artifact in ("tiny-sft", "tiny-pairs"):
        if not (registry / artifact).exists():
            shutil.copytree(session / artifact, registry / artifact, ignore=shutil.ignore_patterns(".runs"))
    target = registry / name / "v1"
    shutil.copytree(session / source, target)
    raw = json.loads((target / "manifest.json").read_text())
    raw.update(name=name, version=1, ref=f"{name}@v1")
    if schema_1:
        raw["schema_version"] = 1
        del raw["files"]
    (target / "manifest.json").write_text(json.dumps(raw))
    damage(target / WEIGHTS, how)
    return target


USERS = {
    "dpo from it": ("tiny-sft/v2", ["dpo", TINY_DPO, "--set", "model.from={ref}", "--set", "name=from-damaged"]),
    "eval of it": ("tiny-sft/v2", ["eval", "{ref}", "--data", STORY_PROMPTS]),
    "score with it": ("tiny-rm/v1", ["score", "{ref}", "--prompt", "Once upon a time", "--response", "a dog"]),
}


@pytest.mark.parametrize(("user", "how", "schema_1"), [
    ("dpo from it", "truncated", False), ("dpo from it", "garbage", True),
    ("eval of it", "garbage", False), ("eval of it", "truncated", True),
    ("score with it", "garbage", False), ("score with it", "truncated", True),
])
def test_a_damaged_adapter_is_refused_before_weights(user: str, how: str, schema_1: bool, reward_artifact: Path,
                                                     sft_registry: Path, tmp_path: Path) -> None:
    """Truncated or overwritten adapter weights in the artifact a command reads: exit 2 naming the artifact and
    the file, before any weights load (ALIGN_FORBID_WEIGHTS would turn a load into a traceback), also for an
    artifact written before file records (its safetensors header gives it away)."""
    source, args = USERS[user]
    registry = tmp_path / "reg"
    target = damaged_copy(sft_registry, registry, source, "damaged", how, schema_1)
    args = [str(a).replace("{ref}", "damaged@v1") for a in args]
    result = run([*args, "--registry", registry], tmp_path, ALIGN_FORBID_WEIGHTS="1")
    refused(result, "artifact damaged@v1 is damaged", str(target / WEIGHTS))
    assert not (registry / "from-damaged").exists()


def test_loaders_turn_a_damaged_adapter_into_an_artifact_error(reward_artifact: Path, sft_registry: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Damage the check before loading does not see (it reads sizes and headers, not every byte) still ends as
    one ArtifactError naming the file in each of the three adapter loaders, never a safetensors traceback."""
    from align import integrity, models
    from align.errors import ArtifactError
    from align.ppo.roles import _add_adapter_from

    monkeypatch.setattr(integrity, "check_loadable", lambda *args, **kwargs: None)
    registry = tmp_path / "reg"
    policy = damaged_copy(sft_registry, registry, "tiny-sft/v2", "policy", "garbage", False)
    reward = damaged_copy(sft_registry, registry, "tiny-rm/v1", "reward", "truncated", False)
    reg = Registry(registry)
    base = models.BaseModelSpec(str(SHARED / "models" / "stories260K"), "local", str(SHARED / "models" / "stories260K"))
    with pytest.raises(ArtifactError, match=f"{policy / WEIGHTS}: cannot load the adapter"):
        models.merge_adapter(models.load_base_model(base), policy / "adapter")
    with pytest.raises(ArtifactError, match=f"{policy / WEIGHTS}: cannot load the adapter"):
        models.load_artifact_model(reg.resolve("policy@v1"), reg)
    from peft import get_peft_model

    from align.recipe import LoraSection

    model = get_peft_model(models.load_base_model(base), models.lora_config(LoraSection(r=2)), adapter_name="policy")
    with pytest.raises(ArtifactError, match=f"{reward / WEIGHTS}: cannot load the adapter"):
        _add_adapter_from(model, "reward", reward / "adapter", trainable=False)


def test_check_loadable_names_a_damaged_adapter_under_the_artifact(reward_artifact: Path, sft_registry: Path,
                                                                  tmp_path: Path) -> None:
    """A reward model whose own files are intact but whose chain's SFT adapter is damaged: named as that adapter."""
    from align.errors import ArtifactError

    registry = tmp_path / "reg"
    shutil.copytree(sft_registry / "tiny-sft", registry / "tiny-sft", ignore=shutil.ignore_patterns(".runs"))
    rm = registry / "tiny-rm" / "v1"
    shutil.copytree(sft_registry / "tiny-rm" / "v1", rm)
    raw = json.loads((rm / "manifest.json").read_text())
    raw["adapter_chain"] = [{"ref": "tiny-sft@v2", "path": str(registry / "tiny-sft" / "v2" / "adapter")}]
    (rm / "manifest.json").write_text(json.dumps(raw))
    damage(registry / "tiny-sft" / "v2" / WEIGHTS, "truncated")
    reg = Registry(registry)
    with pytest.raises(ArtifactError, match=r"artifact tiny-sft@v2 \(an adapter under tiny-rm@v1\) is damaged: "
                                            r".*size changed"):
        check_loadable(reg.resolve("tiny-rm@v1"), reg)


# ---- registries that cannot be written -----------------------------------------------------------------------------


def test_a_registry_that_is_a_file_is_refused(tmp_path: Path, run_align: Callable) -> None:
    file = tmp_path / "registry.txt"
    file.write_text("not a directory")
    refused(run_align("artifacts", "list", "--registry", file), f"registry {file} is not a directory")
    refused(run(["sft", TINY_SFT, "--registry", file / "sub"], tmp_path, ALIGN_FORBID_WEIGHTS="1"),
            f"registry {file / 'sub'} is not a directory ({file} is not a directory)")
    assert file.read_text() == "not a directory"


def without_root_powers() -> list[str]:
    """A command prefix under which permission bits bind: as root, drop the capabilities that bypass them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: chmod cannot make a directory read-only for this user")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_a_read_only_registry_is_refused_before_weights(tmp_path: Path) -> None:
    """A stage that would publish, and `align eval` that would write eval.json, into a read-only registry: exit 2
    naming the directory, before any weights load (and before minutes of sampling), nothing written."""
    registry = tmp_path / "ro"
    publish(Registry(registry), "policy")
    prefix = without_root_powers()
    locked = [registry / "policy" / "v1", registry / "policy", registry]
    for directory in locked:
        directory.chmod(0o555)
    try:
        probe = subprocess.run([*prefix, "touch", str(registry / "probe")], capture_output=True, check=False)
        if probe.returncode == 0:
            pytest.skip("this user writes into a mode-555 directory (no way to drop that power here)")
        env = {**align_env(tmp_path / "cache"), "ALIGN_FORBID_WEIGHTS": "1"}

        def align(*args: object) -> subprocess.CompletedProcess:
            return subprocess.run([*prefix, sys.executable, "-m", "align", *map(str, args), "--registry",
                                   str(registry)], cwd=REPO, capture_output=True, text=True, timeout=120, env=env)

        refused(align("sft", TINY_SFT), f"cannot publish 'tiny-sft': the registry directory {registry} is not writable")
        refused(align("eval", "policy@v1", "--data", STORY_PROMPTS), f"cannot write into policy@v1: {locked[0]}")
        assert sorted(p.name for p in registry.rglob("*")) == sorted(["policy", "v1", "manifest.json", "adapter",
                                                                       "weights.bin", ".lock"])
    finally:
        for directory in locked:
            directory.chmod(0o755)


def test_overlong_names_are_refused(tmp_path: Path, run_align: Callable) -> None:
    long = "n" * (MAX_NAME_LENGTH + 1)
    refused(run(["sft", TINY_SFT, "--set", f"name={long}", "--registry", tmp_path / "reg"], tmp_path,
                ALIGN_FORBID_WEIGHTS="1"), "name", f"at most {MAX_NAME_LENGTH} characters")
    refused(run_align("artifacts", "show", f"{'n' * 300}@v1", "--registry", tmp_path / "reg"),
            "300 characters long, at most 100")
    assert not (tmp_path / "reg").exists()


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from align.artifacts import Registry
    from align.errors import AlignError
    sys.path.insert(0, sys.argv[4])
    from test_artifacts import manifest
    fields = manifest()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, like ENOSPC
    limit, payload = int(sys.argv[2]), int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    reg = Registry(sys.argv[1])
    try:
        with reg.staging("full") as staging:
            (staging / "weights.bin").write_bytes(b"w" * payload)
            reg.publish(staging, "full", fields)
    except AlignError as exc:  # as `align.cli.main` reports it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
""")


@pytest.mark.parametrize(("payload", "named"), [(100, "manifest.json"), (4000, ".staging-")])
def test_a_full_disk_during_publish_leaves_nothing(payload: int, named: str, tmp_path: Path) -> None:
    """A file size limit of 2 kB: the manifest (payload 100 B) or the stage's own file (4 kB) cannot be written.
    Either way one error naming it, no version, no staging directory."""
    root = tmp_path / "reg"
    args = [sys.executable, "-c", FULL_DISK, str(root), "2048", str(payload), str(Path(__file__).parent)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, env=align_env(tmp_path / "cache"))
    refused(result, "cannot write", named, "File too large", "nothing of 'full' was published")
    assert [p.name for p in (root / "full").iterdir()] in ([], [".lock"])
