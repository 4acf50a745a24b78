"""Distributed training is configuration: the shipped accelerate configs load, and two processes (torch.distributed over
gloo on the CPU, launched with the shipped DDP config) train exactly what one process trains on the same global batch.

`accelerate launch --cpu --num_processes 2` starts a single process in accelerate 1.x (several CPU processes need an
MPI launcher); `ACCELERATE_USE_CPU=true` with a multi-process config starts two torchrun processes on gloo instead.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from commands import one_thread, onevision_dataset
from safetensors.torch import load_file, save_file

from vlsi.cli import main
from vlsi.toy import write_digits_dataset, write_tiny_pair

ROOT = Path(__file__).parent.parent
ACCELERATE = ROOT / "configs" / "accelerate"
# 3 optimizer steps per stage cross an epoch of 8 samples (2 steps of 4): the reshuffle is shared too. bottom_k with
# k=1 makes the layer choice a function of the data, so both runs pick the same layers (adaptive matching samples
# from a generator seeded per process: statistically, not bitwise, the same).
SETTINGS = [
    "verbalize.max_steps=3",
    "interact.max_steps=3",
    "sft.max_steps=3",
    "verbalize.batch_size=2",
    "interact.batch_size=2",
    "sft.batch_size=2",
    "interact.match.strategy=bottom_k",
    "interact.match.bottom_k=1",
]
# Every weight file a run writes, from the first stage to the exported student.
WEIGHTS = [
    "verbalizers/teacher/verbalizers.safetensors",
    "verbalizers/student/verbalizers.safetensors",
    "stages/interact/verbalizers/verbalizers.safetensors",
    "stages/interact/student/model.safetensors",
    "student/model.safetensors",
]
# Measured on the 2-core CPU: 0.0 (bit-identical weights and metrics) with one thread per process; up to 5e-7 in
# weights and metrics when the single process runs two threads; sharded launches up to 1.1e-6 on another machine of
# the same kind, whose kernels round the float32 sums differently (docs/DISTRIBUTED.md). A real error (a gradient
# averaged wrongly, a step lost) moves weights by lr x gradient, about 1e-3 here: 1e-5 leaves rounding room only.
WEIGHT_ATOL = 1e-5
METRIC_RTOL, METRIC_ATOL = 1e-5, 1e-6


def test_ddp_config_loads():
    config = load_config_from_file(str(ACCELERATE / "ddp.yaml"))
    assert config.distributed_type == DistributedType.MULTI_GPU and config.num_processes == 8


def test_fsdp2_config_builds_its_plugin():
    config = load_config_from_file(str(ACCELERATE / "fsdp2.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    options = {k if k == "fsdp_version" else k.removeprefix("fsdp_"): v for k, v in config.fsdp_config.items()}
    options["cpu_offload"] = options.pop("offload_params")
    plugin = FullyShardedDataParallelPlugin(**options)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap is None, "vlsi wraps each model's own _no_split_modules"
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


def test_zero3_config_builds_its_plugin():
    config = load_config_from_file(str(ACCELERATE / "zero3.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED
    plugin = DeepSpeedPlugin(**config.deepspeed_config)
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True, "the export needs it"
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto", "filled from the stage settings"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_vlsi() -> list[str]:
    """`accelerate launch` of `python -m vlsi` on two CPU processes (configs/accelerate/ddp.yaml)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "ddp.yaml")]
    return [*launch, "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "vlsi"]


def _questions(tmp_path: Path, n: int) -> tuple[Path, list[dict]]:
    """tmp_path/questions.jsonl: `n` digit records cut to their question, every one a prompt for the teacher; and
    the records."""
    records = json.loads(write_digits_dataset(tmp_path, n=n).read_text())
    for record in records:
        record["conversations"] = record["conversations"][:1]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data, records


def _read(out: Path):
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    matches = (out / "layer_match.jsonl").read_text().splitlines()
    return metrics, matches


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_two_processes_match_one_process(tmp_path):
    teacher, student = write_tiny_pair(tmp_path)
    data = write_digits_dataset(tmp_path, n=8)
    common = ["train", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "--config"]
    common += [str(ROOT / "configs" / "tiny-cpu.yaml")]

    # 2 processes x batch 2 x 1 accumulation step ...
    launch = _ddp_vlsi()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(
        [*launch, *common, "--output", str(tmp_path / "two"), *SETTINGS],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # ... against 1 process x batch 2 x 2 accumulation steps: the same micro-batches, the same global batches. One
    # thread, as torchrun gives each process: CPU kernels sum in another order with more threads.
    accumulate = [f"{stage}.grad_accum=2" for stage in ("verbalize", "interact", "sft")]
    with one_thread():
        assert main([*common, "--output", str(tmp_path / "one"), *SETTINGS, *accumulate]) == 0

    two_metrics, two_matches = _read(tmp_path / "two")
    one_metrics, one_matches = _read(tmp_path / "one")
    assert len(two_metrics) == len(one_metrics) == 12, "metrics written once, by the main process"
    for a, b in zip(two_metrics, one_metrics):
        assert a.keys() == b.keys() and (a["stage"], a["step"]) == (b["stage"], b["step"])
        for key in a.keys() - {"stage", "step"}:
            assert a[key] == pytest.approx(b[key], rel=METRIC_RTOL, abs=METRIC_ATOL), (a["stage"], a["step"], key)
    assert len(two_matches) == 3 * 2, "one line per micro-step and process"
    assert two_matches == one_matches, "process k's micro-batch is the single process's k-th micro-batch"

    for name in WEIGHTS:
        diff = _max_difference(tmp_path / "two" / name, tmp_path / "one" / name)
        assert diff <= WEIGHT_ATOL, f"{name}: max |difference| {diff:.3g}"
    before = load_file(student / "model.safetensors")
    after = load_file(tmp_path / "two" / "student" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student trained"


# A sharded `vlsi train` per case: accelerate config, extra launch options, the stand-in for accelerate's GPU-only
# parts, extra settings, the files the interaction stage's step-2 checkpoint holds besides state and random states,
# and the DeepSpeed engines each process starts: frozen models (teacher, the backbone whose verbalizers train) loaded
# partitioned and run by a ZeRO-3 inference engine; the trained step modules at the launch's ZeRO stage (under ZeRO-3
# the student arrives partitioned too, as transformers loads it; the verbalizers arrive whole).
SHARDED = {
    "fsdp2": (
        "fsdp2.yaml",
        [],
        "fsdp2_on_cpu.py",
        [],
        ["optimizer-rank0", "optimizer-rank1", "trainable-rank0", "trainable-rank1"],
        {},
    ),
    "zero2": (  # the trained model ZeRO-2 (optimizer states partitioned), the teacher ZeRO-3 and offloaded
        "zero3.yaml",
        ["--zero_stage", "2", "--offload_param_device", "cpu"],
        "deepspeed_on_cpu.py",
        [],
        ["optimizer-rank0", "optimizer-rank1", "trainable"],
        {
            "ZeRO-3 engine, model arrived partitioned, parameters offloaded to cpu": 3,
            "ZeRO-2 engine, model arrived whole": 4,
        },
    ),
    "zero3": (  # everything partitioned; chunk_size 2 gives the processes different numbers of verbalizer calls
        "zero3.yaml",
        [],
        "deepspeed_on_cpu.py",
        ["chunk_size=2"],
        ["optimizer-rank0", "optimizer-rank1", "trainable"],
        {"ZeRO-3 engine, model arrived partitioned": 5, "ZeRO-3 engine, model arrived whole": 2},
    ),
}


def _max_difference(a_path: Path, b_path: Path) -> float:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys(), f"{a_path} and {b_path} hold different tensors"
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
@pytest.mark.parametrize("case", SHARDED)
def test_sharded_run_killed_midway_resumes_exactly(tmp_path, case):
    """`vlsi train` under FSDP2 or DeepSpeed on two CPU processes (tests/fsdp2_on_cpu.py and tests/deepspeed_on_cpu.py
    stand in for the GPU-only parts of accelerate) trains what one process trains, and, SIGKILLed after the
    interaction stage's step-2 checkpoint, resumes from what each process saved to the weights of an uninterrupted run.
    """
    if case.startswith("zero"):
        pytest.importorskip("deepspeed")
    config, options, shim, settings, held, engines = SHARDED[case]
    teacher, student = write_tiny_pair(tmp_path)
    data = write_digits_dataset(tmp_path, n=8)
    args = ["train", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "--config"]
    args += [str(ROOT / "configs" / "tiny-cpu.yaml"), *SETTINGS, "interact.max_steps=4", *settings]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config), *options]
    launch += ["--num_processes", "2", "--main_process_port", str(_free_port()), str(Path(__file__).parent / shim)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def command(out, every):
        return [*launch, *args, f"checkpoint.every={every}", "--output", str(out)]

    straight = subprocess.run(command(tmp_path / "straight", 0), env=env, capture_output=True, text=True, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    started = Counter(
        re.findall(
            r"deepspeed_on_cpu: (ZeRO-\d engine, model arrived \w+(?:, parameters offloaded to \w+)?)\n",
            straight.stderr,
        )
    )
    assert started == {engine: 2 * n for engine, n in engines.items()}, "per process"
    with one_thread():  # the same global batches: one process, 2 accumulation steps of the same micro-batches
        accumulate = [f"{stage}.grad_accum=2" for stage in ("verbalize", "interact", "sft")]
        assert main([*args, *accumulate, "--output", str(tmp_path / "one")]) == 0
    for name in WEIGHTS:
        diff = _max_difference(tmp_path / "straight" / name, tmp_path / "one" / name)
        assert diff <= WEIGHT_ATOL, f"{name}: two processes vs one, max |difference| {diff:.3g}"

    out = tmp_path / "resumed"
    saved = out / "checkpoints" / "interact" / "step-00000002"
    process = subprocess.Popen(command(out, 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while process.poll() is None and time.monotonic() < deadline and not saved.is_dir():
        time.sleep(0.05)
    assert saved.is_dir(), "the interaction stage wrote a checkpoint at step 2"
    for child in [*psutil.Process(process.pid).children(recursive=True), process]:  # torchrun's workers too
        child.kill()
    process.wait()
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=30)
    assert not (out / "stages" / "interact").exists(), "killed inside the interaction stage"
    found = {p.name.removesuffix(".safetensors") for p in saved.glob("*.safetensors") if not p.name.startswith("rng")}
    assert sorted(found) == held, "each process wrote what it holds; the main process what is replicated"

    resumed = subprocess.run(command(out, 2), env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    steps = [(m["stage"], m["step"]) for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps.count(("interact", 3)) == 1, "no step logged twice"
    for name in WEIGHTS:
        diff = _max_difference(tmp_path / "straight" / name, out / name)
        assert diff <= WEIGHT_ATOL, f"{name}: resumed vs uninterrupted, max |difference| {diff:.3g}"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_fsdp2_frozen_model_read_by_the_main_process_only_tied_head_included(tmp_path):
    """Under FSDP2 only the main process reads a frozen model's weights; the others build it on the meta device and
    receive their shards. Qwen2-VL-2B ties its LM head to its input embeddings: a tied backbone arrives tied
    everywhere, and training its verbalizers on two processes matches one process."""
    _, student = write_tiny_pair(tmp_path)
    config = json.loads((student / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (student / "config.json").write_text(json.dumps(config))
    weights = load_file(student / "model.safetensors")
    del weights["lm_head.weight"]  # a tied checkpoint stores the matrix once
    save_file(weights, student / "model.safetensors", metadata={"format": "pt"})
    data = write_digits_dataset(tmp_path, n=8)
    args = [
        "verbalize",
        "--model",
        str(student),
        "--data",
        str(data),
        "--config",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
    ]
    args += ["verbalize.max_steps=2", "verbalize.batch_size=2", "verbalize.models=[student]"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / "fsdp2.yaml")]
    launch += [
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(Path(__file__).parent / "fsdp2_on_cpu.py"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [*launch, *args, "--output", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=400
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert "disagree on tied weights" not in two.stderr
    with one_thread():
        assert main([*args, "verbalize.grad_accum=2", "--output", str(tmp_path / "one")]) == 0
    two_metrics, one_metrics = (
        [json.loads(x) for x in (tmp_path / o / "metrics.jsonl").open()] for o in ("two", "one")
    )
    assert [m["step"] for m in two_metrics] == [m["step"] for m in one_metrics] == [1, 2]
    for a, b in zip(two_metrics, one_metrics, strict=True):
        assert {k: v for k, v in a.items() if k != "stage"} == pytest.approx(
            {k: v for k, v in b.items() if k != "stage"}, rel=METRIC_RTOL, abs=METRIC_ATOL
        )
    name = "verbalizers/verbalizers.safetensors"
    diff = _max_difference(tmp_path / "two" / name, tmp_path / "one" / name)
    assert diff <= WEIGHT_ATOL, f"max |difference| {diff:.3g}"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_two_processes_answer_their_shares_and_one_process_reads_them(tmp_path):
    """`vlsi sft` with data.answers=teacher on two processes: each answers its share into its own file, and the
    merged answers are one process's answers, id for id; one process rerun on that folder reuses them all."""
    from vlsi.answers import read_answers
    from vlsi.config import load_config
    from vlsi.stages.samples import load_samples

    teacher, student = write_tiny_pair(tmp_path)
    data, records = _questions(tmp_path, 8)
    settings = ["data.answers=teacher", "data.answer_max_tokens=6", "data.answer_batch_size=2"]
    settings += ["data.keep_cut_answers=true"]  # the tiny teacher's answers run to the limit
    config = str(ROOT / "configs" / "tiny-cpu.yaml")
    args = ["sft", "--model", str(student), "--teacher", str(teacher), "--data", str(data), "--config", config]
    launch = _ddp_vlsi()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    start = time.perf_counter()
    two = subprocess.run(
        [*launch, *args, "--output", str(out), *settings, "sft.max_steps=1", "sft.batch_size=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    print(f"2-process vlsi sft with 8 teacher answers: {time.perf_counter() - start:.1f} s")
    folder = out / "answers"
    shares = [[json.loads(line)["id"] for line in (folder / name).read_text().splitlines()] for name in SHARES]
    assert all(shares) and sorted(shares[0] + shares[1]) == sorted(r["id"] for r in records), "each answered, once"
    wanted = {r["id"] for r in records}
    merged, _ = read_answers(folder, wanted)

    one = load_config(config, [f"data.path={data}", *settings], teacher=str(teacher), output=str(tmp_path / "one"))
    with one_thread():
        answered = load_samples(one)
    assert merged == read_answers(tmp_path / "one" / "answers", wanted)[0], "the same answers, id for id"
    assert [s.id for s in answered] == [r["id"] for r in records], "in record order"

    before = {name: (folder / name).read_text() for name in SHARES}
    one.output = str(out)
    assert [s.messages for s in load_samples(one)] == [s.messages for s in answered], "one process reuses them all"
    assert {name: (folder / name).read_text() for name in SHARES} == before, "nothing answered again"


SHARES = ["answers.jsonl", "answers-1.jsonl"]  # the main process's answers, process 1's


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_two_processes_train_on_a_parquet_dataset_as_one_process(tmp_path):
    """`vlsi sft` on a parquet (written with `datasets`, the images' bytes inside, LLaVA-OneVision's columns) under a
    2-process launch: the main process checks the rows and sends the others its index of them; the student equals
    one process's on the same global batches (3 steps cross the epoch's reshuffle)."""
    pytest.importorskip("datasets")
    _, student = write_tiny_pair(tmp_path)
    records = json.loads(write_digits_dataset(tmp_path, n=8).read_text())
    parquet = tmp_path / "digits.parquet"
    onevision_dataset(tmp_path, records).to_parquet(parquet)
    (tmp_path / "images").rename(tmp_path / "moved")  # nothing is read from image files
    args = ["sft", "--model", str(student), "--data", str(parquet), "--config", str(ROOT / "configs" / "tiny-cpu.yaml")]
    args += ["sft.max_steps=3", "sft.batch_size=2"]
    launch = _ddp_vlsi()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [*launch, *args, "--output", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=400
    )
    assert two.returncode == 0, two.stderr[-3000:]
    with one_thread():
        assert main([*args, "sft.grad_accum=2", "--output", str(tmp_path / "one")]) == 0
    name = "model/model.safetensors"
    diff = _max_difference(tmp_path / "two" / name, tmp_path / "one" / name)
    assert diff <= WEIGHT_ATOL, f"max |difference| {diff:.3g}"
    before, after = load_file(student / "model.safetensors"), load_file(tmp_path / "two" / name)
    assert any(not torch.equal(before[k], after[k]) for k in before), "the student trained"
    print(f"2 processes vs 1 on a parquet source: max |difference| {diff:.3g}")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_a_spread_teacher_answers_alone_under_a_launch(tmp_path):
    """`vlsi sft` with data.answers=teacher teacher_device_map=auto on two processes: the main process answers every
    prompt with the teacher spread over CPU memory and disk while the other waits; the answers are one process's with
    the whole teacher, id for id."""
    from vlsi.answers import read_answers
    from vlsi.config import load_config
    from vlsi.stages.samples import load_samples

    teacher, student = write_tiny_pair(tmp_path)
    data, records = _questions(tmp_path, 6)
    settings = ["data.answers=teacher", "data.answer_max_tokens=4", "data.keep_cut_answers=true"]
    spread = ["teacher_device_map=auto", "teacher_max_memory={cpu: 1MB, disk: 1GiB}"]
    config = str(ROOT / "configs" / "tiny-cpu.yaml")
    args = ["sft", "--model", str(student), "--teacher", str(teacher), "--data", str(data), "--config", config]
    launch = _ddp_vlsi()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    command = [*launch, *args, "--output", str(out), *settings, *spread, "sft.max_steps=1", "sft.batch_size=2"]
    two = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "the teacher answers spread over" in two.stderr and "'disk'" in two.stderr
    assert not (out / "answers" / "answers-1.jsonl").exists(), "process 1 answered nothing"
    assert not (out / ".cache" / "teacher-offload").exists()
    wanted = {r["id"] for r in records}
    one = load_config(config, [f"data.path={data}", *settings], teacher=str(teacher), output=str(tmp_path / "one"))
    load_samples(one)
    assert read_answers(out / "answers", wanted)[0] == read_answers(tmp_path / "one" / "answers", wanted)[0]
