"""HH-RLHF transcripts ("\n\nHuman: ...\n\nAssistant: ...") as lm-eval multiple-choice documents."""

from __future__ import annotations

from typing import Any

ASSISTANT = "\n\nAssistant:"
# A choice must fit the model's context by itself (lm-eval cuts contexts from the left, never a choice). A byte-level
# tokenizer (BPE, or sentencepiece with byte fallback) makes at most one token per UTF-8 byte, so a reply of at most
# 500 bytes, after lm-eval's " " delimiter, fits a 512-token context (stories260K's) with any such tokenizer.
MAX_REPLY_BYTES = 500


def split_last_reply(transcript: str) -> tuple[str, str]:
    """(the conversation up to and including the last "Assistant:", the reply after it)."""
    cut = transcript.rindex(ASSISTANT) + len(ASSISTANT)
    return transcript[:cut], transcript[cut:]


def to_choice(row: dict[str, Any]) -> dict[str, Any]:
    context, chosen = split_last_reply(row["chosen"])
    rejected_context, rejected = split_last_reply(row["rejected"])
    chosen, rejected = chosen.strip(), rejected.strip()
    # Left out (keep=False): pairs whose conversations differ before the last reply (no shared context), equal or
    # empty replies (acc_norm divides by a choice's length), and replies too long to score as one choice.
    keep = (context == rejected_context and chosen != rejected and bool(chosen) and bool(rejected)
            and max(len(chosen.encode()), len(rejected.encode())) <= MAX_REPLY_BYTES)
    return {"context": context.strip(), "choices": [chosen, rejected], "keep": keep}


def process_docs(dataset: Any) -> Any:
    return dataset.map(to_choice, remove_columns=dataset.column_names).filter(lambda doc: doc["keep"])
