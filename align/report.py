"""`align report`: one self-contained HTML page about artifacts: lineage, metrics, curves, reward-KL frontier, samples.

Everything is inline (CSS, images as base64 `data:image/png` URIs) so the file can be mailed or archived and opened
offline. Plots use matplotlib's Agg canvas directly (no pyplot, no display); matplotlib is imported inside the
plotting functions so that importing this module, and `align --help`, stay fast.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from align.errors import AlignError, ArtifactError

if TYPE_CHECKING:
    from align.artifacts import Artifact, LineageNode, Registry

EVAL_FILE = "eval.json"
LOG_FILE = "log_history.json"

# Keys in TRL's log_history that are bookkeeping, not curves worth a panel.
_SKIP_KEYS = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second"}
_SKIP_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_preparation_time")

# Panel order and how a log key joins a panel: a substring of the key, or (for short, ambiguous words like
# "kl", "lr", "len", "ratio") a whole `_`/`/`-separated token of it. First match wins, so the narrow groups
# (accuracies inside `rewards/accuracies`, KL inside `objective/kl`) come before the broad ones.
_GROUPS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("accuracies / win rates", ("accurac", "win_rate"), ("acc",)),
    ("margins", ("margin",), ()),
    ("fractions", ("clipfrac", "frac_", "fraction"), ("ratio", "frac")),
    ("KL", (), ("kl",)),
    ("losses", ("loss",), ()),
    ("rewards / scores", ("reward", "score", "advantage"), ()),
    ("lengths", ("length",), ("len",)),
    ("log-probs", ("logps", "logprob"), ()),
    ("logits", ("logits",), ()),
    ("learning rate", ("learning_rate",), ("lr",)),
    ("grad norm", ("grad_norm",), ()),
    ("entropy", ("entropy",), ()),
    ("throughput", ("per_second",), ()),
    ("tokens seen", ("num_tokens",), ()),
)
_OTHER = "other"

_STAGE_COLOURS = {"base": "#e0e0e0", "sft": "#cfe2ff", "pairs": "#fff3bf", "reward": "#ffd8a8",
                  "dpo": "#c3fae8", "ppo": "#d3f9d8", "grpo": "#e5dbff", "rloo": "#fcc2d7"}
_ROLE_COLOURS = {"base": "#868e96", "model": "#343a40", "data": "#1c7ed6", "reward": "#e8590c"}


# ---- entry point ---------------------------------------------------------------------------------------------


def write_report(registry: Registry, refs: list[str], out: str | Path) -> Path:
    """Render the report for `refs` (empty: the latest version of every name) and write it atomically to `out`."""
    out = Path(out).expanduser().absolute()
    _check_writable(out)  # before the plotting work, so a typo in --out fails at once
    artifacts = select_artifacts(registry, refs)
    document = render_report(registry, artifacts)
    _write_atomic(out, document)
    return out


def select_artifacts(registry: Registry, refs: list[str]) -> list[Artifact]:
    """Resolve `refs` (unknown ones raise the registry's ArtifactError), or take the latest of every name."""
    if refs:
        chosen = [registry.resolve(ref) for ref in refs]
    else:
        names = registry.names()
        if not names:
            raise ArtifactError(f"the registry at {registry.root} has no artifacts yet: run a stage first "
                                "(e.g. `align sft RECIPE`) or point --registry / $ALIGN_REGISTRY at another one")
        chosen = [registry.resolve(name) for name in names]
    unique: dict[Path, Artifact] = {}
    for artifact in chosen:  # `tiny-sft` and `tiny-sft@latest` are one artifact: show it once
        unique.setdefault(artifact.path, artifact)
    return list(unique.values())


def _check_writable(out: Path) -> None:
    """Fail early and clearly when `out` cannot be written (a directory, a missing or read-only parent)."""
    if out.is_dir():
        raise AlignError(f"cannot write the report to {out}: it is a directory; give a file name such as "
                         f"{out / 'report.html'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AlignError(f"cannot write the report to {out}: cannot create {out.parent}: "
                         f"{exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise AlignError(f"cannot write the report to {out}: directory {out.parent} is not writable")


def _write_atomic(out: Path, text: str) -> None:
    """Temp file in the same directory + os.replace: a reader never sees half a report."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AlignError(f"cannot write the report to {out}: {exc.strerror or exc}") from None


# ---- reading artifacts ---------------------------------------------------------------------------------------


def load_json_file(path: Path) -> Any:
    """JSON content of `path`, or None when it is absent or unreadable (a report shows what it can)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def load_eval(artifact: Artifact) -> dict[str, Any] | None:
    """The artifact's `eval.json` (from `align eval`) when present and shaped like one."""
    data = load_json_file(artifact.path / EVAL_FILE)
    if isinstance(data, dict) and isinstance(data.get("policy"), dict) and isinstance(data.get("parent_model"), dict):
        return data
    return None


def _number(value: Any) -> float | None:
    """A finite float from an int/float/numeric string; None for bools, text, NaN and inf."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def _skipped_key(key: str) -> bool:
    return key in _SKIP_KEYS or key.endswith(_SKIP_SUFFIXES)


def curve_series(log_history: Any) -> dict[str, list[tuple[float, float]]]:
    """`{key: [(step, value), ...]}` for every numeric key of a log history; the final summary entry is left out."""
    series: dict[str, list[tuple[float, float]]] = {}
    if not isinstance(log_history, list):
        return series
    for index, entry in enumerate(log_history):
        # TRL ends with one summary entry (train_runtime, train_loss, ...): totals, not points on a curve.
        if not isinstance(entry, dict) or "train_runtime" in entry:
            continue
        step = _number(entry.get("step"))
        x = step if step is not None else float(index)
        for key, value in entry.items():
            number = _number(value)
            if number is not None and isinstance(key, str) and not _skipped_key(key):
                series.setdefault(key, []).append((x, number))
    return series


def curve_group(key: str) -> str:
    """The panel a log key belongs to, by name (`eval_` keys join their training counterparts)."""
    name = key.lower().removeprefix("eval_").removeprefix("eval/")
    tokens = set(re.split(r"[^a-z0-9]+", name))
    for group, substrings, words in _GROUPS:
        if any(part in name for part in substrings) or tokens & set(words):
            return group
    return _OTHER


def group_curves(series: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Series grouped into panels, in the fixed panel order, `other` last."""
    grouped: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for key, points in series.items():
        grouped.setdefault(curve_group(key), {})[key] = points
    order = [group[0] for group in _GROUPS] + [_OTHER]
    return {name: grouped[name] for name in order if name in grouped}


# ---- lineage graph -------------------------------------------------------------------------------------------


@dataclass
class GraphNode:
    """One box of the lineage drawing: a base model or an artifact (maybe missing from the registry)."""

    key: str
    label: str
    stage: str
    data: tuple[str, ...] = ()
    included: bool = False
    missing: bool = False
    parents: list[tuple[str, str]] = field(default_factory=list)  # (parent key, role)


def lineage_graph(registry: Registry, artifacts: list[Artifact]) -> dict[str, GraphNode]:
    """Union of the lineages of `artifacts`, rooted at base-model nodes, as `{key: GraphNode}`."""
    included = {artifact.ref for artifact in artifacts}
    nodes: dict[str, GraphNode] = {}
    for artifact in artifacts:
        walk = _lineage_walk(registry, artifact)
        stack: list[LineageNode] = []
        for node in walk:
            while stack and stack[-1].depth >= node.depth:
                stack.pop()
            graph_node = nodes.setdefault(node.ref, GraphNode(
                key=node.ref, label=node.ref, stage=node.stage or "?", data=node.data, missing=node.missing))
            graph_node.included = graph_node.included or node.ref in included
            if stack:  # the walk goes child -> parent, so the stack top is the child of this node
                child = nodes[stack[-1].ref]
                edge = (node.ref, node.role or "model")
                if edge not in child.parents:
                    child.parents.append(edge)
            stack.append(node)
    _attach_base_models(nodes, registry)
    return nodes


def _lineage_walk(registry: Registry, artifact: Artifact) -> list[LineageNode]:
    """`registry.lineage` by ref when the ref names this very directory, else by path (an artifact elsewhere)."""
    try:
        if registry.resolve(artifact.ref).path == artifact.path:
            return registry.lineage(artifact.ref)
    except AlignError:
        pass
    return registry.lineage(str(artifact.path))


def _attach_base_models(nodes: dict[str, GraphNode], registry: Registry) -> None:
    """Give every artifact with no parent artifact an edge from its base model, drawn as its own box."""
    for node in list(nodes.values()):
        if node.parents or node.missing or node.stage == "base":
            continue
        try:
            manifest = registry.resolve(node.key).manifest
        except AlignError:
            continue
        base = manifest.get("base_model")
        spec = base.get("spec") if isinstance(base, dict) else base
        if isinstance(spec, str) and spec:
            key = f"base:{spec}"
            nodes.setdefault(key, GraphNode(key=key, label=spec, stage="base"))
            node.parents.append((key, "base"))


def graph_levels(nodes: dict[str, GraphNode]) -> dict[str, int]:
    """Column of each node: 0 for roots, else one more than its deepest parent (cycles are cut)."""
    levels: dict[str, int] = {}

    def level(key: str, seen: frozenset[str]) -> int:
        if key in levels:
            return levels[key]
        parents = [p for p, _ in nodes[key].parents if p in nodes and p not in seen]
        value = 1 + max((level(p, seen | {key}) for p in parents), default=-1)
        levels[key] = value
        return value

    for key in nodes:
        level(key, frozenset())
    # A parent missing from the registry has no parents itself; put it next to its child, not in column 0,
    # so its arrow does not cross the whole drawing.
    for key, node in nodes.items():
        if not node.parents and node.stage != "base":
            children = [levels[k] for k, n in nodes.items() if any(p == key for p, _ in n.parents)]
            if children:
                levels[key] = max(min(children) - 1, 0)
    return levels


def graph_positions(nodes: dict[str, GraphNode]) -> dict[str, tuple[float, float]]:
    """(column, row) of every node; rows follow the mean row of the parents, which keeps arrows short."""
    levels = graph_levels(nodes)
    positions: dict[str, tuple[float, float]] = {}
    for column in range(max(levels.values(), default=-1) + 1):
        keys = [k for k in nodes if levels[k] == column]

        def order(key: str, column: int = column) -> tuple[float, str]:
            rows = [positions[p][1] for p, _ in nodes[key].parents if p in positions and positions[p][0] < column]
            return (sum(rows) / len(rows) if rows else 0.0, key)

        for row, key in enumerate(sorted(keys, key=order)):
            positions[key] = (float(column), float(row))
    return positions


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _clip_left(text: str, width: int) -> str:
    """Keep the end of `text`: for a model path the last components name the model."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _node_text(node: GraphNode) -> str:
    if node.stage == "base":
        return f"base model\n{_clip_left(node.label, 30)}"
    if node.missing:
        return f"{_clip(node.label, 30)}\n(missing)"
    data = f"\ndata: {_clip(', '.join(node.data), 24)}" if node.data else ""
    return f"{_clip(node.label, 30)}\n[{node.stage}]{data}"


def plot_lineage(nodes: dict[str, GraphNode]) -> bytes:
    """Boxes (coloured by stage) laid out left to right by depth, arrows coloured by the parent's role."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    positions = graph_positions(nodes)
    columns = int(max(x for x, _ in positions.values())) + 1
    rows = int(max(y for _, y in positions.values())) + 1
    box_w, box_h = 0.8, 0.7
    fig = Figure(figsize=(max(2.8 * columns, 6.0), 1.15 * rows + 1.3), dpi=110)
    ax = fig.add_subplot()
    for key, node in nodes.items():
        x, y = positions[key]
        edge = "#c92a2a" if node.missing else "#212529"
        ax.add_patch(FancyBboxPatch(
            (x - box_w / 2, -y - box_h / 2), box_w, box_h, boxstyle="round,pad=0.02,rounding_size=0.06",
            facecolor="white" if node.missing else _STAGE_COLOURS.get(node.stage, "#f1f3f5"), edgecolor=edge,
            linewidth=2.0 if node.included else 0.8, linestyle="--" if node.missing else "-", zorder=2))
        ax.text(x, -y, _node_text(node), ha="center", va="center", fontsize=8, linespacing=1.35,
                fontweight="bold" if node.included else "normal", zorder=3)
    for key, node in nodes.items():
        x, y = positions[key]
        for parent, role in node.parents:
            px, py = positions[parent]
            ax.add_patch(FancyArrowPatch(
                (px + box_w / 2, -py), (x - box_w / 2, -y), arrowstyle="-|>", mutation_scale=11,
                color=_ROLE_COLOURS.get(role, "#495057"), linewidth=1.2, shrinkA=1, shrinkB=1, zorder=1,
                # Arrows go behind the (opaque) boxes; bending long ones keeps them apart from short ones.
                connectionstyle="arc3,rad=0.0" if py == y and x - px <= 1 else f"arc3,rad={-0.1 * (x - px):.2f}"))
    roles = sorted({role for node in nodes.values() for _, role in node.parents})
    handles = [Line2D([], [], color=_ROLE_COLOURS.get(r, "#495057"), label=f"{r} parent") for r in roles]
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles),
                  fontsize=8, frameon=False)
    ax.set_xlim(-0.5, columns - 0.5)
    ax.set_ylim(-rows + 0.5, 0.85)  # headroom above row 0 for the bent arrows of long edges
    ax.axis("off")
    return _png(fig)


def render_lineage_list(registry: Registry, artifacts: list[Artifact]) -> str:
    """The lineage as nested `<ul>` (one tree per artifact that no other included artifact descends from)."""
    walks = {artifact.ref: _lineage_walk(registry, artifact) for artifact in artifacts}
    ancestors = {node.ref for walk in walks.values() for node in walk[1:]}
    trees = [_lineage_tree(walk) for ref, walk in walks.items() if ref not in ancestors]
    return '<div class="lineage-list">' + "".join(trees) + "</div>"


def _lineage_tree(walk: list[LineageNode]) -> str:
    """Nested list of one depth-first lineage walk; children are the parents the artifact was built from."""
    parts: list[str] = []
    depth = -1
    for node in walk:
        if node.depth > depth:
            parts.append("<ul>" * (node.depth - depth))
        else:
            parts.append("</li>" + "</ul></li>" * (depth - node.depth))
        parts.append(f"<li>{_lineage_label(node)}")
        depth = node.depth
    parts.append("</li>" + "</ul></li>" * depth + "</ul>")
    return "".join(parts)


def _lineage_label(node: LineageNode) -> str:
    role = f'<span class="role">{_e(node.role)}:</span> ' if node.role else ""
    if node.missing:
        return f"{role}<code>{_e(node.ref)}</code> <em>(missing from the registry)</em>"
    data = f" · data: {_e(', '.join(node.data))}" if node.data else ""
    # Every artifact of a chain shares the base model: name it once, at the top of each tree.
    base = f" · base: <code>{_e(node.base_model)}</code>" if node.base_model and node.depth == 0 else ""
    return f"{role}<code>{_e(node.ref)}</code> [{_e(node.stage)}]{base}{data}"


# ---- per-artifact sections -----------------------------------------------------------------------------------


def plot_curves(grouped: dict[str, dict[str, list[tuple[float, float]]]], title: str) -> bytes:
    """One subplot per panel group, x = step; eval series dashed so they read as the held-out counterpart."""
    from matplotlib.figure import Figure

    count = len(grouped)
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.4 * cols, 3.1 * rows + 0.4), dpi=100, layout="constrained")
    fig.suptitle(title, fontsize=11)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (group, series) in zip(axes, grouped.items(), strict=False):
        for key, points in sorted(series.items()):
            xs, ys = zip(*points, strict=True)
            style = "--" if key.startswith("eval") else "-"
            ax.plot(xs, ys, style, marker="o" if len(points) <= 12 else None, markersize=3, linewidth=1.3,
                    label=_clip(key, 34))
        ax.set_title(group, fontsize=9.5)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best", ncol=2 if len(series) > 6 else 1)
    for ax in axes[count:]:
        ax.set_visible(False)
    return _png(fig)


def render_artifact(artifact: Artifact) -> str:
    """One artifact's section: what it is, its metrics table and its training curves."""
    manifest = artifact.manifest
    parts = [f'<section class="artifact" id="{_anchor(artifact.ref)}">',
             f"<h3><code>{_e(artifact.ref)}</code> <span class=\"stage\">{_e(manifest.get('stage', '?'))}</span></h3>",
             _metrics_table(artifact)]
    grouped = group_curves(curve_series(load_json_file(artifact.path / LOG_FILE)))
    if grouped:
        png = plot_curves(grouped, f"{artifact.ref} training curves")
        parts.append(_img(png, f"training curves of {artifact.ref}: {', '.join(grouped)}"))
    else:
        why = "a dataset artifact" if manifest.get("stage") == "pairs" else f"no numeric entries in {LOG_FILE}"
        parts.append(f'<p class="note">No training curves ({_e(why)}).</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _metrics_table(artifact: Artifact) -> str:
    """Key facts of the manifest, then its metrics, as a two-column table."""
    manifest = artifact.manifest
    recipe = manifest.get("recipe") if isinstance(manifest.get("recipe"), dict) else {}
    parents = manifest.get("parents") if isinstance(manifest.get("parents"), list) else []
    facts: list[tuple[str, Any]] = [
        ("path", str(artifact.path)),
        ("created", manifest.get("created")),
        ("parents", ", ".join(f"{p.get('role', '?')}: {p.get('ref', '?')}" for p in parents if isinstance(p, dict))),
        ("base model", _base_spec(manifest.get("base_model"))),
        ("data cards", ", ".join(_card_names(manifest.get("data")))),
        ("recipe", " · ".join(str(v) for v in (recipe.get("name"), manifest.get("recipe_path")) if v)),
        ("duration", f"{manifest['duration_s']:.1f} s" if _number(manifest.get("duration_s")) is not None else None),
        ("device", _device_text(manifest.get("device"))),
    ]
    metrics = manifest.get("metrics") if isinstance(manifest.get("metrics"), dict) else {}
    rows = [f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts if v not in (None, "")]
    rows += [f'<tr class="metric"><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>' for k, v in metrics.items()]
    return f'<table class="kv">{"".join(rows)}</table>'


def _base_spec(value: Any) -> str | None:
    return value.get("spec") if isinstance(value, dict) else value if isinstance(value, str) else None


def _card_names(value: Any) -> list[str]:
    items = value if isinstance(value, list) else []
    return [str(item.get("name")) for item in items if isinstance(item, dict) and item.get("name")]


def _device_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items() if v not in (None, "", [], {}))
    return None if value is None else str(value)


# ---- evaluation: frontier, comparison, samples ---------------------------------------------------------------


@dataclass(frozen=True)
class FrontierPoint:
    """One evaluated policy in one frontier panel: its rise over its parent at its KL to that parent."""

    ref: str
    stage: str
    kl: float  # nats per sequence
    kl_stderr: float | None
    rise: float  # policy minus parent, in the panel's score
    rise_stderr: float | None
    parent: str
    parent_score: float | None  # the parent's own score (the rise is measured from it)
    label: str  # the stage's KL coefficient from the recipe, e.g. "β=0.1"; else the ref


# Where each stage keeps its KL coefficient, and how a point is labelled with it.
_KL_COEFFICIENTS = {"ppo": ("kl_coef", "kl_coef"), "grpo": ("beta", "β"), "rloo": ("beta", "β"),
                    "dpo": ("beta", "β")}
_FRONTIER_STAGE_ORDER = ("sft", "dpo", "ppo", "grpo", "rloo")


def frontier_series(evals: list[tuple[Artifact, dict[str, Any]]]) -> dict[str, dict[str, list[FrontierPoint]]]:
    """Frontier points by panel, then by stage (method), each stage's points in KL order.

    One panel per eval judge (`settings.judge`: the objective), titled `judge SPEC`, with the judge rise over the
    parent (`judge_delta` ± `judge_delta_stderr`, paired); and one per reward model scored beside it
    (`settings.reward`), titled `reward model REF`, with the reward rise (± `reward_delta_stderr`, or the parent's
    and policy's stderrs in quadrature for older eval.json files). x is `kl`, nats per sequence; an evaluation
    without a KL (null: greedy or top_p < 1) is left out.
    Every field is read defensively: eval.json may come from another version of `align eval`."""
    panels: dict[str, dict[str, list[FrontierPoint]]] = {}
    for artifact, result in evals:
        kl = _number(result.get("kl"))
        if kl is None:
            continue
        policy = result.get("policy") if isinstance(result.get("policy"), dict) else {}
        parent = result.get("parent_model") if isinstance(result.get("parent_model"), dict) else {}
        settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
        stage = str(artifact.manifest.get("stage") or "?")
        common = {"ref": artifact.ref, "stage": stage, "kl": kl, "kl_stderr": _number(result.get("kl_stderr")),
                  "parent": str(result.get("parent") or "parent"), "label": _coefficient_label(artifact)}
        judge_score, parent_judge = _number(policy.get("judge")), _number(parent.get("judge"))
        rise = _number(result.get("judge_delta"))
        if rise is None and judge_score is not None and parent_judge is not None:
            rise = judge_score - parent_judge
        if rise is not None:
            panel = f"judge {settings.get('judge') or '?'}"
            panels.setdefault(panel, {}).setdefault(stage, []).append(FrontierPoint(
                rise=rise, rise_stderr=_number(result.get("judge_delta_stderr")), parent_score=parent_judge,
                **common))
        reward_score, parent_reward = _number(policy.get("reward")), _number(parent.get("reward"))
        if reward_score is not None and parent_reward is not None:
            # The paired stderr when eval recorded it; else the two sides' in quadrature (an overestimate).
            errors = [_number(policy.get("reward_stderr")), _number(parent.get("reward_stderr"))]
            stderr = _number(result.get("reward_delta_stderr"))
            if stderr is None and None not in errors:
                stderr = math.hypot(*errors)
            panel = f"reward model {settings.get('reward') or '?'}"
            panels.setdefault(panel, {}).setdefault(stage, []).append(FrontierPoint(
                rise=reward_score - parent_reward, rise_stderr=stderr, parent_score=parent_reward, **common))
    order = {stage: index for index, stage in enumerate(_FRONTIER_STAGE_ORDER)}
    return {panel: {stage: sorted(by_stage[stage], key=lambda p: (p.kl, p.ref))
                    for stage in sorted(by_stage, key=lambda s: (order.get(s, len(order)), s))}
            for panel, by_stage in sorted(panels.items(), key=lambda item: (item[0].startswith("reward"), item[0]))}


def _coefficient_label(artifact: Artifact) -> str:
    """`β=0.1` / `kl_coef=0.05` from the artifact's recipe; the ref when the recipe does not say."""
    stage = artifact.manifest.get("stage")
    recipe = artifact.manifest.get("recipe") if isinstance(artifact.manifest.get("recipe"), dict) else {}
    section = recipe.get(stage) if isinstance(recipe.get(stage), dict) else {}
    if stage == "ppo" and _number(section.get("target_kl")) is not None:
        return f"target_kl={_number(section['target_kl']):g}"
    key, symbol = _KL_COEFFICIENTS.get(str(stage), (None, None))
    value = _number(section.get(key)) if key else None
    return f"{symbol}={value:g}" if value is not None else artifact.ref


def _plain(text: str) -> str:
    """Text for a matplotlib label: `$` would start mathtext (and fail on arbitrary eval.json content)."""
    return text.replace("$", r"\$")


def plot_frontier(evals: list[tuple[Artifact, dict[str, Any]]]) -> bytes:
    """The reward–KL frontier (Rafailov et al. 2023, fig. 2): one panel per eval judge (then per reward model),
    rise over the parent against KL(policy ‖ parent) per sequence; the parent at (0, 0); each stage (method) one
    colour, its points joined from the parent in KL order and labelled by KL coefficient; stderr error bars."""
    from matplotlib.figure import Figure

    panels = frontier_series(evals)
    columns = min(max(len(panels), 1), 3)
    rows = max(math.ceil(len(panels) / columns), 1)
    fig = Figure(figsize=(6.0 * columns, 4.6 * rows), dpi=100, layout="constrained")
    fig.suptitle("reward–KL frontier: rise over the parent against KL(policy ‖ parent), nats per sequence",
                 fontsize=11)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    if not panels:
        axes[0].text(0.5, 0.5, "no evaluation with a KL to plot", ha="center", va="center", fontsize=10,
                     transform=axes[0].transAxes)
        axes[0].set_axis_off()
    for ax, (title, by_stage) in zip(axes, panels.items(), strict=False):
        _frontier_panel(ax, by_stage)
        ax.set_title(_plain(_clip(title, 70)), fontsize=10)
        ax.set_xlabel("KL to parent (nats / sequence)", fontsize=9)
        ax.set_ylabel(_plain(_clip(title.split(" ")[0] + " rise over the parent", 70)), fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    for ax in axes[len(panels):] if panels else axes[1:]:
        ax.set_axis_off()
    return _png(fig)


def _frontier_panel(ax: Any, by_stage: dict[str, list[FrontierPoint]]) -> None:
    """One panel: the parent (grey square) at (0, 0); per stage a line from it through its points in KL order."""
    parents = sorted({p.parent for points in by_stage.values() for p in points})
    scores = {p.parent_score for points in by_stage.values() for p in points}
    ax.axhline(0, color="#adb5bd", linewidth=0.8)
    ax.plot([0], [0], "s", color="#868e96", markersize=7, zorder=3)
    parent_text = "parent " + _clip(", ".join(parents), 60)
    if len(parents) == 1 and len(scores) == 1 and None not in scores:
        parent_text += f": {next(iter(scores)):.3f}"
    ax.annotate(_plain(parent_text), (0, 0), textcoords="offset points", xytext=(6, -13), fontsize=8,
                color="#495057")
    for index, (stage, points) in enumerate(by_stage.items()):
        colour = _STAGE_LINE_COLOURS.get(stage, f"C{(index + 5) % 10}")
        ax.plot([0, *(p.kl for p in points)], [0, *(p.rise for p in points)], "-", color=colour, linewidth=1.2,
                alpha=0.7)
        ax.errorbar([p.kl for p in points], [p.rise for p in points],
                    xerr=[p.kl_stderr or 0 for p in points], yerr=[p.rise_stderr or 0 for p in points],
                    fmt="o", color=colour, capsize=3, markersize=5, label=_plain(f"{stage} ({len(points)})"))
        for number, point in enumerate(points):
            # Alternate label sides so neighbouring points do not print on top of each other.
            ax.annotate(_plain(_clip(point.label, 28)), (point.kl, point.rise), textcoords="offset points",
                        xytext=(5, 5 if number % 2 == 0 else -12), fontsize=7.5, color=colour)
    ax.legend(title="method", fontsize=8, title_fontsize=8, loc="best")
    ax.margins(x=0.15, y=0.2)


_STAGE_LINE_COLOURS = {"sft": "#495057", "dpo": "#e8590c", "ppo": "#1c7ed6", "grpo": "#7048e8", "rloo": "#d6336c"}


def render_comparison(evals: list[tuple[Artifact, dict[str, Any]]]) -> str:
    """Table of every evaluated policy beside its parent: judge ± stderr, reward, KL, win rate, fluency guards."""
    head = ("model", "vs parent", "judge", "Δ judge", "reward", "KL to parent", "win rate", "length (tokens)",
            "distinct-2", "ref NLL / token", "eval setup")
    rows = []
    for artifact, result in evals:
        policy, parent = result["policy"], result["parent_model"]
        settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
        setup = (f"{result.get('prompts', '?')} prompts × {settings.get('num_samples', '?')}, "
                 f"judge {settings.get('judge', '?')}, seed {settings.get('seed', '?')}")
        rows.append(_row([
            f'<a href="#{_anchor(artifact.ref)}"><code>{_e(artifact.ref)}</code></a>',
            f"<code>{_e(result.get('parent', '?'))}</code>",
            _e(_pm(policy, "judge")), _e(_pm(result, "judge_delta", signed=True)), _e(_pm(policy, "reward")),
            # kl is null (shown '–') when eval sampled greedily or with top_p < 1; see its kl_note.
            _e(_pm(result, "kl")), _e(_pm(result, "win_rate")),
            *(_e(_fmt(policy.get(k))) for k in ("length_tokens", "distinct_2", "ref_nll_per_token")),
            _e(setup)]))
        rows.append(_row([f"↳ parent <code>{_e(result.get('parent', '?'))}</code>", "", _e(_pm(parent, "judge")),
                          "", _e(_pm(parent, "reward")), "0", "",
                          *(_e(_fmt(parent.get(k))) for k in ("length_tokens", "distinct_2", "ref_nll_per_token")),
                          ""], css="parent"))
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f'<table class="grid"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _row(cells: Iterable[str], css: str = "") -> str:
    """A table row from already-escaped cell HTML."""
    klass = f' class="{css}"' if css else ""
    return f"<tr{klass}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _pm(side: dict[str, Any], key: str, signed: bool = False) -> str:
    """`value ± stderr` (stderr from `key_stderr`), or '–' when the value was not measured."""
    value = _number(side.get(key))
    if value is None:
        return "–"
    error = _number(side.get(f"{key}_stderr"))
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return f"{text} ± {error:.3f}" if error is not None else text


def render_samples(artifact_ref: str, result: dict[str, Any]) -> str:
    """Prompt | parent reply | artifact reply, with judge scores; every text is HTML-escaped."""
    examples = result.get("examples") if isinstance(result.get("examples"), list) else []
    parent_ref = str(result.get("parent", "parent"))
    rows = []
    for example in examples:
        if not isinstance(example, dict):
            continue
        rows.append(_row([
            f'<div class="text">{_e(example.get("prompt", ""))}</div>',
            f'<div class="text">{_e(example.get("parent", ""))}</div>'
            f'<div class="score">judge {_e(_signed(example.get("judge_parent")))}</div>',
            f'<div class="text">{_e(example.get("artifact", ""))}</div>'
            f'<div class="score">judge {_e(_signed(example.get("judge_artifact")))}</div>']))
    if not rows:
        return f'<p class="note">{_e(artifact_ref)}: no examples in {EVAL_FILE}.</p>'
    header = (f"<tr><th>prompt</th><th>parent <code>{_e(parent_ref)}</code></th>"
              f"<th>artifact <code>{_e(artifact_ref)}</code></th></tr>")
    return (f'<h3>Samples: <code>{_e(artifact_ref)}</code> vs <code>{_e(parent_ref)}</code></h3>'
            f'<table class="samples"><thead>{header}</thead><tbody>{"".join(rows)}</tbody></table>')


# ---- the page ------------------------------------------------------------------------------------------------


def render_report(registry: Registry, artifacts: list[Artifact]) -> str:
    """The whole HTML document for `artifacts`."""
    evals = [(artifact, result) for artifact in artifacts if (result := load_eval(artifact)) is not None]
    nodes = lineage_graph(registry, artifacts)
    body = [
        _header(registry, artifacts, bool(evals)),
        '<section id="lineage"><h2>Lineage</h2>',
        _img(plot_lineage(nodes), "lineage graph: base model, then each artifact with its stage and data cards, "
                                  "arrows from parent to child"),
        render_lineage_list(registry, artifacts), "</section>",
        '<section id="artifacts"><h2>Artifacts</h2>', *(render_artifact(a) for a in artifacts), "</section>",
        '<section id="frontier"><h2>Reward–KL frontier</h2>',
    ]
    if evals:
        body.append('<p class="note">Each policy against its parent (KL 0): up is better, right is further from '
                    "the parent. Error bars are standard errors, clustered by prompt; KL is at eval's sampling "
                    "temperature. From each artifact's eval.json (<code>align eval</code>).</p>")
        body.append(_img(plot_frontier(evals), "reward-KL frontier of " + ", ".join(a.ref for a, _ in evals)))
        unplaced = [(a.ref, r.get("kl_note")) for a, r in evals if _number(r.get("kl")) is None]
        if unplaced:
            # Greedy or top_p < 1 evaluations record no KL (eval.json's kl_note says why): no x to plot them at.
            body.append('<p class="note">Not on the frontier (no KL measured): ' + "; ".join(
                f"<code>{_e(ref)}</code>: {_e(note or 'no kl in eval.json')}" for ref, note in unplaced) + "</p>")
        body += ["</section>", '<section id="comparison"><h2>Evaluation comparison</h2>', render_comparison(evals),
                 "</section>", '<section id="samples"><h2>Samples</h2>',
                 *(render_samples(a.ref, r) for a, r in evals), "</section>"]
    else:
        body.append('<p class="note">No included artifact has an eval.json yet: run <code>align eval REF --data '
                    "CARD</code> to add the frontier, the comparison table and samples.</p></section>")
    title = f"align report: {', '.join(a.ref for a in artifacts)}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(_clip(title, 200))}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _header(registry: Registry, artifacts: list[Artifact], evaluated: bool) -> str:
    """Title, registry, date and the included artifacts as links to their sections."""
    items = "".join(f'<li><a href="#{_anchor(a.ref)}"><code>{_e(a.ref)}</code></a> '
                    f'<span class="stage">{_e(a.manifest.get("stage", "?"))}</span></li>' for a in artifacts)
    now = datetime.now().astimezone().isoformat(timespec="seconds")
    links = ["lineage", "artifacts", "frontier"] + (["comparison", "samples"] if evaluated else [])
    titles = {"frontier": "reward–KL frontier"}
    nav = " · ".join(f'<a href="#{name}">{titles.get(name, name)}</a>' for name in links)
    return (f"<header><h1>align report</h1><p>registry <code>{_e(registry.root)}</code> · generated {_e(now)}</p>"
            f"<nav>{nav}</nav>"
            f"<h2>Artifacts included ({len(artifacts)})</h2><ul class=\"included\">{items}</ul></header>")


# ---- small helpers -------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """HTML-escape anything (quotes too, so values are safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _anchor(ref: str) -> str:
    return "artifact-" + re.sub(r"[^A-Za-z0-9_-]+", "-", ref)


def _fmt(value: Any) -> str:
    """Numbers to 4 significant digits; containers as compact JSON; None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def _signed(value: Any) -> str:
    number = _number(value)
    return "–" if number is None else f"{number:+.3f}"


def _png(fig: Any) -> bytes:
    """Render a matplotlib Figure with the Agg canvas to PNG bytes (no pyplot global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}"></figure>'


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1320px;padding:1.2em 2em;
color:#212529;line-height:1.45}
h1{margin:.2em 0}h2{border-bottom:2px solid #dee2e6;padding-bottom:.2em;margin-top:1.6em}h3{margin:1.2em 0 .4em}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:.92em}
nav a{margin:0 .2em}.stage{background:#e7f5ff;border-radius:4px;padding:0 .4em;font-size:.85em;color:#1864ab}
figure{margin:.6em 0}img{max-width:100%;height:auto;border:1px solid #eee}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}th,td{border:1px solid #dee2e6;padding:.3em .55em;
vertical-align:top;text-align:left}th{background:#f8f9fa}
table.kv th{white-space:nowrap;font-weight:600}
table.kv tr.metric th{font-weight:normal;font-family:ui-monospace,monospace}
table.grid td{text-align:right;white-space:nowrap}table.grid td:first-child,table.grid td:nth-child(2){text-align:left}
table.grid td:last-child{text-align:left;white-space:normal;font-size:.85em;color:#495057}
tr.parent td{color:#6c757d;background:#fcfcfc}
table.samples{table-layout:fixed;width:100%}table.samples td{width:33%}
.text{white-space:pre-wrap;word-break:break-word}.score{color:#6c757d;font-size:.85em;margin-top:.3em}
.note{color:#6c757d}.role{color:#6c757d}.lineage-list ul{margin:.1em 0;padding-left:1.4em}
section.artifact{border-top:1px solid #f1f3f5;padding-top:.4em}
"""


# ---- screenshots (bench and tests) ---------------------------------------------------------------------------

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH (or /usr/bin/chromium), None when there is none."""
    import shutil

    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def screenshot(html_path: str | Path, png_path: str | Path, *, width: int = 1280, height: int = 4000,
               chromium: str | None = None, timeout: float = 180) -> Path:
    """Render `html_path` in headless Chromium to `png_path`; AlignError when Chromium is absent or fails."""
    import subprocess
    import tempfile

    browser = chromium or find_chromium()
    if browser is None:
        raise AlignError("no Chromium found (looked for " + ", ".join(CHROMIUM_CANDIDATES) + "): install it to "
                         "take report screenshots")
    png_path = Path(png_path).absolute()
    png_path.unlink(missing_ok=True)  # so a stale screenshot can never pass for a fresh one
    # Flags that work as root in a sandboxed container, with no network and a throwaway profile.
    with tempfile.TemporaryDirectory(prefix="align-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png_path}",
                   f"--window-size={width},{height}", Path(html_path).absolute().as_uri()]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False,
                                  env={**os.environ, "HOME": profile})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AlignError(f"{browser} could not take the screenshot: {exc}") from None
    if not png_path.is_file() or png_path.stat().st_size == 0:
        raise AlignError(f"{browser} wrote no screenshot (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    return png_path
