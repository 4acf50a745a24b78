"""vlsi.runfolder against plain references: atomic writes, JSONL logs, the fingerprint rule, the settings check."""

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from commands import HOLD_LOCK
from safetensors.torch import save_file

from vlsi import runfolder
from vlsi.data import Sample


def test_atomic_write_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "state.json"
    runfolder.write_json(path, {"a": 1})
    runfolder.write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    runfolder.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["b.bin", "state.json", "sub"]


def test_a_failed_write_keeps_the_previous_file_and_names_it(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    runfolder.write_text(path, "old: 1\n")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match=f"cannot write {path} \\(No space left on device\\)"):
        runfolder.write_text(path, "new: 2\n")
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_jsonl_drops_a_line_cut_by_a_kill_and_names_other_damage(tmp_path):
    path = tmp_path / "log.jsonl"
    runfolder.append_jsonl(path, [{"step": 1}, {"step": 2}])
    with path.open("a") as f:
        f.write('{"step": 3, "lo')  # killed mid-line
    assert runfolder.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    runfolder.truncate_jsonl(path, lambda row: row["step"] <= 1)
    assert path.read_text() == '{"step": 1}\n'
    runfolder.truncate_jsonl(path)
    runfolder.append_jsonl(path, [{"step": 2}])
    assert runfolder.read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(runfolder.FolderError, match=f"{path} line 2 is not valid JSON"):
        runfolder.read_jsonl(path)
    assert runfolder.read_jsonl(tmp_path / "absent.jsonl") == []


def test_jsonl_lines_end_at_newlines_only(tmp_path):
    """Another tool's JSONL may hold U+2028, U+2029, U+0085 or a form feed unescaped inside a string: one line each."""
    path = tmp_path / "answers.jsonl"
    texts = ["one\u2028two", "three\u2029four\x85five", "six\x0cseven"]
    path.write_text("".join(json.dumps({"answer": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert runfolder.read_jsonl(path) == [{"answer": t} for t in texts]
    with path.open("a", encoding="utf-8") as f:
        f.write('{"answer": "eig\u2028')  # killed mid-line, after a raw line separator
    assert runfolder.read_jsonl(path) == [{"answer": t} for t in texts]


def test_file_fingerprint_is_the_content_hash_and_sees_an_edit_that_restores_size_and_mtime(tmp_path, monkeypatch):
    path = tmp_path / "data.json"
    path.write_bytes(b"answer: 1")
    assert runfolder.file_fingerprint(path) == hashlib.sha256(b"answer: 1").hexdigest()
    monkeypatch.setattr(runfolder, "RACY_NS", 0)  # trust the stat at once (the default waits a second)
    marks = {}
    first = runfolder.file_fingerprint(path, marks)
    assert marks["data.json"][4] == first
    read = []
    monkeypatch.setattr(
        runfolder, "sha256_file", lambda p: read.append(p) or hashlib.sha256(p.read_bytes()).hexdigest()
    )
    assert runfolder.file_fingerprint(path, marks) == first and read == []  # unchanged: not read again
    stat = path.stat()
    time.sleep(0.02)
    path.write_bytes(b"answer: 2")  # same size; the modification time put back as it was
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert runfolder.file_fingerprint(path, marks) == hashlib.sha256(b"answer: 2").hexdigest()
    assert read == [path]


def test_a_just_changed_file_is_never_trusted_by_its_stat(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"1")
    marks = {}
    runfolder.file_fingerprint(path, marks)
    assert marks == {}, "changed less than RACY_NS ago: a change in the same clock tick would keep the stat"


def _model(folder, weights: dict, config: dict):
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(weights, folder / "model.safetensors")
    return folder


def test_model_fingerprint_is_content_not_place_or_time(tmp_path, monkeypatch):
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    a = _model(tmp_path / "a", weights, {"hidden": 3})
    b = _model(tmp_path / "b", weights, {"hidden": 3})
    os.utime(b / "model.safetensors", ns=(1, 1))
    assert runfolder.model_fingerprint(a) == runfolder.model_fingerprint(b), "a copy elsewhere is the same model"
    assert runfolder.model_fingerprint("org/model") == "org/model"
    before = runfolder.model_fingerprint(a)
    _model(a, {"w": weights["w"] + 1}, {"hidden": 3})  # other values: same sizes, same header
    assert runfolder.model_fingerprint(a) != before
    _model(b, {"w": weights["w"].reshape(3, 2)}, {"hidden": 3})  # same size, another shape in the header
    monkeypatch.setattr(runfolder, "SMALL_WEIGHTS", 0)  # a large model: headers and sizes only
    assert runfolder.model_fingerprint(b) != runfolder.model_fingerprint(a)
    _model(b, {"w": weights["w"] + 1}, {"hidden": 3})
    assert runfolder.model_fingerprint(b) == runfolder.model_fingerprint(a), "large: values are not read"
    (b / "config.json").write_text(json.dumps({"hidden": 4}))
    assert runfolder.model_fingerprint(b) != runfolder.model_fingerprint(a)


def test_samples_fingerprint_sees_messages_and_image_content(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"png-1")
    text = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    samples = [Sample("0", text, [image])]
    before = runfolder.samples_fingerprint(samples)
    assert runfolder.samples_fingerprint([Sample("0", text, [image])]) == before
    assert runfolder.samples_fingerprint([Sample("1", text, [image])]) != before
    other = [{"role": "user", "content": [{"type": "text", "text": "r"}]}]
    assert runfolder.samples_fingerprint([Sample("0", other, [image])]) != before
    time.sleep(0.02)
    image.write_bytes(b"png-2")
    assert runfolder.samples_fingerprint(samples) != before


def test_check_settings_names_what_changed_and_the_fix(tmp_path):
    assert runfolder.check_settings(tmp_path / "index.json", {"k": 3}, {"k": "cache.top_k"}) is None
    runfolder.write_json(tmp_path / "index.json", {"k": 3, "teacher": "a" * 64, "note": "free"})
    names = {"k": "cache.top_k", "teacher": "teacher"}
    assert runfolder.check_settings(tmp_path / "index.json", {"k": 3, "teacher": "a" * 64}, names)["note"] == "free"
    with pytest.raises(runfolder.FolderError) as refused:
        runfolder.check_settings(tmp_path / "index.json", {"k": 4, "teacher": "b" * 64}, names, "a teacher cache")
    assert str(refused.value) == (
        f"{tmp_path} holds a teacher cache made with other settings (cache.top_k: 3 -> 4, teacher); it is not "
        f"reused: use a new --output, or delete {tmp_path}"
    )
    runfolder.write_text(tmp_path / "config.yaml", "sft:\n  lr: 0.001\nseed: 1\n")
    with pytest.raises(runfolder.FolderError, match=r"\(sft.lr: 0.001 -> 0.01\); it is not reused: start over"):
        runfolder.check_settings(tmp_path / "config.yaml", {"sft": {"lr": 0.01}, "seed": 1}, fix="start over")


def test_a_setting_added_since_a_folder_was_made_is_its_default_there(tmp_path):
    """A folder recorded before `interact.on_policy` existed was made as its default (0) makes it: reused at 0,
    refused at 0.5; without `defaults` the missing key is a change."""
    record = tmp_path / "config.yaml"
    runfolder.write_text(record, "sft:\n  lr: 0.001\n")
    defaults = {"sft": {"lr": 1e-5}, "interact": {"on_policy": 0.0}}
    same = {"sft": {"lr": 0.001}, "interact": {"on_policy": 0.0}}
    assert runfolder.check_settings(record, same, defaults=defaults) == {"sft": {"lr": 0.001}}
    with pytest.raises(runfolder.FolderError, match=r"\(interact.on_policy: 0.0 -> 0.5\)"):
        runfolder.check_settings(record, {**same, "interact": {"on_policy": 0.5}}, defaults=defaults)
    with pytest.raises(runfolder.FolderError, match=r"\(interact.on_policy: None -> 0.0\)"):
        runfolder.check_settings(record, same)
    runfolder.write_json(tmp_path / "settings.json", {"seeds": 2})  # named keys: the same rule
    names = {"seeds": "seeds", "on_policy": "on_policy"}
    kept = runfolder.check_settings(
        tmp_path / "settings.json", {"seeds": 2, "on_policy": 0}, names, defaults={"on_policy": 0}
    )
    assert kept == {"seeds": 2}


@pytest.mark.parametrize("text", ["sft:\n  lr: [0.1", "", '{"k": 3'])
def test_a_damaged_record_is_one_line_naming_it(tmp_path, text):
    record = tmp_path / ("index.json" if text.startswith("{") else "config.yaml")
    record.write_text(text)
    with pytest.raises(runfolder.FolderError, match=f"{record} is damaged .*delete it") as refused:
        runfolder.check_settings(record, {"k": 3})
    assert "\n" not in str(refused.value)


SRC = str(Path(__file__).parent.parent / "src")


def _holder(folder) -> subprocess.Popen:
    """A real second run: another python process holding `folder`'s lock until it is killed."""
    env = {**os.environ, "PYTHONPATH": SRC}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert process.stdout.readline() == "locked\n"
    return process


def test_a_second_run_on_a_locked_folder_stops_naming_the_holder_and_a_killed_ones_lock_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(runfolder.FolderError) as refused, runfolder.lock(tmp_path):
            pass
        message = str(refused.value)
        assert message.startswith(f"{tmp_path} is in use by another run (pid {holder.pid} on {socket.gethostname()}")
        assert ": -c " in message and message.endswith("wait for it to finish, or use another --output")
        assert "\n" not in message
    finally:
        holder.kill()  # SIGKILL: no clean release
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="vlsi"), runfolder.lock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock of a run that ended without releasing it (pid {holder.pid} on" in caplog.text
    assert (tmp_path / ".lock").read_text() == "", "a clean exit leaves no record"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlsi"), runfolder.lock(tmp_path):
        with runfolder.lock(tmp_path, enabled=False):  # the other processes of a launch trust the main one's lock
            pass
        with runfolder.lock(tmp_path / "."):  # held already by this process (a cache built inside a run)
            pass
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid(), "the outer block releases it"
    assert "taking over" not in caplog.text


def test_without_kernel_locks_the_record_decides_by_pid_and_host(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(gone.stdout), "host": socket.gethostname(), "started": "then", "command": "vlsi train"}
    (tmp_path / ".lock").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="vlsi"), runfolder.lock(tmp_path):
        pass
    assert f"(pid {gone.stdout.strip()} on {socket.gethostname()}, started then: vlsi train)" in caplog.text
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({**record, "pid": sleeper.pid}))
        with pytest.raises(runfolder.FolderError, match=f"in use by another run \\(pid {sleeper.pid} on"):
            with runfolder.lock(tmp_path):
                pass
        (tmp_path / ".lock").write_text(json.dumps({**record, "pid": int(gone.stdout), "host": "elsewhere"}))
        with pytest.raises(runfolder.FolderError, match="on elsewhere"):  # another host's pid cannot be checked
            with runfolder.lock(tmp_path):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_truncated_verbalizers_are_one_line_naming_the_file(tmp_path):
    from vlsi.models.verbalizer import WEIGHTS, Verbalizers

    Verbalizers(8, [0, 1]).save(tmp_path)
    assert Verbalizers.load(tmp_path).target_layers == [0, 1]
    weights = tmp_path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(runfolder.FolderError, match=f"{weights} is damaged .*; train the verbalizers in") as refused:
        Verbalizers.load(tmp_path)
    assert "\n" not in str(refused.value)


def test_checksums_recorded_beside_a_folder_catch_a_missing_or_changed_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "sub" / "b.json").write_text("{}")
    runfolder.record_checksums(tmp_path)
    assert json.loads((tmp_path / "checksums.json").read_text()) == {
        "a.bin": hashlib.sha256(b"a").hexdigest(),
        "sub/b.json": hashlib.sha256(b"{}").hexdigest(),
    }
    runfolder.verify_checksums(tmp_path, "fix it")
    (tmp_path / "a.bin").write_bytes(b"b")
    with pytest.raises(runfolder.FolderError, match=f"{tmp_path / 'a.bin'}: damaged .*; fix it"):
        runfolder.verify_checksums(tmp_path, "fix it")
    (tmp_path / "a.bin").unlink()
    with pytest.raises(runfolder.FolderError, match=f"{tmp_path / 'a.bin'}: missing; fix it"):
        runfolder.verify_checksums(tmp_path, "fix it")
    runfolder.verify_checksums(tmp_path, "fix it", ["sub/b.json"])
