"""Batched generation from chat or plain-text prompts, shared by SFT samples and later by eval, pairs and PPO."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]


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
    """One generated reply: its text, and the exact token ids of its prompt and of the reply (up to EOS)."""

    text: str
    prompt_ids: list[int]
    reply_ids: list[int]


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
    """Continue each prompt; temperature 0 is greedy. Left padding so every row's reply starts at the same column.
    `progress` names a progress bar over the batches (shown on the main process only)."""
    import torch
    from tqdm.auto import tqdm

    from align.runtime import is_main_process

    texts = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    # Chat templates write their own BOS; plain text relies on the tokenizer adding it.
    add_special = chat_template == "none"
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
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
                "do_sample": False}
            with torch.no_grad():
                tokens = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                        **sampling)
            width = batch["input_ids"].shape[1]
            for row, mask in zip(tokens.tolist(), batch["attention_mask"].tolist(), strict=True):
                prompt_ids = [t for t, keep in zip(row[:width], mask, strict=True) if keep]
                reply_ids = _until_eos(row[width:], tokenizer.eos_token_id)
                samples.append(Sample(_reply_text(tokenizer, prompt_ids, reply_ids, chat_template),
                                      prompt_ids, reply_ids))
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return samples


def _until_eos(reply: list[int], eos_id: int | None) -> list[int]:
    """The reply up to and including its first EOS; what follows is padding."""
    if eos_id is not None and eos_id in reply:
        return reply[: reply.index(eos_id) + 1]
    return reply


def _reply_text(tokenizer: Any, prompt_ids: list[int], reply_ids: list[int], chat_template: str) -> str:
    """Decoding the reply alone drops the space that begins it ("They" + "liked"): decode prompt and prompt +
    reply together and keep the difference. Chat replies are whole messages and are stripped."""
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + reply_ids, skip_special_tokens=True)
    text = full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(reply_ids, skip_special_tokens=True)
    return text.strip() if chat_template != "none" else text.rstrip()
