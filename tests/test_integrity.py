"""Run integrity: what a run reads is what it started with, what it writes is whole or refused, in one line each."""

import json
import pickle
import time

import pytest

from vlsi.data import DataError, VLDataset, read_dataset
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
