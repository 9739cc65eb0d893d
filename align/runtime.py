"""Process-level concerns every stage shares: ranks and seeds, graceful SIGTERM (launching: align.launch)."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from align.errors import StageInterrupted


def world() -> tuple[int, int]:
    """(rank, world size) from the environment `accelerate launch`/torchrun set; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return world()[0] == 0


def rank_seed(seed: int, purpose: str = "") -> int:
    """A seed distinct per rank and purpose, so ranks sample different data but runs stay reproducible."""
    rank, _ = world()
    digest = hashlib.sha256(f"{seed}:{rank}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def wait_for_everyone() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank (e.g. the rows each rank generated)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(tensor: Any) -> Any:
    """`tensor` summed over every rank (itself in a plain run); a new tensor, the input is left as it was."""
    import torch.distributed as dist

    summed = tensor.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed


# ---- graceful interruption ----------------------------------------------------------------------------------

# Test hook: `ALIGN_TEST_SIGNAL_AT=<phase>` makes the process send itself SIGTERM when it reaches that phase, so
# tests interrupt every phase deterministically (random timing belongs to bench/stress.py).
SIGNAL_AT_ENV = "ALIGN_TEST_SIGNAL_AT"
PHASES = ("load-data", "load-model", "train", "final-eval", "publish")


class _Interrupt(BaseException):
    """What the signal handler raises. A BaseException, like KeyboardInterrupt, so that no `except Exception` in a
    library (model loading, data reading) swallows it; the outermost `interruptible()` turns it into
    StageInterrupted."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name


class InterruptFlag:
    """Set by SIGTERM/SIGINT. Inside a training loop the loop polls it and stops after a checkpoint;
    elsewhere (loading, evaluating, writing the artifact) the signal interrupts at once. A second signal always
    interrupts at once. Once publishing commits (`uninterruptible()`), the version exists: a first signal then
    lets the command finish instead of reporting an interruption that published something."""

    def __init__(self) -> None:
        self.requested = False
        self.in_training_loop = False
        self.deferring = False  # inside uninterruptible(): a first signal waits
        self.committed = False  # the version has been published: a first signal no longer interrupts

    def handle(self, signum: int, _frame: Any) -> None:
        if self.requested or not (self.in_training_loop or self.deferring or self.committed):
            raise _Interrupt(signum)
        self.requested = True


_active: InterruptFlag | None = None


@contextmanager
def interruptible(resume_hint: bool = False) -> Iterator[InterruptFlag]:
    """Turn SIGTERM/SIGINT into StageInterrupted (exit 143) for the whole block. Re-entrant: a nested block (the
    training loop inside a stage run) shares the outer block's flag and handler. `resume_hint` adds the advice
    to rerun with --resume (for stages that can resume)."""
    global _active
    if _active is not None:
        yield _active
        return
    flag = _active = InterruptFlag()
    previous = {sig: signal.signal(sig, flag.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    except _Interrupt as interrupt:
        hint = " (run the same command with --resume to continue from the last checkpoint)" if resume_hint else ""
        raise StageInterrupted(f"interrupted by {interrupt.signal_name}; nothing was published{hint}") from None
    finally:
        _active = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def uninterruptible() -> Iterator[None]:
    """The commit of a publish (manifest + rename): a signal arriving inside waits for it to finish, and once
    it has, the version exists, so the command completes (exit 0) rather than report an interruption. A second
    signal still interrupts at once. A no-op outside `interruptible()`."""
    flag = _active
    if flag is None:
        yield
        return
    flag.deferring = True
    try:
        yield
        flag.committed = True
    finally:
        flag.deferring = False


_signalled: set[str] = set()


def signal_point(phase: str) -> None:
    """A named point of a stage run where tests interrupt it: SIGTERM to this process, once, the first time it
    reaches `phase` when `ALIGN_TEST_SIGNAL_AT` names it (one of PHASES). Does nothing otherwise."""
    if os.environ.get(SIGNAL_AT_ENV) == phase and phase not in _signalled:
        _signalled.add(phase)
        os.kill(os.getpid(), signal.SIGTERM)  # os.kill runs this process's handler before it returns


def trainer_stop_callback(flag: InterruptFlag) -> Any:
    """A TrainerCallback that turns a pending interrupt into 'save a checkpoint now, then stop'."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        trained = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if flag.requested:
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            signal_point("train")  # a checkpoint is complete: the test hook's "during training"
            return control

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.trained = True
            return control

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.trained:
                signal_point("final-eval")  # inside the evaluation after training
            return control

    return StopOnSignal()


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """Newest `checkpoint-N` that finished writing (trainer_state.json is written last), or None."""
    if not checkpoints.is_dir():
        return None
    candidates = []
    for path in checkpoints.glob("checkpoint-*"):
        step = path.name.rpartition("-")[2]
        if step.isdigit() and (path / "trainer_state.json").exists():
            candidates.append((int(step), path))
    return max(candidates)[1] if candidates else None
