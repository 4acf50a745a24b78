"""`vlsi eval`: answer a benchmark with a model (batched greedy decoding), then score the answers.

    vlsi eval --model OUT/model --benchmark mmbench_en --data MMBench_DEV_EN.tsv --output eval/mmbench
    vlsi eval --model OUT/model --benchmark custom --data heldout.json --image-root imgs --output eval/heldout
    vlsi eval --model OUT/model --benchmark ChartQA_TEST --data ChartQA_TEST.tsv --output eval/chartqa --rules lenient

Writes OUTPUT/predictions.jsonl (the input rows, without base64 images, plus `prediction` and `cut`; one line per
row as batches finish), OUTPUT/scores.json and OUTPUT/eval.json (what the predictions were made from: data and
model fingerprints, dtype, batch size, decoding options, prompt builder). Rerunning onto the same inputs resumes:
rows already in predictions.jsonl are skipped, and a finished run is only rescored (also under other --rules, which
change only the scoring); other inputs are refused (RESUME_KEYS).
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoConfig, GenerationConfig

from vlsi.card import add_eval_result
from vlsi.data.sources import Source, read_source
from vlsi.models.loading import ModelError, load_model, load_processor
from vlsi.runfolder import (
    check_settings,
    file_fingerprint,
    lock,
    model_fingerprint,
    samples_fingerprint,
    write_json,
    write_text,
)

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
GENERATION_SOURCES = ("vlmevalkit", "model")
# What the predictions depend on, as the refusal names it: resuming onto a file written under anything else would
# mix two runs. Paths are not here (a moved file with the same content resumes); the image root is, since images
# are read from it by path.
RESUME_KEYS = {
    "benchmark": "--benchmark",
    "data_fingerprint": "the contents of --data",
    "image_root": "--image-root",
    "model_fingerprint": "the model (its config or weight files)",
    "dtype": "--dtype",
    "batch_size": "--batch-size",
    "max_new_tokens": "--max-new-tokens",
    "generation_config": "--generation-config",
    "generation": "the decoding options",
    "prompt_builder": "the prompt builder",
}


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
    generation_config: str = "vlmevalkit",
    preset: str = "auto",
    columns: dict[str, str] | None = None,
) -> dict:
    """Generate the missing predictions into `output`, score the whole file under `rules` and return the scores.
    The custom benchmark's `data` is any source training reads (`vlsi.data.sources`: JSON / JSONL records, a parquet
    or arrow file, a folder of shards or of save_to_disk, a hub id), a dataset's columns mapped by `preset` and
    `columns` ({record key: column}) as data.preset and data.columns map them.

    Decoding is greedy with the options VLMEvalKit's wrapper for the model's family passes (`generation_config`
    "vlmevalkit"; the model's generation_config.json is then not applied) or with the model's own options ("model").
    Raises EvalError (or ScoreError, DataError, ModelError) with a one-line message on bad input.
    """
    if rules not in RULES:
        raise EvalError(f"unknown rules {rules!r}; use {' or '.join(RULES)}")
    if generation_config not in GENERATION_SOURCES:
        raise EvalError(f"--generation-config {generation_config!r}: use {' or '.join(GENERATION_SOURCES)}")
    name = CUSTOM if benchmark.strip().lower() == CUSTOM else resolve_benchmark(benchmark)
    if name != CUSTOM and (preset != "auto" or columns):
        raise EvalError(f"--preset and --column map a dataset's columns for --benchmark custom; {name} reads its TSV")
    data = Path(data)
    root = Path(image_root) if image_root is not None else data.parent
    out = Path(output)
    device, dtype = _device_and_dtype(device, dtype)

    # Read and check everything (data, images, earlier output) before writing anything or loading the model.
    if name == CUSTOM:
        source = Source(str(data), str(image_root or ""), preset, dict(columns or {}))
        samples = read_source(source)[0]  # a dataset's images stay encoded bytes until a batch is answered
        root = samples.root
        items = [custom_item(sample, data) for sample in samples]
        indices = [item.index for item in items]
        data_fingerprint = samples_fingerprint(samples)
    else:
        rows = read_benchmark(data, name)
        indices = [row["index"] for row in rows]
        data_fingerprint = file_fingerprint(data)
    model_type = _model_type(model)
    vlmevalkit_wrapper, wrapper_tokens, _ = wrapper(model_type)
    limit = max_new_tokens or wrapper_tokens
    generation = decoding_config(model, model_type, limit, generation_config)
    settings = {
        "model": _model_id(model),
        "model_fingerprint": model_fingerprint(_model_id(model)),
        "model_type": model_type,
        "benchmark": name,
        "data": str(data.resolve()) if data.exists() else str(data),  # a hub id is no path
        "data_fingerprint": data_fingerprint,
        "image_root": str(root.resolve()),
        "dtype": dtype,
        "batch_size": batch_size,
        "max_new_tokens": limit,
        "vlmevalkit_wrapper": vlmevalkit_wrapper,
        "generation_config": generation_config,
        # Every option that differs from transformers' defaults; the rest are those defaults.
        "generation": {k: v for k, v in generation.to_diff_dict().items() if k != "transformers_version"},
        "prompt_builder": "conversation" if name == CUSTOM else builder_used(name, prompt_builder(model_type)),
    }
    with lock(out):  # one run per output folder (a second stops naming this one)
        if (out / PREDICTIONS).is_file():  # settings only bind once there are predictions to keep consistent
            _check_settings(out / SETTINGS, settings)
        finished = _finished_lines(out / PREDICTIONS, set(indices))
        if name == CUSTOM:
            pending = [item for item in items if item.index not in finished]
        else:  # images are decoded (and checked) only for the rows still to answer
            pending = benchmark_items(name, rows, root, data, prompt_builder(model_type), skip=frozenset(finished))
        _rewrite_if_truncated(out / PREDICTIONS, list(finished.values()))
        if finished:
            logger.info("resuming: %d of %d rows already in %s", len(finished), len(indices), out / PREDICTIONS)
        if pending:
            _generate(pending, len(indices), len(finished), out, settings, generation, device)
        scores = _score(name, out / PREDICTIONS, judge, rules)
        scores["cut"] = sum(bool(json.loads(line).get("cut")) for line in _lines(out / PREDICTIONS) if line.strip())
        write_json(out / SCORES, scores, indent=2)
    if scores.get("score") is not None and Path(settings["model"]).is_dir():
        # A model vlsi exported carries a card (README.md, outside its fingerprint): the score joins its model-index.
        add_eval_result(settings["model"], name, scores["score"])
    return scores


def decoding_config(model: str, model_type: str, max_new_tokens: int, source: str) -> GenerationConfig:
    """Greedy decoding limited to `max_new_tokens`, with the model's stop, padding and start tokens, and either the
    options VLMEvalKit's wrapper for the family passes ("vlmevalkit": the model's generation_config.json options are
    not applied) or the model's own ("model"; its sampling options are dropped, decoding stays greedy)."""
    try:
        own = GenerationConfig.from_pretrained(model)
    except OSError:  # no generation_config.json: transformers derives one from config.json
        own = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model))
    tokens = {key: getattr(own, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if source == "model":
        config = copy.deepcopy(own)
        config.update(do_sample=False, max_new_tokens=max_new_tokens, temperature=None, top_p=None, top_k=None)
        return config
    _, _, options = wrapper(model_type)
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, **options, **tokens)


def _generate(
    pending: list[Item], total: int, finished: int, out: Path, settings: dict, generation, device: str
) -> None:
    processor = load_processor(settings["model"])
    model = load_model(settings["model"], DTYPES[settings["dtype"]]).to(device).eval()
    # generate() fills every option its call leaves unset from model.generation_config: replacing it is what keeps
    # the options of the model's generation_config.json out (--generation-config vlmevalkit).
    model.generation_config = generation
    write_json(out / SETTINGS, settings, indent=2)  # only for a model that loaded: the settings of a run that answers
    batch_size = settings["batch_size"]
    bar = tqdm(total=total, initial=finished, desc=settings["benchmark"], unit="row", mininterval=1.0)
    with bar:
        append_answers(
            model,
            processor,
            pending,
            settings["max_new_tokens"],
            batch_size,
            out / PREDICTIONS,
            lambda item, answer: {**item.row, "prediction": answer, "cut": answer.cut},
            bar,
            lambda saved: EvalError(
                f"out of memory on {device} at --batch-size {batch_size}; rerun with a new --output and a lower "
                f"--batch-size (batch size can change greedy answers, so this run resumes only at {batch_size}; "
                f"{finished + saved} rows are saved)"
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
    """Resuming is only allowed onto predictions written from the same inputs (RESUME_KEYS): one line naming what
    changed, and the fix."""
    fix = f"rerun with the same inputs to resume it, or pass another --output, or delete {path.parent} to start over"
    if not path.is_file():
        raise EvalError(f"{path.parent} holds {PREDICTIONS} but no {SETTINGS}, so what wrote it is unknown; {fix}")
    check_settings(path, settings, RESUME_KEYS, holds=f"{PREDICTIONS}", fix=fix)


def _lines(path: Path) -> list[str]:
    """The file's lines, each with its "\\n" (the last may lack it). Split on "\\n" alone: str.splitlines also
    splits on U+2028, U+0085, ... which a JSON writer leaves unescaped inside strings."""
    pieces = path.read_text(encoding="utf-8").split("\n")
    return [piece + "\n" for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


def _finished_lines(path: Path, indices: set[str]) -> dict[str, str]:
    """{index: line} of the rows already in predictions.jsonl. A kill can leave a partial last line: it is left
    out (and its row generated again). Any other unreadable line, or a row not in the data, is an error."""
    if not path.is_file():
        return {}
    lines = _lines(path)
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
    write_text(path, "".join(kept))
