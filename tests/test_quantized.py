"""A quantized teacher (torchao int8 weight-only runs on the CPU) and the memory check made before any teacher loads."""

import json
from pathlib import Path

import pytest
import torch

from vlsi.config import load_config
from vlsi.models.loading import ModelError, check_fits, load_model, quantization_config
from vlsi.runfolder import FolderError
from vlsi.stages.samples import load_samples
from vlsi.toy import write_digits_dataset, write_tiny_pair

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml")

pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    teacher, _ = write_tiny_pair(tmp_path_factory.mktemp("pair"))
    return str(teacher)


def test_int8_teacher_loads_quantized_and_predicts_like_the_full_one(teacher):
    quantized = load_model(teacher, torch.float32, quantization="int8").eval()
    full = load_model(teacher, torch.float32).eval()
    weight = quantized.model.language_model.layers[0].self_attn.q_proj.weight
    assert type(weight).__name__ == "Int8Tensor"
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = quantized(input_ids=ids).logits, full(input_ids=ids).logits  # [2, 16, V]
    assert (a - b).abs().max() < 0.05 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_gpu_only_quantizations_are_refused_in_one_line_on_a_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs them")
    for name in ("int4", "nf4", "bnb8", "fp8"):
        with pytest.raises(ModelError, match=f"teacher_quantization={name} runs on CUDA GPUs only"):
            quantization_config(name)


def test_a_teacher_too_large_for_the_device_stops_before_loading_naming_the_options(teacher, monkeypatch):
    import vlsi.models.loading as loading

    check_fits(teacher, torch.float32, torch.device("cpu"))  # a tiny teacher fits
    monkeypatch.setattr(loading, "_free_memory", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(ModelError) as raised:
        check_fits(teacher, torch.float32, torch.device("cpu"))
    message = str(raised.value)
    assert "needs about" in message and "shard it" in message and "teacher_quantization=int8" in message
    assert "data.answers=server" in message and "\n" not in message
    parameters = sum(p.numel() for p in load_model(teacher, torch.float32, empty=True).parameters())
    monkeypatch.setattr(loading, "_free_memory", lambda device: int(parameters * 4 * 1.1 / 2) + 1)
    with pytest.raises(ModelError):
        check_fits(teacher, torch.float32, torch.device("cpu"))  # fp32 does not fit half of it
    check_fits(teacher, torch.float32, torch.device("cpu"), quantization="int8")  # int8 does
    check_fits(teacher, torch.float32, torch.device("cpu"), share=2)  # and so does half of it per process


def test_an_int8_teacher_answers_and_the_answers_record_it(tmp_path, teacher):
    records = json.loads(write_digits_dataset(tmp_path, n=4).read_text())
    for record in records:
        record["conversations"] = record["conversations"][:1]  # the teacher answers every question
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = [f"data.path={data}", "data.answers=teacher", "data.answer_max_tokens=3", "teacher_quantization=int8"]
    settings.insert(0, "data.keep_cut_answers=true")  # the toy teacher's random weights never end an answer
    cfg = load_config(CONFIG, settings, teacher=teacher, output=str(tmp_path / "out"))
    answered = load_samples(cfg)
    assert len(answered) == 4 and all(s.messages[-1]["role"] == "assistant" for s in answered)
    index = json.loads((tmp_path / "out" / "answers" / "index.json").read_text())
    assert index["teacher_quantization"] == "int8"
    with pytest.raises(FolderError, match="teacher_quantization: 'int8' -> ''"):  # the same folder, full precision
        load_samples(load_config(CONFIG, settings[:-1], teacher=teacher, output=str(tmp_path / "out")))
