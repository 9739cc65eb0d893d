"""Stress the registry: concurrent publishers of one artifact name, SIGTERMs at random moments, then
`align artifacts verify` of everything. Not part of `make test`: its timing is random by design.

Two kinds of run (`--mode`):

- `publish` (default, cheap): each run is a process that builds a version the way a stage's publish does —
  under align's SIGTERM handling (`runtime.interruptible`), it writes an adapter-sized `.safetensors` file in
  chunks plus tokenizer-like JSON into `Registry.staging`, then `Registry.publish`es it with a real manifest.
  Everything but the training: the part that can leave a half version. A run takes about a second.
- `sft`: each run is a real `align sft recipes/tiny/sft.yaml` (stories260K, a few dozen steps), same artifact
  name, a different seed per run; an interrupted run is then continued with `--resume`, which must publish.

`--runs` runs (default 20), at most `--workers` (default 8) at once; each is sent SIGTERM with probability
`--kill-fraction` at a uniformly random moment within `--kill-window` seconds of its start (a run that already
finished is not signalled). A signal that lands before align installed its handler (interpreter start-up, nothing
written yet) ends the run with -SIGTERM: counted on its own row, allowed. Afterwards it checks: every other run
exited 0 or 143 (never a traceback), one version per
successful run, no staging directory left, no leftover checkpoints after the resumes (sft), and `align artifacts
verify` passes on every version. Prints a Markdown summary table; exit 1 if any check failed.

    python bench/stress.py                        # 20 publish runs, 8 at a time
    python bench/stress.py --mode sft             # 20 real tiny SFT runs (minutes)
    python bench/stress.py --runs 4 --workers 2   # a smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from align.artifacts import Registry

REPO = Path(__file__).resolve().parents[1]
NAME = "stress"
TINY_SFT = REPO / "recipes" / "tiny" / "sft.yaml"
FIXTURE_MANIFEST = REPO / "tests" / "fixtures" / "v0" / "sft.manifest.json"

# One publish run: the staging and publish path of a stage, with its signal handling and its exit codes.
PUBLISH_WORKER = """
import json, os, sys, time
from align import runtime
from align.artifacts import Registry
from align.errors import AlignError
from align.manifest import Manifest

root, name, fixture, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
fields = Manifest.read(fixture).model_dump(mode="json")
for key in ("schema_version", "name", "version", "ref", "created", "files"):
    fields.pop(key)
fields["seed"] = seed
reg = Registry(root)
try:
    with runtime.interruptible(), reg.staging(name) as staging:
        (staging / "adapter").mkdir()
        header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}).encode()
        with open(staging / "adapter" / "adapter_model.safetensors", "wb") as handle:
            handle.write(len(header).to_bytes(8, "little") + header)
            for _ in range(16):  # 4 MiB in 16 chunks: a signal can land mid-file
                handle.write(os.urandom(1 << 18))
                time.sleep(0.02)
        (staging / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "seed": seed}))
        (staging / "tokenizer.json").write_text(json.dumps({"vocab": list(range(2000))}))
        with runtime.uninterruptible():
            artifact = reg.publish(staging, name, fields)
    print(f"published {artifact.ref}", flush=True)
except AlignError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)
"""


@dataclass
class Run:
    index: int
    command: list[str]
    kill_at: float | None  # seconds after start; None: never signalled
    process: subprocess.Popen | None = None
    started: float = 0.0
    signalled: bool = False
    code: int | None = None
    published: str | None = None
    stderr: str = ""
    resumed_code: int | None = None


def run_command(mode: str, registry: Path, index: int, steps: int) -> list[str]:
    if mode == "publish":
        return [sys.executable, "-c", PUBLISH_WORKER, str(registry), NAME, str(FIXTURE_MANIFEST), str(index)]
    return [sys.executable, "-m", "align", "sft", str(TINY_SFT), "--registry", str(registry), "--set", f"name={NAME}",
            "--set", f"train.seed={index}", "--set", f"train.max_steps={steps}", "--set", "train.save_steps=5"]


def environment(cache: Path) -> dict[str, str]:
    # One thread per process: 8 runs on a few cores must not fight over OpenMP threads.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ALIGN_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1"}
    env.pop("ALIGN_REGISTRY", None)
    return env


def finish(run: Run) -> None:
    out, err = run.process.communicate()
    run.code = run.process.returncode
    run.stderr = err
    match = re.search(rf"published ({re.escape(NAME)}@v\d+)", out)
    run.published = match.group(1) if match else None


def drive(runs: list[Run], workers: int, env: dict[str, str]) -> None:
    """Run everything, at most `workers` at once, sending each run's SIGTERM when its moment comes."""
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < workers:
            run = pending.pop(0)
            run.process = subprocess.Popen(run.command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, text=True)
            run.started = time.monotonic()
            active.append(run)
        for run in list(active):
            if run.process.poll() is not None:
                finish(run)
                active.remove(run)
            elif run.kill_at is not None and not run.signalled and time.monotonic() - run.started >= run.kill_at:
                run.process.send_signal(signal.SIGTERM)
                run.signalled = True
        time.sleep(0.01)


def resume_interrupted(runs: list[Run], env: dict[str, str]) -> None:
    """sft mode: continue each interrupted run with --resume (one at a time); it must publish."""
    for run in runs:
        if run.code == 143:
            done = subprocess.run([*run.command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True)
            run.resumed_code = done.returncode
            match = re.search(rf"published ({re.escape(NAME)}@v\d+)", done.stdout)
            run.published = match.group(1) if match else None
            if done.returncode != 0:
                run.stderr += done.stderr


def verify(registry: Path, env: dict[str, str]) -> tuple[int, int, str]:
    """(exit code, versions reported ok, output) of `align artifacts verify` over the whole registry."""
    done = subprocess.run([sys.executable, "-m", "align", "artifacts", "verify", "--registry", str(registry)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    return done.returncode, sum(line.startswith("ok ") for line in done.stdout.splitlines()), done.stdout + done.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["publish", "sft"], default="publish")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--kill-fraction", type=float, default=0.4, help="share of runs sent SIGTERM")
    parser.add_argument("--kill-window", type=float, default=None,
                        help="SIGTERM within this many seconds of a run's start [publish: 3, sft: 40]")
    parser.add_argument("--steps", type=int, default=20, help="sft mode: train.max_steps of each run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--registry", type=Path, default=None, help="keep the registry here (default: a temp dir)")
    args = parser.parse_args(argv)
    window = args.kill_window or (3.0 if args.mode == "publish" else 40.0)
    chooser = random.Random(args.seed)

    scratch = Path(tempfile.mkdtemp(prefix="align-stress-"))
    registry = args.registry or scratch / "registry"
    env = environment(scratch / "cache")
    runs = [Run(i, run_command(args.mode, registry, i, args.steps),
                chooser.uniform(0, window) if chooser.random() < args.kill_fraction else None)
            for i in range(args.runs)]
    started = time.monotonic()
    try:
        drive(runs, args.workers, env)
        if args.mode == "sft":
            resume_interrupted(runs, env)
        wall = time.monotonic() - started
        code, verified, verify_output = verify(registry, env)
        base = registry / NAME
        versions = Registry(registry).versions(NAME)
        staging_left = [p.name for p in base.glob(".staging-*")] if base.is_dir() else []
        runs_left = [p.name for p in (base / ".runs").glob("*/checkpoints")] if (base / ".runs").is_dir() else []
    finally:
        if args.registry is None:
            shutil.rmtree(scratch, ignore_errors=True)

    published = [run.published for run in runs if run.published]
    odd_exits = [run for run in runs if run.code not in (0, 143, -signal.SIGTERM)]
    failed_resumes = [run for run in runs if run.resumed_code not in (None, 0)]
    checks = {
        "every run exited 0, 143 or (killed in start-up) -SIGTERM": not odd_exits,
        "one version per successful run": len(versions) == len(published) == len(set(published)),
        "every version verifies": code == 0 and verified == len(versions),
        "no staging directory left": not staging_left,
    }
    if args.mode == "sft":
        checks["every interrupted run resumed and published"] = not failed_resumes
        checks["no checkpoints left after the resumes"] = not runs_left
    rows = [
        ("mode", args.mode),
        ("runs / concurrent", f"{args.runs} / {args.workers}"),
        ("SIGTERMs sent (while running)", sum(run.signalled for run in runs)),
        ("exit 0", sum(run.code == 0 for run in runs)),
        ("exit 143 (interrupted)", sum(run.code == 143 for run in runs)),
        ("killed in start-up (-SIGTERM)", sum(run.code == -signal.SIGTERM for run in runs)),
        ("other exits", len(odd_exits)),
        ("resumed with --resume", sum(run.resumed_code is not None for run in runs)),
        ("versions published", len(versions)),
        ("versions verified ok", verified),
        ("staging dirs left", len(staging_left)),
        ("wall time", f"{wall:.1f} s"),
    ]
    print("| measure | value |\n| --- | --- |")
    for label, value in rows:
        print(f"| {label} | {value} |")
    print()
    for label, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {label}")
    for run in [*odd_exits, *failed_resumes][:3]:
        print(f"\nrun {run.index} (exit {run.code}, resume {run.resumed_code}):\n{run.stderr[-2000:]}")
    if code != 0:
        print(f"\n{verify_output[-3000:]}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
