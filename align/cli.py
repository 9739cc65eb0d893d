"""The `align` command line: thin commands over the library, errors mapped to exit codes in `main()` only.

Heavy libraries (torch, transformers, trl) are imported inside commands, so `align --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from align import console as show
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


def _registry(option: Path | None, recipe_root: str | None = None) -> Any:
    from align.artifacts import Registry

    root = option or os.environ.get("ALIGN_REGISTRY") or recipe_root or "artifacts"
    return Registry(Path(root))


CardArg = Annotated[str, typer.Argument(help="Data card YAML file, or a dataset artifact NAME@vN.", show_default=False)]


def _card(value: str, registry: Path | None = None) -> Any:
    """Load a data card named by a path or by a dataset artifact reference (`tiny-pairs@latest`)."""
    from align.data import load_card_ref

    return load_card_ref(value, _registry(registry))


# ---- stages ------------------------------------------------------------------------------------------------


class Split(StrEnum):
    """The two splits of every data card (`--split`)."""

    train = "train"
    eval = "eval"


ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of this recipe.")]
ProcessesOpt = Annotated[int | None, typer.Option(
    "--num-processes", min=1, help="Same as --set launch.num_processes=N (all machines together).")]
PresetOpt = Annotated[str | None, typer.Option(
    "--preset", help="Same as --set launch.preset=NAME: ddp, fsdp2, zero2, zero3, zero3-offload.")]


def _launch_overrides(num_processes: int | None, preset: str | None) -> list[str]:
    """--num-processes/--preset as the recipe overrides they stand for (recorded in the manifest like --set)."""
    return ([f"launch.num_processes={num_processes}"] if num_processes is not None else []) + (
        [f"launch.preset={preset}"] if preset is not None else [])


def _run_stage(stage: Stage, recipe_path: Path, overrides: list[str] | None, resume: bool,
               registry: Path | None) -> None:
    """Load the recipe, re-launch under Accelerate if asked, run the stage, print its summary."""
    from align import launch, runtime
    from align.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [], stage=stage.name)
    code = launch.launch_if_asked(recipe, stage, sys.argv[1:])
    if code is not None:  # the launched processes ran the stage
        raise typer.Exit(code)
    notes = show.console(stderr=True)
    reg = _registry(registry, recipe.output.root)
    reg.check_writable(recipe.name)  # a registry it cannot publish into is refused before any model loads
    # SIGTERM/SIGINT anywhere in the run (loading, training, evaluating, publishing) -> exit 143, nothing published.
    with runtime.interruptible(resume_hint=stage.resumable):
        artifact = stage.run(recipe, reg, resume=resume,
                             say=lambda text: notes.print(f"[yellow]{escape(text)}[/yellow]"))
        if artifact is not None:
            show.console().print(show.summary_table(artifact))
            show.console().print(f"published {artifact.ref} -> {artifact.path}", markup=False)


def _stage_command(stage: Stage) -> Any:
    """The `align <stage> RECIPE` command of a registered stage (with --resume when the stage can resume)."""
    if stage.resumable:
        def command(recipe_path: RecipeArg, overrides: SetOpt = None, resume: ResumeOpt = False,
                    registry: RegistryOpt = None, num_processes: ProcessesOpt = None,
                    preset: PresetOpt = None) -> None:
            _run_stage(stage, recipe_path, [*(overrides or []), *_launch_overrides(num_processes, preset)],
                       resume, registry)
    else:
        def command(recipe_path: RecipeArg, overrides: SetOpt = None, registry: RegistryOpt = None,
                    num_processes: ProcessesOpt = None, preset: PresetOpt = None) -> None:
            _run_stage(stage, recipe_path, [*(overrides or []), *_launch_overrides(num_processes, preset)],
                       False, registry)
    command.__doc__ = stage.summary
    return command


for _stage in STAGES.values():
    app.command(_stage.name)(_stage_command(_stage))


class Output(StrEnum):
    """How `align score` prints its scores."""

    table = "table"
    jsonl = "jsonl"


@app.command()
def score(
    ref: Annotated[str, typer.Argument(help="Reward artifact: NAME@vN, NAME@latest, NAME or a path.",
                                       show_default=False)],
    data: Annotated[str | None, typer.Option(help="Score the rows of this data card (path or NAME@vN).")] = None,
    split: Annotated[Split, typer.Option(help="Which rows of the card (with --data).")] = Split.eval,
    prompt: Annotated[str | None, typer.Option(help="A user prompt (with --response).")] = None,
    response: Annotated[list[str] | None, typer.Option(help="A reply to score (repeatable).")] = None,
    output: Annotated[Output, typer.Option("--output", help="A table, or one JSON record per row.")] = Output.table,
    limit: Annotated[int | None, typer.Option(min=1, help="Score at most this many rows.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Score replies with a reward artifact: the rows of a data card, or --prompt with --response(s)."""
    import json

    from align.data import load_data
    from align.rewards import RewardModel, score_rows

    if (data is None) == (prompt is None) or (prompt is not None and not response):
        raise AlignError("give either --data CARD, or --prompt P with one or more --response R")
    reg = _registry(registry)
    reward = RewardModel.of(reg.resolve(ref), "`align score`")
    if data is not None:
        rows = getattr(load_data(_card(data, registry)), split.value)[:limit]
    else:
        rows = [{"prompt": [{"role": "user", "content": prompt}],
                 "completion": [{"role": "assistant", "content": reply}]} for reply in response or []]
    result = score_rows(reward.load(reg), rows)
    if output == Output.jsonl:
        for record in result.records():
            typer.echo(json.dumps(record))
        return
    show.console().print(show.scores_table(reward.source, rows, result))


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
    precision: Annotated[Literal["auto", "fp32", "bf16", "fp16"], typer.Option(
        help="Compute precision of sampling and scoring; auto: bf16 autocast where the CPU has bf16 units and the "
             "model is large enough to gain, bf16 (else fp16) on GPUs, fp32 otherwise.")] = "auto",
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache", help="Reuse the parent's samples from the registry's sample cache (ROOT/.cache/samples) "
                                   "when an earlier eval drew them with the same parent weights, prompts and "
                                   "settings; --no-cache samples the parent again and leaves the cache alone.")] = True,
    registry: RegistryOpt = None,
    num_processes: Annotated[int | None, typer.Option(
        "--num-processes", min=1, help="Share the prompts among N processes (DDP ranks under accelerate launch); "
                                       "rank 0 joins the results.")] = None,
) -> None:
    """Compare a policy with its parent on held-out prompts: judge and reward scores, KL, win rate, fluency."""
    from align import launch
    from align.eval_result import EvalSettings
    from align.evaluate import evaluate_artifact

    reg = _registry(registry)
    card = _card(data, registry)
    settings = EvalSettings(card=data, split=split.value, limit=limit, num_samples=num_samples,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            batch_size=batch_size, judge=judge, reward=reward, precision=precision)
    artifact = reg.resolve(ref)
    reg.check_can_add(artifact)  # eval.json goes beside the artifact: refuse a read-only one before sampling
    code = launch.launch_processes_if_asked(num_processes, sys.argv[1:])
    if code is not None:  # the launched ranks ran the evaluation
        raise typer.Exit(code)
    result = evaluate_artifact(artifact, reg, settings, card.path, cache=cache)
    if result is None:  # a rank other than 0 under `accelerate launch`: rank 0 reports
        return
    show.console().print(show.eval_table(result))
    show.console().print(show.examples_table(result))
    if result.parent_samples_cached:
        show.console().print(f"the parent's samples came from the sample cache ({result.parent_samples_key[:12]}...)",
                             markup=False)
    show.console().print(f"saved {artifact.path / 'eval.json'} (precision {result.settings.precision})", markup=False)


@app.command("bench-eval")
def bench_eval(
    ref: Annotated[str, typer.Argument(help="Policy artifact (sft, dpo, ...): NAME@vN, NAME@latest or a path.",
                                       show_default=False)],
    tasks: Annotated[str, typer.Option(help="lm-eval task names, comma-separated (tasks, groups or tags).",
                                       show_default=False)],
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many documents per task.")] = None,
    num_fewshot: Annotated[int | None, typer.Option(
        min=0, help="Few-shot examples per prompt [default: each task's own].")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Requests per forward pass.")] = 8,
    include_path: Annotated[list[Path] | None, typer.Option(
        "--include-path", help="A directory of lm-eval task YAML files (repeatable); relative data_files in a "
                               "YAML name files beside it.")] = None,
    precision: Annotated[Literal["auto", "fp32", "bf16", "fp16"], typer.Option(
        help="Compute precision, by the rule of `align eval --precision`.")] = "auto",
    confirm_run_unsafe_code: Annotated[bool, typer.Option(
        "--confirm-run-unsafe-code", help="Run tasks that execute the code the model writes (lm-eval's "
                                          "unsafe_code, e.g. HumanEval).")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Standard benchmarks (lm-evaluation-harness) on a policy and its parent; results saved in bench_eval.json."""
    from align.bench_eval import BENCH_FILE, BenchSettings, bench_artifact

    names = tuple(dict.fromkeys(name.strip() for name in tasks.split(",") if name.strip()))
    if not names:
        raise AlignError("--tasks: name at least one lm-eval task, e.g. --tasks hellaswag,arc_easy")
    settings = BenchSettings(tasks=names, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                             include_path=tuple(str(path) for path in include_path or []), precision=precision,
                             confirm_run_unsafe_code=confirm_run_unsafe_code)
    reg = _registry(registry)
    artifact = reg.resolve(ref)
    result = bench_artifact(artifact, reg, settings)
    show.console().print(_bench_table([(artifact, result)]))
    show.console().print(f"saved {artifact.path / BENCH_FILE} (tasks run before are kept there)", markup=False)


def _bench_table(benches: list[tuple[Any, Any]]) -> Any:
    """The benchmark rows (`report.comparison.bench_rows`) as a terminal table."""
    from rich.table import Table

    from align.report.comparison import BENCH_HEADERS, bench_rows

    rows = bench_rows(benches)
    table = Table(title="lm-eval benchmarks against the parent (± lm-eval's standard errors)")
    shown = [index for index, header in enumerate(BENCH_HEADERS) if header not in ("vs parent", "setup")]
    for index in shown:  # the parent and the setup go below the table: the rows stay one line wide
        table.add_column(BENCH_HEADERS[index], justify="right" if index > 3 else "left")
    for row in rows:
        table.add_row(*(escape(row.cells[index]) for index in shown))
    parents = dict.fromkeys(f"{row.model} vs its parent {row.parent}" for row in rows)
    setups = dict.fromkeys(f"{row.task}: {row.setup}" for row in rows)
    table.caption = escape("\n".join(["; ".join(parents), *setups]))  # one line per task: how it was measured
    return table


@app.command()
def compare(
    refs: Annotated[list[str], typer.Argument(help="Policy artifacts that `align eval` or `align bench-eval` has "
                                                   "evaluated.", show_default=False)],
    registry: RegistryOpt = None,
) -> None:
    """One table of policies and their common parent from their eval.json: judge, reward, KL, length, fluency;
    and one of their lm-eval benchmarks (bench_eval.json): task, metric, parent, artifact, change."""
    from align.bench_eval import BENCH_FILE, BenchResult
    from align.eval_result import EVAL_FILE, EvalResult

    reg = _registry(registry)
    evals, benches = [], []
    for artifact in map(reg.resolve, refs):
        result, bench = EvalResult.of(artifact.path), BenchResult.of(artifact.path)
        if result is None and bench is None:
            raise AlignError(f"{artifact.ref} has no {EVAL_FILE} or {BENCH_FILE}; run `align eval {artifact.ref} "
                             f"--data CARD` or `align bench-eval {artifact.ref} --tasks TASKS` first")
        if result is not None:
            evals.append((artifact, result))
        if bench is not None:
            benches.append((artifact, bench))
    if benches:
        from align.report.comparison import bench_differences

        show.console().print(_bench_table(benches))
        if differing := bench_differences(benches):
            show.console().print(f"[yellow]note: {', '.join(differing)} measured differently across these artifacts "
                                 "(config, documents or settings; see the caption); compare with care[/yellow]")
    if not evals:
        return
    show.console().print(show.comparison_table(evals))
    for artifact, result in evals:
        if result.kl_note:
            show.console().print(f"{artifact.ref}: KL {result.kl_note}", markup=False)
    settings = {result.settings.model_copy(update={"reward": None}) for _, result in evals}
    if len({result.parent for _, result in evals}) > 1 or len(settings) > 1:
        show.console().print("[yellow]note: these evaluations differ in parent or settings; compare with care[/yellow]")


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
    show.console().print(f"wrote {path}")


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
    show.console().print(f"exported {reg.resolve(ref).ref} -> {path}")


@app.command()
def chat(
    ref: Annotated[str, typer.Argument(help="Policy artifact (sft, dpo, ...): NAME@vN, NAME@latest or a path.",
                                       show_default=False)],
    prompt: Annotated[str | None, typer.Option(help="Send this one message, print the reply and exit.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (/system changes it in a session).")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0: greedy).")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: the most likely tokens up to this share.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Reply length limit.")] = 256,
    seed: Annotated[int, typer.Option(help="Sampling seed of the first reply (reply n uses seed + n).")] = 0,
    precision: Annotated[Literal["auto", "fp32", "bf16", "fp16"], typer.Option(
        help="Compute precision, resolved as `align eval --precision` is.")] = "auto",
    registry: RegistryOpt = None,
) -> None:
    """Talk to a policy artifact in the terminal: streamed replies, /reset, /system, /params, /help, /quit, Ctrl-D."""
    from align import chat as chatting

    params = chatting.params_from_options(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                          seed=seed)
    reg = _registry(registry)
    artifact = chatting.policy_artifact(reg, ref)  # a reward/dataset artifact is refused before any weights
    show.console(stderr=True).print(f"loading {artifact.ref} ...", markup=False)
    session, model = chatting.open_session(artifact, reg, precision=precision, system=system, params=params)
    if prompt is not None:
        chatting.one_turn(session, prompt, chatting.terminal_write)
    else:
        chatting.terminal_session(session, model)


# ---- recipe ------------------------------------------------------------------------------------------------


@recipe_app.command("validate")
def recipe_validate(recipe_path: RecipeArg, overrides: SetOpt = None, registry: RegistryOpt = None) -> None:
    """Check a recipe: schema, unknown keys, its launch, and that its data card and model/artifact references
    exist."""
    from align import launch
    from align.data import load_card, resolve_card
    from align.device import detect_device
    from align.models import check_lora_targets, resolve_starting_point
    from align.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    launch.check(recipe, STAGES[recipe.stage], on_gpu=detect_device()["type"] == "cuda")
    reg = _registry(registry, recipe.output.root)
    card = load_card(resolve_card(recipe.data.card, recipe.path.parent, reg)[0])
    start = resolve_starting_point(recipe, reg)
    _check_scorers(recipe, reg)
    if STAGES[recipe.stage].task_type is not None:
        from align.training import check_model_options

        check_model_options(recipe, start, detect_device())  # quantisation, attention kernel, Liger
        check_lora_targets(start.base, recipe.lora, STAGES[recipe.stage].task_type, str(recipe.path))
    show.console().print(f"{recipe_path}: ok ({recipe.stage} -> {recipe.name}, data card {card.name})")


def _check_scorers(recipe: Any, reg: Any) -> None:
    """The stage section's judge, reward function and reward model resolve and import, without any weights."""
    from align.judges import JudgeError, check_judge
    from align.rewards import recipe_reward_model

    section = getattr(recipe, recipe.stage, None)
    for field in ("judge", "reward_function"):
        spec = getattr(section, field, None)
        if spec is not None:
            try:
                check_judge(spec, reg, recipe.path.parent)
            except JudgeError as exc:
                raise JudgeError(f"{recipe.path}: {recipe.stage}.{field}: {exc}") from None
    if getattr(section, "reward_model", None) is not None:
        recipe_reward_model(recipe, reg)


@recipe_app.command("show")
def recipe_show(
    recipe_path: RecipeArg,
    overrides: SetOpt = None,
    resolved: Annotated[bool, typer.Option("--resolved", help="Also resolve device-aware defaults here.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """Print the recipe with every default filled in (as the manifest will record it)."""
    import yaml

    from align import models
    from align.device import detect_device, resolve_device_defaults
    from align.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    if resolved:  # the precision `auto` picks depends on the model's size: read its config (never its weights)
        start = models.resolve_starting_point(recipe, _registry(registry, recipe.output.root))
        recipe = resolve_device_defaults(recipe, detect_device(), models.hidden_size(start.base))
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
    card_path: Annotated[str | None, typer.Argument(
        help="Data card YAML file, or a dataset artifact NAME@vN [default: the --recipe's data.card].",
        show_default=False)] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Model (dir, hub id, .gguf) for token-length stats.")] = None,
    chat_template: Annotated[str, typer.Option(help="auto | default | none, as in a recipe.")] = "auto",
    max_length: Annotated[int | None, typer.Option(
        min=1, help="With --tokenizer: what each stage reading this card drops and cuts at this train.max_length.")
    ] = None,
    recipe_path: Annotated[Path | None, typer.Option(
        "--recipe", help="Check the card as this recipe's stage reads it: data.limit, the starting model's "
                         "tokenizer, chat template and train.max_length; exit 2 where the stage would refuse.")
    ] = None,
    overrides: SetOpt = None,
    registry: RegistryOpt = None,
) -> None:
    """Load every row of a card: counts, rejected and dropped rows with their line, columns no field reads,
    token-length percentiles, and what the trainers drop at a max_length."""
    from align.data import load_data
    from align.data.report import validation_report
    from align.errors import DataError

    if recipe_path is None and card_path is None:
        raise AlignError("name a data card, or a recipe with --recipe")
    if recipe_path is not None and (tokenizer or max_length or chat_template != "auto"):
        raise AlignError("--recipe takes the tokenizer, chat template and max_length from the recipe; drop "
                         "--tokenizer/--chat-template/--max-length (change the recipe with --set instead)")
    if recipe_path is None and (overrides or (max_length and not tokenizer)):
        raise AlignError("--set needs --recipe, and --max-length needs --tokenizer MODEL")
    if recipe_path is not None:
        recipe, card, tokenizer_obj = _recipe_view(recipe_path, overrides, card_path, registry)
        chat_template, max_length = recipe.model.chat_template, recipe.train.max_length
        data = load_data(card, limit=recipe.data.limit, eval_limit=recipe.data.eval_limit, strict=False)
    else:
        from align.models import load_tokenizer, resolve_base

        recipe, card = None, _card(card_path, registry)  # type: ignore[arg-type]
        data = load_data(card, strict=False)
        tokenizer_obj = load_tokenizer(resolve_base(tokenizer, Path.cwd()), chat_template) if tokenizer else None
    out = show.console()
    out.print(show.card_summary(card_path or str(card.path), card, data))
    lines, refusal = validation_report(data, tokenizer_obj, chat_template, max_length, recipe)
    for line in lines:
        out.print(line, markup=False)
    if data.rejected and card.on_malformed == "error":
        raise DataError(f"{card.path}: {len(data.rejected)} malformed row(s); fix them or set on_malformed: skip")
    if refusal is not None:
        raise refusal


def _recipe_view(recipe_path: Path, overrides: list[str] | None, card_path: str | None,
                 registry: Path | None) -> tuple[Any, Any, Any]:
    """`data validate --recipe`: the recipe, the card it reads (or CARD), and its starting model's tokenizer (with
    the recipe's chat template), as the stage gets them; no weights."""
    from align.data import get_format, load_card, resolve_card
    from align.data.formats import KIND_CONVERSIONS
    from align.errors import DataError
    from align.models import load_tokenizer, resolve_starting_point
    from align.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides or [])
    reg = _registry(registry, recipe.output.root)
    card = _card(card_path, registry) if card_path else load_card(
        resolve_card(recipe.data.card, recipe.path.parent, reg)[0])
    kind, reads = get_format(card.format).kind, STAGES[recipe.stage].reads
    if kind != reads and (kind, reads) not in KIND_CONVERSIONS:
        raise DataError(f"{card.path}: format '{card.format}' is not what `align {recipe.stage}` reads "
                        f"({STAGES[recipe.stage].reads} rows)")
    start = resolve_starting_point(recipe, reg)
    tokenizer = load_tokenizer(start.base, recipe.model.chat_template,
                               saved_in=start.parent.path if start.parent else None)
    return recipe, card, tokenizer


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
    out = show.console()
    for index, row in enumerate(getattr(data, split.value)[:rows]):
        out.rule(f"{split.value} row {index}")
        out.print(describe_row(row), markup=False)


# ---- artifacts ---------------------------------------------------------------------------------------------


@artifacts_app.command("list")
def artifacts_list(
    name: Annotated[str | None, typer.Argument(help="Only this artifact name.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Every published version: stage, creation time, parents, headline metric."""
    reg = _registry(registry)
    show.console().print(show.artifacts_table(f"artifacts in {reg.root}", reg.list(name)))


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
    show.console().print(show.lineage_tree(_registry(registry).lineage(ref)))


@artifacts_app.command("verify")
def artifacts_verify(
    refs: Annotated[list[str] | None, typer.Argument(help="NAME@vN, NAME@latest, NAME (every version) or a path; "
                                                          "default: every artifact.", show_default=False)] = None,
    registry: RegistryOpt = None,
) -> None:
    """Re-hash every file recorded at publish (and added since, like eval.json): one line per problem, exit 2 if any."""
    from align.integrity import verify_version

    reg = _registry(registry)
    checks = [verify_version(path, ref) for ref, path in reg.verify_targets(refs or [])]
    if not checks:
        typer.echo(f"no artifacts in {reg.root}")
    for check in checks:
        for line in check.lines():
            typer.echo(line)
    damaged = [check for check in checks if check.damaged]
    if damaged:
        problems = sum(len(check.damaged) for check in damaged)
        raise AlignError(f"{problems} damaged file(s) in {len(damaged)} of {len(checks)} artifact version(s): "
                         f"{', '.join(check.ref for check in damaged)}")


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
