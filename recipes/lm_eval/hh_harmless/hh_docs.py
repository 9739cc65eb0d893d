"""HH-RLHF transcripts ("\n\nHuman: ...\n\nAssistant: ...") as lm-eval multiple-choice documents."""

from __future__ import annotations

from typing import Any

ASSISTANT = "\n\nAssistant:"
MAX_REPLY_CHARS = 600  # ~150 tokens: a choice must fit a small model's context by itself (lm-eval truncates contexts)


def split_last_reply(transcript: str) -> tuple[str, str]:
    """(the conversation up to and including the last "Assistant:", the reply after it)."""
    cut = transcript.rindex(ASSISTANT) + len(ASSISTANT)
    return transcript[:cut], transcript[cut:]


def to_choice(row: dict[str, Any]) -> dict[str, Any]:
    context, chosen = split_last_reply(row["chosen"])
    rejected_context, rejected = split_last_reply(row["rejected"])
    chosen, rejected = chosen.strip(), rejected.strip()
    # Left out (keep=False): pairs whose conversations differ before the last reply (no shared context), equal
    # replies, and replies too long to score as one choice.
    keep = (context == rejected_context and chosen != rejected
            and max(len(chosen), len(rejected)) <= MAX_REPLY_CHARS)
    return {"context": context.strip(), "choices": [chosen, rejected], "keep": keep}


def process_docs(dataset: Any) -> Any:
    return dataset.map(to_choice, remove_columns=dataset.column_names).filter(lambda doc: doc["keep"])
