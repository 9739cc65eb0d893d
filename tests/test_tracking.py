"""Experiment tracking offline: `train.report_to: tensorboard` writes event files that travel with the artifact
(recorded, so `align artifacts verify` checks them) and hold the logged scalars."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, TINY_SFT


@pytest.mark.slow
def test_tensorboard_scalars_travel_with_the_artifact(tmp_path: Path, run_align: Callable, stories_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    registry = tmp_path / "registry"
    result = run_align("sft", TINY_SFT, "--registry", registry, "--set", "train.report_to=tensorboard",
                       "--set", "train.max_steps=4", "--set", "train.logging_steps=1", "--set", "sft.num_samples=1")
    assert result.returncode == 0, result.stderr[-3000:]
    # One directory: the writer of the evaluations before and after training and of the training steps (it is
    # reopened after training, hence two files), never the working directory's ./runs.
    events = list((registry / "tiny-sft" / "v1" / "logs").rglob("events.out.tfevents.*"))
    assert events and {path.parent.name for path in events} == {"tensorboard"}
    assert not (REPO / "runs").exists()
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(scalars.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= tags, tags
    losses = scalars.Scalars("train/loss")
    assert [event.step for event in losses] == [1, 2, 3, 4] and all(event.value > 0 for event in losses)
    # The learning rate decays linearly to 0 over the 4 steps (the recipe's schedule), as logged.
    rates = [event.value for event in scalars.Scalars("train/learning_rate")]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
    verify = run_align("artifacts", "verify", "tiny-sft@v1", "--registry", registry)
    assert verify.returncode == 0 and "logs/" in (registry / "tiny-sft" / "v1" / "manifest.json").read_text()
