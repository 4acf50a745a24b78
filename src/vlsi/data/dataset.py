"""Samples encoded lazily for every model's processor, after a one-off length scan (cached, shared by the stages)
that drops or rejects over-long samples and checks that teacher and student see the same response tokens."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from vlsi.data import sources
from vlsi.data.encode import IGNORE_INDEX, SPECIAL_TOKENS, Overlong, Unencodable, encode
from vlsi.data.images import UnusableImage, image_identity
from vlsi.data.parallel import chunks, default_num_proc, run_chunks
from vlsi.data.records import MAX_SHOWN, BadRecord, DataError, Sample
from vlsi.data.scan import TokenCounter
from vlsi.data.skipping import SKIPPED


class VLDataset(Dataset):
    """Item i is `{name: encode(samples[i], processors[name], max_length)}` for every processor.

    `overlong="drop"` removes samples longer than `max_length` under any processor (their ids in `self.dropped`);
    `"error"` raises DataError. Samples a processor cannot encode (a special token's string in the text with
    `special_tokens="refuse"`, a chat template that rejects the conversation, an image outside the processor's
    limits) are found by the scan and raise DataError naming every one, or with `skip_invalid` are left out (their
    lines in `self.invalid`). The scan (token and response-token counts per sample and processor, `scan.py`: no
    image is loaded) runs on `num_proc` processes (default: every core this process may use) and is saved to
    `cache_path`; a later scan of the same samples (the same records and image files) takes each processor's counts
    from any scan file in that folder that holds them, so every stage scans each processor once.
    Processors that encode alike (same class, configuration, tokenizer and chat template: a teacher and a student
    of one family) encode each sample once and share the result.

    `lazy` (data.validate=lazy): no scan; each sample is checked, encoded and measured when it is loaded. Loading a
    sample that turns out bad (an invalid record, an image that does not decode, too long, teacher and student
    disagreeing on its response tokens) takes the next good sample in its place and reports the bad one under the
    item's "skipped" key (`skipping.py`), for the training loop to log and count.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        processors: dict,
        max_length: int,
        overlong: str = "drop",
        cache_path: str | os.PathLike | None = None,
        num_proc: int | None = None,
        lazy: bool = False,
        max_bad_fraction: float = 0.01,
        special_tokens: str = "refuse",
        skip_invalid: bool = False,
    ):
        if overlong not in ("drop", "error"):
            raise ValueError(f"data.overlong must be 'drop' or 'error', got {overlong!r}")
        if special_tokens not in SPECIAL_TOKENS:
            raise ValueError(f"data.special_tokens must be one of {', '.join(SPECIAL_TOKENS)}, got {special_tokens!r}")
        self.processors, self.max_length, self.overlong, self.lazy = processors, max_length, overlong, lazy
        self.special_tokens = special_tokens
        self.max_bad_fraction = max_bad_fraction  # read by the training loop (`skipping.SkippedRecords`)
        # the scan's cache key: what `encode` reads, data.special_tokens=text included (it changes the counts)
        text = "" if special_tokens == "refuse" else f"+special_tokens={special_tokens}"
        keys = {name: processor_key(p) + text for name, p in processors.items()}
        self.same_as = same_encoding(keys)
        self.dropped: list[str] = []
        self.invalid: list[str] = []
        if lazy:
            self.samples, self.lengths = samples, None
            return
        counts, refused = _scan(samples, processors, cache_path, self.same_as, keys, num_proc, special_tokens)
        self.invalid = [f"{sources.where(samples, i)}: {reason}" for i, reason in sorted(refused.items())]
        if self.invalid and not skip_invalid:
            raise DataError(
                self.invalid,
                f"{len(self.invalid)} records that cannot be encoded for {', '.join(processors)} (set "
                "data.skip_invalid=true to skip them):",
            )
        usable = np.ones(len(samples), dtype=bool)
        usable[list(refused)] = False
        longest = np.max([c[:, 0] for c in counts.values()], axis=0)  # [n]; -1 where refused
        over = np.flatnonzero(usable & (longest > max_length))
        self.dropped = [samples[int(i)].id for i in over]
        if self.dropped and overlong == "error":
            raise DataError(
                [f"sample {i}: {n} tokens" for i, n in zip(self.dropped, longest[over].tolist(), strict=True)],
                f"{len(self.dropped)} samples longer than data.max_length={max_length} tokens "
                f"(set data.max_length={int(longest.max())} or data.overlong=drop):",
            )
        kept = np.flatnonzero(usable & (longest <= max_length))
        self.samples = _take(samples, kept)
        self.lengths = longest[kept].tolist()  # max over processors, for length-grouped sampling
        responses = np.stack([c[kept, 1] for c in counts.values()])  # [processors, kept]
        mismatched = [
            f"sample {self.samples[int(i)].id}: "
            + ", ".join(f"{n} for {name}" for name, n in zip(counts, responses[:, i].tolist(), strict=True))
            for i in np.flatnonzero((responses != responses[0]).any(axis=0))
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

    def __getitem__(self, index: int) -> dict:
        """The encoded sample at `index`; when it cannot be loaded, the next one that can, with the ones passed over
        under "skipped" as (position, message, counts as bad)."""
        skipped = []
        for position in (i % len(self) for i in range(index, index + MAX_IN_A_ROW)):
            try:
                items = self._encode(self.samples[position])
            except SKIPPABLE as error:
                if isinstance(error, Overlong) and self.overlong == "error":
                    raise DataError([str(error)], f"{error} (set data.overlong=drop to skip such samples)") from None
                skipped.append((position, _message(self.samples, position, error), not isinstance(error, Overlong)))
                continue
            return items | ({SKIPPED: skipped} if skipped else {})
        raise DataError(
            [message for _, message, _ in skipped[:MAX_SHOWN]],
            f"{MAX_IN_A_ROW} samples in a row could not be loaded, from position {index}; check data.path and "
            "data.image_root:",
        )

    def _encode(self, sample: Sample) -> dict[str, dict]:
        items: dict[str, dict] = {}
        for name, processor in self.processors.items():
            first = self.same_as[name]
            if first == name:
                items[name] = encode(sample, processor, self.max_length, self.special_tokens)
            else:
                items[name] = dict(items[first])
        if self.lazy:
            responses = {name: int((item["labels"] != IGNORE_INDEX).sum()) for name, item in items.items()}
            if len(set(responses.values())) > 1:
                counts = ", ".join(f"{n} for {name}" for name, n in responses.items())
                raise ResponseMismatch(f"response token counts differ ({counts}); their tokenizers must split it alike")
        return items


class ResponseMismatch(ValueError):
    """Teacher and student processors give one sample different numbers of response tokens."""


MAX_IN_A_ROW = 100  # consecutive samples that fail to load before the run stops: the data is probably wrong
# What loading a sample can raise that marks the sample, not the run, as bad: an invalid record (lazy), an image
# whose header read but whose pixels do not decode (OSError, SyntaxError; or one too large for PIL; or one of several
# frames), too many tokens, one the template or the processor rejects (Unencodable: data.validate=lazy; the eager
# scan finds them first).
SKIPPABLE = (BadRecord, OSError, SyntaxError, Image.DecompressionBombError, UnusableImage, Overlong, ResponseMismatch,
             Unencodable)  # fmt: skip


def _message(samples: Sequence[Sample], position: int, error: Exception) -> str:
    """One line: file, record and line (when known), what is wrong and what happens to it."""
    if isinstance(error, BadRecord):
        return f"{error}; skipped"
    where = sources.where(samples, position)
    if isinstance(error, Overlong):
        return f"{where}: {error.length} tokens > data.max_length={error.max_length}; dropped"
    if isinstance(error, ResponseMismatch):
        return f"{where}: {error}; skipped"
    if isinstance(error, Unencodable):
        return f"{where}: {error.reason}; skipped"
    return f"{where}: an image cannot be decoded ({type(error).__name__}: {error}); skipped, replace the image"


def _take(samples: Sequence[Sample], positions: np.ndarray) -> Sequence[Sample]:
    if hasattr(samples, "take"):  # an index into a file or dataset (`Samples`, `sources.DatasetSamples`, `Mixture`)
        return samples if len(positions) == len(samples) else samples.take(positions)
    return [samples[int(i)] for i in positions]


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
    samples: Sequence[Sample],
    processors: dict,
    cache_path: str | os.PathLike | None,
    same_as: dict[str, str],
    keys: dict[str, str],
    num_proc: int | None = None,
    special_tokens: str = "refuse",
) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """({processor name: [n, 2] (token count, response token count) per sample, -1 where refused}, {position: why
    a processor cannot encode it}), each processor's counts taken from a scan file in `cache_path`'s folder made for
    the same samples when one holds them, else scanned and saved."""
    fingerprint = getattr(samples, "fingerprint", None) or _fingerprint(samples)
    cache = Path(cache_path) if cache_path is not None else None
    found = _cached(cache, fingerprint, set(keys.values())) if cache is not None else {}
    missing = [name for name in processors if same_as[name] == name and keys[name] not in found]
    if missing:
        counted = _count(samples, processors, missing, num_proc, special_tokens)
        found |= {keys[name]: scanned for name, scanned in counted.items()}
    unique = list(dict.fromkeys(keys.values()))
    if cache is not None and (missing or not cache.is_file()):
        cache.parent.mkdir(parents=True, exist_ok=True)
        lengths = np.stack([found[key][0] for key in unique], axis=1).tolist()  # [n, keys, 2]
        refused = {key: found[key][1] for key in unique}
        partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # ranks may write at once: replace atomically
        scan = {"fingerprint": fingerprint, "keys": unique, "lengths": lengths, "refused": refused}
        partial.write_text(json.dumps(scan))
        partial.replace(cache)
    refused: dict[int, str] = {}
    for name in processors:
        for position, reason in found[keys[name]][1].items():
            refused.setdefault(int(position), reason + (f" ({name})" if len(set(keys.values())) > 1 else ""))
    return {name: found[keys[name]][0] for name in processors}, refused


def _cached(cache: Path, fingerprint: str, wanted: set[str]) -> dict[str, tuple[np.ndarray, dict]]:
    """{processor key: ([n, 2], {position: refusal})} of the wanted processors, from the scan files of `cache`'s
    folder for these samples (`cache` itself first)."""
    found: dict[str, tuple[np.ndarray, dict]] = {}
    candidates = [cache, *sorted(p for p in cache.parent.glob("*.json") if p != cache)] if cache.parent.is_dir() else []
    for path in candidates:
        if not path.is_file() or wanted <= found.keys():
            continue
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(cached, dict) or cached.get("fingerprint") != fingerprint or "refused" not in cached:
            continue
        lengths = np.asarray(cached["lengths"], dtype=np.int64).reshape(-1, len(cached["keys"]), 2)
        found |= {
            key: (lengths[:, k], cached["refused"][key])
            for k, key in enumerate(cached["keys"])
            if key in wanted and key not in found
        }
    return found


def _count(
    samples: Sequence[Sample], processors: dict, names: list[str], num_proc: int | None, special_tokens: str = "refuse"
) -> dict[str, tuple[np.ndarray, dict[int, str]]]:
    """{name: ([n, 2], {position: why it cannot be encoded})} for the processors `names`, scanned in chunks on
    `num_proc` processes."""
    global _COUNTERS
    # probed here, inherited by the workers
    _COUNTERS = {name: TokenCounter(processors[name], special_tokens) for name in names}
    ranges = chunks(len(samples))
    num_proc = min(num_proc or default_num_proc(), len(ranges))
    tasks = [(_take(samples, np.arange(r.start, r.stop)),) for r in ranges]  # small: sub-indexes of the file
    columns: dict[str, list] = {name: [] for name in names}
    for counted in run_chunks(_count_chunk, tasks, [len(r) for r in ranges], num_proc, "length scan", len(samples)):
        for name in names:
            columns[name] += counted[name]
    out = {}
    for name, rows in columns.items():
        refused = {i: row for i, row in enumerate(rows) if isinstance(row, str)}
        counts = [[-1, -1] if isinstance(row, str) else row for row in rows]
        out[name] = (np.asarray(counts, dtype=np.int64).reshape(-1, 2), refused)
    return out


_COUNTERS: dict[str, TokenCounter] = {}


def _count_chunk(samples: Sequence[Sample]) -> dict[str, list[list[int] | str]]:
    samples = list(samples)
    return {name: counter.checked(samples) for name, counter in _COUNTERS.items()}


def _fingerprint(samples: Sequence[Sample]) -> str:
    """Hash of what the lengths depend on: ids, messages and images (`images.image_identity`). (Samples read by
    `read_dataset` carry one made by its check: the records' bytes and their images' identities.)"""
    data = [[s.id, s.messages, [image_identity(source) for source in s.images]] for s in samples]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
