"""Run by tests/test_checkpoint.py under `python -m torch.distributed.run --nproc_per_node 2` (gloo, CPU): a model
sharded with FSDP2 trains 3 steps, saves a sharded checkpoint, trains 2 more; a fresh sharded model loads the
checkpoint and trains the same 2 steps. Writes OUT/result-rank<r>.json with what it found."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from vlsi.config import StageConfig
from vlsi.stages import checkpoint
from vlsi.stages.loop import cosine_schedule


def build(world: int):
    torch.manual_seed(0)
    # 10 rows shard evenly over 2 processes, 3 rows do not (one shard of 2 rows, one of 1); the last bias is frozen
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.SiLU(), torch.nn.Linear(10, 3))
    model[2].bias.requires_grad_(False)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer, cosine_schedule(optimizer, StageConfig(max_steps=10, lr=1e-2, min_lr=1e-3))


def train(model, optimizer, scheduler, rank: int, steps: range) -> None:
    for k in steps:
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(100 * rank + k))
        model(x).square().mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer, scheduler = build(world)
    train(model, optimizer, scheduler, rank, range(3))
    launch = checkpoint.Processes(rank, world, rank == 0, dist.barrier)
    checkpoint.save(out, 3, checkpoint.TrainingState(model, optimizer, scheduler), {"step": 3}, launch)
    train(model, optimizer, scheduler, rank, range(3, 5))
    straight = {n: p.full_tensor() for n, p in model.named_parameters()}

    model, optimizer, scheduler = build(world)
    progress = checkpoint.load(checkpoint.latest(out), checkpoint.TrainingState(model, optimizer, scheduler), launch)
    train(model, optimizer, scheduler, rank, range(3, 5))
    resumed = {n: p.full_tensor() for n, p in model.named_parameters()}
    try:
        more = checkpoint.Processes(rank, world + 1, rank == 0, dist.barrier)
        checkpoint.load(checkpoint.latest(out), checkpoint.TrainingState(model, optimizer, scheduler), more)
        wrong_world = ""
    except ValueError as e:
        wrong_world = str(e)
    result = {
        "progress": progress,
        "max_difference": max((straight[n] - resumed[n]).abs().max().item() for n in straight),
        "layout": checkpoint.layout(model, optimizer),
        "files": sorted(p.name for p in checkpoint.latest(out).iterdir()),
        "wrong_world": wrong_world,
    }
    (out / f"result-rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
