"""The teacher cache (`vlsi cache`, `teacher_cache=C`): what it stores, that a whole-distribution cache trains the
live run's student without loading the teacher, refusal of mismatched, truncated and missing data, resume after a
real SIGKILL, and the `vlsi train` path that builds the cache first."""

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from commands import one_thread
from safetensors.torch import load_file, save_file

from vlsi import cache as cache_module
from vlsi import cli, preflight, runfolder
from vlsi.cache import (
    INDEX,
    TeacherCache,
    build_cache,
    cache_identity,
    shard_name,
    teacher_targets,
)
from vlsi.config import ConfigError, load_config
from vlsi.data import VLDataset, make_collate, read_dataset, split_batch
from vlsi.models.family import model_parts
from vlsi.models.loading import freeze, load_model, load_processor
from vlsi.models.verbalizer import Verbalizers
from vlsi.pipeline import run_train
from vlsi.preflight import refuse_unusable_cache
from vlsi.runfolder import FolderError
from vlsi.stages import interact as interact_module
from vlsi.stages.interact import interact
from vlsi.stages.loop import MetricsLog
from vlsi.stages.samples import load_samples
from vlsi.toy import write_toy

TEACHER_LAYERS, STUDENT_LAYERS = [0, 2, 4], [0, 2]
ACCELERATE = Path(__file__).parent.parent / "configs" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Tiny teacher and student, 8 digit samples, and saved verbalizers of both: (root, teacher, student, data)."""
    root = tmp_path_factory.mktemp("toy")
    teacher, student, data = write_toy(root, n=8)
    torch.manual_seed(0)
    for who, path, layers in (("teacher", teacher, TEACHER_LAYERS), ("student", student, STUDENT_LAYERS)):
        hidden = model_parts(load_model(str(path), torch.float32)).hidden_size
        Verbalizers(hidden, layers).save(root / "verbalizers" / who)
    return root, str(teacher), str(student), data


def _cfg(toy, output, *overrides):
    root, teacher, student, data = toy
    cfg = load_config(
        None,
        [
            f"verbalizer.teacher_layers={TEACHER_LAYERS}",
            f"verbalizer.student_layers={STUDENT_LAYERS}",
            "chunk_size=7",
            "precision=fp32",
            "interact.max_steps=2",
            "interact.grad_accum=2",
            "interact.batch_size=2",
            "interact.lr=1e-2",
            "interact.lora.enabled=false",
            "checkpoint.every=0",
            "cache.shard_size=3",
            "cache.batch_size=2",
            *overrides,
        ],
        teacher=teacher,
        student=student,
        output=str(output),
        teacher_verbalizers=str(root / "verbalizers" / "teacher"),
    )
    cfg.data.path = str(data)
    return cfg


def _run_folder(toy, out):
    """An output folder as `vlsi train` leaves it before the interaction stage: both models' verbalizers."""
    shutil.copytree(toy[0] / "verbalizers", out / "verbalizers")
    return out


def _build(cfg, folder, verbalizers):
    return build_cache(cfg, folder, verbalizers, load_samples(cfg))


def _cache(toy, folder, *overrides):
    cfg = _cfg(toy, folder, *overrides)
    return cfg, _build(cfg, folder, toy[0] / "verbalizers" / "teacher")


def test_cache_holds_every_layers_top_k_and_tail(toy, tmp_path):
    cfg, folder = _cache(toy, tmp_path / "c", "cache.top_k=5")
    index = json.loads((folder / INDEX).read_text())
    assert index["complete"] and index["top_k"] == 5 and index["target_layers"] == TEACHER_LAYERS
    assert [s["file"] for s in index["shards"]] == [shard_name(i) for i in range(3)]  # 8 samples, 3 per shard
    shards = [load_file(folder / s["file"]) for s in index["shards"]]
    log_probs = torch.cat([s["log_probs"] for s in shards])
    assert log_probs.shape == (index["rows"], 4, 5)  # 3 target layers + the output, k = 5
    assert torch.cat([s["ids"] for s in shards]).dtype == torch.int32
    tail = torch.cat([s["log_tail"] for s in shards])
    total = torch.logsumexp(torch.cat([log_probs, tail[..., None]], -1), -1)  # the k tokens and the tail: all mass
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)

    # the rows are the live teacher's targets, sample by sample
    processor = load_processor(cfg.teacher)
    teacher = freeze(load_model(cfg.teacher, torch.float32)).eval()
    verbalizers = Verbalizers.load(toy[0] / "verbalizers" / "teacher")
    samples, _ = read_dataset(cfg.data.path)
    batch = make_collate({"t": processor})([VLDataset(samples[:1], {"t": processor}, 512)[0]])["t"]
    inputs, mask, _ = split_batch(batch)
    live = teacher_targets(teacher, model_parts(teacher), verbalizers, inputs, mask, index["vocab"], 5, 7)
    cached = TeacherCache(folder).rows(samples[0].id)
    torch.testing.assert_close(cached["log_probs"], live.log_probs, atol=1e-5, rtol=1e-5)
    assert torch.equal(cached["ids"].long(), live.ids)


def test_whole_distribution_cache_trains_the_live_student_without_the_teacher(toy, tmp_path, monkeypatch):
    live_out = _run_folder(toy, tmp_path / "live")
    cfg = _cfg(toy, live_out)
    samples = read_dataset(cfg.data.path)[0]
    interact(cfg, live_out, MetricsLog(live_out / "metrics.jsonl"), samples)

    cached_out = _run_folder(toy, tmp_path / "cached")
    cfg = _cfg(toy, cached_out, "cache.top_k=0", f"teacher_cache={tmp_path / 'c'}")
    build_cache(cfg, cfg.teacher_cache, cached_out / "verbalizers" / "teacher", samples)

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded")

    monkeypatch.setattr(interact_module, "load_frozen", no_teacher)
    interact(cfg, cached_out, MetricsLog(cached_out / "metrics.jsonl"), samples)

    live = load_file(live_out / "stages" / "interact" / "student" / "model.safetensors")
    cached = load_file(cached_out / "stages" / "interact" / "student" / "model.safetensors")
    assert live.keys() == cached.keys()
    worst = max((live[k] - cached[k]).abs().max().item() for k in live)
    # The cache's teacher ran on other batches (other padding, other thread splits), so its float32 log-probs differ
    # from the live ones in the last bits; Adam's normalised steps carry that into the weights at ~1e-5 (2e-5 seen
    # with two threads). A wrong target would move weights by the learning rate per step.
    assert worst <= 1e-4, f"the student trained from the cache differs from the live one by {worst}"
    assert (live_out / "layer_match.jsonl").read_text() == (cached_out / "layer_match.jsonl").read_text()
    live_rows, cached_rows = (
        [json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in (live_out, cached_out)
    )
    for a, b in zip(live_rows, cached_rows, strict=True):
        assert a.keys() == b.keys() and a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_mismatched_cache_is_refused_naming_what_differs(toy, tmp_path):
    cfg, folder = _cache(toy, tmp_path / "c", "cache.top_k=3")
    with pytest.raises(FolderError, match=r"other settings \(cache.top_k: 3 -> 4\)"):
        _build(_cfg(toy, folder, "cache.top_k=4"), folder, toy[0] / "verbalizers" / "teacher")
    other = tmp_path / "other_verbalizers"
    torch.manual_seed(1)
    Verbalizers(96, TEACHER_LAYERS).save(other)
    processor = load_processor(cfg.teacher)
    samples = read_dataset(cfg.data.path)[0]
    with pytest.raises(
        FolderError, match=r"teacher cache \(of teacher .*other settings \(teacher verbalizers\)"
    ) as refused:
        TeacherCache(folder).check(cache_identity(cfg, other, processor, samples))
    assert "\n" not in str(refused.value)
    with pytest.raises(FolderError, match=r"other settings \(data\)"):
        TeacherCache(folder).check(cache_identity(cfg, toy[0] / "verbalizers" / "teacher", processor, samples[:5]))


def test_a_teacher_changed_in_place_is_refused(toy, tmp_path):
    """Same folder, same file names and sizes, other weight values: the cache is not used (the answers' rule too)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(toy[1], teacher)
    cfg = dataclasses.replace(_cfg(toy, tmp_path / "c", "cache.top_k=3"), teacher=str(teacher))
    _build(cfg, tmp_path / "c", toy[0] / "verbalizers" / "teacher")
    path = teacher / "model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    size = path.stat().st_size
    save_file({**weights, name: weights[name] + 1}, path, metadata={"format": "pt"})
    assert path.stat().st_size == size
    with pytest.raises(FolderError, match=r"other settings \(teacher\); it is not reused") as refused:
        _build(cfg, tmp_path / "c", toy[0] / "verbalizers" / "teacher")
    assert "\n" not in str(refused.value)


def test_truncated_or_missing_shard_is_named(toy, tmp_path):
    _, folder = _cache(toy, tmp_path / "c", "cache.top_k=3")
    shard = folder / shard_name(1)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ConfigError, match=f"{shard}: truncated or corrupt"):
        TeacherCache(folder)
    shard.unlink()
    with pytest.raises(ConfigError, match=f"{shard}: shard missing"):
        TeacherCache(folder)
    with pytest.raises(ConfigError, match="no teacher cache here"):
        TeacherCache(tmp_path / "empty")


def test_shard_with_other_bytes_of_the_same_size_is_named_and_rebuilt_once_deleted(toy, tmp_path):
    _, folder = _cache(toy, tmp_path / "c", "cache.top_k=3")
    shard = folder / shard_name(1)
    good = {name: t.clone() for name, t in load_file(shard).items()}  # not a view of the file overwritten next
    bad = bytearray(shard.read_bytes())
    bad[-8] ^= 0xFF  # one byte of the last tensor's payload: the header still parses, the size is unchanged
    shard.write_bytes(bytes(bad))
    with pytest.raises(ConfigError, match=f"{shard}: corrupt \\(its sha256 .*; delete it and rerun `vlsi cache`"):
        TeacherCache(folder)
    shard.unlink()  # the fix the message gives: rerunning the build computes that shard alone
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.safetensors")}
    _cache(toy, folder, "cache.top_k=3")
    again = load_file(shard)  # the same tensors (the header's metadata may come in another order)
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
    assert all((folder / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    assert TeacherCache(folder).index["complete"]


def test_the_rebuild_checks_every_shard_against_the_index_and_approves_none_unchecked(toy, tmp_path, caplog):
    """Two shards altered (same sizes): the refusal names one; once it is deleted as the message says, the rebuild
    finds the other against the recorded sha256 and computes it again too, instead of recording its new hash."""
    _, folder = _cache(toy, tmp_path / "c", "cache.top_k=3")
    good = {p.name: p.read_bytes() for p in folder.glob("shard-*.safetensors")}
    for i in (0, 1):
        bad = bytearray(good[shard_name(i)])
        bad[-8] ^= 0xFF
        (folder / shard_name(i)).write_bytes(bytes(bad))
    with pytest.raises(ConfigError, match=f"{folder / shard_name(0)}: corrupt"):
        TeacherCache(folder)
    (folder / shard_name(0)).unlink()
    with caplog.at_level(logging.WARNING, logger="vlsi"):
        _cache(toy, folder, "cache.top_k=3")
    assert f"{folder / shard_name(1)} is not the shard index.json recorded" in caplog.text
    assert TeacherCache(folder).index["complete"]
    for name, data in good.items():  # the same tensors again (the header's metadata may come in another order)
        again, before = load_file(folder / name), safetensors.torch.load(data)
        assert again.keys() == before.keys() and all(torch.equal(again[k], before[k]) for k in before)


def test_shards_without_an_index_are_computed_again_never_relabelled(toy, tmp_path, caplog):
    """index.json deleted, then a build with other teacher verbalizers: no old shard is kept under the new label."""
    cfg, folder = _cache(toy, tmp_path / "c", "cache.top_k=3")
    (folder / INDEX).unlink()
    other = tmp_path / "other_verbalizers"
    torch.manual_seed(1)
    Verbalizers(96, TEACHER_LAYERS).save(other)
    old = {p.name: load_file(p)["log_probs"] for p in folder.glob("shard-*.safetensors")}
    with caplog.at_level(logging.WARNING, logger="vlsi"):
        _build(cfg, folder, other)
    assert "has no index.json to say what made its shards; computing every shard again" in caplog.text
    fresh = _build(_cfg(toy, tmp_path / "fresh", "cache.top_k=3"), tmp_path / "fresh", other)
    for name, log_probs in old.items():
        again = load_file(folder / name)["log_probs"]
        assert torch.equal(again, load_file(fresh / name)["log_probs"]) and not torch.equal(again, log_probs)


def test_shards_are_hashed_again_only_when_changed_since_their_last_check(toy, tmp_path, monkeypatch):
    _, folder = _cache(toy, tmp_path / "c", "cache.top_k=3")
    monkeypatch.setattr(runfolder, "RACY_NS", 0)  # trust a just-written shard's stat (the default waits a second)
    monkeypatch.setattr(runfolder, "_seen", {})  # this process's own shortcut: only the folder's record counts
    TeacherCache(folder)  # checked once: .verified.json records every shard
    hashed = []
    real = runfolder.sha256_file
    monkeypatch.setattr(runfolder, "sha256_file", lambda path: hashed.append(path) or real(path))
    monkeypatch.setattr(runfolder, "_seen", {})
    TeacherCache(folder)
    assert hashed == [], "unchanged shards are not read again"
    shard = folder / shard_name(0)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))  # touched: checked again
    TeacherCache(folder)
    assert hashed == [shard]


def test_a_cache_whose_folder_cannot_be_written_still_opens(toy, tmp_path, monkeypatch):
    """The check's record is only a shortcut for the next run: a read-only cache folder (or another run replacing the
    record at the same moment) must not stop this one."""
    _, folder = _cache(toy, tmp_path / "c", "cache.top_k=3")
    (folder / ".verified.json").unlink(missing_ok=True)

    def read_only(path, data):
        raise PermissionError(f"[Errno 13] Permission denied: '{path}'")

    monkeypatch.setattr(runfolder, "write_bytes", read_only)
    assert TeacherCache(folder).index["complete"]
    assert not list(folder.glob(".verified.json*"))


def test_l2_needs_a_whole_distribution_cache(toy, tmp_path):
    out = _run_folder(toy, tmp_path / "run")
    cfg = _cfg(toy, out, "cache.top_k=0", f"teacher_cache={tmp_path / 'whole'}", "interact.intermediate_loss=l2")
    _build(cfg, cfg.teacher_cache, out / "verbalizers" / "teacher")
    interact(cfg, out, MetricsLog(out / "metrics.jsonl"))  # the ablation's L2 row, from whole distributions
    assert (out / "stages" / "interact" / "student" / "model.safetensors").is_file()


@pytest.mark.parametrize("given_verbalizers", [True, False])
def test_train_refuses_a_cache_it_cannot_use_before_any_stage_trains(toy, tmp_path, given_verbalizers):
    """A top-k cache with the l2 term, and a cache in C made for other settings: refused by `vlsi train` before stage
    1, whether the teacher's verbalizers are given (teacher_verbalizers=DIR) or still to be trained."""
    made = _cfg(toy, tmp_path / "c", "cache.top_k=3")
    _build(made, tmp_path / "c", toy[0] / "verbalizers" / "teacher")
    given = {} if given_verbalizers else {"teacher_verbalizers": ""}
    for setting, error in (
        (["cache.top_k=3", "interact.intermediate_loss=l2"], "l2 needs the whole teacher distributions"),
        (["cache.top_k=5"], r"made with other settings \(cache.top_k: 3 -> 5\)"),
        (["cache.top_k=3", "data.max_length=300"], r"other settings \(data.max_length: .* -> 300\)"),
    ):
        out = tmp_path / "run"
        cfg = dataclasses.replace(_cfg(toy, out, f"teacher_cache={tmp_path / 'c'}", *setting), **given)
        with pytest.raises((ConfigError, FolderError), match=error):
            run_train(cfg)
        assert not (out / "verbalizers").exists() and not (out / "metrics.jsonl").exists(), "nothing trained"


def test_a_student_head_narrower_than_the_cached_vocabulary_is_refused(toy, tmp_path):
    cfg = _cfg(toy, tmp_path, f"teacher_cache={tmp_path / 'c'}")
    processor, samples = load_processor(cfg.teacher), read_dataset(cfg.data.path)[0]
    width = len(processor.tokenizer)
    refuse_unusable_cache(cfg, None, processor, samples, teacher=width + 64, student=width)  # padded rows: fine
    with pytest.raises(ConfigError, match=f"LM head has {width - 1} rows, fewer than the {width} tokens"):
        refuse_unusable_cache(cfg, None, processor, samples, teacher=width + 64, student=width - 1)


def _cache_command(toy, folder):
    root, teacher, _, data = toy
    return [
        sys.executable,
        "-m",
        "vlsi",
        "cache",
        "--teacher",
        teacher,
        "--data",
        str(data),
        "--output",
        str(folder),
        f"teacher_verbalizers={root / 'verbalizers' / 'teacher'}",
        f"verbalizer.teacher_layers={TEACHER_LAYERS}",
        "precision=fp32",
        "cache.top_k=4",
        "cache.shard_size=1",
        "cache.batch_size=1",
    ]


def test_cache_build_killed_then_resumed_computes_only_the_missing_shards(toy, tmp_path, capsys):
    reference = tmp_path / "whole"
    assert cli.main(_cache_command(toy, reference)[3:]) == 0  # in-process: `vlsi cache ...`
    assert "teacher cache written to" in capsys.readouterr().out

    folder = tmp_path / "killed"
    process = subprocess.Popen(_cache_command(toy, folder), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline and not (folder / shard_name(2)).is_file():
        time.sleep(0.002)
    assert process.poll() is None, "the build finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*.safetensors")}
    assert 3 <= len(kept) < 8 and not json.loads((folder / INDEX).read_text())["complete"]
    with pytest.raises(ConfigError, match="incomplete"):
        TeacherCache(folder)

    done = subprocess.run(_cache_command(toy, folder), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all((folder / name).stat().st_mtime_ns == mtime for name, mtime in kept.items()), "finished shards reused"
    assert not list(folder.glob("*.tmp"))
    for i in range(8):
        a, b = load_file(folder / shard_name(i)), load_file(reference / shard_name(i))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert TeacherCache(folder).index["rows"] == TeacherCache(reference).index["rows"]


def test_cache_command_needs_the_teacher_verbalizers(toy, tmp_path, capsys):
    _, teacher, _, data = toy
    code = cli.main(["cache", "--teacher", teacher, "--data", str(data), "--output", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "teacher_verbalizers=DIR" in err


def test_train_builds_the_cache_then_trains_from_it(toy, tmp_path, monkeypatch):
    """... with the data's fingerprint computed once for the run's record, the cache's checks and the stage's."""
    root, teacher, student, data = toy
    folder, out = tmp_path / "c", tmp_path / "run"
    fingerprinted = []

    def counted(samples, marks=None):  # a spy: the real fingerprint, counted
        fingerprinted.append(len(samples))
        return runfolder.samples_fingerprint(samples, marks)

    for module in (preflight, cache_module):  # every module that fingerprints a run's samples
        monkeypatch.setattr(module, "samples_fingerprint", counted)
    steps = [f"{stage}.{key}=1" for stage in ("verbalize", "interact", "sft") for key in ("max_steps", "grad_accum")]
    code = cli.main(
        ["train", "--teacher", teacher, "--student", student, "--data", str(data), "--output", str(out)]
        + [f"verbalizer.teacher_layers={TEACHER_LAYERS}", f"verbalizer.student_layers={STUDENT_LAYERS}"]
        + [f"teacher_verbalizers={root / 'verbalizers' / 'teacher'}", f"teacher_cache={folder}", "precision=fp32"]
        + ["cache.top_k=8", "checkpoint.every=0", "interact.lora.r=4", "sft.lora.r=4", *steps]
    )
    assert code == 0
    assert json.loads((folder / INDEX).read_text())["complete"]
    assert (out / "student" / "model.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (out / "layer_match.jsonl").read_text().splitlines()] == [1]
    assert len(fingerprinted) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_each_cache_their_share_of_the_same_cache(toy, tmp_path):
    """`accelerate launch` (two gloo processes on the CPU): process r writes shards r, r + 2, ...; the cache equals
    the one a single process builds."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "ddp.yaml")]
    launch += ["--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "vlsi"]
    two = subprocess.run(
        [*launch, *_cache_command(toy, tmp_path / "two")[3:]],
        env={**ENV, "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    with one_thread():  # as torchrun gives each process
        assert cli.main(_cache_command(toy, tmp_path / "one")[3:]) == 0
    one, two = TeacherCache(tmp_path / "one"), TeacherCache(tmp_path / "two")
    assert one.index["rows"] == two.index["rows"] and len(two.index["shards"]) == 8
    for entry in one.index["shards"]:
        a, b = load_file(tmp_path / "one" / entry["file"]), load_file(tmp_path / "two" / entry["file"])
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


@pytest.fixture(scope="module")
def whole_cache(toy, tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    cfg = _cfg(toy, folder, "cache.top_k=0")
    return _build(cfg, folder, toy[0] / "verbalizers" / "teacher")


@pytest.mark.parametrize(
    "intermediate, last, kind",
    [
        ("kld", "kld", "forward"),
        ("kld", "kld", "reverse"),
        ("kld", "kld", "jsd"),
        ("l2", "kld", "forward"),
        ("none", "kld", "forward"),  # final-layer KD, the ablation baseline
        ("ce", "kld", "forward"),
        ("kld", "none", "forward"),
    ],
)
def test_cached_step_equals_the_live_step_for_every_loss(toy, whole_cache, tmp_path, intermediate, last, kind):
    cfg = _cfg(
        toy,
        tmp_path,
        "cache.top_k=0",
        f"interact.intermediate_loss={intermediate}",
        f"interact.last_loss={last}",
        f"interact.divergence={kind}",
    )
    results = []
    for teacher_cache in ("", str(whole_cache)):  # the live teacher, then its cache: set up as `vlsi train` does
        run = interact_module.setup(dataclasses.replace(cfg, teacher_cache=teacher_cache), toy[0])
        loss, logs = run.step(next(iter(run.loader)))
        loss.backward()
        results.append((loss, logs, [p.grad for p in run.step.verbalizers.parameters() if p.grad is not None]))
    (live_loss, live_logs, live_grads), (cached_loss, cached_logs, cached_grads) = results
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-5, atol=1e-6)
    assert cached_logs.keys() == live_logs.keys() and cached_logs.get("match") == live_logs.get("match")
    for a, b in zip(live_grads, cached_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_sample_that_cannot_be_loaded_is_left_out_and_named_when_asked_for(toy, tmp_path):
    cfg = _cfg(toy, tmp_path / "c", "cache.top_k=3")
    samples = list(read_dataset(cfg.data.path)[0])
    broken = tmp_path / "broken.png"
    broken.write_bytes(samples[1].images[0].read_bytes()[:50])  # a cut PNG: the record is valid, the image is not
    samples[1] = dataclasses.replace(samples[1], images=[broken])
    build_cache(cfg, tmp_path / "c", toy[0] / "verbalizers" / "teacher", samples)
    cache = TeacherCache(tmp_path / "c")
    assert samples[0].id in cache.where and samples[1].id not in cache.where and len(cache.where) == 7
    with pytest.raises(ConfigError, match=f"sample {samples[1].id} is not in the teacher cache"):
        cache.rows(samples[1].id)
