"""Data cards: validation errors with file:line, readers that locate bad rows, hashes, and the eval split."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest

from align.data import describe_row, load_card, load_data, token_length_percentiles
from align.errors import DataError
from align.hashing import sha256_file

REPO = Path(__file__).resolve().parents[1]


def qa(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_card(
    directory: Path, body: str = "", *, path: str = "data.jsonl", fmt: str = "messages", name: str = "card.yaml"
) -> Path:
    card = directory / name
    card.write_text(
        f"name: test\ndescription: a test card\nlicense: MIT\nsource:\n  path: {path}\nformat: {fmt}\n{body}",
        encoding="utf-8",
    )
    return card


# ---------------------------------------------------------------- card validation


def test_missing_card_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.yaml: file not found"):
        load_card(tmp_path / "nope.yaml")


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    card = tmp_path / "card.yaml"
    card.write_text("name: x\ndescription: y\nsource: [unclosed\nformat: messages\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{card}:\d+: YAML syntax error"):
        load_card(card)


def test_unknown_key_suggests(tmp_path: Path) -> None:
    card = write_card(tmp_path, "eval:\n  fractoin: 0.2\n")
    with pytest.raises(DataError, match=rf"{card}:8: eval\.fractoin: unknown key \(did you mean 'fraction'\?\)"):
        load_card(card)


def test_unknown_format_and_field_suggest(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r":6: format: .*did you mean 'alpaca'"):
        load_card(write_card(tmp_path, fmt="alpacca"))
    with pytest.raises(DataError, match=r":7: fields: .*no field 'outptu' \(did you mean 'output'\?\)"):
        load_card(write_card(tmp_path, "fields:\n  outptu: answer\n", fmt="alpaca"))


def test_source_needs_exactly_one_of_path_or_hub(tmp_path: Path) -> None:
    card = write_card(tmp_path)
    card.write_text(card.read_text().replace("  path: data.jsonl\n", "  path: data.jsonl\n  hub: org/ds\n"))
    with pytest.raises(DataError, match="exactly one of 'path' or 'hub'"):
        load_card(card)


def test_card_remembers_its_path(tmp_path: Path) -> None:
    card = load_card(write_card(tmp_path))
    assert card.path == tmp_path / "card.yaml" and card.directory == tmp_path


# ---------------------------------------------------------------- reading and rejecting rows


def test_missing_data_file_names_resolved_path(tmp_path: Path) -> None:
    card = load_card(write_card(tmp_path, path="sub/missing.jsonl"))
    with pytest.raises(DataError, match=rf"card\.yaml:5: source\.path: {tmp_path}/sub/missing\.jsonl: file not found"):
        load_data(card)
    with pytest.raises(DataError, match="no files match"):
        load_data(load_card(write_card(tmp_path, path="'*.jsonl'")))


def test_malformed_jsonl_line_is_located(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [qa(0), qa(1), '{"messages": [', qa(3)])
    with pytest.raises(DataError, match=rf"1 malformed row.*\n  {tmp_path}/data\.jsonl:3: invalid JSON"):
        load_data(load_card(write_card(tmp_path)))


def test_missing_field_in_row(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [{"instruction": "q", "output": "a"}, {"instruction": "q2"}])
    with pytest.raises(DataError, match=r"data\.jsonl:2: missing field 'output'"):
        load_data(load_card(write_card(tmp_path, fmt="alpaca")))


def test_strict_error_lists_first_five(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [qa(0)] + ["not json"] * 7)
    with pytest.raises(DataError) as info:
        load_data(load_card(write_card(tmp_path)))
    text = str(info.value)
    assert "7 malformed row(s)" in text and "data.jsonl:6:" in text and "data.jsonl:7:" not in text
    assert "... and 2 more" in text and "on_malformed: skip" in text


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable rows"):
        load_data(load_card(write_card(tmp_path)))


def test_skip_drops_and_reports(tmp_path: Path) -> None:
    rows = [qa(0), "oops", {"messages": [{"role": "user", "content": "q"}]}, qa(3), qa(4)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    data = load_data(load_card(write_card(tmp_path, "on_malformed: skip\neval:\n  size: 1\n")))
    assert len(data.train) + len(data.eval) == 3
    assert [r.location for r in data.rejected] == [f"{tmp_path}/data.jsonl:2", f"{tmp_path}/data.jsonl:3"]
    assert "no assistant turn" in data.rejected[1].reason
    assert data.summary()["rejected"] == 2
    # strict=True overrides the card's skip.
    with pytest.raises(DataError, match="2 malformed"):
        load_data(load_card(tmp_path / "card.yaml"), strict=True)


def test_all_rows_rejected_with_skip_is_empty(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", ["bad", "worse"])
    with pytest.raises(DataError, match=r"no usable rows .*2 rejected"):
        load_data(load_card(write_card(tmp_path, "on_malformed: skip\n")))


def test_sha256_verified(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", [qa(i) for i in range(4)])
    good = sha256_file(data)
    loaded = load_data(load_card(write_card(tmp_path, f"sha256:\n  data.jsonl: {good}\n")))
    assert loaded.files == [{"path": str(data), "sha256": good}]
    with pytest.raises(DataError, match=r"data\.jsonl: sha256 mismatch"):
        load_data(load_card(write_card(tmp_path, f"sha256:\n  data.jsonl: {'ab' * 32}\n")))
    with pytest.raises(DataError, match="does not read"):
        load_data(load_card(write_card(tmp_path, f"sha256:\n  other.jsonl: {good}\n")))


# ---------------------------------------------------------------- eval split and limits


def test_eval_split_deterministic_and_order_independent(tmp_path: Path) -> None:
    rows = [qa(i) for i in range(50)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    first = load_data(load_card(write_card(tmp_path, "eval:\n  fraction: 0.1\n  seed: 3\n")))
    assert (len(first.train), len(first.eval)) == (45, 5)
    # Train keeps file order.
    train_ids = [int(r["prompt"][0]["content"].split()[1]) for r in first.train]
    assert train_ids == sorted(train_ids)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    write_jsonl(tmp_path / "data.jsonl", shuffled)
    second = load_data(load_card(tmp_path / "card.yaml"))
    assert second.eval == first.eval
    other_seed = load_data(load_card(write_card(tmp_path, "eval:\n  fraction: 0.1\n  seed: 4\n")))
    assert other_seed.eval != first.eval


def test_eval_counts(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [qa(i) for i in range(3)])
    assert len(load_data(load_card(write_card(tmp_path))).eval) == 1  # round(0.3) = 0, but at least one
    assert len(load_data(load_card(write_card(tmp_path, "eval:\n  size: 2\n"))).eval) == 2
    with pytest.raises(DataError, match="leaves no training rows"):
        load_data(load_card(write_card(tmp_path, "eval:\n  size: 3\n")))
    with pytest.raises(DataError, match="either 'fraction' or 'size'"):
        load_card(write_card(tmp_path, "eval:\n  size: 1\n  fraction: 0.5\n"))


def test_limits_and_explicit_eval_path(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [qa(i) for i in range(20)])
    write_jsonl(tmp_path / "held.jsonl", [qa(100 + i) for i in range(6)])
    card = write_card(tmp_path)
    card.write_text(card.read_text().replace("  path: data.jsonl\n", "  path: data.jsonl\n  eval_path: held.jsonl\n"))
    data = load_data(load_card(card), limit=5, eval_limit=2)
    assert [r["prompt"][0]["content"] for r in data.train] == [f"question {i}" for i in range(5)]
    assert [r["prompt"][0]["content"] for r in data.eval] == ["question 100", "question 101"]
    assert len(data.files) == 2


# ---------------------------------------------------------------- where, unknown columns, every row accounted for


def thumbs(i: int, up: object) -> dict:
    """An unpaired thumbs-up/down row: a conversation and whether its reply was liked."""
    return {**qa(i), "label": up, "rater": "r1"}


def test_unknown_columns_are_counted_and_where_keeps_only_matching_rows(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [thumbs(i, i % 3 != 0) for i in range(12)] + [qa(99)])
    data = load_data(load_card(write_card(tmp_path, "eval:\n  size: 2\n")))
    assert data.unknown_columns == {"label": 12, "rater": 12}  # messages reads none of them: SFT would imitate all
    assert (len(data.train) + len(data.eval), data.filtered) == (13, 0)

    data = load_data(load_card(write_card(tmp_path, "eval:\n  size: 2\nwhere: {label: true}\n")))
    kept = {r["completion"][0]["content"] for r in data.train + data.eval}
    assert kept == {f"answer {i}" for i in range(12) if i % 3 != 0}
    assert data.filtered == 5 and data.unknown_columns == {"rater": 12}  # a missing column never matches


@pytest.mark.parametrize(("cell", "wanted", "matches"), [
    ("true", "true", True), ("True", "true", True), ("1", "1", True), ("1.5", "1.5", True), ("up", "up", True),
    ("false", "true", False), ("yes", "true", False), ("2", "1", False),
])
def test_where_reads_csv_cells_as_text(cell: str, wanted: str, matches: bool, tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text(f"instruction,output,label\nq,a,{cell}\nq2,a2,other\n", encoding="utf-8")
    card = write_card(tmp_path, f"eval:\n  fraction: 0\nwhere: {{label: {wanted}}}\n", path="data.csv", fmt="alpaca")
    if not matches:
        with pytest.raises(DataError, match=r"no usable rows .*\(2 filtered out by `where`\)"):
            load_data(load_card(card))
        return
    assert [r["prompt"][0]["content"] for r in load_data(load_card(card)).train] == ["q"]


def test_where_tells_booleans_from_numbers(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data.jsonl", [thumbs(0, True), thumbs(1, 1), thumbs(2, "true"), thumbs(3, False)])
    card = write_card(tmp_path, "eval:\n  fraction: 0\nwhere: {label: true}\n")
    # true matches true and the text "true" (how CSV spells it), never the number 1 nor false.
    assert [r["prompt"][0]["content"] for r in load_data(load_card(card)).train] == ["question 0", "question 2"]
    with pytest.raises(DataError, match=r"where\.label"):
        load_card(write_card(tmp_path, "where: {label: [a, b]}\n"))


def test_every_row_read_is_accounted_for(tmp_path: Path) -> None:
    rows = [json.dumps(thumbs(i, True)) for i in range(10)] + ["not json"] + [json.dumps(thumbs(i, False))
                                                                             for i in range(10, 13)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    data = load_data(load_card(write_card(tmp_path, "eval:\n  size: 3\nwhere: {label: true}\non_malformed: skip\n")),
                     limit=4)
    counts = data.counts()
    assert counts["rows_read"] == 14 and (counts["train_rows"], counts["eval_rows"]) == (4, 3)
    assert counts["rows_dropped"] == {"malformed": 1, "tie": 0, "filtered": 3, "limit": 3, "too_long": 0}
    assert counts["rows_read"] == counts["train_rows"] + counts["eval_rows"] + sum(counts["rows_dropped"].values())


# ---------------------------------------------------------------- other readers and sources


def test_json_reader_locates_items(tmp_path: Path) -> None:
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q"}]
    (tmp_path / "data.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.json item 1: missing field 'output'"):
        load_data(load_card(write_card(tmp_path, path="data.json", fmt="alpaca")))
    (tmp_path / "data.json").write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(DataError, match="must hold a list"):
        load_data(load_card(tmp_path / "card.yaml"))


def test_csv_reader_with_field_mapping(tmp_path: Path) -> None:
    with open(tmp_path / "data.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["question", "answer"])
        writer.writerow(["multi\nline q", "a1"])
        writer.writerow(["q2", "a2"])
        writer.writerow(["q3"])
    card = write_card(
        tmp_path,
        "fields:\n  instruction: question\n  output: answer\non_malformed: skip\n",
        path="data.csv",
        fmt="alpaca",
    )
    data = load_data(load_card(card))
    assert len(data.train) + len(data.eval) == 2
    # The short row starts on line 5 because the first record spans two lines.
    assert [(r.location, r.reason) for r in data.rejected] == [
        (f"{tmp_path}/data.csv:5", "missing field 'answer' (mapped from 'output')")
    ]


def test_parquet_reader(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([qa(0), qa(1), {"messages": []}]), tmp_path / "data.parquet")
    data = load_data(load_card(write_card(tmp_path, "on_malformed: skip\n", path="data.parquet")))
    assert len(data.train) + len(data.eval) == 2
    assert data.rejected[0].location == f"{tmp_path}/data.parquet row 2"


def test_glob_reads_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "b.jsonl", [qa(2)])
    write_jsonl(tmp_path / "parts" / "a.jsonl", [qa(0), qa(1)])
    data = load_data(load_card(write_card(tmp_path, "eval:\n  fraction: 0\n", path="'parts/*.jsonl'")))
    assert [r["completion"][0]["content"] for r in data.train] == ["answer 0", "answer 1", "answer 2"]
    assert [Path(f["path"]).name for f in data.files] == ["a.jsonl", "b.jsonl"]


def test_hub_offline_is_a_plain_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'org/ds' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    card = tmp_path / "card.yaml"
    card.write_text("name: t\ndescription: d\nlicense: MIT\nsource:\n  hub: org/ds\nformat: messages\n")
    with pytest.raises(DataError, match=r"card\.yaml:5: hub dataset 'org/ds' could not be reached .*source\.path"):
        load_data(load_card(card))


def test_hub_rows_are_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake_load(hub: str, **kwargs: object) -> list:
        seen.update(kwargs, hub=hub)
        return [qa(0), qa(1), {"messages": "bad"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    card = tmp_path / "card.yaml"
    card.write_text(
        "name: t\ndescription: d\nlicense: MIT\nsource:\n  hub: org/ds\n  revision: abc\n  split: test\n"
        "format: messages\non_malformed: skip\n"
    )
    data = load_data(load_card(card))
    assert seen == {"hub": "org/ds", "name": None, "revision": "abc", "split": "test"}
    assert data.rejected[0].location == "org/ds[test] row 2"
    assert data.files[0]["path"] == "hub:org/ds"


# ---------------------------------------------------------------- reporting helpers


def test_token_length_percentiles_and_describe_row() -> None:
    rows = [{"n": n} for n in range(1, 101)]
    stats = token_length_percentiles(rows, lambda r: r["n"])
    assert stats == {"p50": 50, "p90": 90, "p99": 99, "max": 100, "mean": 50.5, "count": 100}
    assert token_length_percentiles([], lambda r: 0)["count"] == 0
    text = describe_row(
        {
            "prompt": [{"role": "user", "content": "hi\nthere"}],
            "completion": [{"role": "assistant", "content": "x" * 500}],
        }
    )
    assert "[user] hi\\nthere" in text and "completion:" in text and len(text) < 300
    pair = describe_row(
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        }
    )
    assert pair == "prompt:\n  [user] q\nCHOSEN:\n  [assistant] good\nREJECTED:\n  [assistant] bad"


# ---------------------------------------------------------------- shared third-party data


def test_shared_alpaca_demo(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "data" / "llamafactory" / "alpaca_en_demo.json"
    card = write_card(tmp_path, "eval:\n  size: 50\n", path=str(source), fmt="alpaca")
    data = load_data(load_card(card))
    assert data.rejected == []
    assert (len(data.train), len(data.eval)) == (949, 50)


def test_shared_messages_demo(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "data" / "llamafactory" / "sft_messages_demo.jsonl"
    data = load_data(load_card(write_card(tmp_path, path=str(source))))
    assert data.rejected == []
    assert len(data.train) + len(data.eval) == 500 and len(data.eval) == 50
    assert data.train[0]["completion"][0]["role"] == "assistant"


# ---------------------------------------------------------------- the project's own demo data


@pytest.mark.parametrize(("kind", "file", "cards"), [
    ("sft", "sft.jsonl", ("demo-sft.yaml", "tiny-sft.yaml")),
    ("story-prompts", "story-prompts.jsonl", ("tiny-story-prompts.yaml",)),
    ("chat-prompts", "chat-prompts.jsonl", ("demo-prompts.yaml",)),
])
def test_generator_reproduces_committed_demo(kind: str, file: str, cards: tuple[str, ...], tmp_path: Path) -> None:
    out = tmp_path / file
    subprocess.run(
        [sys.executable, str(REPO / "data_cards" / "generate_demo.py"), "--kind", kind, "--out", str(out)],
        check=True,
        capture_output=True,
    )
    committed = REPO / "data_cards" / "demo" / file
    assert out.read_bytes() == committed.read_bytes()
    assert committed.stat().st_size < 300_000
    for name in cards:
        card = load_card(REPO / "data_cards" / name)
        assert card.sha256 == {f"demo/{file}": sha256_file(out)}
        assert load_data(card).rejected == []


def test_demo_cards_load() -> None:
    demo = load_data(load_card(REPO / "data_cards" / "demo-sft.yaml"))
    assert (len(demo.train), len(demo.eval), demo.rejected) == (540, 60, [])
    tiny = load_data(load_card(REPO / "data_cards" / "tiny-sft.yaml"))
    assert len(tiny.eval) == 32
    prompts = [r["prompt"][-1]["content"] for r in demo.train + demo.eval]
    assert len(set(prompts)) == len(prompts)  # unique prompts: no train/eval leakage
    assert sum(r["prompt"][0]["role"] == "system" for r in demo.train + demo.eval) >= 5
