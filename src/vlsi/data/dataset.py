"""Samples encoded lazily for every model's processor, after a one-off length scan that drops or rejects
over-long samples and checks that teacher and student see the same response tokens."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from torch.utils.data import Dataset
from tqdm import tqdm

from vlsi.data.encode import IGNORE_INDEX, encode
from vlsi.data.records import DataError, Sample


class VLDataset(Dataset):
    """Item i is `{name: encode(samples[i], processors[name], max_length)}` for every processor.

    `overlong="drop"` removes samples longer than `max_length` under any processor (their ids in `self.dropped`);
    `"error"` raises DataError. The scan (token and response-token counts per sample and processor) is saved to
    `cache_path` and reused when the samples, their image files and the processors are unchanged.
    Processors that encode alike (same class, configuration, tokenizer and chat template: a teacher and a student
    of one family) encode each sample once and share the result.
    """

    def __init__(
        self,
        samples: list[Sample],
        processors: dict,
        max_length: int,
        overlong: str = "drop",
        cache_path: str | os.PathLike | None = None,
    ):
        if overlong not in ("drop", "error"):
            raise ValueError(f"data.overlong must be 'drop' or 'error', got {overlong!r}")
        self.processors, self.max_length = processors, max_length
        keys = {name: processor_key(p) for name, p in processors.items()}
        self.same_as = same_encoding(keys)
        scan = _scan(samples, processors, cache_path, self.same_as, keys)  # {id: {name: [tokens, response tokens]}}
        longest = {s.id: max(tokens for tokens, _ in scan[s.id].values()) for s in samples}
        self.dropped = [s.id for s in samples if longest[s.id] > max_length]
        if self.dropped and overlong == "error":
            raise DataError(
                [f"sample {i}: {longest[i]} tokens" for i in self.dropped],
                f"{len(self.dropped)} samples longer than data.max_length={max_length} tokens "
                f"(set data.max_length={max(longest.values())} or data.overlong=drop):",
            )
        self.samples = [s for s in samples if longest[s.id] <= max_length]
        self.lengths = [longest[s.id] for s in self.samples]  # max over processors, for length-grouped sampling
        mismatched = [
            f"sample {s.id}: " + ", ".join(f"{n} for {name}" for name, (_, n) in scan[s.id].items())
            for s in self.samples
            if len({n for _, n in scan[s.id].values()}) > 1
        ]
        if mismatched:
            raise DataError(
                mismatched,
                f"{len(mismatched)} samples whose response token counts differ between {', '.join(processors)}; "
                "their tokenizers must split the answers alike:",
            )

    @property
    def n_dropped(self) -> int:
        return len(self.dropped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, dict]:
        sample = self.samples[index]
        items: dict[str, dict] = {}
        for name, processor in self.processors.items():
            first = self.same_as[name]
            items[name] = encode(sample, processor, self.max_length) if first == name else dict(items[first])
        return items


def processor_key(processor) -> str:
    """Hash of everything `encode` reads from a processor: class, configuration, chat template, whole tokenizer."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(processor).__name__, processor.to_json_string(), processor.chat_template, vocab]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def same_encoding(keys: dict[str, str]) -> dict[str, str]:
    """{name: the first name whose processor encodes exactly alike} (itself when none before it does), from
    {name: `processor_key(processor)`}."""
    first_by_key: dict[str, str] = {}
    return {name: first_by_key.setdefault(key, name) for name, key in keys.items()}


def _scan(
    samples: list[Sample],
    processors: dict,
    cache_path: str | os.PathLike | None,
    same_as: dict[str, str],
    keys: dict[str, str],
) -> dict[str, dict]:
    """{sample id: {processor name: [token count, response token count]}}, from `cache_path` when it matches."""
    fingerprint = _fingerprint(samples, keys)
    cache = Path(cache_path) if cache_path is not None else None
    if cache is not None and cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("fingerprint") == fingerprint:
            return cached["lengths"]
    lengths = {}
    for sample in tqdm(samples, desc="length scan", unit="sample", disable=not sys.stderr.isatty()):
        counts = {}
        for name, processor in processors.items():
            if same_as[name] != name:
                counts[name] = counts[same_as[name]]
                continue
            labels = encode(sample, processor)["labels"]  # [1, T]
            counts[name] = [labels.shape[1], int((labels != IGNORE_INDEX).sum())]
        lengths[sample.id] = counts
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # ranks may write at once: replace atomically
        partial.write_text(json.dumps({"fingerprint": fingerprint, "lengths": lengths}))
        partial.replace(cache)
    return lengths


def _fingerprint(samples: list[Sample], keys: dict[str, str]) -> str:
    """Hash of what the lengths depend on: ids, messages, image files (path, size, mtime) and each processor's
    `processor_key`. max_length is left out: lengths do not depend on it."""
    data = [[s.id, s.messages, [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in s.images]] for s in samples]
    return hashlib.sha256(json.dumps([data, keys], sort_keys=True).encode()).hexdigest()
