"""`vlsi eval`: answer a benchmark with a model (batched greedy decoding), then score the answers.

    vlsi eval --model OUT/model --benchmark mmbench_en --data MMBench_DEV_EN.tsv --output eval/mmbench
    vlsi eval --model OUT/model --benchmark custom --data heldout.json --image-root imgs --output eval/heldout
    vlsi eval --model OUT/model --benchmark ChartQA_TEST --data ChartQA_TEST.tsv --output eval/chartqa --rules lenient

Writes OUTPUT/predictions.jsonl (the input rows, without base64 images, plus `prediction`; one line per row as
batches finish), OUTPUT/scores.json and OUTPUT/eval.json (the settings). Rerunning with the same settings
resumes: rows already in predictions.jsonl are skipped, and a finished run is only rescored (also under other
--rules, which change only the scoring).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from vlsi.data import read_dataset
from vlsi.models.loading import ModelError, load_model, load_processor

from .benchmarks import JUDGE_OPTIONAL, JUDGED, resolve_benchmark
from .common import RULES, VLMEVALKIT
from .custom import CUSTOM, score_custom
from .generate import EvalError, Item, append_answers, benchmark_items, custom_item, read_benchmark
from .io import read_predictions
from .judge import JudgeFn
from .prompts import builder_used, prompt_builder, wrapper
from .score import score_file

logger = logging.getLogger(__name__)

PREDICTIONS, SCORES, SETTINGS = "predictions.jsonl", "scores.json", "eval.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Settings that change the predictions: resuming under different ones would mix two runs in one file.
RESUME_KEYS = ("model", "benchmark", "data", "image_root", "max_new_tokens")


def evaluate(
    model: str,
    benchmark: str,
    data: str | Path,
    output: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    judge: JudgeFn | None = None,
    rules: str = VLMEVALKIT,
) -> dict:
    """Generate the missing predictions into `output`, score the whole file under `rules` and return the scores.

    Raises EvalError (or ScoreError, DataError, ModelError) with a one-line message on bad input.
    """
    if rules not in RULES:
        raise EvalError(f"unknown rules {rules!r}; use {' or '.join(RULES)}")
    name = CUSTOM if benchmark.strip().lower() == CUSTOM else resolve_benchmark(benchmark)
    data = Path(data)
    root = Path(image_root) if image_root is not None else data.parent
    out = Path(output)
    device, dtype = _device_and_dtype(device, dtype)
    model_type = _model_type(model)
    vlmevalkit_wrapper, wrapper_tokens, _ = wrapper(model_type)
    settings = {
        "model": _model_id(model),
        "benchmark": name,
        "data": str(data.resolve()),
        "image_root": str(root.resolve()),
        "max_new_tokens": max_new_tokens or wrapper_tokens,
        "model_type": model_type,
        "vlmevalkit_wrapper": vlmevalkit_wrapper,
        "prompt_builder": "conversation" if name == CUSTOM else builder_used(name, prompt_builder(model_type)),
    }

    # Read and check everything (data, images, earlier output) before writing anything or loading the model.
    if name == CUSTOM:
        items = [custom_item(sample, data) for sample in read_dataset(data, root)[0]]
        indices = [item.index for item in items]
    else:
        rows = read_benchmark(data, name)
        indices = [row["index"] for row in rows]
    if (out / PREDICTIONS).is_file():  # settings only bind once there are predictions to keep consistent
        _check_settings(out / SETTINGS, settings)
    finished = _finished_lines(out / PREDICTIONS, set(indices))
    if name == CUSTOM:
        pending = [item for item in items if item.index not in finished]
    else:  # images are decoded (and checked) only for the rows still to answer
        builder = prompt_builder(model_type)
        pending = benchmark_items(name, rows, root, data, builder, skip=frozenset(finished))

    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
    _rewrite_if_truncated(out / PREDICTIONS, list(finished.values()))
    if finished:
        logger.info("resuming: %d of %d rows already in %s", len(finished), len(indices), out / PREDICTIONS)
    if pending:
        _generate(pending, len(indices), len(finished), out / PREDICTIONS, settings, batch_size, device, dtype)
    scores = _score(name, out / PREDICTIONS, judge, rules)
    (out / SCORES).write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n")
    return scores


def _generate(
    pending: list[Item],
    total: int,
    finished: int,
    path: Path,
    settings: dict,
    batch_size: int,
    device: str,
    dtype: str,
) -> None:
    processor = load_processor(settings["model"])
    model = load_model(settings["model"], DTYPES[dtype]).to(device).eval()
    bar = tqdm(total=total, initial=finished, desc=settings["benchmark"], unit="row", mininterval=1.0)
    with bar:
        append_answers(
            model,
            processor,
            pending,
            settings["max_new_tokens"],
            batch_size,
            path,
            lambda item, answer: {**item.row, "prediction": answer},
            bar,
            lambda saved: EvalError(
                f"out of memory on {device} at --batch-size {batch_size}; lower it and rerun to resume "
                f"({finished + saved} rows are saved)"
            ),
        )


def _device_and_dtype(device: str, dtype: str) -> tuple[str, str]:
    """ "auto" resolved: the GPU when there is one, bf16 on a GPU that supports it, else fp32."""
    if dtype != "auto" and dtype not in DTYPES:
        raise EvalError(f"--dtype {dtype!r} is not a dtype; use auto, {', '.join(DTYPES)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    try:
        torch.device(device)
    except RuntimeError:
        raise EvalError(f"--device {device!r} is not a device; use cuda, cuda:N or cpu") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    return device, dtype


def _score(name: str, predictions: Path, judge: JudgeFn | None, rules: str) -> dict:
    if name == CUSTOM:
        return score_custom(read_predictions(predictions, ("answer",), CUSTOM))
    if name in JUDGED and judge is None:
        note = (
            f"{name} is scored by an LLM judge: rerun with --judge-url and --judge-model to score these predictions "
            f"(they are kept), or run `vlsi score --benchmark {name} --predictions {predictions} --judge-url ...`"
        )
        print(f"vlsi eval: {note}", file=sys.stderr)
        return {"benchmark": name, "rules": rules, "score": None, "scored": False, "note": note}
    return score_file(name, predictions, judge if name in JUDGED | JUDGE_OPTIONAL else None, rules)


def _model_type(model: str) -> str:
    """The model's `model_type` (its config.json), which picks VLMEvalKit's prompt builder and wrapper."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a vision-language model from '{model}': {str(e).splitlines()[0]}") from None


def _model_id(model: str) -> str:
    """A local model directory as an absolute path (so a rerun from elsewhere resumes); a hub id unchanged."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _check_settings(path: Path, settings: dict) -> None:
    """Resuming is only allowed under the settings that wrote the predictions (RESUME_KEYS)."""
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    changed = [key for key in RESUME_KEYS if previous.get(key) != settings[key]]
    if changed:
        key = changed[0]
        raise EvalError(
            f"{path.parent} holds a run with {key} = {previous.get(key)!r}, not {settings[key]!r}; rerun with "
            "the same settings to resume it, or pass another --output"
        )


def _finished_lines(path: Path, indices: set[str]) -> dict[str, str]:
    """{index: line} of the rows already in predictions.jsonl. A kill can leave a partial last line: it is left
    out (and its row generated again). Any other unreadable line, or a row not in the data, is an error."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    done: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "index" not in record or "prediction" not in record:
            if number == len(lines):
                logger.warning("%s: dropping the unfinished last line (%d characters)", path, len(line))
                break
            raise EvalError(f"{path} line {number}: not a prediction row; delete the file to start the run over")
        index = str(record["index"])
        if index not in indices:
            raise EvalError(f"{path} line {number}: index {index} is not in --data; pass another --output")
        if index in done:
            raise EvalError(f"{path} line {number}: index {index} appears twice; delete one of the lines")
        done[index] = line if line.endswith("\n") else line + "\n"
    return done


def _rewrite_if_truncated(path: Path, kept: list[str]) -> None:
    """Replace predictions.jsonl by its `kept` lines when it holds anything else (a partial last line)."""
    if not path.is_file() or path.read_text(encoding="utf-8") == "".join(kept):
        return
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text("".join(kept), encoding="utf-8")
    partial.replace(path)
