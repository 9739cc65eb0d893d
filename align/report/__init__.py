"""`align report`: one self-contained HTML page about artifacts: lineage, metrics, curves, reward-KL frontier, samples.

Everything is inline (CSS, images as base64 `data:image/png` URIs) so the file can be mailed or archived and opened
offline. The package reads (`extract`: curves, manifest facts, frontier points), lays out the lineage graph
(`layout`), draws (`plots`, matplotlib imported only there, inside the functions), formats evaluation tables for
the report and the console alike (`comparison`) and renders the page from a Jinja2 template (`html`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from align.errors import AlignError, ArtifactError
from align.records import write_atomic

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry


def write_report(registry: Registry, refs: list[str], out: str | Path) -> Path:
    """Render the report for `refs` (empty: the latest version of every name) and write it atomically to `out`."""
    from align.report.html import render_report

    out = Path(out).expanduser().absolute()
    _check_writable(out)  # before the plotting work, so a typo in --out fails at once
    document = render_report(registry, select_artifacts(registry, refs))
    try:
        write_atomic(out, document)
    except OSError as exc:
        raise AlignError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
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
