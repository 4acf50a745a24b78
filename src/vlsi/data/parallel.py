"""Chunks of work spread over processes, with a progress bar (records/s, ETA) or, when stderr is not a terminal,
a log line every LOG_EVERY seconds."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from tqdm import tqdm

log = logging.getLogger("vlsi")
LOG_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal
CHUNK = 512  # records per task: large enough to amortise the hand-over, small enough to balance the processes


def default_num_proc() -> int:
    """The cores this process may run on (`data.num_proc=0`)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def chunks(n: int) -> list[range]:
    """Positions 0..n-1 in CHUNK-long ranges, one task each."""
    return [range(start, min(start + CHUNK, n)) for start in range(0, n, CHUNK)]


class Progress:
    """`update(n)` after n more records: a tqdm bar on a terminal, else a log line every `every` seconds."""

    def __init__(self, total: int, desc: str, every: float = LOG_EVERY):
        self.total, self.desc, self.every = total, desc, every
        self.done, self.start = 0, time.monotonic()
        self.last = self.start
        self.bar = tqdm(total=total, desc=desc, unit="rec", dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("%s: %d/%d records, %.0f records/s, ETA %.0f s", self.desc, self.done, self.total, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_chunks(
    work: Callable,
    tasks: Iterable[tuple],
    sizes: Iterable[int],
    num_proc: int,
    desc: str,
    total: int,
) -> Iterator:
    """`work(*task)` for every task, in order, on `num_proc` processes (in this one when 1), reporting progress by
    each task's size. Processes are forked where the platform allows (what the parent holds, e.g. the processors, is
    inherited, not pickled; a task carries only its chunk)."""
    progress = Progress(total, desc)
    try:
        if num_proc <= 1:
            for task, size in zip(tasks, sizes, strict=True):
                yield work(*task)
                progress.update(size)
            return
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init) as pool:
            pending, results, sizes = {}, {}, list(sizes)
            queue = iter(enumerate(tasks))
            next_out = 0
            for i, task in queue:  # keep 2 tasks per process in flight: results stay in order, memory stays flat
                pending[pool.submit(work, *task)] = i
                if len(pending) >= 2 * num_proc:
                    break
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = pending.pop(future)
                    results[i] = future.result()
                    progress.update(sizes[i])
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending[pool.submit(work, *nxt[1])] = nxt[0]
                while next_out in results:
                    yield results.pop(next_out)
                    next_out += 1
    finally:
        progress.close()


def _init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: the processes are the parallelism
    import torch

    torch.set_num_threads(1)
