"""The optimisation loop every stage shares: AdamW, cosine schedule, gradient accumulation through accelerate.

A stage hands over a *step module*: an `nn.Module` whose registered parameters are exactly what trains and
whose `forward(batch)` returns `(loss, logs)`. Frozen models live outside its registered children, so
distributed wrappers (DDP, FSDP) and the optimizer see only the trainable part.

Distributed runs are configuration (`accelerate launch --config_file configs/accelerate/*.yaml`, docs/DISTRIBUTED.md):
each process draws its own slice of every global batch, losses are means over a micro-batch's response tokens,
and gradients are averaged over processes and accumulation steps; metrics are averaged over processes too.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin
from torch import nn
from tqdm.auto import tqdm

from ..config import StageConfig


def make_accelerator(stage: StageConfig, dtype: torch.dtype, find_unused_parameters: bool = False) -> Accelerator:
    """`find_unused_parameters`: some trained parameters may get no gradient in a step (DDP must then be told)."""
    plugin = GradientAccumulationPlugin(num_steps=stage.grad_accum, sync_with_dataloader=False)
    return Accelerator(
        mixed_precision="bf16" if dtype == torch.bfloat16 else "no",
        gradient_accumulation_plugin=plugin,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )


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
        if self.enabled and PartialState().is_main_process:  # the state the stage's Accelerator set up
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
) -> dict[str, torch.Tensor]:
    """Run `stage.max_steps` optimizer steps on every process.

    Returns the trained step module's state dict, whole tensors on the main process (FSDP2 and ZeRO-3 gather their
    shards here, so every process must get this far); stages rebuild plain modules from it to save them.
    """
    params = [p for p in step_module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name}: nothing to train (every parameter is frozen)")
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = cosine_schedule(optimizer, stage)
    if accelerator.is_fsdp2:
        # Accelerate keeps one FSDP plugin per process and would reuse the first stage's wrap classes: each stage
        # wraps the decoder blocks its own model lists (none for the verbalize step, whose backbone is frozen).
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = list(
            getattr(step_module, "_no_split_modules", None) or []
        )
    module, optimizer, loader = accelerator.prepare(step_module, optimizer, loader)
    params = [p for p in module.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters
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
            means = [sum(v) / len(v) for v in sums.values()]  # this process's micro-batches
            means = accelerator.reduce(torch.tensor(means, dtype=torch.float64, device=accelerator.device), "mean")
            record = dict(zip(sums, means.tolist()))  # the global batch: every process's micro-batches
            metrics.write({"stage": name, "step": step, "lr": lr, **record})
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            bar.update(1)
            sums.clear()
    bar.close()
    accelerator.wait_for_everyone()
    return accelerator.get_state_dict(module)
