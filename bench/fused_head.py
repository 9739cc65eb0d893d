"""TRL's fused LM head on a CPU: every position projected (TRL's default off CUDA) against only the labelled ones
(`align.fused_head.compact_on_cpu`, what align's stages run), on the demo model under bf16 autocast.

    python bench/fused_head.py [--pairs 8] [--prompt-tokens 30] [--reply-tokens 32] [--repeats 3]

The batch is DPO's: `--pairs` chosen and rejected sequences of a prompt (unlabelled) and a reply (labelled), the
replies' lengths spread up to `--reply-tokens` (right padding, unlabelled). Each repeat times, interleaved, a
no-grad forward (DPO's reference log-probs) and a forward + backward with the demo DPO recipe's LoRA, both ways.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_DPO = REPO / "recipes" / "demo" / "dpo.yaml"
DEMO_SFT = REPO / "recipes" / "demo" / "sft.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=30)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from peft import get_peft_model
    from trl.trainer import utils as trl_utils

    from align import fused_head, models
    from align.recipe import load_recipe

    torch.manual_seed(0)
    sft = load_recipe(DEMO_SFT)
    base = models.resolve_base(sft.model.base, DEMO_SFT.parent)
    model = models.load_base_model(base)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # as DPO does
    model = get_peft_model(model, models.lora_config(load_recipe(DEMO_DPO).lora))
    rows, length = 2 * args.pairs, args.prompt_tokens + args.reply_tokens
    input_ids = torch.randint(0, model.config.vocab_size, (rows, length))
    labels = input_ids.clone()
    labels[:, : args.prompt_tokens] = -100
    for row in range(rows):  # replies of spread lengths, right-padded
        labels[row, args.prompt_tokens + args.reply_tokens * (row % 4 + 1) // 4:] = -100
    labelled = int((labels[:, 1:] != -100).sum())
    full_hook = trl_utils._use_triton

    def timed(train: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
            output = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        if train:
            output.loss.backward()
            model.zero_grad()
        return time.perf_counter() - start

    times: dict[tuple[str, bool], list[float]] = {}
    fused_head.compact_on_cpu()
    compact_hook = trl_utils._use_triton
    for repeat in range(args.repeats + 1):  # the first round warms up
        for way, hook in (("every position", full_hook), ("labelled only", compact_hook)):
            trl_utils._use_triton = hook
            for train in (False, True):
                seconds = timed(train)
                if repeat:
                    times.setdefault((way, train), []).append(seconds)
    print(f"{rows} sequences x {length} tokens, {labelled} of {rows * (length - 1)} positions labelled, "
          f"{args.repeats} repeats, median s")
    print("| pass | every position (TRL off CUDA) | labelled only (align) | speed-up |")
    print("| --- | --- | --- | --- |")
    for train, name in ((False, "forward, no grad (reference log-probs)"), (True, "forward + backward (LoRA)")):
        full = statistics.median(times[("every position", train)])
        compact = statistics.median(times[("labelled only", train)])
        print(f"| {name} | {full:.3f} | {compact:.3f} | {full / compact:.2f}x |")


if __name__ == "__main__":
    main()
