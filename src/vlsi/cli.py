"""The `vlsi` command: one subcommand per function.

vlsi train --teacher T --student S --data train.json --image-root imgs --output OUT [--config F.yaml] [k=v ...]
vlsi verbalize --model M --data train.json --output OUT [k=v ...]
vlsi cache --teacher T --data train.json --output C teacher_verbalizers=DIR [cache.top_k=64] [k=v ...]
vlsi sft --model M --data train.json --output OUT [--teacher T data.answers=teacher] [k=v ...]
vlsi eval --model M --benchmark NAME --data FILE --output OUT [--rules lenient] [--judge-url U --judge-model J]
vlsi score --benchmark NAME --predictions FILE [--rules lenient] [--judge-url U --judge-model J]
vlsi explain --model M --verbalizers V --image IMG --question TEXT [--teacher T --teacher-verbalizers TV]
vlsi data check --data train.jsonl [--data more.parquet ...] [--student M] [--json] [k=v ...]
vlsi demo --output DIR [--fast] [k=v ...]
vlsi ablate --output DIR [--fast] [k=v ...]
vlsi study --output DIR [--fast] [k=v ...]

Every command line is parsed here: a subcommand's options are the parameters of one function (`cmd_*` below,
`vlsi.demo.demo_command`, ...), which `main` calls with them; bad input comes back as one line (exit 2). Building
the parser imports neither torch nor transformers: the functions import what they need.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib
import json
import logging
import os
import sys
from pathlib import Path

SETTINGS_HELP = (
    "settings as key=value, anywhere on the line; they override the config file: e.g. interact.max_steps=200 "
    "interact.match.strategy=bottom_k verbalizer.student_layers=[2,6,10]. Unknown keys are errors; "
    "see configs/ and docs/CONFIG.md for every key"
)
SETTINGS_MOST_CHANGED = """settings most runs change (every key: docs/CONFIG.md):
  verbalize.max_steps, interact.max_steps, sft.max_steps     optimizer steps of each stage
  interact.lr, interact.batch_size, interact.grad_accum      (and the same for verbalize., sft.)
  interact.lora.enabled=false, sft.lora.r=64                 full fine-tuning, or the LoRA rank
  verbalizer.teacher_layers=[...], verbalizer.student_layers=[...]   target blocks (default: every 4th from 2)
  teacher_verbalizers=DIR                                    reuse the teacher's verbalizers (vlsi verbalize)
  teacher_cache=DIR                                          train from the teacher's cached targets (vlsi cache)
  data.answers=teacher                                       the teacher answers records without an answer
  data.answers=server data.answer_server=URL data.answer_model=NAME   a served teacher answers them instead
      [data.answer_key_env=VAR: the variable holding its API key; unset: a dummy key]   (docs/SERVING.md)
  precision=bf16|fp32, seed=N, checkpoint.every=N
"""
VERBALIZE_MOST_CHANGED = """settings most runs change (every key: docs/CONFIG.md):
  verbalize.max_steps, verbalize.lr, verbalize.batch_size, verbalize.grad_accum
  verbalizer.student_layers=[...] (verbalizer.teacher_layers=[...] with --who teacher)   target blocks
  verbalizer.residual=true                                   a residual verb-FFN
  precision=bf16|fp32, seed=N, checkpoint.every=N, chunk_size=N
"""
SFT_MOST_CHANGED = """settings most runs change (every key: docs/CONFIG.md):
  sft.max_steps, sft.lr, sft.batch_size, sft.grad_accum
  sft.lora.enabled=false, sft.lora.r=64                      full fine-tuning, or the LoRA rank
  data.answers=teacher (with --teacher)                      the teacher answers records without an answer
  data.answers=server data.answer_server=URL data.answer_model=NAME   a served teacher answers them instead
      [data.answer_key_env=VAR: the variable holding its API key; unset: a dummy key]   (docs/SERVING.md)
  precision=bf16|fp32, seed=N, checkpoint.every=N
"""
CACHE_MOST_CHANGED = """settings most runs change (every key: docs/CONFIG.md):
  cache.top_k=64                                             tokens kept per position and layer (0: all)
  cache.dtype=bfloat16, cache.shard_size=N, cache.batch_size=N
  data.max_length=N, precision=bf16|fp32
"""
DATA_HELP = (
    "training data: a JSON / JSONL file of records (LLaVA, ShareGPT, OpenAI / TRL shapes), a parquet or arrow file, "
    "a folder of shards or written by save_to_disk, a hub id as ID[:CONFIG][@SPLIT] (e.g. "
    "HuggingFaceM4/the_cauldron:ai2d@train), or a mixture file (.yaml); repeat --data to mix sources (docs/CONFIG.md)"
)
IMAGE_ROOT_HELP = "folder image paths are relative to (default: the data file's folder)"
MODEL = dict(required=True, help="model: a local directory or a hub id")
TEACHER_HELP = "teacher model: a local directory or a hub id"


# ---------------------------------------------------------------- train, verbalize, sft, cache


def _config(
    data: list[str] | None, image_root: str | None, output: str, config: str | None, settings: list[str], **top
):
    """The configuration of a command with --data (given once: data.path; several times: a mixture)."""
    from .config import load_config

    cfg = load_config(config, settings, output=output, **top)
    if data:
        cfg.data.path = data[0] if len(data) == 1 else data
    if image_root is not None:
        cfg.data.image_root = image_root
    if not cfg.data.path:
        raise ValueError("--data (or data.path in the config) is required")
    return cfg


def cmd_train(teacher: str | None, student: str | None, **stage) -> None:
    """`vlsi train`; `stage`: --data, --image-root, --output, --config and the key=value settings."""
    from .distributed import process_state
    from .pipeline import run_train

    final = run_train(_config(**stage, teacher=teacher, student=student))
    if process_state().is_main_process:
        print(f"student written to {final}")


def _one_stage(stage: dict, folder: str, run, model: str, **top) -> None:
    """`vlsi verbalize` / `vlsi sft`: one stage on `model`; writes OUT/config.yaml, OUT/inputs.json,
    OUT/metrics.jsonl, OUT/<folder>. `run(cfg, output, metrics, samples)` trains; a finished one is reused. OUT made
    with other settings or inputs is refused, as `vlsi train` refuses it."""
    from .config import save_config
    from .distributed import process_state
    from .preflight import (
        data_fingerprint,
        refuse_changed_inputs,
        refuse_other_settings,
        refuse_unused_teacher,
        run_inputs,
    )
    from .runfolder import lock
    from .stages.loop import MetricsLog
    from .stages.output import reuse
    from .stages.samples import load_samples

    cfg = _config(**stage, student=model, **top)
    refuse_unused_teacher(cfg, top.get("teacher"))
    out, target = Path(cfg.output), Path(cfg.output) / folder
    state = process_state()
    with lock(out, enabled=state.is_main_process):  # held by the main process for the run
        refuse_other_settings(cfg, out)
        state.wait_for_everyone()  # every process has read OUT/config.yaml before the main process writes it
        # Samples first: with data.answers=teacher the teacher answers (and leaves memory) before the model loads.
        samples = load_samples(cfg)
        data = data_fingerprint(cfg, samples, state.is_main_process)
        refuse_changed_inputs(out, run_inputs(cfg, data, {"model": model}), state.is_main_process)
        if state.is_main_process:
            save_config(cfg, out / "config.yaml")
        state.wait_for_everyone()
        if not reuse(target, folder):  # written whole, its checksums beside it (`stages.output.write_output`)
            run(cfg, target, MetricsLog(out / "metrics.jsonl"), samples)
    if state.is_main_process:
        print(f"{folder} written to {target}")


def cmd_verbalize(model: str, who: str, **stage) -> None:
    from .stages.verbalize import verbalize

    _one_stage(
        stage,
        "verbalizers",
        lambda cfg, out, metrics, samples: verbalize(cfg, model, who, out, metrics, samples),
        model,
    )


def cmd_sft(model: str, teacher: str | None, **stage) -> None:
    from .card import student_card
    from .stages.sft import sft

    def run(cfg, out, metrics, samples):
        card = student_card(cfg, "sft", json.loads((Path(cfg.output) / "inputs.json").read_text())["data"])
        return sft(cfg, model, out, metrics, samples, card)

    _one_stage(stage, "model", run, model, teacher=teacher)


def cmd_cache(teacher: str, **stage) -> None:
    from .cache import build_cache
    from .config import save_config
    from .distributed import process_state
    from .preflight import refuse_missing_teacher_verbalizers
    from .runfolder import lock
    from .stages.samples import load_samples

    cfg = _config(**stage, teacher=teacher)
    refuse_missing_teacher_verbalizers(cfg)
    out = Path(cfg.output)
    main = process_state().is_main_process
    with lock(out, enabled=main):  # held by the main process for the build
        if main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        build_cache(cfg, out, cfg.teacher_verbalizers, load_samples(cfg))
    if process_state().is_main_process:
        print(f"teacher cache written to {out}; train from it with teacher_cache={out}")


def cmd_data_check(student: str | None, json_output: bool, **options) -> None:
    """`vlsi data check`: print the report of `vlsi.data.report.check_data` (as one JSON object with --json)."""
    from .data.report import check_data, format_report
    from .models.loading import load_processor

    cfg = _config(**options, output="")
    processor = load_processor(student, cfg.trust_remote_code) if student else None
    report = check_data(cfg, student, processor)
    print(json.dumps(report, ensure_ascii=False) if json_output else format_report(report))


# ---------------------------------------------------------------- eval, score, explain


def cmd_eval(judge_url: str | None, judge_model: str | None, judge_key_env: str | None, **options) -> None:
    """`vlsi eval`: print the scores JSON; `options`: those of `vlsi.eval.evaluate` but `judge`."""
    from .eval.harness import evaluate
    from .eval.score import judge_from_options

    options["columns"] = dict(options["columns"] or [])  # --column KEY=COLUMN, repeated
    scores = evaluate(**options, judge=judge_from_options(judge_url, judge_model, judge_key_env))
    print(json.dumps(scores, indent=2, ensure_ascii=False))


def cmd_score(
    benchmark: str,
    predictions: str,
    rules: str,
    judge_url: str | None,
    judge_model: str | None,
    judge_key_env: str | None,
) -> None:
    """`vlsi score`: print the metrics JSON."""
    from .eval.score import judge_from_options, score_file

    judge = judge_from_options(judge_url, judge_model, judge_key_env)
    print(json.dumps(score_file(benchmark, predictions, judge, rules), indent=2, ensure_ascii=False))


def cmd_explain(**options) -> None:
    """`vlsi explain`: print the table; `options`: those of `vlsi.explain.explain_command`."""
    from .explain import explain_command

    print(explain_command(**options))


# ---------------------------------------------------------------- the parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _column(text: str) -> tuple[str, str]:
    key, sep, column = text.partition("=")
    if not (sep and key and column):
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=COLUMN (e.g. messages=conversation)")
    return key, column


def _output(parser: argparse.ArgumentParser, help: str, default: str | None = None) -> None:
    """--output: required, unless the command has a default folder."""
    parser.add_argument("--output", required=default is None, default=default, help=help)


def _settings(parser: argparse.ArgumentParser, help: str) -> argparse.Action:
    """The key=value settings; `parse_args` takes them anywhere on the line."""
    return parser.add_argument("settings", nargs="*", metavar="key=value", help=help)


def _command(sub, name: str, func, **kwargs) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, whose options `main` passes to `func` as keyword arguments."""
    parser = sub.add_parser(name, **kwargs)
    parser.set_defaults(func=func)
    return parser


def _stage(sub, name: str, func, options: dict[str, dict], **kwargs) -> None:
    """A train / verbalize / sft / cache parser: `options` (flag -> add_argument keywords), then --data, --image-root,
    --output, --config and the key=value settings."""
    parser = _command(sub, name, func, **kwargs)
    for flag, keywords in options.items():
        parser.add_argument(flag, **keywords)
    _data(parser)
    _output(parser, "output folder; re-running with the same folder reuses finished stages")
    parser.add_argument("--config", help="YAML file of settings (e.g. configs/qwen2vl-72b-to-7b.yaml)")
    _settings(parser, SETTINGS_HELP)


def _data(parser: argparse.ArgumentParser) -> None:
    """--data (repeatable: a mixture) and --image-root."""
    parser.add_argument("--data", action="append", help=DATA_HELP)
    parser.add_argument("--image-root", help=IMAGE_ROOT_HELP)


def _scoring(parser: argparse.ArgumentParser) -> None:
    """--rules and the judge (read by `vlsi.eval.judge.make_judge`): `vlsi score` and `vlsi eval`."""
    from .eval.common import RULES, VLMEVALKIT
    from .eval.judge import DEFAULT_KEY_ENV

    parser.add_argument(
        "--rules",
        choices=RULES,
        default=VLMEVALKIT,
        help="which rules give `score`: vlmevalkit (default) is VLMEvalKit's own exact-matching evaluation, quirks "
        "included, for numbers comparable with the OpenVLM leaderboard; lenient also reads answers VLMEvalKit misses "
        "(units, 'The answer is (E)', Chinese letters, ...). The output carries both, as score_vlmevalkit and "
        "score_lenient",
    )
    parser.add_argument(
        "--judge-url",
        help="OpenAI-compatible endpoint for the LLM judge, e.g. https://api.openai.com/v1 or "
        "http://127.0.0.1:8000/v1; needed to score mm_vet, mm_vet_v2 and llava_wilder (`vlsi eval` generates "
        "their answers without it), optional for mathvista (answer extraction by the judge)",
    )
    parser.add_argument("--judge-model", help="judge model name sent to the endpoint, e.g. gpt-4-turbo")
    parser.add_argument(
        "--judge-key-env",
        help=f"name of the environment variable holding the judge's API key (default {DEFAULT_KEY_ENV}; "
        "unset means no key is sent); the key itself is never printed",
    )


class _FieldNames:
    """The field names of settings dataclass `name` in `module`, read when help is printed: building the parser
    must not import the module, which imports torch."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __str__(self) -> str:
        settings = getattr(importlib.import_module(self.module, __package__), self.name)
        return ", ".join(field.name for field in dataclasses.fields(settings))


def _experiment(sub, name: str, func, settings: _FieldNames, fast_help: str, **kwargs) -> argparse.ArgumentParser:
    """A demo / ablate / study parser: --output, --fast and the experiment's key=value settings."""
    parser = _command(sub, name, func, **kwargs)
    _output(parser, f"output folder (default: ./vlsi-{name})", default=f"vlsi-{name}")
    parser.add_argument("--fast", action="store_true", help=fast_help)
    # argparse fills "%(fields)s" from the action's attributes when it prints the help, not before.
    _settings(parser, f"{name} settings: %(fields)s").fields = settings
    return parser


def build_parser() -> argparse.ArgumentParser:
    from .demo import ablate_command, demo_command, study_command
    from .eval.benchmarks import SCORERS

    parser = argparse.ArgumentParser(
        prog="vlsi",
        description="VLsI: distil a large vision-language model into a small one, layer by layer, through verbalizers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _stage(
        sub,
        "train",
        cmd_train,
        {"--teacher": dict(help=TEACHER_HELP), "--student": dict(help="student model (same tokenizer as the teacher)")},
        help="verbalize -> interact -> SFT: the whole method, one command",
        description="Distil TEACHER into STUDENT with VLsI. Stages already finished in --output are reused.",
        epilog=SETTINGS_MOST_CHANGED,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    who = dict(
        choices=["teacher", "student"],
        default="student",
        help="which target-layer setting to use (verbalizer.teacher_layers or student_layers)",
    )
    _stage(
        sub,
        "verbalize",
        cmd_verbalize,
        {"--model": MODEL, "--who": who},
        help="train verbalizers for one model (stage 1 alone)",
        description="Train a verb-FFN per target layer of MODEL (backbone frozen); writes OUTPUT/verbalizers.",
        epilog=VERBALIZE_MOST_CHANGED,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    answers = "with data.answers=teacher: the model that answers records ending with a user turn"
    _stage(
        sub,
        "sft",
        cmd_sft,
        {"--model": MODEL, "--teacher": dict(help=answers)},
        help="plain supervised fine-tuning of any supported VLM (stage 3 alone)",
        description="Fine-tune MODEL on the data (LoRA merged at the end); writes OUTPUT/model.",
        epilog=SFT_MOST_CHANGED,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _stage(
        sub,
        "cache",
        cmd_cache,
        {"--teacher": dict(required=True, help=TEACHER_HELP)},
        help="run the teacher once and cache its verbalized targets, for training students without it",
        description="Cache the top-k of every teacher target layer's verbalized distribution and of its output, per "
        "response token (docs/CACHE.md); `vlsi train ... teacher_cache=OUTPUT` then never loads the teacher.",
        epilog=CACHE_MOST_CHANGED,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    p = sub.add_parser(
        "data",
        help="look at training data before a GPU job: `vlsi data check`",
        description="Commands on training data; see `vlsi data check --help`.",
    )
    actions = p.add_subparsers(required=True, metavar="ACTION")
    p = _command(
        actions,
        "check",
        cmd_data_check,
        help="records, images, problems and token counts of the data, per source and in total",
        description=(
            "Check the data as `vlsi train` does before its first step (the same check and, with --student, the same "
            "length scan): per source and in total, the records, their images, the records with problems (the first "
            "ones listed, by source and record) and, given a model's processor, text and image token counts (min / "
            "median / p99 / max) and how many samples exceed data.max_length."
        ),
    )
    _data(p)
    p.add_argument("--student", help="a model (local directory or hub id) whose processor counts the tokens")
    p.add_argument("--json", dest="json_output", action="store_true", help="print one JSON object (for scripts)")
    p.add_argument("--config", help="YAML file of settings (data.* are read: data.max_length, data.columns, ...)")
    _settings(p, SETTINGS_HELP)

    p = _command(
        sub,
        "eval",
        cmd_eval,
        help="answer a benchmark with a model (batched greedy decoding) and score it",
        description=(
            "Generate answers to every row of a benchmark file with MODEL's processor, chat template and the "
            "benchmark's standard prompt; write OUTPUT/predictions.jsonl and OUTPUT/scores.json. A rerun with the "
            "same OUTPUT resumes where the last one stopped. See docs/EVALUATION.md."
        ),
    )
    p.add_argument("--model", **MODEL)
    p.add_argument(
        "--benchmark",
        required=True,
        help=f"benchmark name ({', '.join(sorted(SCORERS))}; aliases as for `vlsi score`), or `custom` for a "
        "held-out file in the training format (reference answer = last assistant turn)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="the benchmark's VLMEvalKit TSV (or JSONL with its fields; images base64 in `image` or files in "
        "`image_path`); for custom, what training reads: JSON / JSONL records, a parquet or arrow file, a folder of "
        "shards or of save_to_disk, a hub id ID[:CONFIG][@SPLIT]",
    )
    p.add_argument("--image-root", help=IMAGE_ROOT_HELP)
    p.add_argument(
        "--preset",
        choices=["auto", "trl", "cauldron", "onevision"],  # vlsi.data.sources.PRESETS
        default="auto",
        help="custom on a dataset: its columns, as data.preset (default auto: the columns named as record keys)",
    )
    p.add_argument(
        "--column",
        dest="columns",
        type=_column,
        action="append",
        metavar="KEY=COLUMN",
        help="custom on a dataset: the column of a record key, as data.columns.KEY=COLUMN (repeatable)",
    )
    _output(p, "output folder; rerunning with it resumes the run")
    p.add_argument("--batch-size", type=_positive, default=8, help="rows per generate call (default 8)")
    p.add_argument(
        "--max-new-tokens",
        type=_positive,
        help="answer length limit in tokens (default: VLMEvalKit's for the model's family, 2048 for Qwen2-VL); "
        'answers cut at it are marked "cut": true in predictions.jsonl and counted in scores.json',
    )
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],  # vlsi.eval.harness.DTYPES, which needs torch
        default="auto",
        help="weights' dtype (default: bf16 on a GPU that supports it, else fp32)",
    )
    p.add_argument(
        "--generation-config",
        choices=["vlmevalkit", "model"],  # vlsi.eval.harness.GENERATION_SOURCES, which needs torch
        default="vlmevalkit",
        help="decoding options: vlmevalkit (default) greedy with those VLMEvalKit's wrapper for the model's family "
        "passes, the model's generation_config.json not applied; model: greedy with the options of the model's "
        "generation_config.json (repetition_penalty, no_repeat_ngram_size, ...). eval.json records them",
    )
    _scoring(p)

    p = _command(
        sub,
        "score",
        cmd_score,
        help="score a predictions file on a benchmark (VLMEvalKit's rules) and print JSON metrics",
        description=(
            "Score predictions of any system on a benchmark and print one JSON object: `score` is the headline "
            "number as VLMEvalKit computes it (or, with --rules lenient, under the lenient rules), the other keys "
            "are details. See docs/EVALUATION.md for the file layout of each benchmark."
        ),
    )
    p.add_argument(
        "--benchmark",
        required=True,
        help=f"benchmark name, case-insensitive ({', '.join(sorted(SCORERS))}; VLMEvalKit's dataset names such as "
        "MMBench_DEV_EN, MathVista_MINI, CV-Bench-2D; aliases such as mmbench, mmvet), or custom for the "
        "predictions.jsonl of a `vlsi eval --benchmark custom` run",
    )
    p.add_argument(
        "--predictions",
        required=True,
        help="TSV or JSONL file with the benchmark's fields in VLMEvalKit's layout plus a `prediction` column",
    )
    _scoring(p)

    p = _command(
        sub,
        "explain",
        cmd_explain,
        help="print the answer each target layer gives through its verbalizer (teacher and student side by side)",
        description=(
            "Greedy-decode the answer to QUESTION about IMAGE through every target layer's verbalizer and through "
            "the final layer, and print a table. With --teacher, student and teacher layers are shown side by side, "
            "aligned by relative depth. See docs/EXPLAIN.md."
        ),
    )
    p.add_argument("--model", required=True, help="the (student) model: a local directory or a hub id")
    p.add_argument("--verbalizers", required=True, help="its verbalizers folder (e.g. OUT/verbalizers/student)")
    p.add_argument("--teacher", help="a teacher model to show beside it (needs --teacher-verbalizers)")
    p.add_argument("--teacher-verbalizers", help="the teacher's verbalizers folder (OUT/verbalizers/teacher)")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--question", required=True, help="question about the image")
    p.add_argument("--max-new-tokens", type=int, default=16, help="longest answer per layer (default 16)")

    p = _experiment(
        sub,
        "demo",
        demo_command,
        _FieldNames(".demo.experiment", "DemoSettings"),
        help="compare SFT only, SFT with the teacher's answers, final-layer KD and VLsI on CPU, in about 4 minutes",
        description=(
            "150 labelled questions and 2000 more that the shipped tiny Qwen2-VL teacher answers "
            "(data.answers=teacher); a smaller student learns from them four ways, from the same initialisation and "
            "on the same budget: (a) SFT on the labelled questions only; (b) SFT on the labelled and the teacher's "
            "answers; (c) KL to the teacher's output, then SFT; (d) VLsI: verbalize -> interact -> SFT. All are "
            "evaluated on a held-out test split, before and after their last SFT stage, compared pair by pair on "
            "the same questions; writes DIR/results.json and DIR/report.md. No network, no GPU. See docs/DEMO.md."
        ),
        fast_help="a tiny budget that finishes in seconds (CI smoke test)",
    )
    p.add_argument("--seed", type=int, help="seed of the students' training (default 0)")
    _experiment(
        sub,
        "ablate",
        ablate_command,
        _FieldNames(".demo.ablate", "AblateSettings"),
        help="the paper's ablations (matching, loss operations, SFT stage) at demo scale, 3 seeds, on CPU",
        description=(
            "Reproduce the paper's ablation tables on the demo's task and models: matching strategies (random, "
            "uniform, bottom-1/3, multinomial, + search range, + order, + adaptive temperature), intermediate / "
            "last-layer loss operations (CE, L2, KLD, none), and the SFT stage (VLsI with and without it, SFT "
            "alone). Every row from the same student initialisation and budget, several seeds; writes "
            "DIR/results.json and DIR/report.md (mean +- std per row, the paper's numbers beside them). "
            "Re-running the same command reuses finished runs. No network, no GPU. See docs/ABLATE.md."
        ),
        fast_help="a tiny budget and 2 seeds (CI smoke test)",
    )
    _experiment(
        sub,
        "study",
        study_command,
        _FieldNames(".demo.study", "StudySettings"),
        help="should I distil? accuracy vs labelled questions for SFT only, KD and VLsI, 3 seeds, on CPU",
        description=(
            "On the demo's task and models: for several numbers of labelled training questions (sizes=...), train "
            "the demo's four students (SFT only, SFT with the teacher's answers, final-layer KD, VLsI; with a pool "
            "of questions the teacher answers), several seeds each; writes DIR/results.json, DIR/report.md and "
            "DIR/study.png (accuracy vs labelled questions, mean +- std). Re-running the same command reuses "
            "finished runs. No network, no GPU. See docs/STUDY.md."
        ),
        fast_help="two tiny sizes, one seed, a tiny budget (CI smoke test)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `key=value` settings accepted anywhere on it (argparse takes only the first run of
    them as the positional list; the later ones come back unrecognised and are appended in order, so the last
    value of a key still wins). Anything else unrecognised is an error, as usual."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    takes_settings = hasattr(args, "settings")
    stray = [x for x in extra if not takes_settings or x.startswith("-") or "=" not in x]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if takes_settings:
        args.settings.extend(extra)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = {key: value for key, value in vars(args).items() if key not in ("command", "func")}
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").addFilter(_no_cpu_notice)  # the same filter once, however often main runs
    try:
        args.func(**options)
        code = 0
    except BrokenPipeError:  # output piped into `head` and the like (an OSError: handled first)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except (ValueError, OSError, RuntimeError) as e:
        # Bad input (ConfigError, DataError, ModelError, ScoreError, ... are ValueErrors), a loss that stays
        # non-finite, a failed ablate / study run: one line. Any other RuntimeError is a bug: its traceback is wanted.
        if isinstance(e, RuntimeError) and not _run_failure(e):
            raise
        print(f"vlsi {args.command}: error: {str(e).strip()}", file=sys.stderr)
        code = 2
    end_process_group(code)
    return code


def _no_cpu_notice(record: logging.LogRecord) -> bool:
    """transformers imports DeepSpeed wherever it is installed (save_pretrained unwraps models through accelerate),
    also on runs that never launch it, and DeepSpeed then announces that it found no GPU: noise on a CPU."""
    return "Setting accelerator to CPU" not in record.getMessage()


def _run_failure(error: RuntimeError) -> bool:
    """NonFiniteLoss or ablate.RunFailed, imported only now: both modules import torch, which `vlsi score` never
    needs (a run that raised one has loaded them already)."""
    from .demo.ablate import RunFailed
    from .stages.loop import NonFiniteLoss

    return isinstance(error, (NonFiniteLoss, RunFailed))


def end_process_group(code: int) -> None:
    """Close the process group of a distributed launch, then leave the process without the interpreter's teardown.

    Objects of torch.distributed (gloo, FSDP2's device mesh) outlive `main` and are destroyed during interpreter
    finalization, after the atexit handlers, where a C++ destructor aborts the process now and then (SIGABRT,
    "terminate called without an active exception"; about 1 launch in 20 on two CPU processes under load, after all
    the work was done and written). A launched process therefore closes its group (after waiting for every process,
    when it succeeded: after an error another may never arrive), runs the atexit handlers, flushes its output and
    exits with `code` at once; its launcher needs nothing else from it. Outside a launch nothing happens."""
    dist = sys.modules.get("torch.distributed")  # never imported: no group to close (and torch stays unloaded)
    if dist is None or "LOCAL_RANK" not in os.environ or not (dist.is_available() and dist.is_initialized()):
        return
    if code == 0:
        dist.barrier()
    dist.destroy_process_group()
    atexit._run_exitfuncs()  # what a normal exit runs first (logging.shutdown, trackers' flushes)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
