"""Where samples come from: a JSON / JSONL file (`records.py`), a Hugging Face dataset, or several of them mixed.

A source is written `PATH[:CONFIG][@SPLIT]` (`data.path`, `--data`):

    train.jsonl                                  a JSON / JSONL file of records (`read_dataset`)
    shard.parquet, part.arrow                    one parquet or arrow file
    shards/                                      a folder of parquet (or arrow) shards, or a hub repo's download
    saved/                                       a folder written by `Dataset.save_to_disk` (a DatasetDict: @SPLIT)
    HuggingFaceM4/the_cauldron:ai2d@train        a hub dataset id, its config and split (default split: train)

Folders of shards and hub ids are opened by the same call, `datasets.load_dataset(PATH, CONFIG, split=SPLIT)`: a
folder laid out as a hub repo (its README's `configs:`) reads as the hub id would. The `datasets` library keeps the
rows memory-mapped (parquet is converted once into its arrow cache); images stay encoded bytes in the rows and are
decoded only when a sample is loaded. A row's columns are mapped to a record's keys (`data.columns.*`,
`data.preset`) and read by the same parser as a JSON record (`records._to_sample`).

A mixture (several `--data`, or a mixture file listing sources with their own image root, columns and `weight` or
`samples`) is one sequence over all of them; which records each source gives is drawn from the seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from vlsi.data.parallel import chunks, default_num_proc, run_chunks
from vlsi.data.records import (
    BadRecord,
    DataError,
    Sample,
    Samples,
    _image_info,
    _to_sample,
    kept_records,
    read_dataset,
)

log = logging.getLogger("vlsi")
HF_SUFFIXES = (".parquet", ".arrow")
MIXTURE_SUFFIXES = (".yaml", ".yml")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
SPEC = re.compile(r"(?P<base>.+?)(?::(?P<config>[^:@/\\]+))?(?:@(?P<split>[^:@/\\]+))?")
# Record keys a row's columns are mapped to (`data.columns.<key>=<column>`); `texts`: the_cauldron's list of
# {"user", "assistant"} pairs, turned into a conversation.
KEYS = ("id", "conversations", "messages", "texts", "images", "image")
PRESETS = {
    "trl": {"messages": "messages", "images": "images"},  # TRL's vision datasets: content items + images
    "cauldron": {"texts": "texts", "images": "images"},  # HuggingFaceM4/the_cauldron
    "onevision": {"id": "id", "conversations": "conversations", "image": "image"},  # lmms-lab/LLaVA-OneVision-Data
}
# Columns that carry intent the parser honours or refuses (`records._to_sample`): passed on whenever present.
INTENT = ("system", "video", "videos", "tools", "weight", "loss")
BLOCK = 256  # rows read at once when a dataset's samples are iterated
SOURCE_KEYS = ("path", "image_root", "preset", "columns", "weight", "samples", "name")


@dataclass
class Source:
    """One entry of `data.path` or of a mixture file. `weight`: how many times each valid record is taken (2: twice,
    0.5: a half drawn from the seed); `samples`: how many records are taken (drawn likewise); neither: each once."""

    path: str
    image_root: str = ""
    preset: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    weight: float | None = None
    samples: int | None = None
    name: str = ""

    def __post_init__(self):
        self.name = self.name or self.path


def parse_sources(data) -> list[Source]:
    """The sources of a `DataConfig`: each of `data.path` (a string or a list), a mixture file expanded into its
    entries. `data.image_root` applies to the sources that set none of their own; `data.preset` and `data.columns`
    to the datasets among them (a JSON / JSONL file's records name their keys)."""
    paths = data.path if isinstance(data.path, list) else [data.path]
    columns = {key: value for key, value in vars(data.columns).items() if value}
    sources = []
    for path in paths:
        if Path(path).suffix in MIXTURE_SUFFIXES or _is_mixture_json(Path(path)):
            sources += read_mixture(Path(path), data.image_root, data.preset, columns)
        elif _is_records_file(path):
            sources.append(Source(str(path), data.image_root))
        else:
            sources.append(Source(str(path), data.image_root, data.preset, columns))
    if (data.preset != "auto" or columns) and all(_is_records_file(s.path) for s in sources):
        raise DataError(
            [], "data.preset and data.columns are for datasets (parquet, arrow, hub ids); data.path has none"
        )
    names = [s.name for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError([], f"data.path: sources {repeated} are given twice; give each once (a `weight` repeats one)")
    return sources


def _is_records_file(path: str) -> bool:
    """A JSON / JSONL file of records (read by `read_dataset`), not a dataset."""
    return Path(path).is_file() and Path(path).suffix not in HF_SUFFIXES


def _is_mixture_json(path: Path) -> bool:
    """A .json file holding one object with a `sources` list (a data file's single record has none)."""
    if path.suffix != ".json" or not path.is_file() or path.stat().st_size > 1 << 20:
        return False
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(value, dict) and "sources" in value


def read_mixture(path: Path, image_root: str = "", preset: str = "auto", columns: dict | None = None) -> list:
    """The sources a mixture file lists (YAML or JSON: `sources: [{path, image_root, preset, columns, weight or
    samples, name}, ...]`); its relative paths and image roots are relative to the file's folder (`image_root`, the
    default for the entries that give none, is used as given)."""
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DataError([], f"{path}: cannot read the mixture file ({type(error).__name__}: {error})") from None
    entries = value.get("sources") if isinstance(value, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError([], f"{path}: a mixture file holds `sources:`, a list of {{path: ..., weight: ...}} entries")
    sources = []
    for i, entry in enumerate(entries):
        where = f"{path}: sources[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise DataError([], f"{where}: each source is a mapping with a `path`")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise DataError([], f"{where}: unknown keys {unknown}; a source takes {', '.join(SOURCE_KEYS)}")
        if "weight" in entry and "samples" in entry:
            raise DataError([], f"{where}: give `weight` or `samples`, not both")
        weight, samples = entry.get("weight"), entry.get("samples")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0):
            raise DataError([], f"{where}: weight must be a number > 0, got {weight!r}")
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise DataError([], f"{where}: samples must be a whole number >= 1, got {samples!r}")
        if not isinstance(entry.get("columns", {}), dict):
            raise DataError([], f"{where}: columns must map record keys to column names, e.g. {{messages: chat}}")
        local = path.parent / entry["path"]
        spec = str(local) if local.exists() or _local_base(str(local)) else entry["path"]
        root = str(path.parent / entry["image_root"]) if entry.get("image_root") else image_root  # as given
        name = str(entry.get("name", "")) or entry["path"]
        if _is_records_file(spec):  # its records name their keys: a preset or columns of its own are a mistake
            source = Source(spec, root, entry.get("preset", "auto"), entry.get("columns", {}), weight, samples, name)
        else:
            kinds = entry.get("preset", preset), {**(columns or {}), **entry.get("columns", {})}
            source = Source(spec, root, *kinds, weight, samples, name)
        sources.append(source)
    return sources


def _local_base(spec: str) -> bool:
    """Whether `spec` is a local folder or file with :CONFIG@SPLIT after it."""
    match = SPEC.fullmatch(spec)
    return bool(match) and Path(match["base"]).exists()


# ---------------------------------------------------------------- reading


def read_sources(
    sources: list[Source],
    seed: int = 0,
    skip_invalid: bool = False,
    unanswered: bool = False,
    num_proc: int | None = None,
    lazy: bool = False,
) -> tuple[Sequence[Sample], dict[str, list[str]]]:
    """The samples of `sources` and, per source name, the problems of the records skipped (`skip_invalid`). One
    source: its own sequence (`Samples`, `DatasetSamples`); several: a `Mixture`, each source's records taken as its
    `weight` or `samples` ask, drawn from `seed`. Problems raise DataError as `read_dataset` does, naming the source."""
    parts, problems = [], {}
    for source in sources:
        samples, skipped = read_source(source, skip_invalid, unanswered, num_proc, lazy)
        parts.append(samples)
        problems[source.name] = skipped
    if len(sources) == 1 and sources[0].weight is None and sources[0].samples is None:
        return parts[0], problems
    return Mixture.of(parts, sources, seed), problems


def read_source(
    source: Source, skip_invalid: bool = False, unanswered: bool = False, num_proc: int | None = None, lazy=False
) -> tuple[Sequence[Sample], list[str]]:
    """One source's samples and the problems of those skipped: `read_dataset` for a JSON / JSONL file, else
    `read_hf`."""
    if _is_records_file(source.path):
        if source.preset != "auto" or source.columns:
            raise DataError([], f"{source.path}: a preset and columns are for datasets (parquet, arrow, hub ids)")
        return read_dataset(source.path, source.image_root or None, skip_invalid, unanswered, num_proc, lazy)
    return read_hf(source, skip_invalid, unanswered, num_proc, lazy)


def open_dataset(spec: str):
    """The `datasets.Dataset` a source names (module docstring), memory-mapped; DataError naming it when it cannot
    be opened."""
    import datasets

    base, config, split = (spec, None, None) if Path(spec).exists() else SPEC.fullmatch(spec).groups()
    path = Path(base)
    if not path.exists() and not HUB_ID.fullmatch(base):
        raise DataError([], f"data.path {spec}: no such file or folder, and not a hub id (OWNER/NAME[:CONFIG][@SPLIT])")
    try:
        if path.is_file() and path.suffix == ".arrow":
            dataset = datasets.Dataset.from_file(str(path))
        elif path.is_file():
            dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
        elif (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if (split or "train") not in dataset:
                    raise DataError([], f"data.path {spec}: no split {split or 'train'!r}; it has {list(dataset)}")
                dataset = dataset[split or "train"]
        else:
            dataset = datasets.load_dataset(base, config, split=split or "train")
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 -- datasets raises many types (FileNotFoundError, ConnectionError, ...)
        offline = "; a hub id is read from the network or the hub cache: download the set, give its folder"
        offline = "" if path.exists() else offline
        raise DataError(
            [], f"data.path {spec}: cannot be read as a dataset ({type(error).__name__}: {error}){offline}"
        ) from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError([], f"data.path {spec}: holds several splits ({list(dataset)}); name one as {base}@SPLIT")
    return dataset


def column_map(dataset_columns: list[str], preset: str, columns: dict[str, str], name: str) -> dict[str, str]:
    """{record key: column} for a dataset: the preset's columns (`auto`: the keys that are column names), then
    `columns`; DataError naming the source when a mapped column is missing or no conversation column is found."""
    if preset != "auto" and preset not in PRESETS:
        raise DataError([], f"{name}: data.preset={preset!r} is not one of auto, {', '.join(PRESETS)}")
    unknown = sorted(set(columns) - set(KEYS))
    if unknown:
        raise DataError([], f"{name}: data.columns: unknown keys {unknown}; map any of {', '.join(KEYS)}")
    mapping = PRESETS.get(preset) or {key: key for key in KEYS if key in dataset_columns}
    mapping = {**mapping, **columns}
    missing = {key: column for key, column in mapping.items() if column not in dataset_columns}
    if missing:
        raise DataError(
            [],
            f"{name}: no column {', '.join(repr(c) for c in missing.values())} (for {', '.join(missing)}); its "
            f"columns are {dataset_columns}: set data.columns.<key>=<column> or another data.preset",
        )
    if not {"conversations", "messages", "texts"} & mapping.keys():
        raise DataError(
            [],
            f"{name}: no conversation column among {dataset_columns}; set data.columns.messages=<column> (or "
            f"conversations, texts), or data.preset={' / '.join(PRESETS)}",
        )
    mapping |= {key: key for key in INTENT if key in dataset_columns and key not in mapping.values()}
    return mapping


def to_record(row: dict) -> dict:
    """A row under record keys as `records._to_sample` reads it: the_cauldron's `texts` pairs become `messages`;
    fields a struct column fills with null for the items that lack them are dropped."""
    record = {key: _drop_nulls(value) for key, value in row.items() if value is not None}
    texts = record.pop("texts", None)
    if texts is not None:
        pairs = texts if isinstance(texts, list) else []
        record["messages"] = [
            {"role": role, "content": pair.get(key)}
            for pair in pairs
            for role, key in (("user", "user"), ("assistant", "assistant"))
            if isinstance(pair, dict)
        ]
        if not pairs or not all(isinstance(p, dict) and "user" in p and "assistant" in p for p in pairs):
            record["messages"] = [{"role": "texts", "content": "must be a list of {user, assistant} pairs"}]
    return record


def _drop_nulls(value):
    """Nulls inside lists of dicts dropped (a content item {"type": "image", "text": null} is {"type": "image"});
    image storage ({"bytes", "path"}) is kept whole."""
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    if isinstance(value, dict) and set(value) != {"bytes", "path"}:
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    return value


class DatasetSamples(Sequence):
    """The rows of a Hugging Face dataset as `Sample`s, read on access: held in memory are the dataset (memory-mapped)
    and an index (the row of each sample, and each image's size from the check). Eager (`read_hf`): only rows that
    passed the check are indexed; lazy: every row is, and each is checked when accessed, raising BadRecord."""

    def __init__(self, source: Source, dataset, mapping: dict[str, str], unanswered: bool, rows: np.ndarray,
                 sizes: np.ndarray | None = None, starts: np.ndarray | None = None, fingerprint: str | None = None,
                 lazy: bool = False):  # fmt: skip
        self.source, self.mapping, self.unanswered, self.lazy = source, mapping, unanswered, lazy
        self.dataset = dataset.select_columns(list(mapping.values())).with_format("arrow")  # rows stay encoded
        self.root = Path(source.image_root) if source.image_root else _default_root(source.path)
        self.rows = rows  # [n] int64: the dataset row of each sample
        self.sizes, self.starts = sizes, starts  # [images, 2] (width, height); [n + 1] first image of each sample
        self.fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        row = int(self.rows[i])
        return self._sample(self.records(row, row + 1)[0], row, i)

    def __iter__(self):
        """The samples in order, read BLOCK rows at a time where they lie close together (one arrow read each)."""
        for start in range(0, len(self), BLOCK):
            rows = self.rows[start : start + BLOCK].tolist()
            first, last = min(rows), max(rows)
            if last - first + 1 > 2 * len(rows):  # scattered (a shuffled sub-index): row by row
                yield from (self[i] for i in range(start, start + len(rows)))
                continue
            records = self.records(first, last + 1)
            for k, row in enumerate(rows):
                yield self._sample(records[row - first], row, start + k)

    def _sample(self, record: dict, row: int, i: int) -> Sample:
        """Sample i from its row's record: checked first when lazy, else given the image sizes of the check."""
        if self.lazy:
            ((sample, sample_id, reasons, sizes, _),) = check_rows([(row, record)], self.root, self.unanswered)
            if reasons:
                raise BadRecord(row, f"{self.where_row(row, sample_id)}: {'; '.join(reasons)}")
            sample.sizes = sizes
            return sample
        sample, _, _ = _to_sample(record, _row_id(record, row), self.root, self.unanswered)
        if self.sizes is not None:
            sample.sizes = [tuple(size) for size in self.sizes[self.starts[i] : self.starts[i + 1]].tolist()]
        return sample

    def records(self, start: int, stop: int) -> list[dict]:
        """The records of dataset rows start..stop-1 (one arrow read)."""
        table = self.dataset[start:stop]
        columns = {key: table.column(column).to_pylist() for key, column in self.mapping.items()}
        return [to_record(dict(zip(columns, values, strict=True))) for values in zip(*columns.values(), strict=True)]

    def where(self, i: int) -> str:
        row = int(self.rows[i])
        return self.where_row(row, _row_id(self.records(row, row + 1)[0], row))

    def where_row(self, row: int, sample_id: str) -> str:
        return f"{self.source.name}: record {sample_id} (row {row})"

    def take(self, positions) -> DatasetSamples:
        """The samples at `positions` (a sub-index; its fingerprint is left to be computed from the samples)."""
        positions = np.asarray(positions, dtype=np.int64)
        taken = DatasetSamples.__new__(DatasetSamples)
        taken.__dict__ = dict(self.__dict__, rows=self.rows[positions], fingerprint=None)
        if self.sizes is not None:
            counts = np.diff(self.starts)[positions]
            taken.starts = np.concatenate([[0], np.cumsum(counts)])
            picked = np.repeat(self.starts[positions] - taken.starts[:-1], counts) + np.arange(taken.starts[-1])
            taken.sizes = self.sizes[picked]
        return taken

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None


def _default_root(spec: str) -> Path:
    """Relative image paths in a dataset resolve against its file's folder, or the folder itself."""
    path = Path(spec)
    return path.parent if path.is_file() else path if path.is_dir() else Path.cwd()


def _row_id(record: dict, row: int) -> str:
    return str(record["id"]) if record.get("id") is not None else str(row)


def read_hf(
    source: Source, skip_invalid: bool = False, unanswered: bool = False, num_proc: int | None = None, lazy=False
) -> tuple[DatasetSamples, list[str]]:
    """A dataset source's samples and the problems of those skipped, as `read_dataset` gives a JSONL file's: every
    row checked on `num_proc` processes (its record, each image's header), or none here when `lazy`."""
    dataset = open_dataset(source.path)
    mapping = column_map(dataset.column_names, source.preset, source.columns, source.name)
    identity = [source.path, source.image_root, mapping, unanswered, dataset._fingerprint, _file_stats(dataset)]
    digest = hashlib.sha256(json.dumps(identity).encode())
    everything = DatasetSamples(source, dataset, mapping, unanswered, np.arange(len(dataset), dtype=np.int64))
    if len(dataset) == 0:
        raise DataError([], f"{source.name}: empty dataset, no records")
    if lazy:
        everything.lazy = True
        return everything, []
    num_proc = num_proc or default_num_proc()
    ranges = chunks(len(dataset))
    global _CHECKING
    _CHECKING = everything  # inherited by the forked workers: a task carries only its range
    results = run_chunks(
        _check_range,
        [(r.start, r.stop) for r in ranges],
        [len(r) for r in ranges],
        min(num_proc, len(ranges)),
        f"checking {source.name}",
        len(dataset),
    )  # a generator: chunks are checked (reading _CHECKING) as `verdicts` consumes them

    def verdicts():
        for r, (checked, chunk_digest) in zip(ranges, results, strict=True):
            digest.update(chunk_digest)
            for row, (sample_id, reasons, image_sizes) in zip(r, checked, strict=True):
                yield row, sample_id, True, reasons, image_sizes

    where, place = everything.where_row, lambda row: f"in row {row}"
    try:
        keep, sizes, starts, problems = kept_records(verdicts(), where, place, skip_invalid, source.name)
    finally:
        _CHECKING = None
    rows = np.array(keep, dtype=np.int64)
    return DatasetSamples(source, dataset, mapping, unanswered, rows, sizes, starts, digest.hexdigest()), problems


_CHECKING: DatasetSamples | None = None


def _check_range(start: int, stop: int) -> tuple[list, bytes]:
    """Check rows start..stop-1 of the dataset being read (one chunk, in a worker process)."""
    digest = hashlib.sha256()
    records = _CHECKING.records(start, stop)
    checked = check_rows(list(zip(range(start, stop), records, strict=True)), _CHECKING.root, _CHECKING.unanswered)
    for _, _, _, _, identities in checked:
        digest.update(json.dumps(identities).encode())
    return [(sample_id, reasons, sizes) for _, sample_id, reasons, sizes, _ in checked], digest.digest()


def check_rows(rows: list[tuple[int, dict]], root: Path, unanswered: bool) -> list[tuple]:
    """[(sample, id, reasons, image sizes, image identities)] of (row, record) pairs: the record parsed as a JSON
    record is (`records._to_sample`), each image's header read as a JSON record's are (`records._image_info`: its
    pixels are not decoded)."""
    out = []
    for row, record in rows:
        sample_id = _row_id(record, row)
        sample, reasons, refs = _to_sample(record, sample_id, root, unanswered)
        sizes, identities = [], []
        for ref, image in zip(refs, sample.images if sample else [], strict=True):
            size, problem, identity = _image_info(image, ref)
            if problem:
                reasons.append(problem)
            sizes.append(size)
            identities.append(identity)
        out.append((sample, sample_id, reasons, sizes, identities))
    return out


def _file_stats(dataset) -> list:
    """[name, size, mtime] of the arrow files a dataset maps (a file replaced in place changes them)."""
    stats = []
    for entry in dataset.cache_files:
        stat = os.stat(entry["filename"])
        stats.append([entry["filename"], stat.st_size, stat.st_mtime_ns])
    return stats


# ---------------------------------------------------------------- mixtures


class Mixture(Sequence):
    """Samples of several sources: position i is `parts[k][j]` for (k, j) = picks[i], its id prefixed with the
    source's name (ids need only be unique within a source)."""

    def __init__(self, parts: list[Sequence], names: list[str], picks: np.ndarray, fingerprint: str | None = None):
        self.parts, self.names = parts, names
        self.picks = picks  # [n, 2] int64: source, position in it
        self.fingerprint = fingerprint

    @classmethod
    def of(cls, parts: list[Sequence], sources: list[Source], seed: int) -> Mixture:
        """Each source's records as many times as its `weight` or `samples` ask: whole copies in order, the rest
        drawn without replacement from a generator seeded with (`seed`, the source's position)."""
        picks = []
        for k, (part, source) in enumerate(zip(parts, sources, strict=True)):
            n = len(part)
            count = source.samples if source.samples is not None else round((source.weight or 1) * n)
            whole, rest = divmod(count, n)
            drawn = np.sort(np.random.default_rng([seed, k]).permutation(n)[:rest])
            positions = np.concatenate([np.tile(np.arange(n), whole), drawn]).astype(np.int64)
            picks.append(np.stack([np.full_like(positions, k), positions], axis=1))
        picks = np.concatenate(picks)
        fingerprints = [getattr(part, "fingerprint", None) for part in parts]
        fingerprint = None
        if all(fingerprints):
            names = [source.name for source in sources]
            identity = json.dumps([names, fingerprints, hashlib.sha256(picks.tobytes()).hexdigest()])
            fingerprint = hashlib.sha256(identity.encode()).hexdigest()
        return cls(parts, [source.name for source in sources], picks, fingerprint)

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        k, j = (int(v) for v in self.picks[i])
        sample = self.parts[k][j]
        sample.id = f"{self.names[k]}/{sample.id}"
        return sample

    def where(self, i: int) -> str:
        k, j = (int(v) for v in self.picks[i])
        return where(self.parts[k], j)

    def take(self, positions) -> Mixture:
        return Mixture(self.parts, self.names, self.picks[np.asarray(positions, dtype=np.int64)])

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None


def where(samples: Sequence[Sample], i: int) -> str:
    """Where sample i comes from, for messages: its file or source, record and line or row."""
    if hasattr(samples, "where"):
        return samples.where(i)
    if isinstance(samples, Samples):
        return f"{samples.path}: record {samples[i].id} (line {int(samples.table[i, 3])})"
    return f"record {samples[i].id}"
