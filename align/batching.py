"""Training batches of rows of similar token length (`train.group_by_length`), in an order `--resume` reproduces.

TRL's collators pad every batch to its longest sequence, and a pad token costs the forward and backward of a real
one (the LM head and MLPs run on it; only the loss ignores it): step time follows token slots, not real tokens.
Measured with bench/padding.py, uniformly random batches of the demo SFT data are 14.0% pad tokens, grouped 1.2%;
demo-shaped preference pairs 17.5% -> 8.3% (DPO) and 19.4% -> 10.5% (reward), which pad chosen and rejected to
one length that grouping rows cannot change. TRL's padding-free SFT gets 0% but is refused with max_length unless
packing, and measured no faster than grouping; DPO's is disabled in TRL 1.16 and the reward trainer has none.

Transformers' own `train_sampling_strategy="group_by_length"` groups the same way but does not fit here: it reads
lengths from `input_ids`, which TRL's preference datasets do not have (`prompt_ids`, `chosen_ids`,
`rejected_ids`), and it draws its permutation from the global RNG when an epoch starts, so a run resumed mid-epoch
skips the first batches of another order than the one it checkpointed (some rows twice, some never). This sampler
keeps transformers' grouping (`get_length_grouped_indices`: a random permutation cut into mega-batches of up to 50
batches, each sorted by length) with a generator seeded by (seed, epoch), which the Trainer sets through
`set_epoch` before every epoch, the way accelerate's seedable random sampler does for plain shuffling. Evaluation
batches keep their order (transformers' sequential sampler), so eval metrics are computed as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any


def row_lengths(dataset: Any, max_length: int | None = None) -> list[int] | None:
    """Per prepared row, the length of the longest sequence the stage's collator builds from it: `input_ids`
    (SFT), prompt + the longer of chosen and rejected (DPO, reward; at most max_length, where DPO's collator cuts).
    None for a dataset without those columns (not a `datasets.Dataset`, or rows TRL has not tokenised)."""
    import pyarrow.compute as pc

    columns = set(getattr(dataset, "column_names", None) or ())
    if "input_ids" in columns:
        names = ["input_ids"]
    elif {"chosen_ids", "rejected_ids"} <= columns:
        names = ["chosen_ids", "rejected_ids", *(["prompt_ids"] if "prompt_ids" in columns else [])]
    else:
        return None
    table = dataset.with_format("arrow")
    counts = {name: pc.list_value_length(table[name]).to_pylist() for name in names}
    if "input_ids" in counts:
        lengths = counts["input_ids"]
    else:
        prompts = counts.get("prompt_ids") or [0] * len(counts["chosen_ids"])
        lengths = [p + max(c, r) for p, c, r in zip(prompts, counts["chosen_ids"], counts["rejected_ids"], strict=True)]
    return [min(n, max_length) for n in lengths] if max_length else lengths


class LengthGroupedSampler:
    """Row indices for one epoch: transformers' length-grouped order, drawn from a generator seeded by
    seed + epoch, so the same epoch always yields the same order (a resumed run skips exactly what it trained)."""

    def __init__(self, lengths: list[int], group_size: int, seed: int) -> None:
        self.lengths = lengths
        self.group_size = group_size  # rows per optimizer step: the unit transformers groups by
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


@cache
def length_grouped(trainer_cls: type) -> type:
    """`trainer_cls` whose training batches come from a `LengthGroupedSampler` over its prepared train dataset
    (the dataset as the dataloader sees it, after TRL's tokenisation and column removal)."""

    class LengthGrouped(trainer_cls):  # type: ignore[misc, valid-type]
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            dataset = self.train_dataset if train_dataset is None else train_dataset
            lengths = row_lengths(dataset, getattr(self.args, "max_length", None))
            if lengths is None:
                return super()._get_train_sampler(train_dataset)
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return LengthGroupedSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        seed)

    LengthGrouped.__name__ = LengthGrouped.__qualname__ = trainer_cls.__name__
    return LengthGrouped
