"""`vlsi study`: accuracy vs labelled questions for SFT only, KD and VLsI; a fast end-to-end run, reuse, refusals."""

import json

import pytest
import torch
from scipy.stats import ttest_1samp, ttest_rel

from vlsi.cli import main
from vlsi.demo import experiment
from vlsi.demo.experiment import PAIRS
from vlsi.demo.study import StudySettings, summarise
from vlsi.demo.study_report import findings


def test_study_settings_are_checked():
    assert StudySettings(sizes="300, 30,100").size_list == [30, 100, 300]
    with pytest.raises(ValueError, match="comma-separated integers"):
        StudySettings(sizes="a,b").check()
    with pytest.raises(ValueError, match="sizes >= 1"):
        StudySettings(sizes="0,10").check()
    budget = StudySettings(axis="steps", steps="200,25,50", n_labelled=150, control=1).check()
    assert budget.points == [25, 50, 200] and budget.size_list == [150], "the budget curve: one labelled set"
    assert budget.methods[-1] == "ce_kld" and ("vlsi", "ce_kld") in budget.pairs
    assert "ce_kld" not in StudySettings().methods
    with pytest.raises(ValueError, match="axis='epochs'"):
        StudySettings(axis="epochs").check()
    with pytest.raises(ValueError, match="steps >= 1"):
        StudySettings(axis="steps", steps="0").check()
    with pytest.raises(ValueError, match="control=2: 0 or 1"):
        StudySettings(control=2).check()


def test_summary_pairs_every_seed_items():
    s = StudySettings(sizes="10", seeds=2)
    runs = [
        {"point": 10, "size": 10, "seed": k, "accuracy": acc, "before_sft": acc, "hits": hits}
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
    (line,) = findings({"table": {"10": row}, "settings": {"axis": "sizes"}})
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


def test_fast_budget_curve_with_the_deep_supervision_control(tmp_path, monkeypatch):
    """`axis=steps control=1`: one run per interaction-step budget and seed, five students each (the CE / KLD control
    beside VLsI, from VLsI's stage-1 verbalizers), scored before and after stage 3, paired by seed."""
    out = tmp_path / "budget"
    # chains through the study
    settings = ["axis=steps", "steps=1,3", "control=1", "tasks=sequence", "styles=chain", "teacher=chain"]
    threads, answer_pool = [], experiment.answer_pool  # torch threads at each answering: the main process's first

    def observed(*args):
        threads.append(torch.get_num_threads())
        return answer_pool(*args)

    monkeypatch.setattr(experiment, "answer_pool", observed)
    torch.set_num_threads(2)
    assert main(["study", "--fast", "--output", str(out), *settings]) == 0
    assert threads[0] == 1, "the main process answers the pool on `threads` torch threads (1), not 2"
    results = json.loads((out / "results.json").read_text())
    assert list(results["table"]) == ["1", "3"]
    for steps, row in results["table"].items():
        assert {"ce_kld", "ce_kld_before_sft", "vlsi", "kd"} <= set(row)
        assert {"vlsi_vs_ce_kld", "ce_kld_vs_kd", "vlsi_vs_kd"} <= set(row["paired"])
        run = out / "runs" / f"steps{steps}-seed0"
        assert json.loads((run / "score.json").read_text())["interact_steps"] == int(steps)
        for method in ("kd", "vlsi", "ce_kld"):
            rows = [json.loads(line) for line in (run / "runs" / method / "metrics.jsonl").read_text().splitlines()]
            assert sum(r["stage"] == "interact" for r in rows) == int(steps), f"{method}: the budget's steps"
        config = (run / "runs" / "ce_kld" / "config.yaml").read_text()
        assert "intermediate_loss: ce" in config and "last_loss: kld" in config and "answer_max_tokens: 6" in config
        shared = run / "runs" / "vlsi" / "verbalizers" / "student" / "verbalizers.safetensors"
        copied = run / "runs" / "ce_kld" / "verbalizers" / "student" / "verbalizers.safetensors"
        assert copied.read_bytes() == shared.read_bytes(), "the control starts from VLsI's stage-1 verbalizers"
    text = (out / "report.md").read_text()
    assert "by interaction steps (the budget curve" in text and "| interaction steps |" in text
    assert "**3 interaction steps**" in text and "against the CE / KLD control" in text
    assert (out / "study.png").is_file()


def test_a_study_builds_the_teacher_cache_once_and_scores_as_with_one_per_run(tmp_path, monkeypatch):
    """Two seeds of one size share one teacher cache, built in the main process (`study.shared_caches`); the plain
    version it replaces (each run building its own, as `vlsi demo` does) gives the same students, item by item."""
    import vlsi.cache
    from vlsi.demo import study

    built = []
    compute = vlsi.cache._compute_shards

    def counted(cfg, folder, *args):
        built.append(folder)
        compute(cfg, folder, *args)

    monkeypatch.setattr(vlsi.cache, "_compute_shards", counted)
    settings = ["sizes=8", "seeds=2", "n_test=8"]  # jobs=1 (--fast): the patch holds in every run
    shared = tmp_path / "shared"
    assert main(["study", "--fast", "--output", str(shared), *settings]) == 0
    assert built == [shared / "pool" / "cache-n8"], "one cache, before the runs"
    for seed in (0, 1):
        config = (shared / "runs" / f"n8-seed{seed}" / "runs" / "vlsi" / "config.yaml").read_text()
        assert f"teacher_cache: {shared / 'pool' / 'cache-n8'}" in config
        assert not (shared / "runs" / f"n8-seed{seed}" / "runs" / ".teacher-cache").exists()

    built.clear()
    monkeypatch.setattr(study, "shared_caches", lambda *args: {})
    plain = tmp_path / "plain"
    assert main(["study", "--fast", "--output", str(plain), *settings]) == 0
    assert built == [plain / "runs" / f"n8-seed{seed}" / "runs" / ".teacher-cache" for seed in (0, 1)]
    for seed in (0, 1):
        a, b = (json.loads((d / "runs" / f"n8-seed{seed}" / "score.json").read_text()) for d in (shared, plain))
        assert (a["accuracy"], a["before_sft"], a["hits"]) == (b["accuracy"], b["before_sft"], b["hits"])


def test_a_study_with_on_policy_pairs_its_two_students_by_seed():
    from vlsi.demo.experiment import ON_POLICY, ON_POLICY_PAIRS

    s = StudySettings(sizes="10", seeds=2, on_policy=0.5, control=1).check()
    assert s.methods == ("sft", "sft_teacher", "kd", "vlsi", *ON_POLICY, "ce_kld")
    assert set(ON_POLICY_PAIRS) <= set(s.pairs) and ("vlsi", "ce_kld") in s.pairs
    accuracy = [dict.fromkeys(s.methods, 0.5) | {"vlsi_on_policy": 0.75}, dict.fromkeys(s.methods, 0.5)]
    runs = [
        {"point": 10, "seed": k, "accuracy": acc, "before_sft": acc, "hits": {m: [1, 0] for m in s.methods}}
        for k, acc in enumerate(accuracy)
    ]
    row = summarise(s, runs, ["x", "y"])["10"]
    assert row["paired"]["vlsi_on_policy_vs_vlsi"]["per_seed"] == [0.25, 0.0]
    assert row["paired"]["kd_on_policy_vs_kd"]["per_seed"] == [0.0, 0.0]
    (line,) = findings({"table": {"10": row}, "settings": {"axis": "sizes", "on_policy": 0.5}})
    assert "On the student's own samples (λ = 0.5): on-policy KD is +0.0 points against final-layer KD" in line
    assert "on-policy VLsI +12.5 points against VLsI (95 % CI" in line


def test_a_study_stopped_with_sigterm_leaves_no_run_training_on(tmp_path):
    """SIGTERM ends `vlsi study` at once, skipping every cleanup; its two spawned workers (`ablate.job_pool`) notice
    their parent is gone and end within seconds instead of training their runs on as orphans."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    command = [sys.executable, "-m", "vlsi", "study", "--fast", "--output", str(tmp_path / "s"), "jobs=2", "seeds=2"]
    study = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    main_process, workers = psutil.Process(study.pid), []
    deadline = time.monotonic() + 300
    while len(workers) < 2 and study.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            children = main_process.children()
            workers = [p for p in children if "multiprocessing.spawn" in " ".join(p.cmdline())]
        except psutil.NoSuchProcess:  # a child that ended between listing and reading
            continue
    assert len(workers) == 2, "the study started its two workers"
    study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=30) == -signal.SIGTERM, "stopped by the signal, before the runs finished"
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, "every worker ended with the study"
