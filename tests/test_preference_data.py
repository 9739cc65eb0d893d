"""Preference data through data cards: dropped ties, strict errors, and the real HH-RLHF and LLaMA-Factory files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from align.data import convert_row, get_format, load_card, load_data
from align.errors import DataError


def write_card(directory: Path, source: Path | str, fmt: str, body: str = "") -> Path:
    card = directory / "card.yaml"
    card.write_text(
        f"name: test\ndescription: a test card\nlicense: MIT\nsource:\n  path: {source}\nformat: {fmt}\n{body}",
        encoding="utf-8",
    )
    return card


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def pair(i: int, label: object) -> dict:
    return {"question": f"q{i}", "left": f"left {i}", "right": f"right {i}", "label": label}


def test_pairwise_ties_are_dropped_and_counted_even_when_strict(tmp_path: Path) -> None:
    rows = [pair(0, "left"), pair(1, "right"), pair(2, "tie"), pair(3, None), pair(4, "B"), pair(5, "a")]
    write_jsonl(tmp_path / "data.jsonl", rows)
    body = "fields: {prompt: question, answer_a: left, answer_b: right}\neval:\n  fraction: 0\non_malformed: error\n"
    data = load_data(load_card(write_card(tmp_path, "data.jsonl", "pairwise_label", body)))
    assert data.rejected == []
    assert [(d.location.rsplit("/", 1)[-1], d.reason) for d in data.dropped] == [
        ("data.jsonl:3", "tie (label 'tie')"),
        ("data.jsonl:4", "tie (label None)"),
    ]
    assert [r["chosen"][0]["content"] for r in data.train] == ["left 0", "right 1", "right 4", "left 5"]
    assert data.summary()["dropped"] == 2 and data.summary()["rejected"] == 0


def test_integer_labels_need_the_card_label_map_even_with_skip(tmp_path: Path) -> None:
    """AlpacaEval's annotations: `preference` 1 = output_1 wins, 2 = output_2, 0 = tie. Without a map the load
    fails (skipping or guessing would both read the data wrong); with one, each label means what the card says."""
    rows = [pair(0, 1), pair(1, 2), pair(2, 0), pair(3, 2)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    fields = "fields: {prompt: question, answer_a: left, answer_b: right}\neval:\n  fraction: 0\n"
    card = write_card(tmp_path, "data.jsonl", "pairwise_label", fields + "on_malformed: skip\n")
    with pytest.raises(DataError, match=r"card.yaml: field 'label' holds the integer label 1, .*label_map: "
                                        r"\{1: answer_a, 2: answer_b, 0: tie\}.*\(first at .*data.jsonl:1\)"):
        load_data(load_card(card))
    label_map = "label_map: {1: answer_a, 2: answer_b, 0: tie}\n"
    card = write_card(tmp_path, "data.jsonl", "pairwise_label", fields + label_map)
    data = load_data(load_card(card))
    assert [r["chosen"][0]["content"] for r in data.train] == ["left 0", "right 1", "right 3"]
    assert [r["rejected"][0]["content"] for r in data.train] == ["right 0", "left 1", "left 3"]
    assert [d.reason for d in data.dropped] == ["tie (label 0)"]


@pytest.mark.parametrize(("body", "problem"), [
    ("format: pairwise_label\nlabel_map: {1: answer_a, 2: better}\n", "label_map.2"),
    ("format: pairwise_label\nlabel_map: {1: answer_a, ' 1': answer_b}\n", "lists the same label twice"),
    ("format: chosen_rejected\nlabel_map: {1: answer_a}\n", "only applies to the pairwise_label and unpaired formats"),
    ("format: pairwise_label\nlabel_map: {true: answer_a}\n", "label_map"),
])
def test_label_map_is_checked_with_the_card(tmp_path: Path, body: str, problem: str) -> None:
    card = tmp_path / "card.yaml"
    card.write_text(f"name: t\ndescription: d\nlicense: MIT\nsource:\n  path: data.jsonl\n{body}", encoding="utf-8")
    with pytest.raises(DataError, match=rf"card.yaml(:\d+)?: .*{problem}"):
        load_card(card)


def test_csv_integer_labels_read_as_integers(tmp_path: Path) -> None:
    """CSV cells are text: "1" and "2" are the integers spelled out and go through label_map (keys 1/2)."""
    (tmp_path / "data.csv").write_text("prompt,answer_a,answer_b,label\nq0,x0,y0,1\nq1,x1,y1,2\nq2,x2,y2,0\n",
                                       encoding="utf-8")
    body = "eval:\n  fraction: 0\nlabel_map: {1: answer_b, 2: answer_a, 0: tie}\n"
    data = load_data(load_card(write_card(tmp_path, "data.csv", "pairwise_label", body)))
    assert [r["chosen"][0]["content"] for r in data.train] == ["y0", "x1"] and len(data.dropped) == 1


def test_all_ties_is_no_usable_rows(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": "q", "answer_a": "x", "answer_b": "y", "label": "equal"}])
    with pytest.raises(DataError, match=r"no usable rows .* \(1 dropped, first: .*data.jsonl:1: tie"):
        load_data(load_card(write_card(tmp_path, "data.jsonl", "pairwise_label")))


def test_strict_identical_pair_names_file_and_line(tmp_path: Path) -> None:
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "same", "rejected": "same"}]
    write_jsonl(tmp_path / "data.jsonl", rows)
    card = write_card(tmp_path, "data.jsonl", "chosen_rejected", "on_malformed: error\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: chosen and rejected are identical"):
        load_data(load_card(card))


# ---------------------------------------------------------------- real third-party data in ../shared

# Rows of harmless-base-test.jsonl.gz that cannot become a pair, as found in the file itself.
HH_REJECTED = {
    87: "the chosen reply is empty",
    517: "the chosen reply is empty",
    926: "the chosen reply is empty",
    1104: "the chosen reply is empty",
    1255: "chosen and rejected do not share the same prompt turns (they differ from turn 4)",
    1689: "chosen and rejected do not share the same prompt turns (they differ from turn 4)",
    1951: "chosen and rejected do not share the same prompt turns (they differ from turn 2)",
    1953: "chosen and rejected do not share the same prompt turns (they differ from turn 4)",
    2037: "chosen and rejected do not share the same prompt turns (they differ from turn 10)",
}


def test_shared_hh_rlhf_harmless(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    data = load_data(load_card(write_card(tmp_path, source.resolve(), "hh_rlhf", "on_malformed: skip\n")))
    assert {int(r.location.rsplit(":", 1)[1]): r.reason for r in data.rejected} == HH_REJECTED
    assert (len(data.train), len(data.eval), len(data.dropped)) == (2073, 230, 0)
    assert len(data.train) + len(data.eval) + len(data.rejected) == 2312

    with gzip.open(source, "rt", encoding="utf-8") as handle:
        originals = [json.loads(line) for line in handle]
    rows = data.train + data.eval
    for line in (1, 2, 1000):
        original = originals[line - 1]
        row = convert_row(get_format("hh_rlhf"), original, {})
        assert row in rows
        assert row["prompt"][0]["role"] == "user" and row["prompt"][-1]["role"] == "user"
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen and rejected and chosen != rejected
        assert original["chosen"].rstrip().endswith(chosen) and original["rejected"].rstrip().endswith(rejected)
        assert original["chosen"].count("\n\nHuman:") == sum(m["role"] == "user" for m in row["prompt"])


def test_shared_hh_rlhf_strict_lists_first_rows(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    with pytest.raises(DataError, match=r"(?s)9 malformed row\(s\).*jsonl.gz:87: the chosen reply is empty"):
        load_data(load_card(write_card(tmp_path, source.resolve(), "hh_rlhf")))


def test_shared_llamafactory_dpo_demo(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "data" / "llamafactory" / "dpo_en_demo.json"
    data = load_data(load_card(write_card(tmp_path, source.resolve(), "sharegpt_preference")))
    assert (data.rejected, data.dropped) == ([], [])
    assert (len(data.train), len(data.eval)) == (270, 30)
    first = json.loads(source.read_text(encoding="utf-8"))[0]
    row = next(r for r in data.train + data.eval if r["chosen"][0]["content"] == first["chosen"]["value"])
    assert row["prompt"] == [{"role": "user", "content": first["conversations"][0]["value"]}]
    assert row["rejected"] == [{"role": "assistant", "content": first["rejected"]["value"]}]
