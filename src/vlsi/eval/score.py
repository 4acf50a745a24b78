"""`vlsi score`: score a predictions file on one benchmark; the command prints the metrics as one JSON object.

    vlsi score --benchmark MMBench_DEV_EN --predictions preds/MMBench_DEV_EN.tsv
    vlsi score --benchmark chartqa --predictions preds/ChartQA_TEST.tsv --rules lenient
    vlsi score --benchmark mm-vet --predictions preds/mmvet.jsonl \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4-turbo --judge-key-env OPENAI_API_KEY

`score` is VLMEvalKit's number by default (`--rules vlmevalkit`), the lenient rules' with `--rules lenient`; the
output always carries both, as `score_vlmevalkit` and `score_lenient`.
"""

from __future__ import annotations

from pathlib import Path

from .benchmarks import JUDGE_OPTIONAL, JUDGED, REQUIRED, SCORERS, resolve_benchmark
from .common import RULES, VLMEVALKIT
from .io import ScoreError, read_predictions
from .judge import DEFAULT_KEY_ENV, JudgeFn, SharedReplies


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
