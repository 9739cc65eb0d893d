"""Batched generation from chat or plain-text prompts, shared by SFT samples and later by eval, pairs and PPO."""

from __future__ import annotations

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


def generate(
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
) -> list[str]:
    """Continue each prompt; temperature 0 is greedy. Left padding so every row's reply starts at the same column."""
    import torch

    texts = [render_prompt(tokenizer, p, chat_template) for p in prompts]
    # Chat templates write their own BOS; plain text relies on the tokenizer adding it.
    add_special = chat_template == "none"
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    outputs: list[str] = []
    try:
        device = next(model.parameters()).device
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=add_special).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
                "do_sample": False}
            with torch.no_grad():
                tokens = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                        **sampling)
            replies = tokens[:, batch["input_ids"].shape[1]:]  # [B, new_tokens]
            outputs.extend(tokenizer.batch_decode(replies, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = padding_side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    return [text.strip() for text in outputs]
