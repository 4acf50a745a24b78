"""Run-folder bookkeeping every command shares: atomic writes, JSONL logs, fingerprints, and the "this folder was made
with other settings" check. It sits at the bottom of the package (it imports nothing of vlsi), so every feature
(the stages, `vlsi.answers`, `vlsi.cache`, the demos) uses the same rules:

- `write_bytes` / `write_text` / `write_json`: a file is whole or absent. The data goes to a temporary file in the
  same folder, is flushed to the disk (fsync) and renamed over the target (`os.replace`), then the folder is synced;
  a kill or a full disk at any moment leaves the previous version (or nothing), never half a file. `storage(target)`:
  any other write the storage refuses (a full disk during `save_pretrained`) is one line naming the file.
- `read_jsonl` / `append_jsonl` / `truncate_jsonl`: one JSON object per line, appended and flushed; a line cut by a
  kill (the last one) is dropped when read, any other unreadable line is an error naming the file and line.
- One fingerprint rule (docs/CONFIG.md#fingerprints), of content, never of modification times alone:
  `model_fingerprint(path)` for a model folder (a hub id stays as given), `file_fingerprint(path)` for a file,
  `samples_fingerprint(samples)` for the data as it was read.
- `check_settings(record, expected, names)`: refuse a folder whose recorded settings differ, in one line naming what
  changed and the fix.
- `lock(folder)`: one run per output folder; a second one stops in one line naming the holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

import yaml

HASH_BLOCK = 1 << 24  # files are hashed in 16 MiB blocks
# A model folder whose weight files hold less than this in all is hashed whole: a change of a few weight values that
# leaves every size and safetensors header as it was is caught too. Above it only headers and sizes are read.
SMALL_WEIGHTS = 64 << 20
MODEL_FILES = ("config.json", "generation_config.json")  # with every *.index.json and weight file
WEIGHT_SUFFIXES = (".safetensors", ".bin")
EDGE = 1 << 20  # a large .bin weight file (no header) is known by its size and its first and last MiB
MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB
# A file's stat is a shortcut to its hash only when its last change (ctime, which no tool sets back) is older than
# this at hashing time: a later change then lands on another clock tick and changes the stat (git's "racy" rule).
RACY_NS = 1_000_000_000
LOCK = ".lock"
# Files a stage output may hold that later commands change: the model card, into which `vlsi eval` writes its scores.
UNCHECKED = ("README.md",)

log = logging.getLogger("vlsi")


class FolderError(ValueError):
    """A run folder, or a file vlsi wrote, that cannot be used as it is: made with other settings, damaged, or in use
    by another run. The message names it and the fix (`vlsi.cli.main` prints it as one line, exit 2)."""


# ------------------------------------------------------------------------------------------------ atomic writes


class StorageError(OSError):
    """A write that the storage refused (a full disk, a quota, a file size limit, an I/O error); the message names the
    file or folder and the fix (`vlsi.cli.main` prints it as one line, exit 2)."""


FREE_SPACE = "free space there, or use another --output"
RERUN = "free space there and rerun (a stage resumes from its last checkpoint), or use another --output"


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically: whole or not at all, even across a kill, a power cut or a full disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise StorageError(e.errno, f"cannot write {path} ({e.strerror}); {FREE_SPACE}") from None
    _sync_folder(path.parent)


@contextlib.contextmanager
def storage(target: str | Path, fix: str = FREE_SPACE):
    """Writes in the block that the storage refuses (`OSError`, or safetensors' `SafetensorError`, which carries the
    OS error in its text) stop with one line naming the file (or, when the error names none, `target`: the file or
    folder being written) and `fix`. The caller makes sure what was half-written is never taken for finished (a
    temporary name, or a folder renamed into place only when whole)."""
    from safetensors import SafetensorError  # here: only commands that write tensors import it

    try:
        yield
    except StorageError:
        raise  # named already (`write_bytes`)
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None or int(found.group(1)) not in STORAGE:
            raise
        code = int(found.group(1))
        raise StorageError(code, f"cannot write {target} ({os.strerror(code)}); {fix}") from None
    except OSError as e:
        if e.errno not in STORAGE:
            raise
        raise StorageError(e.errno, f"cannot write {e.filename or target} ({os.strerror(e.errno)}); {fix}") from None


# The errors of a storage that takes no more: full, over quota, over the file size limit, failing, read-only.
STORAGE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, data, indent: int | None = 1) -> None:
    write_text(path, json.dumps(data, indent=indent) + "\n")


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` survive a power cut (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not sync folders
    finally:
        os.close(fd)


def read_json(path: str | Path, fix: str):
    """A JSON file vlsi wrote; a truncated or unreadable one is one line naming it and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FolderError(f"{path} is damaged (not valid JSON: {e}); {fix}") from None


def read_yaml(path: str | Path, fix: str):
    """A YAML file vlsi wrote (config.yaml); truncated, emptied or unreadable: one line naming it and `fix`."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise FolderError(f"{path} is damaged (not valid YAML: {str(e).splitlines()[0]}); {fix}") from None
    if not isinstance(values, dict):
        raise FolderError(f"{path} is damaged (empty, or not a mapping of settings); {fix}")
    return values


def read_safetensors(path: str | Path, fix: str) -> dict:
    """{name: tensor} of a safetensors file; a truncated or unreadable one is one line naming it and `fix`."""
    from safetensors import SafetensorError  # here: torch is loaded only by commands that read tensors
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise FolderError(f"{path} is damaged (not a readable safetensors file: {e}); {fix}") from None


# ------------------------------------------------------------------------------------------------ JSONL logs


def read_jsonl(path: str | Path) -> list:
    """The rows of a JSONL file (none when it is absent). A last line cut by a kill is dropped; an unreadable line
    before it means the file was damaged otherwise, and stops with its name and line number."""
    path = Path(path)
    if not path.is_file():
        return []
    # "\n" alone ends a line: `str.splitlines` also splits at U+2028, U+0085 and others, which JSON strings may hold
    # unescaped (written by other tools)
    lines = path.read_text(encoding="utf-8").split("\n")
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == last:
                break  # a line cut by a kill
            raise FolderError(
                f"{path} line {number} is not valid JSON (the file was damaged); delete the file, or that line"
            ) from None
    return rows


def append_jsonl(path: str | Path, rows) -> None:
    """Append `rows` (one JSON line each) and flush them to the disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with storage(path), path.open("a", encoding="utf-8") as f:  # a line cut by a full disk is dropped when read
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


SEAL = "sha256"  # the key of a sealed row's checksum
SEAL_CHARS = 16  # 64 bits of the sha256: against edits and damage, not against forgery


def seal(row: dict) -> dict:
    """`row` with the checksum of its other fields (`SEAL`), for a log whose rows are reused: `is_sealed` tells a row
    edited since it was written."""
    return row | {SEAL: _row_sum(row)}


def is_sealed(row) -> bool:
    """Whether `row` carries the checksum `seal` gave it, its other fields unchanged since."""
    return isinstance(row, dict) and row.get(SEAL) == _row_sum({k: v for k, v in row.items() if k != SEAL})


def _row_sum(row: dict) -> str:
    text = json.dumps(row, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:SEAL_CHARS]


def truncate_jsonl(path: str | Path, keep=lambda row: True) -> None:
    """Rewrite a JSONL file (atomically) with the rows `keep(row)` accepts, without a last line cut by a kill: rows
    appended after it would otherwise be read as part of it."""
    path = Path(path)
    if path.is_file():
        write_text(path, "".join(json.dumps(row) + "\n" for row in read_jsonl(path) if keep(row)))


# ------------------------------------------------------------------------------------------------ fingerprints


def _hash_file(path: Path, digest=None, start: int = 0, size: int | None = None):
    """Feed `size` bytes of `path` from `start` (all of it when None) into `digest` (a new sha256 when None)."""
    digest = digest or hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = size
        while left is None or left > 0:
            block = f.read(HASH_BLOCK if left is None else min(HASH_BLOCK, left))
            if not block:
                break
            digest.update(block)
            left = None if left is None else left - len(block)
    return digest


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in full (the reference `file_fingerprint` shortcuts)."""
    return _hash_file(Path(path)).hexdigest()


def files_fingerprint(paths) -> str:
    """sha256 of the files' bytes, one after the other: a set of files that belong together (verbalizers' weights and
    metadata), the same wherever they lie."""
    digest = hashlib.sha256()
    for path in paths:
        _hash_file(Path(path), digest)
    return digest.hexdigest()


_seen: dict[str, list] = {}  # this process's shortcut: resolved path -> [inode, size, mtime_ns, ctime_ns, sha256]
SEEN = 1 << 16  # files it remembers at most (the oldest forgotten first): a data set's images could fill memory


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def file_fingerprint(path: str | Path, marks: dict | None = None, name: str | None = None) -> str:
    """sha256 of a file's content. A file hashed before (in this process, or recorded in `marks`: {name: [inode, size,
    mtime_ns, ctime_ns, sha256]}, a record the caller keeps between runs, `name` the file's key there, by default its
    file name) whose stat is unchanged is not read again; the stat counts only when the file's last change was at
    least RACY_NS older than the hash, so a file edited in place with its size and modification time put back (which
    sets ctime) is read again."""
    path = Path(path)
    stat = path.stat()
    key = str(path.resolve())
    name = name or path.name
    stamp = _stamp(stat)
    for known in (_seen.get(key), (marks or {}).get(name)):
        if known is not None and known[:4] == stamp:
            return known[4]
    sha = sha256_file(path)
    if time.time_ns() - stat.st_ctime_ns >= RACY_NS:
        _seen[key] = [*stamp, sha]
        if len(_seen) > SEEN:
            del _seen[next(iter(_seen))]
        if marks is not None:
            marks[name] = [*stamp, sha]
    return sha


IMAGE_MARKS = "image-marks.json"  # OUT/.cache/: the data's images' `file_fingerprint` marks, kept between runs


@contextlib.contextmanager
def kept_marks(record: str | Path, write: bool = True):
    """The `file_fingerprint` marks recorded in `record` (none when it is absent or damaged: every file is hashed
    again), written back after the block when it added some and `write` (the main process of a launch)."""
    record = Path(record)
    try:
        marks = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marks = {}
    marks = marks if isinstance(marks, dict) else {}
    before = dict(marks)
    yield marks
    if write and marks != before:
        with contextlib.suppress(OSError):  # a read-only run folder: the next run hashes the images again
            write_json(record, marks, indent=None)


CHECKSUMS = "checksums.json"


def record_checksums(folder: str | Path, name: str = CHECKSUMS) -> None:
    """Write FOLDER/`name`: {relative path: sha256} of every file under `folder` (but such records and the UNCHECKED
    ones), for `verify_checksums` before the folder is reused."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _is_record(p) and p.name not in UNCHECKED)
    write_json(folder / name, {p.relative_to(folder).as_posix(): sha256_file(p) for p in files}, indent=1)


def _is_record(path: Path) -> bool:
    return path.name == CHECKSUMS or (path.name.startswith("checksums-") and path.suffix == ".json")


def verify_checksums(folder: str | Path, fix: str, names=None) -> None:
    """Check the files under `folder` against the checksums recorded beside them (every FOLDER/checksums*.json):
    `names` (relative paths; None: every file recorded) must each be recorded, present and of the recorded sha256.
    Anything else is one line naming the file and `fix`: a damaged or half-deleted folder is never taken as finished."""
    folder = Path(folder)
    records = sorted(p for p in folder.iterdir() if p.is_file() and _is_record(p))
    if not records:
        raise FolderError(
            f"{folder} has no {CHECKSUMS} (written by a run that was stopped, or by an older vlsi); {fix}"
        )
    recorded = {}
    for record in records:
        recorded |= read_json(record, fix)
    for name in recorded if names is None else names:
        path = folder / name
        if name not in recorded:
            raise FolderError(f"{path}: not in {folder}'s checksums; {fix}")
        if not path.is_file():
            raise FolderError(f"{path}: missing; {fix}")
        if file_fingerprint(path) != recorded[name]:
            raise FolderError(f"{path}: damaged (its sha256 is not the one recorded when it was written); {fix}")


def _safetensors_header(path: Path) -> bytes:
    """The 8-byte length and JSON header of a safetensors file: every tensor's name, dtype, shape and byte range."""
    with path.open("rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        return head + f.read(min(size, MAX_HEADER))


def model_fingerprint(path: str | Path) -> str:
    """What a model is, for a folder that records it (answers, a teacher cache, a training run): a hub id stays as
    given; a local folder is the sha256 of config.json, generation_config.json and every *.index.json (their bytes),
    and of every weight file (*.safetensors, *.bin) its name and size, a safetensors file's header (dtype, shape and
    byte range of each tensor), and, when the weight files total less than SMALL_WEIGHTS (64 MiB), its whole bytes; a
    large .bin file (no header) by its first and last MiB. Modification times do not count: a teacher copied to
    another machine is the same teacher; one replaced in place with other weights of the same sizes is another."""
    folder = Path(path)
    if not folder.is_dir():
        return str(path)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES]
    whole = sum(p.stat().st_size for p in weights) < SMALL_WEIGHTS
    digest = hashlib.sha256()
    for p in files:
        if p.name in MODEL_FILES or p.name.endswith(".index.json"):
            digest.update(f"{p.name}\n".encode())
            _hash_file(p, digest)
        elif p in weights:
            size = p.stat().st_size
            digest.update(f"{p.name} {size}\n".encode())
            if whole:
                _hash_file(p, digest)
            elif p.suffix == ".safetensors":
                digest.update(_safetensors_header(p))
            else:
                _hash_file(p, digest, 0, EDGE)
                _hash_file(p, digest, max(0, size - EDGE))
    return digest.hexdigest()


def samples_fingerprint(samples, marks: dict | None = None) -> str:
    """The data as a run read it (`vlsi.data.Sample`s): every sample's id and messages, and its images' content
    (`file_fingerprint` of a file, the sha256 of embedded bytes), so an edited answer, a replaced image or a
    reordered file is other data. `marks` (`kept_marks`, keyed by the images' absolute paths): a rerun on image files
    whose stat is unchanged reads none of them."""
    digest = hashlib.sha256()
    for s in samples:
        images = [
            hashlib.sha256(p).hexdigest() if isinstance(p, bytes) else file_fingerprint(p, marks, os.path.abspath(p))
            for p in s.images
        ]
        digest.update((json.dumps([s.id, s.messages, images], sort_keys=True) + "\n").encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ settings check


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: nested settings as the key=value names a user types."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _shown(name: str, before, now) -> str:
    """A changed setting: its values when they are short enough to read, its name alone otherwise (hashes)."""
    short = all(not isinstance(v, (str, list, dict)) or len(json.dumps(v)) <= 40 for v in (before, now))
    return f"{name}: {before!r} -> {now!r}" if short else name


def check_settings(
    record: str | Path,
    expected: dict,
    names: dict | None = None,
    holds: str = "a run",
    fix: str | None = None,
    defaults: dict | None = None,
) -> dict | None:
    """Refuse a folder made with other settings than `expected`, in one line naming what changed and `fix` (default:
    a new --output, or delete the folder). `record`: the JSON or YAML file (.yaml, .yml) the folder's settings were
    written to; `names`: {key: how the message names it} of the keys that must match (None: every key, nested
    settings flattened to their key=value names); `defaults`: the settings' defaults, which a key the record lacks
    is taken to have (a setting added since, whose default is what the folder was made with). Returns the recorded
    settings; None when there is no record yet."""
    record = Path(record)
    if not record.is_file():
        return None
    damaged = f"delete it (or {record.parent}) to start over, or use a new --output"
    before = read_yaml(record, damaged) if record.suffix in (".yaml", ".yml") else read_json(record, damaged)
    if not isinstance(before, dict):
        raise FolderError(f"{record} is damaged (not a mapping of settings); {damaged}")
    same_settings(record.parent, before, expected, names, holds, fix, defaults)
    return before


def same_settings(
    folder: str | Path,
    before: dict,
    expected: dict,
    names: dict | None,
    holds: str = "a run",
    fix: str | None = None,
    defaults: dict | None = None,
) -> None:
    """`check_settings` of settings already read (`before`, recorded for `folder`)."""
    fix = fix or f"use a new --output, or delete {folder}"
    was, now = (flatten(before), flatten(expected)) if names is None else (before, expected)
    if defaults:
        was = (flatten(defaults) if names is None else defaults) | was
    names = names if names is not None else {k: k for k in sorted(set(was) | set(now))}
    changed = [_shown(name, was.get(key), now.get(key)) for key, name in names.items() if was.get(key) != now.get(key)]
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        raise FolderError(f"{folder} holds {holds} made with other settings ({shown}); it is not reused: {fix}")


# ------------------------------------------------------------------------------------------------ one run per folder


_held: set[str] = set()  # the folders this process holds the lock of


@contextlib.contextmanager
def lock(folder: str | Path, enabled: bool = True):
    """Hold `folder`'s lock (FOLDER/.lock) for the block: a second run on the folder stops at once in one line naming
    the holder (pid, host, start time, command). The lock is the kernel's (`flock`), so it ends with its process,
    however that ends; the file also records the holder, which a clean exit clears: a record left behind is a run
    that was killed, and taking the lock over says so in a log line. On a filesystem without locks, the record alone
    decides: a holder on this host whose pid is gone is stale and taken over. `enabled` False (the other processes
    of a launch: the main process holds the lock for them), or a folder this process holds already: nothing."""
    folder = Path(folder)
    key = str(folder.resolve())
    if not enabled or key in _held:  # held already by this process (a build inside a run): the outer block releases
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        }
        _record(fd, json.dumps(me).encode())
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            _record(fd, b"")  # released cleanly: no record left to take over
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked = True
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            locked = False  # no locks on this filesystem (ENOLCK, EOPNOTSUPP): the record decides
        else:
            raise FolderError(f"{path.parent} is in use by another run ({_holder(fd)}); {_WAIT}") from None
    holder = _read_record(fd)
    if holder is None:
        return
    if not locked and (holder.get("host") != socket.gethostname() or _alive(holder.get("pid"))):
        raise FolderError(f"{path.parent} is in use by another run ({_describe(holder)}); {_WAIT}")
    log.warning("%s: taking over the lock of a run that ended without releasing it (%s)", path, _describe(holder))


_WAIT = "wait for it to finish, or use another --output"


def _read_record(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 1 << 16)
    if not text.strip():
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return {"record": "unreadable"}  # cut by a kill while written
    return holder if isinstance(holder, dict) else {"record": "unreadable"}


def _holder(fd: int) -> str:
    holder = _read_record(fd)
    return _describe(holder) if holder is not None else "its holder is still starting"


def _describe(holder: dict) -> str:
    if "pid" not in holder:
        return "holder unknown: the lock's record is unreadable"
    return f"pid {holder['pid']} on {holder.get('host')}, started {holder.get('started')}: {holder.get('command')}"


def _record(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _alive(pid) -> bool:
    """Whether process `pid` of this host exists."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
