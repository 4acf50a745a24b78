"""Mid-stage checkpoints: trainable weights, optimizer, schedule, RNG states and data position.

Written as safetensors (tensors) + JSON (everything else), never pickle. A checkpoint is written into
`step-NNNNNNNN.tmp/` and renamed to `step-NNNNNNNN/` only when complete; older checkpoints are deleted after that,
so a kill at any moment leaves the previous complete one usable.

Partitioned training state is written by the process that holds it, and resumes on the same number of processes
with the same partitioning: FSDP2's weight and optimizer shards (DTensors) and DeepSpeed ZeRO's optimizer
partitions (with ZeRO's fp32 master weights) go to `trainable-rank{r}.safetensors` / `optimizer-rank{r}.safetensors`.
The main process writes the rest whole (`trainable.safetensors`, `optimizer.safetensors`), ZeRO-3's trained weights
included (gathered one weight at a time, as the end of a stage gathers them anyway); a checkpoint with nothing
partitioned resumes on any number of processes.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from ..distributed import gathered_weight, state_file, zero_optimizer
from ..runfolder import RERUN, read_json, sha256_file, storage, verify_checksums, write_json

PREFIX = "step-"


@dataclass
class TrainingState:
    """What a checkpoint saves and restores of a stage: the trained module, its optimizer (the torch optimizer or
    accelerate's wrapper of it: under DeepSpeed the wrapper is required, it leads to ZeRO's master partitions), the
    schedule and the named generators (e.g. the matching sampler's)."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    generators: dict[str, torch.Generator] = field(default_factory=dict)


@dataclass(frozen=True)
class Processes:
    """The launch as a checkpoint sees it: this process's index, how many there are, whether this is the main one,
    and a barrier every process reaches. The default: one process."""

    index: int = 0
    count: int = 1
    is_main: bool = True
    barrier: Callable[[], None] = lambda: None

    @classmethod
    def of(cls, accelerator) -> Processes:
        return cls(
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.is_main_process,
            accelerator.wait_for_everyone,
        )


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (its shard of a DTensor), on the CPU, ready for safetensors."""
    t = t.detach()
    return (t.to_local() if isinstance(t, DTensor) else t).cpu().contiguous()


def layout(module: nn.Module, optimizer) -> dict[str, bool]:
    """Which parts of the training state are partitioned across processes (each process saves and loads its own)."""
    weights = any(isinstance(p, DTensor) for p in _trainable(module).values())  # ZeRO-3's are saved whole
    return {"weights": weights, "optimizer": weights or zero_optimizer(optimizer) is not None}


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into flat tensors (`state.<index>.<key>`, local shards of DTensors; under ZeRO also
    the masters, `master.<index>`) and a JSON-able rest."""
    zero = zero_optimizer(optimizer)
    if zero is None:
        state = optimizer.state_dict()
        entries, meta, tensors = state["state"], {"param_groups": state["param_groups"]}, {}
    else:  # ZeRO-3 empties the torch optimizer's groups between steps: its states are read by master instead
        base, masters = zero
        groups = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
        entries, meta = {i: base.state.get(m, {}) for i, m in enumerate(masters)}, {"param_groups": groups}
        tensors = {f"master.{i}": _local(m) for i, m in enumerate(masters)}
    meta["scalars"] = {}
    for index, values in entries.items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = _local(value)
            else:
                meta["scalars"][f"{index}.{key}"] = value
    return tensors, meta


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The inverse of `_optimizer_tensors`."""
    zero = zero_optimizer(optimizer)
    if zero is None:
        optimizer.load_state_dict(_optimizer_state(tensors, meta, optimizer))
        return
    base, masters = zero
    for group, saved in zip(base.param_groups, meta["param_groups"]):
        group.update(saved)  # the learning rate the schedule had set, among others
    for i, master in enumerate(masters):
        with torch.no_grad():
            master.copy_(tensors[f"master.{i}"])
        state = {k.split(".", 2)[2]: v.to(master.device) for k, v in tensors.items() if k.startswith(f"state.{i}.")}
        state.update({k.split(".", 1)[1]: v for k, v in meta["scalars"].items() if k.startswith(f"{i}.")})
        base.state[master] = state  # the torch optimizer creates states lazily: a fresh one has none yet


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A torch optimizer state dict from saved tensors; saved shards of a DTensor parameter's states become
    DTensors again, laid out like the parameter."""
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


def _describe(parts: dict[str, bool], processes: int) -> str:
    held = [name for name, partitioned in parts.items() if partitioned]
    return f"{' and '.join(held)} partitioned over {processes} processes" if held else "nothing partitioned"


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


def save(directory: Path, step: int, state: TrainingState, progress: dict, processes: Processes = Processes()) -> Path:
    """Write checkpoint `step` of `state`, with `progress` (the data position): every process writes its own RNG
    states and its partitions of whatever training partitions; the main process writes the rest."""
    module, optimizer, scheduler, generators = state.module, state.optimizer, state.scheduler, state.generators
    process_index, num_processes = processes.index, processes.count
    is_main, barrier = processes.is_main, processes.barrier
    final = directory / f"{PREFIX}{step:08d}"
    tmp = directory / f"{final.name}.tmp"
    if is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_meta = rng_state(generators)
    written = [f"rng-{process_index}.safetensors", f"rng-{process_index}.json"]  # this process's files
    _write(tmp / written[0], rng_tensors)
    _write(tmp / written[1], json.dumps(rng_meta))
    parts = layout(module, optimizer)
    writes = parts["weights"] or is_main
    weights = {}
    for name, p in _trainable(module).items():
        with gathered_weight(p):
            if writes:
                weights[name] = _local(p)
    if writes:
        written.append(state_file("trainable", parts["weights"], process_index))
        _write(tmp / written[-1], weights)
    if parts["optimizer"] or is_main:
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        written.append(state_file("optimizer", parts["optimizer"], process_index))
        _write(tmp / written[-1], opt_tensors)
    if is_main:
        meta = {"step": step, "progress": progress, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
        meta.update(layout=parts, processes=num_processes)
        _write(tmp / "state.json", json.dumps(meta))
        written.append("state.json")
    # each process hashes what it wrote (in parallel); `load` checks every file it reads against these
    write_json(tmp / f"checksums-{process_index}.json", {name: sha256_file(tmp / name) for name in written})
    barrier()
    if is_main:
        tmp.rename(final)
        for old in directory.glob(f"{PREFIX}*"):
            if old != final and not old.name.endswith(".tmp"):
                shutil.rmtree(old)
    barrier()
    return final


def _write(path: Path, data: dict[str, torch.Tensor] | str) -> None:
    """One file of a checkpoint (tensors as safetensors, or JSON text); a full disk is one line naming it, and the
    `.tmp` folder it was written into is never taken for a finished checkpoint."""
    with storage(path, RERUN):
        if isinstance(data, str):
            path.write_text(data)
        else:
            save_file(data, path)


def load(path: Path, state: TrainingState, processes: Processes = Processes()) -> dict:
    """Restore `state` from a checkpoint written by `save`, every file it reads checked against the checksums recorded
    when it was written; returns its `progress` dict (step, epoch, batches)."""
    module, optimizer, scheduler, generators = state.module, state.optimizer, state.scheduler, state.generators
    process_index, num_processes = processes.index, processes.count
    fix = f"delete {path.parent} to start the stage over"
    verify_checksums(path, fix, ["state.json"])
    meta = read_json(path / "state.json", fix)
    parts, was = layout(module, optimizer), meta["layout"]
    if was != parts or (any(parts.values()) and meta["processes"] != num_processes):
        raise ValueError(
            f"{path}: the checkpoint was written by a run with {_describe(was, meta['processes'])}, this run has "
            f"{_describe(parts, num_processes)}; resume with the same launch configuration (number of processes, "
            "FSDP2 or ZeRO stage), or delete the folder to start the stage over"
        )
    rng = [f"rng-{process_index}.safetensors", f"rng-{process_index}.json"]
    if (path / f"checksums-{process_index}.json").is_file():  # else a run resumed on more processes than wrote it
        verify_checksums(path, fix, rng)
    files = [
        state_file(kind, parts[key], process_index)
        for kind, key in (("trainable", "weights"), ("optimizer", "optimizer"))
    ]
    verify_checksums(path, fix, files)
    weights = load_file(path / files[0])
    params = _trainable(module)
    if set(weights) != set(params):
        raise ValueError(
            f"{path}: the checkpoint's trainable parameters do not match this run's (was the configuration changed?); "
            "delete the folder to start the stage over"
        )
    tensors = load_file(path / files[1])
    with torch.no_grad():
        for name, p in params.items():
            with gathered_weight(p, modify=True):
                (p.to_local() if isinstance(p, DTensor) else p).copy_(weights[name])
    _load_optimizer(optimizer, tensors, meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    if (path / rng[0]).is_file():  # a run resumed on more processes than wrote it keeps its fresh RNG state
        set_rng_state(load_file(path / rng[0]), read_json(path / rng[1], fix), generators)
    return meta["progress"]
