"""Conversation records -> validated `Sample`s in Hugging Face chat format.

Reads a JSON array or JSONL file of records of the common shapes:
- LLaVA / ShareGPT: `conversations` of {"from": human | gpt | system, "value": text with `<image>` tags}, images in
  `image` (a path or a list) or `images`;
- OpenAI / ms-swift / LLaMA-Factory: `messages` of {"role", "content": text with `<image>` tags}, images in `images`;
- HF / TRL: `messages` whose content is a list of items, `{"type": "image"}` bound in order to `images`, or inline
  `{"type": "image", "image": ...}` / `{"type": "image_url", "image_url": {"url": ...}}`.
Every problem in the file is collected and reported at once, each naming the file, the record and its line. Records are
checked in chunks on several processes and kept as an index into the file (`Samples`), not as Python objects.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from codecs import BOM_UTF8
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

import numpy as np
from PIL import UnidentifiedImageError

from vlsi.data.images import ImageSource, UnusableImage, image_header, image_identity
from vlsi.data.parallel import chunks, default_num_proc, run_chunks

IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")
REMOTE_PREFIXES = ("http://", "https://", "ftp://", "s3://", "gs://")
MAX_SHOWN = 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclass
class Sample:
    """One conversation: `messages` in HF chat format, `{"type": "image"}` items in the order of `images` (each a
    file path or the bytes of an image file; read with `vlsi.data.images.load_image`). `sizes`: (width, height) of
    each image as loaded, read from its header by the check (None when not read)."""

    id: str
    messages: list[dict]
    images: list[ImageSource]
    sizes: list[tuple[int, int]] | None = field(default=None, compare=False, repr=False)


class DataError(ValueError):
    """Invalid data: `problems` holds one line per problem; `str()` shows a header and the first MAX_SHOWN."""

    def __init__(self, problems: list[str] | str, header: str | None = None):
        if header is None:  # one text: how a DataLoader worker's DataError reaches the main process
            problems, header = [], _from_worker(problems)
        self.problems, self.header = problems, header
        more = [f"... and {len(problems) - MAX_SHOWN} more"] if len(problems) > MAX_SHOWN else []
        super().__init__("\n".join([header, *problems[:MAX_SHOWN], *more]))

    def __reduce__(self):  # sent between processes (the main process's check, DataLoader workers)
        return DataError, (self.problems, self.header)


def _from_worker(text: str) -> str:
    """torch's DataLoader raises a worker's exception again in the main process as `type(text)`, `text` holding the
    worker's traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ... vlsi.data.records.
    DataError: MESSAGE"): MESSAGE alone, so that the run stops with the worker's own message, not a traceback."""
    marker = f"{DataError.__module__}.{DataError.__qualname__}: "
    return text.split(marker, 1)[1].strip() if marker in text else text


class BadRecord(DataError):
    """One record found invalid when it was loaded (data.validate=lazy); `index` is its position in the file."""

    def __init__(self, index: int, problem: str):
        self.index = index
        super().__init__([problem], problem)

    def __reduce__(self):
        return BadRecord, (self.index, self.header)


class Samples(Sequence):
    """The records of a data file as `Sample`s, read back from the file on access. Held in memory is an index, not
    the records: per record its position in the file, byte offset, byte length and line (24 bytes), plus 8 bytes
    per image for its size. Eager (`read_dataset`): only records that passed the check are indexed. Lazy
    (`read_dataset(lazy=True)`): every record is, and each is checked when accessed, raising BadRecord.

    `stamp` is the file's identity when it was indexed (`file_stamp`): the offsets are only valid for that file, so
    every read checks it again, and a file edited during the run stops it with a DataError naming it."""

    def __init__(self, path: Path, root: Path, unanswered: bool, table: np.ndarray, sizes: np.ndarray | None = None,
                 starts: np.ndarray | None = None, fingerprint: str | None = None, lazy: bool = False,
                 stamp: tuple[int, int] | None = None):  # fmt: skip
        self.path, self.root, self.unanswered, self.lazy = path, root, unanswered, lazy
        self.table = table  # [n, 4] int64: index in the file, byte offset, byte length, line
        self.sizes, self.starts = sizes, starts  # [images, 2] (width, height); [n + 1] first image of each record
        self.fingerprint = fingerprint  # hash of the records' bytes and their images' (path, size, mtime)
        self.stamp = stamp if stamp is not None else file_stamp(path)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        with open(self.path, "rb") as f:
            return self._read(f, i)

    def __iter__(self):
        with open(self.path, "rb") as f:  # one file handle for them all
            for i in range(len(self)):
                yield self._read(f, i)

    def _read(self, f, i: int) -> Sample:
        index, offset, length, line = (int(v) for v in self.table[i])
        f.seek(offset)
        raw = f.read(length)
        # Checked at every read, after it: one fstat of the open file (about a microsecond, next to the JSON parse).
        if file_stamp(f.fileno()) != self.stamp:
            raise DataError([], changed_during_run(self.path))
        if self.lazy:
            (sample_id, reasons, sizes, _), *_ = _check_records([(index, line, raw)], self.root, self.unanswered)
            if reasons:
                raise BadRecord(index, f"{self.path}: record {sample_id} (line {line}): {'; '.join(reasons)}")
            sample = _to_sample(json.loads(raw), sample_id, self.root, self.unanswered)[0]
            sample.sizes = sizes
            return sample
        record = json.loads(raw)
        sample = _to_sample(record, _record_id(record, index), self.root, self.unanswered)[0]
        if self.sizes is not None:
            sample.sizes = [tuple(size) for size in self.sizes[self.starts[i] : self.starts[i + 1]].tolist()]
        return sample

    def take(self, positions) -> Samples:
        """The records at `positions` (a sub-index; its fingerprint is left to be computed from the records)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.sizes is None:
            return Samples(
                self.path, self.root, self.unanswered, self.table[positions], lazy=self.lazy, stamp=self.stamp
            )
        counts = np.diff(self.starts)[positions]
        starts = np.concatenate([[0], np.cumsum(counts)])
        picked = np.repeat(self.starts[positions] - starts[:-1], counts) + np.arange(starts[-1])  # their images
        sizes = self.sizes[picked]
        table = self.table[positions]
        return Samples(self.path, self.root, self.unanswered, table, sizes, starts, lazy=self.lazy, stamp=self.stamp)

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None


def file_stamp(file: Path | int) -> tuple[int, int]:
    """(size, mtime_ns) of a file (a path or an open file's descriptor): what changes when it is edited, read
    without opening it. The data file's is taken before it is indexed and compared at every read (`Samples`)."""
    stat = os.fstat(file) if isinstance(file, int) else os.stat(file)
    return stat.st_size, stat.st_mtime_ns


def changed_during_run(path: Path) -> str:
    return (
        f"{path} changed while this run was reading it (its size or modification time is not what it was when the "
        "run indexed it); a run reads its data file until it ends: put the file back as it was and rerun (it "
        "resumes), or train on the edited file with a new --output"
    )


def load_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON array (or single object) or JSONL file, in order; DataError if it is empty or malformed."""
    path = Path(path)
    table, problems = _locate(path)
    records = []
    for (index, _, _, line), raw in zip(table.tolist(), _read_spans(path, table), strict=True):
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError as error:
            problems.append(
                f"{path}: record {index} (line {line}): malformed JSON at column {error.colno}: {error.msg}"
            )
    if problems:
        raise DataError(problems, f"{path} is not a valid JSON / JSONL data file:")
    return records


def read_dataset(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    unanswered: bool = False,
    num_proc: int | None = None,
    lazy: bool = False,
) -> tuple[Samples, list[str]]:
    """Validated samples of a data file and the problems of the records skipped (only with `skip_invalid`).

    Relative image paths resolve against `image_root`, by default the data file's directory. Without `skip_invalid`
    any problem raises DataError listing all of them; with it, invalid records are dropped, unless none is left.
    `unanswered` accepts records with no assistant turn that end with a user turn (data.answers=teacher: the teacher
    answers them before training, `vlsi.answers`). The records are checked on `num_proc` processes (default: every
    core this process may use); an image's header is read (format, size), its pixels are not decoded. `lazy`: only
    the file's structure is checked here, each record when it is accessed (`Samples`, data.validate=lazy).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    stamp = file_stamp(path)  # before the file is indexed: an edit from here on is caught when a record is read
    table, problems = _locate(path)
    if problems:
        raise DataError(problems, f"{len(problems)} invalid records in {path} (no valid record):")
    if lazy:
        return Samples(path, root, unanswered, table, lazy=True, stamp=stamp), []
    num_proc = num_proc or default_num_proc()
    ranges = chunks(len(table))
    results = run_chunks(
        _check_span,
        [(path, root, unanswered, table[r.start : r.stop]) for r in ranges],
        [len(r) for r in ranges],
        min(num_proc, len(ranges)),
        f"checking {path.name}",
        len(table),
    )
    digest = hashlib.sha256(str(path.resolve()).encode())

    def verdicts():
        for r, (checked, chunk_digest) in zip(ranges, results, strict=True):
            digest.update(chunk_digest)
            for position, (sample_id, reasons, image_sizes, parsed) in zip(r, checked, strict=True):
                yield position, sample_id, parsed, reasons, image_sizes

    def where(position: int, sample_id: str) -> str:
        return f"{path}: record {sample_id} (line {int(table[position, 3])})"

    def place(position: int) -> str:
        return f"on line {int(table[position, 3])}"

    keep, sizes, starts, problems = kept_records(verdicts(), where, place, skip_invalid, str(path))
    samples = Samples(path, root, unanswered, table[keep], sizes, starts, digest.hexdigest(), stamp=stamp)
    return samples, problems


def kept_records(
    verdicts, where: Callable, place: Callable, skip_invalid: bool, name: str
) -> tuple[list[int], np.ndarray, np.ndarray, list[str]]:
    """The records of data set `name` that passed their checks. `verdicts` yields, in record order, each record's
    (position, id, whether the id is the record's own (false for one that did not parse), reasons, image sizes);
    `where(position, id)` names a record in a problem, `place(position)` in a duplicate id's (ids must be unique).
    Returns the kept positions, their image sizes [M, 2] and each kept record's first row in them (starts [K + 1]),
    and the problems of those skipped; DataError when any is invalid and `skip_invalid` is off, or none is valid."""
    keep, sizes, counts, problems, first = [], [], [], [], {}
    for position, sample_id, own_id, reasons, image_sizes in verdicts:
        if own_id:
            if sample_id in first:
                reasons.append(f"duplicate id (also {place(first[sample_id])}); ids must be unique")
            first.setdefault(sample_id, position)
        problems += [f"{where(position, sample_id)}: {reason}" for reason in reasons]
        if not reasons:
            keep.append(position)
            sizes += image_sizes
            counts.append(len(image_sizes))
    if problems and (not skip_invalid or not keep):
        fix = "set data.skip_invalid=true to skip them" if keep else "no valid record"
        raise DataError(problems, f"{len(problems)} invalid records in {name} ({fix}):")
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    return keep, np.array(sizes, dtype=np.int32).reshape(-1, 2), starts, problems


def _record_id(record: object, index: int) -> str:
    return str(record["id"]) if isinstance(record, dict) and "id" in record else str(index)


def _check_span(path: Path, root: Path, unanswered: bool, table: np.ndarray) -> tuple[list, bytes]:
    """Check the records of `table` rows (one chunk, in a worker process): [(id, reasons, image sizes, parsed)] and
    a digest of their bytes and their images' (path, size, mtime)."""
    raws = _read_spans(path, table)
    digest = hashlib.sha256()
    checked = _check_records(
        [(int(row[0]), int(row[3]), raw) for row, raw in zip(table, raws, strict=True)], root, unanswered, digest
    )
    return checked, digest.digest()


def _check_records(records: list[tuple[int, int, bytes]], root: Path, unanswered: bool, digest=None) -> list[tuple]:
    """[(id, reasons, image sizes, whether it parsed)] for (index, line, bytes) records."""
    out, images = [], {}
    for index, _, raw in records:
        if digest is not None:
            digest.update(raw)
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            column = getattr(error, "colno", getattr(error, "start", 0) + 1)
            out.append((str(index), [f"malformed JSON at column {column}: {getattr(error, 'msg', error)}"], [], False))
            continue
        sample_id = _record_id(record, index)
        sample, reasons, refs = _to_sample(record, sample_id, root, unanswered)
        sizes = []
        for ref, image in zip(refs, sample.images if sample else [], strict=True):
            if image not in images:
                images[image] = _image_info(image, ref)
            size, problem, stat = images[image]  # stat: the image's identity
            if digest is not None:
                digest.update(json.dumps(stat).encode())
            if problem:
                reasons.append(problem)
            sizes.append(size)
        out.append((sample_id, reasons, sizes, True))
    return out


def _image_info(source: ImageSource, ref: object) -> tuple[tuple[int, int] | None, str | None, list | None]:
    """(width, height), the reason the image is unusable (None if its header reads) and its identity for the data
    fingerprint (`images.image_identity`). Only the header is read: decoding the pixels is what made checking slow.
    An image whose header is sound but whose pixel data is damaged is found when its sample is loaded for
    training, and skipped there (`VLDataset`)."""
    shown = _shown(ref)
    if isinstance(source, Path):
        try:
            stat = source.stat()
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            return None, f"image {shown}: file not found ({source})", None
    try:
        size = image_header(source)
    except UnusableImage as error:
        return None, f"image {shown}: {error}", None
    except UnidentifiedImageError:
        return None, f"image {shown}: not an image file (no format PIL reads); replace it", None
    except Exception as error:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, ... on bad bytes
        return None, f"image {shown}: cannot be decoded ({type(error).__name__}: {error})", None
    return size, None, image_identity(source)


def _shown(ref: object) -> str:
    """An image reference as messages quote it (a data: URI or embedded bytes cut short)."""
    if isinstance(ref, bytes | bytearray):
        return f"<{len(ref)} embedded bytes>"
    if isinstance(ref, dict):
        return repr(ref.get("path")) if ref.get("path") else f"<{len(ref.get('bytes') or b'')} embedded bytes>"
    text = str(ref)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _locate(path: Path) -> tuple[np.ndarray, list[str]]:
    """[n, 4] int64 rows (index in the file, byte offset, byte length, line) of every record of a JSON array, single
    JSON value or JSONL file, and the problems that concern the whole file (then no rows). JSONL is read line by
    line; a JSON array is held as text while its items are located."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    bom = len(BOM_UTF8) if head.startswith(BOM_UTF8) else 0
    first = head[bom:].lstrip()[:1]
    if first == b"[":
        return _locate_array(path, bom)
    rows, problems = _locate_lines(path, bom)
    if problems or len(rows) <= 1:
        return np.array(rows, dtype=np.int64).reshape(-1, 4), problems
    _, offset, length, _ = rows[0]
    with open(path, "rb") as f:
        f.seek(offset)
        first_line = f.read(length)
    try:
        json.loads(first_line)
    except json.JSONDecodeError:  # perhaps one JSON value over several lines
        text = path.read_bytes()[bom:].decode()
        try:
            json.loads(text)
        except json.JSONDecodeError:
            pass  # JSONL with a malformed first line: reported with the record
        else:
            start = len(text) - len(text.lstrip())
            rows = [(0, bom + start, len(text.encode()) - start, text[:start].count("\n") + 1)]
    return np.array(rows, dtype=np.int64).reshape(-1, 4), problems


def _locate_lines(path: Path, bom: int) -> tuple[list[tuple[int, int, int, int]], list[str]]:
    rows, offset = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            start = bom if n == 1 else 0
            try:
                raw[start:].decode()
            except UnicodeDecodeError as error:
                byte = offset + start + error.start
                return [], [f"{path}: not UTF-8 text (byte {byte}); save the data file as UTF-8 JSON or JSONL"]
            if raw.strip():
                rows.append((len(rows), offset + start, len(raw) - start, n))
            offset += len(raw)
    if not rows:
        return [], [f"{path}: empty file"]
    return rows, []


def _locate_array(path: Path, bom: int) -> tuple[np.ndarray, list[str]]:
    data = path.read_bytes()
    try:
        text = data[bom:].decode()
    except UnicodeDecodeError as error:
        return np.zeros((0, 4), np.int64), [
            f"{path}: not UTF-8 text (byte {bom + error.start}); save the data file as UTF-8 JSON or JSONL"
        ]
    try:
        spans = _array_items(text)
    except (json.JSONDecodeError, ValueError, IndexError):
        try:
            json.loads(text)
            raise AssertionError(f"{path}: valid JSON array that could not be indexed")  # noqa: TRY301
        except json.JSONDecodeError as error:
            return np.zeros((0, 4), np.int64), [
                f"{path}: malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
            ]
    if not spans:
        return np.zeros((0, 4), np.int64), [f"{path}: empty JSON array, no records"]
    ascii_only = text.isascii()
    rows, chars, byte = [], 0, bom
    for index, (line, start, end) in enumerate(spans):
        if not ascii_only:  # characters -> bytes, one item at a time
            byte += len(text[chars:start].encode())
            length = len(text[start:end].encode())
            byte_start, chars = byte, end
            byte += length
        else:
            byte_start, length = bom + start, end - start
        rows.append((index, byte_start, length, line))
    return np.array(rows, dtype=np.int64), []


def _array_items(text: str) -> list[tuple[int, int, int]]:
    """(line, start, end) in characters of each element of a top-level JSON array; raises on malformed JSON."""
    decoder = json.JSONDecoder()
    items, line, seen = [], 1, 0
    pos = _WHITESPACE.match(text, text.index("[") + 1).end()
    if text[pos] != "]":
        while True:
            line, seen = line + text.count("\n", seen, pos), pos
            _, end = decoder.raw_decode(text, pos)
            items.append((line, pos, end))
            pos = _WHITESPACE.match(text, end).end()
            if text[pos] == ",":
                pos = _WHITESPACE.match(text, pos + 1).end()
            elif text[pos] == "]":
                break
            else:
                raise ValueError(pos)
    if text[pos + 1 :].strip(" \t\n\r"):
        raise ValueError(pos)
    return items


def _read_spans(path: Path, table: np.ndarray) -> list[bytes]:
    """The bytes of each record of `table`."""
    raws = []
    with open(path, "rb") as f:
        for _, offset, length, _ in table.tolist():
            f.seek(offset)
            raws.append(f.read(length))
    return raws


def _to_sample(
    record: object, sample_id: str, root: Path, unanswered: bool = False
) -> tuple[Sample | None, list[str], list[str | bytes]]:
    """The record as a Sample (its images' files unchecked), the reasons it is invalid (the sample is only usable
    when there are none) and its image references. `unanswered`: a record with no assistant turn is valid when it
    ends with a user turn (the teacher answers it). The shapes read are listed in the module docstring; a key that
    would change what is trained (videos, weights, tools) is honoured or refused, never ignored."""
    if not isinstance(record, dict) or not (
        isinstance(record.get("conversations"), list) or isinstance(record.get("messages"), list)
    ):
        return None, ["neither LLaVA format (a 'conversations' list) nor OpenAI format (a 'messages' list)"], []
    if record.get("conversations") is not None and record.get("messages") is not None:  # null: a dataset's column
        return None, ["both 'conversations' and 'messages': keep one of them"], []
    reasons = _refused_keys(record)
    turns = record["conversations"] if isinstance(record.get("conversations"), list) else record["messages"]
    messages, slots = [], []  # slots: per image item in order, its inline reference or None (bound to `images`)
    for i, turn in enumerate(turns):
        message = _message(turn, i, reasons)
        if message is not None:
            messages.append(message)
            slots += [item.pop("ref", None) for item in message["content"] if item["type"] == "image"]
    reasons += _system_key(record, messages)
    refs = _bind_images(record, messages, slots, reasons)
    asks = bool(messages) and messages[-1]["role"] == "user"
    if not any(is_labelled(m) for m in messages) and not (unanswered and asks):
        fix = "; set data.answers=teacher to have the teacher answer it" if asks else ""
        weighted = any(m["role"] == "assistant" for m in messages)
        reasons.append(f"no {'trained ' if weighted else ''}assistant turn, so nothing to learn from{fix}")
    elif messages[0]["role"] == "assistant":
        reasons.append("the conversation starts with an assistant turn; add the user turn it answers")
    for i, message in enumerate(messages):
        text = "".join(item.get("text", "") for item in message["content"])
        if message["role"] == "assistant" and not text.strip():
            reasons.append(f"turn {i}: assistant turn has no text")
        if message["role"] == "assistant" and any(item["type"] == "image" for item in message["content"]):
            reasons.append(f"turn {i}: an image in an assistant turn; images belong in user turns")
    sources, refs, problems = _resolve(refs, root)
    return Sample(sample_id, messages, sources), reasons + problems, refs


def _resolve(refs: list, root: Path) -> tuple[list[ImageSource], list, list[str]]:
    """(sources, the references they came from, problems) for a record's image references: a local path (relative
    to `root`; `file://` allowed), a `data:` URI (base64), the bytes of an image file, or a `datasets` image
    ({"bytes": ..., "path": ...}). URLs are refused: vlsi reads no network (download the images first)."""
    sources, kept, problems = [], [], []
    for ref in refs:
        try:
            sources.append(_source(ref, root))
            kept.append(ref)
        except ValueError as error:
            problems.append(f"image {_shown(ref)}: {error}")
    return sources, kept, problems


def _source(ref: object, root: Path) -> ImageSource:
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):  # a datasets Image(decode=False) value
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, bytes | bytearray):
        return bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise ValueError("expected a path, a data: URI or image bytes")
    if ref.startswith(REMOTE_PREFIXES):
        raise ValueError("remote images are not read (vlsi reads no network); download them and give local paths")
    if ref.startswith("data:"):
        header, comma, payload = ref.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError("a data: URI must be base64 (data:image/png;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"the data: URI is not valid base64 ({error})") from None
    path = Path(ref.removeprefix("file://"))
    return path if path.is_absolute() else root / path


def _refused_keys(record: dict) -> list[str]:
    """Problems of the record-level keys that carry intent vlsi cannot follow: videos, tools, a sample weight."""
    reasons = [
        f"'{key}': videos are not supported; remove the key (and its <video> tags) or the record"
        for key in ("video", "videos")
        if record.get(key) not in (None, [], "")
    ]
    if record.get("tools") not in (None, [], ""):
        reasons.append("'tools': tool calls are not supported; remove the key or the record")
    if record.get("image") is not None and record.get("images") is not None:
        reasons.append("both 'image' and 'images': keep one list of images")
    for key, default in (("weight", 1), ("loss", True)):
        if record.get(key) not in (None, default):
            reasons.append(
                f"'{key}': {json.dumps(record[key])}: a per-record {key} is not applied; remove the record to leave "
                f"it out of training (per-turn '{key}' on assistant turns is honoured)"
            )
    return reasons


def _message(turn: object, i: int, reasons: list[str]) -> dict | None:
    """A turn of either shape as {"role", "content": items}, image items carrying "ref" when inline; None (with a
    reason) when it cannot be read. LLaVA / ShareGPT turns: {"from": human | gpt | system, "value": text}; OpenAI /
    HF turns: {"role", "content": text or content items}. In text, `<image>` marks an image; in content items,
    an image item does."""
    if isinstance(turn, dict) and isinstance(turn.get("value"), str) and "from" in turn:
        role = LLAVA_ROLES.get(turn["from"], turn["from"])
        if role not in ROLES:  # kept as is, so later checks do not report its absence
            reasons.append(f"turn {i}: unknown role {turn['from']!r} (expected 'human', 'gpt' or 'system')")
        content = _split_placeholders(turn["value"])
    elif isinstance(turn, dict) and "role" in turn:
        role = turn["role"]
        if role not in ROLES:
            reasons.append(f"turn {i}: unknown role {role!r} (expected 'system', 'user' or 'assistant')")
        content = turn.get("content")
        if isinstance(content, str):
            content = _split_placeholders(content)
        elif isinstance(content, list):
            content = _content_items(content, i, reasons)
        else:
            reasons.append(f"turn {i}: 'content' must be a string or a list of content items")
            return None
    else:
        reasons.append(f"turn {i}: expected {{'from': ..., 'value': <text>}} or {{'role': ..., 'content': ...}}")
        return None
    message = {"role": role, "content": content}
    trained = _trained(turn, role, i, reasons)
    if not trained:
        message["loss"] = False
    return message


def _trained(turn: dict, role: str, i: int, reasons: list[str]) -> bool:
    """Whether an assistant turn is labelled: per-turn `weight` (0 or 1, axolotl's ShareGPT) or `loss` (a bool,
    ms-swift's). Other values, and asking to train on a turn that is not the assistant's, are refused."""
    trained = True
    for key, allowed, valid in (
        ("weight", (0, 1), lambda v: isinstance(v, int | float) and not isinstance(v, bool) and v in (0, 1)),
        ("loss", (False, True), lambda v: isinstance(v, bool)),
    ):
        value = turn.get(key)
        if value is None:
            continue
        if not valid(value):
            reasons.append(f"turn {i}: '{key}' must be {' or '.join(json.dumps(v) for v in allowed)}, got {value!r}")
        elif role != "assistant" and value == allowed[1]:
            reasons.append(f"turn {i}: '{key}': {json.dumps(value)} on a {role} turn; only assistant turns are trained")
        trained = trained and value != allowed[0]
    return trained


def is_labelled(message: dict) -> bool:
    """Whether the tokens of a message are trained: assistant turns not marked `"loss": False`."""
    return message["role"] == "assistant" and message.get("loss", True)


def _content_items(content: list, i: int, reasons: list[str]) -> list[dict]:
    """HF / OpenAI content items -> text and image items; an image item with its reference (inline) keeps it under
    "ref", a bare `{"type": "image"}` (other fields null, as a datasets struct column holds it) takes the next of
    the record's `images`."""
    items = []
    for item in content:
        ref = _image_ref(item)
        if ref is not None:
            items.append({"type": "image", "ref": ref})
        elif (
            isinstance(item, dict)
            and item.get("type") == "image"
            and all(value is None for key, value in item.items() if key != "type")
        ):
            items.append({"type": "image"})
        elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            items.append({"type": "text", "text": item["text"]})
        else:
            reasons.append(f"turn {i}: unsupported content item {json.dumps(item, default=repr)[:80]}")
    return items


def _system_key(record: dict, messages: list[dict]) -> list[str]:
    """A top-level `system` string (LLaMA-Factory's layout) becomes the first turn."""
    system = record.get("system")
    if system in (None, ""):
        return []
    if not isinstance(system, str):
        return ["'system' must be a string"]
    if any(m["role"] == "system" for m in messages):
        return ["both a top-level 'system' and a system turn: keep one"]
    messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
    return []


def _bind_images(record: dict, messages: list[dict], slots: list, reasons: list[str]) -> list[str | bytes]:
    """The references of the record's images in the order of its image items: inline ones as given, the others
    bound in order to the top-level `images` (or `image`) list. A record whose list has images and whose turns mark
    none gets them at the start of its first user turn (LLaVA's convention); any other difference in number is a
    problem, never an image dropped or a tag left as text."""
    key = "images" if record.get("images") is not None else "image"
    given = _top_level_images(record.get(key))
    bound = slots.count(None)
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if given and not slots and first_user is not None:
        first_user["content"] = [{"type": "image"} for _ in given] + first_user["content"]
        return given
    if bound != len(given):
        reasons.append(f"{bound} <image> tags or {{'type': 'image'}} items but {len(given)} images in '{key}'")
        return [ref for ref in slots if ref is not None]
    given = iter(given)
    return [ref if ref is not None else next(given) for ref in slots]


def _top_level_images(value: object) -> list:
    """A record's `images` / `image` as a list of image references (`_resolve` reads them); null: none."""
    return [] if value is None else value if isinstance(value, list) else [value]


def _split_placeholders(text: str) -> list[dict]:
    """'a<image>\\nb' -> [text 'a', image, text 'b']: the newline right after a placeholder belongs to it."""
    content = []
    for i, part in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
            part = part.removeprefix("\n")
        if part:
            content.append({"type": "text", "text": part})
    return content


def _image_ref(item: object) -> object | None:
    """The reference of an image content item (`image` or `image_url` type): a path or URL, or, inline in a dataset
    row, the image's bytes or a `datasets` image value ({"bytes", "path"}); None for anything else."""
    if not isinstance(item, dict):
        return None
    image = item.get("image")
    if item.get("type") == "image" and (
        isinstance(image, str | bytes) or (isinstance(image, dict) and (image.get("bytes") or image.get("path")))
    ):
        return image
    url = item.get("image_url")
    url = url.get("url") if isinstance(url, dict) else None
    return url if item.get("type") == "image_url" and isinstance(url, str) else None
