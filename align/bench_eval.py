"""`align bench-eval`: standard benchmarks through lm-evaluation-harness, the artifact against its parent.

The harness is lm-eval's own (`simple_evaluate` over its tasks), not a home-made one: align only hands it a model.
As in `align eval`, both models are one object — base + chain merged in memory, the artifact's adapter attached —
wrapped once in lm-eval's `HFLM`; the parent is the same model under `disable_adapter()`. Nothing is exported.

Everything a user can get wrong is refused before any weights load: a reward or dataset artifact, lm-eval not
installed, a task name lm-eval does not know (with close matches), and a task whose data cannot be loaded —
a hub dataset offline above all. Tasks are built (which loads their data) before the model for that reason.
A task YAML from `--include-path` is loaded with its own directory as the working directory, so relative
`dataset_kwargs.data_files` name files beside the YAML, wherever align is run from; its `process_docs` runs with
the `datasets` cache off (`transforms_recomputed`), so an edit to it shows in the next run.

Results go beside `eval.json` as `bench_eval.json` (`BenchResult`), written through `Registry.add_file` so
`align artifacts verify` checks it. Each task's entry records how it was measured (lm-eval version, limit,
few-shot, precision, batch size) and on what: hashes of the task's config as lm-eval ran it and of the documents
it evaluated, so two scores of one task name are comparable only when both match. A later run replaces the tasks
it ran and keeps the others.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

from pydantic import ConfigDict, Field

from align import models
from align.device import detect_device, resolve_precision
from align.errors import AlignError, ArtifactError, DataError
from align.hashing import canonical_json
from align.records import Record, Strict
from align.stages import stages_producing

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry

BENCH_FILE = "bench_eval.json"
INSTALL_HINT = "pip install 'align[lm-eval]'"
# Keys of an lm-eval results entry that describe the task rather than measure it.
_NOT_METRICS = frozenset({"name", "alias", "sample_len", " ", ""})
# lm-eval's repr of a function it could not serialise (`<function f at 0x7f...>`): the address differs per process.
_FUNCTION_REPR = re.compile(r"<function (\S+) at 0x[0-9a-fA-F]+>")


class BenchError(AlignError):
    """A benchmark run that cannot start: lm-eval missing, an unknown task, a task whose data cannot load."""


# ---- the record ----------------------------------------------------------------------------------------------


class BenchSettings(Strict):
    """What `align bench-eval` was asked for (`precision` as asked; each task records the resolved one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: tuple[str, ...] = Field(min_length=1)
    limit: int | None = Field(None, gt=0)
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(8, gt=0)
    include_path: tuple[str, ...] = ()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    confirm_run_unsafe_code: bool = False  # tasks lm-eval marks `unsafe_code` (they execute model-written code)


class BenchMetric(Strict):
    """One metric of one model: lm-eval's value and standard error (null where lm-eval reports none)."""

    value: float | None
    stderr: float | None


class BenchTask(Strict):
    """One lm-eval task (or group) measured on the artifact and on its parent, with how it was measured."""

    lm_eval_version: str
    task_version: str | None  # the task config's own `metadata.version`, as lm-eval reports it
    source: str | None  # the task's YAML file; null for a group's aggregate
    config_sha256: str | None  # the task's config as lm-eval ran it (`config_sha256`); null for a group's aggregate
    docs_sha256: str | None  # the documents evaluated (`docs_sha256`); null for a group's aggregate
    samples: int | None  # documents evaluated after --limit; null for a group's aggregate
    limit: int | None
    num_fewshot: int | None
    precision: Literal["fp32", "bf16", "fp16"]
    batch_size: int
    higher_is_better: dict[str, bool]
    artifact: dict[str, BenchMetric]
    parent: dict[str, BenchMetric]


class BenchResult(Record):
    """`bench_eval.json`: every benchmark task run on an artifact, by lm-eval task name."""

    SCHEMA_VERSION: ClassVar[int] = 1

    schema_version: int
    artifact: str
    parent: str
    tasks: dict[str, BenchTask]

    @classmethod
    def of(cls, artifact_dir: Path) -> BenchResult | None:
        """The benchmark results stored in an artifact directory, None when none were run."""
        path = Path(artifact_dir) / BENCH_FILE
        return cls.read(path) if path.is_file() else None


def merged(earlier: BenchResult | None, later: BenchResult) -> BenchResult:
    """`later`'s tasks over `earlier`'s: a task run again replaces its entry, the others stay."""
    if earlier is None:
        return later
    return later.model_copy(update={"tasks": {**earlier.tasks, **later.tasks}})


# ---- lm-eval's results as metrics ------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A finite float from lm-eval's numbers (numpy scalars included); None for 'N/A' and the like."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metric_name(metric: str, filter_name: str) -> str:
    """`acc` for lm-eval's `acc,none`; `exact_match (strip)` for `exact_match,strip` (a filtered answer)."""
    return metric if filter_name == "none" else f"{metric} ({filter_name})"


def metrics_of(entry: dict[str, Any]) -> dict[str, BenchMetric]:
    """The metrics of one `results[task]` entry of lm-eval: `METRIC,FILTER` keys with their `METRIC_stderr,FILTER`."""
    values: dict[str, float | None] = {}
    stderrs: dict[str, float | None] = {}
    for key, value in entry.items():
        if key in _NOT_METRICS or "," not in key:
            continue
        metric, filter_name = key.split(",", 1)
        if metric.endswith("_stderr"):
            stderrs[metric_name(metric.removesuffix("_stderr"), filter_name)] = _number(value)
        elif isinstance(value, int | float) or _number(value) is not None:
            values[metric_name(metric, filter_name)] = _number(value)
    return {name: BenchMetric(value=value, stderr=stderrs.get(name)) for name, value in values.items()}


def config_sha256(config: dict[str, Any]) -> str:
    """SHA-256 of a task's config as lm-eval reports having run it (the YAML's fields with lm-eval's defaults filled
    in, `process_docs` and the like as their source code, the shot count used). Where the YAML lives is left out
    (`metadata.config_source`, recorded as `source`), and so are the addresses in the reprs of functions lm-eval
    could not serialise: one task run the same way hashes the same in any process and from any directory."""
    metadata = {key: value for key, value in (config.get("metadata") or {}).items() if key != "config_source"}
    text = _FUNCTION_REPR.sub(r"<function \1>", canonical_json({**config, "metadata": metadata}))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def docs_sha256(task: Any, limit: int | None) -> str:
    """SHA-256 of the documents lm-eval evaluates for `task` (its eval split after `process_docs`, the first
    `limit` of them as lm-eval takes them), one canonical JSON line each: the data a score was measured on, which
    the config's hash cannot show when the data files change under an unchanged YAML."""
    digest = hashlib.sha256()
    for _, document in task.doc_iterator(limit=limit):
        digest.update(canonical_json(document).encode("utf-8") + b"\n")
    return digest.hexdigest()


def higher_is_better(results: dict[str, Any], task: str, metrics: Sequence[str]) -> dict[str, bool]:
    """Whether a higher value is better, per metric of `metrics` lm-eval says so for (filters share the metric's)."""
    known = results.get("higher_is_better", {}).get(task) or {}
    return {name: bool(known[base]) for name in metrics
            if (base := name.split(" (", 1)[0]) in known and known[base] is not None}


# ---- tasks -----------------------------------------------------------------------------------------------------


def require_lm_eval() -> str:
    """lm-eval's version; a BenchError naming the extra to install when it is missing."""
    try:
        import lm_eval
    except ImportError:
        raise BenchError(f"`align bench-eval` runs lm-evaluation-harness, which is not installed: "
                         f"{INSTALL_HINT} (make setup installs it)") from None
    return str(getattr(lm_eval, "__version__", "unknown"))


@functools.cache
def task_manager(include_path: tuple[str, ...], defaults: bool) -> Any:
    """lm-eval's TaskManager over `include_path` (and its built-in tasks with `defaults`). Cached per process:
    indexing the ~15k built-in task YAMLs takes seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def check_include_path(include_path: Sequence[str]) -> tuple[str, ...]:
    """Each --include-path as an absolute directory; a BenchError naming one that is not a directory."""
    found = []
    for entry in include_path:
        path = Path(entry).expanduser()
        if not path.is_dir():
            raise BenchError(f"--include-path {entry}: not a directory of lm-eval task YAML files")
        found.append(str(path.resolve()))
    return tuple(found)


def unknown_task_message(unknown: Sequence[str], known: Sequence[str]) -> str:
    """One line per unknown name with lm-eval's closest names (tasks, groups and tags)."""
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean: {', '.join(close)}?)" if close else " (no close match)"))
    return (f"unknown lm-eval task {'; '.join(parts)}. `lm-eval ls tasks` lists lm-eval's tasks; a local task "
            "needs --include-path DIR (the directory of its YAML)")


def task_manager_for(names: Sequence[str], include_path: tuple[str, ...]) -> Any:
    """The TaskManager that knows `names`: the include path's alone when every name is there (no need to index
    lm-eval's built-in tasks), else built-ins and include path. Unknown names: one BenchError listing them."""
    if include_path:
        local = task_manager(include_path, False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = task_manager(include_path, True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise BenchError(unknown_task_message(unknown, manager.all_tasks))
    return manager


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def load_failure(name: str, entry: Any, exc: Exception) -> str:
    """Why task `name` could not be built, naming the task and where its data was to come from."""
    config = getattr(entry, "cfg", None) or {}
    data = config.get("dataset_path")
    where = f" (dataset_path {data})" if data else ""
    if _offline() and (isinstance(exc, ConnectionError) or "offline" in str(exc).lower()):
        return (f"task {name!r}: its data{where} is on the Hugging Face hub, which is unreachable offline "
                "(HF_HUB_OFFLINE is set): run it once online to cache the data, or use a task whose data is local "
                "(--include-path DIR, a task YAML with dataset_path: json and dataset_kwargs.data_files)")
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return f"task {name!r}: cannot load its data{where}: {type(exc).__name__}{': ' + reason if reason else ''}"


@contextlib.contextmanager
def transforms_recomputed() -> Iterator[None]:
    """The `datasets` cache off for the `map`/`filter` calls of the tasks' `process_docs` (their raw data still
    loads from its cache). `datasets` keys a cached transform by the pickled function, and a function of an
    importable module (lm-eval's `!function`) pickles as its name, not its code: after an edit to `process_docs`
    the cache would hand back the old documents, silently. Recomputing costs a pass over each task's split."""
    import datasets

    was_enabled = datasets.is_caching_enabled()
    datasets.disable_caching()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_caching()


@contextlib.contextmanager
def _in_directory_of(entry: Any) -> Iterator[None]:
    """The working directory of a task's YAML while its data loads, so relative data_files resolve beside it."""
    yaml_path = getattr(entry, "yaml_path", None)
    if yaml_path is None:
        yield
        return
    with contextlib.chdir(Path(yaml_path).parent):
        yield


def requested_objects(name: str, loaded: dict[str, Any]) -> list[Any]:
    """What lm-eval built for the name `name` (a task, a group with its members, or a tag's tasks), as the
    objects to hand to `simple_evaluate`: a group whole, so lm-eval reports its aggregate too."""
    if name in loaded["groups"]:
        return [loaded["groups"][name]]
    if name in loaded["tasks"]:
        return [loaded["tasks"][name]]
    return list(loaded["tasks"].values())


class LoadedTasks(NamedTuple):
    """What `load_tasks` built: the TaskManager, the objects to evaluate (tasks and whole groups) and every leaf
    task by name (a group's members included), whose documents `docs_sha256` hashes."""

    manager: Any
    objects: list[Any]
    leaves: dict[str, Any]


def load_tasks(names: Sequence[str], include_path: tuple[str, ...]) -> LoadedTasks:
    """lm-eval's tasks and groups for `names`, their data loaded — before any model, so an unknown name or data
    that cannot load (a hub dataset offline) is one BenchError naming every such task. The objects are built once
    and evaluated twice (artifact, parent): lm-eval rebuilds its requests on every run."""
    manager = task_manager_for(names, include_path)
    built: list[Any] = []
    leaves: dict[str, Any] = {}
    failures = []
    for name in names:
        entry = manager.task_index.get(name)
        try:
            with _in_directory_of(entry), _quiet(("lm_eval.api.task",), "Custom kwargs can be passed to `--metadata`"):
                loaded = manager.load([name])
        except Exception as exc:  # lm-eval and datasets raise many kinds; each becomes a message naming the task
            failures.append(load_failure(name, entry, exc))
            continue
        built += requested_objects(name, loaded)
        leaves |= loaded["tasks"]
    if failures:
        raise BenchError("; ".join(failures))
    return LoadedTasks(manager, built, leaves)


def check_unsafe(leaves: dict[str, Any], confirmed: bool) -> None:
    """A BenchError naming the tasks that execute model-written code (lm-eval's `unsafe_code`) unless the user
    confirmed it: lm-eval itself would refuse only after the weights had loaded."""
    unsafe = sorted(name for name, task in leaves.items() if getattr(task, "UNSAFE_CODE", False))
    if unsafe and not confirmed:
        raise BenchError(f"task {', '.join(map(repr, unsafe))} runs the code the model writes (lm-eval marks it "
                         "unsafe_code): add --confirm-run-unsafe-code to run it, ideally in a sandbox")


# ---- running -------------------------------------------------------------------------------------------------


class _Quiet(logging.Filter):
    """Drops lm-eval's log lines that contain one of `fragments`: notes addressed to users of lm-eval's own CLI
    that say nothing to a user of align (HFLM's that a model object, not a hub id, was passed, which is how align
    uses it; a custom dataset's hint at lm-eval's --metadata option)."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(fragment in text for fragment in self.fragments)


@contextlib.contextmanager
def _quiet(logger_names: Sequence[str], *fragments: str) -> Iterator[None]:
    quiet = _Quiet(*fragments)
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _TruncationCount(logging.Filter):
    """Counts, and drops, HFLM's warning for each request whose context it cut from the left to fit the model
    (one line per request: thousands on a long task); `run_both` reports the count once."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Combined length of context"):
            self.count += 1
            return False
        return True


@contextlib.contextmanager
def _truncations_counted() -> Iterator[_TruncationCount]:
    counter = _TruncationCount()
    logger = logging.getLogger("lm_eval.models.huggingface")
    logger.addFilter(counter)
    try:
        yield counter
    finally:
        logger.removeFilter(counter)


def wrap_model(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM around the in-memory model (a PeftModel whose adapter can be switched off) and tokenizer."""
    from lm_eval.models.huggingface import HFLM

    with _quiet(("lm_eval.models.huggingface", "lm_eval.api.model"), "kwarg is not of type `str`",
                "already-initialized model"):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@contextlib.contextmanager
def _without_git_probe() -> Iterator[None]:
    """lm-eval records the git commit of the working directory by running `git describe`, whose "fatal: not a git
    repository" reaches the terminal wherever align runs outside a checkout. align keeps no such hash (the manifest
    has the artifact's provenance), so the probe answers None while lm-eval runs."""
    from lm_eval import evaluator

    probe = getattr(evaluator, "get_git_commit_hash", None)
    if probe is None:  # another lm-eval layout: leave it alone
        yield
        return
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = probe


def run_tasks(lm: Any, manager: Any, tasks: list[Any], settings: BenchSettings) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `lm` on the built tasks (lm-eval's default seeds and bootstrap)."""
    from lm_eval import simple_evaluate

    try:
        with _without_git_probe():
            results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager,
                                      num_fewshot=settings.num_fewshot, limit=settings.limit, log_samples=False,
                                      confirm_run_unsafe_code=settings.confirm_run_unsafe_code)
    except AssertionError:
        # lm-eval left-truncates a context to fit but asserts that a choice (continuation) fits by itself.
        if _raised_in(sys.exc_info()[2]) != "_loglikelihood_tokens":
            raise
        raise DataError(f"{', '.join(settings.tasks)}: a choice is longer than the model's context "
                        f"({lm.max_length} tokens); leave such documents out in the task's process_docs") from None
    if results is None:  # only a non-zero rank gets None; align runs lm-eval in one process
        raise RuntimeError("lm-eval returned no results")
    return results


def _raised_in(trace: Any) -> str | None:
    """The name of the function an exception was raised in (the innermost frame of its traceback)."""
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    return trace.tb_frame.f_code.co_name if trace is not None else None


def task_entries(artifact_run: dict[str, Any], parent_run: dict[str, Any], leaves: dict[str, Any],
                 settings: BenchSettings, precision: str, version: str) -> dict[str, BenchTask]:
    """Both runs' results as one BenchTask per task (and group) lm-eval reported; `leaves` are the tasks by name
    (a group's aggregate has no config or documents of its own)."""
    entries = {}
    for name, entry in artifact_run["results"].items():
        artifact_metrics = metrics_of(entry)
        config = artifact_run.get("configs", {}).get(name) or {}
        leaf = leaves.get(name)
        samples = (artifact_run.get("n-samples", {}).get(name) or {}).get("effective")
        version_of = artifact_run.get("versions", {}).get(name)
        source = (config.get("metadata") or {}).get("config_source")
        entries[name] = BenchTask(
            lm_eval_version=version, task_version=None if version_of is None else str(version_of),
            source=source if isinstance(source, str) else None, config_sha256=config_sha256(config) if config else None,
            docs_sha256=docs_sha256(leaf, settings.limit) if leaf is not None else None, samples=samples,
            limit=settings.limit, num_fewshot=config.get("num_fewshot", settings.num_fewshot),
            precision=precision,  # type: ignore[arg-type]
            batch_size=settings.batch_size, higher_is_better=higher_is_better(artifact_run, name, artifact_metrics),
            artifact=artifact_metrics, parent=metrics_of(parent_run["results"].get(name, {})))
    return entries


def bench_precision(requested: str, artifact: Artifact, device: dict[str, Any]) -> str:
    """`--precision` made concrete by the one rule stages and eval use (`device.resolve_precision`)."""
    base = models.BaseModelSpec.from_manifest(artifact.manifest.base_model)
    return resolve_precision(requested, device, "align bench-eval --precision", models.hidden_size(base))


def check_policy(artifact: Artifact) -> None:
    if artifact.manifest.stage not in stages_producing("policy"):
        raise ArtifactError(f"{artifact.ref} is a {artifact.manifest.stage} artifact; `align bench-eval` runs "
                            f"benchmarks on a policy ({', '.join(stages_producing('policy'))}) and its parent")


def bench_artifact(artifact: Artifact, registry: Registry, settings: BenchSettings) -> BenchResult:
    """Run `settings.tasks` on the artifact and on its parent (adapter off), store them in `bench_eval.json`
    (merged with the tasks run before) and return this run's tasks. Every refusal comes before the weights."""
    check_policy(artifact)
    registry.check_can_add(artifact)  # the results go beside the artifact: refuse a read-only one first
    device = detect_device()
    precision = bench_precision(settings.precision, artifact, device)
    earlier = BenchResult.of(artifact.path)  # a damaged earlier file is refused now, not after the run
    include_path = check_include_path(settings.include_path)
    version = require_lm_eval()
    with transforms_recomputed():  # lm-eval runs a task's process_docs whenever it asks for the documents
        tasks = load_tasks(settings.tasks, include_path)
        check_unsafe(tasks.leaves, settings.confirm_run_unsafe_code)
        artifact_run, parent_run = run_both(artifact, registry, tasks, settings, precision, device["type"])
        entries = task_entries(artifact_run, parent_run, tasks.leaves, settings, precision, version)
    result = BenchResult(schema_version=BenchResult.SCHEMA_VERSION, artifact=artifact.ref,
                         parent=artifact.manifest.started_from, tasks=entries)
    # Recorded, so `align artifacts verify` checks it.
    registry.add_file(artifact, BENCH_FILE, merged(earlier, result).to_json())
    return result


def run_both(artifact: Artifact, registry: Registry, tasks: LoadedTasks, settings: BenchSettings, precision: str,
             on: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval's results of the artifact and of its parent, from one model loaded as `align eval` loads it (base
    and chain merged in memory, the artifact's adapter on top) and run again with the adapter off."""
    model, tokenizer = models.load_artifact_model(artifact, registry, dtype=models.weight_dtype(precision, on))
    if on == "cuda":
        model = model.to("cuda")
    lm = wrap_model(model, tokenizer, settings.batch_size)
    with models.compute_precision(precision, on), _truncations_counted() as truncated:
        artifact_run = run_tasks(lm, tasks.manager, tasks.objects, settings)
        with model.disable_adapter():
            parent_run = run_tasks(lm, tasks.manager, tasks.objects, settings)
    if truncated.count:
        logging.getLogger(__name__).warning(
            "note: lm-eval cut the context of %d requests (artifact and parent together) from the left to fit the "
            "model's %d tokens; those documents were scored on the end of their context", truncated.count,
            lm.max_length)
    return artifact_run, parent_run
