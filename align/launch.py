"""Running a stage on several processes or machines through `accelerate launch`.

A recipe's `launch:` section names a preset (an Accelerate config file under `recipes/accelerate/`) or its own
Accelerate config file, plus the process layout (processes, machines, this machine's rank, the main process's
address). align resolves the two into one Accelerate config, checks it against the stage and the installed
packages before anything is spawned, re-runs its own command under `accelerate launch --config_file` with it,
and every launched rank checks the distributed type it actually got (which also covers users who call
`accelerate launch -m align ...` themselves). The resolved config is published with the artifact.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import RecipeError

if TYPE_CHECKING:
    from align.recipe import LaunchSection, Recipe
    from align.stages import Stage

PRESET_DIR = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
CONFIG_FILE_NAME = "accelerate_config.yaml"  # the resolved config inside a published artifact
LAYOUT_FIELDS = ("num_processes", "num_machines", "machine_rank", "main_process_ip", "main_process_port")


@dataclass(frozen=True)
class Preset:
    """A launch preset: its Accelerate distributed type, the package it needs beyond align's, and whether it
    runs only on CUDA GPUs (DeepSpeed's engine does; DDP and FSDP2 also train on CPU with gloo ranks)."""

    name: str
    distributed_type: str
    package: str | None = None
    needs_cuda: bool = False

    @property
    def path(self) -> Path:
        return PRESET_DIR / f"{self.name}.yaml"


PRESETS: dict[str, Preset] = {preset.name: preset for preset in (
    Preset("ddp", "MULTI_GPU"),
    Preset("fsdp2", "FSDP"),
    Preset("zero2", "DEEPSPEED", package="deepspeed", needs_cuda=True),
    Preset("zero3", "DEEPSPEED", package="deepspeed", needs_cuda=True),
    Preset("zero3-offload", "DEEPSPEED", package="deepspeed", needs_cuda=True),
)}
# Accelerate's distributed types as users know them (its MULTI_GPU is also what it runs on CPU ranks).
FAMILY = {"NO": "a single process", "MULTI_GPU": "DDP", "MULTI_CPU": "DDP", "FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}


def is_launched() -> bool:
    """True in a process that `accelerate launch`/torchrun started (or that align itself launched)."""
    return "WORLD_SIZE" in os.environ or "ALIGN_LAUNCHED" in os.environ


def wants_launch(launch: LaunchSection) -> bool:
    """A recipe asks for `accelerate launch` when it names a config or more than one process or machine."""
    return bool(launch.preset or launch.accelerate_config or (launch.num_processes or 1) > 1
                or launch.num_machines > 1)


def _read_config(path: Path, field: str) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise RecipeError(f"{field}: {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{field}: {path} is not valid YAML: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{field}: {path} must be a YAML mapping of Accelerate settings")
    return data


def resolved_config(recipe: Recipe) -> dict[str, Any] | None:
    """The Accelerate config this recipe launches with: the preset's or the named file's settings with the
    recipe's process layout laid over them; None when the recipe runs as one plain process."""
    launch = recipe.launch
    if not wants_launch(launch):
        return None
    if launch.accelerate_config:
        config = _read_config(recipe.relative_path(launch.accelerate_config), "launch.accelerate_config")
    else:
        preset = PRESETS[launch.preset or "ddp"]
        if not preset.path.is_file():
            raise RecipeError(f"launch.preset: {preset.name}: its file {preset.path} is missing from this align "
                              "installation; pass launch.accelerate_config with a config file instead")
        config = _read_config(preset.path, "launch.preset")
    layout = {name: getattr(launch, name) for name in LAYOUT_FIELDS if getattr(launch, name) is not None}
    config.update(layout)
    config.setdefault("num_processes", 1)
    config.setdefault("num_machines", 1)
    config.setdefault("machine_rank", 0)
    config.setdefault("distributed_type", "MULTI_GPU" if config["num_processes"] > 1 else "NO")
    if config["num_machines"] == 1:  # no rendezvous across machines: leave accelerate its local defaults
        config.pop("main_process_ip", None)
    return config


def launched_config(recipe: Recipe) -> dict[str, Any] | None:
    """The resolved config when it runs more than one process (align then launches), else None: a preset or
    config file with a single process runs as one plain process, as Accelerate itself would."""
    config = resolved_config(recipe)
    return config if config is not None and (config["num_processes"] > 1 or config["num_machines"] > 1) else None


def process_count(recipe: Recipe) -> int:
    """How many processes the recipe's launch runs, all machines together (1: one plain process)."""
    config = resolved_config(recipe)
    return int(config["num_processes"]) if config is not None else 1


def distributed_type_of(config: dict[str, Any]) -> str:
    """Accelerate's distributed type of a resolved config (a config without one runs DDP over its processes)."""
    return str(config.get("distributed_type") or ("MULTI_GPU" if config.get("num_processes", 1) > 1 else "NO"))


def check(recipe: Recipe, stage: Stage, *, on_gpu: bool) -> dict[str, Any] | None:
    """Refuse a launch this stage or this machine cannot run, before anything is spawned or loaded; returns the
    resolved config (None: one plain process)."""
    config = resolved_config(recipe)
    if config is None:
        return None
    launch = recipe.launch
    where = (f"{recipe.path}: launch.accelerate_config: {launch.accelerate_config}" if launch.accelerate_config
             else f"{recipe.path}: launch.preset: {launch.preset or 'ddp'}")
    kind = distributed_type_of(config)
    if kind != "NO" and kind not in stage.distributed:
        raise RecipeError(f"{where}: align {stage.name} does not run under {FAMILY.get(kind, kind)}"
                          f"{stage.distributed_note and ': ' + stage.distributed_note} (it runs under: "
                          f"{', '.join(sorted({FAMILY.get(t, t) for t in stage.distributed}))})")
    if kind == "DEEPSPEED":
        if importlib.util.find_spec("deepspeed") is None:
            raise RecipeError(f"{where}: DeepSpeed is not installed: pip install deepspeed (it builds its CUDA ops "
                              "on first use; see README 'Multi-GPU and multi-node')")
        if not on_gpu:
            raise RecipeError(f"{where}: DeepSpeed needs CUDA GPUs and this machine has none; use preset: fsdp2 or "
                              "ddp to run on CPU processes")
    processes, machines, rank = config["num_processes"], config["num_machines"], config["machine_rank"]
    if not isinstance(processes, int) or not isinstance(machines, int) or processes < machines:
        raise RecipeError(f"{where}: num_processes ({processes}) counts the processes of all machines together "
                          f"and must be at least num_machines ({machines})")
    if processes % machines:
        raise RecipeError(f"{where}: num_processes ({processes}) must split evenly over num_machines ({machines})")
    if not isinstance(rank, int) or not 0 <= rank < machines:
        raise RecipeError(f"{where}: machine_rank ({rank}) must be between 0 and num_machines - 1 ({machines - 1})")
    if machines > 1 and not config.get("main_process_ip"):
        raise RecipeError(f"{where}: num_machines: {machines} needs main_process_ip (the address of machine 0) and "
                          "main_process_port")
    return config


def check_running(stage: Stage) -> None:
    """In a launched rank: refuse the distributed type it was actually given (the recipe's, or the user's own
    `accelerate launch` config) when the stage cannot run under it."""
    kind = running_distributed_type()
    if kind != "NO" and kind not in stage.distributed:
        raise RecipeError(f"align {stage.name} does not run under {FAMILY.get(kind, kind)}"
                          f"{stage.distributed_note and ': ' + stage.distributed_note}")


def running_distributed_type() -> str:
    """The distributed type of this process, from what `accelerate launch` exports to its ranks."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "DEEPSPEED"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "FSDP"
    return "MULTI_GPU" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "NO"


def record(recipe: Recipe) -> dict[str, Any]:
    """What the manifest says about how the run was launched (world size is recorded beside it)."""
    config = launched_config(recipe)
    return {
        "preset": (recipe.launch.preset or "ddp") if config is not None and not recipe.launch.accelerate_config
        else None,
        "accelerate_config": CONFIG_FILE_NAME if config is not None else None,
        "distributed_type": running_distributed_type(),
        "num_machines": int(config["num_machines"]) if config is not None else 1,
    }


def write_config(recipe: Recipe, directory: Path) -> None:
    """The resolved Accelerate config into a published artifact (nothing for a single-process run)."""
    import yaml

    from align.redaction import redact

    config = launched_config(recipe)
    if config is not None:
        (directory / CONFIG_FILE_NAME).write_text(yaml.safe_dump(redact(config), sort_keys=False), encoding="utf-8")


def accelerate_command(argv: list[str], config_file: Path) -> list[str]:
    """`accelerate launch --config_file CONFIG -m align <argv>`."""
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    return [launcher, "launch", "--config_file", str(config_file), "-m", "align", *argv]


def launch_if_asked(recipe: Recipe, stage: Stage, argv: list[str]) -> int | None:
    """Re-run the command `argv` under `accelerate launch` when the recipe asks for it and this process is not
    already a launched rank; returns the launcher's exit code, or None when this process runs the stage."""
    if is_launched():
        check_running(stage)
        return None
    from align.device import detect_device

    check(recipe, stage, on_gpu=detect_device()["type"] == "cuda")
    config = launched_config(recipe)
    return None if config is None else spawn(config, argv)


def launch_processes_if_asked(num_processes: int | None, argv: list[str]) -> int | None:
    """A command without a recipe (`align eval --num-processes N`): re-run it as N DDP ranks on this machine
    unless this process is already one; returns the launcher's exit code, or None when this process runs it."""
    if is_launched() or not num_processes or num_processes < 2:
        return None
    config = _read_config(PRESETS["ddp"].path, "--num-processes")
    return spawn({**config, "num_processes": num_processes, "num_machines": 1, "machine_rank": 0}, argv)


def spawn(config: dict[str, Any], argv: list[str]) -> int:
    """Run `align <argv>` under `accelerate launch` with this resolved config; the launcher's exit code."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="align-launch-") as tmp:
        config_file = Path(tmp) / CONFIG_FILE_NAME
        config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return subprocess.call(accelerate_command(argv, config_file), env={**os.environ, "ALIGN_LAUNCHED": "1"})
