"""Launching on several processes and machines (align.launch): presets, the checks before anything is spawned,
FSDP2 on two CPU ranks, and two "machines" on the loopback address. Every run is a real CLI subprocess."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_SFT

from align import launch
from align.errors import RecipeError
from align.recipe import load_recipe
from align.stages import STAGES

TINY = REPO / "recipes" / "tiny"


def manifest(registry: Path, name: str, version: int = 1) -> dict:
    return json.loads((registry / name / f"v{version}" / "manifest.json").read_text())


def adapter_shapes(version_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(version_dir / "adapter" / "adapter_model.safetensors"), "pt") as tensors:
        return {key: tuple(tensors.get_slice(key).get_shape()) for key in tensors.keys()}


# ---- presets and checks (no process is spawned) ----------------------------------------------------------


def test_every_preset_file_declares_its_distributed_type() -> None:
    assert sorted(p.name for p in launch.PRESET_DIR.glob("*.yaml")) == sorted(f"{n}.yaml" for n in launch.PRESETS)
    for preset in launch.PRESETS.values():
        config = yaml.safe_load(preset.path.read_text())
        assert config["distributed_type"] == preset.distributed_type, preset.name
        assert config["mixed_precision"] == "no"  # the recipe's train.precision decides, not the preset


def test_the_recipe_layout_is_laid_over_the_preset() -> None:
    recipe = load_recipe(TINY_SFT, ["launch.preset=fsdp2", "launch.num_processes=4", "launch.num_machines=2",
                                    "launch.machine_rank=1", "launch.main_process_ip=10.0.0.1",
                                    "launch.main_process_port=29501"])
    config = launch.check(recipe, STAGES["sft"], on_gpu=False)
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert (config["num_processes"], config["num_machines"], config["machine_rank"]) == (4, 2, 1)
    assert (config["main_process_ip"], config["main_process_port"]) == ("10.0.0.1", 29501)
    assert launch.resolved_config(load_recipe(TINY_SFT)) is None  # one plain process: no launch at all
    two = launch.resolved_config(load_recipe(TINY_SFT, ["launch.num_processes=2"]))
    assert two["distributed_type"] == "MULTI_GPU" and two["num_processes"] == 2  # several processes: ddp


def test_an_own_accelerate_config_keeps_its_process_count(tmp_path: Path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: FSDP\nnum_processes: 3\nfsdp_config: {fsdp_version: 2}\n")
    recipe = load_recipe(TINY_SFT, [f"launch.accelerate_config={own}"])
    assert launch.check(recipe, STAGES["dpo"], on_gpu=False)["num_processes"] == 3


@pytest.mark.parametrize(("stage", "overrides", "expected"), [
    ("ppo", ["launch.preset=fsdp2"], r"launch.preset: fsdp2: align ppo does not run under FSDP: its rollouts"),
    ("pairs", ["launch.preset=zero3"], r"align pairs does not run under DeepSpeed: it trains nothing"),
    ("sft", ["launch.preset=zero2"], r"DeepSpeed is not installed: pip install deepspeed"),
    ("sft", ["launch.num_processes=3", "launch.num_machines=2", "launch.main_process_ip=h"], r"split evenly"),
    ("sft", ["launch.num_processes=2", "launch.num_machines=2"], r"needs main_process_ip"),
    ("sft", ["launch.num_processes=2", "launch.num_machines=2", "launch.machine_rank=2",
             "launch.main_process_ip=h"], r"machine_rank \(2\) must be between 0 and num_machines - 1 \(1\)"),
])
def test_launches_a_stage_cannot_run_are_refused_before_spawning(stage: str, overrides: list[str],
                                                                 expected: str) -> None:
    recipe = load_recipe(TINY / f"{stage}.yaml", overrides)
    with pytest.raises(RecipeError, match=expected):
        launch.check(recipe, STAGES[stage], on_gpu=False)


def test_preset_and_own_config_together_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="either preset or accelerate_config"):
        load_recipe(TINY_SFT, ["launch.preset=ddp", "launch.accelerate_config=x.yaml"])


def test_a_launched_rank_refuses_the_distributed_type_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Users may call `accelerate launch -m align ppo ...` with their own FSDP config: the rank itself refuses."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RecipeError, match="align ppo does not run under FSDP"):
        launch.check_running(STAGES["ppo"])
    launch.check_running(STAGES["dpo"])


# ---- real launches on two CPU ranks -----------------------------------------------------------------------


@pytest.mark.slow
def test_sft_under_fsdp2_on_two_cpu_ranks(tmp_path: Path, run_align: Callable, sft_registry: Path) -> None:
    """FSDP2 shards the model over two gloo ranks; rank 0 publishes once, with the whole adapter and the config."""
    registry = tmp_path / "registry"
    result = run_align("sft", TINY_SFT, "--registry", registry, "--preset", "fsdp2", "--num-processes", "2",
                       "--set", "train.max_steps=4", "--set", "sft.num_samples=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (registry / "tiny-sft").glob("v*")) == ["v1"]
    m = manifest(registry, "tiny-sft")
    assert m["world_size"] == 2 and m["metrics"]["global_step"] == 4
    assert m["launch"] == {"preset": "fsdp2", "accelerate_config": "accelerate_config.yaml",
                           "distributed_type": "FSDP", "num_machines": 1}
    config = yaml.safe_load((registry / "tiny-sft" / "v1" / "accelerate_config.yaml").read_text())
    assert config["distributed_type"] == "FSDP" and config["num_processes"] == 2
    # The adapter was gathered whole: the same tensors, shapes included, as a one-process run publishes.
    assert adapter_shapes(registry / "tiny-sft" / "v1") == adapter_shapes(sft_registry / "tiny-sft" / "v1")


@pytest.mark.slow
def test_dpo_under_fsdp2_on_two_cpu_ranks(tmp_path: Path, run_align: Callable, pairs_artifact: Path,
                                          sft_registry: Path) -> None:
    registry = tmp_path / "registry"
    for name in ("tiny-sft", "tiny-pairs"):  # a private registry: the session's stays as the fixtures made it
        shutil.copytree(sft_registry / name, registry / name)
    result = run_align("dpo", TINY / "dpo.yaml", "--registry", registry, "--preset", "fsdp2",
                       "--num-processes", "2", "--set", "train.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    m = manifest(registry, "tiny-dpo")
    assert m["world_size"] == 2 and m["launch"]["distributed_type"] == "FSDP" and m["metrics"]["global_step"] == 3
    assert m["metrics"]["eval_reward_accuracy"] is not None
    result = run_align("reward", TINY / "reward.yaml", "--registry", registry, "--preset", "fsdp2",
                       "--num-processes", "2", "--set", "train.max_steps=3", "--set", "train.num_train_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    m = manifest(registry, "tiny-rm")
    assert m["world_size"] == 2 and m["launch"]["distributed_type"] == "FSDP" and m["metrics"]["global_step"] == 3
    assert m["adapter"]["normalisation"] is not None  # the reward statistics were gathered over both ranks
    # `align eval` shares the prompts between two ranks; rank 0 joins them and writes one eval.json.
    result = run_align("eval", "tiny-dpo@v1", "--data", REPO / "data_cards" / "tiny-story-prompts.yaml", "--limit",
                       "6", "--num-samples", "2", "--max-new-tokens", "8", "--num-processes", "2",
                       "--registry", registry)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved ") == 1
    report = json.loads((registry / "tiny-dpo" / "v1" / "eval.json").read_text())
    assert (report["prompts"], report["samples"]) == (6, 12) and report["kl"] is not None
    assert len(report["parent_samples_key"].split(",")) == 2  # each rank's share has its own cache entry


def test_ranks_shares_join_in_rank_order() -> None:
    from align.evaluate import join_shares

    shares = [{"judge": [1.0, 2.0], "reward": None, "cached": True, "key": "a"},
              {"judge": [3.0], "reward": [0.5], "cached": False, "key": "b"}]
    assert join_shares(shares) == {"judge": [1.0, 2.0, 3.0], "reward": None, "cached": False, "key": "a,b"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_the_loopback_address_publish_once(tmp_path: Path, run_align: Callable,
                                                           stories_dir: Path) -> None:
    """num_machines: 2 with one process each, machine 0 at 127.0.0.1: world size 2 over gloo, one version."""
    registry, port = tmp_path / "registry", _free_port()
    layout = ["--set", "launch.num_processes=2", "--set", "launch.num_machines=2", "--set",
              "launch.main_process_ip=127.0.0.1", "--set", f"launch.main_process_port={port}",
              "--set", "train.max_steps=3", "--set", "sft.num_samples=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    machines = [subprocess.Popen([sys.executable, "-m", "align", "sft", str(TINY_SFT),
                                  "--registry", str(registry), *layout, "--set", f"launch.machine_rank={rank}"],
                                 cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for rank in (0, 1)]
    outputs = [machine.communicate(timeout=600) for machine in machines]
    for machine, (_, err) in zip(machines, outputs, strict=True):
        assert machine.returncode == 0, err[-3000:]
    assert sorted(p.name for p in (registry / "tiny-sft").glob("v*")) == ["v1"]
    m = manifest(registry, "tiny-sft")
    assert m["world_size"] == 2 and m["launch"]["num_machines"] == 2 and m["launch"]["preset"] == "ddp"


@pytest.mark.slow
def test_pairs_ranks_sample_different_prompts(tmp_path: Path, run_align: Callable, sft_registry: Path) -> None:
    """Two DDP ranks each sample their own share of the prompts: every prompt is answered once, none twice."""
    registry = tmp_path / "registry"
    shutil.copytree(sft_registry / "tiny-sft", registry / "tiny-sft")
    result = run_align("pairs", TINY / "pairs.yaml", "--registry", registry, "--num-processes", "2",
                       "--set", "data.limit=40", "--set", "pairs.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    m = manifest(registry, "tiny-pairs")
    assert m["world_size"] == 2 and m["launch"]["distributed_type"] == "MULTI_GPU"
    lines = (registry / "tiny-pairs" / "v1" / "samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    # One line per prompt with its 4 replies: each prompt was sampled by exactly one of the two ranks.
    assert len(samples) == m["metrics"]["prompts_train"] + m["metrics"]["prompts_eval"] > 0
    assert all(len(sample["replies"]) == 4 for sample in samples)


@pytest.mark.slow
def test_grpo_trains_on_two_ranks(tmp_path: Path, run_align: Callable, reward_artifact: Path,
                                  sft_registry: Path) -> None:
    registry = tmp_path / "registry"
    for name in ("tiny-sft", "tiny-rm"):
        shutil.copytree(sft_registry / name, registry / name)
    result = run_align("grpo", TINY / "grpo.yaml", "--registry", registry, "--num-processes", "2",
                       "--set", "train.max_steps=2", "--set", "grpo.max_new_tokens=8")
    assert result.returncode == 0, result.stderr[-3000:]
    m = manifest(registry, "tiny-grpo")
    assert m["world_size"] == 2 and m["metrics"]["global_step"] == 2



@pytest.mark.slow
@pytest.mark.parametrize(("stage", "name", "parents", "settings", "epoch"), [
    # epoch after 2 steps on 2 ranks: rloo 2 x 2 x 16 replies / 4 per prompt = 16 of 800 prompts; kto 2 x 2 x 8 of
    # 64 rows (32 pairs read as two rows each); orpo and simpo 2 x 2 x 8 of 32 pairs. One rank alone counts half.
    ("rloo", "tiny-rloo", ("tiny-sft", "tiny-rm"), ["rloo.max_new_tokens=8"], 0.02),
    ("kto", "tiny-kto", ("tiny-sft", "tiny-pairs"), ["data.limit=32", "data.eval_limit=16"], 0.5),
    ("orpo", "tiny-orpo", ("tiny-sft", "tiny-pairs"), ["data.limit=32", "data.eval_limit=16"], 1.0),
    ("simpo", "tiny-simpo", ("tiny-sft", "tiny-pairs"), ["data.limit=32", "data.eval_limit=16"], 1.0),
])
def test_the_other_trainer_stages_train_under_fsdp2_on_two_ranks(stage: str, name: str, parents: tuple[str, ...],
                                                     settings: list[str], epoch: float, tmp_path: Path,
                                                     run_align: Callable, reward_artifact: Path,
                                                     sft_registry: Path) -> None:
    """rloo, kto, orpo and simpo (TRL's trainers, like dpo above) under FSDP2 on two CPU ranks: one version, world
    size 2, and each rank reads its own share of the rows (the epoch advances twice as fast as on one rank)."""
    registry = tmp_path / "registry"
    for parent in parents:
        shutil.copytree(sft_registry / parent, registry / parent)
    overrides = [arg for setting in ["train.max_steps=2", *settings] for arg in ("--set", setting)]
    result = run_align(stage, TINY / f"{stage}.yaml", "--registry", registry, "--preset", "fsdp2",
                       "--num-processes", "2", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (registry / name).glob("v*")) == ["v1"]
    m = manifest(registry, name)
    assert m["world_size"] == 2 and m["launch"]["distributed_type"] == "FSDP" and m["metrics"]["global_step"] == 2
    history = json.loads((registry / name / "v1" / "log_history.json").read_text())
    assert history[-1]["epoch"] == pytest.approx(epoch)
