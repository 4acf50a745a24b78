"""Run integrity: what a run reads is what it started with, what it writes is whole or refused, in one line each."""

import contextlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText

from vlsi import runfolder
from vlsi.config import load_config
from vlsi.data import DataError, Sample, VLDataset, make_collate, read_dataset
from vlsi.data.records import changed_during_run
from vlsi.models.loading import DAMAGED, ModelError, load_model, load_processor
from vlsi.models.student import save_student
from vlsi.models.tiny import build_tiny_vlm
from vlsi.preflight import data_fingerprint
from vlsi.runfolder import StorageError
from vlsi.stages import checkpoint
from vlsi.stages.loop import make_loader
from vlsi.stages.output import atomic_dir

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml")


def _records(n: int, answer: str = "a cat") -> list[dict]:
    return [
        {"id": str(i), "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": answer}]}
        for i in range(n)
    ]


def _write(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.parametrize("lazy", [False, True])
@pytest.mark.parametrize("edit", ["same size", "other size"])
def test_a_data_file_edited_during_a_run_stops_it_naming_the_file(tmp_path, lazy, edit):
    path = tmp_path / "train.jsonl"
    _write(path, _records(4))
    samples, _ = read_dataset(path, lazy=lazy, num_proc=1)
    assert [s.messages[-1]["content"][0]["text"] for s in pickle.loads(pickle.dumps(samples))] == ["a cat"] * 4
    time.sleep(0.05)  # past the filesystem's timestamp granularity, as a person's edit is
    # an answer edited in place: the same number of bytes (read silently before), or more (a JSON error, no file)
    _write(path, _records(4, "a dog" if edit == "same size" else "a big dog"))
    sent = pickle.loads(pickle.dumps(samples))  # as a DataLoader worker holds it
    for read in (lambda: samples[1], lambda: list(samples), lambda: samples.take([2, 3])[0], lambda: sent[0]):
        with pytest.raises(DataError) as caught:
            read()
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"{path} changed while this run was reading it")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_edit_during_training_stops_the_loader_in_one_line(tmp_path, workers):
    """data.num_workers=1: the error is raised in a DataLoader worker, and reaches the run as the same one line (torch
    would otherwise raise a RuntimeError holding the worker's traceback)."""
    path = tmp_path / "train.jsonl"
    _write(path, _records(8))
    _, processor = build_tiny_vlm()
    dataset = VLDataset(read_dataset(path, num_proc=1)[0], {"student": processor}, max_length=64, num_proc=1)
    assert dataset[0]["student"]["input_ids"].shape[0] == 1
    time.sleep(0.05)
    _write(path, _records(8, "a dog"))
    loader = make_loader(dataset, 2, make_collate({"student": processor}), seed=0, num_workers=workers)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert str(caught.value) == changed_during_run(path)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_vlm(folder)
    return folder


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ("weights cut in half", "model.safetensors is damaged (Error while deserializing header: incomplete metadata"),
        ("weights cut to 4 bytes", "model.safetensors is damaged (Error while deserializing header: header too small"),
        ("weights deleted", "no file named model.safetensors"),
        ("config cut", "config.json"),
    ],
)
def test_a_damaged_model_folder_is_one_line_naming_it_and_the_fix(model_folder, tmp_path, damage, named):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    weights = folder / "model.safetensors"
    if damage == "weights cut in half":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "weights cut to 4 bytes":
        os.truncate(weights, 4)
    elif damage == "weights deleted":
        weights.unlink()
    else:
        os.truncate(folder / "config.json", 30)
    with pytest.raises(ModelError) as caught:
        load_model(str(folder), torch.float32)
    message = str(caught.value)
    assert "\n" not in message
    assert f"'{folder}'" in message and named in message
    assert message.endswith(f"({DAMAGED})")


def test_a_damaged_processor_file_names_the_fix(model_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    os.truncate(folder / "tokenizer.json", 20)
    with pytest.raises(ModelError, match=re.escape(f"cannot load a processor from '{folder}'")) as caught:
        load_processor(str(folder))
    assert str(caught.value).endswith(f"({DAMAGED})") and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", ["generation_config.json", "chat_template.jinja", "tokenizer_config.json"])
def test_a_cut_side_file_is_refused_not_replaced_by_a_default(model_folder, tmp_path, name):
    """transformers reads a cut generation_config.json as absent (a config made from config.json: other end tokens)
    and a cut chat template as valid until the first conversation: both are refused when the folder loads."""
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    file = folder / name
    file.write_text(file.read_text()[: file.stat().st_size // 2])

    def load():
        return load_model(str(folder), torch.float32) if name.startswith("generation") else load_processor(str(folder))

    with pytest.raises(ModelError) as caught:
        load()
    message = str(caught.value)
    assert "\n" not in message and f"{file} is damaged" in message and message.endswith(f"({DAMAGED})")
    shutil.copy(model_folder / name, file)  # put back whole, it loads
    assert load() is not None


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes of any file fail in the kernel (EFBIG) as writes to a full disk fail (ENOSPC): a real
    refused write without root or a small filesystem (RLIMIT_FSIZE; SIGXFSZ ignored, so the write returns the error
    instead of ending the process)."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _refused(caught, named) -> None:
    message = str(caught.value)
    assert "\n" not in message
    assert f"cannot write {named} (File too large); free space there" in message


def test_a_full_disk_while_a_stage_output_is_written_leaves_nothing_finished(model_folder, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(model_folder)
    processor = load_processor(str(model_folder))
    output = tmp_path / "student"
    with pytest.raises(StorageError) as caught, file_size_limit(100_000):  # the weights are 1 MiB
        with atomic_dir(output) as folder:
            save_student(model, processor, folder)
    _refused(caught, output)
    assert list(tmp_path.iterdir()) == []  # neither the output nor its half-written folder
    with atomic_dir(output) as folder:
        save_student(model, processor, folder)
    assert load_model(str(output), torch.float32) is not None


def test_a_full_disk_during_a_checkpoint_keeps_the_last_complete_one(tmp_path):
    module = nn.Linear(128, 128)  # 64 KiB of weights, 128 KiB of Adam state
    optimizer = torch.optim.AdamW(module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module(torch.ones(1, 128)).sum().backward()
    optimizer.step()
    state = checkpoint.TrainingState(module, optimizer, scheduler)
    first = checkpoint.save(tmp_path, 1, state, {"step": 1})
    with pytest.raises(StorageError) as caught, file_size_limit(32_000):
        checkpoint.save(tmp_path, 2, state, {"step": 2})
    _refused(caught, tmp_path / "step-00000002.tmp" / "trainable.safetensors")
    assert checkpoint.latest(tmp_path) == first
    assert checkpoint.load(first, state) == {"step": 1}


def test_a_full_disk_while_a_log_is_appended_is_one_line_and_its_cut_line_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    runfolder.append_jsonl(path, [{"step": 1}])
    with pytest.raises(StorageError) as caught, file_size_limit(path.stat().st_size + 100):
        runfolder.append_jsonl(path, [{"step": 2, "note": "x" * 1000}])
    _refused(caught, path)
    assert runfolder.read_jsonl(path) == [{"step": 1}]
    with pytest.raises(StorageError) as caught, file_size_limit(10):
        runfolder.write_json(tmp_path / "state.json", {"step": 2, "note": "x" * 100})
    _refused(caught, tmp_path / "state.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


OPENED: list[str] | None = None  # while a list: the paths this process opens (an audit hook sees every open)


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and OPENED is not None and isinstance(args[0], str | os.PathLike):
        OPENED.append(os.fspath(args[0]))


sys.addaudithook(_record_opens)


@contextlib.contextmanager
def opened():
    """The files opened in the block."""
    global OPENED
    OPENED = []
    try:
        yield OPENED
    finally:
        OPENED = None


def test_a_rerun_on_unchanged_images_reads_none_and_a_changed_one_is_caught(tmp_path):
    images = tmp_path / "images"
    for folder in ("a", "b"):  # one file name in two folders: the marks key images by their whole path
        (images / folder).mkdir(parents=True)
        (images / folder / "0.png").write_bytes(folder.encode() * 1000)
    text = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
    samples = [Sample(str(i), text, [images / f / "0.png"]) for i, f in enumerate("ab")]
    plain = runfolder.samples_fingerprint(samples)  # no marks: every image hashed
    cfg = load_config(CONFIG, [f"data.path={tmp_path / 'train.jsonl'}"], output=str(tmp_path / "out"))
    time.sleep(runfolder.RACY_NS / 1e9)  # a file changed within RACY_NS of its hash is never trusted by its stat
    runfolder._seen.clear()  # each run is a new process
    assert data_fingerprint(cfg, samples, True) == plain
    assert (tmp_path / "out" / ".cache" / runfolder.IMAGE_MARKS).is_file()

    runfolder._seen.clear()
    with opened() as files:
        assert data_fingerprint(cfg, samples, True) == plain
    assert not [f for f in files if f.startswith(str(images))]

    (images / "b" / "0.png").write_bytes(b"c" * 1000)  # same size, other content
    runfolder._seen.clear()
    with opened() as files:
        changed = data_fingerprint(cfg, samples, True)
    assert changed != plain and changed == runfolder.samples_fingerprint(samples)
    assert [f for f in files if f.startswith(str(images))] == [str(images / "b" / "0.png")]
