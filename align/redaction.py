"""Secrets never land in what align records: values under secret-looking names are written as "***".

One rule, `is_secret_name`, applied wherever align records configuration it did not compute itself: the recipe
in the manifest and `recipe.yaml`, `--set` overrides (recorded and echoed in errors), tracker configs. A name is
secret when one of its words is secret, password, passwd, passphrase, credential(s), auth or authorization,
when it ends in `token` or `key` (HF_TOKEN, hub_token, WANDB_API_KEY), or holds api/access/private/secret key;
words are split at `_`, `-`, `.`, spaces and camelCase. A tokenizer's special tokens (`pad_token`, ...) are
vocabulary, not secrets, and `max_new_tokens`, `token_type_ids` or `tokenizer` are other words.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

_SPECIAL_TOKENS = ("bos", "eos", "pad", "unk", "sep", "cls", "mask")
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:secrets?|password|passwd|passphrase|credentials?|auth|authorization)(?:_|$)"
    r"|(?:^|_)" + "".join(f"(?<!{word}_)" for word in _SPECIAL_TOKENS) + r"(?:token|key)$"
    r"|(?:api|access|private|secret)_?key"
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SEPARATORS = re.compile(r"[^A-Za-z0-9]+")


def is_secret_name(name: str) -> bool:
    """True for a key or variable name that holds a credential (HF_TOKEN, hub_token, WANDB_API_KEY, apiKey,
    password), False for ordinary ones (max_new_tokens, pad_token_id, tokenizer, sort_keys)."""
    words = _SEPARATORS.sub("_", _CAMEL.sub("_", str(name))).strip("_").lower()
    return bool(_SECRET_NAME.search(words))


def redact(value: Any) -> Any:
    """A copy of `value` (nested dicts and lists) where the value of every secret-named key is REDACTED."""
    if isinstance(value, dict):
        return {key: REDACTED if is_secret_name(str(key)) and item is not None else redact(item)
                for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def is_secret_path(key_path: str) -> bool:
    """True when any part of a dotted key path (`tracker.hf_token`) is secret-named."""
    return any(is_secret_name(part) for part in key_path.strip().split("."))


def redact_override(override: str) -> str:
    """A `--set KEY.PATH=VALUE` as it may be recorded or shown: the value hidden under a secret-named key path."""
    key, sep, _ = override.partition("=")
    return f"{key}={REDACTED}" if sep and is_secret_path(key) else override
