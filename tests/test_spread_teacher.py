"""A teacher larger than one device, spread for answering (teacher_device_map=auto: accelerate's big-model
inference), and the memory check that counts the devices it is spread over. On the CPU for real: a budget of 1 MB of
CPU memory puts most of the tiny teacher (2.7 MB in fp32) on the disk, and its greedy answers equal the whole
teacher's."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from vlsi import answers as answers_module
from vlsi.answers import share
from vlsi.cache import build_cache
from vlsi.config import ConfigError, load_config
from vlsi.data import encode, make_collate, read_dataset, split_batch
from vlsi.models import loading
from vlsi.models.loading import ModelError, check_fits, load_model, load_processor, spread_memory
from vlsi.models.verbalizer import Verbalizers
from vlsi.stages.samples import load_samples
from vlsi.toy import write_digits_dataset, write_tiny_pair

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml")
SPREAD = ["teacher_device_map=auto", "teacher_max_memory={cpu: 1MB, disk: 1GiB}"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(teacher, questions, answered): the tiny teacher, 6 digit questions without answers and with them."""
    root = tmp_path_factory.mktemp("toy")
    teacher, _ = write_tiny_pair(root)
    answered = write_digits_dataset(root, n=6)
    records = json.loads(answered.read_text())
    for record in records:
        record["conversations"] = record["conversations"][:1]
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(teacher), str(data), str(answered)


def _cfg(toy, out, *overrides):
    teacher, data, _ = toy
    # the toy teacher's random weights never end an answer: every one is cut at answer_max_tokens, and kept
    settings = [f"data.path={data}", "data.answers=teacher", "data.answer_max_tokens=6", "data.keep_cut_answers=true"]
    return load_config(CONFIG, [*settings, *overrides], teacher=teacher, output=str(out))


def _answers(out) -> dict:
    rows = [json.loads(line) for line in (Path(out) / "answers" / "answers.jsonl").read_text().splitlines()]
    return {row["id"]: row["answer"] for row in rows}


def test_a_teacher_spread_over_cpu_and_disk_computes_what_the_whole_one_does(toy, tmp_path):
    teacher, data, _ = toy
    spread = load_model(teacher, torch.float32, spread={"cpu": "1MB"}, offload=str(tmp_path / "offload")).eval()
    assert {"cpu", "disk"} <= set(spread.hf_device_map.values())
    assert any(p.device.type == "meta" for p in spread.parameters())  # the disk's weights are read at each call
    whole = load_model(teacher, torch.float32).eval()
    processor = load_processor(teacher)
    samples, _ = read_dataset(data, unanswered=True)
    batch = make_collate({"t": processor})([{"t": encode(s, processor)} for s in samples[:3]])["t"]
    inputs, _, _ = split_batch(batch)
    assert inputs["pixel_values"].numel() > 0  # the images reach both
    with torch.no_grad():
        assert torch.equal(spread(**inputs).logits, whole(**inputs).logits)


def test_answers_of_a_spread_teacher_equal_the_whole_teachers(toy, tmp_path, caplog):
    load_samples(_cfg(toy, tmp_path / "whole"))
    with caplog.at_level(logging.INFO, logger="vlsi"):
        answered = load_samples(_cfg(toy, tmp_path / "spread", *SPREAD))
    placed = next(r.getMessage() for r in caplog.records if "the teacher answers spread over" in r.getMessage())
    assert "'cpu'" in placed and "'disk'" in placed
    assert len(answered) == 6 and all(s.messages[-1]["role"] == "assistant" for s in answered)
    assert _answers(tmp_path / "spread") == _answers(tmp_path / "whole") and len(_answers(tmp_path / "whole")) == 6
    assert not answers_module.offload_folder(_cfg(toy, tmp_path / "spread")).exists()  # deleted once answered


def test_the_memory_check_counts_the_devices_the_teacher_is_spread_over(toy):
    teacher = toy[0]
    cpu = torch.device("cpu")
    assert spread_memory({"cpu": "1MB"}) == {"cpu": 1_000_000}
    assert "cpu" in spread_memory({})  # every GPU and the CPU, as accelerate counts them
    with pytest.raises(ModelError) as raised:
        check_fits(teacher, torch.float32, cpu, memory=spread_memory({"cpu": "1MB"}), fixes="the fixes")
    message = str(raised.value)
    assert "needs about 0.0 GiB but teacher_device_map=auto has 0.0 GiB on this machine (cpu: 0.0 GiB)" in message
    assert message.endswith(": the fixes") and "\n" not in message
    check_fits(teacher, torch.float32, cpu, memory=spread_memory({"cpu": "1MB", "disk": "1GiB"}))  # the disk holds it
    check_fits(teacher, torch.float32, cpu, memory=spread_memory({"cpu": "2MB"}), quantization="int8")  # 0.7 MB
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="teacher_max_memory names device 0, which this machine does not have"):
            spread_memory({0: "1GiB"})


def test_a_spread_teacher_too_large_is_stopped_before_loading_naming_the_options(toy, tmp_path):
    with pytest.raises(ModelError) as raised:
        load_samples(_cfg(toy, tmp_path / "out", "teacher_device_map=auto", "teacher_max_memory={cpu: 1MB}"))
    message = str(raised.value)
    assert "teacher_device_map=auto has 0.0 GiB" in message and "teacher_max_memory; naming disk" in message
    assert "teacher_quantization=int8" in message and "data.answers=server" in message
    assert not (tmp_path / "out" / "answers" / "answers.jsonl").exists()


def test_a_whole_teacher_too_large_for_the_device_names_spreading_it(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_free_memory", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(ModelError) as raised:
        load_samples(_cfg(toy, tmp_path / "out"))
    message = str(raised.value)
    assert (
        "cpu has 0.0 GiB free: spread it over this machine's GPUs, CPU memory and disk (teacher_device_map=auto)"
        in (message)
    )
    assert "teacher_quantization=int8" in message
    assert "data.answers=server" in message and "fsdp2" not in message  # a launch answers with a whole teacher each


def test_the_cache_names_what_fits_a_teacher_it_cannot_shard(toy, tmp_path, monkeypatch):
    teacher, _, data = toy
    hidden = load_model(teacher, torch.float32, empty=True).config.text_config.hidden_size
    Verbalizers(hidden, [0, 2]).save(tmp_path / "verbalizers")
    cfg = load_config(CONFIG, [f"data.path={data}"], teacher=teacher, output=str(tmp_path / "cache"))
    samples = load_samples(cfg)
    monkeypatch.setattr(loading, "_free_memory", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(ModelError) as raised:
        build_cache(cfg, tmp_path / "cache", tmp_path / "verbalizers", samples)
    message = str(raised.value)
    assert "the cache holds the whole teacher on each process's device, a launch does not shard it" in message
    assert "teacher_quantization=int8" in message and "no teacher_cache" in message and "data.answers" not in message


def test_a_spread_teacher_that_fits_one_device_is_placed_there(toy, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vlsi"):
        model = answers_module._load_teacher(_cfg(toy, tmp_path, "teacher_device_map=auto"))
    assert len({p.device for p in model.parameters()}) == 1 and not model.training  # cpu here; a GPU where one is
    assert re.search(r"the teacher answers spread over \{'\w+': 1\}", caplog.text)


def test_the_settings_are_checked(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"teacher_device_map=auto places only the teacher that answers prompts"):
        load_config(CONFIG, ["teacher_device_map=auto"], output=str(tmp_path))
    with pytest.raises(ConfigError, match="teacher_max_memory bounds the devices of teacher_device_map=auto"):
        _cfg(toy, tmp_path, "teacher_max_memory={cpu: 1GB}")
    with pytest.raises(ConfigError, match=r"teacher_max_memory: 'gpu0' is not a device \(a GPU index such as 0"):
        _cfg(toy, tmp_path, *SPREAD[:1], "teacher_max_memory={gpu0: 1GB}")
    for size in ("lots", "0GB", 1.5, True):
        with pytest.raises(ConfigError, match=f"teacher_max_memory: cpu: {size!r} is not a size"):
            _cfg(toy, tmp_path, *SPREAD[:1], f"teacher_max_memory={{cpu: {size}}}")
    with pytest.raises(ConfigError, match="teacher_quantization=int8 loads a whole quantized teacher on one device"):
        _cfg(toy, tmp_path, *SPREAD, "teacher_quantization=int8")
    cfg = _cfg(toy, tmp_path, *SPREAD)
    assert cfg.teacher_max_memory == {"cpu": "1MB", "disk": "1GiB"}


def test_the_main_process_alone_answers_with_a_spread_teacher():
    pending = ["a", "b", "c", "d", "e"]
    assert [share(pending, rank, 2) for rank in (0, 1)] == [["a", "c", "e"], ["b", "d"]]  # each process its share
    assert [share(pending, rank, 1) for rank in (0, 1)] == [pending, []]  # teacher_device_map=auto: one answers
