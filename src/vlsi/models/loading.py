"""Loading teacher / student VLMs and processors, the memory check before loading, LoRA and freezing."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
from pathlib import Path

import torch
from torch import nn

from .family import Parts, model_parts


class ModelError(ValueError):
    """A model that cannot be used: the message names it and the fix."""


def compute_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def load_processor(path: str, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    refuse_damaged_files(path, PROCESSOR_FILES)
    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        fix = (
            DAMAGED
            if Path(path).is_dir()
            else "give a local model directory, or a hub id on a machine that can reach the hub"
        )
        raise ModelError(f"cannot load a processor from '{path}': {str(e).splitlines()[0]} ({fix})") from None


# The fix of a local model folder that does not load: a file cut short (a copy or a download stopped), or missing.
DAMAGED = (
    "its files are damaged or incomplete: copy or download the model again; a stage's output in a run folder: delete "
    "that folder and rerun to have it written again"
)


# A local folder's small files that transformers reads back silently when damaged (a cut generation_config.json
# falls back to one made from config.json: other end tokens; a cut chat template loads and fails at the first
# conversation): each is parsed before the folder is loaded.
MODEL_FILES = ("generation_config.json",)
PROCESSOR_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


_GENERATION_TAG = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def refuse_damaged_files(path: str, names: tuple[str, ...]) -> None:
    """ModelError naming the first of the files `names` in the local folder `path` that does not parse (JSON, or a
    Jinja chat template); a hub id or a missing file is left to transformers."""
    import jinja2

    folder = Path(path)
    for name in names if folder.is_dir() else ():
        file = folder / name
        if not file.is_file():
            continue
        try:
            text = file.read_text(encoding="utf-8")
            if file.suffix == ".json":
                json.loads(text)
            else:  # as transformers compiles it: loop controls, and its own {% generation %} tags (dropped here)
                jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(_GENERATION_TAG.sub("", text))
        except (ValueError, jinja2.TemplateSyntaxError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ModelError(
                f"cannot load '{path}': {file} is damaged ({str(e).splitlines()[0]}) ({DAMAGED})"
            ) from None


def model_outline(path: str, trust_remote_code: bool = False) -> Parts:
    """The parts of the model in `path` (family, hidden size, blocks, head rows) as its config builds them on the
    meta device: every check that needs the architecture, before any weight is read."""
    return model_parts(load_model(path, torch.float32, trust_remote_code, empty=True))


def load_model(
    path: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    empty: bool = False,
    quantization: str = "",
    spread: dict | None = None,
    offload: str = "",
) -> nn.Module:
    """The model in `path`; with `empty`, its architecture only, on the meta device (no weights read or allocated);
    with `quantization` (a `QUANTIZATIONS` name), its weights quantized as they load; with `spread` (a
    teacher_max_memory, {} for every device), placed for big-model inference: accelerate's `device_map="auto"`
    fills the GPUs, then the CPU, then the disk (the folder `offload`), and moves activations between them."""
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForImageTextToText

    if not empty:
        refuse_damaged_files(path, MODEL_FILES)
    try:
        if empty:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                return AutoModelForImageTextToText.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        extra = {"quantization_config": quantization_config(quantization)} if quantization else {}
        if spread is not None:  # a copy: accelerate converts the sizes in place
            extra |= {"device_map": "auto", "max_memory": dict(spread) or None, "offload_folder": offload or None}
        return AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as e:
        fix = f" ({DAMAGED})" if Path(path).is_dir() else ""
        raise ModelError(f"cannot load a vision-language model from '{path}': {str(e).splitlines()[0]}{fix}") from None
    except SafetensorError as e:  # a weight file cut short or overwritten
        raise ModelError(
            f"cannot load the weights of '{path}': {_damaged_weights(Path(path), e)} ({DAMAGED})"
        ) from None
    except RuntimeError as e:  # the checkpoint's tensors do not fit the model transformers built
        if "Error(s) in loading state_dict" not in str(e):
            raise
        from transformers.integrations import is_deepspeed_zero3_enabled

        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
        fix = "check that the folder holds one consistent checkpoint"
        if is_deepspeed_zero3_enabled():  # huggingface/transformers#43257: MoE expert conversion skipped under ZeRO-3
            fix = "transformers does not convert MoE expert weights when loading under ZeRO-3: launch with fsdp2.yaml"
        raise ModelError(f"cannot load the weights of '{path}': {detail} ({fix})") from None


def _damaged_weights(folder: Path, error: Exception) -> str:
    """Which of the folder's safetensors files `error` (transformers' load of them) comes from, and why: the first that
    safetensors cannot open (header cut short or garbled, data shorter than the header says)."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"{file} is damaged ({e})"
    return f"a weight file is damaged ({error})"


# teacher_quantization: (backend package, where it runs, weight bytes per parameter, how transformers is told)
QUANTIZATIONS = {
    "int8": ("torchao", "cpu or gpu", 1.0, "torchao int8 weight-only"),
    "int4": ("torchao", "gpu", 0.5, "torchao int4 weight-only"),
    "nf4": ("bitsandbytes", "gpu", 0.5, "bitsandbytes 4-bit NF4"),
    "bnb8": ("bitsandbytes", "gpu", 1.0, "bitsandbytes LLM.int8()"),
    "fp8": ("transformers", "gpu", 1.0, "transformers fine-grained FP8 (Hopper and newer)"),
}


def quantization_config(name: str):
    """The transformers quantization config of `teacher_quantization=name`; ModelError when its backend is missing
    or cannot run on this machine."""
    if name not in QUANTIZATIONS:
        raise ModelError(f"teacher_quantization={name!r} is not one of {', '.join(QUANTIZATIONS)} (or empty: none)")
    package, where, _, _ = QUANTIZATIONS[name]
    if where == "gpu" and not torch.cuda.is_available():
        raise ModelError(f"teacher_quantization={name} runs on CUDA GPUs only; on this machine use int8 (torchao)")
    if package != "transformers" and importlib.util.find_spec(package) is None:
        raise ModelError(f"teacher_quantization={name} needs {package}: pip install {package}")
    from transformers import BitsAndBytesConfig, FineGrainedFP8Config, TorchAoConfig

    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    if name == "int4":
        from torchao.quantization import Int4WeightOnlyConfig

        return TorchAoConfig(quant_type=Int4WeightOnlyConfig())
    if name == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    if name == "bnb8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return FineGrainedFP8Config()


# The ways out named when a teacher cannot fit, by where it runs (`check_fits`'s `fixes`)
QUANTIZE = "quantize it (teacher_quantization=int8, nf4 or fp8)"
SERVE = "serve it (data.answers=server, docs/SERVING.md)"
SHARD = "shard it (launch with configs/accelerate/fsdp2.yaml or zero3.yaml on more devices)"
FIXES = f"{SHARD}, {QUANTIZE}, or {SERVE}"


def check_fits(path: str, dtype: torch.dtype, device: torch.device, quantization: str = "", share: int = 1,
               trust_remote_code: bool = False, what: str = "teacher", memory: dict | None = None,
               fixes: str = FIXES) -> None:  # fmt: skip
    """Stop, before any weight is read, a model whose weights cannot fit the free memory of `device` (its `share`:
    1/share of the weights when the launch shards it) or, spread by teacher_device_map=auto, the sum of `memory`
    ({device: bytes}, `spread_memory`), estimated from its config (parameters x bytes per weight, plus 10 % for
    buffers and activations), naming `fixes`: the options that make it fit."""
    model = load_model(path, dtype, trust_remote_code, empty=True)
    parameters = sum(p.numel() for p in model.parameters())
    per_weight = QUANTIZATIONS[quantization][2] if quantization else torch.finfo(dtype).bits / 8
    needed = parameters * per_weight * 1.1 / share
    free = _free_memory(device) if memory is None else sum(memory.values())
    if needed <= free:
        return
    gib = 1 << 30
    how = f"{QUANTIZATIONS[quantization][3]} weights" if quantization else f"{str(dtype).removeprefix('torch.')}"
    room = f"{device} has {free / gib:.1f} GiB free"
    if memory is not None:
        shown = ", ".join(f"{name}: {size / gib:.1f}" for name, size in memory.items())
        room = f"teacher_device_map=auto has {free / gib:.1f} GiB on this machine ({shown} GiB)"
    raise ModelError(
        f"the {what} '{path}' ({parameters / 1e9:.1f}B parameters, {how}) needs about {needed / gib:.1f} GiB "
        f"{'per process ' if share > 1 else ''}but {room}: {fixes}"
    )


def spread_memory(max_memory: dict) -> dict:
    """{device: bytes} that teacher_device_map=auto may fill, in accelerate's order (GPUs, cpu, disk): the devices
    named in `max_memory` (teacher_max_memory), each at most its free memory and the disk as given; empty: every
    GPU's free memory and the CPU's available memory, as accelerate counts them."""
    from accelerate.utils import get_max_memory

    free = get_max_memory()
    if not max_memory:
        return free
    asked = get_max_memory(dict(max_memory))  # sizes in bytes
    missing = [device for device in asked if device != "disk" and device not in free]
    if missing:
        raise ModelError(
            f"teacher_max_memory names device {missing[0]}, which this machine does not have (it has "
            f"{', '.join(map(str, free))})"
        )
    return {device: size if device == "disk" else min(size, free[device]) for device, size in asked.items()}


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    import psutil

    return psutil.virtual_memory().available


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def add_lora(
    model: nn.Module,
    parts: Parts,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | None = None,
    experts: bool = False,
):
    """Wrap `model` with LoRA adapters on the language model only (never the vision tower): on its nn.Linear layers
    named in `target_modules` (None: the family's row, `Parts.lora_targets`) and, with `experts`, on its MoE expert
    weights (3-D parameters, through peft's `target_parameters`; docs/CONFIG.md#lora-and-moe-experts)."""
    from peft import LoraConfig, get_peft_model

    prefix = f"{parts.language_model_path}."
    present = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)
    }
    names = list(parts.lora_targets) if target_modules is None else list(target_modules)
    unmatched = [n for n in names if n not in present]
    if target_modules is None:  # the row lists every kind of block the family may have (e.g. dense MLPs in a MoE)
        names = [n for n in names if n in present]
    if (unmatched and target_modules is not None) or not names:
        raise ModelError(
            f"lora.target_modules: no linear layer named {unmatched or names} in the {parts.family} language model "
            f"({parts.language_model_path}); its linear layers are {', '.join(sorted(present))}"
        )
    extra = {}
    if experts:
        if not parts.experts:
            raise ModelError(
                f"lora.experts=true, but model type '{parts.family}' has no MoE expert weights in vlsi's family "
                "table (vlsi.models.family.FAMILIES); set lora.experts=false"
            )
        if dropout:
            raise ModelError("lora.experts=true needs lora.dropout=0 (peft cannot drop out inside expert weights)")
        if "target_parameters" not in inspect.signature(LoraConfig).parameters:
            raise ModelError("lora.experts=true needs peft >= 0.17 (LoraConfig.target_parameters); upgrade peft")
        extra["target_parameters"] = list(parts.experts)
    pattern = rf"{re.escape(parts.language_model_path)}\..*\.({'|'.join(re.escape(m) for m in names)})"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none", **extra)
    return get_peft_model(model, config)
