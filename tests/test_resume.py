"""Faults injected for real: SIGKILL mid-stage and mid-save, then the same command resumes to the same student;
a NaN loss is skipped and logged, and too many in a row stop the run with a clear message."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from commands import train_argv
from safetensors.torch import load_file

from vlsi.config import StageConfig
from vlsi.stages.loop import MetricsLog, NonFiniteLoss, make_accelerator, train
from vlsi.toy import write_toy

STEPS = [
    "verbalize.max_steps=4",
    "interact.max_steps=4",
    "sft.max_steps=4",
    "checkpoint.every=1",
    "verbalize.batch_size=2",
    "interact.batch_size=2",
    "sft.batch_size=2",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    teacher, student, data = write_toy(tmp_path_factory.mktemp("toy"), n=10)
    return str(teacher), str(student), str(data)


def _command(toy, out):
    return [sys.executable, "-m", "vlsi", *train_argv(*toy, out, *STEPS)]


def _run(toy, out):
    result = subprocess.run(_command(toy, out), env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def _kill_when(toy, out, ready) -> bool:
    """Start `vlsi train`, SIGKILL it as soon as `ready(out)` holds; False if it finished first."""
    process = subprocess.Popen(_command(toy, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while process.poll() is None and time.monotonic() < deadline:
        if ready(out):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.wait()
    return False


def _student(out):
    return load_file(out / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(toy, out)
    return out


def _same_student(out, reference):
    a, b = _student(out), _student(reference)
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= 1e-6, f"resumed student differs from the uninterrupted one by {worst}"


def test_kill_mid_stage_then_resume(toy, reference, tmp_path):
    out = tmp_path / "run"
    killed = _kill_when(toy, out, lambda o: (o / "checkpoints" / "interact" / "step-00000002").is_dir())
    assert killed, "the run finished before it could be killed"
    assert not (out / "student").exists()
    _run(toy, out)
    _same_student(out, reference)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["stage"] == "interact"] == [1, 2, 3, 4], "no step logged twice"
    matches = [json.loads(line)["step"] for line in (out / "layer_match.jsonl").read_text().splitlines()]
    assert matches == sorted(matches) and matches[-1] == 4
    assert not (out / "checkpoints" / "interact").exists(), "a finished stage's checkpoints are removed"


def test_kill_mid_save_then_resume(toy, reference, tmp_path):
    out = tmp_path / "run"
    saving = lambda o: any(p.name.endswith(".tmp") for p in (o / "checkpoints").glob("*/step-*"))  # noqa: E731
    killed = _kill_when(toy, out, saving)
    assert killed, "the run finished before it could be killed"
    _run(toy, out)
    _same_student(out, reference)


class _NaNAt(torch.nn.Module):
    """A step module whose loss is NaN at the chosen micro-steps."""

    def __init__(self, bad):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))
        self.bad, self.calls = set(bad), 0

    def forward(self, batch):
        self.calls += 1
        loss = (self.weight * batch).sum() ** 2
        return (loss * float("nan") if self.calls in self.bad else loss), {}


def _loader():
    return torch.utils.data.DataLoader(torch.randn(8, 3), batch_size=2)


def test_nan_step_is_skipped_and_logged(tmp_path):
    stage = StageConfig(max_steps=3, grad_accum=1, lr=0.1)
    module = _NaNAt(bad={2})
    state = train(
        make_accelerator(stage, torch.float32), module, _loader(), stage, "sft", MetricsLog(tmp_path / "m.jsonl")
    )
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows] == [None, "non-finite loss", None]
    assert torch.isfinite(state["weight"]).all()


def test_each_step_logs_its_gradient_norm_before_clipping_and_whether_it_was_clipped(tmp_path):
    """`grad_norm` is the global norm of the step's gradients before clipping, `clipped` 1 when it exceeded
    max_grad_norm: against the gradient of (w . x)^2 summed over the batch written out, 2 (w . x) x (lr 1e-12 keeps
    w at 1)."""
    data = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    norms = [(2 * batch.sum() * batch.sum(0)).norm().item() for batch in data.split(2)]  # w = 1
    limit = sorted(norms)[1] + 1e-3  # two steps under it, two over
    stage = StageConfig(max_steps=4, grad_accum=1, lr=1e-12, min_lr=1e-12, weight_decay=0.0, max_grad_norm=limit)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    train(make_accelerator(stage, torch.float32), _NaNAt(bad=()), loader, stage, "sft", MetricsLog(tmp_path / "m"))
    rows = [json.loads(line) for line in (tmp_path / "m").read_text().splitlines()]
    assert [r["grad_norm"] for r in rows] == pytest.approx(norms, rel=1e-5)
    assert [r["clipped"] for r in rows] == [float(n > limit) for n in norms] and sum(r["clipped"] for r in rows) == 2

    stage.max_grad_norm = 0.0  # no clipping: nothing measured either
    train(make_accelerator(stage, torch.float32), _NaNAt(bad=()), loader, stage, "sft", MetricsLog(tmp_path / "n"))
    assert not any("grad_norm" in line for line in (tmp_path / "n").read_text().splitlines())


def test_a_step_non_finite_on_one_process_is_skipped_on_all(tmp_path):
    """Two DDP processes (gloo), the loss NaN on one of them: both skip the step, so the weights stay finite and equal
    (tests/nonfinite_worker.py)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    worker = Path(__file__).parent / "nonfinite_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(
        [*command, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows] == [None, "non-finite loss", None]
    weights = [json.loads((tmp_path / f"weight-rank{r}.json").read_text()) for r in (0, 1)]
    assert weights[0] == weights[1] and all(math.isfinite(w) for w in weights[0])


def test_nan_steps_in_a_row_stop_the_run(tmp_path):
    stage = StageConfig(max_steps=10, grad_accum=1, lr=0.1)
    with pytest.raises(NonFiniteLoss, match="NaN or infinite in 3 optimizer steps in a row"):
        train(
            make_accelerator(stage, torch.float32),
            _NaNAt(bad={2, 3, 4}),
            _loader(),
            stage,
            "sft",
            MetricsLog(tmp_path / "m.jsonl"),
            max_nonfinite=3,
        )
