"""Row converters: each format's canonical output and the reasons given for rows that cannot convert."""

from __future__ import annotations

import pytest

from align.data import FORMATS, DroppedRow, RowError, convert_row, get_format
from align.data.converters import LabelMapNeeded
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


# ---------------------------------------------------------------- preference formats

PAIR = {"prompt": [user("q")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}


def test_chosen_rejected_message_lists_system_and_multi_turn_prompt() -> None:
    row = {"prompt": [user("q1"), assistant("a1"), user("q2")], "chosen": [assistant("good")], "rejected": "bad"}
    assert convert("chosen_rejected", {**row, "system": "sys"}) == {
        "prompt": [system("sys"), user("q1"), assistant("a1"), user("q2")],
        "chosen": [assistant("good")],
        "rejected": [assistant("bad")],
    }
    implicit = {
        "chosen": [system("s"), user("q1"), assistant("a1"), user("q2"), assistant("good")],
        "rejected": [system("s"), user("q1"), assistant("a1"), user("q2"), assistant("bad")],
    }
    assert convert("chosen_rejected", implicit)["prompt"] == implicit["chosen"][:-1]


HH_CHOSEN = "\n\nHuman: Hi there\n\nAssistant:  Hello! \n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken...\n"
HH_REJECTED = "\n\nHuman: Hi there\n\nAssistant:  Hello! \n\nHuman: Tell me a joke\n\nAssistant: No."


def test_hh_rlhf_multi_turn_split() -> None:
    assert convert("hh_rlhf", {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}) == {
        "prompt": [user("Hi there"), assistant("Hello!"), user("Tell me a joke")],
        "chosen": [assistant("Why did the chicken...")],
        "rejected": [assistant("No.")],
    }
    assert FORMATS["hh_rlhf"].kind == "preference"


def test_sharegpt_preference_object_list_system_and_renamed_keys() -> None:
    row = {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": [{"from": "gpt", "value": "bad"}],
        "system": "sys",
    }
    assert convert("sharegpt_preference", row) == {**PAIR, "prompt": [system("sys"), user("q")]}
    renamed = {
        "turns": [{"speaker": "user", "text": "q"}],
        "chosen": {"speaker": "assistant", "text": "good"},
        "rejected": {"speaker": "assistant", "text": "bad"},
    }
    fields = {"conversations": "turns", "role_key": "speaker", "content_key": "text"}
    assert convert("sharegpt_preference", renamed, **fields) == PAIR


ALPACA_EVAL = {1: "answer_a", 2: "answer_b", 0: "tie"}  # AlpacaEval's `preference`: 1 = output_1, 2 = output_2


@pytest.mark.parametrize(
    ("label", "fields", "label_map", "preferred"),
    [
        ("answer_a", {}, None, "a"),
        ("answer_b", {}, None, "b"),
        ("A", {}, None, "a"),
        ("b", {}, None, "b"),
        ("response_2", {"answer_a": "response_1", "answer_b": "response_2"}, None, "b"),
        ("answer_a", {"answer_a": "response_1", "answer_b": "response_2"}, None, "a"),
        # Integer labels are read only through the card's label_map, whatever their spelling.
        (1, {}, ALPACA_EVAL, "a"),
        (2, {}, ALPACA_EVAL, "b"),
        ("2", {}, ALPACA_EVAL, "b"),  # a CSV cell is the integer spelled out
        (2.0, {}, ALPACA_EVAL, "b"),  # parquet written by pandas with a NaN in the column
        (0, {}, {"0": "answer_a", "1": "answer_b"}, "a"),  # quoted keys mean the same labels
        ("b", {}, ALPACA_EVAL, "b"),  # text labels keep their meaning beside a map
    ],
)
def test_pairwise_label_values(label: object, fields: dict, label_map: dict | None, preferred: str) -> None:
    columns = {"answer_a": fields.get("answer_a", "answer_a"), "answer_b": fields.get("answer_b", "answer_b")}
    row = {"prompt": "q", columns["answer_a"]: "A!", columns["answer_b"]: [assistant("B!")], "label": label}
    labels = None if label_map is None else {str(k): v for k, v in label_map.items()}
    out = convert_row(get_format("pairwise_label"), row, fields, {"label_map": labels})
    best, worst = ("A!", "B!") if preferred == "a" else ("B!", "A!")
    assert out == {"prompt": [user("q")], "chosen": [assistant(best)], "rejected": [assistant(worst)]}


@pytest.mark.parametrize("label", [0, 1, 2, "0", "1", " 1 ", 1.0])
def test_pairwise_integer_label_without_a_map_is_never_guessed(label: object) -> None:
    with pytest.raises(LabelMapNeeded, match=r"field 'label' holds the integer label .*label_map"):
        convert("pairwise_label", {"prompt": "q", "answer_a": "x", "answer_b": "y", "label": label})


def test_pairwise_label_map_tie_and_unlisted_label() -> None:
    fmt, row = get_format("pairwise_label"), {"prompt": "q", "answer_a": "x", "answer_b": "y"}
    labels = {"1": "answer_a", "2": "answer_b", "0": "tie"}
    with pytest.raises(DroppedRow, match="tie"):
        convert_row(fmt, {**row, "label": 0}, {}, {"label_map": labels})
    with pytest.raises(RowError, match=r"label 3 is not in the card's label_map \(labels: '1', '2', '0'\)"):
        convert_row(fmt, {**row, "label": 3}, {}, {"label_map": labels})


@pytest.mark.parametrize("label", ["tie", "Equal", "", None, float("nan")])
def test_pairwise_label_tie_is_dropped_not_malformed(label: object) -> None:
    with pytest.raises(DroppedRow, match="tie") as info:
        convert("pairwise_label", {"prompt": "q", "answer_a": "x", "answer_b": "y", "label": label})
    assert not isinstance(info.value, RowError)


@pytest.mark.parametrize(
    ("name", "row", "reason"),
    [
        (
            "chosen_rejected",
            {"prompt": "q", "chosen": "same", "rejected": "same "},
            "chosen and rejected are identical",
        ),
        ("chosen_rejected", {"prompt": " ", "chosen": "a", "rejected": "b"}, "the user prompt is empty"),
        ("chosen_rejected", {"prompt": "q", "chosen": "", "rejected": "b"}, "the chosen reply is empty"),
        (
            "chosen_rejected",
            {"prompt": "q", "chosen": "a", "rejected": [assistant(" ")]},
            "the rejected reply is empty",
        ),
        ("chosen_rejected", {"prompt": [assistant("hi")], "chosen": "a", "rejected": "b"}, "must end with a user turn"),
        ("chosen_rejected", {"prompt": "q", "chosen": [user("a")], "rejected": "b"}, "must end with an assistant"),
        (
            "chosen_rejected",
            {"chosen": [user("q"), assistant("a")], "rejected": [user("other"), assistant("b")]},
            "do not share the same prompt turns (they differ from turn 1)",
        ),
        (
            "hh_rlhf",
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: p\n\nAssistant: b"},
            "do not share the same prompt turns",
        ),
        (
            "hh_rlhf",
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q"},
            "must end with an assistant",
        ),
        ("hh_rlhf", {"chosen": "hello\n\nHuman: q\n\nAssistant: a", "rejected": "x"}, "text before the first"),
        (
            "hh_rlhf",
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a"},
            "identical",
        ),
        (
            "hh_rlhf",
            {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"},
            "chosen reply",
        ),
        ("hh_rlhf", {"chosen": ["not a transcript"], "rejected": ""}, "must be a transcript string, got list"),
        (
            "sharegpt_preference",
            {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}},
            "missing field 'rejected'",
        ),
        (
            "sharegpt_preference",
            {
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                "chosen": {"from": "gpt", "value": "b"},
                "rejected": {"from": "gpt", "value": "c"},
            },
            "the prompt must end with a user turn, not assistant",
        ),
        (
            "pairwise_label",
            {"prompt": "q", "answer_a": "x", "answer_b": "y", "label": "winner"},
            "label 'winner' names no field of this row (fields: prompt, answer_a, answer_b, label)",
        ),
        (
            "pairwise_label",
            {"prompt": "q", "answer_a": "x", "answer_b": "y", "label": "prompt"},
            "label 'prompt' names neither answer field",
        ),
        ("pairwise_label", {"prompt": "q", "answer_a": "x", "answer_b": "y", "label": True}, "label must be"),
        ("pairwise_label", {"prompt": "q", "answer_a": "x", "answer_b": "y", "label": 0.5}, "label must be"),
        ("pairwise_label", {"prompt": "q", "answer_a": "x", "answer_b": "y"}, "missing field 'label'"),
        ("pairwise_label", {"prompt": "q", "answer_a": "x", "answer_b": "x", "label": "a"}, "identical"),
    ],
)
def test_preference_row_error_reasons(name: str, row: dict, reason: str) -> None:
    with pytest.raises(RowError) as info:
        convert(name, row)
    assert reason in str(info.value)
