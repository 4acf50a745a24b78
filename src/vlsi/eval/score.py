"""`vlsi score`: score a predictions file on one benchmark; the command prints the metrics as one JSON object.

    vlsi score --benchmark MMBench_DEV_EN --predictions preds/MMBench_DEV_EN.tsv
    vlsi score --benchmark chartqa --predictions preds/ChartQA_TEST.tsv --rules lenient
    vlsi score --benchmark mm-vet --predictions preds/mmvet.jsonl \\
        --judge-url https://api.openai.com/v1 --judge-model gpt-4-turbo --judge-key-env OPENAI_API_KEY

`score` is VLMEvalKit's number by default (`--rules vlmevalkit`), the lenient rules' with `--rules lenient`; the
output always carries both, as `score_vlmevalkit` and `score_lenient`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import custom
from .benchmarks import JUDGE_OPTIONAL, JUDGED, REQUIRED, SCORERS, resolve_benchmark
from .common import RULES, VLMEVALKIT
from .io import ScoreError, read_predictions
from .judge import DEFAULT_KEY_ENV, JudgeFn, SharedReplies, make_judge

# What `vlsi eval` writes beside its predictions.jsonl: the settings, which name the benchmark answered.
EVAL_SETTINGS = "eval.json"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def score_file(benchmark: str, predictions: str | Path, judge: JudgeFn | None = None, rules: str = VLMEVALKIT) -> dict:
    """Metrics for a predictions file: {"benchmark", "rules", "score", "score_vlmevalkit", "score_lenient", ...}.

    `score` and the details follow `rules` ("vlmevalkit" or "lenient"); the two `score_*` keys hold both headlines.
    `judge` is used by MM-Vet, MM-Vet v2 and LLaVA-Wilder (required) and MathVista (answer extraction); both rules
    read the same replies. Raises ScoreError on bad input.
    """
    if rules not in RULES:
        raise ScoreError(f"unknown rules {rules!r}; use {' or '.join(RULES)}")
    name = custom.CUSTOM if benchmark.strip().lower() == custom.CUSTOM else resolve_benchmark(benchmark)
    _check_answered_benchmark(Path(predictions), name)
    if name == custom.CUSTOM:
        return custom.score_custom(read_predictions(predictions, custom.REQUIRED, name))
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


def _check_answered_benchmark(predictions: Path, name: str) -> None:
    """A predictions file that `vlsi eval` wrote for another benchmark (its eval.json says which) is refused."""
    settings = predictions.with_name(EVAL_SETTINGS)
    if predictions.name != "predictions.jsonl" or not settings.is_file():
        return
    try:
        answered = json.loads(settings.read_text()).get("benchmark")
    except (json.JSONDecodeError, AttributeError):
        return
    if answered is not None and answered != name:
        raise ScoreError(
            f"{predictions} holds vlsi eval's answers to {answered} ({settings}), not {name}; "
            f"pass --benchmark {answered}"
        )


def judge_from_options(url: str | None, model: str | None, key_env: str | None) -> JudgeFn | None:
    """The judge `--judge-url`, `--judge-model` and `--judge-key-env` name (`judge.make_judge`), after checking that
    --judge-key-env holds a variable's name: a key passed there by mistake is refused without being printed."""
    if key_env is not None and (not _ENV_NAME.fullmatch(key_env) or _looks_like_key(key_env)):
        raise ScoreError(
            "--judge-key-env takes the name of the environment variable that holds the API key, and what was "
            "passed looks like a key itself (not shown here); export the key, e.g. export OPENAI_API_KEY=..., and "
            "pass --judge-key-env OPENAI_API_KEY"
        )
    return make_judge(url, model, key_env)


def _looks_like_key(name: str) -> bool:
    """API keys are long mixes of letters and digits (sk-..., AIza...); variable names are words in capitals."""
    return name.lower().startswith(("sk-", "sk_")) or (
        len(name) >= 20 and any(c.isdigit() for c in name) and any(c.islower() for c in name)
    )
