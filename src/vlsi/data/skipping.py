"""Samples passed over while training (data.validate=lazy, or an image whose pixels do not decode): reported with
the batch they were replaced in, logged once with their record and reason, counted, and kept in the data position a
checkpoint saves, so a resumed run counts them as the first run did."""

from __future__ import annotations

import functools
import logging

from vlsi.data.records import DataError

log = logging.getLogger("vlsi")
SKIPPED = "skipped"  # batch key: [(position in the dataset, message, counts as bad)] of the samples passed over


def with_skipped(collate_fn):
    """`collate_fn` for items that may carry SKIPPED entries (`VLDataset.__getitem__`): the batch carries them all."""
    return functools.partial(_collate, collate_fn)


def _collate(collate_fn, items: list[dict]) -> dict:
    skipped = [entry for item in items for entry in item.pop(SKIPPED, [])]
    batch = collate_fn(items)
    return batch | ({SKIPPED: skipped} if skipped else {})


class SkippedRecords:
    """The samples this process has passed over: {position: counts as bad}. More bad ones than `max_bad_fraction`
    of this process's share of the data stops the run (DataError naming them)."""

    def __init__(self, size: int, max_bad_fraction: float, num_processes: int = 1, saved: list | None = None):
        self.size, self.max_bad_fraction = size, max_bad_fraction
        self.limit = max_bad_fraction * size / num_processes
        self.seen: dict[int, bool] = {int(position): bool(bad) for position, bad in saved or []}
        self.messages: list[str] = []

    @classmethod
    def of(cls, dataset, process_index: int, num_processes: int, progress: dict) -> SkippedRecords:
        """This process's record for a `VLDataset` (data.max_bad_fraction; other datasets never skip), restored
        from a checkpoint's data position `progress` ("skipped": one `state()` per process) when it has one."""
        saved = progress.get("skipped") or []
        mine = saved[process_index] if len(saved) == num_processes else [e for state in saved for e in state]
        return cls(len(dataset), getattr(dataset, "max_bad_fraction", 1.0), num_processes, mine)

    @property
    def n_bad(self) -> int:
        return sum(self.seen.values())

    def add(self, entries: list) -> None:
        for position, message, bad in entries:
            if position in self.seen:
                continue  # already counted (an earlier epoch, or another item of this batch)
            self.seen[position] = bad
            self.messages.append(message)
            log.warning("%s", message)
        if self.n_bad > self.limit:
            raise DataError(
                self.messages,
                f"{self.n_bad} bad records so far in this process, more than data.max_bad_fraction="
                f"{self.max_bad_fraction} of its {self.size} samples: fix or remove them (or raise "
                "data.max_bad_fraction):",
            )

    def state(self) -> list[list]:
        """JSON-able, for the checkpoint's data position."""
        return [[position, int(bad)] for position, bad in sorted(self.seen.items())]
