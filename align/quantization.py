"""QLoRA: LoRA trained on a base whose linear layers bitsandbytes holds in 4 or 8 bits (`model.quantization`).

What the recipe section becomes, in loading order: checks that need no weights (a base bitsandbytes can
quantise, bitsandbytes installed and able to run on this device, a launch whose sharding it survives); the
transformers `BitsAndBytesConfig` with its device placement; a starting chain merged in full precision before
quantising (cached); PEFT's k-bit preparation; and the manifest's record, which every later load of the artifact
(eval, reward scoring, export) reads to rebuild the weights its adapter was trained against.

Why the chain is merged before quantising: an adapter merged into 4-bit weights is re-quantised with them, and a
LoRA delta smaller than half an NF4 step rounds back to the old value (tests/test_quantization.py measures it), so
an SFT chain merged into a 4-bit base would mostly vanish.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from align.errors import ArtifactError, RecipeError

if TYPE_CHECKING:
    from align.artifacts import Registry
    from align.manifest import Manifest
    from align.models import BaseModelSpec, StartingPoint
    from align.recipe import QuantizationSection, Recipe

# bitsandbytes' installation guide lists CPUs as officially supported from 0.48 (checked: 0.50.2 trains 4- and
# 8-bit LoRA on this project's CPU). Older releases only run on CUDA.
CPU_SINCE = "0.48.0"
# The compute capability each width needs on NVIDIA GPUs (bitsandbytes' installation guide: NF4/FP4 6.0+,
# LLM.int8() 7.5+).
CUDA_CAPABILITY = {4: (6, 0), 8: (7, 5)}
# Launches whose ranks hold shards of the parameters: they flatten parameters of one dtype, which packed 4-bit
# weights (uint8 Params4bit) are not; data-parallel launches (ddp, zero2) hold the whole quantised base per rank.
SHARDED = ("FSDP", "DEEPSPEED zero_stage 3")
INSTALL_HINT = "pip install bitsandbytes"


def installed_version() -> str | None:
    """bitsandbytes' version, read from its metadata without importing it (the import loads CUDA libraries)."""
    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def _version_tuple(text: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(text).release


def _cuda_capability() -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(0))  # type: ignore[return-value]


def _sharding(recipe: Recipe) -> str | None:
    """The sharded launch this recipe runs under (FSDP or ZeRO-3), else None."""
    from align import launch

    config = launch.launched_config(recipe)
    if config is None:
        return None
    kind = launch.distributed_type_of(config)
    if kind == "FSDP":
        return "FSDP"
    if kind == "DEEPSPEED" and int((config.get("deepspeed_config") or {}).get("zero_stage", 0)) == 3:
        return "DeepSpeed ZeRO-3"
    return None


def check(recipe: Recipe, base: BaseModelSpec, device: dict[str, Any]) -> None:
    """Refuse, before any weights load, a quantisation this base, machine or launch cannot run (RecipeError,
    exit 2). `device` is `align.device.detect_device()`'s answer."""
    section = recipe.model.quantization
    if section is None:
        return
    where = f"{recipe.path}: model.quantization"
    if base.kind == "gguf":
        raise RecipeError(f"{where}: {base.spec} is a GGUF file, already quantised by llama.cpp; align dequantises "
                          "it to train, and quantising that again would stack two rounding errors. Use the "
                          "original Hugging Face checkpoint as model.base, or drop model.quantization")
    found = installed_version()
    if found is None:
        raise RecipeError(f"{where}: bitsandbytes is not installed here ({INSTALL_HINT}), or drop "
                          "model.quantization")
    if device["type"] == "cpu" and _version_tuple(found) < _version_tuple(CPU_SINCE):
        raise RecipeError(f"{where}: bitsandbytes {found} runs on CUDA GPUs only and this machine has none; its CPU "
                          f"backend needs {CPU_SINCE} or newer (pip install -U bitsandbytes)")
    if device["type"] == "cuda":
        have, need = _cuda_capability(), CUDA_CAPABILITY[section.bits]
        if have < need:
            raise RecipeError(f"{where}: bits: {section.bits} needs a GPU of compute capability "
                              f"{need[0]}.{need[1]} or newer (bitsandbytes); {device['name']} has {have[0]}.{have[1]}")
    if section.compute_dtype != "auto":
        from align.device import resolve_precision

        resolve_precision(section.compute_dtype, device, f"{where}.compute_dtype")
    sharded = _sharding(recipe)
    if sharded is not None:
        raise RecipeError(f"{where}: {sharded} shards parameters across ranks, and bitsandbytes' packed 4/8-bit "
                          "weights cannot be flattened with the others; QLoRA runs under ddp or zero2 (each rank "
                          "holds the whole quantised base)")


def compute_dtype(section: QuantizationSection, precision: str) -> str:
    """What the dequantised weights compute in: the recipe's choice, else the run's (device-resolved) precision."""
    return precision if section.compute_dtype == "auto" else section.compute_dtype


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def bnb_config(section: QuantizationSection, precision: str) -> Any:
    """transformers' BitsAndBytesConfig for the section (`precision`: the run's resolved train.precision)."""
    import torch
    from transformers import BitsAndBytesConfig

    if section.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=section.quant_type,
                              bnb_4bit_compute_dtype=getattr(torch, _DTYPES[compute_dtype(section, precision)]),
                              bnb_4bit_use_double_quant=section.double_quant)


def device_map(device_type: str) -> dict[str, Any]:
    """Where the quantised weights go: this process's GPU (its local rank under `accelerate launch`), else the
    CPU. bitsandbytes quantises as weights reach the device, so a quantised model is placed at load."""
    if device_type == "cuda":
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_options(section: QuantizationSection, precision: str, device_type: str) -> dict[str, Any]:
    """The `from_pretrained` arguments that load a base quantised."""
    return {"quantization_config": bnb_config(section, precision), "device_map": device_map(device_type)}


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def fit_cpu_kernels(model: Any) -> None:
    """bitsandbytes' CPU inference kernel for 4-bit layers (taken on CPUs with AVX512-BF16, outside autograd)
    repacks each weight in blocks of 32 output rows and one absmax block per input row, and asserts instead of
    falling back when a layer's shape does not fit (stories260K's MLP: 172 features). Such layers keep the
    general dequantise-then-matmul path, which autograd takes anyway."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            state = getattr(module.weight, "quant_state", None)
            block = getattr(state, "blocksize", 64)
            if module.out_features % 32 or module.in_features % block:
                module.support_avx512bf16_for_cpu = False


def prepare_for_training(model: Any, activation_checkpointing: bool) -> Any:
    """PEFT's k-bit preparation: base weights frozen, norms and the unquantised layers in fp32, input gradients
    on when activations are checkpointed (the checkpointed blocks' inputs must require grad)."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing)


def trainable_in_precision(model: Any, precision: str) -> None:
    """TRL casts a quantised model's trainable weights to bf16 (the QLoRA paper's choice), which assumes bf16
    compute; in an fp32 or fp16 run a bf16 score head then meets hidden states of another dtype. Outside bf16 runs
    the trainable weights go back to fp32, PEFT's own default for adapters."""
    import torch

    if precision == "bf16":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype == torch.bfloat16:
            param.data = param.data.float()


def _chain_key(start: StartingPoint, registry: Registry, dtype: Any) -> str:
    """What a merged starting point is: the base's identity, each chain adapter's files (hashed: adapters are
    megabytes) and the dtype it was merged in."""
    from align import integrity
    from align.hashing import sha256_file, sha256_json

    adapters = []
    for entry in start.chain:
        directory = integrity.chain_adapter_dir(entry, registry)
        adapters.append(sorted((p.name, sha256_file(p)) for p in directory.iterdir() if p.is_file()))
    return sha256_json({"base": [start.base.location, start.base.revision], "adapters": adapters,
                        "dtype": str(dtype)})


def merged_start(start: StartingPoint, registry: Registry, dtype: Any) -> BaseModelSpec:
    """The base with its adapter chain merged in full precision, saved once as a plain HF directory in the cache
    (`$ALIGN_CACHE/merged/`), for bitsandbytes to quantise as it loads. A 7B base in bf16 takes ~13.5 GB there
    and in CPU memory while it is merged; delete the folder to reclaim it."""
    from align import models

    target = models.cache_root() / "merged" / _chain_key(start, registry, dtype)[:16]
    spec = models.BaseModelSpec(f"{start.base.spec} + {len(start.chain)} merged adapters", "local", str(target),
                                None, start.base.trust_remote_code)
    if (target / "config.json").exists():
        return spec
    models.write_cache_directory(target, lambda scratch: models.load_starting_model(start, registry, dtype)
                                 .save_pretrained(scratch))
    return spec


def record(recipe: Recipe) -> dict[str, Any] | None:
    """The manifest's `quantization` (`manifest.QuantizationRecord`) of a device-resolved recipe; None: none."""
    section = recipe.model.quantization
    if section is None:
        return None
    four = section.bits == 4
    return {"bits": section.bits, "quant_type": section.quant_type if four else None,
            "compute_dtype": compute_dtype(section, recipe.train.precision) if four else None,
            "double_quant": section.double_quant if four else None, "bitsandbytes": installed_version()}


def artifact_options(manifest: Manifest, source: str) -> dict[str, Any] | None:
    """How to load the base of an artifact trained on a quantised one: the same 4/8-bit weights its adapter was
    trained against, on this machine's device. None for an artifact trained on a plain base."""
    from align.device import detect_device
    from align.recipe import QuantizationSection

    recorded = getattr(manifest, "quantization", None)
    if recorded is None:
        return None
    if installed_version() is None:
        raise ArtifactError(f"{source} was trained on a {recorded.bits}-bit base; loading it needs bitsandbytes "
                            f"({INSTALL_HINT})")
    fields = {"bits": recorded.bits}
    if recorded.bits == 4:
        fields.update(quant_type=recorded.quant_type, compute_dtype=recorded.compute_dtype,
                      double_quant=recorded.double_quant)
    section = QuantizationSection(**fields)
    return load_options(section, recorded.compute_dtype or "fp32", detect_device()["type"])


def dequantize(model: Any) -> Any:
    """The quantised model as plain weights in its compute dtype: what its adapter was trained against, so that
    merging the adapter afterwards reproduces the trained model (merging into the 4-bit weights would re-quantise
    the adapter away)."""
    model = model.dequantize()
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, flag):
            setattr(model, flag, False)
    return model

