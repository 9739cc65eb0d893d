"""The `align` command line: thin commands over the library, errors mapped to exit codes in `main()` only.

Heavy libraries (torch, transformers, trl) are imported inside commands, so `align --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from align.errors import AlignError
from align.stages import STAGES, Stage

app = typer.Typer(
    name="align",
    help="Align open language models: LoRA SFT -> reward model -> DPO/PPO, each stage a versioned artifact.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
recipe_app = typer.Typer(help="Check and show recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Check and preview data cards.", no_args_is_help=True)
artifacts_app = typer.Typer(help="Browse the artifact registry.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")
app.add_typer(artifacts_app, name="artifacts")

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a recipe field: KEY.PATH=VALUE (repeatable).")
]
RegistryOpt = Annotated[
    Path | None,
    typer.Option("--registry", help="Registry root [default: $ALIGN_REGISTRY, recipe output.root, artifacts]."),
]


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    # Piped output (make, CI logs) gets 120 columns rather than rich's 80, so tables keep their numbers whole.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=None if stream.isatty() else 120)


def _registry(option: Path | None, recipe_root: str | None = None) -> Any:
    from align.artifacts import Registry

    root = option or os.environ.get("ALIGN_REGISTRY") or recipe_root or "artifacts"
    return Registry(Path(root))


CardArg = Annotated[str, typer.Argument(help="Data card YAML file, or a dataset artifact NAME@vN.", show_default=False)]


def _card(value: str, registry: Path | None = None) -> Any:
    """Load a data card named by a path or by a dataset artifact reference (`tiny-pairs@latest`)."""
    from align.data import load_card_ref

    return load_card_ref(value, _registry(registry))


def _summary_table(artifact: Any) -> Any:
    from rich.table import Table

    manifest = artifact.manifest
    table = Table(title=f"{manifest.stage} -> {artifact.ref}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("artifact", artifact.ref)
    table.add_row("path", str(artifact.path))
    table.add_row("started from", manifest.started_from)
    table.add_row("duration", f"{manifest.duration_s:.1f} s")
    for key, value in manifest.metrics.model_dump().items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


# ---- stages ------------------------------------------------------------------------------------------------


class Split(StrEnum):
    """The two splits of every data card (`--split`)."""

    train = "train"
    eval = "eval"


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of this recipe.")]


def _run_stage(stage: Stage, recipe_path: Path, overrides: list[str] | None, resume: bool,
               registry: Path | None) -> None:
    """Load the recipe, re-launch under Accelerate if asked, run the stage, print its summary."""
    from align.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [], stage=stage.name)
    if _self_launched(recipe):
        return
    console = _console(stderr=True)
    artifact = stage.run(recipe, _registry(registry, recipe.output.root), resume=resume,
                         say=lambda text: console.print(f"[yellow]{escape(text)}[/yellow]"))
    if artifact is not None:
        _console().print(_summary_table(artifact))
        _console().print(f"published {artifact.ref} -> {artifact.path}", markup=False)


def _stage_command(stage: Stage) -> Any:
    """The `align <stage> RECIPE` command of a registered stage (with --resume when the stage can resume)."""
    if stage.resumable:
        def command(recipe_path: RecipeArg, overrides: SetOpt = None, resume: ResumeOpt = False,
                    registry: RegistryOpt = None) -> None:
            _run_stage(stage, recipe_path, overrides, resume, registry)
    else:
        def command(recipe_path: RecipeArg, overrides: SetOpt = None, registry: RegistryOpt = None) -> None:
            _run_stage(stage, recipe_path, overrides, False, registry)
    command.__doc__ = stage.summary
    return command


for _stage in STAGES.values():
    app.command(_stage.name)(_stage_command(_stage))


@app.command()
def score(
    ref: Annotated[str, typer.Argument(help="Reward artifact: NAME@vN, NAME@latest, NAME or a path.",
                                       show_default=False)],
    data: Annotated[str | None, typer.Option(help="Score the rows of this data card (path or NAME@vN).")] = None,
    split: Annotated[Split, typer.Option(help="Which rows of the card (with --data).")] = Split.eval,
    prompt: Annotated[str | None, typer.Option(help="A user prompt (with --response).")] = None,
    response: Annotated[list[str] | None, typer.Option(help="A reply to score (repeatable).")] = None,
    output: Annotated[str, typer.Option("--output", help="table or jsonl.")] = "table",
    limit: Annotated[int | None, typer.Option(min=1, help="Score at most this many rows.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Score replies with a reward artifact: the rows of a data card, or --prompt with --response(s)."""
    import json

    from align.data import load_data

    if output not in ("table", "jsonl"):
        raise AlignError(f"--output must be table or jsonl, not {output!r}")
    if (data is None) == (prompt is None) or (prompt is not None and not response):
        raise AlignError("give either --data CARD, or --prompt P with one or more --response R")
    reg = _registry(registry)
    artifact = reg.resolve(ref)
    if artifact.manifest.stage != "reward":
        raise AlignError(f"{artifact.ref} is a {artifact.manifest.stage} artifact; `align score` needs a "
                         "reward artifact")
    if data is not None:
        rows = getattr(load_data(_card(data, registry)), split.value)[:limit]
    else:
        rows = [{"prompt": [{"role": "user", "content": prompt}],
                 "completion": [{"role": "assistant", "content": reply}]} for reply in response or []]

    from align import scoring
    from align.models import load_reward_model

    model, tokenizer = load_reward_model(artifact, reg)
    chat_template = artifact.manifest.adapter.chat_template
    columns = [key for key in ("chosen", "rejected", "completion") if rows and key in rows[0]]
    max_length = artifact.manifest.adapter.max_length
    scores = {key: scoring.score_replies(model, tokenizer, [(r["prompt"], r[key]) for r in rows],
                                         chat_template=chat_template, max_length=max_length) for key in columns}
    records = [{"index": i, **{key: scores[key][i] for key in columns}} for i in range(len(rows))]
    if output == "jsonl":
        for record in records:
            typer.echo(json.dumps(record))
        return
    from rich.table import Table

    table = Table(title=f"{artifact.ref} scores")
    table.add_column("#", justify="right")
    table.add_column("prompt")
    for key in columns:
        table.add_column(key, justify="right")
    for row, record in zip(rows, records, strict=True):
        text = row["prompt"][-1]["content"]
        table.add_row(str(record["index"]), text[:60], *(f"{record[key]:+.4f}" for key in columns))
    _console().print(table)
    if "chosen" in columns:
        metrics = scoring.pairwise_metrics(scores["chosen"], scores["rejected"])
        _console().print(f"accuracy {metrics['accuracy']:.3f}, mean margin {metrics['margin_mean']:+.4f} "
                         f"over {metrics['pairs']} pairs")


def _self_launched(recipe: Any) -> bool:
    """Re-run this very command under `accelerate launch` when the recipe asks for several processes."""
    from align import runtime

    if not runtime.should_self_launch(recipe.launch.num_processes):
        return False
    from align.device import detect_device

    config = recipe.relative_path(recipe.launch.accelerate_config) if recipe.launch.accelerate_config else None
    code = runtime.self_launch(sys.argv[1:], recipe.launch.num_processes, config, detect_device()["type"] == "cuda")
    if code:
        raise typer.Exit(code)
    return True


@app.command("eval")
def eval_(
    ref: Annotated[str, typer.Argument(help="Policy artifact (sft, dpo, ...): NAME@vN, NAME@latest or a path.",
                                       show_default=False)],
    data: Annotated[str, typer.Option(help="Card (path or NAME@vN) whose prompts to answer.")],
    split: Annotated[Split, typer.Option(help="Which prompts of the card: held-out ones by default.")] = Split.eval,
    limit: Annotated[int, typer.Option(min=1, help="Number of prompts.")] = 64,
    num_samples: Annotated[int, typer.Option(min=1, help="Samples per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Reply length limit.")] = 48,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature (0: greedy).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed, the same for artifact and parent.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Replies generated together.")] = 32,
    judge: Annotated[str, typer.Option(help="vader | reward:NAME@vN | module:function.")] = "vader",
    reward: Annotated[str | None, typer.Option(help="Reward artifact for reward scores and win rate.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Compare a policy with its parent on held-out prompts: judge and reward scores, KL, win rate, fluency."""
    from align.eval_result import EvalSettings
    from align.evaluate import evaluate_artifact

    reg = _registry(registry)
    card = _card(data, registry)
    settings = EvalSettings(card=data, split=split.value, limit=limit, num_samples=num_samples,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            batch_size=batch_size, judge=judge, reward=reward)
    artifact = reg.resolve(ref)
    result = evaluate_artifact(artifact, reg, settings, card.path)
    _console().print(_eval_table(result))
    _console().print(_examples_table(result))
    _console().print(f"saved {artifact.path / 'eval.json'}", markup=False)


@app.command()
def compare(
    refs: Annotated[list[str], typer.Argument(help="Policy artifacts that `align eval` has evaluated.",
                                              show_default=False)],
    registry: RegistryOpt = None,
) -> None:
    """One table of policies and their common parent from their eval.json: judge, reward, KL, length, fluency."""
    from rich.table import Table

    from align.eval_result import EVAL_FILE, EvalResult
    from align.report.comparison import COMPARISON_HEADERS, comparison_rows

    reg = _registry(registry)
    evals = []
    for artifact in map(reg.resolve, refs):
        result = EvalResult.of(artifact.path)
        if result is None:
            raise AlignError(f"{artifact.ref} has no {EVAL_FILE}; run `align eval {artifact.ref} --data CARD` first")
        evals.append((artifact, result))
    # One column per model (the report's rows turned on their side), so the table fits a terminal.
    rows = comparison_rows(evals)
    table = Table(title="evaluations against their parents (± standard errors clustered by prompt)")
    table.add_column(COMPARISON_HEADERS[0])
    for row in rows:
        table.add_column(escape(row.model + (" (parent)" if row.is_parent else "")), justify="right",
                         style="dim" if row.is_parent else None)
    for index, header in enumerate(COMPARISON_HEADERS[1:], start=1):
        table.add_row(header, *(escape(row.cells[index]) for row in rows))
    _console().print(table)
    for artifact, result in evals:
        if result.kl_note:
            _console().print(f"{artifact.ref}: KL {result.kl_note}", markup=False)
    settings = {result.settings.model_copy(update={"reward": None}) for _, result in evals}
    if len({result.parent for _, result in evals}) > 1 or len(settings) > 1:
        _console().print("[yellow]note: these evaluations differ in parent or settings; compare with care[/yellow]")


def _examples_table(result: Any) -> Any:
    from rich.table import Table

    table = Table(title="samples (first sample of the first prompts)", show_lines=True)
    for column in ("prompt", "parent", "artifact"):
        table.add_column(column, overflow="fold")
    for example in result.examples[:4]:
        table.add_row(escape(example.prompt), escape(f"{example.parent}  [{example.judge_parent:+.2f}]"),
                      escape(f"{example.artifact}  [{example.judge_artifact:+.2f}]"))
    return table


def _eval_table(result: Any) -> Any:
    from rich.table import Table

    from align.report.comparison import eval_summary_rows

    settings = result.settings
    table = Table(title=f"{result.artifact} vs its parent {result.parent}: {result.prompts} prompts x "
                        f"{settings.num_samples} samples (seed {settings.seed}, temperature {settings.temperature}); "
                        "± is a standard error clustered by prompt")
    for column in ("metric", "parent", "artifact", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in eval_summary_rows(result):
        table.add_row(escape(row.metric), row.parent, row.artifact, row.change)
    if result.kl_note:
        table.caption = escape(f"KL {result.kl_note}")
    return table


@app.command()
def report(
    refs: Annotated[list[str] | None, typer.Argument(help="Artifacts to include (NAME@vN, NAME@latest, NAME); "
                                                          "default: the latest version of every name.")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write.")] = Path("report.html"),
    registry: RegistryOpt = None,
) -> None:
    """One self-contained HTML file: curves, lineage, metrics, reward-KL frontier and samples of artifacts."""
    from align.report import write_report

    path = write_report(_registry(registry), refs or [], out)
    _console().print(f"wrote {path}")


@app.command()
def export(
    ref: Annotated[str, typer.Argument(help="Artifact: NAME@vN, NAME@latest, NAME or a path.", show_default=False)],
    merge: Annotated[Path, typer.Option("--merge", help="Directory to write the merged Hugging Face model into.",
                                        show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """A plain Hugging Face model directory with every adapter of the chain merged (reward: sequence classifier)."""
    from align.export import export_merged

    reg = _registry(registry)
    path = export_merged(reg.resolve(ref), reg, merge, force=force)
    _console().print(f"exported {reg.resolve(ref).ref} -> {path}")


# ---- recipe ------------------------------------------------------------------------------------------------


@recipe_app.command("validate")
def recipe_validate(recipe_path: RecipeArg, overrides: SetOpt = None, registry: RegistryOpt = None) -> None:
    """Check a recipe: schema, unknown keys, and that its data card and model/artifact references exist."""
    from align.data import load_card, resolve_card
    from align.models import resolve_starting_point
    from align.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    reg = _registry(registry, recipe.output.root)
    card = load_card(resolve_card(recipe.data.card, recipe.path.parent, reg)[0])
    resolve_starting_point(recipe, reg)
    _console().print(f"{recipe_path}: ok ({recipe.stage} -> {recipe.name}, data card {card.name})")


@recipe_app.command("show")
def recipe_show(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    resolved: Annotated[bool, typer.Option("--resolved", help="Also resolve device-aware defaults here.")] = False,
) -> None:
    """Print the recipe with every default filled in (as the manifest will record it)."""
    import yaml

    from align.device import detect_device, resolve_device_defaults
    from align.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    if resolved:
        recipe = resolve_device_defaults(recipe, detect_device())
    typer.echo(yaml.safe_dump(recipe.to_dict(), sort_keys=False).rstrip())


@recipe_app.command("deps")
def recipe_deps(
    recipe_path: RecipeArg,
    target: Annotated[str, typer.Option(help="The make target these files are prerequisites of.")],
    overrides: SetOpt = None,
) -> None:
    """Print a Makefile rule: TARGET depends on the recipe, its data card and the card's files (as `gcc -MD`
    does for headers), so `make pipeline` re-runs a stage when one of them changes. Artifact references
    (`from: NAME@latest`, `card: NAME@vN`) are upstream stages, which the Makefile orders itself."""
    from align.dependencies import make_rule, recipe_inputs
    from align.recipe import load_recipe

    typer.echo(make_rule(target, recipe_inputs(load_recipe(recipe_path, overrides or []))))


# ---- data --------------------------------------------------------------------------------------------------


@data_app.command("validate")
def data_validate(
    card_path: CardArg,
    tokenizer: Annotated[str | None, typer.Option(help="Model (dir, hub id, .gguf) for token-length stats.")] = None,
    chat_template: Annotated[str, typer.Option(help="auto | default | none, as in a recipe.")] = "auto",
    registry: RegistryOpt = None,
) -> None:
    """Load every row of a card: counts, rejected rows with their line, token-length percentiles."""
    from rich.table import Table

    from align.data import load_data, token_length_percentiles
    from align.errors import DataError

    card = _card(card_path, registry)
    data = load_data(card, strict=False)
    console = _console()
    summary = data.summary()
    console.print(f"{card_path}: {card.name} ({card.format}): {len(data.train)} train, {len(data.eval)} eval rows, "
                  f"{len(data.rejected)} rejected")
    for file in summary.get("files", []):
        console.print(f"  {file['path']}  sha256 {file['sha256'][:16]}...")
    for rejected in data.rejected[:20]:
        console.print(f"  [red]rejected[/red] {rejected.location}: {rejected.reason}")
    if len(data.rejected) > 20:
        console.print(f"  ... and {len(data.rejected) - 20} more")
    if tokenizer:
        count = _token_counter(tokenizer, chat_template)
        table = Table(title="token lengths (prompt + reply)")
        stats = {split: token_length_percentiles(rows, count) for split, rows in
                 (("train", data.train), ("eval", data.eval)) if rows}
        keys = list(next(iter(stats.values())))
        table.add_column("split")
        for key in keys:
            table.add_column(str(key), justify="right")
        for split, values in stats.items():
            table.add_row(split, *(f"{values[k]:.0f}" for k in keys))
        console.print(table)
    if data.rejected and card.on_malformed == "error":
        raise DataError(f"{card_path}: {len(data.rejected)} malformed row(s); fix them or set on_malformed: skip")


def _token_counter(tokenizer_spec: str, chat_template: str) -> Any:
    """Tokens of prompt + reply exactly as the trainers see them."""
    from align.models import load_tokenizer, resolve_base
    from align.scoring import reward_input_ids

    tokenizer = load_tokenizer(resolve_base(tokenizer_spec, Path.cwd()), chat_template)

    def count(row: dict[str, Any]) -> int:
        return len(reward_input_ids(tokenizer, row["prompt"], row.get("completion") or row.get("chosen") or [],
                                    chat_template))

    return count


@data_app.command("preview")
def data_preview(
    card_path: CardArg,
    rows: Annotated[int, typer.Option("-n", "--rows", min=1, help="How many rows to show.")] = 3,
    split: Annotated[Split, typer.Option(help="Which rows of the card.")] = Split.train,
    registry: RegistryOpt = None,
) -> None:
    """Show a few rows as the trainer will see them (after format conversion)."""
    from align.data import describe_row, load_data

    data = load_data(_card(card_path, registry))
    console = _console()
    for index, row in enumerate(getattr(data, split.value)[:rows]):
        console.rule(f"{split.value} row {index}")
        console.print(describe_row(row), markup=False)


# ---- artifacts ---------------------------------------------------------------------------------------------


@artifacts_app.command("list")
def artifacts_list(
    name: Annotated[str | None, typer.Argument(help="Only this artifact name.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Every published version: stage, creation time, parents, headline metric."""
    from rich.table import Table

    reg = _registry(registry)
    table = Table(title=f"artifacts in {reg.root}")
    for column in ("ref", "stage", "created", "from", "data"):
        table.add_column(column)
    for artifact in reg.list(name):
        manifest = artifact.manifest
        parent = ", ".join(p.ref for p in manifest.parents) or manifest.base_model.spec
        data = ", ".join(d.name for d in manifest.data)
        table.add_row(artifact.ref, manifest.stage, manifest.created[:19], parent, data)
    _console().print(table)


@artifacts_app.command("show")
def artifacts_show(
    ref: Annotated[str, typer.Argument(help="NAME@vN, NAME@latest, NAME or a path.", show_default=False)],
    registry: RegistryOpt = None,
) -> None:
    """Print an artifact's manifest."""
    artifact = _registry(registry).resolve(ref)
    typer.echo(artifact.manifest.to_json().rstrip())


@artifacts_app.command("lineage")
def artifacts_lineage(
    ref: Annotated[str, typer.Argument(help="NAME@vN, NAME@latest, NAME or a path.", show_default=False)],
    registry: RegistryOpt = None,
) -> None:
    """The parent chain down to the base model, with data cards at every step."""
    from rich.tree import Tree

    def grow(branch: Any, node: Any) -> Any:
        for parent in node.parents:
            grow(branch.add(_lineage_label(parent)), parent)
        return branch

    root = _registry(registry).lineage(ref)
    _console().print(grow(Tree(_lineage_label(root)), root))


def _lineage_label(node: Any) -> str:
    if node.missing:
        return escape(f"{node.ref} (missing)")
    role = f"{node.role}: " if node.role else ""
    data = f" data={','.join(node.data)}" if node.data else ""
    return escape(f"{role}{node.ref} [{node.stage}] base={node.base_model}{data}")  # "[sft]" is not markup


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors exit 2 with one message, interrupts 143/130, bugs 1 with a traceback."""
    import click

    # Typer 0.29 vendors its own copy of click: usage errors and aborts come from either, depending on the version.
    aborts = (click.exceptions.Abort, typer.Abort)
    usage_errors = (click.exceptions.ClickException, typer.TyperException)
    try:
        code = app(args=argv, standalone_mode=False)
    except AlignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except aborts:
        sys.exit(130)
    except usage_errors as exc:
        exc.show()
        sys.exit(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted; nothing was published", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
