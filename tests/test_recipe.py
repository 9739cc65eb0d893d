"""Recipe schema, overrides and device-aware defaults, without loading any model."""

from __future__ import annotations

from pathlib import Path

import pytest

from align.device import CPU_BF16_MIN_HIDDEN, cpu_bf16_flags, resolve_device_defaults
from align.errors import RecipeError
from align.recipe import load_recipe

CPU = {"type": "cpu", "name": "cpu", "bf16": False}
BF16_CPU = {"type": "cpu", "name": "cpu (avx512_bf16)", "bf16": True}
AMPERE = {"type": "cuda", "name": "A100", "bf16": True}
TURING = {"type": "cuda", "name": "T4", "bf16": False}

MINIMAL = """\
stage: sft
name: my-sft
model:
  base: some-org/some-model
data:
  card: card.yaml
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_follow_trl_names(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.train.learning_rate == 2e-4 and recipe.lora.r == 16 and recipe.output.root == "artifacts"
    assert recipe.relative_path(recipe.data.card) == (tmp_path / "card.yaml").resolve()


def test_unknown_key_names_line_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  learnig_rate: 1.0e-4\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:8: train.learnig_rate: unknown key (did you mean 'learning_rate'?)" in str(info.value)


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  max_steps: lots\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:8: train.max_steps: .*integer.*'lots'"):
        load_recipe(path)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train: [1, 2\nlora: {}\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+: YAML syntax error"):
        load_recipe(path)


def test_base_and_from_are_exclusive(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("model:\n", "model:\n  from: a@v1\n"))
    with pytest.raises(RecipeError, match="exactly one of 'base'"):
        load_recipe(path)


def test_stage_mismatch(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="this recipe is for `align sft`, not `align dpo`"):
        load_recipe(write(tmp_path, MINIMAL), stage="dpo")


def test_set_overrides_with_types_and_errors(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["train.learning_rate=1e-3", "lora.target_modules=[q_proj, v_proj]",
                                "train.activation_checkpointing=true"])
    assert recipe.train.learning_rate == 1e-3
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.overrides[0] == "train.learning_rate=1e-3"
    with pytest.raises(RecipeError, match=r"--set train.lerning_rate=1: train.lerning_rate: unknown key"):
        load_recipe(path, ["train.lerning_rate=1"])
    with pytest.raises(RecipeError, match=r"expected KEY\.PATH=VALUE"):
        load_recipe(path, ["train.learning_rate"])
    with pytest.raises(RecipeError, match="'name' is not a section"):
        load_recipe(path, ["name.x=1"])


def test_cpu_defaults_avoid_trl_crashes(tmp_path: Path) -> None:
    resolved = resolve_device_defaults(load_recipe(write(tmp_path, MINIMAL)), CPU)
    assert (resolved.train.precision, resolved.train.activation_checkpointing, resolved.train.optim) == (
        "fp32", False, "adamw_torch")


def test_gpu_defaults_pick_bf16_then_fp16(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    ampere, turing = resolve_device_defaults(recipe, AMPERE), resolve_device_defaults(recipe, TURING)
    assert (ampere.train.precision, ampere.train.activation_checkpointing, ampere.train.optim) == (
        "bf16", True, "adamw_torch_fused")
    assert turing.train.precision == "fp16"
    assert recipe.train.precision == "auto", "resolving must not modify the loaded recipe"


def test_cpu_auto_picks_bf16_autocast_only_with_bf16_units_and_a_model_large_enough(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL))
    large, small = CPU_BF16_MIN_HIDDEN, CPU_BF16_MIN_HIDDEN - 1
    assert resolve_device_defaults(recipe, BF16_CPU, large).train.precision == "bf16"
    assert resolve_device_defaults(recipe, BF16_CPU, small).train.precision == "fp32"  # casts cost more than they save
    assert resolve_device_defaults(recipe, BF16_CPU, None).train.precision == "fp32"  # size unknown: the safe choice
    assert resolve_device_defaults(recipe, CPU, large).train.precision == "fp32"  # emulated bf16 is slow
    assert resolve_device_defaults(recipe, BF16_CPU, large).train.activation_checkpointing is False


def test_cpu_bf16_flags_read_from_cpuinfo() -> None:
    assert cpu_bf16_flags("processor : 0\nflags : fpu sse avx512f avx512_bf16 amx_tile\n") == ["avx512_bf16"]
    assert cpu_bf16_flags("flags : fpu amx_bf16 amx_tile avx512_bf16\n") == ["avx512_bf16", "amx_bf16"]
    assert cpu_bf16_flags("flags : fpu sse avx2 avx512f\n") == []
    assert cpu_bf16_flags("") == []


def test_impossible_precision_is_a_user_error(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, MINIMAL), ["train.precision=bf16"])
    with pytest.raises(RecipeError, match=r"train\.precision: this CPU has no native bf16 units"):
        resolve_device_defaults(recipe, CPU)
    assert resolve_device_defaults(recipe, BF16_CPU, 64).train.precision == "bf16", "asked for: granted where it runs"
    with pytest.raises(RecipeError, match="does not support bf16"):
        resolve_device_defaults(recipe, TURING)
    fp16 = load_recipe(write(tmp_path, MINIMAL), ["train.precision=fp16"])
    with pytest.raises(RecipeError, match="fp16 needs a GPU"):
        resolve_device_defaults(fp16, BF16_CPU)


def test_repo_recipes_validate() -> None:
    root = Path(__file__).resolve().parents[1] / "recipes"
    recipes = sorted(root.glob("*/*.yaml"))
    assert recipes, "no recipes found"
    for path in recipes:
        if path.parent.name != "accelerate":
            assert load_recipe(path).name


def test_stage_sections_must_match_the_stage(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "reward:\n  center_rewards_coefficient: 0.01\n")
    expected = r"section 'reward' does not apply to stage 'sft' \(it takes: launch, lora, sft, train\)"
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)
    assert load_recipe(path, ["stage=reward"]).reward.center_rewards_coefficient == 0.01
