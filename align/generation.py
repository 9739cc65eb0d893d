"""Batched generation from chat or plain-text prompts, shared by SFT samples, pairs, eval and PPO rollouts.

Our own decoding loop over transformers' forward pass and KV cache (`decode`), not `model.generate`: what is
sampled is visibly softmax(logits / temperature) and nothing else (no checkpoint or library default can add a
logits processor), no prompt token is computed twice (`prefill`), it samples without `torch.multinomial`'s
exponential draw per vocabulary entry, and a sample's random numbers are fixed by its position in the input, so
sorting prompts into length batches does not change which random numbers a sample gets.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from align.data import Message

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: list[Message], chat_template: str) -> str:
    """The text a model sees before its reply: the chat template with a generation prompt, or plain text."""
    if chat_template == "none":
        return "".join(message["content"] for message in prompt)
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def to_plain_text_row(row: dict[str, Any]) -> dict[str, str]:
    """A canonical conversational row as TRL's standard (non-chat) prompt/completion strings."""
    out = {"prompt": "".join(m["content"] for m in row["prompt"])}
    for key in ("completion", "chosen", "rejected"):
        if key in row:
            out[key] = "".join(m["content"] for m in row[key])
    return out


@dataclass
class Sample:
    """One generated reply: its text, the exact token ids of its prompt and of the reply (up to and including its
    stop token), and whether it ended at a stop token (False: cut off at max_new_tokens)."""

    text: str
    prompt_ids: list[int]
    reply_ids: list[int]
    ended: bool = True

    @property
    def truncated(self) -> bool:
        return not self.ended


def stop_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a reply: the model's `generation_config.eos_token_id` (a list for Llama 3, Qwen,
    Gemma...) and the tokenizer's EOS. Generation, rollouts, online rewards and eval all ask this one function."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def sampling_config(*, max_new_tokens: int, temperature: float, top_p: float, stop_ids: list[int], pad_id: int | None,
                    bos_id: int | None) -> Any:
    """The `model.generate` config that samples what `generate_samples` samples: exactly softmax(logits /
    temperature) (restricted by top_p when it is < 1), every other logits processor transformers knows pinned
    off, because `generate` otherwise fills unset fields from the checkpoint's generation_config and then from
    its own defaults (top_k=50 among them). Temperature 0 is greedy. For comparisons with transformers' own
    loop (bench/generation.py, tests); pass it inside `checkpoint_settings_ignored`."""
    from transformers import GenerationConfig

    neutral = {"num_beams": 1, "top_k": 0, "min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
               "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
               "no_repeat_ngram_size": 0, "bad_words_ids": None, "suppress_tokens": None,
               "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "sequence_bias": None, "min_length": 0, "min_new_tokens": None, "renormalize_logits": False,
               "exponential_decay_length_penalty": None, "guidance_scale": None, "watermarking_config": None,
               "remove_invalid_values": False, "num_return_sequences": 1}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    else:  # greedy: the sampling-only filters do not apply (transformers warns when they are set)
        sampling = {"do_sample": False}
        neutral = {k: v for k, v in neutral.items() if k not in ("top_k", "typical_p", "epsilon_cutoff", "eta_cutoff")}
    return GenerationConfig(**neutral, **sampling, max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None,
                            pad_token_id=pad_id, bos_token_id=bos_id)


@contextmanager
def checkpoint_settings_ignored(model: Any, tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    """While generating, the model's own generation_config (what the checkpoint ships: top_k, min_p,
    min_new_tokens, ...) is replaced by one holding only the special ids, so none of those settings merges into
    the sampling config a caller passes (ours, or TRL's GRPO/RLOO one). Yields the stop ids."""
    from transformers import GenerationConfig

    stop_ids = stop_token_ids(model, tokenizer)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    shipped = inner.generation_config
    inner.generation_config = GenerationConfig(eos_token_id=stop_ids or None, pad_token_id=tokenizer.pad_token_id,
                                               bos_token_id=tokenizer.bos_token_id)
    try:
        yield stop_ids
    finally:
        inner.generation_config = shipped


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[Message]],
             **settings: Any) -> list[str]:
    """The reply texts of `generate_samples` (same arguments)."""
    return [sample.text for sample in generate_samples(model, tokenizer, prompts, **settings)]


def generate_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[Message]],
    *,
    chat_template: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: str | None = None,
) -> list[Sample]:
    """Continue each prompt; temperature 0 is greedy, else sampling from exactly softmax(logits / temperature)
    (restricted by top_p when it is < 1; see `next_tokens`). A reply ends at any of the model's stop ids
    (`stop_token_ids`). Samples come back in the order of `prompts`, and the same prompts and seed give the same
    samples. `progress` names a progress bar over the batches (shown on the main process only).

    Prompts are generated longest first in batches of similar length (`length_batches`), so left padding wastes
    little. Sample i's random numbers are row i of one seeded [prompts, max_new_tokens] draw (`uniforms`), so
    they do not depend on the sorting or on `batch_size`; only float rounding does (a batch's shapes)."""
    import torch
    from tqdm.auto import tqdm

    from align.runtime import is_main_process

    # Chat templates write their own BOS; plain text relies on the tokenizer adding it.
    texts = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    encoded = tokenizer(texts, add_special_tokens=chat_template == "none")["input_ids"] if texts else []
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    draws = uniforms(len(prompts), max_new_tokens, seed)
    samples: list[Sample | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        batches = length_batches(encoded, batch_size)
        with torch.no_grad(), weights_cast_once(model):
            for rows in tqdm(batches, desc=progress, disable=progress is None or not is_main_process()):
                replies = decode(model, [encoded[i] for i in rows], draws[rows].to(device), stop_ids=stop_ids,
                                 pad_id=pad_id, temperature=temperature, top_p=top_p)
                for i, reply in zip(rows, replies, strict=True):
                    reply_ids, ended = until_stop(reply, stop_ids)
                    samples[i] = Sample(reply_text(tokenizer, encoded[i], reply_ids, chat_template), encoded[i],
                                        reply_ids, ended)
    finally:
        model.train(was_training)
    return [sample for sample in samples if sample is not None]


def length_batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices into `prompt_ids` in batches of at most `batch_size`, longest prompts first: rows of similar
    length share a batch, so left padding costs little; copies of one prompt sit side by side (so `prefill`
    computes it once); and the largest batch comes first (an out-of-memory error shows at once, not after
    minutes)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), prompt_ids[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def uniforms(rows: int, steps: int, seed: int) -> Any:
    """[rows, steps] float64 uniforms in [0, 1) from `seed`, drawn on a private generator (the global RNG is
    untouched): row i drives sample i's token choices, whichever batch it lands in."""
    import torch

    return torch.rand((rows, steps), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def decode(model: Any, prompt_ids: list[list[int]], draws: Any, *, stop_ids: list[int], pad_id: int,
           temperature: float, top_p: float) -> list[list[int]]:
    """One batch: the prompts through the model once (`prefill`), then one token per step for every row against
    the KV cache, until every row has hit a stop id or `draws.shape[1]` steps. Returns each row's generated ids
    (what follows a row's stop token is padding). The vocabulary projection runs at the last position only.

    Finished rows leave the batch once enough of them have (`worth_dropping`): replies end at different steps
    (a demo batch of 128 ran 32 steps for replies of ~22 tokens on average), and a row's numbers do not depend
    on the other rows of its batch, so dropping them changes no token and saves their share of later steps."""
    import torch

    device = draws.device
    rows, steps = len(prompt_ids), draws.shape[1]
    cache, step_inputs = forward_inputs(model)
    logits, mask, positions = prefill(model, prompt_ids, cache, step_inputs, pad_id=pad_id, device=device)
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    tokens = torch.full((rows, steps), pad_id, dtype=torch.long, device=device)  # [B, R]
    running = torch.arange(rows, device=device)  # [b]: which of the B rows each row of the batch is
    done = torch.zeros(rows, dtype=torch.bool, device=device)  # [b]
    for step in range(steps):
        chosen = next_tokens(logits.float(), temperature, top_p, draws[running, step])
        chosen = chosen.masked_fill(done, pad_id)  # [b]: a finished row still in the batch only pads
        tokens[running, step] = chosen
        done |= torch.isin(chosen, stop)
        if bool(done.all()):
            return tokens[:, :step + 1].tolist()
        if step + 1 == steps:
            break
        if worth_dropping(int(done.sum()), len(running)):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            running, chosen, mask, positions, done = (running[keep], chosen[keep], mask[keep], positions[keep],
                                                      done[keep])
        mask = torch.cat([mask, mask.new_ones((len(running), 1))], dim=1)
        positions = positions + 1
        logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                       **step_inputs).logits[:, -1]
    return tokens.tolist()


def worth_dropping(finished: int, batch: int) -> bool:
    """Whether `finished` of the `batch` rows decoding are enough to drop from it: at least an eighth. Dropping
    copies the KV cache once, about what one step's cache update copies anyway."""
    return finished > 0 and finished * 8 >= batch


def prefill(model: Any, prompt_ids: list[list[int]], cache: Any, step_inputs: dict[str, Any], *, pad_id: int,
            device: Any) -> tuple[Any, Any, Any]:
    """Fill `cache` with the prompts; returns the logits at each row's last prompt token [B, V], the attention
    mask of the cache's columns [B, W] and each row's last position id [B, 1].

    No prompt token is computed twice: each distinct prompt runs once (pairs and eval sample a prompt several
    times), and so does the prefix all of them share (a chat template's system prompt): it runs as a batch of
    one, its cache is copied to every distinct prompt, and their remainders follow it, left-padded among
    themselves, so the padding sits between prefix and remainder, masked out; position ids count real tokens
    only, so every token has the position it has in its unpadded prompt. The cache is then copied to the rows
    that repeat a prompt."""
    import torch

    distinct: dict[tuple[int, ...], int] = {}
    inverse = [distinct.setdefault(tuple(ids), len(distinct)) for ids in prompt_ids]
    unique = [list(ids) for ids in distinct]
    shared = max(0, min(common_prefix_length(unique), min(len(ids) for ids in unique) - 1))  # >= 1 token left
    if shared:
        prefix = torch.tensor([unique[0][:shared]], dtype=torch.long, device=device)  # [1, S]
        positions = torch.arange(shared, device=device)[None]  # [1, S]
        model(input_ids=prefix, attention_mask=torch.ones_like(prefix), position_ids=positions, **step_inputs)
        cache.batch_select_indices(torch.zeros(len(unique), dtype=torch.long, device=device))
    rest = [ids[shared:] for ids in unique]
    width = max(len(ids) for ids in rest)
    input_ids = torch.full((len(rest), width), pad_id, dtype=torch.long, device=device)  # [U, P - S]
    mask = torch.zeros((len(rest), shared + width), dtype=torch.long, device=device)  # [U, P]
    mask[:, :shared] = 1
    for row, ids in enumerate(rest):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, shared + width - len(ids):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, shared:]  # [U, P - S]
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **step_inputs).logits[:, -1]
    if len(unique) == len(prompt_ids):
        return logits, mask, positions[:, -1:]
    rows = torch.tensor(inverse, dtype=torch.long, device=device)
    cache.batch_select_indices(rows)
    return logits[rows], mask[rows], positions[rows, -1:]


def common_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all `sequences` share: those the lexicographically first and last share."""
    first, last = min(sequences), max(sequences)
    length = min(len(first), len(last))
    return next((i for i in range(length) if first[i] != last[i]), length)


def forward_inputs(model: Any) -> tuple[Any, dict[str, Any]]:
    """A fresh KV cache, and the keyword arguments every decoding forward pass shares: that cache (under the name
    this transformers version uses: `cache`, formerly `past_key_values`) and, where the model takes it,
    `logits_to_keep=1` so the vocabulary projection skips all positions but the last."""
    import inspect

    from transformers import DynamicCache

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(inner.forward).parameters
    cache = DynamicCache(config=inner.config)
    inputs: dict[str, Any] = {"cache" if "cache" in accepted else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in accepted:
        inputs["logits_to_keep"] = 1
    return cache, inputs


def next_tokens(logits: Any, temperature: float, top_p: float, draws: Any) -> Any:
    """The next token of each row from fp32 logits [B, V]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature), restricted to the nucleus when top_p < 1, by inverting its cumulative
    distribution at the row's uniform in `draws` [B] (float64, so tokens far below 1e-7 keep their share).
    This is exact and cheaper than `torch.multinomial`, which draws an exponential per vocabulary entry."""
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits / temperature
    if top_p < 1.0:
        scores = nucleus(scores, top_p)
    cdf = torch.softmax(scores, dim=-1).double().cumsum(dim=-1)  # [B, V]
    total = cdf[:, -1:]
    # Strictly below the total, so the token found has a probability above zero.
    target = torch.minimum(draws[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def nucleus(scores: Any, top_p: float) -> Any:
    """Scores [B, V] outside the top_p nucleus set to -inf, as transformers' TopPLogitsWarper does: the
    fewest most likely tokens whose probability reaches top_p (at least one)."""
    import torch

    ascending, order = torch.sort(scores, dim=-1)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p
    drop[:, -1] = False
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


@contextmanager
def weights_cast_once(model: Any) -> Iterator[None]:
    """Under autocast, cast the frozen fp32 weights to the autocast dtype once for the whole block instead of
    at every forward pass: on the demo model under bf16 that was a quarter of sampling's time at batch 16 and
    5-10% at batch 64, for one bf16 copy of the weights held while the block lasts. Autocast caches the casts
    of leaf tensors that require grad only, so frozen weights are marked so for the block (to be used under
    `torch.no_grad`: no graph is recorded) and then restored; the cache is cleared on leaving. The numbers are
    exactly those of plain autocast. Outside autocast (or with its cache off) it does nothing."""
    import torch

    device_type = next(model.parameters()).device.type
    if not (torch.is_autocast_enabled(device_type) and torch.is_autocast_cache_enabled()):
        yield
        return
    frozen = [p for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
    try:
        for parameter in frozen:
            parameter.requires_grad_(True)
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)
        torch.clear_autocast_cache()


def until_stop(reply: list[int], stop_ids: Collection[int]) -> tuple[list[int], bool]:
    """The reply up to and including its first stop token, and whether it had one; what follows is padding."""
    for index, token in enumerate(reply):
        if token in stop_ids:
            return reply[: index + 1], True
    return reply, False


def reply_text(tokenizer: Any, prompt_ids: list[int], reply_ids: list[int], chat_template: str) -> str:
    """Decoding the reply alone drops the space that begins it ("They" + "liked"): decode prompt and prompt +
    reply together and keep the difference. Chat replies are whole messages and are stripped."""
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + reply_ids, skip_special_tokens=True)
    text = full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(reply_ids, skip_special_tokens=True)
    return text.strip() if chat_template != "none" else text.rstrip()
