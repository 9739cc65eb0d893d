"""The reward–KL frontier of the tiny chain: sweep the KL coefficient of `align ppo`, `align grpo` and `align dpo`
on two objectives and measure each policy's judge rise against its KL to the SFT parent (Rafailov et al. 2023,
figure 2). Not part of `make test`: the default sweep is dozens of training runs (see docs/BENCHMARKS.md).

    python bench/frontier.py                                   # the full sweep, defaults below
    python bench/frontier.py --smoke --objectives keyword --ppo-values 0.1 --grpo-values 0.1 --dpo-values 0.3

Objectives (each an `align eval --judge`):
  vader    positive sentiment. DPO learns pairs labelled by VADER; PPO and GRPO optimise the tiny reward model
           trained on those pairs (as recipes/tiny do); `align eval` also scores that reward model (--reward).
  keyword  `bench.objectives:keyword_count`, the count of the word "happy". DPO learns pairs labelled by it; PPO
           and GRPO are rewarded by the same function directly (reward_function, no reward model).

Everything runs in one registry, one `python -m align` subprocess at a time. A job whose artifact already exists
with the same recipe and overrides (and an evaluation with the same settings) is reused, so an interrupted sweep
continues where it stopped; --fresh re-runs everything. Writes a markdown and a JSON summary (--out), the
per-job logs beside them, and `align report` of the swept policies (its frontier plot).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.artifacts import Artifact, Registry
from align.eval_result import EVAL_FILE, EvalResult

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny"
EVAL_CARD = "data_cards/tiny-story-prompts.yaml"
KEYWORD_JUDGE = "bench.objectives:keyword_count"
OUT_DIR = REPO / "bench" / "out" / "frontier"  # bench/out/ is git-ignored


@dataclass(frozen=True)
class Objective:
    judge: str  # `align eval --judge` and `pairs.judge`
    rl_reward: str  # "reward-model" (train one on the judge's pairs) or "function" (the judge itself)
    about: str


OBJECTIVES = {
    "vader": Objective("vader", "reward-model", "positive sentiment (VADER compound, -1..1)"),
    "keyword": Objective(KEYWORD_JUDGE, "function", 'count of the word "happy" (bench/objectives.py)'),
}
# The swept coefficient of each method, and its defaults: log-spaced around the recipes' own values
# (ppo.kl_coef 0.1, grpo.beta 0.1, dpo.beta 0.3). Smaller means further from the SFT parent.
METHODS = {
    "ppo": ("ppo.kl_coef", (0.01, 0.03, 0.1, 0.3, 1.0)),
    "grpo": ("grpo.beta", (0.01, 0.03, 0.1, 0.3, 1.0)),
    "dpo": ("dpo.beta", (0.03, 0.1, 0.3, 1.0)),
}
SMOKE = {"steps": 2, "data_limit": 32, "rollout": 16, "eval_limit": 8, "eval_samples": 2}


class JobFailed(RuntimeError):
    pass


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, not {text!r}")
    return values


def _names(allowed: dict[str, Any]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        unknown = [n for n in names if n not in allowed]
        if not names or unknown:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), not {text!r}")
        return names
    return parse


class Runner:
    """Runs `python -m align` jobs one at a time, logs each, times each, and reuses what is already there."""

    def __init__(self, registry: Path, logs: Path, fresh: bool) -> None:
        self.registry, self.logs, self.fresh = registry, logs, fresh
        self.artifacts = Registry(registry)
        self.jobs: list[dict[str, Any]] = []
        path = os.environ.get("PYTHONPATH")
        # The keyword judge is `bench.objectives:...`, imported by align: the repository root must be importable.
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join([str(REPO), *([path] if path else [])])}

    def _latest(self, name: str) -> Artifact | None:
        return self.artifacts.resolve(f"{name}@latest") if self.artifacts.versions(name) else None

    def run_job(self, what: str, args: list[str]) -> float:
        """Run `python -m align ARGS --registry REGISTRY`, logging to `<logs>/WHAT.log`; JobFailed on a non-zero exit.
        Returns the wall seconds."""
        log = self.logs / f"{what}.log"
        cmd = [sys.executable, "-m", "align", *args, "--registry", str(self.registry)]
        print(f"[frontier] {what}: {' '.join(args)}", flush=True)
        start = time.perf_counter()
        with log.open("w") as handle:
            handle.write(" ".join(cmd) + "\n\n")
            handle.flush()
            code = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        self.jobs.append({"job": what, "seconds": round(seconds, 1), "reused": False, "exit": code})
        if code:
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-15:]
            raise JobFailed(f"{what} exited {code} after {seconds:.0f} s: {tail[-1] if tail else '?'} (log {log})\n  "
                            + "\n  ".join(tail))
        print(f"[frontier]   done in {seconds:.0f} s", flush=True)
        return seconds

    def stage(self, stage: str, name: str, overrides: list[str]) -> str:
        """Run `align STAGE recipes/tiny/STAGE.yaml --set name=NAME --set ...` unless its latest version was made
        by the same recipe and overrides; the published ref (NAME@vN)."""
        recipe = TINY / f"{stage}.yaml"
        overrides = [f"name={name}", *overrides]
        latest = self._latest(name)
        if latest is not None and not self.fresh:
            manifest = latest.manifest
            if manifest.recipe_overrides == overrides and manifest.recipe_path == str(recipe):
                print(f"[frontier] {name}: reusing {latest.ref}", flush=True)
                self.jobs.append({"job": name, "seconds": 0.0, "reused": True, "exit": 0})
                return latest.ref
        self.run_job(name, [stage, str(recipe.relative_to(REPO)), *(a for o in overrides for a in ("--set", o))])
        latest = self._latest(name)
        assert latest is not None, f"{name}: the stage exited 0 but published nothing"
        return latest.ref

    def evaluate(self, ref: str, judge: str, reward: str | None, limit: int, samples: int) -> EvalResult:
        """`align eval REF` on the held-out story openings (the eval.json), reusing one with the same settings."""
        artifact = self.artifacts.resolve(ref)
        result = None if self.fresh else EvalResult.of(artifact.path)
        if result is not None:
            settings = result.settings
            if (settings.judge, settings.reward, settings.limit, settings.num_samples,
                    settings.card) == (judge, reward, limit, samples, EVAL_CARD):
                self.jobs.append({"job": f"eval-{artifact.name}", "seconds": 0.0, "reused": True, "exit": 0})
                return result
        args = ["eval", ref, "--data", EVAL_CARD, "--judge", judge, "--limit", str(limit),
                "--num-samples", str(samples), *(["--reward", reward] if reward else [])]
        self.run_job(f"eval-{artifact.name}", args)
        return EvalResult.read(artifact.path / EVAL_FILE)


def sweep(args: argparse.Namespace, runner: Runner) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every (objective, method, coefficient): train, evaluate, and one summary row; plus what each used."""
    data = [f"data.limit={args.data_limit}", f"data.eval_limit={args.data_limit}"] if args.data_limit else []
    train = [*data, *([f"train.max_steps={args.steps}"] if args.steps else [])]  # `align pairs` has no train
    sft = runner.stage("sft", "frontier-sft", train)
    rows: list[dict[str, Any]] = []
    used: dict[str, Any] = {"sft": sft, "objectives": {}}
    values = {"ppo": args.ppo_values, "grpo": args.grpo_values, "dpo": args.dpo_values}
    for objective_name in args.objectives:
        objective = OBJECTIVES[objective_name]
        info: dict[str, Any] = {"judge": objective.judge, "about": objective.about}
        used["objectives"][objective_name] = info
        try:
            pairs = runner.stage("pairs", f"frontier-pairs-{objective_name}",
                                 [f"model.from={sft}", *data, f"pairs.judge={objective.judge}"])
            info["pairs"] = pairs
            reward_model = None
            if objective.rl_reward == "reward-model" and {"ppo", "grpo"} & set(args.methods):
                reward_model = runner.stage("reward", f"frontier-rm-{objective_name}",
                                            [f"model.from={sft}", *train, f"data.card={pairs}"])
                info["reward_model"] = reward_model
        except JobFailed as exc:
            print(f"[frontier] {objective_name}: {exc}", file=sys.stderr, flush=True)
            info["error"] = str(exc).splitlines()[0]
            continue
        # PPO and GRPO of one objective share one reward signal: the reward model, else the judge function.
        rl = ([f"reward_model={reward_model}"] if reward_model else
              ["reward_model=null", f"reward_function={objective.judge}"])
        info["reward_signal"] = {
            "dpo": f"pairs {pairs} labelled by {objective.judge}",
            **{m: (f"reward model {reward_model} (trained on {pairs})" if reward_model else
                   f"reward_function {objective.judge}") for m in ("ppo", "grpo")}}
        eval_reward = reward_model  # reward-model scores beside the judge where one exists
        for method in args.methods:
            key, _ = METHODS[method]
            extra = [f"{method}.{o}" for o in rl] if method != "dpo" else [f"data.card={pairs}"]
            if method == "ppo" and args.rollout:
                extra.append(f"ppo.rollout_batch_size={args.rollout}")
            for value in values[method]:
                name = f"frontier-{objective_name}-{method}-{value:g}"
                row = {"objective": objective_name, "method": method, "coefficient": key, "value": value,
                       "reward_signal": info["reward_signal"][method], "artifact": None}
                try:
                    ref = runner.stage(method, name, [f"model.from={sft}", *train, *extra, f"{key}={value:g}"])
                    row["artifact"] = ref
                    result = runner.evaluate(ref, objective.judge, eval_reward, args.eval_limit, args.eval_samples)
                except JobFailed as exc:
                    print(f"[frontier] {name}: {exc}", file=sys.stderr, flush=True)
                    row["error"] = str(exc).splitlines()[0]
                    rows.append(row)
                    continue
                row.update(summarise(result))
                info.setdefault("parent", parent_summary(result))
                rows.append(row)
    return rows, used


def summarise(result: EvalResult) -> dict[str, Any]:
    """The frontier numbers of one eval.json (None where it measured nothing, e.g. no reward model)."""
    policy, parent = result.policy, result.parent_model
    return {
        "judge": policy.judge,
        "judge_rise": result.judge_delta, "judge_rise_stderr": result.judge_delta_stderr,
        "kl_per_sequence": result.kl, "kl_stderr": result.kl_stderr, "kl_per_token": result.kl_per_token,
        "distinct_2": policy.distinct_2, "ref_nll_rise": result.ref_nll_rise,
        "reward_rise": policy.reward - parent.reward if policy.reward is not None and parent.reward is not None
        else None,
        "win_rate": result.win_rate, "parent": result.parent, "samples": result.samples,
    }


def parent_summary(result: EvalResult) -> dict[str, Any]:
    parent = result.parent_model
    return {"ref": result.parent, "judge": parent.judge, "judge_stderr": parent.judge_stderr,
            "distinct_2": parent.distinct_2, "reward": parent.reward}


def _num(value: Any, spec: str = ".3f") -> str:
    return "–" if not isinstance(value, int | float) else format(value, spec)


def markdown(rows: list[dict[str, Any]], used: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = ["## Reward–KL frontier (`bench/frontier.py`)", "",
             f"Machine: {meta['machine']}. Date: {meta['date']}. Wall time {meta['total_minutes']:.1f} min "
             f"({meta['jobs_run']} jobs run, {meta['jobs_reused']} reused). Registry `{meta['registry']}`.", "",
             f"Command: `{meta['command']}`", "",
             f"Each policy against its SFT parent `{used.get('sft')}` on {meta['eval']}. Judge rise and KL per "
             "sequence (nats, k1 on the policy's own samples) ± standard errors; ref-NLL rise: the parent's NLL "
             "per token of the policy's replies minus of its own.", ""]
    for name, info in used["objectives"].items():
        parent = info.get("parent") or {}
        lines.append(f"- **{name}**: judge `{info['judge']}` — {info['about']}. SFT parent judge "
                     f"{_num(parent.get('judge'))} ± {_num(parent.get('judge_stderr'))}, distinct-2 "
                     f"{_num(parent.get('distinct_2'), '.2f')}.")
        for method, signal in (info.get("reward_signal") or {}).items():
            lines.append(f"  - {method}: {signal}")
        if info.get("error"):
            lines.append(f"  - failed: {info['error']}")
    lines += ["", "| objective | method | coefficient | judge rise ± stderr | KL / seq ± stderr | KL / token | "
              "distinct-2 | ref-NLL rise | reward-model rise | artifact |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['objective']} | {row['method']} | {row['coefficient']}={row['value']:g} | "
                         f"failed: {row['error']} | | | | | | {row['artifact'] or '–'} |")
            continue
        lines.append(
            f"| {row['objective']} | {row['method']} | {row['coefficient']}={row['value']:g} | "
            f"{_num(row['judge_rise'], '+.3f')} ± {_num(row['judge_rise_stderr'])} | "
            f"{_num(row['kl_per_sequence'], '.2f')} ± {_num(row['kl_stderr'], '.2f')} | "
            f"{_num(row['kl_per_token'])} | {_num(row['distinct_2'], '.2f')} | {_num(row['ref_nll_rise'], '+.3f')} | "
            f"{_num(row['reward_rise'], '+.3f')} | `{row['artifact']}` |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", type=Path, default=OUT_DIR / "registry", help="registry for every artifact")
    parser.add_argument("--out", type=Path, default=OUT_DIR / "frontier.md",
                        help="markdown summary; the JSON goes beside it (.json), logs into <stem>-logs/, the HTML "
                             "report into <stem>-report.html")
    parser.add_argument("--objectives", type=_names(OBJECTIVES), default=tuple(OBJECTIVES))
    parser.add_argument("--methods", type=_names(METHODS), default=tuple(METHODS))
    for method, (key, defaults) in METHODS.items():
        parser.add_argument(f"--{method}-values", type=_floats, default=defaults,
                            help=f"{key} values (default {','.join(f'{v:g}' for v in defaults)})")
    scale = parser.add_argument_group("scale (default: the recipes' own sizes)")
    scale.add_argument("--steps", type=int, help="train.max_steps of every training stage")
    scale.add_argument("--data-limit", type=int, help="data.limit and data.eval_limit of every stage")
    scale.add_argument("--rollout", type=int, help="ppo.rollout_batch_size")
    scale.add_argument("--eval-limit", type=int, help="held-out prompts per `align eval` (default 64)")
    scale.add_argument("--eval-samples", type=int, help="samples per prompt in `align eval` (default 4)")
    scale.add_argument("--smoke", action="store_true",
                       help="a quick check of the script: " + ", ".join(f"{k}={v}" for k, v in SMOKE.items()))
    parser.add_argument("--fresh", action="store_true", help="re-run every job even when its artifact exists")
    parser.add_argument("--no-report", action="store_true", help="skip `align report` of the swept policies")
    args = parser.parse_args()
    for key, value in SMOKE.items():  # an explicit knob wins over --smoke
        if args.smoke and getattr(args, key) is None:
            setattr(args, key, value)
    args.eval_limit = args.eval_limit or 64
    args.eval_samples = args.eval_samples or 4

    registry, out = args.registry.absolute(), args.out.absolute()
    logs = out.with_name(out.stem + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    registry.mkdir(parents=True, exist_ok=True)
    runner = Runner(registry, logs, args.fresh)
    start = time.perf_counter()
    try:
        rows, used = sweep(args, runner)
    except JobFailed as exc:  # the SFT itself failed: nothing to sweep
        print(f"[frontier] {exc}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - start) / 60
    meta = {
        "machine": machine(), "date": dt.date.today().isoformat(), "registry": str(registry),
        "command": " ".join(["python", "bench/frontier.py", *sys.argv[1:]]), "total_minutes": round(minutes, 2),
        "jobs_run": sum(not j["reused"] for j in runner.jobs), "jobs_reused": sum(j["reused"] for j in runner.jobs),
        "eval": f"{args.eval_limit} held-out prompts of {EVAL_CARD} x {args.eval_samples} samples",
        "scale": {k: getattr(args, k) for k in ("steps", "data_limit", "rollout", "eval_limit", "eval_samples")},
        "values": {m: list(getattr(args, f"{m}_values")) for m in args.methods},
    }
    out.write_text(markdown(rows, used, meta))
    summary = {"meta": meta, "used": used, "rows": rows, "jobs": runner.jobs}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(out.read_text())
    refs = [row["artifact"] for row in rows if row.get("artifact") and not row.get("error")]
    if refs and not args.no_report:
        report = out.with_name(out.stem + "-report.html")
        try:
            runner.run_job("report", ["report", *refs, "--out", str(report)])
            print(f"[frontier] report: {report}")
        except JobFailed as exc:
            print(f"[frontier] {exc}", file=sys.stderr)
    print(f"[frontier] summary: {out} and {out.with_suffix('.json')}")
    return 1 if any(row.get("error") for row in rows) or any(i.get("error") for i in used["objectives"].values()) \
        else 0


if __name__ == "__main__":
    sys.exit(main())
