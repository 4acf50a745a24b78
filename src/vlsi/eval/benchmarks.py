"""The benchmark registry: name -> scorer, the columns each scorer reads, and which need an LLM judge.

Every scorer is a pure function `(rows, rules) -> dict` (judge-scored ones also take the judge) returning `score`,
the headline number as VLMEvalKit or the lenient rules give it, plus details. docs/EVALUATION.md describes each.
"""

from __future__ import annotations

from collections.abc import Callable

from .io import ScoreError
from .judged import score_llava_wilder, score_mm_vet, score_mm_vet_v2
from .mcq import score_cv_bench, score_cv_bench_2d, score_cv_bench_3d, score_mcq, score_mmbench, score_mmmu
from .numeric import score_chartqa, score_mathvista
from .yesno import score_hallusionbench, score_mme, score_pope

SCORERS: dict[str, Callable[..., dict]] = {
    "ai2d": score_mcq,
    "blink": score_mcq,
    "chartqa": score_chartqa,
    "cv_bench": score_cv_bench,
    "cv_bench_2d": score_cv_bench_2d,
    "cv_bench_3d": score_cv_bench_3d,
    "hallusionbench": score_hallusionbench,
    "llava_wilder": score_llava_wilder,
    "mathvista": score_mathvista,
    "mm_vet": score_mm_vet,
    "mm_vet_v2": score_mm_vet_v2,
    "mmbench_cn": score_mmbench,
    "mmbench_en": score_mmbench,
    "mme": score_mme,
    "mmmu": score_mmmu,
    "mmstar": score_mcq,
    "pope": score_pope,
    "q_bench": score_mcq,
    "seed_2_plus": score_mcq,
}

# Scored only with a judge; MathVista takes one optionally (answer extraction), the rest never.
JUDGED = frozenset({"mm_vet", "mm_vet_v2", "llava_wilder"})
JUDGE_OPTIONAL = frozenset({"mathvista"})

_MCQ = ("answer", "A", "B")
# Columns a scorer reads, besides `prediction` (names as VLMEvalKit's TSVs spell them).
REQUIRED: dict[str, tuple[str, ...]] = {
    "ai2d": _MCQ,
    "blink": _MCQ,
    "chartqa": ("answer",),
    "cv_bench": (*_MCQ, "split", "source"),
    "cv_bench_2d": (*_MCQ, "split", "source"),
    "cv_bench_3d": (*_MCQ, "split"),
    "hallusionbench": ("index", "answer", "l2-category"),
    "llava_wilder": ("question", "answer"),
    "mathvista": ("answer", "question_type", "answer_type"),
    "mm_vet": ("question", "answer", "category"),
    "mm_vet_v2": ("question", "answer", "category"),
    "mmbench_cn": ("index", *_MCQ),
    "mmbench_en": ("index", *_MCQ),
    "mme": ("category", "image_path", "answer"),
    "mmmu": ("answer",),
    "mmstar": _MCQ,
    "pope": ("answer",),
    "q_bench": _MCQ,
    "seed_2_plus": _MCQ,
}

# Other spellings, after lower-casing and reading "-" and " " as "_". VLMEvalKit's dataset names (vlmeval/dataset,
# commit e8e78f0) are all here: a variant (v1.1, test split, no-mask images) scores as its benchmark does.
ALIASES = {
    "mmbench": "mmbench_en",
    "mmbench_dev_en": "mmbench_en",
    "mmbench_test_en": "mmbench_en",
    "mmbench_v11": "mmbench_en",
    "mmbench_dev_en_v11": "mmbench_en",
    "mmbench_test_en_v11": "mmbench_en",
    "mmbench_en_dev": "mmbench_en",
    "mmbench_dev_cn": "mmbench_cn",
    "mmbench_test_cn": "mmbench_cn",
    "mmbench_cn_v11": "mmbench_cn",
    "mmbench_dev_cn_v11": "mmbench_cn",
    "mmbench_test_cn_v11": "mmbench_cn",
    "mmbench_cn_dev": "mmbench_cn",
    "hallusion_bench": "hallusionbench",
    "chartqa_test": "chartqa",
    "ai2d_test": "ai2d",
    "ai2d_test_no_mask": "ai2d",
    "mmmu_val": "mmmu",
    "mmmu_dev_val": "mmmu",
    "mmmu_test": "mmmu",
    "mathvista_mini": "mathvista",
    "mathvista_testmini": "mathvista",
    "seed2_plus": "seed_2_plus",
    "seed2plus": "seed_2_plus",
    "seedbench2_plus": "seed_2_plus",
    "seed_bench_2_plus": "seed_2_plus",
    "cvbench": "cv_bench",
    "cvbench_2d": "cv_bench_2d",
    "cvbench_3d": "cv_bench_3d",
    "qbench": "q_bench",
    "q_bench1": "q_bench",
    "qbench1": "q_bench",
    "q_bench1_val": "q_bench",
    "q_bench1_test": "q_bench",
    "mmvet": "mm_vet",
    "mmvet_hard": "mm_vet",
    "mmvet_v2": "mm_vet_v2",
    "mmvetv2": "mm_vet_v2",
    "llava_bench_wilder": "llava_wilder",
    "llava_wilder_small": "llava_wilder",
}


def resolve_benchmark(name: str) -> str:
    """The registry key for a user-typed name: case-insensitive, "-" or " " read as "_", aliases allowed."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in SCORERS:
        raise ScoreError(f"unknown benchmark {name!r}; known: {', '.join(sorted(SCORERS))} (and VLMEvalKit's names)")
    return key
