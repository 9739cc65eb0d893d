"""Which data card a reference names: a card file, or `NAME@vN` of a dataset artifact (from `align pairs`).

A recipe's `data.card` and the CLI's card arguments both accept either; a dataset artifact carries its card as
`card.yaml` and becomes the stage's `data` parent.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from align.data.cards import DataCard, load_card
from align.errors import ArtifactError

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry

CARD_FILE = "card.yaml"  # the data card a dataset artifact carries


def is_artifact_ref(spec: str) -> bool:
    """`NAME@vN` / `NAME@latest` rather than a card path (a card file name never holds '@')."""
    return "@" in spec


def dataset_card(ref: str, registry: Registry) -> tuple[Path, Artifact]:
    """The card file a dataset artifact carries, and the artifact; any other artifact is an ArtifactError."""
    artifact = registry.resolve(ref)
    card = artifact.path / CARD_FILE
    if not card.is_file():
        raise ArtifactError(f"{artifact.ref} is a {artifact.manifest.stage} artifact with no data card "
                            f"({CARD_FILE}); name a dataset artifact (from `align pairs`) or a card file")
    return card, artifact


def resolve_card(spec: str, relative_to: Path, registry: Registry) -> tuple[Path, Artifact | None]:
    """A card reference as a card file, and the dataset artifact it came from (None for a file).

    A path is read relative to `relative_to` (a recipe's directory) unless absolute."""
    if is_artifact_ref(spec):
        return dataset_card(spec, registry)
    path = Path(spec).expanduser()
    return (path if path.is_absolute() else (relative_to / path).resolve()), None


def load_card_ref(value: str, registry: Registry) -> DataCard:
    """The data card named on the command line: a card file (as given, from the working directory) or `NAME@vN`."""
    return load_card(dataset_card(value, registry)[0] if is_artifact_ref(value) else value)
