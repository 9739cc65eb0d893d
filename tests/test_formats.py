"""Row converters: each format's canonical output and the reasons given for rows that cannot convert."""

from __future__ import annotations

import pytest

from align.data import FORMATS, RowError, convert_row, get_format
from align.errors import DataError


def convert(name: str, row: dict, **fields: str) -> dict:
    return convert_row(get_format(name), row, fields)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def test_messages_multi_turn_with_system_field() -> None:
    row = {"messages": [user("hi"), assistant("hello"), user("bye"), assistant("see you")], "system": "be kind"}
    assert convert("messages", row) == {
        "prompt": [system("be kind"), user("hi"), assistant("hello"), user("bye")],
        "completion": [assistant("see you")],
    }


def test_messages_content_parts_roles_and_extra_keys() -> None:
    row = {
        "messages": [
            {
                "role": "human",
                "content": [{"type": "text", "value": "hi "}, {"type": "text", "text": "there"}],
                "loss_weight": 0.0,
            },
            {"role": "GPT", "content": {"type": "text", "text": "hello"}, "loss_weight": 1.0},
        ]
    }
    assert convert("messages", row) == {"prompt": [user("hi there")], "completion": [assistant("hello")]}


def test_sharegpt_with_renamed_keys() -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ]
    }
    assert convert("sharegpt", row) == {"prompt": [system("sys"), user("q")], "completion": [assistant("a")]}
    renamed = {"turns": [{"speaker": "user", "text": "q"}, {"speaker": "assistant", "text": "a"}]}
    assert convert("sharegpt", renamed, conversations="turns", role_key="speaker", content_key="text") == {
        "prompt": [user("q")],
        "completion": [assistant("a")],
    }


def test_alpaca_input_system_and_history() -> None:
    row = {"instruction": "Sum", "input": "2 and 3", "output": "5", "system": "math", "history": [["hi", "hello"]]}
    assert convert("alpaca", row) == {
        "prompt": [system("math"), user("hi"), assistant("hello"), user("Sum\n\n2 and 3")],
        "completion": [assistant("5")],
    }
    assert convert("alpaca", {"instruction": "Say hi", "input": "  ", "output": "hi"})["prompt"] == [user("Say hi")]


def test_alpaca_field_mapping() -> None:
    row = {"question": "Why?", "answer": "Because."}
    assert convert("alpaca", row, instruction="question", output="answer") == {
        "prompt": [user("Why?")],
        "completion": [assistant("Because.")],
    }


def test_prompt_completion_strings_and_lists() -> None:
    assert convert("prompt_completion", {"prompt": "q", "completion": "a", "system": "s"}) == {
        "prompt": [system("s"), user("q")],
        "completion": [assistant("a")],
    }
    row = {"prompt": [user("q1")], "completion": [assistant("a1"), user("q2"), assistant("a2")]}
    assert convert("prompt_completion", row) == {
        "prompt": [user("q1"), assistant("a1"), user("q2")],
        "completion": [assistant("a2")],
    }


def test_chosen_rejected_explicit_and_implicit_prompt() -> None:
    assert convert("chosen_rejected", {"prompt": "q", "chosen": "good", "rejected": "bad"}) == {
        "prompt": [user("q")],
        "chosen": [assistant("good")],
        "rejected": [assistant("bad")],
    }
    row = {"chosen": [user("q"), assistant("good")], "rejected": [user("q"), assistant("bad")]}
    assert convert("chosen_rejected", row) == {
        "prompt": [user("q")],
        "chosen": [assistant("good")],
        "rejected": [assistant("bad")],
    }
    assert FORMATS["chosen_rejected"].kind == "preference"


@pytest.mark.parametrize(
    ("name", "row", "reason"),
    [
        ("alpaca", {"instruction": "x"}, "missing field 'output'"),
        ("alpaca", {"instruction": "x", "output": 3}, "field 'output' must be a string, got int"),
        ("messages", {"messages": "hello"}, "'messages' must be a list of messages, got str"),
        ("messages", {"messages": [user("q"), assistant("a"), user("again")]}, "no assistant turn to learn from"),
        ("messages", {"messages": [user("q"), assistant("  ")]}, "the final assistant message is empty"),
        ("messages", {"messages": [user(" "), assistant("a")]}, "the user prompt is empty"),
        ("messages", {"messages": [assistant("a")]}, "no user turn"),
        (
            "messages",
            {"messages": [user("q"), {"role": "robot", "content": "a"}]},
            "messages[1].role 'robot' is not one of system/user/assistant",
        ),
        ("messages", {"messages": [user("q"), {"role": "assistant"}]}, "messages[1] has no 'content'"),
        (
            "messages",
            {"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}, assistant("a")]},
            "only text parts are supported",
        ),
        ("messages", {"messages": [system("a"), user("q"), assistant("a")], "system": "b"}, "both a 'system' field"),
        (
            "sharegpt",
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            "conversations[1].from 'bot' is not one of",
        ),
        ("prompt_completion", {"prompt": "q", "completion": ""}, "the final assistant message is empty"),
        ("prompt_completion", {"prompt": 5, "completion": "a"}, "'prompt' must be a list of messages, got int"),
        ("chosen_rejected", {"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ("alpaca", ["not", "a", "dict"], "row must be an object, got list"),
    ],
)
def test_row_error_reasons(name: str, row: dict, reason: str) -> None:
    with pytest.raises(RowError) as info:
        convert(name, row)
    assert reason in str(info.value)


def test_mapped_field_error_names_both_columns() -> None:
    with pytest.raises(RowError, match=r"missing field 'answer' \(mapped from 'output'\)"):
        convert("alpaca", {"instruction": "q"}, output="answer")


def test_unknown_format_suggests() -> None:
    with pytest.raises(DataError, match="did you mean 'sharegpt'"):
        get_format("sharegtp")
