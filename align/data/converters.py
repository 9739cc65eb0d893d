"""Row converters: each on-disk dataset layout becomes the canonical conversational rows TRL expects.

SFT rows are `{"prompt": [...], "completion": [final assistant message]}` so the loss falls on the
completion only; preference rows are `{"prompt": [...], "chosen": [...], "rejected": [...]}`.
A converter is `convert_NAME(row, fields)` and raises `RowError` with a human reason; the card loader attaches
the file location. Which converter reads which layout is the format registry's business (`align.data.formats`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
# Aliases seen in ShareGPT/LLaMA-Factory style data; normalised so templates only meet the three roles.
_ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


class RowError(ValueError):
    """A row that cannot be converted; `str()` is the human reason, without the location."""


class DroppedRow(Exception):
    """A well-formed row that carries no preference (a tie); `str()` is the reason. Never fails a strict load."""


class LabelMapNeeded(Exception):
    """A row whose meaning the card must state (an integer preference label without `label_map`): the whole load
    fails, whatever `on_malformed` says, because skipping or guessing would both read the data wrong."""


# ---------------------------------------------------------------- field and message reading


def _get(row: Mapping[str, Any], fields: Mapping[str, str], name: str, *, required: bool = True) -> Any:
    """The value of canonical field `name`; null counts as absent (CSV short rows, JSON nulls)."""
    column = fields[name]
    value = row.get(column)
    if value is None and required:
        mapped = f" (mapped from '{name}')" if column != name else ""
        raise RowError(f"missing field '{column}'{mapped}")
    return value


def type_name(value: Any) -> str:
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
                raise RowError(f"{where}[{index}] must be a text part object, got {type_name(part)}")
            if part.get("type", "text") != "text":
                raise RowError(f"{where}[{index}] has type '{part.get('type')}'; only text parts are supported")
            text = part.get("text", part.get("value"))
            if not isinstance(text, str):
                raise RowError(f"{where}[{index}] has no string 'text' or 'value'")
            texts.append(text)
        return "".join(texts)
    raise RowError(f"{where} must be a string or a list of text parts, got {type_name(value)}")


def _role(value: Any, where: str) -> str:
    role = _ROLE_ALIASES.get(value.lower()) if isinstance(value, str) else None
    if role is None:
        raise RowError(f"{where} {value!r} is not one of {'/'.join(ROLES)}")
    return role


def _messages(value: Any, where: str, role_key: str = "role", content_key: str = "content") -> list[Message]:
    """A list of `{role_key, content_key}` objects as canonical messages; extra keys are ignored."""
    if not isinstance(value, list):
        raise RowError(f"'{where}' must be a list of messages, got {type_name(value)}")
    out = []
    for index, item in enumerate(value):
        at = f"{where}[{index}]"
        if not isinstance(item, Mapping):
            raise RowError(f"{at} must be an object with '{role_key}' and '{content_key}', got {type_name(item)}")
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
        raise RowError(f"'{where}' must be a string, got {type_name(system)}")
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


def convert_messages(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    messages = _messages(_get(row, fields, "messages"), fields["messages"])
    return _split_sft(_with_system(messages, _get(row, fields, "system", required=False), fields["system"]))


def convert_sharegpt(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    column = fields["conversations"]
    messages = _messages(_get(row, fields, "conversations"), column, fields["role_key"], fields["content_key"])
    return _split_sft(_with_system(messages, _get(row, fields, "system", required=False), fields["system"]))


def _string(row: Mapping[str, Any], fields: Mapping[str, str], name: str, *, required: bool = True) -> str:
    value = _get(row, fields, name, required=required)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(f"field '{fields[name]}' must be a string, got {type_name(value)}")
    return value


def convert_alpaca(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    instruction = _string(row, fields, "instruction")
    extra = _string(row, fields, "input", required=False)
    output = _string(row, fields, "output")
    # Alpaca convention: the optional input follows the instruction after a blank line.
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages: list[Message] = []
    history = _get(row, fields, "history", required=False) or []
    if not isinstance(history, list):
        raise RowError(
            f"field '{fields['history']}' must be a list of [user, assistant] pairs, got {type_name(history)}"
        )
    for index, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise RowError(f"{fields['history']}[{index}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return _split_sft(_with_system(messages, _get(row, fields, "system", required=False), fields["system"]))


def convert_prompt_completion(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    prompt = _as_messages(_get(row, fields, "prompt"), fields["prompt"], "user")
    completion = _as_messages(_get(row, fields, "completion"), fields["completion"], "assistant")
    if not completion:
        raise RowError(f"field '{fields['completion']}' is an empty list")
    # A multi-message completion folds its leading turns into the prompt: loss stays on the final answer.
    return _split_sft(_with_system(prompt + completion, _get(row, fields, "system", required=False), fields["system"]))


def convert_prompts(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    prompt = _with_system(_as_messages(_get(row, fields, "prompt"), fields["prompt"], "user"),
                          _get(row, fields, "system", required=False), fields["system"])
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError(f"field '{fields['prompt']}' must end with a user turn")
    if not prompt[-1]["content"].strip():
        raise RowError("the user prompt is empty")
    return {"prompt": prompt}


# ---------------------------------------------------------------- preference converters


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


def convert_chosen_rejected(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
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
        raise RowError(f"field '{column}' must be a transcript string, got {type_name(text)}")
    parts = _HH_MARKER.split(text)
    if parts[0].strip():
        raise RowError(f"'{column}' has text before the first 'Human:'/'Assistant:' marker: {parts[0].strip()[:40]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2], strict=True)]


def convert_hh_rlhf(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    chosen = _hh_turns(_get(row, fields, "chosen"), fields["chosen"])
    rejected = _hh_turns(_get(row, fields, "rejected"), fields["rejected"])
    return _split_preference(chosen, rejected, None, "system")


def convert_sharegpt_preference(row: Mapping[str, Any], fields: Mapping[str, str]) -> dict:
    keys = fields["role_key"], fields["content_key"]
    conversation = _messages(_get(row, fields, "conversations"), fields["conversations"], *keys)
    replies = []
    for name in ("chosen", "rejected"):
        value = _get(row, fields, name)
        replies.append(_messages([value] if isinstance(value, Mapping) else value, fields[name], *keys))
    system = _get(row, fields, "system", required=False)
    return _split_preference(conversation + replies[0], conversation + replies[1], system, fields["system"])


_TIES = ("", "tie", "equal")
LabelMap = dict[str, str]  # a label's text -> answer_a | answer_b | tie (`label_map` in the card)


def _label_text(label: Any) -> str | None:
    """An integer label (a JSON/parquet int, an integral float, or a CSV cell such as '1') as text, else None.

    CSV cells are text, so "1" is the integer 1 spelled out: both need the card's `label_map`."""
    if isinstance(label, bool):
        return None
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, int):
        return str(label)
    if isinstance(label, str) and re.fullmatch(r"[+-]?\d+", label.strip()):
        return str(int(label.strip()))
    return None


def _is_missing(label: Any) -> bool:
    """Null, an empty cell or NaN (how pandas-made parquet spells an empty label)."""
    return label is None or (isinstance(label, float) and label != label)


def _mapped_meaning(label: Any, label_map: Mapping[str, str] | None) -> str | None:
    """What the card's `label_map` says `label` means (its text, or its number spelled out), None when unmapped."""
    text = label.strip() if isinstance(label, str) else _label_text(label)
    if not label_map or text is None:
        return None
    return next((label_map[key] for key in (text, _label_text(text)) if key in label_map), None)


def _refuse_unmapped_integer(label: Any, fields: Mapping[str, str], label_map: Mapping[str, str] | None,
                             readings: str, example: str) -> None:
    """An integer label not read through the card's `label_map`: a RowError when the map lacks it, else
    LabelMapNeeded (which fails the whole load), naming what it could mean (`readings`) and an `example` map."""
    if _label_text(label) is None:
        return
    if label_map:
        known = ", ".join(map(repr, label_map))
        raise RowError(f"label {label!r} is not in the card's label_map (labels: {known})")
    raise LabelMapNeeded(f"field '{fields['label']}' holds the integer label {label!r}, which could mean either "
                         f"{readings}; say what each label means with `label_map` in the card, e.g. "
                         f"`label_map: {example}`")


def _preferred(label: Any, row: Mapping[str, Any], fields: Mapping[str, str], label_map: LabelMap | None) -> int:
    """0 when the label prefers answer_a, 1 for answer_b; a tie raises DroppedRow.

    Integer labels mean nothing by themselves (0/1? 1/2 with 0 a tie?), so they are read only through the
    card's `label_map`; without one they raise LabelMapNeeded, which fails the whole load."""
    if _is_missing(label):
        raise DroppedRow(f"tie (label {label!r})")
    meaning = _mapped_meaning(label, label_map)
    if meaning is not None:
        if meaning == "tie":
            raise DroppedRow(f"tie (label {label!r})")
        return ("answer_a", "answer_b").index(meaning)
    _refuse_unmapped_integer(label, fields, label_map, "answer (0/1? 1/2 with 0 a tie?)",
                             "{1: answer_a, 2: answer_b, 0: tie}")
    if isinstance(label, str):
        text = label.strip()
        if text.lower() in _TIES:
            raise DroppedRow(f"tie (label {label!r})")
        for index, name in enumerate(("answer_a", "answer_b")):
            if text in (fields[name], name) or text.lower() == "ab"[index]:
                return index
        if text not in row:
            raise RowError(f"label {text!r} names no field of this row (fields: {', '.join(map(str, row))})")
        raise RowError(f"label {text!r} names neither answer field ('{fields['answer_a']}' or '{fields['answer_b']}')")
    raise RowError(f"label must be a field name, 'a'/'b', a tie marker or (with a label_map) an integer, "
                   f"got {label!r}")


def convert_pairwise_label(row: Mapping[str, Any], fields: Mapping[str, str],
                           label_map: LabelMap | None = None) -> dict:
    prompt = _as_messages(_get(row, fields, "prompt"), fields["prompt"], "user")
    answers = [_as_messages(_get(row, fields, name), fields[name], "assistant") for name in ("answer_a", "answer_b")]
    if fields["label"] not in row:
        raise RowError(f"missing field '{fields['label']}'")
    best = _preferred(row[fields["label"]], row, fields, label_map)
    system = _get(row, fields, "system", required=False)
    return _split_preference(prompt + answers[best], prompt + answers[1 - best], system, fields["system"])


# ---------------------------------------------------------------- unpaired (thumbs up/down) converters

# How an unpaired row's label reads without a `label_map`: booleans, and their usual spellings in text (CSV cells).
_VERDICTS = {"true": True, "false": False, "desirable": True, "undesirable": False, "up": True, "down": False,
             "thumbs_up": True, "thumbs_down": False, "good": True, "bad": False}
UnpairedLabelMap = dict[str, str]  # a label's text -> desirable | undesirable | skip (`label_map` in the card)


def _desirable(label: Any, fields: Mapping[str, str], label_map: UnpairedLabelMap | None) -> bool:
    """True for a thumbs up, False for a thumbs down; no label (or one the card maps to `skip`) raises DroppedRow.

    A number means nothing by itself (1/0? 1/-1? a 1-5 rating?), so integer labels are read only through the
    card's `label_map`, as for pairwise_label; without one they raise LabelMapNeeded, which fails the whole load."""
    if _is_missing(label):
        raise DroppedRow(f"no rating (label {label!r})")
    meaning = _mapped_meaning(label, label_map)
    if meaning is not None:
        if meaning == "skip":
            raise DroppedRow(f"label {label!r} is mapped to skip")
        return meaning == "desirable"
    if isinstance(label, bool):
        return label
    _refuse_unmapped_integer(label, fields, label_map, "verdict (1/0? 1/-1? a rating?)",
                             "{1: desirable, 0: undesirable}")
    if isinstance(label, str) and label.strip().lower() in _VERDICTS:
        return _VERDICTS[label.strip().lower()]
    raise RowError(f"label must be true/false (or desirable/undesirable, up/down), or a value of the card's "
                   f"label_map, got {label!r}")


def convert_unpaired(row: Mapping[str, Any], fields: Mapping[str, str],
                     label_map: UnpairedLabelMap | None = None) -> dict:
    """Canonical unpaired row: `{"prompt": [...], "completion": [reply], "label": bool}`, plus `completion_open`
    when the row says whether its reply was cut off (rows without it keep their canonical form, and so their hash)."""
    if fields["label"] not in row:
        raise RowError(f"missing field '{fields['label']}'")
    label = _desirable(row[fields["label"]], fields, label_map)
    sft = convert_prompt_completion(row, fields)  # the same prompt/completion rules as SFT rows
    out = {**sft, "label": label}
    cut = _flag(row, fields, "completion_open")
    return out if cut is None else {**out, "completion_open": cut}


def unpair(row: Mapping[str, Any]) -> list[dict]:
    """One canonical preference row as two unpaired rows: its chosen reply desirable, its rejected one not; a
    reply's cut-off flag (`chosen_open`/`rejected_open`) travels with it as `completion_open`."""
    flagged = "chosen_open" in row or "rejected_open" in row
    return [{"prompt": row["prompt"], "completion": row[side], "label": side == "chosen",
             **({"completion_open": bool(row.get(f"{side}_open"))} if flagged else {})}
            for side in ("chosen", "rejected")]
