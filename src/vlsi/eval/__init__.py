"""Benchmark scoring: read a predictions file, score it the way VLMEvalKit does (or by the lenient rules), return
the metrics; and `evaluate`, which first answers the benchmark with a model (vlsi eval).

from vlsi.eval import score_file
score_file("MMBench_DEV_EN", "preds/MMBench_DEV_EN.tsv")["score"]  # VLMEvalKit's number
score_file("chartqa", "preds/ChartQA_TEST.tsv", rules="lenient")["score"]
from vlsi.eval import evaluate
evaluate("OUT/model", "mmbench_en", "MMBench_DEV_EN.tsv", "eval/mmbench")["score"]
"""

from .benchmarks import JUDGED, SCORERS, resolve_benchmark
from .common import RULES
from .custom import custom_hit, question_type, score_custom
from .io import ScoreError, read_predictions
from .judge import Judge, JudgeError
from .score import score_file

# Generation needs torch and transformers: imported on first use, so that `vlsi score` stays light.
_GENERATION = {
    "Answer": "generate",
    "EvalError": "generate",
    "generate_answers": "generate",
    "evaluate": "harness",
}


def __getattr__(name: str):
    if name in _GENERATION:
        import importlib

        return getattr(importlib.import_module(f".{_GENERATION[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "JUDGED",
    "RULES",
    "SCORERS",
    "Answer",
    "EvalError",
    "Judge",
    "JudgeError",
    "ScoreError",
    "custom_hit",
    "evaluate",
    "generate_answers",
    "question_type",
    "read_predictions",
    "resolve_benchmark",
    "score_custom",
    "score_file",
]
