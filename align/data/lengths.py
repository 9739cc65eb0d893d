"""Token lengths of canonical rows as TRL's trainers tokenise them, and what each stage does with rows longer
than `train.max_length`: the rules `training.prepare` applies before any weights load and `align data validate`
reports.

TRL 1.16's rules (keep_start truncation, which align uses): SFTTrainer cuts a sequence to max_length and drops a
row whose prompt alone fills it (no completion token is left to learn from; only with completion_only_loss, and
never with packing, which chunks rather than cuts); DPOTrainer does the same with its prompt; RewardTrainer drops
a pair when prompt + chosen or prompt + rejected is longer. The tokenizer comes in as an object (only its
`apply_chat_template`, `__call__` and `eos_token` are used), so this module stays free of model imports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from align.data.cards import LoadedData
from align.errors import DataError

REPLIES = ("completion", "chosen", "rejected")


@dataclass(frozen=True)
class RowLength:
    """One row in tokens: its prompt (where the trainer's completion starts) and each full sequence the trainer
    reads (prompt + completion; prompt + chosen and prompt + rejected), closed as the trainer closes it."""

    prompt: int
    sequences: tuple[int, ...]

    @property
    def longest(self) -> int:
        return max(self.sequences, default=self.prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        length += 1
    return length


def length_counter(tokenizer: Any, chat_template: str) -> Callable[[dict[str, Any]], RowLength]:
    """`row -> RowLength` with the token ids TRL builds: the chat template (the prompt alone with its generation
    prompt), or with `chat_template: none` the plain text, every reply followed by the EOS string."""

    def ids(messages: list[dict[str, str]], *, generation_prompt: bool = False, close: bool = False) -> list[int]:
        if chat_template == "none":
            text = "".join(message["content"] for message in messages)
            eos = (tokenizer.eos_token or "") if close else ""
            return tokenizer(text + eos)["input_ids"]
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  add_generation_prompt=generation_prompt)["input_ids"])

    def count(row: dict[str, Any]) -> RowLength:
        prompt = ids(row["prompt"], generation_prompt=True)
        full = [ids(row["prompt"] + row[reply], close=True) for reply in REPLIES if reply in row]
        # As TRL: the completion starts where the prompt alone and prompt + reply stop agreeing.
        start = min((_common_prefix(prompt, sequence) for sequence in full), default=len(prompt))
        return RowLength(prompt=start, sequences=tuple(map(len, full)))

    return count


Fate = Literal["kept", "truncated", "too_long"]


@dataclass(frozen=True)
class LengthPolicy:
    """What one stage's trainer does with a row longer than max_length."""

    stage: str
    drops: Literal["prompt_fills", "longer", "never"]
    truncates: bool

    def fate(self, length: RowLength, max_length: int) -> Fate:
        if self.drops == "prompt_fills" and length.prompt >= max_length:
            return "too_long"
        if self.drops == "longer" and length.longest > max_length:
            return "too_long"
        return "truncated" if self.truncates and length.longest > max_length else "kept"

    def rule(self, max_length: int) -> str:
        """The drop rule in words, for messages."""
        if self.drops == "prompt_fills":
            return f"it drops a row whose prompt alone fills max_length={max_length} tokens"
        if self.drops == "longer":
            return f"it drops a pair when prompt + chosen or prompt + rejected is longer than {max_length} tokens"
        return "it drops no row for its length"

    def needed(self, length: RowLength) -> int:
        """The smallest max_length that keeps this row."""
        return length.prompt + 1 if self.drops == "prompt_fills" else length.longest


def length_policy(stage: str, *, packing: bool = False, completion_only_loss: bool = True) -> LengthPolicy | None:
    """The max_length rule of a stage's trainer; None for stages whose rows are prompts (no max_length applies)."""
    if stage == "sft":
        if packing:  # chunked into max_length blocks: nothing cut, nothing dropped
            return LengthPolicy(stage, "never", truncates=False)
        return LengthPolicy(stage, "prompt_fills" if completion_only_loss else "never", truncates=True)
    # DPO and KTO drop a row whose prompt alone fills max_length (TRL 1.16); ORPO and SimPO (TRL's CPO) would keep
    # it with an empty reply, so align drops it for them too.
    if stage in ("dpo", "kto", "orpo", "simpo"):
        return LengthPolicy(stage, "prompt_fills", truncates=True)
    if stage == "reward":
        return LengthPolicy(stage, "longer", truncates=False)
    return None


SPLITS = ("train", "eval")
Lengths = dict[str, list[RowLength]]  # split -> one RowLength per row of that split


def measure(data: LoadedData, count: Callable[[dict[str, Any]], RowLength]) -> Lengths:
    return {split: [count(row) for row in getattr(data, split)] for split in SPLITS}


@dataclass(frozen=True)
class SplitFates:
    """One split under a stage's rule: the rows kept (cut or not), how many were cut, the lengths of those dropped."""

    kept: list[dict[str, Any]]
    truncated: int
    dropped: list[RowLength]


def split_fates(rows: list[dict[str, Any]], lengths: list[RowLength], policy: LengthPolicy,
                max_length: int) -> SplitFates:
    kept, dropped, truncated = [], [], 0
    for row, length in zip(rows, lengths, strict=True):
        fate = policy.fate(length, max_length)
        if fate == "too_long":
            dropped.append(length)
            continue
        kept.append(row)
        truncated += fate == "truncated"
    return SplitFates(kept, truncated, dropped)


def stage_fates(data: LoadedData, lengths: Lengths, policy: LengthPolicy, max_length: int) -> dict[str, SplitFates]:
    return {split: split_fates(getattr(data, split), lengths[split], policy, max_length) for split in SPLITS}


def nothing_left(data: LoadedData, fates: dict[str, SplitFates], policy: LengthPolicy,
                 max_length: int) -> DataError | None:
    """The error for a split that had rows and keeps none (TRL would fail deep inside with num_samples=0): it names
    the card, max_length, the shortest row and the max_length that would keep it."""
    for split in SPLITS:
        rows = getattr(data, split)
        if rows and not fates[split].kept:
            shortest = min(fates[split].dropped, key=policy.needed)
            what = "prompt" if policy.drops == "prompt_fills" else "pair (its longer sequence)"
            size = shortest.prompt if policy.drops == "prompt_fills" else shortest.longest
            return DataError(
                f"{data.card.path}: every {split} row ({len(rows)}) is too long for `align {policy.stage}` at "
                f"train.max_length={max_length}: {policy.rule(max_length)}, and the shortest {what} is {size} "
                f"tokens. Raise train.max_length to at least {policy.needed(shortest)}, or shorten the rows")
    return None


def apply_max_length(data: LoadedData, lengths: Lengths, policy: LengthPolicy, max_length: int) -> LoadedData:
    """The rows the stage's trainer keeps (so TRL drops nothing more and the counts say what it trained on), with
    `too_long` and `train_truncated` counted; `nothing_left`'s DataError when a split would be left empty."""
    fates = stage_fates(data, lengths, policy, max_length)
    error = nothing_left(data, fates, policy, max_length)
    if error is not None:
        raise error
    too_long = sum(len(f.dropped) for f in fates.values())
    return replace(data, train=fates["train"].kept, eval=fates["eval"].kept, too_long=data.too_long + too_long,
                   train_truncated=fates["train"].truncated if policy.truncates else 0)


def recipe_length_policy(recipe: Any) -> LengthPolicy | None:
    """The max_length rule of a recipe's stage under its settings (`packing`, `sft.completion_only_loss`)."""
    return length_policy(recipe.stage, packing=recipe.train.packing,
                         completion_only_loss=recipe.sft.completion_only_loss)


def recipe_max_length(data: LoadedData, recipe: Any, tokenizer: Any) -> LoadedData:
    """`apply_max_length` with a recipe's stage, chat template and train.max_length (unchanged data for stages
    whose trainer has no max_length)."""
    policy = recipe_length_policy(recipe)
    if policy is None:
        return data
    lengths = measure(data, length_counter(tokenizer, recipe.model.chat_template))
    return apply_max_length(data, lengths, policy, recipe.train.max_length)
