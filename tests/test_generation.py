"""align's decoding loop (`align.generation`): samples come back in input order with their exact prompt tokens,
are fixed by the prompts and the seed whatever the batching, match transformers' `generate` where both are
deterministic, and sample exactly from softmax(logits / T). On the real stories260K model, a few seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# Lengths differ (so length sorting reorders them) and one prompt repeats (its samples must still differ).
TEXTS = ["Once upon a time", "Tom had a red ball and a big", "The", "Lily went to the park with her mom. She saw a",
         "Once upon a time"]
PROMPTS = [[{"role": "user", "content": text}] for text in TEXTS]


@pytest.fixture(scope="module")
def stories(stories_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    tokenizer.pad_token = tokenizer.unk_token
    return model, tokenizer


def test_length_batches_put_the_longest_first_and_copies_together() -> None:
    from align.generation import common_prefix_length, length_batches

    prompts = [[1, 5, 6], [1, 2, 3, 4], [1, 9, 9], [1, 2, 3, 4], [1, 5, 6]]
    assert length_batches(prompts, 2) == [[1, 3], [0, 4], [2]]
    assert length_batches([], 4) == []
    assert common_prefix_length(prompts) == 1
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3], [1, 2, 3, 4]]) == 3
    assert common_prefix_length([[7], [1]]) == 0


def test_samples_come_back_in_input_order_with_their_exact_prompt(stories: tuple[Any, Any]) -> None:
    """Sorted into length batches of 2, the samples still line up with the prompts: each holds exactly its
    prompt's unpadded tokens (BOS included for plain text) and a reply that stops at its first stop token."""
    from align.generation import generate_samples, render_prompt, stop_token_ids

    model, tokenizer = stories
    samples = generate_samples(model, tokenizer, PROMPTS * 4, chat_template="none", max_new_tokens=24,
                               temperature=1.0, seed=0, batch_size=2)
    stops = set(stop_token_ids(model, tokenizer))
    assert len(samples) == len(PROMPTS) * 4
    for prompt, sample in zip(PROMPTS * 4, samples, strict=True):
        assert sample.prompt_ids == tokenizer(render_prompt(tokenizer, prompt, "none"))["input_ids"]
        assert sample.prompt_ids[0] == tokenizer.bos_token_id
        inside = [token for token in sample.reply_ids[:-1] if token in stops]
        assert not inside and sample.ended == (sample.reply_ids[-1] in stops)
        assert sample.ended or len(sample.reply_ids) == 24
        assert tokenizer.pad_token_id not in sample.reply_ids
    assert samples[0].reply_ids != samples[4].reply_ids  # the same prompt twice: two draws


def test_samples_depend_on_the_seed_not_on_the_batching(stories: tuple[Any, Any]) -> None:
    """A sample's random numbers are its own row of one seeded draw: the same seed gives the same samples, and
    another batch size (so other batches, sorted and shared differently) gives the same replies but where float
    rounding, which depends on a batch's shapes, tips a draw; another seed changes the samples."""
    from align.generation import generate_samples

    model, tokenizer = stories

    def sample(batch_size: int, seed: int) -> list[list[int]]:
        return [s.reply_ids for s in generate_samples(model, tokenizer, PROMPTS * 4, chat_template="none",
                                                      max_new_tokens=16, temperature=1.0, seed=seed,
                                                      batch_size=batch_size)]

    first = sample(3, seed=7)
    assert sample(3, seed=7) == first
    rebatched = sample(64, seed=7)
    assert sum(a == b for a, b in zip(first, rebatched, strict=True)) >= len(first) - 2
    other = sample(3, seed=8)
    assert sum(a == b for a, b in zip(first, other, strict=True)) <= 2


@pytest.mark.parametrize("chat_template", ["none", "default"])
def test_greedy_replies_match_transformers_generate(stories: tuple[Any, Any], chat_template: str) -> None:
    """Where both are deterministic, align's loop (a batch with a repeated prompt and, under the chat template,
    a long prefix shared by all, each computed once) and `model.generate` (one unpadded prompt at a time, with
    the equivalent `sampling_config`) write the same tokens."""
    import torch

    from align.generation import (
        checkpoint_settings_ignored,
        generate_samples,
        render_prompt,
        sampling_config,
        stop_token_ids,
    )
    from align.models import DEFAULT_CHAT_TEMPLATE

    model, tokenizer = stories
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    samples = generate_samples(model, tokenizer, PROMPTS, chat_template=chat_template, max_new_tokens=20,
                               batch_size=4)
    config = sampling_config(max_new_tokens=20, temperature=0.0, top_p=1.0, stop_ids=stop_token_ids(model, tokenizer),
                             pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id)
    for prompt, sample in zip(PROMPTS, samples, strict=True):
        ids = tokenizer(render_prompt(tokenizer, prompt, chat_template), return_tensors="pt",
                        add_special_tokens=chat_template == "none")
        assert sample.prompt_ids == ids["input_ids"][0].tolist()
        with torch.no_grad(), checkpoint_settings_ignored(model, tokenizer):
            expected = model.generate(**ids, generation_config=config)[0, ids["input_ids"].shape[1]:].tolist()
        assert sample.reply_ids == expected[: len(sample.reply_ids)]
        assert len(sample.reply_ids) == len(expected) or expected[len(sample.reply_ids)] == tokenizer.pad_token_id


def test_next_tokens_invert_the_exact_distribution() -> None:
    """Uniforms spread evenly over [0, 1) pick each token in proportion to softmax(logits / T) (within one
    draw), never a token of probability 0 even at the top of [0, 1), and under top_p only the nucleus,
    renormalised, as transformers' TopPLogitsWarper defines it."""
    import torch

    from align.generation import next_tokens

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 10_000
    logits = probs.log().expand(n, -1) * 2.0  # [n, 5]: at T = 2 the distribution is `probs` again
    draws = (torch.arange(n, dtype=torch.float64) + 0.5) / n

    def counts(top_p: float) -> list[int]:
        return torch.bincount(next_tokens(logits, 2.0, top_p, draws), minlength=5).tolist()

    assert counts(1.0) == pytest.approx([5000, 3000, 1500, 500, 0], abs=1)
    assert counts(0.75) == pytest.approx([n * 5 / 8, n * 3 / 8, 0, 0, 0], abs=1)  # 0.5 + 0.3 reach 0.75
    top = torch.nextafter(torch.tensor([1.0, 1.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    assert next_tokens(logits[:2], 2.0, 1.0, top).tolist() == [3, 3]
    assert next_tokens(logits[:2], 0.0, 1.0, top).tolist() == [0, 0]  # temperature 0: the argmax


def test_weights_cast_once_computes_exactly_what_autocast_does(stories: tuple[Any, Any]) -> None:
    """Caching the bf16 casts of frozen weights changes no number, and every parameter's requires_grad (the
    adapter's trainable, the base's frozen) is as before afterwards."""
    import torch
    from peft import LoraConfig, get_peft_model

    from align.generation import weights_cast_once

    base, tokenizer = stories
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()
    try:
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        ids = tokenizer(TEXTS[3], return_tensors="pt")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(**ids).logits
            with weights_cast_once(model):
                once = [model(**ids).logits for _ in range(2)]
        assert all(torch.equal(plain, logits) for logits in once)
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert any(flags.values()) and not all(flags.values())
    finally:
        model.unload()  # the module's base model goes back as it was


def test_finished_rows_leave_the_batch_and_no_token_changes(stories: tuple[Any, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows that hit a stop token are dropped from the batch (later steps run on fewer rows) and every sample
    is token for token what the loop that keeps them, padding, gives."""
    from align import generation

    model, tokenizer = stories
    # A full stop ends a reply too, so replies end at different steps.
    full_stop = tokenizer(".", add_special_tokens=False)["input_ids"][-1]
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, full_stop])
    widths: list[int] = []
    def record_step(_: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if kwargs["input_ids"].shape[1] == 1 < kwargs["attention_mask"].shape[1]:  # a step after the prompts
            widths.append(kwargs["input_ids"].shape[0])

    hook = model.register_forward_pre_hook(record_step, with_kwargs=True)

    def sample() -> list[tuple[list[int], bool]]:
        widths.clear()
        found = generation.generate_samples(model, tokenizer, PROMPTS * 6, chat_template="none", max_new_tokens=64,
                                            temperature=1.0, seed=3, batch_size=32)
        return [(s.reply_ids, s.ended) for s in found]

    try:
        dropping = sample()
        steps_dropping = list(widths)
        monkeypatch.setattr(generation, "worth_dropping", lambda finished, batch: False)
        keeping = sample()
        steps_keeping = list(widths)
    finally:
        hook.remove()
    lengths = sorted(len(reply) for reply, _ in dropping)
    assert lengths[0] < lengths[-1] and sum(ended for _, ended in dropping) >= 3  # rows end at different steps
    assert dropping == keeping
    assert min(steps_dropping) < 30 and set(steps_keeping) == {30}  # 30 prompts in one batch
    assert sum(steps_dropping) < sum(steps_keeping)
