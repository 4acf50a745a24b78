"""`vlsi score` gives VLMEvalKit's numbers by default, on predictions files that VLMEvalKit itself scored.

tests/data/vlmevalkit/ holds generated predictions files (VLMEvalKit's TSV layout, free-text answers of every kind)
and expected.json: for each file the headline number VLMEvalKit's own evaluation code gave at the commit it names,
with its judge set to exact matching, or for the judge-scored benchmarks a stand-in judge that replays the file's
`judge_replies` column (docs/EVALUATION.md, "Agreement with VLMEvalKit", says how it was run). The default rules must
give that number as `score` on every file. Files marked `differs` exhibit one of the lenient rules: there
`--rules lenient` must give its own number (`lenient`), which the default output also carries as `score_lenient`.
"""

import csv
import json
import threading
from pathlib import Path

import pytest

from vlsi.eval import ScoreError, score_file
from vlsi.eval.numeric import relaxed_match_vlmevalkit

DATA = Path(__file__).parent / "data" / "vlmevalkit"
EXPECTED = json.loads((DATA / "expected.json").read_text(encoding="utf-8"))
FILES = EXPECTED["files"]
AGREE = sorted(name for name, entry in FILES.items() if "differs" not in entry)
DIFFER = sorted(name for name, entry in FILES.items() if "differs" in entry)
TOLERANCE = 1e-6


def extraction_judge(path: Path):
    """Stand-in for the MathVista answer-extraction judge: returns the `extracted` cell of the row whose
    prediction the prompt quotes (VLMEvalKit was run with the same stand-in)."""
    with path.open(newline="", encoding="utf-8") as f:
        extracted = {row["prediction"]: row["extracted"] for row in csv.DictReader(f, delimiter="\t")}

    def judge(prompt, *, temperature=0.0, system=None):
        # VLMEvalKit's prompt ends "...Model respone: <prediction>Extracted answer:"
        prediction = prompt.rsplit("\nModel respone: ", 1)[1].rsplit("Extracted answer:", 1)[0]
        return extracted[prediction]

    return judge


def replay_judge(path: Path, calls: list | None = None):
    """Stand-in for the MM-Vet / LLaVA-Wilder judge (VLMEvalKit was run with the same one): finds the row whose
    question the prompt quotes and returns the n-th reply of its `judge_replies` JSON list on its n-th call (the
    last one repeats), so unreadable first replies exercise the retries. Appends (row, n, temperature, system) to
    `calls`."""
    with path.open(newline="", encoding="utf-8") as f:
        replies = {row["question"]: json.loads(row["judge_replies"]) for row in csv.DictReader(f, delimiter="\t")}
    asked: dict[str, int] = {}
    lock = threading.Lock()

    def judge(prompt, *, temperature=0.0, system=None):
        (question,) = [q for q in replies if q in prompt]
        with lock:
            n = asked[question] = asked.get(question, -1) + 1
            if calls is not None:
                calls.append((question, n, temperature, system))
        return replies[question][min(n, len(replies[question]) - 1)]

    return judge


def judge_for(name: str):
    return replay_judge(DATA / name) if FILES[name].get("judge_column") == "judge_replies" else None


def test_expected_names_the_vlmevalkit_commit_and_covers_every_checked_benchmark():
    assert len(EXPECTED["vlmevalkit_commit"]) == 40
    covered = {FILES[name]["benchmark"] for name in AGREE}
    assert covered == {
        "ai2d", "blink", "chartqa", "cv_bench_2d", "cv_bench_3d", "hallusionbench", "mathvista", "mmbench_cn",
        "mmbench_en", "mme", "mmmu", "mmstar", "pope", "q_bench", "seed_2_plus", "mm_vet", "llava_wilder",
    }  # fmt: skip
    assert sorted(p.name for p in DATA.glob("*.tsv")) == sorted(FILES)


def vlmevalkit_headline(name: str) -> float:
    """VLMEvalKit's number for the file as scored without a judge (MathVista: its number when the judge never
    answers) or with the file's replayed judge."""
    entry = FILES[name]
    return entry.get("vlmevalkit_prefetch_only", entry["vlmevalkit"])


@pytest.mark.parametrize("name", sorted(FILES))
def test_default_score_is_vlmevalkits_headline(name):
    entry = FILES[name]
    result = score_file(entry["benchmark"], DATA / name, judge_for(name))
    assert result["rules"] == "vlmevalkit"
    assert result["score"] == pytest.approx(vlmevalkit_headline(name), abs=TOLERANCE)
    assert result["score_vlmevalkit"] == result["score"]
    assert result["score_lenient"] == pytest.approx(entry.get("lenient", result["score"]), abs=TOLERANCE)
    for key, value in entry.get("vlmevalkit_details", {}).items():
        assert result[key] == pytest.approx(value, abs=TOLERANCE), key
    if "vlmevalkit_categories" in entry:  # LLaVA-Wilder: relative score per category
        assert result["categories"] == pytest.approx(entry["vlmevalkit_categories"], abs=TOLERANCE)
    for key, value in entry.get("vlmevalkit_capability_sets", {}).items():  # MM-Vet
        assert result["capability_sets"][key] == pytest.approx(value, abs=TOLERANCE), key
    if "vlmevalkit_capabilities" in entry:  # MM-Vet: VLMEvalKit's table, quirk included
        assert result["capabilities"] == pytest.approx(entry["vlmevalkit_capabilities"], abs=TOLERANCE)


@pytest.mark.parametrize("name", [name for name in sorted(FILES) if FILES[name]["vlmevalkit_dataset"] != "LLaVABench"])
def test_vlmevalkits_dataset_name_selects_the_benchmark(name):
    entry = FILES[name]
    assert score_file(entry["vlmevalkit_dataset"], DATA / name, judge_for(name))["benchmark"] == entry["benchmark"]


@pytest.mark.parametrize("name", DIFFER)
def test_lenient_rules_give_their_own_number_only_when_asked(name):
    entry = FILES[name]
    result = score_file(entry["benchmark"], DATA / name, judge_for(name), rules="lenient")
    assert result["rules"] == "lenient"
    assert result["score"] == pytest.approx(entry["lenient"], abs=TOLERANCE)
    assert result["score_vlmevalkit"] == pytest.approx(vlmevalkit_headline(name), abs=TOLERANCE)
    assert abs(entry["lenient"] - vlmevalkit_headline(name)) > TOLERANCE  # the file does show the difference


def test_mm_vet_retries_as_vlmevalkit_and_counts_capabilities_by_the_rules():
    entry = FILES["mm_vet.tsv"]
    calls: list = []
    result = score_file("mm_vet", DATA / "mm_vet.tsv", replay_judge(DATA / "mm_vet.tsv", calls))
    # The same calls as VLMEvalKit: an unreadable or out-of-range grade is re-asked at 0.5, 1.0, 1.5, 2.0; the lenient
    # rules read the same replies and need no call of their own.
    assert len(calls) == entry["vlmevalkit_judge_calls"]
    assert all(temperature == 0.5 * n for _, n, temperature, _ in calls)
    assert result["judge_failures"] == 1
    lenient = score_file("mm_vet", DATA / "mm_vet.tsv", replay_judge(DATA / "mm_vet.tsv"), rules="lenient")
    # VLMEvalKit counts a row whose category is one capability twice in it; the lenient rules once per capability.
    assert lenient["capabilities"] == pytest.approx(entry["capabilities_from_vlmevalkit_grades"], abs=TOLERANCE)
    assert lenient["score"] == pytest.approx(entry["vlmevalkit"], abs=TOLERANCE)


@pytest.mark.parametrize("name", [name for name in sorted(FILES) if FILES[name]["benchmark"] == "mathvista"])
def test_mathvista_with_the_same_extraction_judge_as_vlmevalkit(name):
    entry = FILES[name]
    result = score_file(entry["benchmark"], DATA / name, extraction_judge(DATA / name))
    assert result["score"] == pytest.approx(entry["vlmevalkit"], abs=TOLERANCE)
    assert result["score_lenient"] == pytest.approx(entry["lenient_with_judge"], abs=TOLERANCE)


def test_cv_bench_2d_and_3d_together_is_the_mean_of_vlmevalkits_two_numbers(tmp_path):
    entry = EXPECTED["combined"]["cv_bench_2d.tsv+cv_bench_3d.tsv"]
    with (DATA / "cv_bench_2d.tsv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    with (DATA / "cv_bench_3d.tsv").open(newline="", encoding="utf-8") as f:
        rows += list(csv.DictReader(f, delimiter="\t"))
    path = tmp_path / "cv_bench.tsv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", restval="")
        writer.writeheader()
        writer.writerows(rows)
    result = score_file("cv_bench", path)
    assert result["2d"] == pytest.approx(entry["vlmevalkit_parts"]["2d"], abs=TOLERANCE)
    assert result["3d"] == pytest.approx(entry["vlmevalkit_parts"]["3d"], abs=TOLERANCE)
    assert result["score"] == result["score_lenient"] == pytest.approx(entry["score"], abs=TOLERANCE)
    with pytest.raises(ScoreError, match="CV-Bench split must be 2D, got '3D'; this benchmark is CV-Bench-2D"):
        score_file("CV-Bench-2D", path)


@pytest.mark.parametrize(
    "target, prediction, correct",
    [("12%", "12%%", True), ("0.12", "12%%", True), ("12%%", "0.12", True), ("12", "12%%", False)],
)
def test_relaxed_match_vlmevalkit_strips_every_trailing_percent_sign(target, prediction, correct):
    # VLMEvalKit's relaxed_correctness reads "12%%" as float("12%%".rstrip("%")) / 100
    assert relaxed_match_vlmevalkit(target, prediction) is correct
