"""Batched generation from chat or plain-text prompts, shared by SFT samples and later by eval, pairs and PPO."""

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
    """A complete generation config, so that what is sampled is exactly softmax(logits / temperature) (restricted
    by top_p when it is < 1): every other logits processor transformers knows is pinned off here, because
    `generate` otherwise fills unset fields from the checkpoint's generation_config and then from its own
    defaults (top_k=50 among them). Log-probs computed later (PPO ratios and KL, eval's KL) then describe the
    policy that sampled. Temperature 0 is greedy."""
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
    batch_size: int = 16,
    progress: str | None = None,
) -> list[Sample]:
    """Continue each prompt; temperature 0 is greedy, else plain sampling from softmax(logits / temperature)
    (see `sampling_config`). A reply ends at any of the model's stop ids (`stop_token_ids`). Left padding so
    every row's reply starts at the same column. `progress` names a progress bar over the batches (shown on the
    main process only)."""
    import torch
    from tqdm.auto import tqdm

    from align.runtime import is_main_process

    texts = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    # Chat templates write their own BOS; plain text relies on the tokenizer adding it.
    add_special = chat_template == "none"
    stop_ids = stop_token_ids(model, tokenizer)
    config = sampling_config(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             stop_ids=stop_ids, pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    samples: list[Sample] = []
    try:
        device = next(model.parameters()).device
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc=progress, disable=progress is None or not is_main_process()):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=add_special).to(device)
            with torch.no_grad(), checkpoint_settings_ignored(model, tokenizer):
                tokens = model.generate(**batch, generation_config=config)
            width = batch["input_ids"].shape[1]
            for row, mask in zip(tokens.tolist(), batch["attention_mask"].tolist(), strict=True):
                prompt_ids = [t for t, keep in zip(row[:width], mask, strict=True) if keep]
                reply_ids, ended = until_stop(row[width:], stop_ids)
                samples.append(Sample(reply_text(tokenizer, prompt_ids, reply_ids, chat_template),
                                      prompt_ids, reply_ids, ended))
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return samples


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
