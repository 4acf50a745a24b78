"""`vlsi study`: accuracy vs labelled questions for SFT only, KD and VLsI; a fast end-to-end run, reuse, refusals."""

import json

import pytest
from scipy.stats import ttest_1samp, ttest_rel

from vlsi.cli import main
from vlsi.demo.experiment import PAIRS
from vlsi.demo.study import StudySettings, summarise
from vlsi.demo.study_report import findings


def test_study_settings_are_checked():
    assert StudySettings(sizes="300, 30,100").size_list == [30, 100, 300]
    with pytest.raises(ValueError, match="comma-separated integers"):
        StudySettings(sizes="a,b").check()
    with pytest.raises(ValueError, match="sizes >= 1"):
        StudySettings(sizes="0,10").check()


def test_summary_pairs_every_seed_items():
    s = StudySettings(sizes="10", seeds=2)
    runs = [
        {"size": 10, "seed": k, "accuracy": acc, "before_sft": acc, "hits": hits}
        for k, (acc, hits) in enumerate(
            [
                (
                    {"sft": 0.5, "sft_teacher": 0.5, "kd": 0.5, "vlsi": 1.0},
                    {"sft": [1, 0], "sft_teacher": [1, 0], "kd": [0, 1], "vlsi": [1, 1]},
                ),
                (
                    {"sft": 0.0, "sft_teacher": 0.5, "kd": 0.5, "vlsi": 0.5},
                    {"sft": [0, 0], "sft_teacher": [0, 1], "kd": [1, 0], "vlsi": [0, 1]},
                ),
            ]
        )
    ]
    row = summarise(s, runs, ["x", "y"])["10"]
    assert row["vlsi"]["mean"] == 0.75 and row["vlsi"]["per_seed"] == [1.0, 0.5]
    assert row["sft"]["std"] == pytest.approx(0.5 / 2**0.5)  # sample std of 0.5 and 0.0
    ci = ttest_1samp([0.5, 0.0], 0.0).confidence_interval(0.95)
    assert (row["sft"]["low"], row["sft"]["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    versus_sft = row["paired"]["vlsi_vs_sft"]
    assert versus_sft["per_seed"] == [0.5, 0.5] and versus_sft["difference"] == 0.5, "paired by seed, not pooled"
    assert versus_sft["low"] == versus_sft["high"] == 0.5 and versus_sft["equivalent"] is False
    kd = row["paired"]["vlsi_vs_kd"]
    assert kd["per_seed"] == [0.5, 0.0] and kd["p"] == pytest.approx(ttest_rel([1.0, 0.5], [0.5, 0.5]).pvalue)
    assert [b["difference"] for b in kd["per_seed_bootstrap"]] == [0.5, 0.0], "each seed's own items"
    assert row["paired_before_sft"]["vlsi_vs_kd"]["per_seed"] == [0.5, 0.0]
    (line,) = findings({"table": {"10": row}})
    assert "+50.0 points against SFT only (95 % CI +50.0 to +50.0 over 2 seeds, paired t: beyond noise)" in line
    assert (
        "+25.0 points against final-layer KD (95 % CI -292.7 to +342.7 over 2 seeds, paired t: within noise, but "
        "not shown equivalent within ±2.0 points)" in line
    )


def test_fast_study_end_to_end_reuses_runs_and_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "--fast", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["table"]) == ["8", "16"]
    for row in results["table"].values():
        for method in ("sft", "sft_teacher", "kd", "vlsi"):
            assert 0.0 <= row[method]["mean"] <= 1.0 and len(row[method]["per_seed"]) == 1
        assert set(row["paired"]) == set(row["paired_before_sft"]) == {f"{a}_vs_{b}" for a, b in PAIRS}
        assert row["vlsi"]["low"] is None, "one seed: no interval"
    text = (out / "report.md").read_text()
    assert (out / "study.png").is_file() and "](study.png)" in text
    assert "(one seed: no interval)" in text and f"{results['n_clusters']} task x pattern clusters" in text
    pool = (out / "pool" / "answers" / "answers.jsonl").read_text()
    for run in ("n8-seed0", "n16-seed0"):
        answers = out / "runs" / run / "runs" / "kd" / "answers" / "answers.jsonl"
        assert answers.read_text() == pool, "the pool is answered once for the whole study"
    score = out / "runs" / "n8-seed0" / "score.json"
    stamp = score.stat().st_mtime_ns
    assert main(["study", "--fast", "--output", str(out)]) == 0
    assert score.stat().st_mtime_ns == stamp, "a finished run is reused"
    assert main(["study", "--fast", "--output", str(out), "seeds=2"]) == 2
    assert "other settings (seeds: 1 -> 2)" in capsys.readouterr().err
