"""Run integrity: what a run reads is what it started with, what it writes is whole or refused, in one line each."""

import json
import os
import pickle
import re
import shutil
import time

import pytest
import torch

from vlsi.data import DataError, VLDataset, read_dataset
from vlsi.models.loading import DAMAGED, ModelError, load_model, load_processor
from vlsi.models.tiny import build_tiny_vlm


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


def test_an_edit_during_training_stops_the_loader(tmp_path):
    path = tmp_path / "train.jsonl"
    _write(path, _records(4))
    _, processor = build_tiny_vlm()
    dataset = VLDataset(read_dataset(path, num_proc=1)[0], {"student": processor}, max_length=64, num_proc=1)
    assert dataset[0]["student"]["input_ids"].shape[0] == 1
    time.sleep(0.05)
    _write(path, _records(4, "a dog"))
    with pytest.raises(DataError, match="changed while this run was reading it"):
        dataset[1]


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
