"""Replies per second of align's generation (`align.generation.generate_samples`: pairs, eval and PPO rollouts)
against transformers' own loop with the same settings (issue 14, item 3), in fp32 and under bf16 autocast.

    python bench/generation.py [--model demo|DIR] [--registry DIR] [--prompts 64] [--num-samples 1]
                               [--max-new-tokens 32] [--batch-sizes 16,32,64] [--precisions fp32,bf16]
                               [--repeats 1] [--static-cache] [--out FILE]

Rows, per precision, on the same prompts, temperature and seed:

- **model.generate, batch 16, input order**: the naive loop and the baseline: prompts in the given order,
  left-padded in batches of 16, `model.generate` with the GenerationConfig that samples what align samples
  (`generation.sampling_config`: softmax(logits / T), every other processor off);
- **model.generate, batch B, longest first**: the same loop on the batches align would form
  (`generation.length_batches`), to show what batching alone buys;
- **generate_samples, batch B**: align (length-sorted batches, its own decoding loop and sampler, and under
  autocast each frozen weight cast to bf16 once per call instead of once per step: `generation.weights_cast_once`).
- with `--static-cache`: `model.generate` with transformers' static KV cache, plain and compiled (`torch.compile`
  through `CompileConfig`), batch B, longest first. The first compiled batch pays for compiling; the row
  reports the time after one untimed warm-up batch, and the warm-up separately (a batch of another shape may
  compile again inside the row, as it would in a real run).

bf16 rows run inside `models.compute_precision("bf16", device)`: torch autocast over fp32 weights, as align's
stages sample on a CPU with bf16 units. replies/s = replies / wall seconds; CPU s is this process's CPU time
(less disturbed than wall time when other processes share the cores). Run it alone on the machine.

`--model demo` (the default) is the demo chain's model: SmolLM2-135M-Instruct from the demo SFT recipe's base,
with demo-sft@latest's adapter when `--registry` holds one (what `align pairs` and `align eval` sample from), else
with a fresh adapter of the demo SFT recipe's LoRA shape (the same compute; the output says which). `--model DIR`
takes any local causal LM directory as it is, e.g. /work/shared/models/stories260K for a quick smoke run.
Prompts are the demo prompts card's training prompts (what `align pairs` samples), rendered by the chat template,
each `--num-samples` times in a row as pairs (4) and eval (2 in the demo) ask; PPO rollouts ask once (1).
Each precision starts with an untimed warm-up of both loops.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from align import generation, models
from align.data import load_card, load_data
from align.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEMO_SFT = REPO / "recipes" / "demo" / "sft.yaml"
PROMPTS_CARD = REPO / "data_cards" / "demo-prompts.yaml"
BASELINE_BATCH = 16
TARGET = 2.0  # x the baseline's replies/s (issue 14)


def load_model(spec: str, registry: Path | None) -> tuple[Any, Any, str]:
    """(model in eval mode, tokenizer, a description) for `--model`: the demo model or a local directory."""
    if spec != "demo":
        base = models.resolve_base(spec, Path.cwd())
        return models.load_base_model(base).eval(), models.load_tokenizer(base, "auto"), f"{spec} (no adapter)"
    if registry is not None:
        from align.artifacts import Registry

        artifact = Registry(registry).resolve("demo-sft@latest")
        model, tokenizer = models.load_artifact_model(artifact, Registry(registry))
        return model, tokenizer, f"{artifact.ref} (SmolLM2-135M-Instruct + its adapter)"
    from peft import get_peft_model

    recipe = load_recipe(DEMO_SFT)
    base = models.resolve_base(recipe.model.base, DEMO_SFT.parent)
    model = get_peft_model(models.load_base_model(base), models.lora_config(recipe.lora)).eval()
    return (model, models.load_tokenizer(base, recipe.model.chat_template),
            "SmolLM2-135M-Instruct + a fresh adapter of demo-sft's LoRA shape (no --registry with demo-sft)")


def hf_generate(model: Any, tokenizer: Any, texts: list[str], batches: list[list[int]], settings: dict[str, Any],
                cache: str | None = None, compiled: bool = False) -> None:
    """transformers' loop: each batch left-padded and sampled by `model.generate` with align's sampling config."""
    import torch
    from transformers import CompileConfig

    config = generation.sampling_config(
        max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"], top_p=1.0,
        stop_ids=generation.stop_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id)
    if cache is not None:
        config.cache_implementation = cache
    if compiled:
        config.compile_config = CompileConfig()
        config.compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    torch.manual_seed(settings["seed"])
    try:
        for rows in batches:
            batch = tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad(), generation.checkpoint_settings_ignored(model, tokenizer):
                model.generate(**batch, generation_config=config)
    finally:
        tokenizer.padding_side = side


def timed(run: Callable[[], None], precision: str, repeats: int) -> tuple[float, float]:
    """Median (wall s, CPU s) of `repeats` runs inside the precision's compute context."""
    walls, cpus = [], []
    for _ in range(repeats):
        with models.compute_precision(precision, "cpu"):
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def in_order(count: int, size: int) -> list[list[int]]:
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def rows_for(model: Any, tokenizer: Any, prompts: list[Any], precision: str, args: argparse.Namespace
             ) -> Iterator[tuple[str, int, float, float, str]]:
    """(method, batch, wall s, CPU s, note) of every variant at one precision; the baseline first."""
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": 0}
    texts = [generation.render_prompt(tokenizer, p, "auto") for p in prompts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    baseline = in_order(len(texts), BASELINE_BATCH)
    with models.compute_precision(precision, "cpu"):  # first calls pay one-off set-up costs: not in any row
        hf_generate(model, tokenizer, texts, [[0, 1]], {**settings, "max_new_tokens": 2})
        generation.generate_samples(model, tokenizer, prompts[:2], chat_template="auto", max_new_tokens=2)
    yield ("model.generate, input order", BASELINE_BATCH,
           *timed(lambda: hf_generate(model, tokenizer, texts, baseline, settings), precision, args.repeats), "")
    for size in args.batch_sizes:
        batches = generation.length_batches(encoded, size)
        yield ("model.generate, longest first", size,
               *timed(lambda b=batches: hf_generate(model, tokenizer, texts, b, settings), precision, args.repeats), "")
        if args.static_cache:
            yield ("model.generate, static cache", size,
                   *timed(lambda b=batches: hf_generate(model, tokenizer, texts, b, settings, "static"),
                          precision, args.repeats), "")
            warm = timed(lambda b=batches: hf_generate(model, tokenizer, texts, b[:1], settings, "static", True),
                         precision, 1)
            yield ("model.generate, static cache + compile", size,
                   *timed(lambda b=batches: hf_generate(model, tokenizer, texts, b, settings, "static", True),
                          precision, args.repeats), f"warm-up batch {warm[0]:.0f} s")
        yield ("generate_samples", size, *timed(
            lambda s=size: generation.generate_samples(model, tokenizer, prompts, chat_template="auto",
                                                       max_new_tokens=args.max_new_tokens,
                                                       temperature=args.temperature, seed=0, batch_size=s),
            precision, args.repeats), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="'demo' or a local model directory")
    parser.add_argument("--registry", type=Path, help="a registry holding demo-sft (after make demo)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--num-samples", type=int, default=1, help="replies per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-sizes", type=lambda text: [int(x) for x in text.split(",")], default=[16, 32, 64])
    parser.add_argument("--precisions", type=lambda text: text.split(","), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=1, help="runs per row; the median is reported")
    parser.add_argument("--static-cache", action="store_true", help="add static-cache and compiled rows (slow)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args()

    import torch

    model, tokenizer, described = load_model(args.model, args.registry)
    rows = load_data(load_card(PROMPTS_CARD)).train[: args.prompts]
    prompts = [row["prompt"] for row in rows for _ in range(args.num_samples)]
    lines = [f"Model: {described}. {len(rows)} prompts x {args.num_samples} replies x {args.max_new_tokens} new "
             f"tokens, temperature "
             f"{args.temperature}, torch {torch.__version__}, {torch.get_num_threads()} threads. Speed-up: replies/s "
             f"over the baseline (model.generate, batch {BASELINE_BATCH}, input order) at the same precision, and "
             f"over the fp32 baseline; target >= {TARGET:g}x.", "",
             "| precision | method | batch | replies/s | wall s | CPU s | x baseline | x fp32 baseline | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    fp32_rate = None
    for precision in args.precisions:
        base_rate = None
        for method, size, wall, cpu, note in rows_for(model, tokenizer, prompts, precision, args):
            rate = len(prompts) / wall
            base_rate = base_rate or rate
            if precision == "fp32" and fp32_rate is None:
                fp32_rate = rate
            versus_fp32 = f"{rate / fp32_rate:.2f}" if fp32_rate else "-"
            line = (f"| {precision} | {method} | {size} | {rate:.2f} | {wall:.1f} | {cpu:.1f} | "
                    f"{rate / base_rate:.2f} | {versus_fp32} | {note} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
