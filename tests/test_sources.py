"""Hugging Face datasets (parquet, arrow, save_to_disk folders, hub-layout folders), mixtures and `vlsi data check`,
built with `datasets` from the bundled digits and read, checked, scanned and trained on as a JSONL file is."""

import copy
import json
import pickle

import datasets
import numpy as np
import pytest
import torch
from commands import CONFIG, onevision_dataset

from vlsi.cli import main
from vlsi.config import DataConfig, StageConfig, load_config
from vlsi.data import DataError, VLDataset, make_collate, parallel, read_dataset
from vlsi.data.images import load_image
from vlsi.data.records import BadRecord
from vlsi.data.skipping import SKIPPED, with_skipped
from vlsi.data.sources import Mixture, Source, open_dataset, parse_sources, read_sources
from vlsi.models.tiny import build_tiny_vlm
from vlsi.stages.loop import MetricsLog, make_accelerator, make_loader, train
from vlsi.toy import write_digits_dataset, write_tiny_pair

N = 12
IMAGE = datasets.Image()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(folder, the JSON file of digit questions over PNG files, its records, the tiny student)."""
    folder = tmp_path_factory.mktemp("digits")
    _, student = write_tiny_pair(folder)
    path = write_digits_dataset(folder, n=N)
    return folder, path, json.loads(path.read_text()), student


def _png(folder, record) -> dict:
    return {"bytes": (folder / record["image"]).read_bytes(), "path": None}


def _turns(record) -> tuple[str, str]:
    human, gpt = record["conversations"]
    return human["value"].removeprefix("<image>\n"), gpt["value"]


def onevision(folder, records) -> datasets.Dataset:
    """LLaVA-OneVision-Data's columns: id, conversations, image (bytes inside)."""
    return onevision_dataset(folder, records)


def trl(folder, records) -> datasets.Dataset:
    """TRL's vision datasets: messages with {"type": "image"} items, and images."""
    rows = []
    for r in records:
        question, answer = _turns(r)
        user = [{"type": "image", "text": None}, {"type": "text", "text": question}]
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        rows.append({"messages": messages, "images": [_png(folder, r)]})
    return datasets.Dataset.from_list(rows).cast_column("images", datasets.List(IMAGE))


def cauldron(folder, records) -> datasets.Dataset:
    """the_cauldron's columns: images, texts (a list of {user, assistant, source})."""
    rows = []
    for r in records:
        question, answer = _turns(r)
        rows.append({"images": [_png(folder, r)], "texts": [{"user": question, "assistant": answer, "source": "d"}]})
    return datasets.Dataset.from_list(rows).cast_column("images", datasets.List(IMAGE))


def hub_folder(folder, dataset, config="digits", split="train"):
    """A folder laid out as a hub dataset repo: CONFIG/SPLIT-00000-of-00001.parquet and the README's `configs:`."""
    (folder / config).mkdir(parents=True)
    dataset.to_parquet(folder / config / f"{split}-00000-of-00001.parquet")
    files = f"  data_files:\n  - split: {split}\n    path: {config}/{split}-*\n"
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: {config}\n{files}---\n# digits\n")
    return folder


@pytest.fixture(scope="module")
def containers(digits, tmp_path_factory):
    """{name: (spec, preset)} of the digits written in every container, each in its set's own columns."""
    folder, _, records, _ = digits
    out = tmp_path_factory.mktemp("containers")
    onevision(folder, records).to_parquet(out / "onevision.parquet")
    trl(folder, records).save_to_disk(out / "trl-saved")
    shards = out / "shards"
    shards.mkdir()
    for k, half in enumerate((records[: N // 2], records[N // 2 :])):
        cauldron(folder, half).to_parquet(shards / f"train-0000{k}-of-00002.parquet")
    hub_folder(out / "hub", cauldron(folder, records))
    arrow = out / "arrow"
    onevision(folder, records).save_to_disk(arrow)
    return {
        "parquet": (str(out / "onevision.parquet"), "onevision"),
        "save_to_disk": (str(out / "trl-saved"), "trl"),
        "shards": (str(shards), "cauldron"),
        "hub": (f"{out / 'hub'}:digits@train", "cauldron"),
        "arrow": (next(str(p) for p in arrow.glob("*.arrow")), "auto"),
    }


@pytest.mark.parametrize("container", ["parquet", "save_to_disk", "shards", "hub", "arrow"])
def test_every_container_gives_the_samples_of_the_jsonl_file(digits, containers, container):
    """Same conversations, the same pictures (bytes from the rows, decoded only when loaded), the same encoded
    tensors (image tokens and pixel values) as the JSON file over PNG files."""
    folder, path, records, _ = digits
    spec, preset = containers[container]
    reference, _ = read_dataset(path)
    samples, problems = read_sources([Source(spec, preset=preset)], num_proc=1)
    assert problems == {spec: []} and len(samples) == N
    assert [s.messages for s in samples] == [s.messages for s in reference]
    assert all(isinstance(source, bytes) for s in samples for source in s.images)
    assert [s.sizes for s in samples] == [s.sizes for s in reference]
    for sample, expected in zip(samples, reference, strict=True):
        assert np.array_equal(np.asarray(load_image(sample.images[0])), np.asarray(load_image(expected.images[0])))
    if preset == "onevision" or container == "arrow":
        assert [s.id for s in samples] == [r["id"] for r in records]
    _, processor = build_tiny_vlm(family="qwen2_vl")
    ours, theirs = (VLDataset(s, {"model": processor}, max_length=512, num_proc=1) for s in (samples, reference))
    assert ours.lengths == theirs.lengths
    item, expected = ours[3]["model"], theirs[3]["model"]
    assert (item["input_ids"] == processor.image_token_id).sum() > 0 and item["pixel_values"].numel() > 0
    for key in expected:
        assert torch.equal(item[key], expected[key]), key


@pytest.mark.parametrize("container", ["parquet", "save_to_disk"])
def test_one_step_trains_on_a_dataset(digits, containers, container, tmp_path):
    _, _, _, student = digits
    spec, preset = containers[container]
    out = tmp_path / "out"
    argv = ["sft", "--model", str(student), "--data", spec, "--output", str(out), "--config", CONFIG]
    assert main([*argv, "sft.max_steps=1", "sft.batch_size=2", f"data.preset={preset}"]) == 0
    [metrics] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics["step"] == 1 and np.isfinite(metrics["loss"])
    assert (out / "model" / "model.safetensors").is_file()


def test_columns_are_mapped_by_settings(digits, tmp_path):
    folder, path, records, _ = digits
    renamed = trl(folder, records).rename_columns({"messages": "chat", "images": "pictures"})
    renamed.to_parquet(tmp_path / "renamed.parquet")
    spec = str(tmp_path / "renamed.parquet")
    with pytest.raises(DataError, match=r"no conversation column among \['chat', 'pictures'\]; set data.columns"):
        read_sources([Source(spec)])
    with pytest.raises(DataError, match=r"no column 'messages', 'images' \(for messages, images\)"):
        read_sources([Source(spec, preset="trl")])
    cfg = load_config(None, [f"data.path={spec}", "data.columns.messages=chat", "data.columns.images=pictures"])
    samples, _ = read_sources(parse_sources(cfg.data), num_proc=1)
    assert [s.messages for s in samples] == [s.messages for s in read_dataset(path)[0]]


def test_bad_rows_are_named_by_source_and_row_skipped_or_found_lazily(digits, tmp_path):
    folder, _, records, _ = digits
    dataset = onevision(folder, records).to_list()
    dataset[2]["conversations"][1]["value"] = " "  # no answer
    dataset[5]["image"] = {"bytes": b"not an image", "path": None}
    spec = str(tmp_path / "bad.parquet")
    datasets.Dataset.from_list(dataset).cast_column("image", IMAGE).to_parquet(spec)
    with pytest.raises(DataError, match=r"2 invalid records in .*bad.parquet \(set data.skip_invalid=true"):
        read_sources([Source(spec)])
    samples, problems = read_sources([Source(spec)], skip_invalid=True, num_proc=1)
    assert len(samples) == N - 2 and [s.id for s in samples][2] == "digit-3"
    assert problems[spec][0] == f"{spec}: record digit-2 (row 2): turn 1: assistant turn has no text"
    assert problems[spec][1].startswith(f"{spec}: record digit-5 (row 5): image <12 embedded bytes>: not an image")

    lazy, _ = read_sources([Source(spec)], lazy=True)
    assert len(lazy) == N and lazy[3].id == "digit-3"
    with pytest.raises(BadRecord, match=r"bad.parquet: record digit-5 \(row 5\): image <12 embedded bytes>"):
        lazy[5]
    _, processor = build_tiny_vlm(family="qwen2_vl")
    dataset = VLDataset(lazy, {"model": processor}, max_length=512, lazy=True)
    [(position, message, bad)] = dataset[2][SKIPPED]
    assert (position, bad) == (2, True) and message.startswith(f"{spec}: record digit-2 (row 2): turn 1")


def test_checking_on_two_processes_and_sending_to_others_keep_the_samples(digits, containers, monkeypatch):
    spec, preset = containers["save_to_disk"]
    monkeypatch.setattr(parallel, "CHUNK", 4)
    one, _ = read_sources([Source(spec, preset=preset)], num_proc=1)
    two, _ = read_sources([Source(spec, preset=preset)], num_proc=2)
    assert list(one) == list(two) and one.fingerprint == two.fingerprint
    sent = pickle.loads(pickle.dumps(two))  # what `on_main_process` broadcasts: the dataset is mapped, not copied
    assert len(pickle.dumps(two)) < 100_000 and list(sent) == list(one) and sent.fingerprint == one.fingerprint
    assert sent[1:3].rows.tolist() == [1, 2] and [s.sizes for s in sent[1:3]] == [s.sizes for s in one][1:3]


def test_iterating_reads_blocks_of_rows_and_gives_what_indexing_gives(digits, containers, monkeypatch):
    from vlsi.data import sources

    monkeypatch.setattr(sources, "BLOCK", 5)
    spec, preset = containers["parquet"]
    samples, _ = read_sources([Source(spec, preset=preset)], num_proc=1)
    assert list(samples) == [samples[i] for i in range(N)]
    assert [s.sizes for s in samples] == [samples[i].sizes for i in range(N)]
    scattered = samples.take([11, 0, 5, 6, 1])  # a block spread over 12 rows: read row by row
    assert [s.id for s in scattered] == [samples[i].id for i in (11, 0, 5, 6, 1)]
    assert [s.sizes for s in scattered] == [samples[i].sizes for i in (11, 0, 5, 6, 1)]


def test_fingerprint_follows_the_data_and_the_scan_cache_is_reused(digits, tmp_path, monkeypatch):
    folder, _, records, _ = digits
    spec = str(tmp_path / "d.parquet")
    onevision(folder, records).to_parquet(spec)
    first, _ = read_sources([Source(spec)], num_proc=1)
    again, _ = read_sources([Source(spec)], num_proc=1)
    assert first.fingerprint == again.fingerprint
    assert read_sources([Source(spec, preset="onevision")], num_proc=1)[0].fingerprint == first.fingerprint
    _, processor = build_tiny_vlm(family="qwen2_vl")
    cache = tmp_path / "scan" / "lengths.json"
    VLDataset(first, {"model": processor}, max_length=512, cache_path=cache, num_proc=1)
    from vlsi.data import dataset as dataset_module

    monkeypatch.setattr(dataset_module, "_count", lambda *a: pytest.fail("scanned again"))
    VLDataset(again, {"model": processor}, max_length=512, cache_path=cache, num_proc=1)
    monkeypatch.undo()
    changed = onevision(folder, [records[1], records[0], *records[2:]])
    changed.to_parquet(spec)
    assert read_sources([Source(spec)], num_proc=1)[0].fingerprint != first.fingerprint


def test_unanswered_rows_are_answered_by_the_teacher(digits, tmp_path):
    """data.answers=teacher on a parquet whose rows end with the question: the teacher sees their embedded images."""
    folder, _, records, student = digits
    rows = onevision(folder, records[:4]).to_list()
    for row in rows:
        row["conversations"] = row["conversations"][:1]
    spec = str(tmp_path / "prompts.parquet")
    datasets.Dataset.from_list(rows).cast_column("image", IMAGE).to_parquet(spec)
    out = tmp_path / "out"
    argv = ["sft", "--model", str(student), "--teacher", str(folder / "teacher"), "--data", spec]
    settings = ["sft.max_steps=1", "sft.batch_size=2", "data.answers=teacher", "data.answer_max_tokens=4"]
    settings.append("data.keep_cut_answers=true")  # the toy teacher's random weights never end an answer
    assert main([*argv, "--output", str(out), "--config", CONFIG, *settings]) == 0
    answers = [json.loads(line) for line in (out / "answers" / "answers.jsonl").read_text().splitlines()]
    assert sorted(a["id"] for a in answers) == [r["id"] for r in records[:4]]


def test_the_teacher_cache_of_a_parquet_holds_the_targets_of_its_jsonl(digits, containers, tmp_path):
    """`build_cache` (what `vlsi cache` and `teacher_cache=C` run) on the parquet copy of the digits: the same rows,
    sample by sample, as on the JSON file over PNG files."""
    from vlsi.cache import TeacherCache, build_cache
    from vlsi.models.family import model_parts
    from vlsi.models.loading import load_model
    from vlsi.models.verbalizer import Verbalizers
    from vlsi.stages.samples import load_samples

    folder, path, _, _ = digits
    teacher = str(folder / "teacher")
    torch.manual_seed(0)
    Verbalizers(model_parts(load_model(teacher, torch.float32)).hidden_size, [0, 2]).save(tmp_path / "verbalizers")
    spec, preset = containers["parquet"]
    built = {}
    for name, data in (("jsonl", [str(path)]), ("parquet", [spec, "data.preset=onevision"])):
        settings = [f"data.path={data[0]}", *data[1:], "verbalizer.teacher_layers=[0,2]", "precision=fp32"]
        cfg = load_config(None, [*settings, "cache.top_k=5", "cache.shard_size=5"], teacher=teacher)
        cfg.output = str(tmp_path / f"out-{name}")
        samples = load_samples(cfg)
        built[name] = TeacherCache(build_cache(cfg, tmp_path / f"cache-{name}", tmp_path / "verbalizers", samples))
    for sample_id in ("digit-0", "digit-7", f"digit-{N - 1}"):
        ours, theirs = built["parquet"].rows(sample_id), built["jsonl"].rows(sample_id)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    index = json.loads((tmp_path / "cache-parquet" / "index.json").read_text())
    assert index["complete"] and index["data"] == spec


# ---------------------------------------------------------------- mixtures


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_mixture_file_weights_sources_from_the_seed(digits, containers, tmp_path):
    folder, path, records, _ = digits
    jsonl = _jsonl(folder / "part.jsonl", records[:6])
    spec, _ = containers["save_to_disk"]
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(
        f"sources:\n- {{path: {jsonl}, weight: 2}}\n- {{path: {spec}, preset: trl, samples: 5, name: trl}}\n"
    )
    sources = parse_sources(DataConfig(path=str(mixture)))
    assert [(s.name, s.weight, s.samples, s.preset) for s in sources] == [
        (str(jsonl), 2, None, "auto"),
        ("trl", None, 5, "trl"),
    ]
    mixed, _ = read_sources(sources, seed=0, num_proc=1)
    assert isinstance(mixed, Mixture) and len(mixed) == 12 + 5
    ids = [s.id for s in mixed]
    assert ids[:12] == [f"{jsonl}/digit-{k}" for k in range(6)] * 2
    drawn = [i for i in ids[12:]]
    assert len(set(drawn)) == 5 and all(i.startswith("trl/") for i in drawn)
    assert [s.id for s in read_sources(sources, seed=0, num_proc=1)[0]] == ids
    assert [s.id for s in read_sources(sources, seed=1, num_proc=1)[0]][12:] != drawn
    assert mixed.fingerprint != read_sources(sources, seed=1, num_proc=1)[0].fingerprint
    assert mixed.where(13).startswith("trl: record ") and mixed.where(0) == f"{jsonl}: record digit-0 (line 1)"

    mixture.write_text(f"sources:\n- {{path: {jsonl}, weight: 2, samples: 3}}\n")
    with pytest.raises(DataError, match=r"mix.yaml: sources\[0\]: give `weight` or `samples`, not both"):
        parse_sources(DataConfig(path=str(mixture)))
    mixture.write_text(f"sources:\n- {{path: {jsonl}, wieght: 2}}\n")
    with pytest.raises(DataError, match=r"sources\[0\]: unknown keys \['wieght'\]"):
        parse_sources(DataConfig(path=str(mixture)))


def test_errors_in_a_mixture_name_their_source(digits, containers, tmp_path):
    folder, _, records, _ = digits
    bad = [dict(records[0], conversations=records[0]["conversations"][:1]), *records[1:3]]
    jsonl = _jsonl(folder / "bad.jsonl", bad)
    spec, preset = containers["parquet"]
    data = DataConfig(path=[str(jsonl), spec], preset=preset)
    with pytest.raises(DataError, match=r"bad.jsonl: record digit-0 \(line 1\): no assistant turn"):
        read_sources(parse_sources(data), num_proc=1)
    _, skipped = read_sources(parse_sources(data), skip_invalid=True, num_proc=1)
    assert [len(p) for p in skipped.values()] == [1, 0] and list(skipped) == [str(jsonl), spec]


class _Recorder(torch.nn.Module):
    """A step module that remembers the input ids of every batch; `stop_at`: raise at that call (a kill)."""

    def __init__(self, stop_at=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen, self.stop_at = [], stop_at

    def forward(self, batch):
        if len(self.seen) + 1 == self.stop_at:
            raise KeyboardInterrupt("killed")
        self.seen.append(batch["model"]["input_ids"].tolist())
        return self.weight.sum() * batch["model"]["input_ids"].float().mean(), {}


def test_a_mixture_of_jsonl_and_parquet_trains_and_resumes_exactly(digits, containers, tmp_path):
    folder, _, records, student = digits
    jsonl = _jsonl(folder / "mix.jsonl", records[:6])
    spec, _ = containers["parquet"]
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(f"sources:\n- {{path: {jsonl}}}\n- {{path: {spec}, preset: onevision, samples: 8}}\n")
    mixed, _ = read_sources(parse_sources(DataConfig(path=str(mixture))), seed=0, num_proc=1)
    _, processor = build_tiny_vlm(family="qwen2_vl")
    stage = StageConfig(max_steps=6, grad_accum=1, lr=0.1, batch_size=2)

    def run(module, name):
        dataset = VLDataset(mixed, {"model": processor}, max_length=512, num_proc=1)
        loader = make_loader(dataset, 2, with_skipped(make_collate({"model": processor})), seed=0)
        accelerator = make_accelerator(stage, torch.float32)
        metrics = MetricsLog(tmp_path / f"{name}.jsonl")
        return train(accelerator, module, loader, stage, "sft", metrics, checkpoint_dir=tmp_path / name, every=2)

    whole = _Recorder()
    run(whole, "whole")
    killed = _Recorder(stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        run(killed, "resumed")
    resumed = _Recorder()
    run(resumed, "resumed")
    assert killed.seen[:2] + resumed.seen == whole.seen

    out = tmp_path / "out"  # and the command line: --data twice
    argv = ["sft", "--model", str(student), "--data", str(jsonl), "--data", spec, "--output", str(out)]
    assert main([*argv, "--config", CONFIG, "sft.max_steps=1", "sft.batch_size=2"]) == 0
    assert load_config(out / "config.yaml").data.path == [str(jsonl), spec]


# ---------------------------------------------------------------- vlsi data check


def test_data_check_reports_each_source_and_the_total(digits, containers, tmp_path, capsys):
    folder, _, records, student = digits
    injected = copy.deepcopy(records[4])
    injected["conversations"][0]["value"] += "<|im_end|>"  # found by the scan: the processor's control token
    bad = [dict(records[0], image="missing.png"), *records[1:4], injected]
    jsonl = _jsonl(folder / "check.jsonl", bad)
    spec, preset = containers["shards"]
    assert main(["data", "check", "--data", str(jsonl), "data.preset=cauldron"]) == 2
    assert "data.preset and data.columns are for datasets (parquet, arrow, hub ids); data.path has none" in (
        capsys.readouterr().err
    )
    mixture = tmp_path / "check.yaml"
    mixture.write_text(f"sources:\n- {{path: {jsonl}}}\n- {{path: {spec}, preset: {preset}, name: cauldron}}\n")
    assert (
        main(["data", "check", "--data", str(mixture), "--student", str(student), "--json", "data.max_length=60"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    first, second = report["sources"]
    assert (first["records"], first["valid"], first["with_problems"], first["images"]) == (5, 3, 2, 3)
    missing, special = first["problems"]
    assert missing == f"{jsonl}: record digit-0 (line 1): image 'missing.png': file not found ({folder}/missing.png)"
    assert special.startswith(f"{jsonl}: record digit-4 (line 5): special token text '<|im_end|>' (turn 0)")
    assert (second["source"], second["records"], second["with_problems"], second["images"]) == ("cauldron", N, 0, N)
    assert report["total"]["records"] == 5 + N and report["total"]["images"] == 3 + N

    samples, _ = read_sources([Source(spec, preset="cauldron")], num_proc=1)
    _, processor = build_tiny_vlm(family="qwen2_vl")
    lengths = VLDataset(samples, {"s": processor}, max_length=10_000, num_proc=1).lengths
    image_tokens = (VLDataset(samples, {"s": processor}, max_length=10_000)[0]["s"]["input_ids"]
                    == processor.image_token_id).sum().item()  # fmt: skip
    assert second["image_tokens"] == {
        "min": image_tokens,
        "median": image_tokens,
        "p99": image_tokens,
        "max": image_tokens,
    }
    assert second["text_tokens"]["max"] == max(lengths) - image_tokens
    assert second["over_max_length"] == sum(n > 60 for n in lengths)

    assert main(["data", "check", "--data", str(mixture)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == f"{jsonl}: 5 records (1 with problems), 4 images in the valid ones"
    assert f"total: {5 + N} records (1 with problems), {4 + N} images in the valid ones" in text


def test_a_source_that_cannot_be_read_is_one_line(tmp_path, capsys):
    assert main(["data", "check", "--data", str(tmp_path / "nothing.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlsi data: error: data.path ") and "no such file or folder, and not a hub id" in err
    assert len(err.splitlines()) == 1
    folder = tmp_path / "two"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": [[]]}),
                          "test": datasets.Dataset.from_dict({"messages": [[]]})}).save_to_disk(folder)  # fmt: skip
    with pytest.raises(DataError, match=r"no split 'validation'; it has \['train', 'test'\]"):
        open_dataset(f"{folder}@validation")
    assert len(open_dataset(f"{folder}@test")) == 1


def test_data_path_takes_one_source_or_a_list(tmp_path):
    from vlsi.config import ConfigError

    assert load_config(None, ["data.path=HuggingFaceM4/the_cauldron:ai2d@train"]).data.path == (
        "HuggingFaceM4/the_cauldron:ai2d@train"
    )
    assert load_config(None, ["data.path=[a.jsonl,b.parquet]"]).data.path == ["a.jsonl", "b.parquet"]
    with pytest.raises(ConfigError, match=r"data.path\[1\]: expected str, got \[.b.\]"):
        load_config(None, ["data.path=[a.jsonl,[b]]"])
    with pytest.raises(ConfigError, match="data.preset='llava' is not one of auto, trl, cauldron, onevision"):
        load_config(None, ["data.preset=llava"])
    sources = parse_sources(DataConfig(path=["a/b", "c/d:x@test"], preset="trl"))
    assert [(s.path, s.preset, s.name) for s in sources] == [("a/b", "trl", "a/b"), ("c/d:x@test", "trl", "c/d:x@test")]
    with pytest.raises(DataError, match=r"sources \['a/b'\] are given twice"):
        parse_sources(DataConfig(path=["a/b", "a/b"]))
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("sources:\n- {path: a/b, image_root: pics}\n- {path: c/d}\n")
    sources = parse_sources(DataConfig(path=str(mixture), image_root="imgs"))
    assert [s.image_root for s in sources] == [str(tmp_path / "pics"), "imgs"]  # its own: beside the file
