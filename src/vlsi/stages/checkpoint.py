"""Mid-stage checkpoints: trainable weights, optimizer, schedule, RNG states and data position.

Written as safetensors (tensors) + JSON (everything else), never pickle. A checkpoint is written into
`step-NNNNNNNN.tmp/` and renamed to `step-NNNNNNNN/` only when complete; older checkpoints are deleted after that,
so a kill at any moment leaves the previous complete one usable.
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

PREFIX = "step-"


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into flat tensors (`state.<param>.<key>`) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
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
) -> Path:
    """Write checkpoint `step` (every process writes its own RNG file; the main one writes the rest)."""
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
    if is_main:
        weights = {k: v.detach().cpu().contiguous() for k, v in _trainable(module).items()}
        save_file(weights, tmp / "trainable.safetensors")
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        meta = {"step": step, "progress": progress, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
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
) -> dict:
    """Restore a checkpoint written by `save`; returns its `progress` dict (step, epoch, batches)."""
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(path / "trainable.safetensors")
    params = _trainable(module)
    if set(weights) != set(params):
        raise ValueError(
            f"{path}: the checkpoint's trainable parameters do not match this run's (was the configuration changed?); "
            "delete the folder to start the stage over"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    optimizer.load_state_dict(_optimizer_state(load_file(path / "optimizer.safetensors"), meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    rng = path / f"rng-{process_index}.safetensors"
    if rng.is_file():  # a run resumed on fewer or more processes keeps its fresh RNG state
        set_rng_state(load_file(rng), json.loads((path / f"rng-{process_index}.json").read_text()), generators)
    return meta["progress"]
