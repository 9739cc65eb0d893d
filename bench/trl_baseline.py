"""align against plain TRL scripts: training tokens/s of SFT, DPO and reward-model training (issue 14).

For each stage the same recipe trains for the same N optimizer steps three or four times, each run a subprocess:

- **align**: `align <stage> RECIPE --set train.max_steps=N --set train.precision=P`, published under a bench name
  (`<name>-trlbench`) in a scratch registry, so the registry the recipes read from is left as it was;
- **align, uniform batches**: the same with `train.group_by_length=false`, when the recipe groups rows by length
  (align's default): TRL's batches are uniformly random, so this run, not the grouped one, has the same batches
  as the plain script and measures align's own overhead;
- **same**: `plain` below, a plain TRL script (SFTTrainer / DPOTrainer / RewardTrainer + a peft LoraConfig) with the
  settings align ran with: the same base weights and parent adapters, rows, LoRA and TrainingArguments (batch,
  lr, schedule, max_steps, max_length, seed, precision, checkpointing, optimizer, checkpoint saves);
- **defaults**: the same script leaving bf16, activation checkpointing and the optimizer at TRL's defaults
  (bf16=True, activation checkpointing on, adamw_torch_fused: all three run on this CPU with torch 2.13).

tokens/s = the non-pad tokens of the micro-batches the trainer actually trained on (transformers'
`include_num_input_tokens_seen="non_padding"`: the sum of every batch's attention_mask; DPO's chosen and
rejected sequences both count) / the time they took, by transformers' own clock: every run logs every step
(`train.logging_steps=1`), each log carries the tokens so far and the seconds since the training loop began,
and the rate is taken from the end of step 1 to the end of step N. Step 1 is left out because align evaluates
before training, which warms the model's kernels and allocator, and a plain script does not: the first step
would measure that, not training. Model loading, data preparation, DPO's reference precompute, align's
evaluations and the final checkpoint save are outside the window on both sides. align does not record the
token count itself, so its run goes through `align` below, which switches the same transformers counter on;
the counts land in the artifact's log_history.json.
Rows, tokenizer and the paths of the base weights and parent adapters are read with align's own helpers on
both sides: loading data is not what is compared.

Where the runs cannot be identical, and why the rate still compares like with like: align's DPO leaves
cut-off replies open (no end of turn; `align.stages.dpo`), TRL's closes them, so the plain DPO trains a few more
tokens (the rate divides them out); the reward model's score head is initialised from the process's torch RNG
when the model loads (align and this script both pass a loaded model; TRL seeds only when it loads a model
itself), so reward losses differ slightly between the sides. SFT trains the same batches to the same loss.

Run alone on the machine: `python bench/trl_baseline.py --recipes recipes/demo --steps 8` (with
`--registry R` holding the recipes' `model.from` and `data.card` artifacts, else `align sft` and `align pairs`
run first). `bench/run.py --trl` adds the table to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sft", "dpo", "reward")
VARIANTS = ("same", "defaults")
OVERHEAD_TARGET = 0.95  # align / plain TRL with the same settings
DEFAULTS_TARGET = 1.5  # align / plain TRL with TRL's defaults
SETTINGS = ("precision", "activation_checkpointing", "optim")  # what align resolves per device
BENCH_EVAL_LIMIT = 8  # align evaluates before and after training, outside the timed loop: keep it short
TRL_DEFAULTS_NOTE = "bf16=True, activation checkpointing on, optim adamw_torch_fused (all accepted by this CPU)"


@dataclass
class Run:
    """One training run as measured: transformers' train_runtime and token count, and what it ran with."""

    runtime_s: float | None = None  # transformers' train_runtime: the whole training loop
    tokens: int | None = None  # non-pad tokens of every trained batch
    window_s: float | None = None  # the end of step 1 to the end of step N
    window_tokens: int | None = None
    train_loss: float | None = None
    steps: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def tokens_per_s(self) -> float | None:
        if self.error or not self.window_s or not self.window_tokens:
            return None
        return self.window_tokens / self.window_s


def steady_window(history: list[dict[str, Any]]) -> tuple[int, float] | None:
    """(tokens, seconds) from the end of the first logged training step to the end of the last, read from a
    trainer's log history when it logged every step with the token counter on; None with fewer than two steps."""
    steps = sorted((entry for entry in history if "loss" in entry and "train_runtime" in entry
                    and "num_input_tokens_seen" in entry), key=lambda entry: entry["step"])
    if len(steps) < 2 or steps[-1]["train_runtime"] <= steps[0]["train_runtime"]:
        return None
    first, last = steps[0], steps[-1]
    return (int(last["num_input_tokens_seen"] - first["num_input_tokens_seen"]),
            float(last["train_runtime"] - first["train_runtime"]))


@dataclass
class StageResult:
    """One stage's runs. `uniform` is align with uniformly random batches (the plain script's kind), the
    same run as `align` when the recipe does not group rows by length."""

    stage: str
    align: Run
    uniform: Run
    same: Run
    defaults: Run
    grouped: bool = False

    @staticmethod
    def _ratio(mine: Run, theirs: Run) -> float | None:
        return mine.tokens_per_s / theirs.tokens_per_s if mine.tokens_per_s and theirs.tokens_per_s else None

    @property
    def overhead_ratio(self) -> float | None:
        """align / plain TRL on the same batches with the same settings: align's own overhead."""
        return self._ratio(self.uniform, self.same)

    @property
    def defaults_ratio(self) -> float | None:
        """align as a user runs it / plain TRL with TRL's defaults."""
        return self._ratio(self.align, self.defaults)

    def runs(self) -> list[tuple[str, Run]]:
        uniform = [("align uniform", self.uniform)] if self.grouped else []
        return [("align", self.align), *uniform, ("plain same", self.same), ("plain defaults", self.defaults)]

    def problems(self) -> list[str]:
        """Why the overhead comparison may not be like for like (empty when it is)."""
        found = [f"{name}: {run.error}" for name, run in self.runs() if run.error]
        if not self.uniform.error and not self.same.error:
            differ = {key: (self.uniform.settings.get(key), self.same.settings.get(key)) for key in SETTINGS
                      if self.uniform.settings.get(key) != self.same.settings.get(key)}
            if differ:
                found.append(f"settings differ (align, plain): {differ}")
            if self.uniform.steps != self.same.steps:
                found.append(f"steps differ: align {self.uniform.steps}, plain {self.same.steps}")
        return found


# ---- the plain TRL script -------------------------------------------------------------------------------------


def plain_inputs(recipe: Any, registry_root: Path) -> dict[str, Any]:
    """What the plain script starts from, found with align's helpers (a GGUF base is dequantised once into
    align's cache, the directory align itself loads): the base weights' HF directory, the parent adapters to
    merge (oldest first), the tokenizer's directory and the train rows as TRL reads them."""
    from align import integrity, models
    from align.artifacts import Registry
    from align.data import load_card, load_data, resolve_card
    from align.generation import to_plain_text_row

    registry = Registry(registry_root)
    start = models.resolve_starting_point(recipe, registry)
    base_dir, load_kwargs = models._load_location(start.base)
    card_path, _ = resolve_card(recipe.data.card, recipe.path.parent, registry)
    rows = load_data(load_card(card_path), limit=recipe.data.limit, eval_limit=recipe.data.eval_limit).train
    if recipe.model.chat_template == "none":
        rows = [to_plain_text_row(row) for row in rows]
    columns = ("prompt", "completion") if recipe.stage == "sft" else ("prompt", "chosen", "rejected")
    return {
        "base": base_dir,
        "load_kwargs": load_kwargs,
        "adapters": [str(integrity.chain_adapter_dir(entry, registry)) for entry in start.chain],
        "tokenizer": str(start.parent.path) if start.parent else base_dir,
        "rows": [{key: row[key] for key in columns} for row in rows],
    }


def plain_settings(recipe: Any, registry_root: Path) -> dict[str, Any]:
    """precision, activation checkpointing and optimizer as align resolves them for this recipe on this machine
    (recipe values, else align's device defaults, which depend on the model's size): used when the bench has no
    align run to copy them from."""
    from align import models
    from align.artifacts import Registry
    from align.device import detect_device, resolve_device_defaults

    start = models.resolve_starting_point(recipe, Registry(registry_root))
    train = resolve_device_defaults(recipe, detect_device(), models.hidden_size(start.base)).train
    return {key: getattr(train, key) for key in SETTINGS}


def plain_run(recipe: Any, registry_root: Path, variant: str, output_dir: Path,
              settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train with TRL and peft alone, as a user would write it, and return the measurement. `settings`
    (precision, activation_checkpointing, optim: what align ran with) apply to the `same` variant; without them
    align's resolution for this machine is used."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from align.models import DEFAULT_CHAT_TEMPLATE

    stage, train, lora = recipe.stage, recipe.train, recipe.lora
    inputs = plain_inputs(recipe, registry_root)
    same = settings or plain_settings(recipe, registry_root)
    on_gpu = torch.cuda.is_available()

    tokenizer = AutoTokenizer.from_pretrained(inputs["tokenizer"], **inputs["load_kwargs"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    template = recipe.model.chat_template
    if template == "default" or (template == "auto" and not tokenizer.chat_template):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE

    # Weights in fp32 on CPU (bf16 there is autocast over fp32 weights), in the training precision on GPUs.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(same["precision"], torch.float32) if on_gpu \
        else torch.float32
    if stage == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(inputs["base"], num_labels=1, dtype=dtype,
                                                                   **inputs["load_kwargs"])
    else:
        model = AutoModelForCausalLM.from_pretrained(inputs["base"], dtype=dtype, **inputs["load_kwargs"])
    for adapter in inputs["adapters"]:  # the SFT parent, folded into the weights
        config = PeftConfig.from_pretrained(adapter)
        config.task_type = None  # a causal-LM adapter merges into the score-head model too
        model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    if stage == "reward":
        model.config.pad_token_id = tokenizer.pad_token_id

    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                             target_modules=lora.target_modules, modules_to_save=lora.modules_to_save, bias=lora.bias,
                             layers_to_transform=lora.layers_to_transform,
                             task_type="SEQ_CLS" if stage == "reward" else "CAUSAL_LM")
    args: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": train.learning_rate,
        "num_train_epochs": train.num_train_epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "max_length": train.max_length,
        "warmup_steps": train.warmup_steps,
        "lr_scheduler_type": train.lr_scheduler_type,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "seed": train.seed,
        "data_seed": train.seed,
        "logging_steps": train.logging_steps,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "report_to": "none",
        "disable_tqdm": False,
        "use_cpu": not on_gpu,
        "include_num_input_tokens_seen": "non_padding",
    }
    if variant == "same":
        args.update(bf16=same["precision"] == "bf16", fp16=same["precision"] == "fp16",
                    activation_checkpointing=same["activation_checkpointing"], optim=same["optim"])

    if stage == "sft":
        from trl import SFTConfig as Config
        from trl import SFTTrainer as Trainer
        args.update(packing=train.packing, completion_only_loss=recipe.sft.completion_only_loss)
    elif stage == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
        dpo = recipe.dpo
        args.update(beta=dpo.beta, loss_type=list(dpo.loss_type), loss_weights=dpo.loss_weights,
                    label_smoothing=dpo.label_smoothing, precompute_ref_log_probs=dpo.precompute_ref_log_probs)
    else:
        from trl import RewardConfig as Config
        from trl import RewardTrainer as Trainer
        args.update(center_rewards_coefficient=recipe.reward.center_rewards_coefficient)

    config = Config(**args)
    trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_list(inputs["rows"]),
                      processing_class=tokenizer, peft_config=peft_config)
    metrics = trainer.train().metrics
    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "fp32"
    optim = getattr(config.optim, "value", config.optim)
    window_tokens, window_s = steady_window(trainer.state.log_history) or (None, None)
    return {"runtime_s": metrics["train_runtime"], "tokens": int(trainer.state.num_input_tokens_seen),
            "window_s": window_s, "window_tokens": window_tokens,
            "train_loss": metrics.get("train_loss"), "steps": trainer.state.global_step,
            "settings": {"precision": precision, "activation_checkpointing": bool(config.activation_checkpointing),
                         "optim": optim}}


# ---- align with the token counter on -------------------------------------------------------------------------


def align_counted(argv: list[str]) -> None:
    """`align ARGV` with transformers' non-pad token counter switched on in every TRL config align builds (the
    count, identical in kind to the plain script's, is logged into the artifact's log_history.json)."""
    from align import cli, training

    plain_args = training.trainer_args

    def counted(run: Any) -> dict[str, Any]:
        return {"include_num_input_tokens_seen": "non_padding", **plain_args(run)}

    training.trainer_args = counted
    cli.main(argv)


def align_measurement(registry_root: Path, name: str) -> Run:
    """The measurement of a bench run align published as `name`: manifest metrics and recorded settings, and
    the token count from its log_history.json."""
    from align.artifacts import Registry

    artifact = Registry(registry_root).resolve(f"{name}@latest")
    metrics = artifact.manifest.metrics
    history = json.loads((artifact.path / "log_history.json").read_text(encoding="utf-8"))
    tokens = max((int(entry.get("num_input_tokens_seen", 0)) for entry in history), default=0)
    window_tokens, window_s = steady_window(history) or (None, None)
    train = artifact.manifest.recipe.get("train", {})
    return Run(runtime_s=metrics.train_runtime_s, tokens=tokens or None, window_s=window_s,
               window_tokens=window_tokens, train_loss=metrics.train_loss, steps=metrics.global_step,
               settings={key: train.get(key) for key in SETTINGS},
               error=None if window_s else "log_history.json has no per-step token counts (fewer than 2 steps?)")


# ---- the comparison ------------------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return " | ".join(line.strip() for line in text[-lines:])[:300]


def _run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """Run one command from the repository root with its output in `log`; its exit code."""
    with log.open("w") as out:
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=False).returncode


def bench_overrides(recipe_path: Path, steps: int, precision: str) -> list[str]:
    """`--set` overrides of a bench run. Only max_steps and precision change what is trained; every step is
    logged (the rate's clock); align's before/after evaluation (outside the timed loop, and absent from the plain
    script) is kept short."""
    from align.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    sets = [f"train.max_steps={steps}", f"train.precision={precision}", "train.logging_steps=1"]
    if recipe.data.eval_limit is None or recipe.data.eval_limit > BENCH_EVAL_LIMIT:
        sets.append(f"data.eval_limit={BENCH_EVAL_LIMIT}")
    if recipe.stage == "sft":
        sets.append("sft.num_samples=0")
    return sets


def scratch_registry(recipes: Path, source: Path | None, scratch: Path, stages: tuple[str, ...],
                     env: dict[str, str], logs: Path) -> None:
    """Fill `scratch` with what the dpo and reward recipes read (their model.from and data.card artifacts):
    copied from `source`, or made by `align sft` and `align pairs` with the recipes as they are."""
    from align.artifacts import Registry
    from align.data.card_refs import is_artifact_ref
    from align.recipe import load_recipe

    refs = set()
    for stage in set(stages) & {"dpo", "reward"}:
        recipe = load_recipe(recipes / f"{stage}.yaml")
        refs |= {ref for ref in (recipe.model.from_, recipe.data.card) if ref and is_artifact_ref(ref)}
    if not refs:
        return
    if source is not None:
        for ref in sorted(refs):
            artifact = Registry(source).resolve(ref)
            shutil.copytree(artifact.path, scratch / artifact.name / artifact.path.name)
        return
    for stage in ("sft", "pairs"):
        code = _run_logged([sys.executable, "-m", "align", stage, str(recipes / f"{stage}.yaml"), "--registry",
                               str(scratch)], logs / f"prepare-{stage}.log", env)
        if code:
            raise RuntimeError(f"align {stage} failed (exit {code}): {_tail(logs / f'prepare-{stage}.log')}")


def grouped_by_length(recipe: Any) -> bool:
    """Whether align batches this recipe's rows by length (`train.group_by_length`, where align has it)."""
    return bool(getattr(recipe.train, "group_by_length", False))


def compare_stage(stage: str, recipes: Path, registry: Path, steps: int, precision: str,
                  env: dict[str, str], logs: Path) -> StageResult:
    """align (and align with uniform batches when it groups by length), then the plain script with the same
    settings, then with TRL's defaults, on one stage's recipe."""
    from align.recipe import load_recipe

    recipe_path = recipes / f"{stage}.yaml"
    recipe = load_recipe(recipe_path)
    sets = bench_overrides(recipe_path, steps, precision)
    flags = [flag for item in sets for flag in ("--set", item)]
    script = str(Path(__file__).resolve())

    def align_run(suffix: str, extra: list[str]) -> Run:
        name, log = f"{recipe.name}-trlbench{suffix}", logs / f"{stage}-align{suffix}.log"
        code = _run_logged([sys.executable, script, "align", stage, str(recipe_path), "--registry", str(registry),
                            *flags, *extra, "--set", f"name={name}"], log, env)
        return align_measurement(registry, name) if code == 0 else Run(error=f"exit {code}: {_tail(log)}")

    grouped = grouped_by_length(recipe)
    align = align_run("", [])
    uniform = align_run("-uniform", ["--set", "train.group_by_length=false"]) if grouped else align

    # The same-settings script copies what align resolved (its manifest's recipe) rather than re-deriving it.
    copied = ["--settings", json.dumps(uniform.settings)] if not uniform.error else []
    plain = {}
    for variant in VARIANTS:
        log, out = logs / f"{stage}-{variant}.log", logs / f"{stage}-{variant}.json"
        code = _run_logged([sys.executable, script, "plain", str(recipe_path), "--registry", str(registry),
                            "--variant", variant, "--out", str(out), *copied, *flags], log, env)
        plain[variant] = Run(**json.loads(out.read_text())) if code == 0 else Run(error=f"exit {code}: {_tail(log)}")
    return StageResult(stage, align, uniform, plain["same"], plain["defaults"], grouped)


def compare(recipes: Path, *, registry: Path | None = None, steps: int = 8, precision: str = "auto",
            stages: tuple[str, ...] = STAGES, env: dict[str, str] | None = None,
            logs: Path | None = None) -> list[StageResult]:
    """Every stage's three runs, in a scratch registry (removed afterwards) seeded from `registry`.
    Subprocess logs go to `logs` (a temporary directory, removed, when None)."""
    env = {**(env or os.environ), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="trl-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        log_dir = logs or scratch / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        registry_dir = scratch / "registry"
        registry_dir.mkdir()
        scratch_registry(recipes, registry, registry_dir, stages, env, log_dir)
        return [compare_stage(stage, recipes, registry_dir, steps, precision, env, log_dir) for stage in stages]


# ---- the report ----------------------------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _verdict(ratio: float | None, target: float) -> tuple[str, str]:
    if ratio is None:
        return "–", "not measured"
    return f"{ratio:.2f}x", "met" if ratio >= target else "not met"


def describe(run: Run) -> str:
    """One run's figures and settings, for the notes under the table."""
    loss = "–" if run.train_loss is None else f"{run.train_loss:.4f}"
    checkpointing = "on" if run.settings.get("activation_checkpointing") else "off"
    return (f"{run.window_tokens or '–'} tokens in {run.window_s or 0:.2f} s (whole loop {run.tokens or '–'} in "
            f"{run.runtime_s or 0:.2f} s, train_loss {loss}, {run.settings.get('precision', '?')}, activation "
            f"checkpointing {checkpointing}, {run.settings.get('optim', '?')})")


def markdown(results: list[StageResult], steps: int, precision: str) -> str:
    """The comparison as a Markdown table with its notes (what was run, tokens, losses, any problem)."""
    lines = ["| stage | align tokens/s | align, uniform batches | plain TRL, same settings | ratio | target ≥ 0.95x "
             "| plain TRL, TRL defaults | ratio | target ≥ 1.5x |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for result in results:
        same_ratio, same_met = _verdict(result.overhead_ratio, OVERHEAD_TARGET)
        default_ratio, default_met = _verdict(result.defaults_ratio, DEFAULTS_TARGET)
        uniform = _rate(result.uniform.tokens_per_s) if result.grouped else "(the same run)"
        lines.append(f"| {result.stage} | {_rate(result.align.tokens_per_s)} | {uniform} | "
                     f"{_rate(result.same.tokens_per_s)} | {same_ratio} | {same_met} | "
                     f"{_rate(result.defaults.tokens_per_s)} | {default_ratio} | {default_met} |")
        notes += [f"- {result.stage}, {name}: {describe(run)}." for name, run in result.runs() if not run.error]
        notes += [f"- {result.stage}: **{problem}**" for problem in result.problems()]
    header = (f"{steps} optimizer steps per run, `train.precision={precision}`. tokens/s = non-pad tokens of the "
              f"trained batches / their time by transformers' clock, steps 2 to {steps} (step 1 warms up; align "
              "evaluates before training, a plain script does not). align: the recipe as align runs it (rows "
              "grouped by length where `train.group_by_length` is on). Overhead ratio: align with uniformly random "
              "batches (`train.group_by_length=false`, the batches TRL draws) / the plain TRL script with the "
              "recipe's data, LoRA and TrainingArguments and align's resolved precision, checkpointing and "
              f"optimizer. Defaults ratio: align / the same script with TRL's defaults, {TRL_DEFAULTS_NOTE}. "
              "Weights are loaded in fp32 on every side.")
    return "\n".join([header, "", *lines, "", *notes])


# ---- command line --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["align"]:  # internal: one align run with the token counter on
        align_counted(argv[1:])
        return
    if argv[:1] == ["plain"]:
        plain_main(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", type=Path, default=REPO / "recipes" / "tiny",
                        help="directory with sft.yaml, dpo.yaml, reward.yaml (and pairs.yaml)")
    parser.add_argument("--registry", type=Path,
                        help="registry holding the dpo/reward recipes' model.from and data.card artifacts "
                             "(copied, never written); without it align sft and align pairs run first")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (at least 3)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="train.precision for every run; auto is align's choice for this machine")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--logs", type=Path, help="keep the subprocess logs here")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps: at least 3 (the rate is measured from the end of step 1)")
    results = compare(args.recipes.resolve(), registry=args.registry, steps=args.steps, precision=args.precision,
                      stages=tuple(args.stages), logs=args.logs)
    print(markdown(results, args.steps, args.precision))


def plain_main(argv: list[str]) -> None:
    """`plain RECIPE --registry R --variant same|defaults --out FILE [--settings JSON] [--set KEY=VALUE ...]`: one
    plain TRL run."""
    from align.recipe import load_recipe

    parser = argparse.ArgumentParser(prog="trl_baseline.py plain")
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--registry", type=Path, required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--settings", type=json.loads, help="JSON: precision, activation_checkpointing, optim "
                                                             "for --variant same (default: align's for this machine)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.sets)
    with tempfile.TemporaryDirectory(prefix="trl-plain-") as output_dir:
        result = plain_run(recipe, args.registry, args.variant, Path(output_dir), args.settings)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
