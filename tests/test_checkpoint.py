"""Checkpoints restore the exact training state, and an interrupted save never hides the previous one."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from vlsi.config import StageConfig
from vlsi.runfolder import FolderError
from vlsi.stages import checkpoint
from vlsi.stages.loop import cosine_schedule


def _setup(seed=0):
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    module[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    scheduler = cosine_schedule(optimizer, StageConfig(max_steps=10, lr=1e-2, min_lr=1e-3))
    return module, optimizer, scheduler


def _step(module, optimizer, scheduler, generator):
    x = torch.randn(3, 4, generator=generator)
    module(x).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def test_resume_is_exact(tmp_path):
    module, optimizer, scheduler = _setup()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        _step(module, optimizer, scheduler, g)
    state = checkpoint.TrainingState(module, optimizer, scheduler, {"g": g})
    path = checkpoint.save(tmp_path, 3, state, {"epoch": 1, "batches": 2})
    random_before, numpy_before, torch_before = random.random(), np.random.rand(), torch.rand(1)
    for _ in range(2):
        _step(module, optimizer, scheduler, g)
    expected = [p.detach().clone() for p in module.parameters()]

    module2, optimizer2, scheduler2 = _setup(seed=7)  # different init: everything trainable must come back
    module2[0].weight.data.copy_(module[0].weight)  # frozen weights come from the model files, not the checkpoint
    g2 = torch.Generator().manual_seed(99)
    resumed = checkpoint.TrainingState(module2, optimizer2, scheduler2, {"g": g2})
    progress = checkpoint.load(checkpoint.latest(tmp_path), resumed)
    assert progress == {"epoch": 1, "batches": 2} and path.name == "step-00000003"
    assert (random.random(), np.random.rand(), torch.rand(1)) == (random_before, numpy_before, torch_before)
    for _ in range(2):
        _step(module2, optimizer2, scheduler2, g2)
    for a, b in zip(expected, module2.parameters()):
        assert torch.equal(a, b)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_unfinished_save_leaves_the_previous_checkpoint(tmp_path):
    module, optimizer, scheduler = _setup()
    checkpoint.save(tmp_path, 2, checkpoint.TrainingState(module, optimizer, scheduler, {}), {})
    partial = tmp_path / "step-00000004.tmp"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half a file")
    assert checkpoint.latest(tmp_path).name == "step-00000002"
    checkpoint.save(tmp_path, 4, checkpoint.TrainingState(module, optimizer, scheduler, {}), {})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004"], "older and unfinished ones are cleaned up"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "rng-0.safetensors").unlink(), "rng-0.safetensors: missing"),
        (lambda p: _flip_last_byte(p / "trainable.safetensors"), "trainable.safetensors: damaged"),
        (lambda p: (p / "state.json").write_text((p / "state.json").read_text()[:20]), "state.json: damaged"),
        (lambda p: (p / "checksums-0.json").unlink(), "has no checksums.json"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, message):
    """A deleted RNG file, a flipped weight, a truncated state.json, lost checksums: never resumed from."""
    module, optimizer, scheduler = _setup()
    path = checkpoint.save(tmp_path, 1, checkpoint.TrainingState(module, optimizer, scheduler, {}), {})
    damage(path)
    with pytest.raises(FolderError, match=f"{message}.*; delete {tmp_path} to start the stage over") as refused:
        checkpoint.load(path, checkpoint.TrainingState(*_setup(seed=3)))
    assert "\n" not in str(refused.value)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a weight's last byte: same size, the header intact
    path.write_bytes(bytes(data))


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    module, optimizer, scheduler = _setup()
    checkpoint.save(tmp_path, 1, checkpoint.TrainingState(module, optimizer, scheduler, {}), {})
    other = nn.Linear(4, 2)
    opt = torch.optim.AdamW(other.parameters())
    try:
        state = checkpoint.TrainingState(other, opt, cosine_schedule(opt, StageConfig()))
        checkpoint.load(checkpoint.latest(tmp_path), state)
    except ValueError as e:
        assert "do not match" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_fsdp2_sharded_checkpoint_resumes_exactly(tmp_path):
    """Two gloo processes, FSDP2 on the CPU: each saves and loads only its own shards, and resuming continues the
    training exactly (tests/fsdp2_checkpoint_worker.py)."""
    worker = Path(__file__).parent / "fsdp2_checkpoint_worker.py"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    result = subprocess.run(
        [*command, str(worker), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / f"result-rank{rank}.json").read_text())
        assert found["layout"] == {"weights": True, "optimizer": True} and found["progress"] == {"step": 3}
        assert found["max_difference"] == 0.0
        assert found["files"] == [
            "checksums-0.json",  # each process's files' sha256, checked on resume
            "checksums-1.json",
            "optimizer-rank0.safetensors",
            "optimizer-rank1.safetensors",
            "rng-0.json",
            "rng-0.safetensors",
            "rng-1.json",
            "rng-1.safetensors",
            "state.json",
            "trainable-rank0.safetensors",
            "trainable-rank1.safetensors",
        ]
        assert (
            "weights and optimizer partitioned over 2 processes, this run has weights and optimizer partitioned over 3"
            in (found["wrong_world"])
        )
