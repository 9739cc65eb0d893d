"""`align pairs`: preference pairs from a policy and a judge, published as a versioned dataset with its own card.

Steps: prompts card -> prompts; policy (base or artifact, merged) samples K replies per prompt; the judge
scores every reply; per prompt the best and worst (or every ordered pair above a margin) become
chosen/rejected. Pairs from train prompts form the train file and pairs from held-out prompts the eval
file, so held-out prompts stay held out downstream. The artifact's `card.yaml` is a normal data card:
a reward or DPO recipe names it as `data.card: NAME@vN`.

Replies cut off at `max_new_tokens` (no stop token) are recorded per pair (`chosen_truncated`,
`rejected_truncated`); `pairs.truncated` says whether they are dropped, kept open (the card maps them to the
format's `chosen_open`/`rejected_open` fields, so DPO appends no EOS after them) or kept as if they ended.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import yaml

from align import generation, judges, models, runtime, training
from align.artifacts import Artifact, Registry
from align.data import CARD_FILE, Message, load_card, load_data, resolve_card
from align.device import detect_device, resolve_device_defaults
from align.errors import DataError
from align.hashing import sha256_file
from align.recipe import PairsSection, Recipe


def select_pairs(prompt: list[Message], replies: list[str], scores: list[float], settings: PairsSection,
                 truncated: list[bool] | None = None) -> list[dict[str, Any]]:
    """Chosen/rejected rows for one prompt: the best and worst reply, or every ordered pair above the margin.
    Identical replies never form a pair. `truncated` flags replies cut off at max_new_tokens: with
    `settings.truncated == "drop"` they are no candidates at all (so best/worst are picked among ended replies)."""
    cut = truncated if truncated is not None else [False] * len(replies)
    candidates = [(score, reply, flag) for score, reply, flag in zip(scores, replies, cut, strict=True)
                  if not (flag and settings.truncated == "drop")]
    if not candidates:
        return []
    candidates.sort(key=lambda candidate: -candidate[0])
    if settings.selection == "best_worst":
        candidates = [candidates[0], candidates[-1]]
    rows = []
    for (high, chosen, chosen_cut), (low, rejected, rejected_cut) in itertools.combinations(candidates, 2):
        if high - low > settings.min_margin and chosen.strip() != rejected.strip() and chosen.strip():
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "chosen_score": high, "rejected_score": low,
                         "chosen_truncated": chosen_cut, "rejected_truncated": rejected_cut})
    return rows


def _sample_and_judge(model: Any, tokenizer: Any, prompts: list[list[Message]], judge: judges.JudgeFn,
                      recipe: Recipe, seed: int) -> list[dict[str, Any]]:
    """K judged replies for each prompt: [{"prompt", "replies", "scores", "truncated"}]."""
    settings = recipe.pairs
    repeated = [prompt for prompt in prompts for _ in range(settings.num_samples)]
    samples = generation.generate_samples(
        model, tokenizer, repeated, chat_template=recipe.model.chat_template, max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature, top_p=settings.top_p, seed=seed, batch_size=settings.batch_size,
        progress=f"sampling {len(prompts)} prompts x {settings.num_samples}")
    replies = [sample.text for sample in samples]
    cut = [sample.truncated for sample in samples]
    scores = judge(repeated, replies)
    k = settings.num_samples
    return [{"prompt": prompt, "replies": replies[i * k:(i + 1) * k], "scores": scores[i * k:(i + 1) * k],
             "truncated": cut[i * k:(i + 1) * k]}
            for i, prompt in enumerate(prompts)]


def _pairs_of(items: list[dict[str, Any]], settings: PairsSection) -> list[dict[str, Any]]:
    return [pair for item in items
            for pair in select_pairs(item["prompt"], item["replies"], item["scores"], settings, item["truncated"])]


def truncation_metrics(judged: dict[str, list[dict[str, Any]]], rows: dict[str, list[dict[str, Any]]],
                       settings: PairsSection) -> dict[str, Any]:
    """How many replies were cut off, how many kept pairs hold one, and how many pairs `drop` cost: per prompt,
    the pairs selection would make if cut-off replies were kept, minus the pairs it made (never below 0)."""
    flags = [flag for items in judged.values() for item in items for flag in item["truncated"]]
    kept = [pair for split_rows in rows.values() for pair in split_rows]
    lost = 0
    if settings.truncated == "drop":
        keeping = settings.model_copy(update={"truncated": "keep"})
        for item in (item for items in judged.values() for item in items if any(item["truncated"])):
            lost += max(0, len(_pairs_of([item], keeping)) - len(_pairs_of([item], settings)))
    return {
        "replies_truncated": sum(flags),
        "replies_truncated_fraction": round(sum(flags) / max(len(flags), 1), 4),
        "pairs_with_truncated": sum(1 for p in kept if p["chosen_truncated"] or p["rejected_truncated"]),
        "pairs_dropped_truncated": lost,
    }


def _card_text(recipe: Recipe, policy: str) -> str:
    card = {
        "name": recipe.name,
        "description": (f"Preference pairs sampled from {policy} ({recipe.pairs.num_samples} replies per prompt, "
                        f"temperature {recipe.pairs.temperature}) and labelled by the judge "
                        f"'{recipe.pairs.judge}' ({recipe.pairs.selection}); written by `align pairs`."),
        "license": "as the prompts' card and the policy model",
        "source": {"path": "train.jsonl", "eval_path": "eval.jsonl"},
        "format": "chosen_rejected",
    }
    if recipe.pairs.truncated == "keep_open":
        # The format's open-reply fields read the recorded flags, so DPO leaves those replies unclosed;
        # under `keep` they stay unmapped and every reply is closed as before.
        card["fields"] = {"chosen_open": "chosen_truncated", "rejected_open": "rejected_truncated"}
    return yaml.safe_dump(card, sort_keys=False)


def run(recipe: Recipe, registry: Registry, *, resume: bool = False, say: Any = print) -> Artifact | None:
    """Sample, judge, select and publish a pairs dataset. Returns the artifact on the main process."""
    card_path, data_parent = resolve_card(recipe.data.card, recipe.path.parent, registry)
    data = load_data(load_card(card_path), limit=recipe.data.limit, eval_limit=recipe.data.eval_limit)
    start = models.resolve_starting_point(recipe, registry)
    judge, judge_artifact = judges.load_judge(recipe.pairs.judge, registry, recipe.path.parent)
    device = detect_device()
    recipe = resolve_device_defaults(recipe, device, models.hidden_size(start.base))
    from accelerate import PartialState

    state = PartialState()  # initialises the process group under `accelerate launch`
    run_state = training.open_run(recipe, registry, start, data.summary(), device, False, data_parent)

    chat_template = recipe.model.chat_template
    tokenizer = models.load_tokenizer(start.base, chat_template, saved_in=start.parent.path if start.parent else None)
    precision = recipe.train.precision
    model = models.load_starting_model(start, registry, models.weight_dtype(precision, device["type"]))
    model = model.to(state.device)

    # Each rank samples its own share of the prompts with its own seed; rank 0 collects them all.
    rank, world = runtime.world()
    seed = runtime.rank_seed(recipe.pairs.seed, "pairs")
    started = time.time()
    judged = {}
    for split in ("train", "eval"):
        prompts = [row["prompt"] for row in getattr(data, split)]
        with models.compute_precision(precision, device["type"]):
            mine = _sample_and_judge(model, tokenizer, prompts[rank::world], judge, recipe, seed) if prompts else []
        judged[split] = [item for part in runtime.gather_objects(mine) for item in part]
    sampling_s = time.time() - started

    rows = {split: _pairs_of(items, recipe.pairs) for split, items in judged.items()}
    cut_off = truncation_metrics(judged, rows, recipe.pairs)
    if not rows["train"]:
        hint = ""
        if recipe.pairs.truncated == "drop" and cut_off["replies_truncated"]:
            hint = (f"; {cut_off['replies_truncated']} replies were cut off at max_new_tokens="
                    f"{recipe.pairs.max_new_tokens} and dropped (pairs.truncated: drop): raise max_new_tokens or "
                    "set pairs.truncated: keep_open")
        raise DataError(f"{recipe.path}: the judge found no pair above min_margin={recipe.pairs.min_margin}; "
                        f"sample more replies (pairs.num_samples) or lower the margin{hint}")
    every_score = [s for items in judged.values() for item in items for s in item["scores"]]
    pairs_all = rows["train"] + rows["eval"]
    metrics = {
        "rows_read": data.read,  # = prompts_train + prompts_eval + the rows dropped (by reason)
        "rows_dropped": data.dropped_by_reason(),
        "prompts_train": len(judged["train"]),
        "prompts_eval": len(judged["eval"]),
        "pairs_train": len(rows["train"]),
        "pairs_eval": len(rows["eval"]),
        "judge_mean": sum(every_score) / len(every_score),
        "chosen_mean": sum(p["chosen_score"] for p in pairs_all) / len(pairs_all),
        "rejected_mean": sum(p["rejected_score"] for p in pairs_all) / len(pairs_all),
        **cut_off,
        "sampling_s": round(sampling_s, 2),
        "replies_per_second": round(len(every_score) / max(sampling_s, 1e-9), 2),
    }
    policy = start.parent.ref if start.parent else start.base.spec

    def write_files(staging: Path) -> None:
        for split, split_rows in rows.items():
            with open(staging / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for row in split_rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        with open(staging / "samples.jsonl", "w", encoding="utf-8") as handle:
            for split, items in judged.items():
                for item in items:
                    handle.write(json.dumps({"split": split, **item}, ensure_ascii=False) + "\n")
        card = yaml.safe_load(_card_text(recipe, policy))
        card["sha256"] = {name: sha256_file(staging / name) for name in ("train.jsonl", "eval.jsonl")}
        (staging / CARD_FILE).write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")

    settings = {"policy": policy, "judge": recipe.pairs.judge, **recipe.pairs.model_dump()}
    extra = [(judge_artifact, "judge")] if judge_artifact else []
    return training.publish(run_state, write_files=write_files, metrics=metrics, details={"pairs": settings},
                            extra_parents=extra)
