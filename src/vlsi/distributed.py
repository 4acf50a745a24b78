"""Every distributed special case in one place: where a launch's processes differ, how frozen models are placed
(DDP, FSDP2, DeepSpeed ZeRO), how accelerate's plugins are set per stage, how ZeRO-3's collectives are kept in
step, and how partitioned checkpoint state is named and gathered (docs/DISTRIBUTED.md).

Single-process runs never import DeepSpeed: accelerate imports it as soon as it unwraps or gathers a model, so the
plain cases (one process, DDP) unwrap themselves.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin, DistributedType, parse_flag_from_env
from torch import nn

from .config import ConfigError, StageConfig
from .losses import row_chunks
from .models.family import Parts
from .models.loading import check_fits, freeze, load_model

log = logging.getLogger("vlsi")


def process_state() -> PartialState:
    """This process's place in the launch (main or not), read as Accelerator reads it (`launch --cpu` included)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def sharded_launch() -> str | None:
    """How this process's accelerate launch shards the trained model: "FSDP2", "ZeRO-3", or None (one process, DDP,
    FSDP1, ZeRO-1/2). Read from accelerate launch's environment as Accelerator reads it (FSDP_VERSION; the DeepSpeed
    plugin's ZeRO stage, from ACCELERATE_DEEPSPEED_ZERO_STAGE or its config file): known before any Accelerator
    exists."""
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION") == "2":
        return "FSDP2"
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED") and DeepSpeedPlugin().zero_stage == 3:
        return "ZeRO-3"
    return None


def on_main_process(fn, *args):
    """`fn(*args)` run by the main process only, its result (or its ValueError: bad data, a bad cache) sent to the
    others."""
    state = process_state()
    if state.num_processes == 1:
        return fn(*args)
    from accelerate.utils import broadcast_object_list

    box = [None]
    if state.is_main_process:
        try:
            box = [(fn(*args), None)]
        except ValueError as error:  # DataError, ConfigError: every process stops with the same one line
            box = [(None, error)]
    broadcast_object_list(box)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def configure_plugins(accelerator: Accelerator, step_module: nn.Module, stage: StageConfig) -> None:
    """Set accelerate's FSDP2 / DeepSpeed plugin for the stage about to be prepared (one plugin serves them all)."""
    if accelerator.is_fsdp2:
        # Accelerate keeps one FSDP plugin per process and would reuse the first stage's wrap classes: each stage
        # wraps the decoder blocks its own model lists (none for the verbalize step, whose backbone is frozen).
        accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = list(
            getattr(step_module, "_no_split_modules", None) or []
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # accelerate writes the first stage's batch settings into the DeepSpeed plugin: each stage sets its own.
        # Clipping is DeepSpeed's (accelerator.clip_grad_norm_ only reports the norm).
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=stage.batch_size,
            gradient_accumulation_steps=stage.grad_accum,
            train_batch_size="auto",
            gradient_clipping=stage.max_grad_norm,
        )


def _replicated(accelerator: Accelerator, module: nn.Module) -> bool:
    """One whole copy of the trained module per process (one process, or DDP): nothing to gather. Asked of the
    module's parameters too (DTensors: FSDP2 sharded it), as a CPU launch of FSDP2 may report the multi-CPU type."""
    from torch.distributed.tensor import DTensor

    plain = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if accelerator.distributed_type not in plain or accelerator.is_fsdp2:
        return False
    return not any(isinstance(p, DTensor) for p in module.parameters())


def unwrap(accelerator: Accelerator, module: nn.Module) -> nn.Module:
    """The prepared module without its distributed wrapper (accelerate's `unwrap_model`, which imports DeepSpeed)."""
    if _replicated(accelerator, module):
        return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    return accelerator.unwrap_model(module)


def full_state_dict(accelerator: Accelerator, module: nn.Module) -> dict[str, torch.Tensor]:
    """The trained module's whole state dict on the main process (FSDP2 and ZeRO-3 gather their shards: a collective
    every process must join)."""
    if _replicated(accelerator, module):
        return unwrap(accelerator, module).state_dict()
    return accelerator.get_state_dict(module)


ChunkPlan = Callable[[int], list[slice]]  # a process's number of response tokens -> the row ranges to visit


def chunk_plan(accelerator: Accelerator, chunk_size: int) -> ChunkPlan:
    """-> a function from this process's number of response tokens to the row ranges the chunked losses visit
    (`vlsi.losses`: `chunks`).

    DeepSpeed ZeRO-3 gathers a trained module's weights at each call, a collective every process must join, and the
    verbalizer heads are called once per chunk of response tokens, which processes hold different numbers of: under
    ZeRO-3 every process visits as many ranges as the one with the most (the extra ones empty). Elsewhere: ranges of
    `chunk_size`, no padding and no communication."""
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if not (deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3):
        return lambda n: row_chunks(n, chunk_size)

    def agreed(n: int) -> list[slice]:
        chunks = torch.tensor([math.ceil(n / chunk_size)], device=accelerator.device)
        return row_chunks(n, chunk_size, at_least=int(accelerator.reduce(chunks, "max").item()))

    return agreed


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


def load_frozen(
    accelerator: Accelerator, path: str, dtype: torch.dtype, trust_remote_code: bool, quantization: str = ""
) -> nn.Module:
    """Load a model that stays frozen (the teacher; the backbone whose verbalizers train), in evaluation mode, so
    that a 72B teacher never sits whole in every process's memory: under DeepSpeed partitioned while it loads; under
    FSDP2 only the main process reads the weights, the others build the architecture on the meta device and receive
    their shards in `prepare_frozen`. Its weights must fit each device's share first (`check_fits`). A quantized
    model (`quantization`) is placed whole on every device: sharding launches refuse it."""
    sharded = accelerator.is_fsdp2 or accelerator.distributed_type == DistributedType.DEEPSPEED
    if quantization and sharded and accelerator.num_processes > 1:
        raise ConfigError(
            f"teacher_quantization={quantization} keeps a whole quantized teacher on every device, which FSDP2 and "
            "DeepSpeed cannot shard: launch with DDP (configs/accelerate/ddp.yaml) or one process, or drop "
            "teacher_quantization"
        )
    share = accelerator.num_processes if sharded else 1
    if accelerator.is_main_process:  # its outline built whole: under ZeRO-3's zero.Init it would be partitioned
        with deepspeed_loading(accelerator, partition=False):  # (numel 0) in collectives the others never join
            check_fits(path, dtype, accelerator.device, quantization, share, trust_remote_code)
    empty = accelerator.is_fsdp2 and not accelerator.is_main_process
    with deepspeed_loading(accelerator, partition=True, dtype=dtype):
        model = load_model(path, dtype, trust_remote_code, empty=empty, quantization=quantization)
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


def gathered_weight(param: nn.Parameter, modify: bool = False):
    """DeepSpeed ZeRO-3 partitions weights: gather this one whole on every process for the block (a collective; one
    weight at a time, so a checkpoint never holds the whole model on a device), and with `modify`, spread the main
    process's change on leaving it. A no-op for other weights."""
    if not hasattr(param, "ds_id"):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0 if modify else None)


def state_file(kind: str, partitioned: bool, process_index: int) -> str:
    """`trainable` / `optimizer` file name: one per process when that part is partitioned, else one in all."""
    return f"{kind}-rank{process_index}.safetensors" if partitioned else f"{kind}.safetensors"


def zero_optimizer(optimizer) -> tuple[torch.optim.Optimizer, list[torch.Tensor]] | None:
    """Under DeepSpeed ZeRO: the torch optimizer and the flat fp32 master partitions it steps on, whose states it
    keeps (the module holds working copies, refreshed from the masters at every step). None otherwise."""
    zero = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds DeepSpeed's ZeRO optimizer
    for masters in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):  # ZeRO-1/2, ZeRO-3
        if hasattr(zero, masters):
            return zero.optimizer, list(getattr(zero, masters))
    return None
