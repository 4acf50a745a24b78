"""`vlsi ablate`: the rows mean what they say, the summary maths, and a fast end-to-end run (what CI runs)."""

import json
import math
import statistics

import pytest
import torch
from scipy.stats import spearmanr, ttest_1samp, ttest_rel

from vlsi.cli import main
from vlsi.demo import experiment
from vlsi.demo.ablate import RUNS, TABLES, AblateSettings, collect, needed_runs
from vlsi.demo.ablate_report import rank_correlation, table_verdict
from vlsi.demo.experiment import ON_POLICY, demo_config


def test_every_run_is_a_valid_configuration_that_sets_what_its_row_claims(tmp_path):
    configs = {
        name: demo_config(tmp_path / name, {}, seed=0, batch_size=8, lr=1e-3, verbalize_lr=1e-3, extra=extra)
        for name, extra in RUNS.items()
    }
    match = {name: cfg.interact.match for name, cfg in configs.items()}
    assert match["vlsi"].strategy == "adaptive" and match["vlsi"].search_range and match["vlsi"].order
    for name in ("random", "uniform", "bottom1", "bottom3", "multinomial"):
        assert not match[name].search_range and not match[name].order, name
    assert (match["bottom1"].strategy, match["bottom1"].bottom_k) == ("bottom_k", 1)
    assert (match["bottom3"].strategy, match["bottom3"].bottom_k) == ("bottom_k", 3)
    assert match["range"].search_range and not match["range"].order and match["range"].strategy == "multinomial"
    assert match["order"].search_range and match["order"].order and match["order"].strategy == "multinomial"
    losses = {name: (cfg.interact.intermediate_loss, cfg.interact.last_loss) for name, cfg in configs.items()}
    for row in TABLES["losses"][1]:
        wanted = tuple(part.strip().lower() for part in row.label.split("(")[0].split("/"))
        assert losses[row.run] == wanted, row.label
    for _, rows in TABLES.values():
        assert all(row.run in RUNS or row.run in ("init", "teacher") for row in rows)


def test_needed_runs_follow_the_tables():
    assert needed_runs(AblateSettings()) == [run for run in RUNS if run not in ON_POLICY]
    assert needed_runs(AblateSettings(tables="sft", on_policy=0.5)) == ["sft", "vlsi", "kd", *ON_POLICY]
    with pytest.raises(ValueError, match="the on_policy table needs on_policy"):
        AblateSettings(tables="on_policy").check()
    assert needed_runs(AblateSettings(tables="sft")) == ["sft", "vlsi"]
    assert needed_runs(AblateSettings(tables="losses")) == [r.run for r in TABLES["losses"][1]]
    with pytest.raises(ValueError, match="unknown"):
        AblateSettings(tables="matching,speed").check()


def test_collect_reads_each_row_from_its_run_and_checkpoint():
    s = AblateSettings(tables="sft", seeds=3)
    scores = {("init", 0): {"student": {"accuracy": 0.4}}}
    for seed, (sft, interact, final) in enumerate([(0.5, 0.45, 0.6), (0.52, 0.47, 0.58), (0.54, 0.43, 0.62)]):
        scores[("sft", seed)] = {"student": {"accuracy": sft}}
        scores[("vlsi", seed)] = {"student": {"accuracy": final}, "interact": {"accuracy": interact}}
    table = {r["key"]: r for r in collect(s, scores)["sft"]["rows"]}
    rows = {key: r["accuracy"] for key, r in table.items()}
    assert rows["init"] == {"mean": 0.4, "std": 0.0, "n": 1, "low": None, "high": None, "per_seed": [0.4]}
    assert rows["no-sft"]["per_seed"] == [0.45, 0.47, 0.43]
    assert rows["vlsi"]["mean"] == pytest.approx(0.6) and rows["vlsi"]["std"] == pytest.approx(0.02)
    assert rows["sft"]["std"] == pytest.approx(statistics.stdev([0.5, 0.52, 0.54]))
    ci = ttest_1samp([0.6, 0.58, 0.62], 0.0).confidence_interval(0.95)
    assert (rows["vlsi"]["low"], rows["vlsi"]["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert table["vlsi"]["vs_vlsi"] is None and table["init"]["vs_vlsi"] is None
    versus = table["no-sft"]["vs_vlsi"]
    assert versus["per_seed"] == pytest.approx([-0.15, -0.11, -0.19]), "paired seed by seed"
    assert versus["p"] == pytest.approx(ttest_rel([0.45, 0.47, 0.43], [0.6, 0.58, 0.62]).pvalue)


def test_rank_correlation_matches_scipy():
    cases = [([0.1, 0.3, 0.2, 0.5], [1, 3, 2, 4]), ([0.1, 0.1, 0.2, 0.4, 0.3], [5, 4, 4, 1, 2]), ([3, 1, 2], [1, 2, 3])]
    for a, b in cases:
        assert rank_correlation(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert rank_correlation([1, 2], [2, 1]) is None and rank_correlation([1, 1, 1], [1, 2, 3]) is None


def test_verdict_names_the_best_row_and_the_ones_within_noise():
    def row(label, values, mmb):
        mean, std = statistics.fmean(values), statistics.stdev(values)
        acc = {"mean": mean, "std": std, "per_seed": values}
        return {"label": label, "run": label, "accuracy": acc, "paper": {"MMB": mmb}}

    rows = [row("a", [0.50, 0.52, 0.51], 80.0), row("b", [0.60, 0.61, 0.62], 86.0), row("c", [0.59, 0.62, 0.60], 83.0)]
    text = table_verdict(rows, 3)
    assert text.startswith("Best: b (61.0 %).")
    assert "Within noise of it (the 95 % t CI of the difference, paired by seed over 3 seeds, holds 0): c." in text
    assert "Shown equivalent to it within ±2.0 points (TOST, 5 %): none." in text, "three seeds are too few here"
    many = [row("b", [0.60, 0.61, 0.62, 0.60, 0.61, 0.62], 86.0), row("d", [0.601, 0.608, 0.621, 0.6, 0.61, 0.619], 1)]
    assert "(TOST, 5 %): d." in table_verdict(many, 6)
    assert f"{rank_correlation([0.51, 0.61, 0.6033333], [80.0, 86.0, 83.0]):+.2f}" in text
    assert math.isclose(rank_correlation([0.51, 0.61, 0.6033333], [80.0, 86.0, 83.0]), 1.0)


def test_fast_ablation_writes_both_tables_and_resumes(tmp_path, capsys):
    out = tmp_path / "ablate"
    assert main(["ablate", "--fast", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["tables"]) == {"matching", "losses", "sft"} and results["seeds"] == [0, 1]
    text = (out / "report.md").read_text()
    for table in results["tables"].values():
        assert f"### {table['title']}" in text
        for row in table["rows"]:
            acc = row["accuracy"]
            assert 0.0 <= acc["mean"] <= 1.0
            assert len(acc["per_seed"]) == (1 if row["run"] == "init" else 2)
            interval = "|" if acc["low"] is None else f"[{100 * acc['low']:.1f}, {100 * acc['high']:.1f}] |"
            assert f"| {row['label']} | **{100 * acc['mean']:.1f}** {interval}" in text
            assert (row["vs_vlsi"] is None) == (row["run"] == "init" or row["key"] in ("adaptive", "kld-kld", "vlsi"))
    adaptive = next(r for r in results["tables"]["matching"]["rows"] if r["key"] == "adaptive")
    kld_kld = next(r for r in results["tables"]["losses"]["rows"] if r["key"] == "kld-kld")
    assert adaptive["accuracy"] == kld_kld["accuracy"], "one run serves both rows"
    lines = (out / "runs" / "random" / "seed-0" / "layer_match.jsonl").read_text().splitlines()
    random_match = [json.loads(line)["match"] for line in lines]
    assert random_match and all(len(m) == 3 for m in random_match)

    finished = {path: path.stat().st_mtime_ns for path in out.glob("runs/**/score.json")}
    assert main(["ablate", "--fast", "--output", str(out)]) == 0
    assert {path: path.stat().st_mtime_ns for path in out.glob("runs/**/score.json")} == finished, (
        "the same command reuses every finished run"
    )
    capsys.readouterr()
    assert main(["ablate", "--fast", "--output", str(out), "lr=0.01"]) == 2
    assert "other settings (lr: 0.001 -> 0.01)" in capsys.readouterr().err


def test_a_failed_run_is_one_line_naming_its_log(tmp_path, monkeypatch, capsys):
    import vlsi.demo.ablate as ablate

    def fail(job, *args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(ablate, "run_job", fail)
    assert main(["ablate", "--fast", "--output", str(tmp_path), "jobs=1", "n_labelled=8", "n_test=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vlsi ablate: error: verbalize seed 0 failed (boom); its log: ")
    assert err.endswith("runs/verbalize/seed-0/log.txt")


def test_the_teacher_runs_once_into_a_cache_that_every_interaction_run_reads(tmp_path, monkeypatch):
    import vlsi.cache
    from vlsi.stages import interact

    built = []
    compute = vlsi.cache._compute_shards

    def counted(cfg, folder, *args):
        built.append(folder)
        compute(cfg, folder, *args)

    def no_teacher(*args, **kwargs):
        raise AssertionError("an interaction run loaded the teacher")

    monkeypatch.setattr(vlsi.cache, "_compute_shards", counted)
    monkeypatch.setattr(interact, "load_frozen", no_teacher)
    out = tmp_path / "ablate"
    settings = ["jobs=1", "tables=sft", "n_test=8"]  # one process: the patches hold in every run
    assert main(["ablate", "--fast", "--output", str(out), *settings]) == 0
    cache = out / "pool" / "cache"
    assert built == [cache], "the teacher cache is built once, before the runs"
    index = json.loads((cache / "index.json").read_text())
    assert index["complete"] and index["top_k"] == 0
    for seed in (0, 1):
        run = out / "runs" / "vlsi" / f"seed-{seed}"
        assert f"teacher_cache: {cache}" in (run / "config.yaml").read_text()
        assert (run / "layer_match.jsonl").read_text()


def test_an_ablation_folder_made_with_other_settings_is_refused(tmp_path):
    """The folder check alone (the end-to-end run above checks it through the CLI): jobs and tables may change."""
    from vlsi.demo.ablate import _check_same_settings
    from vlsi.runfolder import FolderError

    _check_same_settings(tmp_path, AblateSettings(seeds=2))
    _check_same_settings(tmp_path, AblateSettings(seeds=2, jobs=4, tables="sft"))
    with pytest.raises(FolderError, match=r"holds an ablation made with other settings \(seeds: 2 -> 3\)"):
        _check_same_settings(tmp_path, AblateSettings(seeds=3))
    assert json.loads((tmp_path / "settings.json").read_text())["jobs"] == 4


def test_fast_ablation_of_chain_answers_with_one_seed(tmp_path, monkeypatch):
    """`styles=chain` reaches every ablation run (the teacher answers to the chain's length); one seed gives means and
    differences to VLsI without intervals."""
    out = tmp_path / "ablate"
    settings = ["tables=sft", "seeds=1", "jobs=1", "n_test=8", "tasks=sequence", "styles=chain", "teacher=chain"]
    threads, answer_pool = [], experiment.answer_pool  # torch threads at each answering: the main process's first

    def observed(*args):
        threads.append(torch.get_num_threads())
        return answer_pool(*args)

    monkeypatch.setattr(experiment, "answer_pool", observed)
    torch.set_num_threads(2)
    assert main(["ablate", "--fast", "--output", str(out), *settings]) == 0
    assert threads[0] == 1, "the main process answers the pool on `threads` torch threads (1), not 2"
    assert "answer_max_tokens: 6" in (out / "runs" / "vlsi" / "seed-0" / "config.yaml").read_text()
    rows = {r["key"]: r for r in json.loads((out / "results.json").read_text())["tables"]["sft"]["rows"]}
    assert rows["sft"]["accuracy"]["low"] is None and rows["sft"]["vs_vlsi"]["low"] is None
    assert rows["sft"]["vs_vlsi"]["difference"] == pytest.approx(
        rows["sft"]["accuracy"]["mean"] - rows["vlsi"]["accuracy"]["mean"]
    )
    assert "| VLsI (verbalize, interact, SFT) |" in (out / "report.md").read_text()


def test_fast_ablation_with_the_on_policy_table(tmp_path):
    """`on_policy=0.5`: KD and VLsI again with interact.on_policy=0.5, on the live teacher (no cache), from the seed's
    stage-1 verbalizers, each compared with VLsI by seed; the off-policy rows still read the cache."""
    out = tmp_path / "ablate"
    settings = ["tables=on_policy", "on_policy=0.5", "seeds=1", "jobs=1", "n_test=8"]
    assert main(["ablate", "--fast", "--output", str(out), *settings]) == 0
    rows = {r["key"]: r for r in json.loads((out / "results.json").read_text())["tables"]["on_policy"]["rows"]}
    assert list(rows) == ["kd", "kd-on-policy", "vlsi-on-policy", "vlsi"]
    for key in ("kd", "kd-on-policy", "vlsi-on-policy"):
        assert rows[key]["vs_vlsi"]["difference"] == pytest.approx(
            rows[key]["accuracy"]["mean"] - rows["vlsi"]["accuracy"]["mean"]
        )
    cache = out / "pool" / "cache"
    for run in ("kd", "vlsi"):
        assert f"teacher_cache: {cache}" in (out / "runs" / run / "seed-0" / "config.yaml").read_text()
    for run in ON_POLICY:
        config = (out / "runs" / run / "seed-0" / "config.yaml").read_text()
        assert "on_policy: 0.5" in config and "teacher_cache: ''" in config and "max_new_tokens: 2" in config
    assert "intermediate_loss: none" in (out / "runs" / "kd_on_policy" / "seed-0" / "config.yaml").read_text()
    assert "| on-policy VLsI |" in (out / "report.md").read_text()
