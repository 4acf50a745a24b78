"""`vlsi study`: should I distil? Accuracy against the number of labelled questions for the demo's four students
(SFT only, SFT with the teacher's answers, final-layer KD, VLsI), several seeds each, on the demo's task and
models, with a pool of questions the teacher answers.

    vlsi study --output /tmp/s            # about 30 minutes on 2 CPU cores (docs/STUDY.md); no network, no GPU
    vlsi study --output /tmp/s --fast     # a one-minute smoke run of the same code path (what CI runs)
    vlsi study --output /tmp/b axis=steps steps=25,50,100,200 control=1 seeds=8   # the budget curve

With `axis=steps` the runs vary the interaction steps (`steps`, replacing `distill_steps`) at `n_labelled` labelled
questions instead of the labelled-set size; `control=1` adds the CE / KLD deep-supervision control to every run.

Each (labelled-set size, seed) is one `vlsi demo` comparison (`experiment.train_students`): the same first
`size` training questions with gold answers, the same `n_pool` further questions answered by the teacher (answered
once for the whole study), the demo's budget and schedule. Runs go `jobs` at a time, one torch thread each; each
run's own output is in its folder's `log.txt`.

DIR/
  results.json   per size (or step budget) and student: accuracy mean, std, 95 % t CI over seeds and per seed,
                 before its last SFT stage too; paired comparisons (`experiment.PAIRS`): the seed-level mean
                 difference with its t CI and TOST equivalence, and each seed's cluster bootstrap (`stats`,
                 docs/DEMO.md#statistics)
  report.md      the table, the plot and what they say
  study.png      accuracy vs labelled questions, mean and 95 % t CI over seeds, teacher and student initialisation
  runs/n<size>-seed<k>/ (steps<n>-seed<k>/)   each run (as `vlsi demo`'s runs/) + score.json + log.txt
  data/          the training questions per size and the evaluation split (LLaVA JSON + PNG)
  pool/          the teacher's answers to the pool (answers/) and its cache per size (cache-n<size>/), made once

Re-running the same command reuses every finished run; other settings into the same DIR are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..runfolder import check_settings, write_json
from .ablate import Job, execute_jobs, job_pool, output_to
from .experiment import (
    CONTROL,
    CONTROL_PAIRS,
    DemoSettings,
    encode_test,
    evaluate_all,
    peak_memory_mib,
    train_students,
)
from .stats import cluster_bootstrap, paired_seeds, seed_mean
from .study_report import METHOD_NAMES, write_study_report


@dataclass
class StudySettings(DemoSettings):
    """The demo's settings, the axis to vary and its points, seeds per point, parallel runs. `axis=sizes`: the
    labelled-set sizes `sizes` (replacing `n_labelled`); `axis=steps`: the budget curve, the interaction steps
    `steps` (replacing `distill_steps`) at `n_labelled` labelled questions. `control=1` adds the CE / KLD
    deep-supervision control (`experiment.CONTROL`) to every run."""

    axis: str = "sizes"
    sizes: str = "30,100,300,1000"
    steps: str = "25,50,100,200"
    control: int = 0
    seeds: int = 3
    jobs: int = 2
    n_test: int = 600

    @property
    def size_list(self) -> list[int]:
        """The labelled-set sizes the runs use: `sizes` along that axis, else `n_labelled` alone."""
        return _integers(self.sizes) if self.axis == "sizes" else [self.n_labelled]

    @property
    def points(self) -> list[int]:
        """The axis' values, in order: labelled-set sizes or interaction steps."""
        return _integers(self.sizes if self.axis == "sizes" else self.steps)

    @property
    def methods(self) -> tuple[str, ...]:
        """The demo's students (`on_policy` adds two), then the control with `control=1`."""
        return (*super().methods, CONTROL) if self.control else super().methods

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return (*super().pairs, *CONTROL_PAIRS) if self.control else super().pairs

    def check(self) -> StudySettings:
        if self.axis not in ("sizes", "steps"):
            raise ValueError(f"study setting axis={self.axis!r}: sizes (labelled questions) or steps (the budget)")
        name = self.axis
        try:
            points = self.points
        except ValueError:
            raise ValueError(
                f"study setting {name}={getattr(self, name)!r}: expected comma-separated integers"
            ) from None
        if not points or points[0] < 1 or self.seeds < 1 or self.jobs < 1:
            raise ValueError(f"study settings need {name} >= 1 (at least one), seeds >= 1 and jobs >= 1")
        if self.control not in (0, 1):
            raise ValueError(f"study setting control={self.control}: 0 or 1")
        super().check()
        return self


def _integers(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


FAST = dict(
    sizes="8,16", seeds=1, jobs=1, n_pool=24, n_test=24, distill_steps=2, sft_steps=1, verbalize_steps=1, batch_size=4
)


def write_data(s: StudySettings, data: Path) -> tuple[dict[int, tuple[Path, Path]], Path, list]:
    """Per size: (labelled questions, labelled + pool) files; the first size's mixed file for answering the pool;
    the evaluation items. The pool is the same `n_pool` questions for every size (after the largest labelled set)."""
    from .tasks import make_split, write_split

    tasks, styles, largest = s.task_list, s.style_list, s.size_list[-1]
    items = make_split("train", largest + s.n_pool, tasks, styles)
    pool = items[largest:]
    files = {
        n: (
            write_split(items[:n], data, f"labelled-n{n}"),
            write_split(items[:n] + pool, data, f"train-n{n}", answered=n),
        )
        for n in s.size_list
    }
    test = make_split(s.eval_split, s.n_test, tasks, styles)
    write_split(test, data, s.eval_split)
    return files, files[s.size_list[0]][1], test


def shared_caches(s: StudySettings, pool: Path, files: dict[int, tuple[Path, Path]]) -> dict[int, list[str]]:
    """The teacher's cache (`experiment.teacher_cache`) once per labelled-set size, into pool/cache-n<size>, for every
    run of that size to read: its seeds (and with `axis=steps`, every step budget) train on the same answered
    questions with the same teacher and verbalizers, which is the cache's identity (`vlsi.cache` refuses a mismatch).
    -> {size: the settings that make a run read its size's cache}. The pool's answers are in pool/answers already."""
    from .experiment import answer_pool, teacher_cache

    caches = {}
    for n in s.size_list:
        mixed = files[n][1]
        caches[n] = teacher_cache(s, pool / f"cache-n{n}", mixed, answer_pool(s, pool, mixed))
    return caches


def run_one(job: Job, s: StudySettings, data: Path, answers: Path, caches: dict[int, list[str]]) -> dict:
    """Train and score the students of one (size, seed) on one torch thread, reading its size's teacher cache from
    `caches` (`shared_caches`; a size without one builds its own); -> its score.json contents."""
    from .tasks import read_split

    torch.set_num_threads(1)
    folder = Path(job.folder)
    done = folder / "score.json"
    if done.is_file():
        return json.loads(done.read_text())
    point = int(job.name.removeprefix("n").removeprefix("steps"))
    size = point if s.axis == "sizes" else s.n_labelled
    shutil.rmtree(folder / "runs", ignore_errors=True)  # a run killed midway starts afresh
    (folder / "runs" / "vlsi").mkdir(parents=True)
    if answers.is_dir():  # the pool, answered once for the whole study (none with n_pool=0)
        shutil.copytree(answers, folder / "runs" / "kd" / "answers")
    start = time.time()
    steps = point if s.axis == "steps" else s.distill_steps
    settings = dataclasses.replace(s, n_labelled=size, distill_steps=steps, seed=job.seed)
    with open(folder / "log.txt", "w") as stream, output_to(stream):
        finals, before, seconds, _ = train_students(
            settings,
            folder,
            data / f"labelled-n{size}.json",
            data / f"train-n{size}.json",
            num_workers=0,
            control=bool(s.control),
            cached=caches.get(size),
        )
        test = read_split(data / f"{s.eval_split}.json")
        encoded = encode_test(test, s.models)
        final, early = evaluate_all(finals, test, encoded), evaluate_all(before, test, encoded)
    scores = {
        "point": point,
        "size": size,
        "interact_steps": steps,
        "seed": job.seed,
        "accuracy": {m: final[m]["accuracy"] for m in s.methods},
        "before_sft": {m: early[m]["accuracy"] for m in s.methods},
        "hits": {m: final[m]["hits"] for m in s.methods},
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "seconds": round(time.time() - start, 1),
    }
    done.write_text(json.dumps(scores) + "\n")
    return scores


def summarise(s: StudySettings, runs: list[dict], clusters: list[str]) -> dict:
    """{point (labelled-set size or interaction steps): {method: accuracy mean, std, t CI and per seed
    (`stats.seed_mean`), before_sft likewise; "paired": {"a_vs_b": the seed-level difference (`stats.paired_seeds`),
    with "per_seed_bootstrap": each seed's `stats.cluster_bootstrap` over the test items' `clusters`},
    "paired_before_sft": seed-level differences}}. The seeds are the replicates: items of one seed are never pooled
    with another's as independent pairs."""
    table = {}
    for n in s.points:
        mine = sorted((r for r in runs if r["point"] == n), key=lambda r: r["seed"])
        row = {}
        for m in s.methods:
            row[m] = {**seed_mean([r["accuracy"][m] for r in mine]), "per_seed": [r["accuracy"][m] for r in mine]}
            row[f"{m}_before_sft"] = seed_mean([r["before_sft"][m] for r in mine])
        row["paired"] = {
            f"{a}_vs_{b}": {
                **paired_seeds(row[a]["per_seed"], row[b]["per_seed"]),
                "per_seed_bootstrap": [cluster_bootstrap(r["hits"][a], r["hits"][b], clusters) for r in mine],
            }
            for a, b in s.pairs
        }
        row["paired_before_sft"] = {
            f"{a}_vs_{b}": paired_seeds([r["before_sft"][a] for r in mine], [r["before_sft"][b] for r in mine])
            for a, b in s.pairs
        }
        table[str(n)] = row
    return table


def plot_study(results: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [int(n) for n in results["table"]]
    settings = results["settings"]
    fig, axes = plt.subplots(
        1,
        2 if settings["axis"] == "steps" else 1,
        figsize=(6.4 * (1 + (settings["axis"] == "steps")), 4.2),
        squeeze=False,
    )
    for ax, suffix, title in zip(axes[0], ("", "_before_sft"), ("after stage 3", "before stage 3")):
        _plot_axis(ax, results, sizes, suffix)
        if settings["axis"] == "steps":
            ax.set_title(f"{title}: mean and 95 % t CI over {settings['seeds']} seeds")
        else:
            ax.set_title(f"mean and 95 % t CI over {settings['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def _plot_axis(ax, results: dict, sizes: list[int], suffix: str) -> None:
    """One panel: every method's mean and 95 % t CI (`suffix` "_before_sft": before its last SFT stage)."""
    settings = results["settings"]
    for m, label in METHOD_NAMES:
        if f"{m}{suffix}" not in results["table"][str(sizes[0])]:
            continue
        rows = [results["table"][str(n)][f"{m}{suffix}"] for n in sizes]
        means = [100 * row["mean"] for row in rows]
        # one seed has no interval: no bar
        spans = [
            [0.0 if r["low"] is None else 100 * (r["mean"] - r["low"]) for r in rows],
            [0.0 if r["high"] is None else 100 * (r["high"] - r["mean"]) for r in rows],
        ]
        ax.errorbar(sizes, means, yerr=spans, marker="o", capsize=3, label=label)
    ax.axhline(100 * results["teacher"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.axhline(100 * results["student_init"], color="grey", linestyle=":", linewidth=1, label="student initialisation")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(sizes, [str(n) for n in sizes])
    if settings["axis"] == "steps":
        ax.set_xlabel(f"interaction steps (then {settings['sft_steps']} SFT steps; {settings['n_labelled']} labelled)")
    else:
        ax.set_xlabel(f"labelled training questions (+ {settings['n_pool']} answered by the teacher)")
    ax.set_ylabel(f"accuracy on {results['n_test']} held-out questions (%)")
    ax.legend(fontsize=8)


def _check_same_settings(out: Path, s: StudySettings) -> None:
    now = dataclasses.asdict(s)
    names = {k: k for k in now if k != "jobs"}  # more jobs only go faster
    check_settings(out / "settings.json", now, names, "a study", defaults=dataclasses.asdict(StudySettings()))
    write_json(out / "settings.json", now, indent=2)


def run_study(out: Path, s: StudySettings, fast: bool = False) -> dict:
    """The whole study; writes DIR/results.json, DIR/report.md and DIR/study.png and returns the results."""
    from .experiment import answer_pool
    from .models import teacher_card

    s.check()
    teacher_card(s.models)
    start = time.time()
    torch.set_num_threads(s.threads)  # the main process answers the pool: more threads than cores crawl when loaded
    _check_same_settings(out, s)
    data, runs_dir = out / "data", out / "runs"
    points = s.points
    print(
        f"== vlsi study: {len(points)} {s.axis} ({getattr(s, s.axis)}) x {s.seeds} seeds, {s.n_pool} questions "
        f"answered by the teacher, {s.n_test} {s.eval_split} questions",
        file=sys.stderr,
    )
    files, first_mixed, test = write_data(s, data)
    print("== vlsi study: the teacher answers the pool (once) and is scored", file=sys.stderr)
    answer_pool(s, out / "pool", first_mixed)
    print(
        "== vlsi study: the teacher's distributions, cached once per labelled-set size for every run", file=sys.stderr
    )
    caches = shared_caches(s, out / "pool", files)
    shipped = evaluate_all({"teacher": s.models.teacher, "init": s.student_dir}, test, encode_test(test, s.models))

    # largest first: the longest runs start first, so the last ones finish together
    prefix = "n" if s.axis == "sizes" else "steps"
    jobs = [
        Job("study", f"{prefix}{n}", k, str(runs_dir / f"{prefix}{n}-seed{k}"))
        for n in reversed(points)
        for k in range(s.seeds)
    ]
    print(f"== vlsi study: {len(jobs)} runs, {s.jobs} at a time; logs in {runs_dir}/<run>/log.txt", file=sys.stderr)
    with job_pool(s.jobs) as pool, tqdm(total=len(jobs), desc="study", unit="run", dynamic_ncols=True) as bar:
        work = functools.partial(run_one, s=s, data=data, answers=out / "pool" / "answers", caches=caches)
        done = execute_jobs(jobs, work, pool, bar)
    results = {
        "table": summarise(s, list(done.values()), [item.pattern for item in test]),
        "n_clusters": len({item.pattern for item in test}),
        "teacher": shipped["teacher"]["accuracy"],
        "student_init": shipped["init"]["accuracy"],
        "n_test": len(test),
        "seeds": list(range(s.seeds)),
        "seconds": round(time.time() - start, 1),
        "run_seconds": round(sum(r["seconds"] for r in done.values()), 1),
        "peak_memory_mib": peak_memory_mib(),
        "settings": {**dataclasses.asdict(s), "fast": fast},
        "machine": f"{s.jobs} run(s) at a time, 1 torch thread each, torch {torch.__version__}",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_study(results, out / "study.png")
    write_study_report(out, results)
    print(f"== vlsi study: done in {results['seconds']:.0f} s -> {out / 'report.md'}", file=sys.stderr)
    return results
