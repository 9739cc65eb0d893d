"""The report's figures as PNG bytes: lineage graph, training curves, reward–KL frontier.

matplotlib's Agg canvas directly (no pyplot, no display), imported inside each function so that importing
`align.report` (and `align --help`) stays fast.
"""

from __future__ import annotations

import io
import math
from typing import Any

from align.report.extract import Frontier, FrontierPoint, Series
from align.report.layout import GraphNode, graph_positions

_STAGE_COLOURS = {"base": "#e0e0e0", "sft": "#cfe2ff", "pairs": "#fff3bf", "reward": "#ffd8a8",
                  "dpo": "#c3fae8", "ppo": "#d3f9d8", "grpo": "#e5dbff", "rloo": "#fcc2d7"}
_ROLE_COLOURS = {"base": "#868e96", "model": "#343a40", "data": "#1c7ed6", "reward": "#e8590c"}
_STAGE_LINE_COLOURS = {"sft": "#495057", "dpo": "#e8590c", "ppo": "#1c7ed6", "grpo": "#7048e8", "rloo": "#d6336c"}


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _clip_left(text: str, width: int) -> str:
    """Keep the end of `text`: for a model path the last components name the model."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _plain(text: str) -> str:
    """Text for a matplotlib label: `$` would start mathtext (and fail on arbitrary eval.json content)."""
    return text.replace("$", r"\$")


def _png(fig: Any) -> bytes:
    """Render a matplotlib Figure with the Agg canvas to PNG bytes (no pyplot global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


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


def plot_curves(grouped: dict[str, Series], title: str) -> bytes:
    """One subplot per panel group, x = step; eval series dashed so they read as the held-out counterpart."""
    from matplotlib.figure import Figure

    count = len(grouped)
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(4.4 * cols, 3.1 * rows + 0.4), dpi=100, layout="constrained")
    fig.suptitle(_plain(title), fontsize=11)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (group, series) in zip(axes, grouped.items(), strict=False):
        for key, points in sorted(series.items()):
            xs, ys = zip(*points, strict=True)
            style = "--" if key.startswith("eval") else "-"
            ax.plot(xs, ys, style, marker="o" if len(points) <= 12 else None, markersize=3, linewidth=1.3,
                    label=_plain(_clip(key, 34)))
        ax.set_title(group, fontsize=9.5)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best", ncol=2 if len(series) > 6 else 1)
    for ax in axes[count:]:
        ax.set_visible(False)
    return _png(fig)


def plot_frontier(panels: Frontier) -> bytes:
    """The reward–KL frontier (Rafailov et al. 2023, fig. 2) of `frontier_series`: one panel per eval judge (then
    per reward model), rise over the parent against KL(policy ‖ parent) per sequence; the parent at (0, 0); each
    stage (method) one colour, its points joined from the parent in KL order and labelled by KL coefficient;
    stderr error bars."""
    from matplotlib.figure import Figure

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
