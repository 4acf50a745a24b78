"""The optimisation loop every stage shares: AdamW, cosine schedule, gradient accumulation through accelerate.

A stage hands over a *step module*: an `nn.Module` whose registered parameters are exactly what trains and
whose `forward(batch)` returns `(loss, logs)`. Frozen models live outside its registered children, so
distributed wrappers (DDP, FSDP) and the optimizer see only the trainable part.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin
from torch import nn
from tqdm.auto import tqdm

from ..config import StageConfig


def make_accelerator(stage: StageConfig, dtype: torch.dtype) -> Accelerator:
    plugin = GradientAccumulationPlugin(num_steps=stage.grad_accum, sync_with_dataloader=False)
    return Accelerator(mixed_precision="bf16" if dtype == torch.bfloat16 else "no", gradient_accumulation_plugin=plugin)


def cosine_schedule(optimizer: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine from lr to min_lr over the remaining optimizer steps (DESIGN §8)."""
    floor = stage.min_lr / stage.lr
    decay = max(1, stage.max_steps - stage.warmup_steps)

    def factor(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        progress = min(1.0, (step - stage.warmup_steps) / decay)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class MetricsLog:
    """Appends one JSON line per optimizer step to OUT/metrics.jsonl (main process only)."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _epochs(loader):
    """Endless iteration: the loader's sampler reshuffles each pass (seeded, see make_loader)."""
    while True:
        yield from loader


def make_loader(dataset, batch_size: int, collate_fn, seed: int, num_workers: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        generator=generator,
        num_workers=num_workers,
        drop_last=len(dataset) >= batch_size,
    )


def train(
    accelerator: Accelerator,
    step_module: nn.Module,
    loader,
    stage: StageConfig,
    name: str,
    metrics: MetricsLog,
    on_micro_step=None,
) -> nn.Module:
    """Run `stage.max_steps` optimizer steps; returns the unwrapped step module."""
    params = [p for p in step_module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name}: nothing to train (every parameter is frozen)")
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = cosine_schedule(optimizer, stage)
    module, optimizer, loader = accelerator.prepare(step_module, optimizer, loader)
    module.train()
    sums: dict[str, list[float]] = defaultdict(list)
    step = 0
    bar = tqdm(total=stage.max_steps, desc=name, disable=not accelerator.is_main_process, dynamic_ncols=True)
    batches = _epochs(loader)
    while step < stage.max_steps:
        batch = next(batches)
        with accelerator.accumulate(module):
            loss, logs = module(batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and stage.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, stage.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sums["loss"].append(loss.item())
        for key, value in logs.items():
            if key == "match":
                if on_micro_step is not None:
                    on_micro_step(step + 1, value)
            else:
                sums[key].append(float(value))
        if accelerator.sync_gradients:
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            step += 1
            record = {k: sum(v) / len(v) for k, v in sums.items()}
            metrics.write({"stage": name, "step": step, "lr": lr, **record})
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
            sums.clear()
    bar.close()
    accelerator.wait_for_everyone()
    return accelerator.unwrap_model(module)
