"""Benchmarks for align: CLI start-up, and wall time / peak RSS of every stage. Writes docs/BENCHMARKS.md.

Run with `make bench` (the tiny chain on stories260K) or `make bench BENCH_ARGS=--demo` (adds `make demo` as
users run it, timed against the demo's targets, then the SmolLM2-135M demo chain one stage at a time for each
stage's time and memory: about 30 minutes on 2 cores). `--trl` adds align's SFT, DPO and reward training tokens/s
against plain TRL scripts (bench/trl_baseline.py) on the last chain's recipes and artifacts: the demo's with
`--demo` (what the targets are about), else the tiny one's (a smoke check).
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

from trl_baseline import compare as trl_compare
from trl_baseline import markdown as trl_markdown

from align.artifacts import Registry
from align.eval_result import EvalResult
from align.models import cache_root
from align.stages import STAGES

REPO = Path(__file__).resolve().parents[1]
HELP_TARGET_S = 0.5


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one command, measured with wait4 on that child alone."""
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


# Issue 14's targets for `make demo` (the demo chain from an empty registry on 2 CPU cores).
DEMO_MINUTES_TARGET = 12.0
DEMO_JUDGE_RISE_TARGETS = {"dpo": 0.30, "ppo": 0.25}  # over the SFT parent, >= 64 held-out prompts x 2
DEMO_DISTINCT_2_TARGET = 0.4
DEMO_REF_NLL_RISE_TARGET = 0.3
DEMO_REWARD_ACCURACY_TARGET = 0.80  # on >= 96 held-out pairs
DEMO_EVAL_SIZES = ["--limit", "64", "--num-samples", "2", "--max-new-tokens", "32"]  # the Makefile's EVAL_ARGS


def make_demo(registry: Path, scratch: Path, env: dict[str, str]) -> tuple[float, int]:
    """(wall minutes, exit code) of `make demo` as a user runs it (two stages at a time), from the empty
    `registry`, with an empty tokenised-data cache in `scratch` (the dequantised GGUF is shared: that happens
    once per machine)."""
    cache = scratch / "align-cache"
    cache.mkdir()
    if (cache_root() / "gguf").is_dir():
        (cache / "gguf").symlink_to(cache_root() / "gguf")
    start = time.perf_counter()
    done = subprocess.run(["make", "--no-print-directory", "demo", f"REGISTRY={registry}"], cwd=REPO,
                          env={**env, "ALIGN_CACHE": str(cache)}, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    return (time.perf_counter() - start) / 60, done.returncode


def demo_target_rows(minutes: float, evals: dict[str, EvalResult], reward_accuracy: float,
                     reward_pairs: int) -> list[tuple[str, ...]]:
    """One row per target of the demo chain, each saying met or not met with the measured value."""

    def row(name: str, value: str, met: bool) -> tuple[str, ...]:
        return (f"target: {name}", value, "-", "met" if met else "not met")

    rows = [row(f"demo chain <= {DEMO_MINUTES_TARGET:.0f} min", f"{minutes:.1f} min", minutes <= DEMO_MINUTES_TARGET)]
    for policy, target in DEMO_JUDGE_RISE_TARGETS.items():
        report = evals[policy]
        prompts = f"{report.prompts} prompts x {report.samples // max(report.prompts, 1)}"
        rows.append(row(f"demo-{policy} judge rise >= +{target:.2f} ({prompts}, >= 64 x 2)",
                        f"{report.judge_delta:+.3f} ± {report.judge_delta_stderr:.3f}",
                        report.judge_delta >= target and report.prompts >= 64 and report.samples >= 128))
        rows.append(row(f"demo-{policy} distinct-2 >= {DEMO_DISTINCT_2_TARGET}", f"{report.policy.distinct_2:.2f}",
                        report.policy.distinct_2 >= DEMO_DISTINCT_2_TARGET))
        rows.append(row(f"demo-{policy} reference-NLL rise <= {DEMO_REF_NLL_RISE_TARGET}",
                        f"{report.ref_nll_rise:+.3f}", report.ref_nll_rise <= DEMO_REF_NLL_RISE_TARGET))
    rows.append(row(f"demo-rm held-out accuracy >= {DEMO_REWARD_ACCURACY_TARGET:.2f} on >= 96 pairs",
                    f"{reward_accuracy:.3f} on {reward_pairs} pairs",
                    reward_accuracy >= DEMO_REWARD_ACCURACY_TARGET and reward_pairs >= 96))
    return rows


DPO_RSS_TARGET = 1.3  # x the SFT run's peak RSS: the reference is the same weights, adapter disabled
PPO_RSS_TARGET = 0.4  # x the peak RSS of the same PPO holding four model copies (policy, reference, value, reward)
PPO_MEMORY_STEPS = 2


def headline(registry: Path, stage: str) -> str:
    """The key metrics of the artifact a stage just published into `registry`."""
    for artifact in Registry(registry).list():
        if artifact.manifest.stage == stage:
            metrics = artifact.manifest.metrics
            values = {key: getattr(metrics, key) for key in STAGES[stage].headline}
            return ", ".join(f"{key} {value:.3g}" for key, value in values.items() if value is not None)
    return "published nothing"


def eval_headline(registry: Path, name: str) -> str:
    """The judge rise, KL and fluency guards of the eval.json `align eval` just wrote beside NAME's latest version."""
    report = EvalResult.of(Registry(registry).resolve(f"{name}@latest").path)
    if report is None:
        return "wrote no eval.json"
    policy, parent = report.policy, report.parent_model
    kl = "–" if report.kl is None else f"{report.kl:.2f}/seq ({report.kl_per_token:.3f}/token)"
    return (f"judge {parent.judge:+.3f} -> {policy.judge:+.3f} ({report.judge_delta:+.3f} ± "
            f"{report.judge_delta_stderr:.3f}), KL {kl}, ref-NLL rise {report.ref_nll_rise:+.3f}, "
            f"distinct-2 {policy.distinct_2:.2f}, win rate {report.win_rate:.2f}")


def ppo_memory_rows(align: str, env: dict[str, str], label: str, recipe: str, registry: str) -> list[tuple[str, ...]]:
    """`align ppo` with adapters on one base against the same PPO with four model copies: peak RSS of each run,
    and the weight storage each holds (`weights_mib` in the manifest: distinct tensors over the four roles)."""
    peaks, weights = {}, {}
    for models in ("shared", "separate"):
        name = f"{label}-ppo-{models}"
        _, peaks[models], code = measure([align, "ppo", recipe, "--registry", registry, "--set", f"ppo.models={models}",
                                          "--set", f"train.max_steps={PPO_MEMORY_STEPS}", "--set", f"name={name}"], env)
        if code:
            return [(f"{label} PPO memory, ppo.models={models}", "-", "-", f"exit {code}")]
        weights[models] = Registry(registry).resolve(f"{name}@latest").manifest.metrics.weights_mib
    ratio = peaks["shared"] / peaks["separate"]
    return [(f"{label} PPO peak RSS: one base + adapters / four model copies ({PPO_MEMORY_STEPS} steps)",
             f"{ratio:.2f}x", f"{peaks['shared']:.0f} / {peaks['separate']:.0f} MiB",
             "ok" if ratio <= PPO_RSS_TARGET else f"over the {PPO_RSS_TARGET}x target"),
            (f"{label} PPO weights held: one base + adapters / four model copies",
             f"{weights['shared'] / weights['separate']:.2f}x", "-",
             f"{weights['shared']:.0f} / {weights['separate']:.0f} MiB")]


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
    parser.add_argument("--demo", action="store_true",
                        help="also time `make demo` against its targets, and the demo chain stage by stage (~30 min)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    parser.add_argument("--ppo-memory", type=Path, metavar="REGISTRY",
                        help="only compare PPO peak RSS (one base vs four copies) on the demo artifacts in REGISTRY")
    parser.add_argument("--trl", action="store_true",
                        help="also compare SFT, DPO and reward tokens/s with plain TRL scripts (last chain's recipes)")
    parser.add_argument("--trl-steps", type=int, default=8, help="optimizer steps per run of the --trl comparison")
    parser.add_argument("--trl-precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="train.precision of every --trl run (auto: align's choice for the model and CPU)")
    args = parser.parse_args()
    if args.trl and args.trl_steps < 3:
        parser.error("--trl-steps: at least 3 (tokens/s is measured from the end of step 1)")
    align = str(Path(sys.executable).with_name("align"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.ppo_memory:
        rows = ppo_memory_rows(align, env, "demo", "recipes/demo/ppo.yaml", str(args.ppo_memory))
        write_section(args.out, "## PPO memory on the demo model", rows)
        return
    rows = []
    extra = ""

    help_times = [measure([align, "--help"], env)[0] for _ in range(7)]
    median = statistics.median(help_times)
    rows.append(("`align --help` (median of 7)", f"{median * 1000:.0f} ms",
                 "-", "ok" if median < HELP_TARGET_S else f"over the {HELP_TARGET_S * 1000:.0f} ms target"))

    if args.demo:
        with tempfile.TemporaryDirectory() as registry, tempfile.TemporaryDirectory() as scratch:
            minutes, code = make_demo(Path(registry), Path(scratch), env)
            rows.append(("`make demo` from an empty registry (two stages at a time)", f"{minutes:.1f} min", "-",
                         "ok" if code == 0 else f"exit {code}"))
            if code == 0:
                reg = Registry(Path(registry))
                evals = {policy: EvalResult.of(reg.resolve(f"demo-{policy}@latest").path) for policy in ("dpo", "ppo")}
                reward = reg.resolve("demo-rm@latest").manifest.metrics
                rows.extend(demo_target_rows(minutes, evals, reward.eval_accuracy, reward.eval_pairs))

    chains = [("tiny", "recipes/tiny")] + ([("demo", "recipes/demo")] if args.demo else [])
    for label, recipes in chains:
        with tempfile.TemporaryDirectory() as registry:
            peak = {}
            total = 0.0
            for stage in ("sft", "pairs", "reward", "dpo", "ppo"):
                recipe = f"{recipes}/{stage}.yaml"
                wall, peak[stage], code = measure([align, stage, recipe, "--registry", registry], env)
                total += wall
                result = headline(Path(registry), stage) if code == 0 else f"exit {code}"
                rows.append((f"{label} {stage}: `{recipe}`", f"{wall:.1f} s", f"{peak[stage]:.0f} MiB", result))
            card = "tiny-story-prompts" if label == "tiny" else "demo-prompts"
            # The same evaluation `make pipeline` runs (the demo's is smaller: see EVAL_ARGS in the Makefile).
            sizes = DEMO_EVAL_SIZES if label == "demo" else []
            for policy in ("dpo", "ppo"):
                wall, rss, code = measure([align, "eval", f"{label}-{policy}@latest", "--data",
                                           f"data_cards/{card}.yaml", "--reward", f"{label}-rm@latest",
                                           "--registry", registry, *sizes], env)
                total += wall
                result = eval_headline(Path(registry), f"{label}-{policy}") if code == 0 else f"exit {code}"
                size = "64 prompts x 2" if sizes else "64 prompts x 4"
                rows.append((f"{label} eval: {label}-{policy} vs {label}-sft, {size}", f"{wall:.1f} s",
                             f"{rss:.0f} MiB", result))
            rows.append((f"{label} chain, sft to both evals, one stage at a time", f"{total / 60:.1f} min", "-", ""))
            ratio = peak["dpo"] / peak["sft"]
            rows.append((f"{label} DPO peak RSS / SFT peak RSS", f"{ratio:.2f}x", "-",
                         "ok" if ratio <= DPO_RSS_TARGET else f"over the {DPO_RSS_TARGET}x target"))
            rows.extend(ppo_memory_rows(align, env, label, f"{recipes}/ppo.yaml", registry))
            if args.trl and (label, recipes) == chains[-1]:
                extra = trl_section(label, recipes, Path(registry), args.trl_steps, args.trl_precision, env)

    write_section(args.out, "## Latest `make bench` run", rows, extra)


def trl_section(label: str, recipes: str, registry: Path, steps: int, precision: str, env: dict[str, str]) -> str:
    """The align-vs-plain-TRL tokens/s table, on `recipes` with the SFT and pairs artifacts the chain just made."""
    results = trl_compare(REPO / recipes, registry=registry, steps=steps, precision=precision, env=env)
    scope = ("the issue's targets are for this model" if label == "demo" else
             "a smoke check: on a 0.29M-parameter model per-step overheads dominate; the targets are for the demo")
    return "\n".join([f"### align vs plain TRL: training tokens/s, {label} recipes ({scope})", "",
                       trl_markdown(results, steps, precision), ""])


def write_section(out: Path, heading: str, rows: list[tuple[str, ...]], extra: str = "") -> None:
    """Replace (or add) one `## heading` section of the benchmarks file, keeping every other section; `extra`
    (Markdown under `###` headings) follows the table inside the section."""
    header = (f"Machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
              f"{platform.system()} {platform.release()}. Date: {dt.date.today().isoformat()}.")
    table = ["| benchmark | wall time | peak RSS | result |", "| --- | --- | --- | --- |"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    section = "\n".join([heading, "", header, "", *table, "", *([extra] if extra else [])])
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = out.read_text() if out.exists() else "# Benchmarks\n\n"
    if heading in previous:
        head, _, rest = previous.partition(heading)
        tail = rest[rest.find("\n## ", 1):] if "\n## " in rest else ""
        out.write_text(head.rstrip() + "\n\n" + section + "\n" + tail.lstrip("\n"))
    else:
        out.write_text(previous.rstrip() + "\n\n" + section)
    print(section)


if __name__ == "__main__":
    main()
