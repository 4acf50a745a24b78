"""Conversation records -> chat template -> input ids + labels masked to assistant tokens -> batches."""

from vlsi.data.collate import collate, make_collate, split_batch
from vlsi.data.dataset import VLDataset
from vlsi.data.encode import IGNORE_INDEX, Overlong, encode, response_positions
from vlsi.data.records import BadRecord, DataError, Sample, Samples, load_records, read_dataset

__all__ = [
    "IGNORE_INDEX",
    "BadRecord",
    "DataError",
    "Overlong",
    "Sample",
    "Samples",
    "VLDataset",
    "collate",
    "encode",
    "load_records",
    "make_collate",
    "read_dataset",
    "response_positions",
    "split_batch",
]
