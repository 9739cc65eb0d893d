"""Data cards, dataset readers and row converters: everything between a file on disk and canonical rows."""

from align.data.cards import (
    DataCard,
    EvalSplit,
    LoadedData,
    RejectedRow,
    Source,
    card_files,
    describe_row,
    load_card,
    load_data,
    split_eval,
    token_length_percentiles,
)
from align.data.formats import FORMATS, DroppedRow, Format, Message, RowError, convert_row, get_format

__all__ = [
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
    "describe_row",
    "get_format",
    "load_card",
    "load_data",
    "split_eval",
    "token_length_percentiles",
]
