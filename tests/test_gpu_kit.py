"""The GPU check kit's CPU-side parts (bench/gpu_check.sh, bench/gpu_check.py, bench/gpu_wheels.sh): the scripts
parse, the offline tokenizer and model build, the generated cards and recipes are valid align inputs, the slimmed
bitsandbytes wheel keeps a consistent RECORD, and the figures are computed as documented. The stages themselves run
in `bash bench/gpu_check.sh --cpu-smoke` (about 20 s here) and on a GPU."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, bench_module


@pytest.fixture(scope="module")
def kit() -> Any:
    """bench/gpu_check.py as a module."""
    return bench_module("gpu_check")


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_scripts_parse(script: str) -> None:
    result = subprocess.run(["bash", "-n", str(REPO / "bench" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_check_refuses_to_run_without_wheels(tmp_path: Path) -> None:
    """On the GPU machine without .whl/ the script says what to do instead of failing on an import later."""
    (tmp_path / "bench").mkdir()
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert result.returncode == 2 and "make gpu-wheels" in result.stdout + result.stderr


def test_cards_and_recipes_are_valid_align_inputs(kit: Any, tmp_path: Path) -> None:
    from align.data import load_card, load_data
    from align.recipe import load_recipe

    cards = kit.write_cards(tmp_path)
    pairs = load_data(load_card(cards["pairs"]))
    assert len(pairs.train) > 100 and len(pairs.eval) == 32
    assert all(row["chosen"] != row["rejected"] for row in pairs.train)
    recipes = kit.write_recipes(tmp_path, tmp_path / "model", cards, steps=3, batch=2)
    assert set(recipes) == {"sft", "reward", "dpo", "ppo", "qlora-sft", "zero2-sft"}
    for label, path in recipes.items():
        recipe = load_recipe(path)
        assert recipe.stage == label.rsplit("-", 1)[-1] and recipe.train.max_steps == 3
        assert recipe.train.precision == "auto"  # bf16 on the GPU, by align's own rule
    assert load_recipe(recipes["qlora-sft"]).model.quantization.bits == 4
    assert load_recipe(recipes["ppo"]).ppo.reward_model == "gpu-rm@latest"
    config = kit.zero2_config(tmp_path)
    import yaml

    zero2 = yaml.safe_load(config.read_text())
    assert zero2["distributed_type"] == "DEEPSPEED" and zero2["num_processes"] == 1
    assert zero2["deepspeed_config"]["zero_stage"] == 2


def test_tokenizer_and_model_build_offline(kit: Any, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from align.models import load_tokenizer, resolve_base

    tokenizer = kit.build_tokenizer(kit.VOCAB_TINY, tmp_path / "tok")
    text = "Tell a two-sentence story about a painter and a blue umbrella."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text and len(tokenizer) == kit.VOCAB_TINY
    parameters = kit.build_model(kit.MODEL_TINY, tokenizer, tmp_path / "model", "cpu")
    config = AutoConfig.from_pretrained(tmp_path / "model")
    assert config.model_type == "llama" and config.vocab_size == kit.VOCAB_TINY and config.num_key_value_heads == 2
    assert parameters == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64) + 64 + kit.VOCAB_TINY * 64
    # align reads the directory as a local base: its tokenizer with pad, eos and align's default chat template.
    loaded = load_tokenizer(resolve_base(str(tmp_path / "model"), tmp_path))
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "</s>" and loaded.chat_template


def test_figures_follow_the_documented_rules(kit: Any, tmp_path: Path) -> None:
    version = tmp_path / "v1"
    version.mkdir()
    history = [{"loss": 1.0, "num_tokens": 1000.0, "step": 1}, {"loss": 0.9, "num_tokens": 2000.0, "step": 2},
               {"train_runtime": 0.5, "step": 2}, {"eval_loss": 0.8, "eval_num_tokens": 9999.0}]
    (version / "log_history.json").write_text(json.dumps(history))
    assert kit.throughput(version, "sft") == 4000.0
    (version / "log_history.json").write_text(json.dumps([{"tokens_per_second": 10.0}, {"tokens_per_second": 30.0}]))
    assert kit.throughput(version, "ppo") == 20.0
    assert kit.mfu("sft", 1000.0, 500_000_000) == pytest.approx(4 * 5e8 * 1000 / 989e12)
    assert kit.mfu("dpo", 1000.0, 1) == pytest.approx(6 * 1000 / 989e12) and kit.mfu("ppo", 1e3, 1) is None
    results = {"device": "NVIDIA H200", "model": "m", "steps": 8, "batch": 8, "started": "now",
               "stages": [{"stage": "sft", "result": "ok", "seconds": 12.3, "tokens_per_second": 45678.9,
                           "peak_gpu_mib": 3072.0, "mfu": 0.123},
                          {"stage": "zero2-sft", "result": "skipped: x", "seconds": 0.0, "tokens_per_second": None,
                           "peak_gpu_mib": None, "mfu": None}]}
    kit.write_results(tmp_path / "out", results)
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| sft | ok | 12.3 | 45,679 | 3.00 GiB | 12.3% |" in table and "| zero2-sft | skipped: x |" in table
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"][0]["mfu"] == 0.123


def test_slim_wheel_keeps_the_chosen_libraries_and_a_matching_record(kit: Any, tmp_path: Path) -> None:
    wheel = tmp_path / "in" / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    wheel.parent.mkdir()
    files = {f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() for lib in ("cpu", "cuda118", "cuda130", "rocm64")}
    files["bitsandbytes/__init__.py"] = b"x = 1\n"
    record = "".join(f"{name},sha256=abc,{len(data)}\n" for name, data in files.items())
    record += "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    (tmp_path / "out").mkdir()
    slim = kit.slim_wheel(wheel, tmp_path / "out", ["cpu", "cuda130"])
    with zipfile.ZipFile(slim) as archive:
        names = set(archive.namelist())
        rows = list(csv.reader(io.StringIO(archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode())))
    assert names == {"bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                     "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes-0.50.2.dist-info/RECORD"}
    assert {row[0] for row in rows} == names
