"""The harness every trainer-based stage shares: run directory and resume, TRL config fields, manifest, publish.

A stage module (`align/stages/*.py`) reads top to bottom as: load data -> load model -> build its TRL
trainer with `trainer_args(...)` -> `train(...)` -> `publish(...)`. Only rank 0 publishes; every rank
agrees on the run directory because it is keyed by the content of the run, not by a clock or a pid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align import launch, models, quantization, redaction, runtime
from align.artifacts import Artifact, Registry, git_state, package_versions, parent_entry
from align.data import LoadedData, get_format, load_card, load_data, resolve_card
from align.data.formats import KIND_CONVERSIONS
from align.data.lengths import recipe_max_length
from align.data.report import unknown_columns_note
from align.device import detect_device, resolve_device_defaults
from align.errors import DataError, RecipeError, StageInterrupted
from align.generation import to_plain_text_row
from align.hashing import sha256_json
from align.models import StartingPoint
from align.recipe import Recipe
from align.stages import STAGES


@dataclass
class StageRun:
    """One execution of a stage recipe: where it checkpoints, whether it resumes, what it started from."""

    recipe: Recipe
    registry: Registry
    start: StartingPoint
    data_summary: dict[str, Any]
    device: dict[str, Any]
    run_dir: Path
    resume_from: Path | None
    data_parent: Artifact | None = None
    started: float = field(default_factory=time.time)
    notes: list[str] = field(default_factory=list)

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def open_run(recipe: Recipe, registry: Registry, start: StartingPoint, data_summary: dict[str, Any],
             device: dict[str, Any], resume: bool, data_parent: Artifact | None = None) -> StageRun:
    """Find (with --resume) or reset the run directory for this exact recipe, starting point and data."""
    # Every machine of a multi-node run must find the same run directory (checkpoints are shared): the one
    # recipe field that differs between them stays out of the key.
    recipe_content = recipe.to_dict()
    recipe_content["launch"] = {k: v for k, v in recipe_content["launch"].items() if k != "machine_rank"}
    key = sha256_json({
        "recipe": recipe_content,
        "start": [entry.model_dump() for entry in start.chain],
        "base": start.base.location,
        "data": [f["sha256"] for f in data_summary.get("files", [])],
    })[:16]
    run_dir = registry.run_dir(recipe.name, key)
    run = StageRun(recipe, registry, start, data_summary, device, run_dir, None, data_parent)
    if resume:
        run.resume_from = runtime.last_complete_checkpoint(run.checkpoints)
        if run.resume_from is None:
            run.notes.append("--resume: no interrupted run of this recipe was found; starting from the beginning")
    elif runtime.last_complete_checkpoint(run.checkpoints) is not None:
        run.notes.append("discarded the checkpoints of an earlier interrupted run (pass --resume to continue one)")
        if runtime.is_main_process():
            shutil.rmtree(run.checkpoints, ignore_errors=True)
    return run


@dataclass
class StageInputs:
    """What a trainer stage starts from: its device-resolved recipe, rows, run, tokenizer and model."""

    recipe: Recipe
    data: LoadedData
    run: StageRun
    tokenizer: Any
    model: Any
    # Pairs per split when the card's rows were converted to the kind the stage reads (`KIND_CONVERSIONS`).
    pairs: dict[str, int] | None = None


_FORMAT_KINDS = {"sft": "conversations to imitate", "preference": "chosen/rejected pairs", "prompts": "prompts",
                 "unpaired": "replies rated desirable/undesirable"}


def convert_kind(data: LoadedData, convert: Any) -> tuple[LoadedData, dict[str, int]]:
    """The card's rows converted row by row into the kind the stage reads (a pair -> two unpaired rows), and how
    many rows of the card each split held. Counts of rows read and dropped stay the card's."""
    pairs = {"train": len(data.train), "eval": len(data.eval)}
    return dataclasses.replace(data, train=[out for row in data.train for out in convert(row)],
                               eval=[out for row in data.eval for out in convert(row)]), pairs


# Experiment trackers `train.report_to` may name (transformers' `report_to` and Accelerate's `log_with`, which
# ppo uses, take each), and the modules each can use; none is a dependency of align (tensorboard is in the dev
# extra). tensorboard and trackio log on this machine; mlflow into ./mlruns unless MLFLOW_TRACKING_URI says else.
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "trackio": ("trackio",), "wandb": ("wandb",),
                   "mlflow": ("mlflow",), "comet_ml": ("comet_ml",)}
# Trackers that log to an account on a server: (the key they need, the variable that keeps them on this machine,
# its value, how to upload later). Offline is set when there is no key or HF_HUB_OFFLINE says there is no network,
# unless the user set the variable.
OFFLINE_MODES = {"wandb": ("WANDB_API_KEY", "WANDB_MODE", "offline", "wandb sync"),
                 "comet_ml": ("COMET_API_KEY", "COMET_START_ONLINE", "0", "comet upload")}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def trackers(report_to: list[str], say: Any = None) -> list[str]:
    """The trackers a recipe asks for, each checked to be installed, so a typo or a missing package is a recipe
    error before any model loads rather than a failure after training; one that needs an account logs offline
    when there is no key or no network (`OFFLINE_MODES`), instead of failing or waiting on the network."""
    import importlib.util

    chosen = [name for name in report_to if name != "none"]
    for name in chosen:
        if name not in TRACKER_MODULES:
            raise RecipeError(f"train.report_to: unknown tracker '{name}' (supported: none, "
                              f"{', '.join(TRACKER_MODULES)})")
        if not any(importlib.util.find_spec(module) for module in TRACKER_MODULES[name]):
            raise RecipeError(f"train.report_to: {name} is not installed here (pip install {name}), "
                              "or remove it from report_to")
    for name in chosen:
        if name not in OFFLINE_MODES:
            continue
        key, variable, value, upload = OFFLINE_MODES[name]
        if variable in os.environ or (os.environ.get(key) and not hub_offline()):
            continue
        os.environ[variable] = value
        if say is not None:
            why = "HF_HUB_OFFLINE is set" if hub_offline() else f"no {key}"
            say(f"train.report_to: {name} logs offline on this machine ({why}: {variable}={value}); "
                f"`{upload}` uploads the run later")
    return chosen


LIGER_HINT = "pip install liger-kernel"


def check_model_options(recipe: Recipe, start: StartingPoint, device: dict[str, Any]) -> None:
    """The model section's and train section's choices this machine must support, refused before any weights
    load: quantisation (`align.quantization.check`), the attention kernel, Liger kernels (installed, on a GPU)."""
    import importlib.util

    quantization.check(recipe, start.base, device)
    models.check_attention(recipe.model.attn_implementation, device, str(recipe.path))
    if recipe.train.use_liger_kernel:
        if importlib.util.find_spec("liger_kernel") is None:
            raise RecipeError(f"{recipe.path}: train.use_liger_kernel: liger-kernel is not installed here "
                              f"({LIGER_HINT}), or set it to false")
        if device["type"] != "cuda":
            raise RecipeError(f"{recipe.path}: train.use_liger_kernel: Liger's kernels are Triton GPU kernels and "
                              "this machine has no GPU; set it to false")


def prepare(recipe: Recipe, registry: Registry, *, resume: bool, say: Any) -> StageInputs:
    """Load data (checking it is the kind of rows the stage reads, as the stage registry declares) and references
    before any slow import, then resolve device defaults, open the run directory and load tokenizer and starting
    model (with a scalar score head when the stage trains a SEQ_CLS adapter)."""
    stage = STAGES[recipe.stage]
    rows, head = stage.reads, "score" if stage.task_type == "SEQ_CLS" else "causal_lm"
    trackers(recipe.train.report_to, say)
    runtime.signal_point("load-data")
    card_path, data_parent = resolve_card(recipe.data.card, recipe.path.parent, registry)
    card = load_card(card_path)
    kind = get_format(card.format).kind
    convert = KIND_CONVERSIONS.get((kind, rows))
    if kind != rows and convert is None:
        raise DataError(f"{card.path}: format '{card.format}' gives {_FORMAT_KINDS[kind]}, but `align "
                        f"{recipe.stage}` needs {_FORMAT_KINDS[rows]} (see the data card formats in README)")
    data = load_data(card, limit=recipe.data.limit, eval_limit=recipe.data.eval_limit)
    if rows in ("preference", "unpaired") and not data.eval:
        raise DataError(f"{card.path}: the eval split is empty; `align {recipe.stage}` is judged on held-out rows")
    pairs = None
    if convert is not None:
        data, pairs = convert_kind(data, convert)
        say(f"{card.path}: {pairs['train']} + {pairs['eval']} {kind} rows (train + eval) read as {len(data.train)} + "
            f"{len(data.eval)} {rows} rows")
    if data.unknown_columns and data_parent is None:  # a dataset artifact's extra columns are align's own records
        say(unknown_columns_note(data))
    start = models.resolve_starting_point(recipe, registry)
    device = detect_device()
    check_model_options(recipe, start, device)
    models.check_lora_targets(start.base, recipe.lora, stage.task_type, str(recipe.path))
    tokenizer = models.load_tokenizer(start.base, recipe.model.chat_template,
                                      saved_in=start.parent.path if start.parent else None)
    # Rows the trainer would drop for their length come off here, with the tokenizer only: a max_length that
    # leaves nothing to train on is refused before any weights load, and the metrics count what was trained on.
    summary = data.summary()
    data = recipe_max_length(data, recipe, tokenizer)
    recipe = resolve_device_defaults(recipe, device, models.hidden_size(start.base))
    run = open_run(recipe, registry, start, summary, device, resume, data_parent)
    for note in run.notes:
        say(note)
    runtime.signal_point("load-model")
    if head == "score":  # the fresh score head is drawn from the global RNG: make it the recipe seed's draw
        from transformers import set_seed

        set_seed(recipe.train.seed)
    model = models.load_starting_model(start, registry, models.weight_dtype(recipe.train.precision, device["type"]),
                                       head, options=models.load_options(recipe, device))
    if recipe.model.quantization is not None:
        model = quantization.prepare_for_training(model, bool(recipe.train.activation_checkpointing))
    if head == "score":
        model.config.pad_token_id = tokenizer.pad_token_id
    return StageInputs(recipe, data, run, tokenizer, model, pairs)


def build_trainer(trainer_cls: Any, config_cls: Any, inputs: StageInputs, *,
                  trainer_kwargs: dict[str, Any] | None = None, **stage_config: Any) -> Any:
    """A TRL trainer over the stage's rows with a fresh LoRA adapter; `stage_config` adds the stage's own
    config fields to the shared TrainingArguments, `trainer_kwargs` its own trainer arguments (reward_funcs).
    The rows reach TRL file-backed in the cache, so TRL tokenises them once (`align.data.tokenized`); with
    `train.group_by_length`, SFT, DPO and reward batches hold rows of similar length (`align.batching`)."""
    from align.batching import length_grouped
    from align.data.tokenized import DatasetCache
    from align.fused_head import compact_on_cpu

    compact_on_cpu()

    recipe = inputs.recipe
    # GRPO and RLOO have no max_length: they bound replies with max_completion_length instead.
    if "max_length" in {f.name for f in dataclasses.fields(config_cls)}:
        stage_config = {"max_length": recipe.train.max_length, **stage_config}
    config = config_cls(**trainer_args(inputs.run), **stage_config)
    # Online stages (grpo, rloo) sample their own batches of prompts: only offline rows are grouped.
    if recipe.train.group_by_length and STAGES[recipe.stage].reads in ("sft", "preference"):
        trainer_cls = length_grouped(trainer_cls)
    cache = DatasetCache(models.cache_root() / "datasets",
                         {"precision": recipe.train.precision, "device": inputs.run.device["type"]})
    runtime.wait_for_everyone()  # rank 0 may have just cleared stale checkpoints
    trainer = trainer_cls(
        model=inputs.model,
        args=config,
        train_dataset=as_dataset(inputs.data.train, recipe.model.chat_template, cache),
        eval_dataset=as_dataset(inputs.data.eval, recipe.model.chat_template, cache),
        processing_class=inputs.tokenizer,
        peft_config=models.lora_config(recipe.lora, STAGES[recipe.stage].task_type),
        **(trainer_kwargs or {}),
    )
    tensorboard_into(trainer, inputs.run.run_dir / "logs")
    if recipe.model.quantization is not None:
        quantization.trainable_in_precision(trainer.model, recipe.train.precision)
    return trainer


def tensorboard_into(trainer: Any, logs: Path) -> None:
    """Point transformers' TensorBoard callback at the run's logs/ (published with the artifact). Left alone it
    opens its writer at the first log, which for align is the evaluation before training, before it has picked a
    directory: torch then writes into `./runs` of the working directory, and the training scalars went there."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback":
            callback.logging_dir = str(logs / "tensorboard")


def as_dataset(rows: list[dict[str, Any]], chat_template: str, cache: Any = None) -> Any:
    """Canonical rows as a `datasets.Dataset` in TRL's conversational form, or its plain-text form; with a
    `tokenized.DatasetCache`, backed by an Arrow file there, so that TRL's tokenisation of it is cached too."""
    from datasets import Dataset

    from align.data.tokenized import file_backed

    if chat_template == "none":  # the text as plain strings; a row's verdict (KTO's `label`) stays as it is
        rows = [{**to_plain_text_row(row), **({"label": row["label"]} if "label" in row else {})} for row in rows]
    return Dataset.from_list(rows) if cache is None else file_backed(rows, cache)


def trainer_args(run: StageRun) -> dict[str, Any]:
    """TrainingArguments fields common to every TRL config, from the recipe's (device-resolved) train section."""
    train = run.recipe.train
    on_cpu = run.device["type"] == "cpu"
    return {
        "output_dir": str(run.checkpoints),
        "learning_rate": train.learning_rate,
        "num_train_epochs": train.num_train_epochs,
        "max_steps": train.max_steps,
        "per_device_train_batch_size": train.per_device_train_batch_size,
        "per_device_eval_batch_size": train.per_device_eval_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "warmup_steps": train.warmup_steps,
        "lr_scheduler_type": train.lr_scheduler_type,
        "weight_decay": train.weight_decay,
        "max_grad_norm": train.max_grad_norm,
        "seed": train.seed,
        "data_seed": train.seed,
        "bf16": train.precision == "bf16",
        "fp16": train.precision == "fp16",
        "use_cpu": on_cpu,
        "activation_checkpointing": train.activation_checkpointing,
        "optim": train.optim,
        "logging_steps": train.logging_steps,
        "eval_strategy": "steps" if train.eval_steps else "no",
        "eval_steps": train.eval_steps,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        # `none` beside a tracker means nothing (transformers refuses the mix); trackio groups runs by `project`:
        # the runs of one artifact name, as its versions are.
        "report_to": [name for name in train.report_to if name != "none"],
        "project": run.recipe.name,
        "dataloader_num_workers": train.dataloader_num_workers,
        "use_liger_kernel": train.use_liger_kernel,
        "disable_tqdm": not runtime.is_main_process(),
    }


def train(trainer: Any, run: StageRun) -> dict[str, Any]:
    """trainer.train() that resumes from the run's checkpoint and turns SIGTERM into checkpoint-then-stop."""
    with runtime.interruptible(resume_hint=True) as flag:
        trainer.add_callback(runtime.trainer_stop_callback(flag))
        flag.in_training_loop = True
        try:
            output = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
        finally:
            flag.in_training_loop = False
        if flag.requested:
            raise StageInterrupted(
                f"interrupted at step {trainer.state.global_step}; a checkpoint is in {run.checkpoints}. "
                "Nothing was published: run the same command with --resume to continue."
            )
    return dict(output.metrics)


def save_adapter(trainer: Any, run: StageRun) -> Path:
    """Save the trained adapter into the run directory. Called on every rank: FSDP and ZeRO-3 gather the
    sharded weights collectively, and the trainer writes files on the main process only."""
    final = run.run_dir / "final"
    trainer.save_model(str(final))
    runtime.wait_for_everyone()
    if runtime.is_main_process():
        # The tokenizer lives once at the artifact root; the pickled TrainingArguments is not safe to load.
        for path in final.iterdir():
            if path.name.startswith("tokenizer") or path.name in ("training_args.bin", "chat_template.jinja",
                                                                  "special_tokens_map.json"):
                path.unlink()
    return final


def publish_adapter(trainer: Any, inputs: StageInputs, *, metrics: dict[str, Any],
                    train_metrics: dict[str, Any], files: dict[str, Any] | None = None,
                    adapter_extra: dict[str, Any] | None = None, details: dict[str, Any] | None = None,
                    extra_parents: list[tuple[Artifact, str]] = ()) -> Artifact | None:
    """Publish a trained LoRA adapter with its tokenizer, training log and the stage's own JSON `files`;
    `extra_parents` are (artifact, role) beside the starting model and data (e.g. the reward model)."""
    recipe, data, run = inputs.recipe, inputs.data, inputs.run
    metrics = {
        **metrics,
        "train_loss": train_metrics.get("train_loss"),
        "train_runtime_s": train_metrics.get("train_runtime"),
        "train_samples_per_second": train_metrics.get("train_samples_per_second"),
        "global_step": trainer.state.global_step,
        **data.counts(),  # rows read, dropped by reason, and used (train_rows, eval_rows)
        "train_rows_truncated": data.train_truncated,
    }
    adapter_dir = save_adapter(trainer, run)

    def write_files(staging: Path) -> None:
        shutil.copytree(adapter_dir, staging / "adapter")
        inputs.tokenizer.save_pretrained(str(staging))
        write_json(staging / "log_history.json", trainer.state.log_history)
        for name, content in (files or {}).items():
            write_json(staging / name, content)

    adapter = adapter_info(recipe, **(adapter_extra or {}))
    return publish(run, write_files=write_files, metrics=metrics, details={"adapter": adapter, **(details or {})},
                   extra_parents=extra_parents)


def adapter_info(recipe: Recipe, **extra: Any) -> dict[str, Any]:
    """The manifest's `adapter` entry: the trained LoRA and how its model reads text (`manifest.AdapterInfo`)."""
    lora = recipe.lora
    return {"task_type": STAGES[recipe.stage].task_type, "r": lora.r, "lora_alpha": lora.lora_alpha,
            "target_modules": lora.target_modules, "chat_template": recipe.model.chat_template,
            "max_length": recipe.train.max_length, **extra}


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 50 else float("inf")


def sort_adapter_targets(directory: Path) -> None:
    """PEFT saves `target_modules` from a set, in an order that changes with every process's string hashing;
    sorted, the same run writes the same adapter_config.json (the determinism test compares artifact files)."""
    for path in directory.rglob("adapter_config.json"):
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(redaction.redact(data), indent=2, ensure_ascii=False, default=str) + "\n",
                    encoding="utf-8")


def publish(run: StageRun, *, write_files: Any, metrics: dict[str, Any], details: dict[str, Any],
            extra_parents: list[tuple[Artifact, str]] = ()) -> Artifact | None:
    """Rank 0 writes the artifact through `write_files(staging_dir)` and publishes it.

    `details` are the stage's own manifest keys (e.g. `adapter` for trained stages, `pairs` for datasets).

    Returns the Artifact on rank 0 and None elsewhere, after all ranks have synchronised.
    """
    artifact = None
    if runtime.is_main_process():
        recipe = run.recipe
        parents = [parent_entry(run.start.parent, "model")] if run.start.parent else []
        parents += [parent_entry(run.data_parent, "data")] if run.data_parent else []
        parents += [parent_entry(artifact_, role) for artifact_, role in extra_parents]
        manifest = {
            "stage": recipe.stage,
            **run.start.manifest_entries(),
            "parents": parents,
            "data": [run.data_summary],
            "recipe": redaction.redact(recipe.to_dict()),
            "recipe_path": str(recipe.path),
            "recipe_overrides": [redaction.redact_override(override) for override in recipe.overrides],
            "recipe_sha256": recipe.sha256(),
            "seed": recipe.train.seed,
            "metrics": metrics,
            **details,
            "device": run.device,
            "world_size": runtime.world()[1],
            "launch": launch.record(recipe),
            "quantization": quantization.record(recipe),
            "resumed_from": run.resume_from.name if run.resume_from else None,
            "packages": package_versions(),
            "python": platform.python_version(),
            "git": git_state(Path.cwd()),
            "duration_s": round(time.time() - run.started, 2),
        }
        with run.registry.staging(recipe.name) as staging:
            write_files(staging)
            launch.write_config(recipe, staging)
            sort_adapter_targets(staging)
            # Tracker logs (TensorBoard event files) of the run: TRL's under checkpoints/runs, ours under logs/.
            for logs in (run.run_dir / "logs", run.checkpoints / "runs"):
                if logs.is_dir():
                    shutil.copytree(logs, staging / "logs", dirs_exist_ok=True)
            write_json(staging / "metrics.json", metrics)
            (staging / "recipe.yaml").write_text(yaml.safe_dump(manifest["recipe"], sort_keys=False), encoding="utf-8")
            runtime.signal_point("publish")
            with runtime.uninterruptible():  # from the manifest write on, the version completes or never exists
                artifact = run.registry.publish(staging, recipe.name, manifest)
        shutil.rmtree(run.run_dir, ignore_errors=True)
    runtime.wait_for_everyone()
    return artifact
