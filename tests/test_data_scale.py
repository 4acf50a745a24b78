"""Data at scale: token counts without the image processor equal the full processor's for every tiny family; the
check and the scan give the same results on 1 and 2 processes; image headers, not pixels, are read up front; lazy
validation skips, logs and counts bad records, stops past data.max_bad_fraction, and resumes exactly."""

import json
import logging
import random

import pytest
import torch
from PIL import Image

from vlsi.config import StageConfig
from vlsi.data import DataError, Sample, VLDataset, make_collate, parallel, read_dataset, scan
from vlsi.data import dataset as dataset_module
from vlsi.data.records import BadRecord
from vlsi.data.scan import TokenCounter, _full
from vlsi.data.skipping import SKIPPED, SkippedRecords, with_skipped
from vlsi.models.tiny import BUILDERS, build_tiny_vlm
from vlsi.stages.loop import MetricsLog, make_accelerator, make_loader, train

# families whose processors are known to expand an image into a run of one token counted by a size rule
RULE_FAMILIES = {"qwen2_vl", "llava_onevision"}
# ... and those whose expansions merge with the text or are not runs (Gemma 3's newlines, Idefics3 / SmolVLM tiles)
EXPAND_FAMILIES = {"gemma3", "idefics3", "smolvlm", "internvl"}


def llava(id, image="a.png", answer="a cat", question="<image>\nWhat is this?"):
    record = {"id": id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    return record | ({"image": image} if image else {})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """40 samples: 0, 1 or 2 images of random sizes (16-900 px a side), one or two turns (7 with one more image in the
    second question), PNG and JPEG."""
    folder = tmp_path_factory.mktemp("mixed")
    rng = random.Random(0)
    samples = []
    for k in range(40):
        n, later = [0, 1, 1, 1, 2][k % 5], int(k % 6 == 3)
        paths = []
        for i in range(n + later):
            path = folder / f"{k}-{i}.{'png' if (k + i) % 2 else 'jpg'}"
            Image.new("RGB", (rng.randint(16, 900), rng.randint(16, 900)), (k, 2 * k, 3 * k)).save(path)
            paths.append(path)
        question = [{"type": "text", "text": "What is this? " * rng.randint(1, 3)}]
        messages = [
            {"role": "user", "content": [{"type": "image"}] * n + question},
            {"role": "assistant", "content": [{"type": "text", "text": "a cat sat " * rng.randint(1, 4)}]},
        ]
        if k % 3 == 0:
            colour = [{"type": "image"}] * later + [{"type": "text", "text": "And the colour?"}]
            messages += [
                {"role": "user", "content": colour},
                {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
            ]
        samples.append(Sample(str(k), messages, paths))
    return samples


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_token_counts_without_images_equal_the_full_processor(family, mixed):
    """Every family tiny.py builds: the counts from image sizes equal `encode`'s on the real images; a family whose
    processor has no usable rule expands each image placeholder into the processor's text for it (from blank images
    of the same layout), or falls back to the processor itself (blank images, or the full path)."""
    try:
        _, processor = build_tiny_vlm(family=family)
    except ImportError as error:  # e.g. SmolVLM's processor needs num2words
        pytest.skip(f"{family}: {error}")
    counter = TokenCounter(processor)
    assert counter(mixed) == [_full(sample, processor) for sample in mixed], counter.describe()
    if family in RULE_FAMILIES:
        assert counter.mode == "rule"
    if family in EXPAND_FAMILIES:
        assert (counter.mode, counter.by_size) == ("expand", False)


def test_expansions_are_memoised_per_size_where_the_layout_does_not_fix_them(mixed, monkeypatch):
    """Idefics3 keyed without its tile grid: 2 x 1 and 1 x 2 tiles (probe sizes 80 x 40 and 30 x 90) hold as many
    tokens but expand differently; the probe finds it and memoises expansions per size, still exact."""
    layouts = scan.layouts
    monkeypatch.setattr(scan, "layouts", lambda processor, sizes: [key[:2] for key in layouts(processor, sizes)])
    _, processor = build_tiny_vlm(family="idefics3")
    counter = TokenCounter(processor)
    assert (counter.mode, counter.by_size) == ("expand", True)
    assert counter(mixed) == [_full(sample, processor) for sample in mixed]


@pytest.fixture
def data(tmp_path):
    """A JSONL of 30 records over 30 PNGs of different sizes (a few invalid: no answer, missing image)."""
    records = []
    for k in range(30):
        Image.new("RGB", (20 + 7 * k, 90 - 2 * k), (k, 0, 0)).save(tmp_path / f"{k}.png")
        records.append(llava(f"r{k}", image=f"{k}.png"))
    records[4] = llava("r4", image="4.png", answer=" ")
    records[9] = llava("r9", image="missing.png")
    return write_jsonl(tmp_path / "d.jsonl", records)


def test_check_and_scan_on_two_processes_equal_one(data, monkeypatch):
    monkeypatch.setattr(parallel, "CHUNK", 4)  # 8 chunks: both processes get several
    one, problems_one = read_dataset(data, skip_invalid=True, num_proc=1)
    two, problems_two = read_dataset(data, skip_invalid=True, num_proc=2)
    assert list(one) == list(two) and problems_one == problems_two and len(problems_one) == 2
    assert one.fingerprint == two.fingerprint
    assert [s.sizes for s in one] == [s.sizes for s in two] and one[0].sizes == [(20, 90)]

    _, processor = build_tiny_vlm(family="llava_onevision")
    scan_one = VLDataset(one, {"model": processor}, max_length=500, num_proc=1)
    scan_two = VLDataset(two, {"model": processor}, max_length=500, num_proc=2)
    assert scan_one.lengths == scan_two.lengths == [_full(s, processor)[0] for s in one]


def test_records_are_an_index_into_the_file(data):
    samples, _ = read_dataset(data, skip_invalid=True)
    assert samples.table.shape == (28, 4) and samples.table.dtype.name == "int64"
    assert samples[3].id == "r3" and samples[4].id == "r5"  # r4 was invalid
    assert [s.id for s in samples[2:5]] == ["r2", "r3", "r5"] and samples[2:5][1].sizes == [(41, 84)]


def test_image_headers_are_read_and_damaged_pixels_are_skipped_when_loaded(tmp_path, caplog):
    """A PNG whose header is sound but whose pixel data is cut passes the check; loading it skips it, names it,
    and the next sample takes its place."""
    for k in range(3):
        Image.new("RGB", (64, 64), (50 * k, 0, 0)).save(tmp_path / f"{k}.png")
    whole = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(whole[: len(whole) // 2])
    path = write_jsonl(tmp_path / "d.jsonl", [llava(f"r{k}", image=f"{k}.png") for k in range(3)])
    samples, problems = read_dataset(path)
    assert len(samples) == 3 and problems == []

    _, processor = build_tiny_vlm(family="qwen2_vl")
    dataset = VLDataset(samples, {"model": processor}, max_length=200)
    item = dataset[1]
    [(position, message, bad)] = item[SKIPPED]
    assert position == 1 and bad
    assert message.startswith(f"{path}: record r1 (line 2): an image cannot be decoded (OSError")
    assert torch.equal(item["model"]["input_ids"], dataset[2]["model"]["input_ids"])

    batch = with_skipped(make_collate({"model": processor}))([dataset[0], dataset[1]])
    assert batch[SKIPPED] == [(1, message, True)] and batch["model"]["input_ids"].shape[0] == 2
    skipped = SkippedRecords(size=3, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING, logger="vlsi"):
        skipped.add(batch[SKIPPED])
        skipped.add(batch[SKIPPED])  # seen again (another epoch): logged and counted once
    assert [r.getMessage() for r in caplog.records] == [message] and skipped.state() == [[1, 1]]
    with pytest.raises(DataError, match=r"1 bad records so far in this process, more than data.max_bad_fraction=0.2"):
        SkippedRecords(size=3, max_bad_fraction=0.2).add(batch[SKIPPED])


def test_lazy_validation_checks_each_record_when_loaded(data, monkeypatch):
    samples, problems = read_dataset(data, lazy=True)
    assert len(samples) == 30 and problems == []
    with pytest.raises(BadRecord, match=r"d\.jsonl: record r9 \(line 10\): image 'missing.png': file not found"):
        samples[9]
    _, processor = build_tiny_vlm(family="qwen2_vl")
    dataset = VLDataset(samples, {"model": processor}, max_length=200, lazy=True)
    assert len(dataset) == 30 and dataset.lengths is None
    [(position, message, bad)] = dataset[4][SKIPPED]
    assert (position, bad) == (4, True) and "record r4 (line 5): turn 1: assistant turn has no text; skipped" in message

    monkeypatch.setattr(dataset_module, "MAX_IN_A_ROW", 3)
    broken = write_jsonl(data.parent / "broken.jsonl", [llava(f"b{k}", image="missing.png") for k in range(5)])
    with pytest.raises(DataError, match="3 samples in a row could not be loaded"):
        VLDataset(read_dataset(broken, lazy=True)[0], {"model": processor}, max_length=200, lazy=True)[0]


class _Recorder(torch.nn.Module):
    """A step module that remembers the input ids of every batch it is given; `stop_at`: raise at that call."""

    def __init__(self, stop_at=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen, self.stop_at = [], stop_at

    def forward(self, batch):
        if len(self.seen) + 1 == self.stop_at:
            raise KeyboardInterrupt("killed")
        self.seen.append(batch["model"]["input_ids"].tolist())
        return self.weight.sum() * batch["model"]["input_ids"].float().mean(), {}


def test_lazy_resume_is_exact(data, tmp_path):
    """Killed after a checkpoint and resumed, a lazy run sees the same batches as an uninterrupted one, and the
    checkpoint's data position holds the records skipped so far."""
    samples, _ = read_dataset(data, lazy=True)
    _, processor = build_tiny_vlm(family="qwen2_vl")
    stage = StageConfig(max_steps=8, grad_accum=1, lr=0.1, batch_size=4)

    def run(module, folder):
        dataset = VLDataset(samples, {"model": processor}, max_length=200, lazy=True, max_bad_fraction=0.5)
        loader = make_loader(dataset, 4, with_skipped(make_collate({"model": processor})), seed=0)
        accelerator = make_accelerator(stage, torch.float32)
        metrics = MetricsLog(tmp_path / f"{folder}.jsonl")
        return train(accelerator, module, loader, stage, "sft", metrics, checkpoint_dir=tmp_path / folder, every=3)

    whole = _Recorder()
    run(whole, "whole")
    killed = _Recorder(stop_at=5)
    with pytest.raises(KeyboardInterrupt):
        run(killed, "resumed")
    position = json.loads((tmp_path / "resumed" / "step-00000003" / "state.json").read_text())["progress"]
    seen_bad = {p for p, bad in position["skipped"][0] if bad}
    assert seen_bad <= {4, 9} and seen_bad  # with this seed, the first 3 batches hold at least one of them
    resumed = _Recorder()
    run(resumed, "resumed")
    assert killed.seen[:3] + resumed.seen == whole.seen


def test_progress_is_logged_when_stderr_is_not_a_terminal(caplog):
    progress = parallel.Progress(total=10, desc="checking d.jsonl", every=0.0)
    assert progress.bar is None  # pytest captures stderr: not a terminal
    with caplog.at_level(logging.INFO, logger="vlsi"):
        progress.update(4)
        progress.update(6)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("checking d.jsonl: 4/10 records, ")
    assert "records/s, ETA" in lines[0] and lines[1].endswith("ETA 0 s")
