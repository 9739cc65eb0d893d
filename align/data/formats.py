"""Row converters: each on-disk dataset layout becomes the canonical conversational rows TRL expects.

SFT rows are `{"prompt": [...], "completion": [final assistant message]}` so the loss falls on the
completion only; preference rows are `{"prompt": [...], "chosen": [...], "rejected": [...]}`.
A converter raises `RowError` with a human reason; the card loader attaches the file location.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from align.errors import DataError

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
# Aliases seen in ShareGPT/LLaMA-Factory style data; normalised so templates only meet the three roles.
_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class RowError(ValueError):
    """A row that cannot be converted; `str()` is the human reason, without the location."""


@dataclass(frozen=True)
class Format:
    """One dataset layout: its canonical field names, their default columns, and the converter."""

    name: str
    kind: Literal["sft", "preference", "prompts"]
    fields: dict[str, str]  # canonical field name -> default column (or key) name in the file
    required: tuple[str, ...]
    convert: Callable[[Mapping[str, Any], Mapping[str, str]], dict]
    description: str


# ---------------------------------------------------------------- field and message reading


def _get(row: Mapping[str, Any], fields: Mapping[str, str], name: str, *, required: bool = True) -> Any:
    """The value of canonical field `name`; null counts as absent (CSV short rows, JSON nulls)."""
    column = fields[name]
    value = row.get(column)
    if value is None and required:
        mapped = f" (mapped from '{name}')" if column != name else ""
        raise RowError(f"missing field '{column}'{mapped}")
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(value: Any, where: str) -> str:
    """Message content as a string; lists of text parts (`{"type": "text", "value"|"text": ...}`) are joined."""
    if isinstance(value, str):
        return value
    parts = [value] if isinstance(value, Mapping) else value
    if isinstance(parts, list):
        texts = []
        for index, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(part)
                continue
            if not isinstance(part, Mapping):
                raise RowError(f"{where}[{index}] must be a text part object, got {_type_name(part)}")
            if part.get("type", "text") != "text":
                raise RowError(f"{where}[{index}] has type '{part.get('type')}'; only text parts are supported")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise RowError(f"{where}[{index}] has no string 'text' or 'value'")
            texts.append(text)
        return "".join(texts)
    raise RowError(f"{where} must be a string or a list of text parts, got {_type_name(value)}")


def _role(value: Any, where: str) -> str:
    role = _ROLE_ALIASES.get(value.lower()) if isinstance(value, str) else None
    if role is None:
        raise RowError(f"{where} {value!r} is not one of {'/'.join(ROLES)}")
    return role


def _messages(value: Any, where: str, role_key: str = "role", content_key: str = "content") -> list[Message]:
    """A list of `{role_key, content_key}` objects as canonical messages; extra keys are ignored."""
    if not isinstance(value, list):
        raise RowError(f"'{where}' must be a list of messages, got {_type_name(value)}")
    out = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(item, Mapping):
            raise RowError(f"{at} must be an object with '{role_key}' and '{content_key}', got {_type_name(item)}")
        for key in (role_key, content_key):
            if key not in item:
                raise RowError(f"{at} has no '{key}'")
        out.append(
            {
                "role": _role(item[role_key], f"{at}.{role_key}"),
                "content": _text(item[content_key], f"{at}.{content_key}"),
            }
        )
    return out


def _as_messages(value: Any, where: str, default_role: str) -> list[Message]:
    """A plain string becomes one message of `default_role`; a list is read as messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    return _messages(value, where)


def _with_system(messages: list[Message], system: Any, where: str) -> list[Message]:
    """Put the optional `system` column first; refuse a row that also carries its own system message."""
    if system is None or (isinstance(system, str) and not system.strip()):
        return messages
    if not isinstance(system, str):
        raise RowError(f"'{where}' must be a string, got {_type_name(system)}")
    if messages and messages[0]["role"] == "system":
        raise RowError(f"row has both a '{where}' field and a system message")
    return [{"role": "system", "content": system}, *messages]


def _split_sft(messages: list[Message]) -> dict:
    """Canonical SFT row: the final assistant turn is the completion, everything before it the prompt."""
    if not messages or messages[-1]["role"] != "assistant":
        last = messages[-1]["role"] if messages else "nothing"
        raise RowError(f"no assistant turn to learn from (the conversation ends with {last})")
    if not messages[-1]["content"].strip():
        raise RowError("the final assistant message is empty")
    prompt = messages[:-1]
    users = [m for m in prompt if m["role"] == "user"]
    if not users:
        raise RowError("no user turn before the assistant's answer")
    if not users[-1]["content"].strip():
        raise RowError("the user prompt is empty")
    return {"prompt": prompt, "completion": [messages[-1]]}


# ---------------------------------------------------------------- SFT converters


def _convert_messages(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    messages = _messages(_get(row, fields, "messages"), fields["messages"])
    return _split_sft(_with_system(messages, _get(row, fields, "system", required=False), fields["system"]))


def _convert_sharegpt(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    column = fields["conversations"]
    messages = _messages(_get(row, fields, "conversations"), column, fields["role_key"], fields["content_key"])
    return _split_sft(_with_system(messages, _get(row, fields, "system", required=False), fields["system"]))


def _string(row: Mapping[str, Any], fields: Mapping[str, str], name: str, *, required: bool = True) -> str:
    value = _get(row, fields, name, required=required)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{fields[name]}' must be a string, got {_type_name(value)}")
    return value


def _convert_alpaca(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    instruction = _string(row, fields, "instruction")
    extra = _string(row, fields, "input", required=False)
    output = _string(row, fields, "output")
    # Alpaca convention: the optional input follows the instruction after a blank line.
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages: list[Message] = []
    history = _get(row, fields, "history", required=False) or []
    if not isinstance(history, list):
        raise RowError(
            f"field '{fields['history']}' must be a list of [user, assistant] pairs, got {_type_name(history)}"
        )
    for index, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RowError(f"{fields['history']}[{index}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _split_sft(_with_system(messages, _get(row, fields, "system", required=False), fields["system"]))


def _convert_prompt_completion(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    prompt = _as_messages(_get(row, fields, "prompt"), fields["prompt"], "user")
    completion = _as_messages(_get(row, fields, "completion"), fields["completion"], "assistant")
    if not completion:
        raise RowError(f"field '{fields['completion']}' is an empty list")
    # A multi-message completion folds its leading turns into the prompt: loss stays on the final answer.
    return _split_sft(_with_system(prompt + completion, _get(row, fields, "system", required=False), fields["system"]))


def _convert_prompts(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    prompt = _with_system(_as_messages(_get(row, fields, "prompt"), fields["prompt"], "user"),
                          _get(row, fields, "system", required=False), fields["system"])
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError(f"field '{fields['prompt']}' must end with a user turn")
    if not prompt[-1]["content"].strip():
        raise RowError("the user prompt is empty")
    return {"prompt": prompt}


# ---------------------------------------------------------------- preference converters


class DroppedRow(Exception):
    """A well-formed row that carries no preference (a tie); `str()` is the reason. Never fails a strict load."""


def _split_preference(chosen: list[Message], rejected: list[Message], system: Any, system_field: str) -> dict:
    """Canonical preference row from two full conversations: shared turns are the prompt, the last turn differs."""
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation or conversation[-1]["role"] != "assistant":
            last = conversation[-1]["role"] if conversation else "nothing"
            raise RowError(f"the {name} conversation must end with an assistant reply, not {last}")
        if not conversation[-1]["content"].strip():
            raise RowError(f"the {name} reply is empty")
    prompt, other = chosen[:-1], rejected[:-1]
    if prompt != other:
        same = 0
        while same < min(len(prompt), len(other)) and prompt[same] == other[same]:
            same += 1
        raise RowError(f"chosen and rejected do not share the same prompt turns (they differ from turn {same + 1})")
    prompt = _with_system(prompt, system, system_field)
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError(f"the prompt must end with a user turn, not {prompt[-1]['role'] if prompt else 'nothing'}")
    if not prompt[-1]["content"].strip():
        raise RowError("the user prompt is empty")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise RowError("chosen and rejected are identical")
    return {"prompt": prompt, "chosen": [chosen[-1]], "rejected": [rejected[-1]]}


_FLAG_TEXT = {"true": True, "1": True, "false": False, "0": False, "": False}


def _flag(row: Mapping[str, Any], fields: Mapping[str, str], name: str) -> bool | None:
    """An optional boolean field; CSV cells arrive as text, so 'true'/'false'/'1'/'0' are read too."""
    value = _get(row, fields, name, required=False)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _FLAG_TEXT:
        return _FLAG_TEXT[value.strip().lower()]
    raise RowError(f"field '{fields[name]}' must be true or false, got {value!r}")


def _open_flags(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, bool]:
    """`chosen_open`/`rejected_open`: the reply was cut off (no stop token), so DPO must not close it with an EOS
    or end of turn. Rows without either field stay exactly as before (their canonical form, and so the eval
    split's hash, does not change)."""
    flags = {f"{side}_open": _flag(row, fields, f"{side}_open") for side in ("chosen", "rejected")}
    if all(value is None for value in flags.values()):
        return {}
    return {key: bool(value) for key, value in flags.items()}


def _convert_chosen_rejected(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    chosen = _as_messages(_get(row, fields, "chosen"), fields["chosen"], "assistant")
    rejected = _as_messages(_get(row, fields, "rejected"), fields["rejected"], "assistant")
    # Explicit prompt, or implicit (TRL convention): full conversations that share everything but the answer.
    raw_prompt = _get(row, fields, "prompt", required=False)
    prompt = [] if raw_prompt is None else _as_messages(raw_prompt, fields["prompt"], "user")
    system = _get(row, fields, "system", required=False)
    flags = _open_flags(row, fields)
    return {**_split_preference(prompt + chosen, prompt + rejected, system, fields["system"]), **flags}


_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def _hh_turns(text: Any, column: str) -> list[Message]:
    """An Anthropic HH-RLHF transcript (`\\n\\nHuman: ...\\n\\nAssistant: ...`) as messages, content stripped."""
    if not isinstance(text, str):
        raise RowError(f"field '{column}' must be a transcript string, got {_type_name(text)}")
    parts = _HH_MARKER.split(text)
    if parts[0].strip():
        raise RowError(f"'{column}' has text before the first 'Human:'/'Assistant:' marker: {parts[0].strip()[:40]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def _convert_hh_rlhf(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    chosen = _hh_turns(_get(row, fields, "chosen"), fields["chosen"])
    rejected = _hh_turns(_get(row, fields, "rejected"), fields["rejected"])
    return _split_preference(chosen, rejected, None, "system")


def _convert_sharegpt_preference(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    keys = fields["role_key"], fields["content_key"]
    conversation = _messages(_get(row, fields, "conversations"), fields["conversations"], *keys)
    replies = []
    for name in ("chosen", "rejected"):
        value = _get(row, fields, name)
        replies.append(_messages([value] if isinstance(value, Mapping) else value, fields[name], *keys))
    system = _get(row, fields, "system", required=False)
    return _split_preference(conversation + replies[0], conversation + replies[1], system, fields["system"])


_TIES = ("", "tie", "equal")


def _preferred(label: Any, row: Mapping[str, Any], fields: Mapping[str, str]) -> int:
    """0 when the label prefers answer_a, 1 for answer_b; a tie raises DroppedRow."""
    if label is None or (isinstance(label, str) and label.strip().lower() in _TIES):
        raise DroppedRow(f"tie (label {label!r})")
    if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
        return label
    if isinstance(label, str):
        text = label.strip()
        for index, name in enumerate(("answer_a", "answer_b")):
            if text in (fields[name], name) or text.lower() == "ab"[index] or text == str(index):
                return index
        if text not in row:
            raise RowError(f"label {text!r} names no field of this row (fields: {', '.join(map(str, row))})")
        raise RowError(f"label {text!r} names neither answer field ('{fields['answer_a']}' or '{fields['answer_b']}')")
    raise RowError(f"label must be a field name, 'a'/'b', 0/1 or a tie marker, got {label!r}")


def _convert_pairwise_label(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    prompt = _as_messages(_get(row, fields, "prompt"), fields["prompt"], "user")
    answers = [_as_messages(_get(row, fields, name), fields[name], "assistant") for name in ("answer_a", "answer_b")]
    if fields["label"] not in row:
        raise RowError(f"missing field '{fields['label']}'")
    best = _preferred(row[fields["label"]], row, fields)
    system = _get(row, fields, "system", required=False)
    return _split_preference(prompt + answers[best], prompt + answers[1 - best], system, fields["system"])


# ---------------------------------------------------------------- registry


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            name="messages",
            kind="sft",
            fields={"messages": "messages", "system": "system"},
            required=("messages",),
            convert=_convert_messages,
            description="OpenAI-style `messages: [{role, content}]`; content may be a list of text parts.",
        ),
        Format(
            name="sharegpt",
            kind="sft",
            fields={"conversations": "conversations", "system": "system", "role_key": "from", "content_key": "value"},
            required=("conversations",),
            convert=_convert_sharegpt,
            description="ShareGPT `conversations: [{from, value}]` with human/gpt/system roles.",
        ),
        Format(
            name="alpaca",
            kind="sft",
            fields={
                "instruction": "instruction",
                "input": "input",
                "output": "output",
                "system": "system",
                "history": "history",
            },
            required=("instruction", "output"),
            convert=_convert_alpaca,
            description="Alpaca `instruction` + optional `input` -> `output`, optional `system` and `history` pairs.",
        ),
        Format(
            name="prompt_completion",
            kind="sft",
            fields={"prompt": "prompt", "completion": "completion", "system": "system"},
            required=("prompt", "completion"),
            convert=_convert_prompt_completion,
            description="`prompt` and `completion`, each a string or a list of messages.",
        ),
        Format(
            name="prompts",
            kind="prompts",
            fields={"prompt": "prompt", "system": "system"},
            required=("prompt",),
            convert=_convert_prompts,
            description="Prompts only (a string or messages ending with a user turn): for sampling and evaluation.",
        ),
        Format(
            name="chosen_rejected",
            kind="preference",
            fields={"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "system": "system",
                    "chosen_open": "chosen_open", "rejected_open": "rejected_open"},
            required=("chosen", "rejected"),
            convert=_convert_chosen_rejected,
            description="Preference pairs: `chosen`/`rejected` strings or message lists; `prompt` or a shared prefix; "
                        "optional `chosen_open`/`rejected_open`: true for a cut-off reply DPO must leave unclosed.",
        ),
        Format(
            name="hh_rlhf",
            kind="preference",
            fields={"chosen": "chosen", "rejected": "rejected"},
            required=("chosen", "rejected"),
            convert=_convert_hh_rlhf,
            description="Anthropic HH-RLHF: `chosen`/`rejected` transcripts '\\n\\nHuman: ...\\n\\nAssistant: ...'.",
        ),
        Format(
            name="sharegpt_preference",
            kind="preference",
            fields={
                "conversations": "conversations",
                "chosen": "chosen",
                "rejected": "rejected",
                "system": "system",
                "role_key": "from",
                "content_key": "value",
            },
            required=("conversations", "chosen", "rejected"),
            convert=_convert_sharegpt_preference,
            description="LLaMA-Factory pairs: `conversations` ending with a human turn, `chosen`/`rejected` turn(s).",
        ),
        Format(
            name="pairwise_label",
            kind="preference",
            fields={
                "prompt": "prompt",
                "answer_a": "answer_a",
                "answer_b": "answer_b",
                "label": "label",
                "system": "system",
            },
            required=("prompt", "answer_a", "answer_b", "label"),
            convert=_convert_pairwise_label,
            description="Two answers and a `label` naming the better one (field name, a/b, 0/1); ties are dropped.",
        ),
    )
}


def did_you_mean(name: str, known: list[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else the list of known names."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"


def get_format(name: str) -> Format:
    """The registered format called `name`; an unknown name is a DataError listing the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise DataError(f"unknown data format '{name}'{did_you_mean(name, list(FORMATS))}") from None


def convert_row(fmt: Format, row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    """Convert one file row to canonical form; `fields` (from the card) overrides the format's default columns."""
    if not isinstance(row, Mapping):
        raise RowError(f"row must be an object, got {_type_name(row)}")
    return fmt.convert(row, {**fmt.fields, **fields})
