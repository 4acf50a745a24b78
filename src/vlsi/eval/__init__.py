"""Benchmark scoring: read a predictions file, score it the way VLMEvalKit does, return the metrics.

from vlsi.eval import score_file
score_file("mmbench_en", "preds/MMBench_DEV_EN.tsv")["score"]
"""

from .benchmarks import JUDGED, SCORERS, resolve_benchmark
from .io import ScoreError, read_predictions
from .judge import Judge, JudgeError
from .score import add_parser, run, score_file

__all__ = [
    "JUDGED",
    "SCORERS",
    "Judge",
    "JudgeError",
    "ScoreError",
    "add_parser",
    "read_predictions",
    "resolve_benchmark",
    "run",
    "score_file",
]
