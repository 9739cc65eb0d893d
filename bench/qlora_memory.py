"""Weight memory of PPO's four roles (policy, value, reward, reference) on a 7B Llama-shaped model: four bf16 copies
(`ppo.models: separate`), one bf16 base shared (`shared`), and one quantised base shared (`model.quantization`:
8-bit, 4-bit NF4 with and without double quantisation).

    python bench/qlora_memory.py [--r 16] [--out FILE]

Nothing is downloaded or allocated: the models are built from Llama-2-7B's config values (written below) on the
meta device, and the bytes are counted from their real parameter shapes — the byte count bitsandbytes keeps for
each quantised linear weight (packed codes, block-wise absmax constants, code tables), the embeddings, norms and
output layer it leaves unquantised, the LoRA adapters PEFT attaches (`lora.target_modules: all-linear`, kept in
fp32 as PEFT creates them) and the scalar heads. Activations, gradients, optimizer state and the KV cache are not
weights and are not counted.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Llama-2-7B (meta-llama/Llama-2-7b-hf config.json).
LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

BLOCKSIZE = 64  # bitsandbytes' 4-bit block (transformers' default for load_in_4bit)
NESTED_BLOCKSIZE = 256  # double quantisation: absmax values quantised to 8 bits in blocks of 256
CODE_BYTES = 16 * 4  # the NF4/FP4 code table, 16 fp32 values per weight
NESTED_CODE_BYTES = 256 * 4  # the 8-bit dynamic code of the nested absmax quantisation, 256 fp32
OFFSET_BYTES = 4  # the mean subtracted from absmax before nesting (fp32)
# bitsandbytes leaves these unquantised: transformers' quantiser skips the output layer (and score heads), and
# embeddings and norms are not linear layers.
KEEP_UNQUANTISED = ("lm_head", "score")


def nf4_bytes(numel: int, double_quant: bool) -> int:
    """Bytes bitsandbytes holds for one 4-bit weight of `numel` elements: two codes per byte, one absmax per block
    of 64 (fp32, or 8-bit plus one fp32 per 256 blocks and the nested code table with double quantisation)."""
    blocks = math.ceil(numel / BLOCKSIZE)
    packed = math.ceil(numel / 2)
    if not double_quant:
        return packed + 4 * blocks + CODE_BYTES
    nested = math.ceil(blocks / NESTED_BLOCKSIZE)
    return packed + blocks + 4 * nested + NESTED_CODE_BYTES + OFFSET_BYTES + CODE_BYTES


def int8_bytes(out_features: int, in_features: int) -> int:
    """LLM.int8(): one int8 per weight and one fp32 scale per output row (SCB)."""
    return out_features * in_features + 4 * out_features


def skeleton(config: dict[str, Any], head: str = "causal_lm") -> Any:
    """A Llama model with these config values on the meta device (shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    llama = LlamaConfig(**config, num_labels=1)
    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(llama)


def quantised_linears(model: Any) -> list[tuple[str, Any]]:
    """The linear layers bitsandbytes replaces: every nn.Linear but the output layer and score head."""
    from torch import nn

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_UNQUANTISED]


def base_bytes(model: Any, scheme: str, other_bytes: int = 2) -> int:
    """Weight bytes of one copy of `model`: `scheme` bf16 (everything 2 bytes), int8, nf4 or nf4-dq for the
    quantised linears; the rest (embeddings, norms, output layer) at `other_bytes` per element."""
    quantised = {f"{name}.weight": module for name, module in quantised_linears(model)} if scheme != "bf16" else {}
    total = 0
    for name, param in model.named_parameters():
        module = quantised.get(name)
        if module is None:
            total += param.numel() * (2 if scheme == "bf16" else other_bytes)
        elif scheme == "int8":
            total += int8_bytes(module.out_features, module.in_features)
        else:
            total += nf4_bytes(param.numel(), double_quant=scheme == "nf4-dq")
    return total


def lora_bytes(model: Any, r: int) -> int:
    """Bytes of one LoRA adapter (fp32, as PEFT creates trainable adapters) with all-linear targets, counted on
    the adapted skeleton."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # as align.models: import noise
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_peft_model(model, LoraConfig(r=r, target_modules="all-linear"))
    return 4 * sum(p.numel() for name, p in adapted.named_parameters() if "lora_" in name)


@dataclass(frozen=True)
class Row:
    layout: str
    base: int  # bytes of base weights (all copies)
    extra: int  # adapters and scalar heads

    @property
    def total(self) -> int:
        return self.base + self.extra


def ppo_rows(config: dict[str, Any], r: int) -> list[Row]:
    """The four roles' weight bytes in each layout, from the real shapes of `config`."""
    causal, scored = skeleton(config), skeleton(config, "score")
    hidden = config["hidden_size"]
    adapter = lora_bytes(skeleton(config), r)
    heads = 4 * (hidden + 1) + 4 * hidden  # value head (weight + bias) and reward score head, fp32
    # Separate: reference and policy and value each a causal LM, the reward model a sequence classifier whose score
    # head is its own; policy, value and reward each carry a LoRA adapter, the value model a value head.
    separate = Row("four bf16 copies (`ppo.models: separate`)",
                   3 * base_bytes(causal, "bf16") + base_bytes(scored, "bf16"), 3 * adapter + 4 * (hidden + 1))
    rows = [separate, Row("one bf16 base shared (`ppo.models: shared`)", base_bytes(causal, "bf16"),
                          3 * adapter + heads)]
    for scheme, label in (("int8", "one 8-bit base shared (LLM.int8)"),
                          ("nf4", "one 4-bit NF4 base shared, no double quant"),
                          ("nf4-dq", "one 4-bit NF4 base shared, double quant")):
        rows.append(Row(label, base_bytes(causal, scheme), 3 * adapter + heads))
    # What align trains with: PEFT's prepare_model_for_kbit_training puts the unquantised weights in fp32.
    rows.append(Row("one 4-bit NF4 base shared, double quant, as align trains it (embeddings, norms and "
                    "lm_head in fp32 after `prepare_model_for_kbit_training`)",
                    base_bytes(causal, "nf4-dq", other_bytes=4), 3 * adapter + heads))
    return rows


def parameters(config: dict[str, Any]) -> int:
    return sum(p.numel() for p in skeleton(config).parameters())


def markdown(rows: list[Row], config: dict[str, Any], r: int) -> str:
    gib = 2 ** 30
    first = rows[0].total
    lines = [f"Llama-2-7B shapes ({parameters(config) / 1e9:.2f} B parameters, vocabulary {config['vocab_size']}, "
             f"{config['num_hidden_layers']} layers), LoRA r={r} on all linear layers for policy, value and reward.",
             "", "| layout | base weights | adapters + heads | total | vs four bf16 copies |",
             "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row.layout} | {row.base / gib:.2f} GiB | {row.extra / 2**20:.0f} MiB | "
                     f"{row.total / gib:.2f} GiB | {row.total / first:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank of the policy, value and reward adapters")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    table = markdown(ppo_rows(LLAMA2_7B, args.r), LLAMA2_7B, args.r)
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
