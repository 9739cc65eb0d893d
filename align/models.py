"""Load base models and tokenizers (hub id, local directory, GGUF file), attach artifact adapters, build LoRA configs.

A GGUF file is dequantised once into a cached Hugging Face directory (`$ALIGN_CACHE`, default
`~/.cache/align`), because dequantising SmolLM2-135M takes ~18 s and reloading the cache ~0.2 s.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align import integrity
from align.errors import ArtifactError, ModelError, RecipeError
from align.hashing import sha256_file
from align.manifest import BaseFile, BaseIdentity, ChainEntry
from align.stages import STAGES, stages_producing
from align.yamlio import clipped_repr

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from align.artifacts import Artifact, Registry
    from align.recipe import LoraSection, Recipe

# Used when a base model has no chat template of its own (or the recipe asks for it). Each turn is
# `<|role|>\ncontent` + EOS, so the model learns to end its reply with EOS; BOS starts the conversation.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}"
)

# bitsandbytes, which PEFT imports whenever it is installed, warns at import on CPUs with AVX512-BF16 that an optional
# hub kernel package is missing and then uses its own fallback: noise in every command's output, so it is muted.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Hashing multi-GB checkpoints on every run is slow; above this we record file sizes instead.
_HASH_LIMIT_BYTES = 4 << 30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass(frozen=True)
class BaseModelSpec:
    """A resolved `model.base`: what the user wrote and where it actually loads from."""

    spec: str
    kind: str  # "local" | "hub" | "gguf"
    location: str  # directory, hub id, or .gguf file path
    revision: str | None = None
    trust_remote_code: bool = False

    @classmethod
    def from_manifest(cls, entry: BaseIdentity) -> BaseModelSpec:
        return cls(entry.spec, entry.kind, entry.location, entry.revision, entry.trust_remote_code)


def resolve_base(spec: str, relative_to: Path, revision: str | None = None,
                 trust_remote_code: bool = False) -> BaseModelSpec:
    """Decide whether `spec` is a GGUF file, a local directory or a hub id; paths are relative to `relative_to`."""
    if spec.startswith("pkg:"):
        return BaseModelSpec(spec, "gguf", str(_packaged_file(spec)), revision, trust_remote_code)
    candidate = Path(spec).expanduser()
    candidate = candidate if candidate.is_absolute() else (relative_to / candidate)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if candidate.exists():
        candidate = candidate.resolve()
        if candidate.is_file():
            if candidate.suffix != ".gguf":
                raise ModelError(f"model.base: {candidate} is a file but not a .gguf model")
            return BaseModelSpec(spec, "gguf", str(candidate), revision, trust_remote_code)
        if not (candidate / "config.json").exists():
            raise ModelError(f"model.base: {candidate} has no config.json; is it a Hugging Face model directory?")
        return BaseModelSpec(spec, "local", str(candidate), revision, trust_remote_code)
    if looks_like_path:
        raise ModelError(f"model.base: {candidate} does not exist")
    return BaseModelSpec(spec, "hub", spec, revision, trust_remote_code)


def _packaged_file(spec: str) -> Path:
    """`pkg:module/relative/file` -> the file inside an installed package, without importing the package."""
    module, _, relative = spec[len("pkg:"):].partition("/")
    found = importlib.util.find_spec(module) if module else None
    if found is None or not found.submodule_search_locations:
        raise ModelError(f"model.base: {spec}: package '{module}' is not installed (for the demo: make setup)")
    path = Path(next(iter(found.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelError(f"model.base: {spec}: {path} does not exist")
    return path


def base_identity(base: BaseModelSpec) -> BaseIdentity:
    """What the manifest records about a base model: enough to reload it and to tell if it changed."""
    files = None
    if base.kind != "hub":
        root = Path(base.location)
        paths = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.suffix in _WEIGHT_SUFFIXES
                                                     or p.name == "config.json")
        hashed = sum(p.stat().st_size for p in paths) <= _HASH_LIMIT_BYTES
        files = [BaseFile(name=p.name, bytes=p.stat().st_size, sha256=sha256_file(p) if hashed else None)
                 for p in paths]
    return BaseIdentity(spec=base.spec, kind=base.kind, location=base.location, revision=base.revision,
                        trust_remote_code=base.trust_remote_code, files=files)


# Set by the bad-input tests: any weight load then fails loudly, proving a refusal came before the weights.
WEIGHTS_GUARD_ENV = "ALIGN_FORBID_WEIGHTS"


def guard_weight_loading(what: str) -> None:
    """Raise (a bug, exit 1) if weights are about to load while `$ALIGN_FORBID_WEIGHTS` is set."""
    if os.environ.get(WEIGHTS_GUARD_ENV):
        raise RuntimeError(f"{WEIGHTS_GUARD_ENV} is set but {what} was about to load weights")


def cache_root() -> Path:
    return Path(os.environ.get("ALIGN_CACHE", Path.home() / ".cache" / "align"))


def write_cache_directory(target: Path, write: Callable[[Path], None]) -> None:
    """Fill the cache directory `target` once: `write(scratch)` fills a scratch directory beside it, which is then
    renamed into place, so a reader never sees half a directory; when another process got there first, its copy
    stays and this one is dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        write(scratch)
        try:
            os.rename(scratch, target)
        except OSError:  # another process wrote it first
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _gguf_to_hf_dir(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a plain HF directory in the cache; later loads read the directory."""
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"
    if (target / "config.json").exists():
        return target
    guard_weight_loading(f"dequantising {gguf_path}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(scratch: Path) -> None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except Exception as exc:  # transformers raises many types for a bad GGUF
            raise ModelError(f"model.base: cannot read GGUF file {gguf_path}: {exc}") from None
        # The dequantised weights are plain fp32; drop the GGUF quantizer so save_pretrained accepts them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)

    write_cache_directory(target, write)
    return target


def _load_location(base: BaseModelSpec) -> tuple[str, dict[str, Any]]:
    if base.kind == "gguf":
        return str(_gguf_to_hf_dir(Path(base.location))), {}
    kwargs: dict[str, Any] = {"trust_remote_code": base.trust_remote_code}
    if base.kind == "hub" and base.revision:
        kwargs["revision"] = base.revision
    return base.location, kwargs


def _hub_error(base: BaseModelSpec, exc: Exception) -> ModelError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    reason = "the hub is unreachable offline (HF_HUB_OFFLINE is set)" if offline else f"{type(exc).__name__}: {exc}"
    return ModelError(
        f"model.base: cannot load '{base.spec}' from the Hugging Face hub: {reason}. "
        "Use a local directory or a .gguf file, or download the model first."
    )


def load_tokenizer(base: BaseModelSpec, chat_template: str = "auto", saved_in: Path | None = None
                   ) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token and (unless chat_template is 'none') a chat template.

    `saved_in` is an artifact directory: its saved tokenizer (and so its chat template) wins over the base's.
    """
    from transformers import AutoTokenizer

    location, kwargs = _load_location(base) if saved_in is None else (str(saved_in), {})
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except Exception as exc:
        if base.kind == "hub":
            raise _hub_error(base, exc) from None
        raise ModelError(f"model.base: cannot load the tokenizer from {location}: {exc}") from None
    if tokenizer.pad_token is None:
        # Reusing unk (or eos) keeps the vocabulary, and so the embedding matrix, unchanged.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    if chat_template == "default" or (chat_template == "auto" and not tokenizer.chat_template):
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def load_base_model(base: BaseModelSpec, dtype: Any = None, head: str = "causal_lm",
                    options: dict[str, Any] | None = None) -> PreTrainedModel:
    """The base weights with a language-model head, or (head='score') a fresh scalar score head for rewards.
    `options` are further `from_pretrained` arguments (`load_options`: attention kernel, quantisation)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    guard_weight_loading(f"model.base {base.spec}")
    location, kwargs = _load_location(base)
    if head == "score":
        auto, kwargs = AutoModelForSequenceClassification, {**kwargs, "num_labels": 1}
    else:
        auto = AutoModelForCausalLM
    try:
        with _expected_head_report_silenced(head):
            model = auto.from_pretrained(location, dtype=dtype or "auto", **kwargs, **(options or {}))
    except Exception as exc:
        if base.kind == "hub":
            raise _hub_error(base, exc) from None
        raise ModelError(f"model.base: cannot load the model from {location}: {exc}") from None
    if (options or {}).get("quantization_config") is not None:
        from align import quantization

        quantization.fit_cpu_kernels(model)
    return model


def load_options(recipe: Recipe, device: dict[str, Any]) -> dict[str, Any]:
    """The `from_pretrained` arguments a (device-resolved) recipe's model section adds: its attention kernel and,
    for QLoRA, bitsandbytes' config and device placement (`align.quantization`)."""
    options: dict[str, Any] = {"attn_implementation": recipe.model.attn_implementation}
    if recipe.model.quantization is not None:
        from align import quantization

        options.update(quantization.load_options(recipe.model.quantization, recipe.train.precision, device["type"]))
    return options


def check_attention(name: str, device: dict[str, Any], where: str) -> None:
    """Refuse an attention kernel this machine cannot run before any weights load: FlashAttention 2 needs its
    package (flash-attn) and a CUDA GPU; sdpa, eager and flex_attention run wherever torch does."""
    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise RecipeError(f"{where}: model.attn_implementation: flash_attention_2 needs the flash-attn package "
                          "(pip install flash-attn --no-build-isolation), or use sdpa")
    if device["type"] != "cuda":
        raise RecipeError(f"{where}: model.attn_implementation: flash_attention_2 runs on CUDA GPUs only and this "
                          "machine has none; use sdpa")


# A causal LM loaded under a fresh score head: transformers reports the new head as MISSING and the unused
# output layer as UNEXPECTED. Both are by design (the head is trained, or comes from the adapter), so that one
# report is dropped; any other key in it (a damaged or different checkpoint) keeps the whole report visible.
_EXPECTED_SCORE_HEAD_REPORT = {("score.weight", "MISSING"), ("lm_head.weight", "UNEXPECTED")}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPORT_ROW = re.compile(r"^(\S+)\s*\|\s*([A-Z_]+)\s*\|", re.MULTILINE)


class _ExpectedHeadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in text:
            return True
        rows = {(key, status) for key, status in _REPORT_ROW.findall(text) if key != "Key"}
        return not rows or not rows <= _EXPECTED_SCORE_HEAD_REPORT


@contextmanager
def _expected_head_report_silenced(head: str) -> Iterator[None]:
    if head != "score":
        yield
        return
    reporter = logging.getLogger("transformers.modeling_utils")
    silencer = _ExpectedHeadReport()
    reporter.addFilter(silencer)
    try:
        yield
    finally:
        reporter.removeFilter(silencer)


def merge_adapter(model: PreTrainedModel, adapter_dir: Path) -> PreTrainedModel:
    """Fold a LoRA adapter into the weights in memory, so the next stage trains a fresh adapter on top."""
    from peft import PeftConfig, PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise ArtifactError(f"{adapter_dir}: no adapter_config.json; the artifact is incomplete")
    with integrity.loading_adapter(adapter_dir):  # damage the check before loading missed: one clear error
        config = PeftConfig.from_pretrained(str(adapter_dir))
        # Merging needs no task head; without this a CAUSAL_LM adapter refuses a model with a score head.
        config.task_type = None
        return PeftModel.from_pretrained(model, str(adapter_dir), config=config).merge_and_unload()


def adapter_chain(artifact: Artifact) -> list[ChainEntry]:
    """Adapters to merge, oldest first, to rebuild `artifact`'s model from its base (its own adapter last)."""
    return [*artifact.manifest.adapter_chain, ChainEntry(ref=artifact.ref, path=str(artifact.adapter_path))]


def _chain_adapter_dir(entry: ChainEntry, registry: Registry) -> Path:
    return integrity.chain_adapter_dir(entry, registry)


@dataclass
class StartingPoint:
    """Everything a stage needs about where its weights come from, for loading and for the manifest."""

    base: BaseModelSpec
    parent: Artifact | None
    chain: list[ChainEntry]  # adapters merged into the base, oldest first

    def manifest_entries(self) -> dict[str, Any]:
        return {"base_model": base_identity(self.base), "adapter_chain": self.chain}


def resolve_starting_point(recipe: Recipe, registry: Registry) -> StartingPoint:
    """`model.base` or `model.from` -> the base model plus the chain of adapters that rebuilds the parent."""
    section = recipe.model
    if section.from_ is None:
        base = resolve_base(section.base or "", recipe.path.parent, section.revision, section.trust_remote_code)
        return StartingPoint(base, None, [])
    parent = registry.resolve(section.from_)
    produces = STAGES[parent.manifest.stage].produces
    if produces != "policy":
        use = "name it as data.card" if produces == "dataset" else f"name it as {recipe.stage}.reward_model"
        raise ArtifactError(f"{recipe.path}: model.from: {parent.ref} is a {produces} artifact (from `align "
                            f"{parent.manifest.stage}`), not a model to start from; start from a policy "
                            f"({', '.join(stages_producing('policy'))}) or a base model, and {use}")
    integrity.check_loadable(parent, registry, f"{recipe.path}: model.from")  # damaged files: refused before weights
    base = BaseModelSpec.from_manifest(parent.manifest.base_model)
    return StartingPoint(base, parent, adapter_chain(parent))


def load_starting_model(start: StartingPoint, registry: Registry, dtype: Any = None,
                        head: str = "causal_lm", options: dict[str, Any] | None = None) -> PreTrainedModel:
    """The base with every adapter of the chain merged in. The chain's causal-LM adapters touch only the
    transformer body, so they merge the same way under a score head. Quantised (`options` from `load_options`),
    the chain is merged in full precision first and the merged weights quantised as they load."""
    if (options or {}).get("quantization_config") is not None and start.chain:
        from align import quantization

        return load_base_model(quantization.merged_start(start, registry, dtype), dtype, head, options)
    model = load_base_model(start.base, dtype, head, options)
    for entry in start.chain:
        model = merge_adapter(model, _chain_adapter_dir(entry, registry))
    return model


def load_artifact_model(artifact: Artifact, registry: Registry, dtype: Any = None,
                        head: str = "causal_lm", dequantize: bool = False) -> tuple[Any, Any]:
    """An adapter artifact on top of its parent: base + chain merged, the artifact's own adapter attached (not
    merged), so `with model.disable_adapter():` is the parent. Returns (PeftModel in eval mode, tokenizer).
    An artifact trained on a quantised base gets that base again (its manifest's `quantization`); `dequantize`
    turns it into plain weights before the adapter is attached (export merges into those)."""
    from peft import PeftModel

    from align import quantization

    if not (artifact.adapter_path / "adapter_config.json").exists():
        raise ArtifactError(f"{artifact.ref} is a {artifact.manifest.stage} artifact with no adapter")
    integrity.check_loadable(artifact, registry)  # its files and its chain's, before any weights
    options = quantization.artifact_options(artifact.manifest, artifact.ref)
    start = StartingPoint(BaseModelSpec.from_manifest(artifact.manifest.base_model), None,
                          list(artifact.manifest.adapter_chain))
    tokenizer = load_tokenizer(start.base, "auto", saved_in=artifact.path)
    model = load_starting_model(start, registry, dtype, head=head, options=options)
    if options is not None and dequantize:
        model = quantization.dequantize(model)
    if head == "score":
        model.config.pad_token_id = tokenizer.pad_token_id
    with integrity.loading_adapter(artifact.adapter_path):
        return PeftModel.from_pretrained(model, str(artifact.adapter_path)).eval(), tokenizer


def load_reward_model(artifact: Artifact, registry: Registry, dtype: Any = None) -> tuple[Any, Any]:
    """A reward artifact's weights: its SEQ_CLS adapter (with the trained score head) on its parent. Readers
    score through `align.rewards.RewardModel`, which checks first that the artifact is a reward model."""
    return load_artifact_model(artifact, registry, dtype, head="score")


def decoder(model: Any) -> Any:
    """The transformer body (embeddings -> final norm) under any PEFT wrapper and task head: callers that need
    logits at a few positions apply `lm_head` to those alone instead of to every position."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_decoder()


def unadapted_layers(model: Any) -> int:
    """How many of the decoder's bottom layers hold no LoRA module of any adapter (all of them: none has one).
    Their output is the same for every adapter and with adapters off (the demo adapts the top 10 of 30)."""
    from peft.tuners.lora import LoraLayer

    layers = getattr(decoder(model), "layers", None)
    if layers is None:  # a decoder that does not keep its layers as `layers` (GPT-2's `h`): nothing is shared
        return 0
    return next((index for index, layer in enumerate(layers)
                 if any(isinstance(module, LoraLayer) for module in layer.modules())), len(layers))


@contextmanager
def only_layers(model: Any, chosen: slice) -> Iterator[Any]:
    """The decoder with only `chosen` of its layers for the block (the same layer objects; restored after)."""
    from torch import nn

    body = decoder(model)
    every = body.layers
    body.layers = nn.ModuleList(list(every)[chosen])
    try:
        yield body
    finally:
        body.layers = every


def trunk_states(model: Any, below: int, input_ids: Any, attention_mask: Any, position_ids: Any) -> Any:
    """The hidden states [B, T, H] entering decoder layer `below`: the bottom layers' output, computed once and
    shared by every adapter whose layers all sit above them (`above_trunk`)."""
    captured: list[Any] = []

    def keep(_: Any, __: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    hook = decoder(model).layers[below - 1].register_forward_hook(keep)
    try:
        with only_layers(model, slice(0, below)) as body:
            body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        hook.remove()
    return captured[-1]


def above_trunk(model: Any, below: int, trunk: Any, attention_mask: Any, position_ids: Any) -> Any:
    """The decoder's last hidden states [B, T, H] from `trunk_states` through layers `below`.. and the final norm,
    with whatever adapter is active: the numbers of a whole pass, without recomputing the bottom layers."""
    with only_layers(model, slice(below, None)) as body:
        return body(inputs_embeds=trunk, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state


def lm_head(model: Any) -> Any:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_output_embeddings()


def entropy_from_logits(logits: Any) -> Any:
    """Entropy [B, T] of the softmax over the last dim of logits [B, T, V], computed in fp32."""
    import torch

    # H = -sum p log p = logsumexp(z) - sum softmax(z) * z
    logits = logits.float().clamp(min=torch.finfo(torch.float32).min)  # -inf -> finite so 0 * z is 0, not NaN
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


LOGITS_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 logits at a time


def token_logprobs(model: Any, hidden: Any, tokens: Any, temperature: float = 1.0,
                   entropy: bool = False) -> tuple[Any, Any]:
    """log p(token) [B, R] at the sampling temperature, from the decoder's hidden states [B, R, H] at the
    positions that predict `tokens` [B, R], and optionally the entropy [B, R] of those distributions.

    The vocabulary projection runs over chunks of positions and, under autograd, each chunk is recomputed in
    the backward pass instead of kept: a [B, R, V] logits tensor and its softmaxes are never held at once.
    With a 49k-150k vocabulary those tensors, not the model, dominated a PPO step's memory."""
    import torch
    from torch.utils.checkpoint import checkpoint

    head = lm_head(model)

    def project(states: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(states).float() / temperature  # [C, V]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [C]
        return logp, entropy_from_logits(logits) if entropy else logp.new_zeros(())

    flat_hidden, flat_tokens = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)  # [B*R, H], [B*R]
    rows = max(1, LOGITS_CHUNK_ELEMENTS // head.weight.shape[0])
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    pieces = [checkpoint(project, flat_hidden[i:i + rows], flat_tokens[i:i + rows], use_reentrant=False)
              if recompute else project(flat_hidden[i:i + rows], flat_tokens[i:i + rows])
              for i in range(0, len(flat_tokens), rows)]
    logp = torch.cat([p[0] for p in pieces]).reshape(tokens.shape)
    return logp, torch.cat([p[1] for p in pieces]).reshape(tokens.shape) if entropy else None


def lora_config(section: LoraSection, task_type: str = "CAUSAL_LM") -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.lora_alpha,
        lora_dropout=section.lora_dropout,
        target_modules=section.target_modules,
        modules_to_save=section.modules_to_save,
        bias=section.bias,
        layers_to_transform=section.layers_to_transform,
        task_type=task_type,
    )


def _config_location(base: BaseModelSpec) -> tuple[str, dict[str, Any]]:
    """Where a base model's config reads from without touching its weights (a GGUF file's own metadata
    until it has been dequantised into the cache)."""
    if base.kind == "gguf":
        gguf = Path(base.location)
        cached = cache_root() / "gguf" / f"{gguf.stem}-{sha256_file(gguf)[:16]}"
        return (str(cached), {}) if (cached / "config.json").exists() else (str(gguf.parent), {"gguf_file": gguf.name})
    return _load_location(base)


def base_config(base: BaseModelSpec) -> Any:
    """The base model's transformers config, read without its weights; None when it cannot be read here
    (unreachable hub, odd directory): the weight loader then reports why, with context. A copy of one read per
    process: a GGUF file's metadata takes seconds to parse, and the LoRA check and the precision rule both ask."""
    import copy

    return copy.deepcopy(_read_base_config(base))


@functools.lru_cache(maxsize=8)
def _read_base_config(base: BaseModelSpec) -> Any:
    from transformers import AutoConfig

    location, kwargs = _config_location(base)
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except Exception:
        return None


def hidden_size(base: BaseModelSpec) -> int | None:
    """The base model's hidden size (what decides whether bf16 pays on a CPU: `device.resolve_precision`)."""
    config = base_config(base)
    text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    size = getattr(text_config, "hidden_size", None)
    return size if isinstance(size, int) else None


def check_lora_targets(base: BaseModelSpec, section: LoraSection, task_type: str, where: str) -> None:
    """Apply the recipe's LoRA to the base model's skeleton on the meta device (no weights are read or
    allocated): `target_modules` or `layers_to_transform` that match no module are a recipe error now, not PEFT's
    traceback after the model has loaded. Adapters merged from a chain do not rename modules, so the base's
    skeleton is the model the stage trains. Skipped when the config itself cannot be read (the loader then
    says why)."""
    import torch
    from peft import get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = base_config(base)
    if config is None:
        return
    auto = AutoModelForSequenceClassification if task_type == "SEQ_CLS" else AutoModelForCausalLM
    if task_type == "SEQ_CLS":
        config.num_labels = 1
    with torch.device("meta"):
        skeleton = auto.from_config(config, trust_remote_code=base.trust_remote_code)
    try:
        with warnings.catch_warnings():  # PEFT's deprecation notices about the skeleton are not the user's concern
            warnings.simplefilter("ignore")
            get_peft_model(skeleton, lora_config(section, task_type))
    except NoMatchingPeftModuleError:
        linear = sorted({name.rpartition(".")[2] for name, module in skeleton.named_modules()
                         if isinstance(module, torch.nn.Linear)})
        layers = (f" in layers {clipped_repr(section.layers_to_transform)} (it has "
                  f"{getattr(config, 'num_hidden_layers', '?')})" if section.layers_to_transform is not None else "")
        raise RecipeError(f"{where}: lora.target_modules {clipped_repr(section.target_modules)}{layers} match no "
                          f"module of {base.spec}; its linear layers are named: {', '.join(linear)}") from None


def torch_dtype(precision: str) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def weight_dtype(precision: str, device_type: str) -> Any:
    """The dtype weights are loaded in. On CPU always fp32: bf16 there is autocast (`compute_precision`) over
    fp32 weights, as torch's CPU autocast expects and so LoRA updates are not rounded away. On GPUs the
    precision itself (TRL's and PEFT's usual bf16/fp16 base with fp32 adapters)."""
    import torch

    return torch.float32 if device_type == "cpu" else torch_dtype(precision)


def compute_precision(precision: str, device_type: str) -> Any:
    """A context in which forward passes compute in `precision`: torch autocast for bf16/fp16, nothing for fp32.
    Sampling, scoring and log-probs run in it so that they see the model as training does."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch_dtype(precision))
