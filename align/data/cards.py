"""Data cards: a YAML description of a dataset (source, format, license, eval split) and its loader.

Loading reads local files with our own readers (`align.data.readers`) so every rejected row keeps its file and
line, converts each row through the card's format, verifies file hashes and carves out a deterministic eval split.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from align.data.converters import DroppedRow, LabelMapNeeded, RowError
from align.data.formats import FORMATS, columns_read, convert_row, did_you_mean, get_format
from align.data.readers import RawRows, read_files
from align.errors import DataError
from align.hashing import canonical_json, sha256_file
from align.yamlio import KeyPath, describe_validation_error, load_yaml

MAX_REPORTED = 5
_GLOB_CHARS = re.compile(r"[*?\[]")
Scalar = StrictStr | StrictInt | StrictFloat | StrictBool | None


class Source(BaseModel):
    """Where the rows come from: local file(s) relative to the card, or a hub dataset."""

    model_config = ConfigDict(extra="forbid")

    path: str | list[str] | None = Field(None, description="File(s) relative to the card; globs allowed.")
    hub: str | None = Field(None, description="Hub dataset id, e.g. org/dataset.")
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch).")
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Hub split to read.")
    eval_path: str | list[str] | None = Field(None, description="Explicit eval file(s); otherwise eval is carved out.")

    @model_validator(mode="after")
    def _one_source(self) -> Source:
        if (self.path is None) == (self.hub is None):
            raise ValueError("set exactly one of 'path' or 'hub'")
        if self.path is not None and (self.revision or self.config or "split" in self.model_fields_set):
            raise ValueError("'revision', 'config' and 'split' only apply to a 'hub' source")
        return self


class EvalSplit(BaseModel):
    """How many rows are held out for evaluation when the source has no explicit eval file."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows held out: round(fraction * n), at least 1.")
    size: int | None = Field(None, ge=0, description="Exact number of held-out rows (instead of fraction).")
    seed: int = Field(0, description="Changes which rows are held out.")

    @model_validator(mode="after")
    def _fraction_or_size(self) -> EvalSplit:
        if self.size is not None and "fraction" in self.model_fields_set:
            raise ValueError("set either 'fraction' or 'size', not both")
        return self


# What a label may mean in each format that takes a `label_map`.
LABEL_MEANINGS = {"pairwise_label": ("answer_a", "answer_b", "tie"), "unpaired": ("desirable", "undesirable", "skip")}


class DataCard(BaseModel):
    """A validated data card; `path` and `directory` say where it was read from."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    license: str
    source: Source
    format: str
    fields: dict[str, str] = Field(default_factory=dict, description="Canonical field -> column name in the file.")
    eval: EvalSplit = Field(default_factory=EvalSplit)
    sha256: dict[str, str] = Field(default_factory=dict, description="Relative file path -> expected sha256.")
    on_malformed: Literal["error", "skip"] = "error"
    where: dict[str, Scalar] = Field(default_factory=dict,
                                     description="Column -> value: only rows where every column equals its value.")
    label_map: dict[StrictInt | StrictStr, Literal["answer_a", "answer_b", "tie", "desirable", "undesirable",
                                                   "skip"]] | None = Field(
        None, description="pairwise_label (answer_a | answer_b | tie) and unpaired (desirable | undesirable | skip): "
                          "what each label value means (integer labels need one).")

    _path: Path = PrivateAttr(default=Path("<memory>"))
    _lines: dict[KeyPath, int] = PrivateAttr(default_factory=dict)

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"unknown format '{value}'{did_you_mean(value, list(FORMATS))}")
        return value

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        fmt = FORMATS.get(info.data.get("format", ""))
        if fmt is not None:
            for key in value:
                if key not in fmt.fields:
                    raise ValueError(f"format '{fmt.name}' has no field '{key}'{did_you_mean(key, list(fmt.fields))}")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        for key, digest in value.items():
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"'{key}': expected 64 lowercase hex digits, got {digest!r}")
        return value

    @model_validator(mode="after")
    def _label_map_applies(self) -> DataCard:
        if self.label_map is None:
            return self
        if "label_map" not in getattr(FORMATS.get(self.format), "options", ()):
            raise ValueError(f"label_map only applies to the pairwise_label and unpaired formats, not "
                             f"'{self.format}'")
        allowed = LABEL_MEANINGS.get(self.format, ())
        wrong = sorted({meaning for meaning in self.label_map.values() if meaning not in allowed})
        if wrong:
            raise ValueError(f"label_map: {', '.join(wrong)} is not a meaning in the {self.format} format "
                             f"(use {' | '.join(allowed)})")
        texts = [str(key).strip() for key in self.label_map]
        if len(set(texts)) < len(texts):
            raise ValueError("label_map lists the same label twice (1 and '1' are the same label: CSV cells are text)")
        return self

    @property
    def labels(self) -> dict[str, str] | None:
        """`label_map` keyed by each label's text, as the converter compares them."""
        return None if self.label_map is None else {str(k).strip(): v for k, v in self.label_map.items()}

    @property
    def path(self) -> Path:
        return self._path

    @property
    def directory(self) -> Path:
        return self._path.parent

    def at(self, *key: str | int) -> str:
        """`card.yaml:LINE` for a key path, so file errors point back at the card line that named the file."""
        line = self._lines.get(tuple(key))
        return f"{self._path}:{line}" if line else str(self._path)


def load_card(path: str | Path) -> DataCard:
    """Read and validate a data card; every problem is a DataError naming the card file and line."""
    path = Path(path)
    data, lines = load_yaml(path, DataError)
    if not isinstance(data, dict):
        raise DataError(f"{path}: a data card must be a mapping of keys, got {type(data).__name__}")
    try:
        card = DataCard.model_validate(data)
    except ValidationError as exc:
        raise DataError(describe_validation_error(path, exc, lines, DataCard)) from None
    card._path = path
    card._lines = lines
    return card


@dataclass
class RejectedRow:
    """A row that was not used, with where it is (`file:LINE`, `file item N`, `org/ds[split] row N`) and why.

    Also used for dropped rows (well-formed but unusable, e.g. a tied preference), which never fail a load.
    """

    location: str
    reason: str


DROP_REASONS = ("malformed", "tie", "filtered", "limit", "too_long")


@dataclass
class LoadedData:
    """Canonical train/eval rows of one card, what was rejected or dropped, and which files (with hashes) were read.

    Every row read is accounted for: `read` = train + eval + rejected (malformed, with on_malformed: skip) +
    dropped (ties) + `filtered` (not matching the card's `where`) + `limited` (beyond data.limit/eval_limit) +
    `too_long` (rows the stage's trainer would drop at its max_length, `align.data.lengths`)."""

    card: DataCard
    train: list[dict]
    eval: list[dict]
    rejected: list[RejectedRow] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    dropped: list[RejectedRow] = field(default_factory=list)
    read: int = 0
    filtered: int = 0
    limited: int = 0
    too_long: int = 0
    train_truncated: int | None = None  # train rows kept but cut at max_length (None: the stage cuts nothing)
    unknown_columns: dict[str, int] = field(default_factory=dict)  # column the format does not read -> rows

    def summary(self) -> dict:
        """Counts and file hashes for manifests and `align data validate`."""
        return {
            "name": self.card.name,
            "card": str(self.card.path),
            "card_sha256": sha256_file(self.card.path),
            "format": self.card.format,
            "rows": {"train": len(self.train), "eval": len(self.eval)},
            "rejected": len(self.rejected),
            "dropped": len(self.dropped),
            "files": self.files,
        }

    def dropped_by_reason(self) -> dict[str, int]:
        return dict(zip(DROP_REASONS, (len(self.rejected), len(self.dropped), self.filtered, self.limited,
                                       self.too_long), strict=True))

    def counts(self) -> dict:
        """A stage's row metrics: rows read, dropped by reason and used (train/eval), which always add up."""
        return {"rows_read": self.read, "rows_dropped": self.dropped_by_reason(), "train_rows": len(self.train),
                "eval_rows": len(self.eval)}


def _resolve(card: DataCard, spec: str | list[str], key: str) -> list[Path]:
    """Card-relative paths and globs -> existing files, in a stable order; nothing found is a DataError."""
    where = card.at("source", key)
    files: list[Path] = []
    for pattern in [spec] if isinstance(spec, str) else spec:
        target = card.directory / pattern
        if _GLOB_CHARS.search(pattern):
            matches = sorted(Path(p) for p in glob.glob(str(target), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{where}: source.{key}: {target}: no files match this pattern")
            files += matches
        elif not target.is_file():
            raise DataError(f"{where}: source.{key}: {target}: file not found")
        else:
            files.append(target)
    return files


def card_files(card: DataCard) -> list[Path]:
    """The local files a card reads (none for a hub dataset): what a build system must watch."""
    source = card.source
    files = _resolve(card, source.path, "path") if source.path is not None else []
    return files + (_resolve(card, source.eval_path, "eval_path") if source.eval_path is not None else [])


def _verify_hashes(card: DataCard, files: list[Path]) -> list[dict]:
    """sha256 of every file read; digests listed in the card must match."""
    digests = {path.resolve(): sha256_file(path) for path in files}
    for relative, expected in card.sha256.items():
        target = (card.directory / relative).resolve()
        if target not in digests:
            raise DataError(
                f"{card.at('sha256', relative)}: sha256 lists '{relative}', which this card's source does not read"
            )
        if digests[target] != expected:
            raise DataError(
                f"{card.directory / relative}: sha256 mismatch: card {card.path} expects {expected}, "
                f"file has {digests[target]} (the file changed; update the card if the change is intended)"
            )
    return [{"path": str(path), "sha256": digests[path.resolve()]} for path in files]


def _read_hub(card: DataCard) -> tuple[RawRows, dict]:
    source = card.source
    label = f"{source.hub}[{source.split}]"
    try:
        import datasets

        dataset = datasets.load_dataset(source.hub, name=source.config, revision=source.revision, split=source.split)
    except Exception as exc:  # datasets raises many types; all mean "could not get the rows"
        text = f"{type(exc).__name__}: {exc}"
        offline = isinstance(exc, (ConnectionError, TimeoutError, OSError)) or re.search(
            r"offline|connect|resolve|reach|network|timed? ?out", text, re.IGNORECASE
        )
        problem = (
            "could not be reached (the hub is offline or unreachable from here)" if offline else "could not be loaded"
        )
        raise DataError(
            f"{card.at('source', 'hub')}: hub dataset '{source.hub}' {problem}: {text.splitlines()[0]}. "
            "Download it once and point source.path at the local file(s) instead."
        ) from None
    info = {
        "path": f"hub:{source.hub}",
        "sha256": None,
        "revision": source.revision,
        "split": source.split,
        "fingerprint": getattr(dataset, "_fingerprint", None),
    }
    return ((f"{label} row {index}", row) for index, row in enumerate(dataset)), info


# ---------------------------------------------------------------- loading


@dataclass
class _Converted:
    rows: list[dict] = field(default_factory=list)
    rejected: list[RejectedRow] = field(default_factory=list)
    dropped: list[RejectedRow] = field(default_factory=list)
    read: int = 0
    filtered: int = 0
    unknown: Counter = field(default_factory=Counter)


def _matches(cell: Any, wanted: Any) -> bool:
    """`where` equality. A CSV cell is text, so it matches a card's true/false/number by its usual spelling."""
    if isinstance(cell, str) and wanted is not None and not isinstance(wanted, str):
        text = str(wanted).lower() if isinstance(wanted, bool) else str(wanted)
        return cell.strip().lower() == text
    if isinstance(cell, bool) or isinstance(wanted, bool):
        return cell is wanted
    return cell == wanted


def _convert_all(card: DataCard, raw: Iterable[tuple[str, Any]]) -> _Converted:
    """Rows filtered by the card's `where`, converted; rejected (malformed) and dropped (well-formed but unusable,
    e.g. tied) rows; columns the format does not read, with how many rows carry each."""
    fmt = get_format(card.format)
    known = columns_read(fmt, card.fields) | set(card.where)
    options = {"label_map": card.labels}
    out = _Converted()
    for location, item in raw:
        out.read += 1
        if isinstance(item, Mapping):
            out.unknown.update(key for key in item if key not in known)
            if not all(_matches(item.get(column), wanted) for column, wanted in card.where.items()):
                out.filtered += 1
                continue
        try:
            if isinstance(item, RowError):
                raise item
            out.rows.append(convert_row(fmt, item, card.fields, options))
        except RowError as exc:
            out.rejected.append(RejectedRow(location, str(exc)))
        except DroppedRow as exc:
            out.dropped.append(RejectedRow(location, str(exc)))
        except LabelMapNeeded as exc:
            raise DataError(f"{card.path}: {exc} (first at {location})") from None
    return out


def _eval_count(card: DataCard, n: int) -> int:
    """How many rows to hold out: exactly `size`, or round(fraction * n) with at least one when n >= 2."""
    if card.eval.size is not None:
        if card.eval.size >= n:
            raise DataError(
                f"{card.at('eval', 'size')}: eval.size {card.eval.size} leaves no training rows ({n} usable rows)"
            )
        return card.eval.size
    if card.eval.fraction == 0 or n < 2:
        return 0
    return min(max(1, round(card.eval.fraction * n)), n - 1)


def split_eval(rows: list[dict], count: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `count` rows ranked by a hash of (seed, row content): the same rows whatever the file order."""

    def rank(index: int) -> tuple[str, int]:
        digest = hashlib.sha256(f"{seed}:{canonical_json(rows[index])}".encode()).hexdigest()
        return digest, index

    held = sorted(range(len(rows)), key=rank)[:count]
    held_set = set(held)
    return [row for i, row in enumerate(rows) if i not in held_set], [rows[i] for i in held]


def load_data(
    card: DataCard, *, limit: int | None = None, eval_limit: int | None = None, strict: bool | None = None
) -> LoadedData:
    """Read, convert, verify and split a card's rows. `strict` overrides the card's `on_malformed`."""
    strict = card.on_malformed == "error" if strict is None else strict
    source = card.source
    if source.hub is not None:
        raw, info = _read_hub(card)
        train_files: list[Path] = []
        hub_files = [info]
    else:
        train_files = _resolve(card, source.path, "path")  # type: ignore[arg-type]
        raw, hub_files = read_files(card.at("source"), train_files), []
    eval_files = _resolve(card, source.eval_path, "eval_path") if source.eval_path is not None else []
    files = hub_files + _verify_hashes(card, train_files + eval_files)

    converted = _convert_all(card, raw)
    held = _convert_all(card, read_files(card.at("source"), eval_files))
    rows, eval_rows = converted.rows, held.rows
    rejected, dropped = converted.rejected + held.rejected, converted.dropped + held.dropped
    if rejected and strict:
        shown = "\n".join(f"  {r.location}: {r.reason}" for r in rejected[:MAX_REPORTED])
        more = f"\n  ... and {len(rejected) - MAX_REPORTED} more" if len(rejected) > MAX_REPORTED else ""
        raise DataError(
            f"{card.path}: {len(rejected)} malformed row(s) in '{card.format}' format:\n{shown}{more}\n"
            "Fix them, or set `on_malformed: skip` in the card to drop them."
        )
    if not rows:
        note = f" ({len(rejected)} rejected, first: {rejected[0].location}: {rejected[0].reason})" if rejected else ""
        note += f" ({len(dropped)} dropped, first: {dropped[0].location}: {dropped[0].reason})" if dropped else ""
        note += f" ({converted.filtered} filtered out by `where`)" if converted.filtered else ""
        what = ", ".join(str(p) for p in train_files) or f"hub dataset {source.hub}"
        raise DataError(f"{card.path}: no usable rows in {what}{note}")
    if eval_files and not eval_rows:
        raise DataError(f"{card.at('source', 'eval_path')}: no usable rows in {', '.join(map(str, eval_files))}"
                        + (f" ({held.filtered} filtered out by `where`)" if held.filtered else ""))

    if not eval_files:
        rows, eval_rows = split_eval(rows, _eval_count(card, len(rows)), card.eval.seed)
    train = rows[:limit] if limit is not None else rows
    held_out = eval_rows[:eval_limit] if eval_limit is not None else eval_rows
    unknown = converted.unknown + held.unknown
    return LoadedData(card=card, train=train, eval=held_out, rejected=rejected, files=files, dropped=dropped,
                      read=converted.read + held.read, filtered=converted.filtered + held.filtered,
                      limited=len(rows) - len(train) + len(eval_rows) - len(held_out),
                      unknown_columns=dict(unknown.most_common()))
