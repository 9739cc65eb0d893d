"""The Python side of the GPU check (bench/gpu_check.sh): a randomly initialised ~0.5B Llama-shaped model built from
a config with a byte-level BPE tokenizer trained here on the repo's demo text (nothing from a hub), then sft, reward,
dpo and ppo a few steps each in bf16, one QLoRA sft (4-bit NF4) and, when deepspeed is installed, one ZeRO-2 sft;
per stage the tokens/s, peak GPU memory and MFU go to one results file (JSON and a markdown table).

    python bench/gpu_check.py run --out DIR [--cpu-smoke] [--steps N]
    python bench/gpu_check.py slim-wheel WHEEL DIR --keep cpu cuda130 ...   (make gpu-wheels)

`--cpu-smoke` runs the same stages on a tiny model of the same shape family on CPU (no ZeRO-2; QLoRA where
bitsandbytes is installed), so the script can be checked without a GPU. Stages run in-process through
`align.cli.main`, so torch and transformers load once and peak memory is measured per stage; the ZeRO-2 run is
`accelerate launch` of `align sft` in a subprocess, its peak read from nvidia-smi.

Throughput: TRL stages report tokens/s as the last step's `num_tokens` over `train_runtime`, both from the
artifact's log history (tokens through the training forward and backward, chosen and rejected for DPO; the
runtime includes the first step's warm-up). MFU = k * N * tokens/s / peak, with N
the model's parameters without the input embedding, k = 4 for LoRA over a frozen base (forward 2N, input-gradient
backward 2N; no weight gradients of the base) and 6 for DPO (its reference forward adds 2N); peak = 989 TFLOP/s,
the H200's dense bf16 figure. PPO's tokens/s is align's own log (reply tokens per second of whole PPO steps,
sampling included), for which this MFU convention does not hold, so none is given.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
H200_BF16_PEAK = 989e12

# ~0.5B parameters, Llama-shaped with grouped-query attention (Qwen2.5-0.5B's proportions, wider and shallower).
MODEL_GPU = {"hidden_size": 1280, "intermediate_size": 3456, "num_hidden_layers": 28, "num_attention_heads": 20,
             "num_key_value_heads": 4, "max_position_embeddings": 1024}
MODEL_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 256}
VOCAB_GPU, VOCAB_TINY = 4096, 512
SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
FLOPS_PER_PARAM = {"sft": 4, "reward": 4, "dpo": 6, "qlora-sft": 4, "zero2-sft": 4}


# ---- what the check trains on ------------------------------------------------------------------------------------


def demo_rows() -> list[dict[str, Any]]:
    """The repo's demo SFT conversations (data_cards/demo/sft.jsonl, which travels with the repo)."""
    lines = (REPO / "data_cards" / "demo" / "sft.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def corpus() -> list[str]:
    """Text to train the tokenizer on: every message of the demo conversations and every demo prompt."""
    texts = [message["content"] for row in demo_rows() for message in row["messages"]]
    for name in ("chat-prompts.jsonl", "story-prompts.jsonl"):
        path = REPO / "data_cards" / "demo" / name
        texts += [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line]
    return texts


def build_tokenizer(vocab_size: int, out: Path) -> Any:
    """A byte-level BPE tokenizer trained on `corpus()` (a second or two), saved as a fast tokenizer with
    unk/bos/eos/pad; no chat template, so align uses its default one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL)
    fast.save_pretrained(out)
    return fast


def build_model(shape: dict[str, int], tokenizer: Any, out: Path, device: str, seed: int = 0) -> int:
    """A randomly initialised Llama-shaped model saved in bf16 to `out` (built on `device`: seconds on a GPU);
    returns its parameter count without the input embedding (the N of MFU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, vocab_size=len(tokenizer), tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def card(path: Path, name: str, source: str, fmt: str, eval_size: int) -> Path:
    path.write_text(f"name: {name}\ndescription: generated by bench/gpu_check.py\nlicense: MIT (written for align)\n"
                    f"source:\n  path: {source}\nformat: {fmt}\neval:\n  size: {eval_size}\n  seed: 0\n",
                    encoding="utf-8")
    return path


def write_cards(work: Path) -> dict[str, Path]:
    """Data cards: the demo conversations (sft), pairs made from them (each answer chosen over another row's,
    for reward and dpo), and the demo chat prompts (ppo)."""
    work = work / "cards"
    work.mkdir(parents=True, exist_ok=True)
    rows = demo_rows()
    shuffled = random.Random(0).sample(rows, len(rows))
    with (work / "pairs.jsonl").open("w", encoding="utf-8") as pairs:
        for row, other in zip(rows, shuffled[1:] + shuffled[:1], strict=True):
            prompt, answer = row["messages"][:-1], row["messages"][-1]["content"]
            rejected = other["messages"][-1]["content"]
            if rejected != answer:
                pairs.write(json.dumps({"prompt": prompt, "chosen": answer, "rejected": rejected}) + "\n")
    return {"sft": card(work / "sft.yaml", "gpu-sft", str(REPO / "data_cards/demo/sft.jsonl"), "messages", 32),
            "pairs": card(work / "pairs.yaml", "gpu-pairs", "pairs.jsonl", "chosen_rejected", 32),
            "prompts": card(work / "prompts.yaml", "gpu-prompts", str(REPO / "data_cards/demo/chat-prompts.jsonl"),
                            "prompts", 16)}


def recipe_text(stage: str, name: str, model: str, data: str, steps: int, batch: int, extra: str = "") -> str:
    """One stage recipe: LoRA r=16 on every linear layer, `steps` optimizer steps, logged every step."""
    return (f"stage: {stage}\nname: {name}\nmodel:\n  {model}\ndata:\n  card: {data}\n  limit: {steps * batch * 2}\n"
            f"  eval_limit: 16\nlora:\n  r: 16\n  lora_alpha: 32\n  lora_dropout: 0.0\n  target_modules: all-linear\n"
            f"train:\n  max_steps: {steps}\n  per_device_train_batch_size: {batch}\n  per_device_eval_batch_size: "
            f"{batch}\n  max_length: 256\n  logging_steps: 1\n  save_steps: 1000\n  learning_rate: 1.0e-4\n"
            f"  seed: 0\n{extra}")


def write_recipes(work: Path, model_dir: Path, cards: dict[str, Path], steps: int, batch: int) -> dict[str, Path]:
    """The recipes of every stage the check runs, keyed by the check's stage label."""
    base, parent = f"base: {model_dir}", "from: gpu-sft@latest"
    texts = {
        "sft": recipe_text("sft", "gpu-sft", base, str(cards["sft"]), steps, batch, "sft:\n  num_samples: 0\n"),
        "reward": recipe_text("reward", "gpu-rm", parent, str(cards["pairs"]), steps, batch),
        "dpo": recipe_text("dpo", "gpu-dpo", parent, str(cards["pairs"]), steps, batch),
        "ppo": recipe_text("ppo", "gpu-ppo", parent, str(cards["prompts"]), steps, batch,
                           f"ppo:\n  reward_model: gpu-rm@latest\n  rollout_batch_size: {2 * batch}\n"
                           "  num_ppo_epochs: 1\n  max_new_tokens: 64\n"),
        "qlora-sft": recipe_text("sft", "gpu-qlora-sft", f"{base}\n  quantization:\n    bits: 4\n    "
                                 "quant_type: nf4\n    double_quant: true", str(cards["sft"]), steps, batch,
                                 "sft:\n  num_samples: 0\n"),
        "zero2-sft": recipe_text("sft", "gpu-zero2-sft", base, str(cards["sft"]), steps, batch,
                                 "sft:\n  num_samples: 0\n"),
    }
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    paths = {}
    for label, text in texts.items():
        paths[label] = work / "recipes" / f"{label}.yaml"
        paths[label].write_text(text, encoding="utf-8")
    return paths


def zero2_config(work: Path) -> Path:
    """The zero2 preset with one process: `accelerate launch` then runs DeepSpeed with world size 1 (align itself
    runs a one-process preset as a plain process, so the check launches it directly)."""
    import yaml

    config = yaml.safe_load((REPO / "recipes" / "accelerate" / "zero2.yaml").read_text(encoding="utf-8"))
    config.update(num_processes=1, num_machines=1, machine_rank=0)
    path = work / "zero2-1proc.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# ---- measuring -----------------------------------------------------------------------------------------------------


def throughput(version_dir: Path, stage: str) -> float | None:
    """Tokens per second of a published run, from its log history (see the module docstring)."""
    history = json.loads((version_dir / "log_history.json").read_text(encoding="utf-8"))
    if stage == "ppo":
        rates = [float(entry["tokens_per_second"]) for entry in history if "tokens_per_second" in entry]
        return sum(rates) / len(rates) if rates else None
    # TRL logs the tokens trained on so far with each training step, and the loop's runtime once at the end.
    tokens = [float(entry["num_tokens"]) for entry in history if "num_tokens" in entry and "loss" in entry]
    runtime = [float(entry["train_runtime"]) for entry in history if "train_runtime" in entry]
    return max(tokens) / runtime[-1] if tokens and runtime and runtime[-1] > 0 else None


def mfu(label: str, tokens_per_second: float | None, parameters: int, peak: float = H200_BF16_PEAK) -> float | None:
    factor = FLOPS_PER_PARAM.get(label)
    if factor is None or tokens_per_second is None:
        return None
    return factor * parameters * tokens_per_second / peak


def latest_version(registry: Path, name: str) -> Path | None:
    versions = sorted((registry / name).glob("v[0-9]*"), key=lambda p: int(p.name[1:]))
    return versions[-1] if versions else None


def run_in_process(argv: list[str]) -> tuple[int, float, float | None]:
    """(exit code, seconds, peak GPU MiB) of one align command run through `align.cli.main`."""
    import torch

    from align.cli import main

    on_gpu = torch.cuda.is_available()
    gc.collect()  # the previous stage's model, so its memory is not counted in this one's peak
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = int(stop.code or 0)
    seconds = time.perf_counter() - started
    return code, seconds, torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None


def run_launched(argv: list[str], config: Path, env: dict[str, str]) -> tuple[int, float, float | None]:
    """(exit code, seconds, peak MiB in use on GPU 0 as nvidia-smi saw it) of `accelerate launch -m align ARGV`."""
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                       "-i", "0"], capture_output=True, text=True, timeout=10).stdout.strip()
                peak[0] = max(peak[0], float(used or 0))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                           "-m", "align", *argv], env=env).returncode
    seconds = time.perf_counter() - started
    done.set()
    sampler.join(timeout=15)
    return code, seconds, peak[0] or None


# ---- results -------------------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    """The results as a markdown table, with the machine and model above it."""
    lines = [f"Device: {results['device']}; model: {results['model']}; {results['steps']} steps per stage, "
             f"batch {results['batch']}, bf16 where the device has it. {results['started']}.", "",
             "| stage | result | wall s | tokens/s | peak GPU memory | MFU |", "| --- | --- | --- | --- | --- | --- |"]
    for row in results["stages"]:
        tokens = "–" if row["tokens_per_second"] is None else f"{row['tokens_per_second']:,.0f}"
        memory = "–" if row["peak_gpu_mib"] is None else f"{row['peak_gpu_mib'] / 1024:.2f} GiB"
        utilisation = "–" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        lines.append(f"| {row['stage']} | {row['result']} | {row['seconds']:.1f} | {tokens} | {memory} | "
                     f"{utilisation} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(results), encoding="utf-8")


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes", "deepspeed",
                 "pyarrow", "pydantic"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def run(out: Path, *, cpu_smoke: bool, steps: int, batch: int, work: Path) -> dict[str, Any]:
    """Build the model, run every stage, write the results after each one (a later failure keeps the earlier
    figures); returns the results."""
    import importlib.util

    import torch

    device = "cpu" if cpu_smoke or not torch.cuda.is_available() else "cuda"
    registry, model_dir = work / "registry", work / "model"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["ALIGN_CACHE"] = str(work / "cache")
    started = time.perf_counter()
    tokenizer = build_tokenizer(VOCAB_TINY if cpu_smoke else VOCAB_GPU, work / "tokenizer")
    parameters = build_model(MODEL_TINY if cpu_smoke else MODEL_GPU, tokenizer, model_dir, device)
    recipes = write_recipes(work, model_dir, write_cards(work), steps, batch)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke run)",
        "model": f"Llama-shaped, {parameters / 1e6:.3g}M parameters without the input embedding "
                 f"({'tiny' if cpu_smoke else 'hidden 1280, 28 layers, GQA 20/4 heads'}), random init",
        "parameters": parameters, "steps": steps, "batch": batch, "versions": versions(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "setup_seconds": round(time.perf_counter() - started, 1), "stages": []}
    plan = ["sft", "reward", "dpo", "ppo"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        plan.append("qlora-sft")
    if device == "cuda" and importlib.util.find_spec("deepspeed") is not None:
        plan.append("zero2-sft")
    skipped = {"qlora-sft": "bitsandbytes not installed", "zero2-sft": "deepspeed not installed or no GPU"}
    for label in ("sft", "reward", "dpo", "ppo", "qlora-sft", "zero2-sft"):
        if label not in plan:
            results["stages"].append({"stage": label, "result": f"skipped: {skipped[label]}", "seconds": 0.0,
                                      "tokens_per_second": None, "peak_gpu_mib": None, "mfu": None})
            continue
        stage = label.rsplit("-", 1)[-1]
        argv = [stage, str(recipes[label]), "--registry", str(registry)]
        print(f"== {label}: align {' '.join(argv)}", flush=True)
        if label == "zero2-sft":
            code, seconds, peak = run_launched(argv, zero2_config(work), dict(os.environ))
        else:
            code, seconds, peak = run_in_process(argv)
        name = {"sft": "gpu-sft", "reward": "gpu-rm", "dpo": "gpu-dpo", "ppo": "gpu-ppo",
                "qlora-sft": "gpu-qlora-sft", "zero2-sft": "gpu-zero2-sft"}[label]
        version = latest_version(registry, name) if code == 0 else None
        rate = throughput(version, stage) if version is not None else None
        results["stages"].append({"stage": label, "result": "ok" if version is not None else f"exit {code}",
                                  "seconds": round(seconds, 1), "tokens_per_second": rate, "peak_gpu_mib": peak,
                                  "mfu": mfu(label, rate, parameters) if device == "cuda" else None})
        write_results(out, results)
    write_results(out, results)
    return results


# ---- make gpu-wheels ---------------------------------------------------------------------------------------------


def slim_wheel(wheel: Path, out_dir: Path, keep: list[str]) -> Path:
    """A copy of a bitsandbytes wheel holding only the native libraries `libbitsandbytes_{keep}.so`, its RECORD
    rewritten to match (pip installs it like the original)."""
    target = out_dir / wheel.name
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as slim:
        names = [name for name in source.namelist() if _kept(name, keep)]
        record_name = next(name for name in names if name.endswith(".dist-info/RECORD"))
        for name in names:
            if name != record_name:
                slim.writestr(source.getinfo(name), source.read(name))
        rows = [row for row in csv.reader(io.StringIO(source.read(record_name).decode())) if row and row[0] in names]
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        slim.writestr(source.getinfo(record_name), buffer.getvalue())
    return target


def _kept(name: str, keep: list[str]) -> bool:
    file = name.rsplit("/", 1)[-1]
    if not (file.startswith("libbitsandbytes_") and file.endswith((".so", ".dll", ".dylib"))):
        return True
    return file.split(".", 1)[0].removeprefix("libbitsandbytes_") in keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("run", help="build the model and run every stage")
    check.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    check.add_argument("--work", type=Path, help="scratch folder (default: a new one under /tmp)")
    check.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, 1 step per stage")
    check.add_argument("--steps", type=int, default=8)
    check.add_argument("--batch", type=int, default=8)
    slim = commands.add_parser("slim-wheel", help="keep only some native libraries of a bitsandbytes wheel")
    slim.add_argument("wheel", type=Path)
    slim.add_argument("out_dir", type=Path)
    slim.add_argument("--keep", nargs="+", required=True, help="library suffixes, e.g. cpu cuda130")
    args = parser.parse_args()
    if args.command == "slim-wheel":
        print(slim_wheel(args.wheel, args.out_dir, args.keep))
        return
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    steps, batch = (1, 4) if args.cpu_smoke else (args.steps, args.batch)
    results = run(args.out, cpu_smoke=args.cpu_smoke, steps=steps, batch=batch, work=work)
    print(markdown(results))
    sys.exit(0 if all(row["result"] == "ok" or row["result"].startswith("skipped") for row in results["stages"])
             else 1)


if __name__ == "__main__":
    main()
