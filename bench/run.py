"""Benchmarks for align: CLI start-up, and wall time / peak RSS of SFT runs. Writes docs/BENCHMARKS.md.

Run with `make bench` (tiny model only) or `make bench BENCH_ARGS=--demo` (adds the SmolLM2-135M demo SFT).
Targets are checked here, never by timed assertions in tests.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELP_TARGET_S = 0.5


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one command, measured with wait4 on that child alone."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", action="store_true", help="also time the SmolLM2-135M demo SFT (minutes)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    align = str(Path(sys.executable).with_name("align"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []

    help_times = [measure([align, "--help"], env)[0] for _ in range(7)]
    median = statistics.median(help_times)
    rows.append(("`align --help` (median of 7)", f"{median * 1000:.0f} ms",
                 "-", "ok" if median < HELP_TARGET_S else f"over the {HELP_TARGET_S * 1000:.0f} ms target"))

    with tempfile.TemporaryDirectory() as registry:
        runs = [("tiny SFT: stories260K, 40 steps x 8 rows", "recipes/tiny/sft.yaml")]
        if args.demo:
            runs.append(("demo SFT: SmolLM2-135M, recipes/demo/sft.yaml", "recipes/demo/sft.yaml"))
        for label, recipe in runs:
            wall, rss, code = measure([align, "sft", recipe, "--registry", registry], env)
            rows.append((label, f"{wall:.1f} s", f"{rss:.0f} MiB", "ok" if code == 0 else f"exit {code}"))

    header = (f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"{platform.system()} {platform.release()}. Date: {dt.date.today().isoformat()}.")
    table = ["| benchmark | wall time | peak RSS | result |", "| --- | --- | --- | --- |"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    section = "\n".join(["## Latest `make bench` run", "", header, "", *table, ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = args.out.read_text() if args.out.exists() else "# Benchmarks\n\n"
    head, _, rest = previous.partition("## Latest `make bench` run")
    tail = rest[rest.find("\n## ", 1):] if "\n## " in rest else ""
    args.out.write_text(head.rstrip() + "\n\n" + section + tail.lstrip("\n"))
    print(section)


if __name__ == "__main__":
    main()
