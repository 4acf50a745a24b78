"""Teacher once, students many (docs/CACHE.md): run the frozen teacher over the data once and keep, for every response
token, the top-k log-probabilities of every teacher target layer's verbalized distribution and of its final output,
plus the log of the mass left outside them. The interaction stage then trains from the cache without loading the
teacher's weights (`teacher_cache=C`), for every student, seed and ablation row.

    vlsi cache --teacher T --data train.json --output C teacher_verbalizers=DIR [cache.top_k=64] [key=value ...]
    vlsi train --teacher T --student S --data train.json --output OUT teacher_cache=C   # builds C first if empty

From Python: `build_cache(cfg, folder, verbalizers_dir)` builds (or finishes, or checks and reuses) a cache;
`TeacherCache(folder)` reads one; `cache_identity(...)` is what a run must match to use it.

C/
  index.json                 what the cache was made with (IDENTITY: teacher, verbalizers' fingerprint, data
                             fingerprint, teacher processor, target layers, k, dtype, max_length), the shard size, and
                             once every shard is written: complete, vocab, rows, each shard's file, samples, bytes and
                             sha256
  shard-00000.safetensors    the samples [i * shard_size, (i + 1) * shard_size) of the data, in data order; rows are
                             their response tokens in order. L = teacher target layers + 1 (the final output, last):
                               log_probs [rows, L, k] (cache.dtype), ids [rows, L, k] int32, log_tail [rows, L] fp32
                               (cache.top_k=0: log_probs [rows, L, V] alone, the whole distribution)
                               offsets [samples + 1] int64: sample i is rows offsets[i]:offsets[i + 1]
                             metadata: the samples' ids (JSON) and the vocabulary width V
  .lengths.json              the teacher's length scan (`vlsi.data.VLDataset`)

Each shard is written to a temporary file and renamed, so a shard file is whole or absent: a killed build reruns
with the same command and computes only the missing shards (also those deleted from a complete cache). A cache made
for another teacher, verbalizers, data, processor, target layers, k, dtype or max_length is refused with one line
saying which; a shard that is missing, or whose size or sha256 differs from the index, is named, never skipped.
Under `accelerate launch` process r caches the shards r, r + P, ... (each holds the whole teacher on its device) and
the main process writes the index when all exist.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .config import ConfigError, TrainConfig
from .data import VLDataset, encode, make_collate, split_batch
from .data.dataset import processor_key
from .distributed import on_main_process, process_state
from .losses import TopK, log_probs, top_k
from .models.family import capture, model_parts
from .models.loading import QUANTIZE, check_fits, compute_dtype, freeze, load_model, load_processor
from .models.verbalizer import META, WEIGHTS, Verbalizers
from .runfolder import (
    file_fingerprint,
    files_fingerprint,
    kept_marks,
    lock,
    model_fingerprint,
    read_json,
    same_settings,
    samples_fingerprint,
    write_bytes,
    write_json,
)

log = logging.getLogger("vlsi")

INDEX = "index.json"
FORMAT = 2  # 2: each shard's sha256 in the index
# index.json entries a run must match to use the cache, and how a refusal names them
IDENTITY = {
    "teacher_identity": "teacher",
    "teacher_quantization": "teacher_quantization",
    "verbalizers": "teacher verbalizers",
    "data_fingerprint": "data",
    "processor": "teacher processor",
    "target_layers": "teacher target layers",
    "top_k": "cache.top_k",
    "dtype": "cache.dtype",
    "max_length": "data.max_length",
}
# what keeps a sample from being encoded (a broken record or image, too long): such a sample is left out, as training
# passes over it
UNLOADABLE = (ValueError, OSError, SyntaxError, Image.DecompressionBombError)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POLL_SECONDS = 5.0
OPEN_SHARDS = 64  # shard files a reader keeps open at once


def verbalizers_fingerprint(directory: str | Path) -> str:
    """sha256 of a verbalizer folder's two files (weights and metadata): the same verbalizers wherever they lie."""
    directory = Path(directory)
    if not all((directory / name).is_file() for name in (META, WEIGHTS)):
        raise FileNotFoundError(f"{directory}: no verbalizers here (expected {META} and {WEIGHTS})")
    return files_fingerprint(directory / name for name in (META, WEIGHTS))


def cache_identity(
    cfg: TrainConfig, verbalizers_dir: str | Path | None, processor, samples, fingerprint: str | None = None
) -> dict:
    """The IDENTITY entries for a run: what its teacher targets depend on. `verbalizers_dir` None: the teacher's
    verbalizers are not trained yet, and the two entries that describe them are left out. `fingerprint`: the
    samples' `runfolder.samples_fingerprint` when the run has it already."""
    identity = {
        "teacher_identity": model_fingerprint(cfg.teacher),
        "teacher_quantization": cfg.teacher_quantization,
        "data_fingerprint": fingerprint or samples_fingerprint(samples),
        # how the processor encodes: data.special_tokens=text changes some samples' tokens (as the length scan's key)
        "processor": processor_key(processor) + ("" if cfg.data.special_tokens == "refuse" else "+special_tokens=text"),
        "top_k": cfg.cache.top_k,
        "dtype": cfg.cache.dtype,
        "max_length": cfg.data.max_length,
    }
    if verbalizers_dir is not None:
        meta = Path(verbalizers_dir) / META
        identity["verbalizers"] = verbalizers_fingerprint(verbalizers_dir)
        identity["target_layers"] = json.loads(meta.read_text()).get("target_layers") if meta.is_file() else None
    return identity


def check_identity(folder: Path, index: dict, identity: dict) -> None:
    """Refuse a cache made for another run, with one line naming what differs (of the IDENTITY entries `identity`
    has: without teacher verbalizers yet, those two are not compared)."""
    names = {key: name for key, name in IDENTITY.items() if key in identity}
    holds = f"a teacher cache (of teacher {index.get('teacher')}, data {index.get('data')})"
    fix = f"point teacher_cache at a new folder, or delete {folder} to rebuild it"
    same_settings(folder, index, identity, names, holds, fix)


def read_index(folder: Path) -> dict | None:
    path = folder / INDEX
    return read_json(path, f"delete {folder} and rebuild the cache") if path.is_file() else None


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def build_cache(
    cfg: TrainConfig, folder: str | Path, verbalizers_dir: str | Path, samples, fingerprint: str | None = None
) -> Path:
    """Make sure `folder` holds the complete teacher cache for this configuration, and return it: an existing one is
    checked (and refused if made for another run), a partial one finished, a missing one built. `samples`: the data's
    samples as `vlsi.stages.samples.load_samples(cfg)` gives them. Every process of a launch must call it."""
    folder = Path(folder)
    state = process_state()
    processor = load_processor(cfg.teacher, cfg.trust_remote_code)
    identity = cache_identity(cfg, verbalizers_dir, processor, samples, fingerprint)
    index = read_index(folder)
    if index is not None:
        check_identity(folder, index, identity)
        if index.get("complete") and all((folder / e["file"]).is_file() for e in index["shards"]):
            log.info("teacher cache: reusing %s", folder)
            return folder
    with lock(folder, enabled=state.is_main_process):  # one build at a time (the main process holds it for all)
        return _build(cfg, folder, verbalizers_dir, processor, samples, identity, index)


def _build(cfg: TrainConfig, folder: Path, verbalizers_dir, processor, samples, identity: dict, index) -> Path:
    """`build_cache` past its checks: `index` is the one found in `folder` (None: none, so no shard there is
    trusted), `identity` this run's."""
    state = process_state()
    # The teacher's own length scan (the main process first, the others read its file): samples too long for
    # data.max_length are left out, as training drops them.
    with state.main_process_first():
        dataset = VLDataset(
            samples,
            {"teacher": processor},
            cfg.data.max_length,
            "drop",
            cache_path=folder / ".lengths.json",
            special_tokens=cfg.data.special_tokens,
            skip_invalid=cfg.data.skip_invalid,
        )
    size = cfg.cache.shard_size
    shards = [list(range(start, min(start + size, len(dataset)))) for start in range(0, len(dataset), size)]
    header = {
        "format": FORMAT,
        "teacher": cfg.teacher,
        "data": cfg.data.path,
        "verbalizers_path": str(verbalizers_dir),
        **identity,
        "teacher_dtype": str(compute_dtype(cfg.precision)).removeprefix("torch."),  # what the teacher ran in
        "shard_size": size,
        "samples": len(dataset),
        "complete": False,
        "shards": (index or {}).get("shards", []),  # what earlier builds recorded: the shards are checked against it
    }
    # Every process has read the old index (main_process_first above waits for all) before it is replaced.
    if state.is_main_process:  # (re)written before any shard: a folder with shards always says what they are
        write_json(folder / INDEX, header)
    ids = [[dataset.samples[i].id for i in shard] for shard in shards]
    mine = [i for i in range(len(shards)) if i % state.num_processes == state.process_index]
    if index is None and any(folder.glob("shard-*.safetensors")):
        log.warning(
            "teacher cache: %s has no %s to say what made its shards; computing every shard again", folder, INDEX
        )
        todo = mine
    else:
        recorded = {e["file"]: e for e in header["shards"]}
        with kept_marks(folder / VERIFIED) as marks:
            todo = [i for i in mine if _stale(folder / shard_name(i), ids[i], recorded.get(shard_name(i)), marks)]
    if todo:
        _compute_shards(cfg, folder, verbalizers_dir, processor, dataset, shards, todo)
        if torch.cuda.is_available():  # the teacher is gone: give its memory back to the stage that trains next
            torch.cuda.empty_cache()
    if state.is_main_process:
        while any(not (folder / shard_name(i)).is_file() for i in range(len(shards))):
            time.sleep(POLL_SECONDS)  # other processes' shares; a barrier would time out on a long build
        entries, vocab, rows = [], None, 0
        for i in range(len(shards)):
            path = folder / shard_name(i)
            with safe_open(path, "pt") as f:
                vocab = int(f.metadata()["vocab"])
                rows += f.get_slice("log_probs").get_shape()[0]
            entry = {"file": path.name, "samples": len(shards[i]), "bytes": path.stat().st_size}
            entries.append({**entry, "sha256": file_fingerprint(path)})
        total = sum(e["bytes"] for e in entries)
        write_json(folder / INDEX, {**header, "complete": True, "vocab": vocab, "rows": rows, "shards": entries})
        log.info("teacher cache: %d response tokens, %.0f bytes per token, in %s", rows, total / max(rows, 1), folder)
    else:
        while not (read_index(folder) or {}).get("complete"):
            time.sleep(POLL_SECONDS)
    return folder


def _stale(path: Path, ids: list[str], entry: dict | None, marks: dict) -> bool:
    """Whether a shard must be (re)computed: absent, unlike what an earlier build recorded of it (`entry`: its size
    and sha256 in the index; a shard is never recorded anew without this check), unreadable, or holding other
    samples."""
    if not path.is_file():
        return True
    if entry is not None and (
        path.stat().st_size != entry["bytes"] or file_fingerprint(path, marks) != entry["sha256"]
    ):
        log.warning("teacher cache: %s is not the shard %s recorded (size or sha256); computing it again", path, INDEX)
        return True
    try:
        with safe_open(path, "pt") as f:
            if json.loads(f.metadata()["covers"]) == ids:
                return False
    except (SafetensorError, KeyError, ValueError, OSError):
        pass
    log.warning("teacher cache: %s is unreadable or holds other samples; computing it again", path)
    return True


def _compute_shards(cfg, folder: Path, verbalizers_dir, processor, dataset, shards, todo: list[int]) -> None:
    """Run the teacher over the shards `todo` of this process, writing each one atomically."""
    state = process_state()
    dtype = compute_dtype(cfg.precision)
    fixes = (  # teacher_device_map places only the answering teacher (`config._check_device_map`)
        f"the cache holds the whole teacher on each process's device, a launch does not shard it: {QUANTIZE}, or "
        "train with the live teacher sharded (no teacher_cache; launch with configs/accelerate/fsdp2.yaml or "
        "zero3.yaml)"
    )
    check_fits(
        cfg.teacher, dtype, state.device, cfg.teacher_quantization, trust_remote_code=cfg.trust_remote_code, fixes=fixes
    )
    teacher = load_model(cfg.teacher, dtype, cfg.trust_remote_code, quantization=cfg.teacher_quantization)
    teacher = freeze(teacher).to(state.device).eval()
    parts = model_parts(teacher)
    verbalizers = freeze(Verbalizers.load(verbalizers_dir)).to(state.device, dtype)
    vocab = min(len(processor.tokenizer), parts.vocab_rows)
    collate = make_collate({"teacher": processor})
    store = DTYPES[cfg.cache.dtype]
    bar = tqdm(total=sum(len(shards[i]) for i in todo), desc="teacher cache", unit="sample", dynamic_ncols=True)
    start, tokens, written, per_token = time.perf_counter(), 0, 0, "-"  # bytes per token: known once a shard is written
    for i in todo:
        rows, offsets, ids = [], [0], []
        for first in range(0, len(shards[i]), cfg.cache.batch_size):
            items = []
            for j in shards[i][first : first + cfg.cache.batch_size]:
                sample = dataset.samples[j]
                try:
                    items.append({"teacher": encode(sample, processor, cfg.data.max_length, cfg.data.special_tokens)})
                except UNLOADABLE as error:  # training passes over it too (vlsi.data.skipping)
                    log.warning("teacher cache: sample %s left out: %s", sample.id, error)
                    continue
                ids.append(sample.id)
            bar.update(len(shards[i][first : first + cfg.cache.batch_size]))
            if not items:
                continue
            batch = {k: v.to(state.device) for k, v in collate(items)["teacher"].items()}
            inputs, mask, _ = split_batch(batch)
            targets = teacher_targets(teacher, parts, verbalizers, inputs, mask, vocab, cfg.cache.top_k, cfg.chunk_size)
            rows.append(TopK(*(None if t is None else t.cpu() for t in targets)))  # a shard waits in host memory
            offsets += (offsets[-1] + mask.sum(1).cumsum(0)).tolist()
            tokens += int(mask.sum())
            bar.set_postfix(tokens_per_s=f"{tokens / (time.perf_counter() - start):.0f}", bytes_per_token=per_token)
        rows = rows or [empty_targets(len(verbalizers) + 1, cfg.cache.top_k, vocab)]  # nothing here could load
        tensors = {
            "log_probs": torch.cat([r.log_probs for r in rows]).to(store),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
        }
        if cfg.cache.top_k:
            tensors["ids"] = torch.cat([r.ids for r in rows]).to(torch.int32)
            tensors["log_tail"] = torch.cat([r.log_tail for r in rows]).to(torch.float32)
        path = folder / shard_name(i)
        covers = [dataset.samples[j].id for j in shards[i]]  # ids: those cached; covers: all the shard stands for
        metadata = {"ids": json.dumps(ids), "covers": json.dumps(covers), "vocab": str(vocab)}
        write_bytes(path, save(tensors, metadata=metadata))  # whole or absent: the shard waits in memory anyway
        written += path.stat().st_size
        per_token = f"{written / max(tokens, 1):.0f}"
    bar.close()


@torch.no_grad()
def teacher_targets(teacher, parts, verbalizers: Verbalizers, inputs: dict, mask, vocab: int, k: int, chunk_size: int):
    """The cached targets of one encoded batch: TopK with log_probs [N, L, k] (fp32), ids [N, L, k], log_tail [N, L]
    over the N response positions (`mask` [B, T]) and L = every target layer's verbalized distribution, then the
    teacher's own output. k = 0: log_probs [N, L, V], the whole distributions, as the live stage computes them."""
    layers = verbalizers.target_layers
    with capture(parts.layers, layers) as states:
        logits = teacher(**inputs, logits_to_keep=mask).logits[:, :vocab]  # [N, V]
    hidden = [states[layer][mask] for layer in layers]  # L - 1 x [N, d]
    heads = [verbalizers.head(j, parts.norm, parts.lm_head, vocab) for j in range(len(layers))]
    chunks = []
    for start in range(0, logits.shape[0], chunk_size):  # bounds the [chunk, V] log-probs alive at once
        r = slice(start, start + chunk_size)
        per_layer = [top_k(log_probs(head(h[r])), k) for h, head in zip(hidden, heads, strict=True)]
        per_layer.append(top_k(log_probs(logits[r]), k))
        chunks.append(TopK(*(None if t[0] is None else torch.stack(t, 1) for t in zip(*per_layer, strict=True))))
    if not chunks:
        return empty_targets(len(layers) + 1, k, vocab)
    return TopK(*(None if t[0] is None else torch.cat(t) for t in zip(*chunks, strict=True)))


def empty_targets(distributions: int, k: int, vocab: int) -> TopK:
    """Targets for no token: log_probs [0, L, k or V] (ids and tail when k > 0)."""
    log_probs = torch.zeros(0, distributions, k or vocab)
    return TopK(log_probs, log_probs.long(), log_probs[..., 0]) if k else TopK(log_probs)


def cached_layers(cached: dict) -> list[TopK]:
    """A batch's cached targets (the collated shard rows) -> one TopK [N, k] per teacher target layer, then the
    final output's."""
    ids, tail = cached.get("ids"), cached.get("log_tail")
    return [
        TopK(cached["log_probs"][:, j], None if ids is None else ids[:, j], None if tail is None else tail[:, j])
        for j in range(cached["log_probs"].shape[1])
    ]


VERIFIED = ".verified.json"  # `runfolder.file_fingerprint` marks of the shards: each one's stat when last hashed


def verify_shards(folder: Path, shards: list[dict]) -> None:
    """Every shard's sha256 against the index's (same size, other bytes: a flipped bit, a partial overwrite), hashing
    only the shards changed since they were last checked here (`file_fingerprint` with FOLDER/.verified.json): the
    first run reads the whole cache once (1.4 GB/s on one core of docs/CACHE.md's CPU), later runs (every seed and row
    of an ablation) start at once. Missing or mis-sized shards are named by the caller's checks."""
    with kept_marks(folder / VERIFIED) as marks:
        for entry in shards:
            path = folder / entry["file"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                continue  # named by the caller's checks: missing, truncated
            if file_fingerprint(path, marks) != entry["sha256"]:
                raise ConfigError(
                    f"{path}: corrupt (its sha256 is not the one {INDEX} recorded); delete it and rerun `vlsi cache` "
                    "with the same settings to compute it again"
                )


class TeacherCache:
    """A complete cache, checked on opening: index present and complete, every shard present, of the size and sha256
    the index records (`verify_shards`: by the main process, and only shards changed since it last checked them),
    with a readable header. `rows(sample_id)` reads one sample's targets (memory-mapped)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = read_index(self.folder)
        if index is None:
            raise ConfigError(
                f"{self.folder}: no teacher cache here (no {INDEX}); build it with `vlsi cache`, or let `vlsi train` "
                "build it (teacher_cache=FOLDER)"
            )
        if not index.get("complete"):
            raise ConfigError(
                f"{self.folder}: the teacher cache is incomplete (its build was stopped); rerun the same `vlsi cache` "
                "command to finish it"
            )
        if index.get("format") != FORMAT:
            raise ConfigError(
                f"{self.folder}: cache format {index.get('format')}, this vlsi reads {FORMAT}; rebuild it"
            )
        self.index = index
        on_main_process(verify_shards, self.folder, index["shards"])
        self.where: dict[str, tuple[int, int]] = {}  # sample id -> (shard, position in it)
        self._offsets = []
        for number, entry in enumerate(index["shards"]):
            path = self.folder / entry["file"]
            fix = "delete it and rerun `vlsi cache` with the same settings to compute it again"
            if not path.is_file():
                raise ConfigError(f"{path}: shard missing from the teacher cache; {fix}")
            if path.stat().st_size != entry["bytes"]:
                raise ConfigError(
                    f"{path}: truncated or corrupt ({path.stat().st_size} bytes, {INDEX} says {entry['bytes']}); {fix}"
                )
            try:
                with safe_open(path, "pt") as f:
                    ids = json.loads(f.metadata()["ids"])
                    self._offsets.append(f.get_tensor("offsets"))
            except (SafetensorError, KeyError, ValueError) as e:
                raise ConfigError(f"{path}: corrupt shard ({e}); {fix}") from None
            self.where.update((sample_id, (number, k)) for k, sample_id in enumerate(ids))
        self._files: dict[int, object] = {}

    @property
    def target_layers(self) -> list[int]:
        return self.index["target_layers"]

    @property
    def vocab(self) -> int:
        return self.index["vocab"]

    def check(self, identity: dict) -> None:
        """Refuse the cache for a run with another identity (`cache_identity`)."""
        check_identity(self.folder, self.index, identity)

    def check_vocab(self, vocab: int) -> None:
        """Refuse the cache for a run that compares distributions over another number of tokens."""
        if vocab != self.vocab:
            raise ConfigError(
                f"{self.folder} holds teacher distributions over {self.vocab} tokens, but this run compares "
                f"{vocab} (the student's LM head is narrower than the teacher's vocabulary); this pair cannot use it"
            )

    def check_samples(self, ids) -> None:
        missing = [i for i in ids if i not in self.where]
        if missing:
            raise ConfigError(
                f"{self.folder}: {len(missing)} training samples are not in the teacher cache (e.g. {missing[0]}); it "
                "was built for other data or data.max_length: rebuild it"
            )

    def rows(self, sample_id: str) -> dict[str, torch.Tensor]:
        """{log_probs [n, L, k], ids [n, L, k], log_tail [n, L]} for the n response tokens of one sample."""
        if sample_id not in self.where:
            raise ConfigError(
                f"{self.folder}: sample {sample_id} is not in the teacher cache; it was built for other data or "
                "data.max_length: rebuild it"
            )
        shard, k = self.where[sample_id]
        if shard not in self._files:  # opened lazily: each data-loader worker opens its own
            if len(self._files) >= OPEN_SHARDS:
                del self._files[next(iter(self._files))]  # the longest open: files stay far below the process limit
            self._files[shard] = safe_open(self.folder / self.index["shards"][shard]["file"], "pt")
        f = self._files[shard]
        a, b = self._offsets[shard][k].item(), self._offsets[shard][k + 1].item()
        return {name: f.get_slice(name)[a:b] for name in ("log_probs", "ids", "log_tail") if name in f.keys()}

    def __getstate__(self):  # data-loader workers started by spawn reopen the files
        return {**self.__dict__, "_files": {}}


class CachedTeacher(Dataset):
    """A `VLDataset` whose "teacher" item is the sample's cached targets instead of its teacher encoding: same samples,
    same order, so the loader draws exactly the batches of a live run."""

    def __init__(self, dataset: VLDataset, cache: TeacherCache):
        if not getattr(dataset, "lazy", False):  # a lazy dataset's samples are looked up as they load
            cache.check_samples([s.id for s in dataset.samples])
        self.dataset, self.cache = dataset, cache
        self.max_bad_fraction = getattr(dataset, "max_bad_fraction", 1.0)  # read by the training loop

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        # a sample that cannot be loaded is replaced by the next one, the ones passed over listed under "skipped"
        # (vlsi.data.skipping): the item holds sample index + their number
        position = (index + len(item.get("skipped", []))) % len(self.dataset)
        return {**item, "teacher": self.cache.rows(self.dataset.samples[position].id)}
