"""Data cards, dataset readers and row converters: everything between a file on disk and canonical rows."""

from align.data.card_refs import CARD_FILE, dataset_card, is_artifact_ref, load_card_ref, resolve_card
from align.data.cards import (
    DataCard,
    EvalSplit,
    LoadedData,
    RejectedRow,
    Source,
    card_files,
    load_card,
    load_data,
    split_eval,
)
from align.data.converters import DroppedRow, Message, RowError
from align.data.formats import FORMATS, Format, convert_row, get_format
from align.data.preview import describe_row, token_length_percentiles

__all__ = [
    "CARD_FILE",
    "FORMATS",
    "DataCard",
    "DroppedRow",
    "EvalSplit",
    "Format",
    "LoadedData",
    "Message",
    "RejectedRow",
    "RowError",
    "Source",
    "card_files",
    "convert_row",
    "dataset_card",
    "describe_row",
    "get_format",
    "is_artifact_ref",
    "load_card",
    "load_card_ref",
    "load_data",
    "resolve_card",
    "split_eval",
    "token_length_percentiles",
]
