"""QLoRA (`model.quantization`): the recipe rules and the refusals before any weights load (no bitsandbytes
needed), and, where bitsandbytes is installed (its CPU backend runs 4- and 8-bit LoRA from 0.48 on), a 4-bit SFT
from the base, an 8-bit PPO on one quantised base whose starting chain was merged in full precision, and an export
that reproduces the trained model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, bench_module

from align import quantization
from align.errors import ArtifactError, RecipeError
from align.recipe import load_recipe

TINY = REPO / "recipes" / "tiny"
CPU = {"type": "cpu", "name": "cpu", "bf16": False}
FOUR_BIT = ("model.quantization.bits=4",)


def recipe(stage: str, *overrides: str) -> Any:
    return load_recipe(TINY / f"{stage}.yaml", list(overrides))


# ---- the recipe section --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "overrides", "fragments"), [
    ("sft", ("model.quantization.bits=8", "model.quantization.quant_type=nf4"), ("quant_type", "bits: 4 only")),
    ("sft", ("model.quantization.bits=3",), ("model.quantization.bits",)),
    ("sft", ("model.quantization.bits=4", "model.quantization.quant_type=int4"), ("quant_type",)),
    ("pairs", FOUR_BIT, ("align pairs", "train an adapter")),
    ("ppo", (*FOUR_BIT, "ppo.models=separate"), ("ppo.models: separate", "shared")),
    ("ppo", ("train.use_liger_kernel=true",), ("use_liger_kernel", "own loop")),
    ("sft", ("model.attn_implementation=flash",), ("model.attn_implementation", "sdpa")),
])
def test_recipe_shapes_that_are_refused(stage: str, overrides: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    with pytest.raises(RecipeError) as refused:
        recipe(stage, *overrides)
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_defaults_and_the_bitsandbytes_config() -> None:
    torch = pytest.importorskip("torch")
    plain = recipe("sft")
    assert plain.model.quantization is None and plain.model.attn_implementation == "sdpa"
    section = recipe("sft", *FOUR_BIT).model.quantization
    assert (section.quant_type, section.compute_dtype, section.double_quant) == ("nf4", "auto", True)
    four = quantization.bnb_config(section, "bf16")
    assert four.load_in_4bit and not four.load_in_8bit and four.bnb_4bit_quant_type == "nf4"
    assert four.bnb_4bit_compute_dtype == torch.bfloat16 and four.bnb_4bit_use_double_quant
    fp4 = recipe("sft", *FOUR_BIT, "model.quantization.quant_type=fp4", "model.quantization.compute_dtype=fp32",
                 "model.quantization.double_quant=false").model.quantization
    config = quantization.bnb_config(fp4, "bf16")  # an explicit compute dtype wins over the run's precision
    assert config.bnb_4bit_quant_type == "fp4" and config.bnb_4bit_compute_dtype == torch.float32
    assert not config.bnb_4bit_use_double_quant
    eight = quantization.bnb_config(recipe("sft", "model.quantization.bits=8").model.quantization, "bf16")
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert quantization.device_map("cpu") == {"": "cpu"}


def test_the_manifest_records_what_was_quantised(monkeypatch: pytest.MonkeyPatch) -> None:
    from align.manifest import Manifest, QuantizationRecord

    monkeypatch.setattr(quantization, "installed_version", lambda: "0.50.2")
    four = recipe("sft", *FOUR_BIT, "train.precision=fp32")
    assert quantization.record(four) == {"bits": 4, "quant_type": "nf4", "compute_dtype": "fp32",
                                         "double_quant": True, "bitsandbytes": "0.50.2"}
    eight = quantization.record(recipe("sft", "model.quantization.bits=8"))
    assert QuantizationRecord(**eight).quant_type is None and eight["compute_dtype"] is None
    assert quantization.record(recipe("sft")) is None
    # Manifests written before schema 4 read as trained on a plain base.
    old = Manifest.read(REPO / "tests" / "fixtures" / "v0" / "sft.manifest.json")
    assert old.quantization is None and Manifest.SCHEMA_VERSION >= 4


# ---- refusals before any weights ---------------------------------------------------------------------------------


def base_of(kind: str) -> Any:
    from align.models import BaseModelSpec

    return BaseModelSpec("m", kind, "/nowhere/m.gguf" if kind == "gguf" else "/nowhere/m")


@pytest.mark.parametrize(("case", "fragments"), [
    ("missing", ("bitsandbytes is not installed", "pip install bitsandbytes")),
    ("gguf", ("GGUF", "original Hugging Face checkpoint")),
    ("old on cpu", ("bitsandbytes 0.45.0", "0.48.0", "pip install -U bitsandbytes")),
    ("old gpu", ("compute capability 6.0", "has 5.2")),
    ("int8 on turing-less gpu", ("bits: 8", "compute capability 7.5", "has 7.0")),
    ("fp16 on cpu", ("compute_dtype", "fp16 needs a GPU")),
    ("fsdp2", ("FSDP", "ddp or zero2")),
])
def test_what_cannot_run_is_refused_before_weights(case: str, fragments: tuple[str, ...],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization, "installed_version", lambda: "0.50.2")
    overrides, device, base = list(FOUR_BIT), CPU, base_of("local")
    if case == "missing":
        monkeypatch.setattr(quantization, "installed_version", lambda: None)
    elif case == "gguf":
        base = base_of("gguf")
    elif case == "old on cpu":
        monkeypatch.setattr(quantization, "installed_version", lambda: "0.45.0")
    elif case in ("old gpu", "int8 on turing-less gpu"):
        device = {"type": "cuda", "name": "an old GPU", "bf16": False}
        monkeypatch.setattr(quantization, "_cuda_capability", lambda: (5, 2) if case == "old gpu" else (7, 0))
        if case != "old gpu":
            overrides = ["model.quantization.bits=8"]
    elif case == "fp16 on cpu":
        overrides.append("model.quantization.compute_dtype=fp16")
    elif case == "fsdp2":
        overrides += ["launch.preset=fsdp2", "launch.num_processes=2"]
    with pytest.raises(RecipeError) as refused:
        quantization.check(recipe("sft", *overrides), base, device)
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_gpu_options_are_checked_before_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from align import training

    start = type("Start", (), {"base": base_of("local")})()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("liger_kernel", "flash_attn") else real_find_spec(name, *a))
    with pytest.raises(RecipeError, match="pip install liger-kernel"):
        training.check_model_options(recipe("sft", "train.use_liger_kernel=true"), start, CPU)
    with pytest.raises(RecipeError, match="flash-attn"):
        training.check_model_options(recipe("sft", "model.attn_implementation=flash_attention_2"), start, CPU)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # both "installed"
    with pytest.raises(RecipeError, match="no GPU"):
        training.check_model_options(recipe("sft", "train.use_liger_kernel=true"), start, CPU)
    with pytest.raises(RecipeError, match="CUDA GPUs only"):
        training.check_model_options(recipe("sft", "model.attn_implementation=flash_attention_2"), start, CPU)
    gpu = {"type": "cuda", "name": "gpu", "bf16": True}
    training.check_model_options(recipe("sft", "train.use_liger_kernel=true",
                                        "model.attn_implementation=flash_attention_2"), start, gpu)
    args = training.trainer_args(type("Run", (), {"recipe": recipe("sft", "train.use_liger_kernel=true"),
                                                  "device": gpu, "checkpoints": Path("/x")})())
    assert args["use_liger_kernel"] is True


def test_a_quantised_artifact_needs_bitsandbytes_to_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from align.manifest import QuantizationRecord

    monkeypatch.setattr(quantization, "installed_version", lambda: None)
    manifest = type("M", (), {"quantization": QuantizationRecord(bits=4, quant_type="nf4", compute_dtype="bf16",
                                                                 double_quant=True, bitsandbytes="0.50.2")})()
    with pytest.raises(ArtifactError, match=r"4-bit base.*pip install bitsandbytes"):
        quantization.artifact_options(manifest, "q@v1")
    assert quantization.artifact_options(type("M", (), {"quantization": None})(), "p@v1") is None


# ---- on CPU with bitsandbytes -----------------------------------------------------------------------------------


def test_trainable_weights_follow_the_run_precision() -> None:
    """TRL casts a quantised model's trainable weights to bf16; outside bf16 runs they go back to fp32 (the
    reward stage's score head met fp32 hidden states in bf16 before)."""
    torch = pytest.importorskip("torch")
    head, frozen = torch.nn.Linear(4, 1).to(torch.bfloat16), torch.nn.Linear(4, 4).to(torch.bfloat16)
    frozen.requires_grad_(False)
    model = torch.nn.Sequential(frozen, head)
    quantization.trainable_in_precision(model, "bf16")
    assert head.weight.dtype == torch.bfloat16
    quantization.trainable_in_precision(model, "fp32")
    assert head.weight.dtype == head.bias.dtype == torch.float32 and frozen.weight.dtype == torch.bfloat16


def run_cli(*argv: Any) -> None:
    from align.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([str(arg) for arg in argv])
    assert stopped.value.code == 0


def publish_sft_adapter(root: Path, stories_dir: Path) -> None:
    """tiny-sft@v1 without training: a LoRA with random nonzero weights on stories260K, published as an SFT
    artifact (the fields of the version-0 fixture, its base re-identified), so a chain exists to merge."""
    import torch
    from peft import LoraConfig, get_peft_model
    from test_artifacts import manifest
    from transformers import AutoModelForCausalLM

    from align.artifacts import Registry
    from align.models import base_identity, load_tokenizer, resolve_base

    torch.manual_seed(0)
    base = resolve_base(str(stories_dir), REPO)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(stories_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    registry = Registry(root)
    with registry.staging("tiny-sft") as staging:
        model.save_pretrained(staging / "adapter")
        load_tokenizer(base).save_pretrained(staging)
        fields = manifest("sft")
        fields["base_model"] = base_identity(base).model_dump()
        registry.publish(staging, "tiny-sft", fields)


@pytest.fixture(scope="module")
def qlora_registry(tmp_path_factory: pytest.TempPathFactory, stories_dir: Path) -> Path:
    """q-ppo@v1: PPO on one 4-bit NF4 base (from tiny-sft@v1, an untrained adapter), 1 step, in-process, with
    VADER as the reward so no reward artifact is needed."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("qlora")
    publish_sft_adapter(root, stories_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("ALIGN_CACHE", str(root / ".align-cache"))
        patch.delenv("ALIGN_REGISTRY", raising=False)
        run_cli("ppo", TINY / "ppo.yaml", "--registry", root, "--set", "name=q-ppo", "--set", FOUR_BIT[0],
                "--set", "model.from=tiny-sft@v1", "--set", "ppo.reward_model=null",
                "--set", "ppo.reward_function=vader", "--set", "train.max_steps=1",
                "--set", "ppo.rollout_batch_size=16", "--set", "data.limit=16", "--set", "data.eval_limit=4",
                "--set", "ppo.max_new_tokens=8")
    return root


def exact_cpu_path(model: Any) -> Any:
    """Every 4-bit layer on bitsandbytes' dequantise-then-matmul path (its AVX512-BF16 inference kernel computes
    in bf16), so two models holding the same weights give the same logits."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def test_ppo_trains_on_one_quantised_base_with_the_chain_merged_first(qlora_registry: Path) -> None:
    """Policy, value and reference share one 4-bit base; the SFT chain was merged in full precision into a cached
    directory that loads quantised (merged into 4-bit weights, a LoRA's small updates would round away)."""
    manifest = json.loads((qlora_registry / "q-ppo" / "v1" / "manifest.json").read_text())
    assert manifest["quantization"] == {"bits": 4, "quant_type": "nf4", "compute_dtype": "fp32",
                                        "double_quant": True, "bitsandbytes": quantization.installed_version()}
    assert manifest["metrics"]["models"] == "shared" and manifest["metrics"]["global_step"] == 1
    assert [entry["ref"] for entry in manifest["adapter_chain"]] == ["tiny-sft@v1"]
    merged = list((qlora_registry / ".align-cache" / "merged").iterdir())
    assert len(merged) == 1 and (merged[0] / "config.json").is_file()
    assert "quantization_config" not in json.loads((merged[0] / "config.json").read_text())


def test_a_qlora_artifact_loads_on_its_base_and_exports_as_trained(qlora_registry: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from align.artifacts import Registry
    from align.models import load_artifact_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ALIGN_CACHE", str(qlora_registry / ".align-cache"))
    registry = Registry(qlora_registry)
    trained, _ = load_artifact_model(registry.resolve("q-ppo@v1"), registry)
    assert quantization.is_quantized(trained.get_base_model())  # the 4-bit base its adapter was trained against
    run_cli("export", "q-ppo@v1", "--merge", tmp_path / "out", "--registry", qlora_registry)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not hasattr(exported.config, "quantization_config")  # plain weights: any loader reads them
    ids = torch.tensor([[1, 45, 300, 12, 7, 99, 2]])
    with torch.no_grad():
        expected = exact_cpu_path(trained)(input_ids=ids).logits
        got = exported(input_ids=ids).logits
        plain = load_artifact_model(registry.resolve("tiny-sft@v1"), registry)[0](input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
    assert not torch.allclose(got, plain, atol=1e-3)  # the dequantised base is not the full-precision one


def test_missing_bitsandbytes_exits_2_before_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Through the CLI: a 4-bit run refused for a missing bitsandbytes (exit 2, before weights), and
    `recipe validate` makes the same check."""
    from align.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ALIGN_FORBID_WEIGHTS", "1")
    monkeypatch.setattr(quantization, "installed_version", lambda: None)
    for argv in (["sft", TINY / "sft.yaml"], ["recipe", "validate", TINY / "sft.yaml"]):
        with pytest.raises(SystemExit) as stopped:
            main([str(a) for a in argv] + ["--registry", str(tmp_path), "--set", FOUR_BIT[0]])
        assert stopped.value.code == 2
        assert "pip install bitsandbytes" in capsys.readouterr().err



# ---- the memory table's arithmetic (bench/qlora_memory.py) ---------------------------------------------------------

TINY_LLAMA = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": False}


def memory_bench() -> Any:
    """bench/qlora_memory.py as a module."""
    return bench_module("qlora_memory")


def test_memory_table_counts_bytes_from_the_shapes() -> None:
    bench = memory_bench()
    base_bytes, int8_bytes, lora_bytes = bench.base_bytes, bench.int8_bytes, bench.lora_bytes
    nf4_bytes = bench.nf4_bytes
    ppo_rows, quantised_linears, skeleton = bench.ppo_rows, bench.quantised_linears, bench.skeleton

    causal, scored = skeleton(TINY_LLAMA), skeleton(TINY_LLAMA, "score")
    params = sum(p.numel() for p in causal.parameters())
    assert base_bytes(causal, "bf16") == 2 * params
    linears = quantised_linears(causal)
    assert len(linears) == 7 * 2 and all("lm_head" not in name for name, _ in linears)  # q k v o gate up down
    linear_numel = sum(m.weight.numel() for _, m in linears)
    rest = params - linear_numel  # embeddings, norms, lm_head: left in bf16
    assert base_bytes(causal, "int8") == 2 * rest + sum(m.weight.numel() + 4 * m.out_features for _, m in linears)
    assert base_bytes(causal, "nf4-dq", other_bytes=4) == 4 * rest + sum(nf4_bytes(m.weight.numel(), True)
                                                                         for _, m in linears)
    assert int8_bytes(3, 5) == 15 + 12
    # 4096 weights: 2048 bytes of codes, 64 blocks -> 256 bytes of fp32 absmax, or 64 bytes of 8-bit absmax plus one
    # nested fp32 absmax, the nested code table and offset; the NF4 code table either way.
    assert nf4_bytes(4096, False) == 2048 + 256 + 64
    assert nf4_bytes(4096, True) == 2048 + 64 + 4 + 1024 + 4 + 64
    r = 4
    assert lora_bytes(skeleton(TINY_LLAMA), r) == 4 * r * sum(m.in_features + m.out_features for _, m in linears)
    separate, shared, *quantised = ppo_rows(TINY_LLAMA, r)
    assert separate.base == 3 * base_bytes(causal, "bf16") + base_bytes(scored, "bf16")
    assert shared.base == base_bytes(causal, "bf16") and shared.extra == 3 * lora_bytes(skeleton(TINY_LLAMA), r) + \
        4 * (2 * 64 + 1)
    assert [row.base for row in quantised[1:3]] == [base_bytes(causal, "nf4"), base_bytes(causal, "nf4-dq")]


def test_nf4_byte_count_matches_bitsandbytes() -> None:
    torch = pytest.importorskip("torch")
    functional = pytest.importorskip("bitsandbytes.functional")
    nf4_bytes = memory_bench().nf4_bytes
    weight = torch.randn(96, 160)
    for double_quant in (False, True):
        packed, state = functional.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                                 compress_statistics=double_quant)
        held = [packed, state.absmax, state.code]
        if double_quant:
            held += [state.state2.absmax, state.state2.code, state.offset.reshape(1)]
        assert nf4_bytes(weight.numel(), double_quant) == sum(t.numel() * t.element_size() for t in held)
