"""SIGTERM at every phase of a stage run (reading data, loading the model, training, the final eval, publishing):
exit 143, no traceback, no version, no staging directory; `--resume` then completes. The signal comes from
align's own test hook (`ALIGN_TEST_SIGNAL_AT`), so each phase is hit deterministically; random timing belongs to
bench/stress.py. The training loop's real-time case (a signal from outside) is in test_sft.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_SFT, align_env, align_process

from align import runtime
from align.errors import StageInterrupted
from align.runtime import PHASES, SIGNAL_AT_ENV

pytestmark = pytest.mark.slow

# Few steps, a checkpoint every 2, no sample replies: each run is a few seconds.
SHORT = ["--set", "train.max_steps=4", "--set", "train.save_steps=2", "--set", "sft.num_samples=0",
         "--set", "data.limit=64"]


def run_sft(registry: Path, cache: Path, *extra: str, signal_at: str | None = None) -> subprocess.CompletedProcess:
    env = align_env(cache)
    env.pop(SIGNAL_AT_ENV, None)
    if signal_at is not None:
        env[SIGNAL_AT_ENV] = signal_at
    return align_process(["sft", TINY_SFT, "--registry", registry, *SHORT, *extra], env)


def checkpoint_steps(registry: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in
                  registry.glob("tiny-sft/.runs/*/checkpoints/checkpoint-*") if (path / "trainer_state.json").exists())


# Where each phase leaves the run: the checkpoints written before the signal (training saves every 2 steps
# and at the last, step 4). "train" signals once checkpoint-2 exists; the loop then saves at the end of step 3.
CHECKPOINTS_AFTER = {"load-data": [], "load-model": [], "train": [2, 3], "final-eval": [2, 4], "publish": [2, 4]}


@pytest.mark.parametrize("phase", PHASES)
def test_sigterm_at_each_phase_publishes_nothing(phase: str, tmp_path: Path, stories_dir: Path) -> None:
    registry, cache = tmp_path / "registry", tmp_path / "cache"
    result = run_sft(registry, cache, signal_at=phase)
    assert result.returncode == 143, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "nothing was published" in result.stderr.lower(), result.stderr
    assert "--resume" in result.stderr
    assert not list(registry.glob("tiny-sft/v*")), "an interrupted run must not publish"
    assert not list(registry.glob("tiny-sft/.staging-*")), "an interrupted publish must not leave its staging dir"
    assert checkpoint_steps(registry) == CHECKPOINTS_AFTER[phase]
    # The run reached the phase named and no further: the run directory opens after reading data, the adapter
    # is saved for publishing only after the final eval.
    assert (registry / "tiny-sft" / ".runs").is_dir() == (phase != "load-data")
    assert bool(list(registry.glob("tiny-sft/.runs/*/final"))) == (phase == "publish")
    if phase != "train":
        return
    # Resuming the run stopped in training continues from its checkpoint and publishes.
    resumed = run_sft(registry, cache, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = json.loads((registry / "tiny-sft" / "v1" / "manifest.json").read_text())
    assert manifest["resumed_from"] == "checkpoint-3" and manifest["metrics"]["global_step"] == 4
    assert not list(registry.glob("tiny-sft/.runs/*")) and not list(registry.glob("tiny-sft/.staging-*"))


# ---- the handler's rules, in this process ----------------------------------------------------------------------


def test_a_signal_outside_the_training_loop_interrupts_at_once_even_through_except_exception() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StageInterrupted, match="interrupted by SIGTERM; nothing was published"):
        with runtime.interruptible():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except Exception:  # a library's catch-all must not swallow the interruption
                pytest.fail("the interruption was caught as an Exception")
            pytest.fail("the signal did not interrupt")
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_training_loop_stops_gracefully_and_a_second_signal_interrupts_at_once() -> None:
    with pytest.raises(StageInterrupted):
        with runtime.interruptible() as flag, runtime.interruptible() as nested:
            assert nested is flag  # one handler and flag for the whole run
            flag.in_training_loop = True
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.requested  # the loop checkpoints and stops at its next step
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("a second signal must interrupt at once")


def test_a_signal_during_the_commit_lets_the_publish_finish() -> None:
    with runtime.interruptible() as flag:
        with runtime.uninterruptible():
            os.kill(os.getpid(), signal.SIGTERM)
            committed = True  # reached: the rename of a publish is never cut short
        assert committed and flag.committed
        with pytest.raises(BaseException, match="SIGTERM"):
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal still stops the process at once
