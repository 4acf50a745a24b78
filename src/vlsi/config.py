"""Typed configuration: defaults < YAML file < `key=value` overrides. Unknown keys are errors.

The resolved configuration is written next to the outputs as `config.yaml`, and reading it back gives
the same object (`load_config(OUT/config.yaml)`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from .runfolder import write_text

# Allowed values, declared once: the config checks them, the code that uses them reads them from here.
Strategy = Literal["adaptive", "multinomial", "bottom_k", "uniform", "random", "fixed"]
Temperature = Literal["range_over_scale", "scale_over_range"]
Divergence = Literal["forward", "reverse", "jsd"]


class ConfigError(ValueError):
    """A bad configuration: the message names the key and the fix."""


@dataclass
class ColumnsConfig:
    # dataset column of each record key (parquet, arrow, hub ids; docs/CONFIG.md "Datasets"); "": data.preset's
    id: str = ""
    conversations: str = ""  # LLaVA / ShareGPT turns ({"from", "value"})
    messages: str = ""  # OpenAI / TRL turns ({"role", "content"})
    texts: str = ""  # the_cauldron's list of {"user", "assistant"} pairs
    images: str = ""  # a list of images (or paths)
    image: str = ""  # one image (or a list; LLaVA's key)


@dataclass
class DataConfig:
    # a source or a list of them (a mixture): a JSON / JSONL file of records, a parquet or arrow file, a folder of
    # shards or written by save_to_disk, a hub id (ID[:CONFIG][@SPLIT]), or a mixture file (.yaml): docs/CONFIG.md
    path: str | list[str] = ""
    image_root: str = ""  # image paths are relative to this (default: the data file's folder)
    preset: Literal["auto", "trl", "cauldron", "onevision"] = "auto"  # a dataset's column names (docs/CONFIG.md)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    max_length: int = 2048  # tokens, images included; longer samples are never cut through image tokens
    overlong: Literal["drop", "error"] = "drop"  # drop (and count) | error
    skip_invalid: bool = False  # skip broken records (and say how many) instead of stopping
    # a special token's string in a record's text (`<|im_end|>`, the image token): refuse the record | encode as text
    special_tokens: Literal["refuse", "text"] = "refuse"
    # eager: check + length-scan everything first | lazy: check each record as it loads
    validate: Literal["eager", "lazy"] = "eager"
    max_bad_fraction: float = 0.01  # records found bad while training (skipped) past this share of the data stop it
    num_proc: int = 0  # processes that check and length-scan the data (0: every core this process may use)
    num_workers: int = 0
    # gold: records carry their answers | teacher: the teacher answers unanswered records | server: a served
    # teacher answers them (an OpenAI-compatible server: vLLM, SGLang, `transformers serve`; docs/SERVING.md)
    answers: Literal["gold", "teacher", "server"] = "gold"
    answer_max_tokens: int = 256  # data.answers=teacher|server: most new tokens the teacher generates per answer
    answer_batch_size: int = 8  # data.answers=teacher: prompts per generation batch (main process only)
    keep_cut_answers: bool = False  # train on answers cut at answer_max_tokens (default: left out, and counted)
    max_cut_fraction: float = 0.05  # cut answers left out past this share of the prompts stop the run
    answer_server: str = ""  # data.answers=server: the server's OpenAI-compatible base URL (http://HOST:8000/v1)
    answer_model: str = ""  # data.answers=server: the model name the server serves the teacher under
    answer_key_env: str = ""  # data.answers=server: environment variable holding the API key ("": no key)
    answer_concurrency: int = 8  # data.answers=server: requests in flight at once
    answer_timeout: float = 600.0  # data.answers=server: seconds one request may take
    answer_retries: int = 3  # data.answers=server: retries of a request failing with a timeout, 408, 429 or 5xx


@dataclass
class VerbalizerConfig:
    student_layers: list[int] | None = None  # explicit 0-based decoder block indices; None: stride rule
    teacher_layers: list[int] | None = None
    stride: int = 4  # rule: blocks offset, offset+stride, ... excluding the last block (docs/METHOD.md#target-layers)
    offset: int = 2
    residual: bool = False  # h + v(h) with zero-initialised W_down (a "logit lens" at init) instead of v(h)


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 64
    alpha: int = 64
    dropout: float = 0.0
    # nn.Linear names in the language model; null: the family's row (vlsi.models.family.FAMILIES), attention + MLP
    # and, where the family has them, fused gate_up_proj (GLM-4.1V) or linear-attention projections (Qwen3.5)
    target_modules: list[str] | None = None
    experts: bool = False  # also LoRA on MoE expert weights (3-D parameters; needs dropout=0): docs/CONFIG.md


@dataclass
class StageConfig:
    max_steps: int = 100  # optimizer steps
    lr: float = 1e-4  # cosine schedule lr -> min_lr (docs/METHOD.md#training-setup-of-the-paper)
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 4  # per device
    grad_accum: int = 16
    max_grad_norm: float = 1.0


@dataclass
class VerbalizeConfig(StageConfig):
    models: list[str] = field(default_factory=lambda: ["teacher", "student"])


@dataclass
class MatchConfig:
    strategy: Strategy = "adaptive"
    search_range: bool = True
    order: bool = True
    # range_over_scale: T = (max - min + eps) / scale, a logit span of `scale` whatever the units of d (the default:
    # it discriminates at any KL scale) | scale_over_range: T = scale / (max - min + eps), the paper's formula as
    # printed, near-uniform when candidate KLs differ by tenths of a nat (docs/CONFIG.md, docs/DEMO.md)
    temperature: Temperature = "range_over_scale"
    scale: float = 2.0
    eps: float = 1e-6
    fixed_temperature: float = 1.0  # strategy=multinomial
    bottom_k: int = 3  # strategy=bottom_k (1 = "bottom-1")
    fixed: list[int] | None = None  # strategy=fixed: teacher target-layer index per student target layer


@dataclass
class SampleConfig:
    # how the student samples its responses on on-policy batches (interact.on_policy; docs/METHOD.md#on-policy)
    temperature: float = 1.0  # 1 with top_p=1: the student's own distribution (no top-k, no repetition penalty)
    top_p: float = 1.0
    max_new_tokens: int = 128  # a response cut here is kept as it is (no end token) and counted (sample/capped)


@dataclass
class InteractConfig(StageConfig):
    match: MatchConfig = field(default_factory=MatchConfig)
    divergence: Divergence = "forward"  # forward KL(teacher||student) | reverse | jsd
    jsd_beta: float = 0.5  # divergence=jsd: GKD's β, m = β p_teacher + (1 - β) p_student; 0.5 the symmetric JSD
    # GKD's λ: the share of micro-batches whose responses the student samples; 0: fixed responses only
    on_policy: float = 0.0
    # every divergence of an on-policy micro-batch (matching scores, layer terms, last-layer term); interact.divergence
    # stays the off-policy one. reverse KL(student||teacher): the on-policy default (GKD, Qwen3's distillation)
    on_policy_divergence: Divergence = "reverse"
    sample: SampleConfig = field(default_factory=SampleConfig)
    # kld | l2 (matched layers) | ce (ground truth at each verbalizer) | none
    intermediate_loss: Literal["kld", "l2", "ce", "none"] = "kld"
    last_loss: Literal["kld", "ce", "none"] = "kld"  # kld (to the teacher's final output) | ce (ground truth) | none
    # how the per-layer terms add up: sum (the paper: with t_s layers the last-layer term is 1/(t_s+1) of the loss)
    # | mean (their mean: the layer terms together weigh as much as the last-layer term)
    intermediate_reduction: Literal["sum", "mean"] = "sum"
    # λ: the layer terms (their sum or mean) times λ, then the last-layer term added; 1: the paper's plain sum
    intermediate_weight: float = 1.0
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze_vision: bool = True
    # the student's verbalizers stay as stage 1 left them: the layer terms can only move the backbone
    freeze_student_verbalizers: bool = False


@dataclass
class SFTConfig(StageConfig):
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze_vision: bool = True


@dataclass
class CacheConfig:
    # the teacher's cached targets (`vlsi cache`, `teacher_cache=C`; docs/CACHE.md)
    top_k: int = 64  # log-probabilities kept per token and layer, plus the tail mass as one bucket; 0: all (exact)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # of the cached log-probabilities (ids are int32)
    shard_size: int = 256  # samples per shard file (the unit of resuming and of a process's share)
    batch_size: int = 8  # samples per teacher forward pass while caching


@dataclass
class CheckpointConfig:
    every: int = 100  # optimizer steps between mid-stage checkpoints in OUT/checkpoints (0: none)


@dataclass
class TrainConfig:
    teacher: str = ""  # local directory or hub id
    student: str = ""
    output: str = ""
    teacher_verbalizers: str = ""  # reuse teacher verbalizers trained earlier (`vlsi verbalize`) instead of training
    teacher_cache: str = ""  # folder of the teacher's cached targets: interaction reads them, never loads the teacher
    # the teacher's weights quantized as they load (answers, cache, interaction): int8 (torchao, CPU or GPU), int4
    # (torchao), nf4 / bnb8 (bitsandbytes), fp8 (Hopper); empty: as stored. docs/CONFIG.md#a-quantized-teacher
    teacher_quantization: Literal["", "int8", "int4", "nf4", "bnb8", "fp8"] = ""
    # data.answers=teacher: "" answers with the whole teacher on each process's device; auto spreads one teacher over
    # this machine's GPUs, then CPU memory, then disk (accelerate's big-model inference; the main process answers
    # alone). docs/DISTRIBUTED.md#answering-with-a-teacher-larger-than-one-device
    teacher_device_map: Literal["", "auto"] = ""
    # teacher_device_map=auto: the most each device may hold, e.g. {0: 70GiB, 1: 70GiB, cpu: 200GiB, disk: 500GiB}
    # (GPU index, cpu, disk); only the devices named are used, and disk only when named. Empty: every GPU and the CPU
    teacher_max_memory: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    verbalizer: VerbalizerConfig = field(default_factory=VerbalizerConfig)
    verbalize: VerbalizeConfig = field(default_factory=VerbalizeConfig)
    interact: InteractConfig = field(default_factory=InteractConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, mlflow, ...
    max_nonfinite_steps: int = 10  # a step with a non-finite loss is skipped; this many in a row stop the run
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto (bf16 where the GPU has it, else fp32) | bf16 | fp32
    gradient_checkpointing: bool = False
    chunk_size: int = 1024  # tokens per chunk when verbalizing (bounds the [tokens x vocab] logits kept)
    trust_remote_code: bool = False


TRACKERS = {"tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml"}


def _check_type(key: str, value, annotation):
    """Return `value` coerced to `annotation` (ints accepted for floats), or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(typing.get_args(annotation))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]  # a list value takes the list type (str | list[str])
        listed = [a for a in kinds if typing.get_origin(a) is list]
        return _check_type(key, value, listed[0] if isinstance(value, list) and listed else kinds[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r} (write it as {key}=[1,2,3])")
        (item,) = typing.get_args(annotation)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 2e-5 (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def _merge(obj, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise ConfigError(f"unknown setting '{key}'; known here: {', '.join(sorted(names))}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
            _merge(current, value, f"{key}.")
        else:
            setattr(obj, name, _check_type(key, value, hints[name]))


def parse_override(text: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (e.g. interact.max_steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _check_choices(obj, prefix: str = "") -> None:
    """Every `Literal` setting holds one of its values, also when code set it directly (not through `_merge`)."""
    for name, annotation in typing.get_type_hints(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{name}.")
        elif typing.get_origin(annotation) is Literal:
            _check_type(f"{prefix}{name}", value, annotation)


def validate(cfg: TrainConfig) -> TrainConfig:
    _check_choices(cfg)
    for stage in ("verbalize", "interact", "sft"):
        sc = getattr(cfg, stage)
        for name in ("max_steps", "batch_size", "grad_accum"):
            minimum = 0 if name == "max_steps" else 1
            if getattr(sc, name) < minimum:
                raise ConfigError(f"{stage}.{name} must be >= {minimum}, got {getattr(sc, name)}")
        if sc.lr <= 0 or sc.min_lr < 0 or sc.min_lr > sc.lr:
            raise ConfigError(f"{stage}: need 0 <= min_lr <= lr and lr > 0 (lr={sc.lr}, min_lr={sc.min_lr})")
    unknown = set(cfg.verbalize.models) - {"teacher", "student"}
    if unknown:
        raise ConfigError(f"verbalize.models: unknown {sorted(unknown)}; use teacher and/or student")
    if cfg.verbalizer.stride < 1 or cfg.verbalizer.offset < 0:
        raise ConfigError("verbalizer.stride must be >= 1 and verbalizer.offset >= 0")
    if cfg.interact.match.strategy == "fixed" and not cfg.interact.match.fixed:
        raise ConfigError("interact.match.strategy=fixed needs interact.match.fixed=[teacher index per student layer]")
    if cfg.interact.intermediate_loss == "none" and cfg.interact.last_loss == "none":
        raise ConfigError("interact.intermediate_loss and interact.last_loss are both none: nothing to train")
    weight = cfg.interact.intermediate_weight
    if not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(
            f"interact.intermediate_weight must be a finite number >= 0 (1: the paper's sum), got {weight}"
        )
    check_on_policy(cfg)
    if cfg.interact.intermediate_weight == 0 and cfg.interact.last_loss == "none":
        raise ConfigError("interact.intermediate_weight=0 with interact.last_loss=none: nothing to train")
    unknown = set(cfg.report_to) - TRACKERS
    if unknown:
        raise ConfigError(f"report_to: unknown tracker(s) {sorted(unknown)}; use {', '.join(sorted(TRACKERS))}")
    if cfg.checkpoint.every < 0 or cfg.max_nonfinite_steps < 1:
        raise ConfigError("checkpoint.every must be >= 0 and max_nonfinite_steps >= 1")
    if cfg.cache.top_k < 0 or cfg.cache.shard_size < 1 or cfg.cache.batch_size < 1:
        raise ConfigError(
            f"need cache.top_k >= 0 (0: the whole distribution), cache.shard_size >= 1, cache.batch_size >= 1; got "
            f"{cfg.cache.top_k}, {cfg.cache.shard_size}, {cfg.cache.batch_size}"
        )
    if cfg.chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {cfg.chunk_size}")
    for name in ("answer_max_tokens", "answer_batch_size", "answer_concurrency"):
        if getattr(cfg.data, name) < 1:
            raise ConfigError(f"data.{name} must be >= 1, got {getattr(cfg.data, name)}")
    if cfg.data.answer_timeout <= 0 or cfg.data.answer_retries < 0 or not 0 <= cfg.data.max_cut_fraction <= 1:
        raise ConfigError(
            "need data.answer_timeout > 0 (seconds), data.answer_retries >= 0 and data.max_cut_fraction between 0 "
            f"and 1; got {cfg.data.answer_timeout}, {cfg.data.answer_retries}, {cfg.data.max_cut_fraction}"
        )
    if cfg.data.answers == "server" and not (cfg.data.answer_server and cfg.data.answer_model):
        raise ConfigError(
            "data.answers=server needs data.answer_server=URL (the OpenAI-compatible base URL, e.g. "
            "http://127.0.0.1:8000/v1) and data.answer_model=NAME (the model the server serves)"
        )
    _check_device_map(cfg)
    if cfg.data.num_proc < 0 or not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError("data.num_proc must be >= 0 (0: every core) and data.max_bad_fraction between 0 and 1")
    if cfg.data.validate == "lazy" and cfg.data.answers != "gold":
        raise ConfigError(
            f"data.validate=lazy does not go with data.answers={cfg.data.answers}: the teacher answers every record "
            "before training, so they are all read first anyway; use data.validate=eager"
        )
    return cfg


def _check_device_map(cfg: TrainConfig) -> None:
    """teacher_device_map places the teacher that answers prompts, and nothing else; teacher_max_memory names devices
    as accelerate does (a GPU index, cpu, disk) with a size each (bytes, or "70GiB")."""
    if cfg.teacher_device_map and cfg.data.answers != "teacher":
        raise ConfigError(
            f"teacher_device_map={cfg.teacher_device_map} places only the teacher that answers prompts (data.answers="
            "teacher); the cache and the stages place the teacher as the launch does (docs/DISTRIBUTED.md): drop it"
        )
    if (
        cfg.teacher_device_map and cfg.teacher_quantization
    ):  # transformers' torchao conversion fails for offloaded weights
        raise ConfigError(
            f"teacher_quantization={cfg.teacher_quantization} loads a whole quantized teacher on one device (a 72B "
            "teacher in nf4 or int4 is ~40 GB), which teacher_device_map=auto does not spread: drop one of them"
        )
    if cfg.teacher_max_memory and not cfg.teacher_device_map:
        raise ConfigError("teacher_max_memory bounds the devices of teacher_device_map=auto: add it, or drop this")
    if not cfg.teacher_max_memory:
        return
    from accelerate.utils import convert_file_size_to_int

    for device, size in cfg.teacher_max_memory.items():
        if not (
            device in ("cpu", "disk") or (isinstance(device, int) and not isinstance(device, bool) and device >= 0)
        ):
            raise ConfigError(f"teacher_max_memory: {device!r} is not a device (a GPU index such as 0, cpu or disk)")
        try:
            valid = not isinstance(size, bool) and convert_file_size_to_int(size) > 0
        except (ValueError, TypeError, AttributeError):
            valid = False
        if not valid:
            raise ConfigError(f"teacher_max_memory: {device}: {size!r} is not a size (bytes, or e.g. 70GiB, 500MB)")


def check_on_policy(cfg: TrainConfig) -> None:
    stage, sample = cfg.interact, cfg.interact.sample
    if not 0 <= stage.on_policy <= 1:
        raise ConfigError(f"interact.on_policy is a share of micro-batches, between 0 and 1; got {stage.on_policy}")
    if not 0 < stage.jsd_beta < 1:
        raise ConfigError(f"interact.jsd_beta must lie strictly between 0 and 1 (0.5: symmetric); got {stage.jsd_beta}")
    if not (sample.temperature > 0 and 0 < sample.top_p <= 1 and sample.max_new_tokens >= 1):
        raise ConfigError(
            "need interact.sample.temperature > 0, 0 < interact.sample.top_p <= 1 and interact.sample.max_new_tokens "
            f">= 1; got {sample.temperature}, {sample.top_p}, {sample.max_new_tokens}"
        )
    if stage.on_policy > 0 and cfg.teacher_cache:
        raise ConfigError(
            f"interact.on_policy={stage.on_policy} needs the live teacher to score the student's samples, but "
            f"teacher_cache={cfg.teacher_cache} holds targets for the fixed responses only; drop teacher_cache or set "
            "interact.on_policy=0"
        )


def load_config(path: str | Path | None = None, overrides: list[str] = (), **top) -> TrainConfig:
    """Defaults, then the YAML file, then `top` (CLI flags such as teacher=...), then `key=value` overrides."""
    cfg = TrainConfig()
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.__class__.__name__}: {e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of settings")
        try:
            _merge(cfg, values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    _merge(cfg, {k: v for k, v in top.items() if v is not None})
    for text in overrides:
        _merge(cfg, parse_override(text))
    return validate(cfg)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Written atomically: a kill leaves the previous config.yaml, never a truncated one."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
