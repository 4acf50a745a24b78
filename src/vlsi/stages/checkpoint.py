"""Mid-stage checkpoints: trainable weights, optimizer, schedule, RNG states and data position.

Written as safetensors (tensors) + JSON (everything else), never pickle. A checkpoint is written into
`step-NNNNNNNN.tmp/` and renamed to `step-NNNNNNNN/` only when complete; older checkpoints are deleted after that,
so a kill at any moment leaves the previous complete one usable.

Sharded training (FSDP2: parameters and optimizer states are DTensors) writes a sharded checkpoint: every process
saves its own shards, `trainable-rank{r}.safetensors` and `optimizer-rank{r}.safetensors`, nothing is gathered,
and it resumes on the same number of processes. Otherwise the main process writes whole tensors, and any number of
processes can resume from them.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

PREFIX = "step-"


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (its shard of a DTensor), on the CPU, ready for safetensors."""
    t = t.detach()
    return (t.to_local() if isinstance(t, DTensor) else t).cpu().contiguous()


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in _trainable(module).values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (`state.<param>.<key>`, local shards of DTensors) and
    JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = _local(value)
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of `_optimizer_tensors`; saved shards of a DTensor parameter's states become DTensors again,
    laid out like the parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        param = params[int(index)]
        if isinstance(param, DTensor) and value.shape == param.to_local().shape and value.dim() > 0:
            value = DTensor.from_local(
                value.to(param.device), param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
            )
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    tensors.update({f"generator.{k}": g.get_state() for k, g in generators.items()})
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    for name, generator in generators.items():
        generator.set_state(tensors[f"generator.{name}"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint in `directory` (unfinished `.tmp` folders are ignored)."""
    done = sorted(p for p in directory.glob(f"{PREFIX}*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def saved_step(directory: Path) -> int:
    """The optimizer step the newest complete checkpoint in `directory` was taken at; 0 without one."""
    path = latest(directory) if directory.is_dir() else None
    return int(path.name.removeprefix(PREFIX)) if path is not None else 0


def save(
    directory: Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    progress: dict,
    generators: dict[str, torch.Generator],
    process_index: int = 0,
    is_main: bool = True,
    barrier=lambda: None,
    num_processes: int = 1,
) -> Path:
    """Write checkpoint `step`: every process writes its own RNG file and, when training is sharded, its shards of
    the weights and optimizer; the main process writes the rest (and the whole weights when nothing is sharded)."""
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f"{final.name}.tmp"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = rng_state(generators)
    save_file(rng_tensors, tmp / f"rng-{process_index}.safetensors")
    (tmp / f"rng-{process_index}.json").write_text(json.dumps(rng_meta))
    sharded = is_sharded(module)
    if sharded or is_main:
        suffix = f"-rank{process_index}" if sharded else ""
        save_file({k: _local(v) for k, v in _trainable(module).items()}, tmp / f"trainable{suffix}.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / f"optimizer{suffix}.safetensors")
    if is_main:
        meta = {"step": step, "progress": progress, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
        meta["sharded_over"] = num_processes if sharded else None
        (tmp / "state.json").write_text(json.dumps(meta))
    barrier()
    if is_main:
        tmp.rename(final)
        for old in directory.glob(f"{PREFIX}*"):
            if old != final and not old.name.endswith(".tmp"):
                shutil.rmtree(old)
    barrier()
    return final


def load(
    path: Path,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    generators: dict[str, torch.Generator],
    process_index: int = 0,
    num_processes: int = 1,
) -> dict:
    """Restore a checkpoint written by `save`; returns its `progress` dict (step, epoch, batches)."""
    meta = json.loads((path / "state.json").read_text())
    shards, sharded = meta.get("sharded_over"), is_sharded(module)
    if bool(shards) != sharded or (shards and shards != num_processes):
        was = f"sharded over {shards} processes" if shards else "not sharded"
        now = f"sharded over {num_processes} processes" if sharded else "not sharded"
        raise ValueError(
            f"{path}: the checkpoint was written {was}, this run is {now}; resume with the same launch "
            "configuration, or delete the folder to start the stage over"
        )
    suffix = f"-rank{process_index}" if shards else ""
    weights = load_file(path / f"trainable{suffix}.safetensors")
    params = _trainable(module)
    if set(weights) != set(params):
        raise ValueError(
            f"{path}: the checkpoint's trainable parameters do not match this run's (was the configuration changed?); "
            "delete the folder to start the stage over"
        )
    with torch.no_grad():
        for name, p in params.items():
            (p.to_local() if isinstance(p, DTensor) else p).copy_(weights[name])
    tensors = load_file(path / f"optimizer{suffix}.safetensors")
    optimizer.load_state_dict(_optimizer_state(tensors, meta["optimizer"], optimizer))
    scheduler.load_state_dict(meta["scheduler"])
    rng = path / f"rng-{process_index}.safetensors"
    if rng.is_file():  # a run resumed on fewer or more processes keeps its fresh RNG state
        set_rng_state(load_file(rng), json.loads((path / f"rng-{process_index}.json").read_text()), generators)
    return meta["progress"]
