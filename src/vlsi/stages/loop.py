"""The optimisation loop every stage shares: AdamW, cosine schedule, gradient accumulation through accelerate.

A stage hands over a *step module*: an `nn.Module` whose registered parameters are exactly what trains and
whose `forward(batch)` returns `(loss, logs)`. Frozen models live outside its registered children, so
distributed wrappers (DDP, FSDP) and the optimizer see only the trainable part.

Distributed runs are configuration (`accelerate launch --config_file configs/accelerate/*.yaml`, docs/DISTRIBUTED.md):
each process draws its own slice of every global batch, losses are means over a micro-batch's response tokens,
and gradients are averaged over processes and accumulation steps; metrics are averaged over processes too.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    gather_object,
)
from torch import nn
from tqdm.auto import tqdm

from ..config import StageConfig, TrainConfig
from ..data.skipping import SKIPPED, SkippedRecords
from ..distributed import configure_plugins, full_state_dict, unwrap
from ..runfolder import append_jsonl, truncate_jsonl
from . import checkpoint

log = logging.getLogger("vlsi")


@dataclass
class Run:
    """What a stage's `setup` builds, for its training call and its `save`."""

    accelerator: Accelerator
    step: nn.Module  # batch -> (loss, logs); its registered parameters are what trains
    loader: object
    dtype: torch.dtype
    processor: object  # the trained (or verbalized) model's processor
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # checkpointed with the run


def make_accelerator(
    stage: StageConfig,
    dtype: torch.dtype,
    find_unused_parameters: bool = False,
    report_to: list[str] = (),
    logging_dir: Path | None = None,
) -> Accelerator:
    """`find_unused_parameters`: some trained parameters may get no gradient in a step (DDP must then be told).
    `report_to`: accelerate trackers (tensorboard, wandb, ...) that receive every metrics line, under `logging_dir`."""
    plugin = GradientAccumulationPlugin(num_steps=stage.grad_accum, sync_with_dataloader=False)
    return Accelerator(
        mixed_precision="bf16" if dtype == torch.bfloat16 else "no",
        gradient_accumulation_plugin=plugin,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        log_with=list(report_to) or None,
        project_dir=logging_dir,
    )


def tracking(cfg: TrainConfig) -> dict:
    """`make_accelerator()` keyword arguments: trackers asked for with report_to, logging under OUT/logs."""
    return dict(report_to=cfg.report_to, logging_dir=Path(cfg.output) / "logs")


def cosine_schedule(optimizer: torch.optim.Optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine from lr to min_lr over the remaining optimizer steps
    (docs/METHOD.md#training-setup-of-the-paper)."""
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
            append_jsonl(self.path, [record])

    def truncate(self, stage: str, step: int) -> None:
        """Forget `stage`'s lines after `step`: a resumed stage writes them again."""
        if self.enabled and PartialState().is_main_process:
            truncate_jsonl(self.path, lambda row: row.get("stage") != stage or row.get("step", 0) <= step)


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch (seed + epoch): the data position is (epoch, batches consumed), restorable."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's prepared loader calls this at each pass
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


def make_loader(dataset, batch_size: int, collate_fn, seed: int, num_workers: int = 0):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochSampler(len(dataset), seed),
        collate_fn=collate_fn,
        num_workers=num_workers,
        drop_last=len(dataset) >= batch_size,
    )


class NonFiniteLoss(RuntimeError):
    """Too many optimizer steps in a row had a NaN or infinite loss."""


def train(
    accelerator: Accelerator,
    step_module: nn.Module,
    loader,
    stage: StageConfig,
    name: str,
    metrics: MetricsLog,
    on_micro_step=None,
    checkpoint_dir: Path | None = None,
    every: int = 0,
    generators: dict[str, torch.Generator] | None = None,
    max_nonfinite: int = 10,
) -> dict[str, torch.Tensor]:
    """Run `stage.max_steps` optimizer steps on every process, resuming from the newest checkpoint in
    `checkpoint_dir` and writing one every `every` steps (with `generators`' states, e.g. the matching sampler's).

    A step where any micro-batch's loss is not finite is skipped (no update) and logged as `skipped`; after
    `max_nonfinite` such steps in a row the run stops. Returns the trained step module's state dict, whole tensors
    on the main process (FSDP2 and ZeRO-3 gather their shards here, so every process must get this far); stages
    rebuild plain modules from it to save them.
    """
    params = [p for p in step_module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{name}: nothing to train (every parameter is frozen)")
    generators = generators or {}
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = cosine_schedule(optimizer, stage)
    configure_plugins(accelerator, step_module, stage)
    module, optimizer, loader = accelerator.prepare(step_module, optimizer, loader)
    params = [p for p in module.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters

    step, epoch, consumed = 0, 0, 0  # optimizer steps; data position: pass over the data, batches taken in it
    progress = {}
    training = checkpoint.TrainingState(unwrap(accelerator, module), optimizer, scheduler, generators)
    saved = checkpoint.latest(checkpoint_dir) if checkpoint_dir is not None else None
    if saved is not None:
        progress = checkpoint.load(saved, training, checkpoint.Processes.of(accelerator))
        step, epoch, consumed = progress["step"], progress["epoch"], progress["consumed"]
        log.info("%s: resuming from %s", name, saved)
    # samples passed over so far (bad records found while loading): part of the data position
    skipped = SkippedRecords.of(loader.dataset, accelerator.process_index, accelerator.num_processes, progress)
    metrics.truncate(name, step)
    if accelerator.log_with:
        accelerator.init_trackers(name.replace("/", "-"))

    def batches():
        nonlocal epoch, consumed
        while True:
            loader.set_epoch(epoch)
            for batch in accelerator.skip_first_batches(loader, consumed) if consumed else loader:
                consumed += 1
                yield batch
            epoch, consumed = epoch + 1, 0

    module.train()
    sums: dict[str, list[float]] = defaultdict(list)
    clipping: dict[str, float] = {}  # the step's gradient norm and whether it was clipped (stage.max_grad_norm > 0)
    bad_step, bad_run = False, 0
    bar = tqdm(
        total=stage.max_steps, initial=step, desc=name, disable=not accelerator.is_main_process, dynamic_ncols=True
    )
    stream = batches()
    while step < stage.max_steps:
        batch = next(stream)
        if isinstance(batch, dict):  # a VLDataset batch: the samples passed over while loading it
            skipped.add(batch.pop(SKIPPED, []))
        with accelerator.accumulate(module):
            loss, logs = module(batch)
            finite = torch.isfinite(loss.detach()).float()
            if accelerator.num_processes > 1:  # every process must skip the same step
                finite = 1 - accelerator.reduce(1 - finite, "max")  # accelerate reduces by sum or max, not min
            if finite.item():
                accelerator.backward(loss)
            else:
                bad_step = True
            if accelerator.sync_gradients and not bad_step:
                if stage.max_grad_norm > 0:  # the global norm before clipping (DeepSpeed clips in backward: its norm)
                    norm = accelerator.clip_grad_norm_(params, stage.max_grad_norm)
                    if norm is not None:
                        clipping = {"grad_norm": float(norm), "clipped": float(norm > stage.max_grad_norm)}
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not bad_step:
            sums["loss"].append(loss.item())
            sums.update({k: [*sums[k], float(v)] for k, v in logs.items() if k != "match"})
        if "match" in logs and on_micro_step is not None:
            on_micro_step(step + 1, logs["match"])
        if not accelerator.sync_gradients:
            continue
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        scheduler.step()
        step += 1
        if bad_step:
            bad_run += 1
            metrics.write({"stage": name, "step": step, "lr": lr, "skipped": "non-finite loss"})
            log.warning("%s step %d: non-finite loss, step skipped (%d in a row)", name, step, bad_run)
            if bad_run >= max_nonfinite:
                raise NonFiniteLoss(
                    f"{name}: the loss was NaN or infinite in {bad_run} optimizer steps in a row (up to step {step}); "
                    f"lower {name.split('/')[0]}.lr, check the data, or use precision=fp32"
                )
        else:
            bad_run = 0
            means = [sum(v) / len(v) for v in sums.values()]  # this process's micro-batches
            means = accelerator.reduce(torch.tensor(means, dtype=torch.float64, device=accelerator.device), "mean")
            record = dict(zip(sums, means.tolist())) | clipping  # the global batch: every process's micro-batches
            metrics.write({"stage": name, "step": step, "lr": lr, **record})
            accelerator.log({"lr": lr, **record}, step=step)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        bar.update(1)
        sums.clear()
        bad_step = False
        if every and checkpoint_dir is not None and step % every == 0 and step < stage.max_steps:
            position = {"step": step, "epoch": epoch, "consumed": consumed}
            position["skipped"] = gather_object([skipped.state()])  # [each process's], in process order
            checkpoint.save(checkpoint_dir, step, training, position, checkpoint.Processes.of(accelerator))
    bar.close()
    for tracker in accelerator.trackers:  # not end_training(): that also ends the process group the next stage uses
        tracker.finish()
    accelerator.wait_for_everyone()
    return full_state_dict(accelerator, module)


def checkpointing(cfg: TrainConfig, name: str) -> dict:
    """`train()` keyword arguments for mid-stage checkpoints of stage `name` in OUT/checkpoints/."""
    directory = Path(cfg.output) / "checkpoints" / name.replace("/", "-")
    return dict(checkpoint_dir=directory, every=cfg.checkpoint.every, max_nonfinite=cfg.max_nonfinite_steps)


def drop_checkpoints(cfg: TrainConfig, name: str) -> None:
    """A finished stage's output is written: its mid-stage checkpoints are no longer needed."""
    shutil.rmtree(checkpointing(cfg, name)["checkpoint_dir"], ignore_errors=True)
