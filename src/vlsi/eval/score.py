"""`vlsi score`: score a predictions file on one benchmark and print the metrics as one JSON object.

    vlsi score --benchmark MMBench_DEV_EN --predictions preds/MMBench_DEV_EN.tsv
    vlsi score --benchmark chartqa --predictions preds/ChartQA_TEST.tsv --rules lenient
    vlsi score --benchmark mm-vet --predictions preds/mmvet.jsonl \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4-turbo --judge-key-env OPENAI_API_KEY

`score` is VLMEvalKit's number by default (`--rules vlmevalkit`), the lenient rules' with `--rules lenient`; the
output always carries both, as `score_vlmevalkit` and `score_lenient`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .benchmarks import JUDGE_OPTIONAL, JUDGED, REQUIRED, SCORERS, resolve_benchmark
from .common import RULES, VLMEVALKIT
from .io import ScoreError, read_predictions
from .judge import Judge, JudgeFn, SharedReplies

DEFAULT_KEY_ENV = "OPENAI_API_KEY"


def score_file(benchmark: str, predictions: str | Path, judge: JudgeFn | None = None, rules: str = VLMEVALKIT) -> dict:
    """Metrics for a predictions file: {"benchmark", "rules", "score", "score_vlmevalkit", "score_lenient", ...}.

    `score` and the details follow `rules` ("vlmevalkit" or "lenient"); the two `score_*` keys hold both headlines.
    `judge` is used by MM-Vet, MM-Vet v2 and LLaVA-Wilder (required) and MathVista (answer extraction); both rules
    read the same replies. Raises ScoreError on bad input.
    """
    if rules not in RULES:
        raise ScoreError(f"unknown rules {rules!r}; use {' or '.join(RULES)}")
    name = resolve_benchmark(benchmark)
    if name in JUDGED and judge is None:
        raise ScoreError(
            f"{name} is scored by an LLM judge; pass --judge-url and --judge-model "
            f"(the API key is read from ${DEFAULT_KEY_ENV}, or the variable named by --judge-key-env)"
        )
    rows = read_predictions(predictions, REQUIRED[name], name)
    shared = SharedReplies(judge) if judge is not None else None
    results = {each: _score(name, rows, shared.session() if shared else None, each) for each in RULES}
    chosen = results[rules]
    return {
        "benchmark": name,
        "rules": rules,
        "score": chosen["score"],
        **{f"score_{each}": results[each]["score"] for each in RULES},
        **{key: value for key, value in chosen.items() if key != "score"},
    }


def _score(name: str, rows: list[dict], judge: JudgeFn | None, rules: str) -> dict:
    scorer = SCORERS[name]
    return scorer(rows, judge, rules=rules) if name in JUDGED | JUDGE_OPTIONAL else scorer(rows, rules=rules)


def add_rules_argument(parser: argparse.ArgumentParser) -> None:
    """--rules, shared by `vlsi score` and `vlsi eval`."""
    parser.add_argument(
        "--rules",
        choices=RULES,
        default=VLMEVALKIT,
        help="which rules give `score`: vlmevalkit (default) is VLMEvalKit's own exact-matching evaluation, quirks "
        "included, for numbers comparable with the OpenVLM leaderboard; lenient also reads answers VLMEvalKit misses "
        "(units, 'The answer is (E)', Chinese letters, ...). The output carries both, as score_vlmevalkit and "
        "score_lenient",
    )


def add_judge_arguments(parser: argparse.ArgumentParser) -> None:
    """--judge-url, --judge-model, --judge-key-env (read by `judge_from_args`): `vlsi score` and `vlsi eval`."""
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


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `score` on an argparse subparsers object; the parsed args go to `run`."""
    parser = subparsers.add_parser(
        "score",
        help="score a predictions file on a benchmark (VLMEvalKit's rules) and print JSON metrics",
        description=(
            "Score predictions of any system on a benchmark and print one JSON object: `score` is the headline "
            "number as VLMEvalKit computes it (or, with --rules lenient, under the lenient rules), the other keys "
            "are details. See docs/EVALUATION.md for the file layout of each benchmark."
        ),
    )
    parser.add_argument(
        "--benchmark",
        required=True,
        help=f"benchmark name, case-insensitive ({', '.join(sorted(SCORERS))}; VLMEvalKit's dataset names such as "
        "MMBench_DEV_EN, MathVista_MINI, CV-Bench-2D; aliases such as mmbench, mmvet)",
    )
    parser.add_argument(
        "--predictions",
        required=True,
        help="TSV or JSONL file with the benchmark's fields in VLMEvalKit's layout plus a `prediction` column",
    )
    add_rules_argument(parser)
    add_judge_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def judge_from_args(args: argparse.Namespace) -> Judge | None:
    if args.judge_url is None and args.judge_model is None:
        return None
    if args.judge_url is None or args.judge_model is None:
        raise ScoreError("--judge-url and --judge-model go together; pass both")
    key_env = args.judge_key_env or DEFAULT_KEY_ENV
    api_key = os.environ.get(key_env) or None
    if args.judge_key_env and api_key is None:
        raise ScoreError(f"--judge-key-env names ${key_env}, which is not set; export the key in it")
    return Judge(url=args.judge_url, model=args.judge_model, api_key=api_key)


def run(args: argparse.Namespace) -> int:
    """Print the metrics JSON to stdout and return 0; bad input raises ScoreError or OSError, which
    `vlsi.cli.main` prints as one line (exit 2)."""
    result = score_file(args.benchmark, args.predictions, judge_from_args(args), args.rules)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0
