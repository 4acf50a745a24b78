"""Small pieces the stages share: batch splitting, target-layer choice, data set-up, frozen-model placement,
atomic output folders."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from ..answers import teacher_answers
from ..config import ConfigError, TrainConfig
from ..data import DataError, VLDataset, make_collate, read_dataset, response_positions
from ..data.skipping import with_skipped
from ..models.family import Parts, check_target_layers, default_target_layers
from ..models.loading import freeze, load_model

log = logging.getLogger("vlsi")


def split_batch(batch: dict[str, torch.Tensor]):
    """-> (model inputs, response mask [B, T], next-token targets [N]) for one model's encoded batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    mask = response_positions(labels)  # [B, T]: positions whose next token is a response token
    targets = labels.roll(-1, dims=1)[mask]  # [N]
    return inputs, mask, targets


def target_layers(cfg: TrainConfig, parts: Parts, who: str) -> list[int]:
    explicit = getattr(cfg.verbalizer, f"{who}_layers")
    if explicit is None:
        layers = default_target_layers(parts.num_layers, cfg.verbalizer.stride, cfg.verbalizer.offset)
    else:
        layers = explicit
    return check_target_layers(layers, parts.num_layers, f"verbalizer.{who}_layers")


def load_samples(cfg: TrainConfig):
    """The data's samples; with data.answers=teacher the unanswered ones carry the teacher's answers (generated
    once, cached in OUT/answers: `vlsi.answers`). The main process checks the data (on data.num_proc processes) and
    sends the result, an index into the data file, to the others."""
    teacher = cfg.data.answers == "teacher"
    args = (cfg.data.image_root or None, cfg.data.skip_invalid, teacher, cfg.data.num_proc or None)
    samples, skipped = _on_main_process(read_dataset, cfg.data.path, *args, cfg.data.validate == "lazy")
    if skipped:
        log.warning("skipped %d invalid records in %s (data.skip_invalid=true)", len(skipped), cfg.data.path)
    return teacher_answers(cfg, samples) if teacher else samples


def _on_main_process(fn, *args):
    """`fn(*args)` run by the main process only, its result (or DataError) sent to the others."""
    from .loop import process_state

    state = process_state()
    if state.num_processes == 1:
        return fn(*args)
    from accelerate.utils import broadcast_object_list

    box = [None]
    if state.is_main_process:
        try:
            box = [(fn(*args), None)]
        except DataError as error:
            box = [(None, error)]
    broadcast_object_list(box)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def build_loader(cfg: TrainConfig, samples, processors: dict, batch_size: int, seed: int, name: str):
    """A seeded, shuffling loader. The length scan runs on the main process (the others wait, then read it) and is
    cached in OUT/.cache/NAME-lengths.json, where the later stages find each processor's counts."""
    from .loop import make_loader, process_state

    cache = Path(cfg.output) / ".cache" / f"{name}-lengths.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    options = dict(num_proc=cfg.data.num_proc or None, lazy=cfg.data.validate == "lazy")
    with process_state().main_process_first():
        dataset = VLDataset(
            samples,
            processors,
            cfg.data.max_length,
            cfg.data.overlong,
            cache,
            **options,
            max_bad_fraction=cfg.data.max_bad_fraction,
        )
    if dataset.n_dropped:
        log.warning("dropped %d samples longer than data.max_length=%d tokens", dataset.n_dropped, cfg.data.max_length)
    if len(dataset) == 0:
        raise ValueError(f"{cfg.data.path}: no usable samples (all were invalid or longer than data.max_length)")
    return make_loader(dataset, batch_size, with_skipped(make_collate(processors)), seed, cfg.data.num_workers)


def chunk_agreement(accelerator: Accelerator, chunk_size: int) -> Callable[[int], int]:
    """-> a function from this process's number of response tokens to the `min_chunks` of the chunked losses.

    DeepSpeed ZeRO-3 gathers a trained module's weights at each call, a collective every process must join, and the
    verbalizer heads are called once per chunk of response tokens, which processes hold different numbers of: under
    ZeRO-3 every process runs as many chunks as the one with the most (the extra ones empty). Elsewhere: 0, no
    padding and no communication."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if not (deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3):
        return lambda n: 0

    def most_chunks(n: int) -> int:
        chunks = torch.tensor([math.ceil(n / chunk_size)], device=accelerator.device)
        return int(accelerator.reduce(chunks, "max").item())

    return most_chunks


def _zero3_config(accelerator: Accelerator, dtype: torch.dtype) -> dict:
    """DeepSpeed settings that partition a frozen model's weights (ZeRO-3), offloaded wherever the launch offloads
    parameters (`offload_param_device` in the accelerate config: cpu or nvme)."""
    zero = {"stage": 3}
    offload = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"].get("offload_param")
    if offload and offload.get("device", "none") != "none":
        zero["offload_param"] = offload
    return {
        "train_micro_batch_size_per_gpu": 1,  # required by deepspeed.initialize; nothing trains here
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
    }


@contextmanager
def deepspeed_loading(accelerator: Accelerator, partition: bool, dtype: torch.dtype = torch.float32):
    """Under a DeepSpeed launch, choose whether `from_pretrained` partitions what it loads (ZeRO-3 `zero.Init`:
    each process keeps 1/N of every weight, none ever holds the whole model). transformers partitions exactly when
    a ZeRO-3 config is registered with it, and accelerate registers the launch's: `partition=True` registers ZeRO-3
    in `dtype` for the block (frozen models, whatever the trained model's stage), False hides the launch's (the main
    process alone rebuilding a student to save it, which must not join collectives). Other launches: no effect."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        registered = HfDeepSpeedConfig(_zero3_config(accelerator, dtype)) if partition else None  # noqa: F841
        yield
    finally:
        unset_hf_deepspeed_config()
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # the launch's config again


def load_frozen(accelerator: Accelerator, path: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """Load a model that stays frozen (the teacher; the backbone whose verbalizers train), in evaluation mode, so
    that a 72B teacher never sits whole in every process's memory: under DeepSpeed partitioned while it loads; under
    FSDP2 only the main process reads the weights, the others build the architecture on the meta device and receive
    their shards in `prepare_frozen`."""
    empty = accelerator.is_fsdp2 and not accelerator.is_main_process
    with deepspeed_loading(accelerator, partition=True, dtype=dtype):
        model = load_model(path, dtype, trust_remote_code, empty=empty)
    if accelerator.is_fsdp2 and accelerator.num_processes > 1 and not _same_parameters_everywhere(model):
        # transformers ties or unties weights by what the checkpoint holds, which the architecture alone cannot tell
        if accelerator.is_main_process:
            log.warning("%s: its checkpoint and config disagree on tied weights; every process loads it whole", path)
        model = load_model(path, dtype, trust_remote_code) if empty else model
    return freeze(model).eval()


def _same_parameters_everywhere(model: nn.Module) -> bool:
    """Whether every process's model has the same parameters (names and shapes), in the same order."""
    import torch.distributed as dist

    mine = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return all(theirs == mine for theirs in everyone)


def prepare_frozen(accelerator: Accelerator, model: nn.Module, parts: Parts) -> tuple[nn.Module, Parts]:
    """Place a frozen model for inference the way the launch configuration distributes training.

    Single process and DDP: one whole copy per device (accelerate's evaluation mode: no DDP wrapper). FSDP2: sharded
    like the trained model, each decoder block its own unit. DeepSpeed: partitioned by a ZeRO-3 inference engine
    whatever the trained model's stage (no optimizer state, so stage 3 is the only one that saves memory). A sharded
    model gathers its weights at each call of a sharded module; the verbalizers call the final norm and LM head outside
    the model's forward, a different number of times per process, so they get replicated copies of those two instead.
    """
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError("FSDP version 1 is not supported: use configs/accelerate/fsdp2.yaml (fsdp_version: 2)")
    zero = accelerator.distributed_type == DistributedType.DEEPSPEED
    if not (accelerator.is_fsdp2 or zero):
        return accelerator.prepare_model(model, evaluation_mode=True), parts
    heads = {"norm": parts.norm, "lm_head": parts.lm_head}
    gathered = nullcontext()
    if zero:  # loaded partitioned (`load_frozen`): every process gathers the two whole to copy them
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for m in heads.values() for p in m.parameters()])
    with gathered:
        heads = {k: copy.deepcopy(m) for k, m in heads.items()}
    if accelerator.is_fsdp2:
        return _shard_from_main_process(accelerator, model, parts, heads)
    parts = dataclasses.replace(parts, **{k: m.to(accelerator.device) for k, m in heads.items()})
    engine, *_ = deepspeed.initialize(model=model, config=_zero3_config(accelerator, next(model.parameters()).dtype))
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return engine, parts


def _shard_from_main_process(accelerator: Accelerator, model: nn.Module, parts: Parts, heads: dict[str, nn.Module]):
    """FSDP2 for a frozen model that only the main process loaded (`load_frozen`; the others hold it on the meta
    device): shard it, each decoder block its own unit, then send every process its shards of the main process's
    weights, its buffers (rotary frequencies are in no state dict) and whole copies of the final norm and LM head."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    weights = model.state_dict() if accelerator.is_main_process else {}
    for layer in parts.layers:
        fully_shard(layer)
    fully_shard(model)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
    del weights
    with torch.no_grad():
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    buffer = torch.empty_like(buffer, device=accelerator.device) if buffer.is_meta else buffer
                    module._buffers[name] = buffer.to(accelerator.device)
                    dist.broadcast(module._buffers[name], src=0)
        copies = {}
        for key, copy_ in heads.items():
            copy_ = copy_.to_empty(device=accelerator.device)
            for mine, sharded in zip(copy_.parameters(), getattr(parts, key).parameters(), strict=True):
                mine.copy_(sharded.full_tensor() if isinstance(sharded, DTensor) else sharded)
            copies[key] = copy_
    return model, dataclasses.replace(parts, **copies)


def substate(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a step module's state dict under `prefix.` (e.g. "student"), with the prefix removed."""
    return {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}


def tracking(cfg: TrainConfig) -> dict:
    """`make_accelerator()` keyword arguments: trackers asked for with report_to, logging under OUT/logs."""
    return dict(report_to=cfg.report_to, logging_dir=Path(cfg.output) / "logs")


def checkpointing(cfg: TrainConfig, name: str) -> dict:
    """`train()` keyword arguments for mid-stage checkpoints of stage `name` in OUT/checkpoints/."""
    directory = Path(cfg.output) / "checkpoints" / name.replace("/", "-")
    return dict(checkpoint_dir=directory, every=cfg.checkpoint.every, max_nonfinite=cfg.max_nonfinite_steps)


def drop_checkpoints(cfg: TrainConfig, name: str) -> None:
    """A finished stage's output is written: its mid-stage checkpoints are no longer needed."""
    shutil.rmtree(checkpointing(cfg, name)["checkpoint_dir"], ignore_errors=True)


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary folder beside `path`; rename it to `path` only when the block finishes."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
