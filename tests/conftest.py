"""Shared pytest fixtures: ../shared material, the CLI as a real process, and one session-wide SFT registry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from warm_cli import WarmCLI

# Under pytest-xdist (`make test` runs two workers on two cores) every process gets one torch thread: two
# processes each spinning two OpenMP threads on two cores slow each other down by an order of magnitude.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TINY_SFT = REPO / "recipes" / "tiny" / "sft.yaml"


def _require_shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not present: {SHARED} holds the third-party test data and tiny models")
    return SHARED


@pytest.fixture
def shared_dir() -> Path:
    """The project's shared material at ../shared (models, third-party demo data); skips when absent."""
    return _require_shared()


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The real pretrained 0.29M-parameter stories260K Llama."""
    return _require_shared() / "models" / "stories260K"


def bench_module(name: str) -> Any:
    """bench/NAME.py imported as a module (bench/ holds scripts, not a package), once per process."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def align_env(cache: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGN_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ALIGN_REGISTRY", None)
    return env


_warm_cli: WarmCLI | None = None


def align_process(args: list[Any], env: dict[str, str], cwd: Path = REPO,
                  timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m align ARGS` as its own process (forked warm: tests/warm_cli.py), text output captured."""
    return warm_cli().run([str(arg) for arg in args], cwd=cwd, env=env, timeout=timeout)


def warm_cli() -> WarmCLI:
    """This process's warm CLI server (started on its first call), with the environment it imported under."""
    global _warm_cli
    if _warm_cli is None:
        _warm_cli = WarmCLI(align_env(Path(tempfile.gettempdir()) / "align-warm-cli"), REPO)
    return _warm_cli


def pytest_unconfigure(config: pytest.Config) -> None:
    if _warm_cli is not None:
        _warm_cli.close()


def interrupt_after_first_checkpoint(args: list[str], registry: Path, name: str, cache: Path) -> None:
    """Run `python -m align ARGS`, send SIGTERM once a checkpoint of artifact `name` is complete, and check the
    graceful stop: exit 143, a hint to --resume, no traceback, nothing published."""
    process = subprocess.Popen([sys.executable, "-m", "align", *map(str, args)], cwd=REPO, env=align_env(cache),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(registry.glob(f"{name}/.runs/*/checkpoints/checkpoint-*/trainer_state.json")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-3000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not list(registry.glob(f"{name}/v*")), "an interrupted run must not publish"


def copy_reward_artifact(session: Path, registry: Path, name: str, edit: Callable[[dict], None]) -> str:
    """In a private registry holding copies of the session's tiny-sft and tiny-rm, a copy of tiny-rm@v1 under
    another name with its manifest edited (a damaged or differently made reward model); returns its ref. The
    session registry stays as the fixtures made it."""
    import json
    import shutil

    for artifact in ("tiny-sft", "tiny-rm"):
        if not (registry / artifact).exists():
            shutil.copytree(session / artifact, registry / artifact, ignore=shutil.ignore_patterns(".runs"))
    target = registry / name / "v1"
    shutil.copytree(registry / "tiny-rm" / "v1", target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["name"] = name
    edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return f"{name}@v1"


def rerecord_files(version_dir: Path) -> None:
    """Record a test-edited artifact version's files anew in its manifest, as if it had been published so."""
    import json

    from align.integrity import record_directory

    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["files"] = {path: record.model_dump() for path, record in record_directory(version_dir).items()}
    (version_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="session")
def run_align(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess]:
    """Run `python -m align ARGS...` as users do, offline; returns the completed process (text output)."""
    env = align_env(tmp_path_factory.mktemp("cache"))

    def run(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
        return align_process(list(args), env, cwd=cwd, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def chain_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tiny chain is built once per test session: under pytest-xdist the workers' common directory,
    so the two workers do not each train the same artifacts (each copies them into its own registry)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-chain"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def built(chain_root: Path, run_align: Callable) -> Callable[..., Path]:
    """built(name, *runs) -> the artifact `name` in the session's shared chain registry, made by running each
    `align` argument list of `runs` there the first time any worker asks (one lock per artifact)."""
    from filelock import FileLock

    registry = chain_root / "registry"

    def build(name: str, *runs: tuple[str, ...]) -> Path:
        with FileLock(str(chain_root / f"{name}.lock")):
            done = chain_root / f"{name}.done"
            if not done.exists():
                for args in runs:
                    result = run_align(*args, "--registry", registry)
                    assert result.returncode == 0, result.stderr[-3000:]
                done.touch()
        return registry / name

    return build


def _copied(artifact: Path, registry: Path) -> Path:
    """The shared artifact copied whole (versions and runs) into a worker's own registry."""
    import shutil

    shutil.copytree(artifact, registry / artifact.name, symlinks=True)
    return registry / artifact.name


@pytest.fixture(scope="session")
def sft_registry(tmp_path_factory: pytest.TempPathFactory, built: Callable, stories_dir: Path) -> Path:
    """A registry where the tiny SFT recipe ran twice (v1, v2): shared by every test that reads SFT artifacts.
    Each worker has its own (tests publish into it); the later fixtures add the chain's other artifacts."""
    root = tmp_path_factory.mktemp("registry")
    _copied(built("tiny-sft", ("sft", TINY_SFT), ("sft", TINY_SFT)), root)
    return root


@pytest.fixture(scope="session")
def pairs_artifact(sft_registry: Path, built: Callable) -> Path:
    """tiny-pairs@v1: VADER-labelled story pairs sampled from tiny-sft@latest, in the session registry."""
    return _copied(built("tiny-pairs", ("pairs", REPO / "recipes" / "tiny" / "pairs.yaml")), sft_registry) / "v1"


@pytest.fixture(scope="session")
def reward_artifact(pairs_artifact: Path, sft_registry: Path, built: Callable) -> Path:
    """tiny-rm@v1: the tiny reward model, from tiny-sft@latest, trained on tiny-pairs@latest."""
    return _copied(built("tiny-rm", ("reward", REPO / "recipes" / "tiny" / "reward.yaml")), sft_registry) / "v1"


@pytest.fixture(scope="session")
def dpo_artifact(pairs_artifact: Path, sft_registry: Path, built: Callable) -> Path:
    """tiny-dpo@v1: DPO of tiny-sft@latest on tiny-pairs@latest."""
    return _copied(built("tiny-dpo", ("dpo", REPO / "recipes" / "tiny" / "dpo.yaml")), sft_registry) / "v1"
