"""Experiment tracking offline: `train.report_to: tensorboard` writes event files that travel with the artifact
(recorded, so `align artifacts verify` checks them) and hold the logged scalars; trackers align cannot use here
are refused before anything loads, and the ones that need an account log offline without a key or network."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from conftest import TINY_SFT

from align import training

SECRET = "hf_AlignFakeSecret9tracking9token"


def align(*args: object) -> int:
    """`align ARGS` in this process (no interpreter start-up); its exit code."""
    from align.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([str(arg) for arg in args])
    return stopped.value.code


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ALIGN_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)  # where a tracker left to itself would write (./runs)


@pytest.mark.slow
def test_tensorboard_scalars_travel_with_the_artifact(tmp_path: Path, stories_dir: Path, offline_env: None,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("HF_TOKEN", SECRET)
    registry = tmp_path / "registry"
    # `none` beside a tracker is allowed (it adds nothing); transformers itself refuses that mix.
    assert align("sft", TINY_SFT, "--registry", registry, "--set", "train.report_to=[none, tensorboard]",
                 "--set", "train.max_steps=4", "--set", "train.logging_steps=1", "--set", "train.save_steps=100",
                 "--set", "data.limit=48", "--set", "data.eval_limit=16", "--set", "sft.num_samples=1") == 0
    version = registry / "tiny-sft" / "v1"
    # One directory: the writer of the evaluations before and after training and of the training steps (it is
    # reopened after training, hence two files), never the working directory's ./runs.
    events = list((version / "logs").rglob("events.out.tfevents.*"))
    assert events and {path.parent.name for path in events} == {"tensorboard"}
    assert not (tmp_path / "runs").exists() and not list(registry.glob("tiny-sft/.runs/*"))
    scalars = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(scalars.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= tags, tags
    losses = scalars.Scalars("train/loss")
    assert [event.step for event in losses] == [1, 2, 3, 4] and all(event.value > 0 for event in losses)
    # The same numbers as the artifact's own log history.
    history = json.loads((version / "log_history.json").read_text())
    logged = [row["loss"] for row in history if "loss" in row]
    assert [event.value for event in losses] == pytest.approx(logged, rel=1e-5)
    # The learning rate decays linearly to 0 over the 4 steps (the recipe's schedule), as logged.
    rates = [event.value for event in scalars.Scalars("train/learning_rate")]
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1]
    assert {"args/text_summary", "model_config/text_summary"} <= set(scalars.Tags()["tensors"])
    settings = json.loads(scalars.Tensors("args/text_summary")[0].tensor_proto.string_val[0])
    assert settings["report_to"] == ["tensorboard"] and settings["max_steps"] == 4
    # Recorded like every published file (so verify re-hashes them), and no secret of the environment inside.
    recorded = json.loads((version / "manifest.json").read_text())["files"]
    assert {f"logs/{path.relative_to(version / 'logs')}" for path in events} <= set(recorded)
    assert not any(SECRET.encode() in path.read_bytes() for path in version.rglob("*") if path.is_file())
    capsys.readouterr()
    assert align("artifacts", "verify", "tiny-sft@v1", "--registry", registry) == 0
    assert "tiny-sft@v1" in capsys.readouterr().out


@pytest.mark.parametrize(("report_to", "fragments"), [
    ("[tensorbored]", ("train.report_to", "unknown tracker 'tensorbored'", "supported: none, tensorboard, trackio")),
    # transformers' `all` would switch on every installed tracker, online ones included: align names them.
    ("all", ("unknown tracker 'all'", "wandb")),
    ("[tensorboard, trackio]", ("train.report_to", "trackio is not installed here", "pip install trackio")),
])
def test_trackers_align_cannot_use_are_refused_before_loading(report_to: str, fragments: tuple[str, ...],
                                                              tmp_path: Path, offline_env: None,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # trackio absent here whatever this machine has
                        lambda name, *rest: None if name == "trackio" else find_spec(name, *rest))
    monkeypatch.setenv("ALIGN_FORBID_WEIGHTS", "1")
    registry = tmp_path / "registry"
    assert align("sft", TINY_SFT, "--registry", registry, "--set", f"train.report_to={report_to}") == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr
    assert not list(registry.rglob("v*")) and not list(registry.rglob(".staging-*"))


@pytest.mark.parametrize("tracker", list(training.OFFLINE_MODES))
def test_account_trackers_log_offline_without_a_key_or_network(tracker: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    key, variable, value, upload = training.OFFLINE_MODES[tracker]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object())  # "installed"

    def mode_after(environment: dict[str, str]) -> tuple[str | None, list[str]]:
        for name in (key, variable, "HF_HUB_OFFLINE"):
            monkeypatch.setenv(name, "x")  # recorded, so the test leaves the environment as it found it
            monkeypatch.delenv(name)
        for name, setting in environment.items():
            monkeypatch.setenv(name, setting)
        notes: list[str] = []
        assert training.trackers(["none", tracker], notes.append) == [tracker]
        return os.environ.get(variable), notes

    mode, notes = mode_after({})
    assert mode == value and len(notes) == 1 and f"no {key}" in notes[0] and upload in notes[0]
    mode, notes = mode_after({key: SECRET, "HF_HUB_OFFLINE": "1"})
    assert mode == value and "HF_HUB_OFFLINE" in notes[0] and SECRET not in notes[0]
    assert mode_after({key: SECRET}) == (None, [])  # a key and a network: the tracker's own default (online)
    assert mode_after({variable: "online"}) == ("online", [])  # the user's choice stands
