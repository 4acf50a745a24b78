"""`vlsi ablate`: the paper's ablations (matching strategies, loss operations, the SFT stage;
docs/METHOD.md#ablations-reported-by-the-paper) at demo scale, on the demo's task and models, several seeds per row.

    vlsi ablate --output /tmp/a            # about 30 minutes on 2 idle CPU cores; no network, no GPU
    vlsi ablate --output /tmp/a --fast     # a one-minute smoke run of the same code path (what CI runs)

The setting is `vlsi demo`'s (docs/DEMO.md): compare + sequence questions, `n_labelled` with gold answers and
`n_pool` more answered by the teacher (once, for the whole ablation), each stage warmed up and decayed to
`min_lr_ratio` x lr. The teacher then runs once more over all training questions into a teacher cache
(docs/CACHE.md; whole distributions, exact), which every interaction run reads instead of running the teacher at
each step. Every VLsI row starts from the shipped student initialisation and the student verbalizers of its seed
(stage 1, trained once per seed on the frozen student and shared by every row), then runs `distill_steps` of
interaction with the row's setting and `sft_steps` of SFT. Rows differ in nothing else. Runs go `jobs` at a time,
one torch thread each; each run's own output (progress bars, logs) is in its folder's `log.txt`.

DIR/
  results.json   per table and row: accuracy mean, standard deviation, 95 % t CI over seeds and per seed; the
                 difference to the VLsI row paired by seed (t CI, TOST within +-2 points); the paper's numbers
  report.md      the three tables with the paper's numbers beside them, and what they say
  runs/<run>/seed-<n>/   each run: an ordinary `vlsi train` output folder + score.json + log.txt
  pool/answers/  the teacher's answers to the unlabelled training questions (copied into every run)
  pool/cache/    the teacher's verbalized distributions at every target layer (`teacher_cache` of every VLsI row)
  data/          the training and evaluation splits (LLaVA JSON + PNG)

With `on_policy=λ` > 0 the `on_policy` table comes too: KD and VLsI again with interact.on_policy=λ, whose runs
use the live teacher (a cache holds the fixed answers' targets only).

Re-running the same command reuses every finished run; other settings into the same DIR are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..runfolder import check_settings, write_json
from .experiment import KD_SETTINGS, ON_POLICY, DemoSettings, answer_settings, on_policy_settings, stage_config
from .stats import paired_seeds, seed_mean

log = logging.getLogger("vlsi")

PAPER_COLUMNS = ("MMB", "BLINK", "MM-Vet", "MMMU")
VLSI = (86.3, 59.7, 75.8, 69.3)  # the full method, 7B student (docs/METHOD.md#ablations-reported-by-the-paper)
NO_RANGE_NO_ORDER = ["interact.match.search_range=false", "interact.match.order=false"]

# Training runs: name -> `vlsi train` settings on top of the demo configuration. "sft" is SFT alone.
RUNS: dict[str, list[str]] = {
    "random": ["interact.match.strategy=random", *NO_RANGE_NO_ORDER],
    "uniform": ["interact.match.strategy=uniform", *NO_RANGE_NO_ORDER],
    "bottom1": ["interact.match.strategy=bottom_k", "interact.match.bottom_k=1", *NO_RANGE_NO_ORDER],
    "bottom3": ["interact.match.strategy=bottom_k", "interact.match.bottom_k=3", *NO_RANGE_NO_ORDER],
    "multinomial": ["interact.match.strategy=multinomial", *NO_RANGE_NO_ORDER],
    "range": ["interact.match.strategy=multinomial", "interact.match.order=false"],
    "order": ["interact.match.strategy=multinomial"],
    "vlsi": [],  # adaptive temperature, search range, order; KLD / KLD: the method as described
    "ce-none": ["interact.intermediate_loss=ce", "interact.last_loss=none"],
    "ce-ce": ["interact.intermediate_loss=ce", "interact.last_loss=ce"],
    "ce-kld": ["interact.intermediate_loss=ce", "interact.last_loss=kld"],
    "l2-kld": ["interact.intermediate_loss=l2", "interact.last_loss=kld"],
    "kld-none": ["interact.intermediate_loss=kld", "interact.last_loss=none"],
    "kld-ce": ["interact.intermediate_loss=kld", "interact.last_loss=ce"],
    "kd": KD_SETTINGS,  # final-layer KD: not in the paper's table
    # with `on_policy=λ` > 0 (the on_policy table): KD and VLsI with interact.on_policy=λ, the live teacher, no cache
    "kd_on_policy": KD_SETTINGS,
    "vlsi_on_policy": [],
    "sft": [],
}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    run: str  # the training run whose student this row scores; "init" / "teacher": a shipped model, untrained
    paper: tuple  # the paper's (MMB, BLINK, MM-Vet, MMMU); None where it gives no number
    checkpoint: str = "student"  # "student": after the last stage; "interact": VLsI before its SFT stage


TABLES: dict[str, tuple[str, list[Row]]] = {
    "matching": (
        "Matching strategy (docs/METHOD.md; intermediate and last-layer loss KLD)",
        [
            Row("random", "random teacher layer", "random", (77.0, 50.0, 62.0, 52.0)),
            Row("uniform", "uniform: i_l = i_s * (t_l // t_s)", "uniform", (79.5, 51.9, 66.5, 55.3)),
            Row("bottom1", "bottom-1 (smallest KL)", "bottom1", (81.2, 53.8, 67.8, 57.7)),
            Row("bottom3", "bottom-3 (mean of the 3 smallest)", "bottom3", (81.5, 54.0, 68.0, 58.0)),
            Row("multinomial", "multinomial over all layers (T = 1)", "multinomial", (82.0, 54.5, 68.5, 58.5)),
            Row("range", "+ search range", "range", (83.5, 55.5, 69.8, 60.0)),
            Row("order", "+ order preservation", "order", (86.0, 59.2, 75.2, 68.5)),
            Row("adaptive", "+ adaptive temperature (VLsI)", "vlsi", VLSI),
        ],
    ),
    "losses": (
        "Loss operations, intermediate / last layer (docs/METHOD.md; adaptive matching)",
        [
            Row("ce-none", "CE / none", "ce-none", (79.2, 51.3, 64.5, 56.5)),
            Row("ce-ce", "CE / CE", "ce-ce", (77.8, None, None, None)),
            Row("ce-kld", "CE / KLD", "ce-kld", (81.0, None, None, None)),
            Row("l2-kld", "L2 / KLD", "l2-kld", (81.5, None, None, None)),
            Row("kld-none", "KLD / none", "kld-none", (83.0, 55.0, 69.5, 61.0)),
            Row("kld-ce", "KLD / CE", "kld-ce", (81.5, None, None, None)),
            Row("kd", "none / KLD (final-layer KD, not in the paper)", "kd", (None, None, None, None)),
            Row("kld-kld", "KLD / KLD (VLsI)", "vlsi", VLSI),
        ],
    ),
    "sft": (
        "The SFT stage (docs/METHOD.md)",
        [
            Row("init", "student initialisation, untrained", "init", (None, None, None, None)),
            Row("sft", "student + SFT only (stage 3's steps and data)", "sft", (81.8, 52.3, 63.7, 55.2)),
            Row("no-sft", "VLsI without stage 3", "vlsi", (82.1, 49.6, 60.5, 52.9), checkpoint="interact"),
            Row("vlsi", "VLsI (verbalize, interact, SFT)", "vlsi", VLSI),
        ],
    ),
    "on_policy": (
        "On the student's own samples (`on_policy=λ`: that share of interaction batches; not in the paper)",
        [
            Row("kd", "final-layer KD", "kd", (None, None, None, None)),
            Row("kd-on-policy", "on-policy final-layer KD", "kd_on_policy", (None, None, None, None)),
            Row("vlsi-on-policy", "on-policy VLsI", "vlsi_on_policy", (None, None, None, None)),
            Row("vlsi", "VLsI", "vlsi", VLSI),
        ],
    ),
}


@dataclass
class AblateSettings(DemoSettings):
    """The demo's task, data, schedule and budget (`DemoSettings`), then seeds, parallel runs and tables. Per seed:
    stage 1 of the student once (`verbalize_steps`), then for every VLsI row `distill_steps` interaction steps +
    `sft_steps` SFT steps of `batch_size` examples; the SFT-only row gets the `sft_steps` alone."""

    seeds: int = 3  # seeds 0 .. seeds-1
    jobs: int = 2  # runs at once, one torch thread each
    tables: str = "matching,losses,sft"  # with on_policy > 0 the on_policy table comes too

    def check(self) -> AblateSettings:
        if min(self.seeds, self.jobs) < 1:
            raise ValueError("ablate settings seeds and jobs must be >= 1")
        unknown = [t for t in self.table_names() if t not in TABLES]
        if unknown or not self.table_names():
            raise ValueError(f"ablate setting tables: unknown {unknown}; choose from {','.join(TABLES)}")
        if "on_policy" in self.table_names() and not self.on_policy:
            raise ValueError("ablate setting tables: the on_policy table needs on_policy=λ > 0 (e.g. on_policy=0.5)")
        super().check()
        return self

    def table_names(self) -> list[str]:
        chosen = [t for t in self.tables.split(",") if t]
        return [*chosen, "on_policy"] if self.on_policy and "on_policy" not in chosen else chosen


FAST = dict(n_labelled=16, n_pool=48, n_test=48, distill_steps=2, sft_steps=2, verbalize_steps=2, batch_size=8, seeds=2)


def needed_runs(s: AblateSettings) -> list[str]:
    """Training runs the chosen tables read, in table order, each once."""
    runs = [row.run for t in s.table_names() for row in TABLES[t][1]]
    return list(dict.fromkeys(r for r in runs if r not in ("init", "teacher")))


# ----------------------------------------------------------------------------------------------- one job


@dataclass(frozen=True)
class Job:
    kind: str  # "verbalize" (stage 1 of a seed) | "train" (a run, then score it) | "score" (a shipped model)
    name: str  # run name, "init" / "teacher", or "verbalize"
    seed: int
    folder: str


_TEST_CACHE: dict = {}


def _score(path: Path, test_path: Path, models) -> dict:
    """Accuracy of the checkpoint at `path` on the evaluation split, with the tokenizer of `models` (a
    `models.ModelSet`; encoded once per process)."""
    from ..models.loading import load_model, load_processor
    from .evaluate import encode_batches, evaluate
    from .tasks import read_split

    key = (str(test_path), str(models.folder))
    if key not in _TEST_CACHE:
        processor = load_processor(str(models.teacher))
        items = read_split(test_path)
        _TEST_CACHE[key] = (processor, items, encode_batches(processor, items, 128))
    processor, items, batches = _TEST_CACHE[key]
    result = evaluate(load_model(str(path), torch.float32), processor, items, batches)
    for detail in ("replies", "hits"):  # per-item: score.json keeps the summary
        result.pop(detail)
    return result


def run_job(job: Job, s: AblateSettings, data: Path, answers: Path, cache: tuple[str, ...] = ()) -> dict:
    """Do one job on one torch thread, its output into `job.folder/log.txt`; -> its score.json contents (empty
    for verbalize). `answers`: the teacher's answers to the pool, copied into the run (never answered again);
    `cache`: the settings that make an interaction run read the teacher cache instead of running the teacher."""
    from ..pipeline import run_train
    from ..stages.loop import MetricsLog
    from ..stages.samples import load_samples
    from ..stages.sft import sft
    from ..stages.verbalize import verbalize

    torch.set_num_threads(1)
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / "score.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.time()
    test = data / f"{s.eval_split}.json"
    scores: dict = {}
    with open(folder / "log.txt", "w") as stream, output_to(stream):
        if job.kind == "score":
            scores["student"] = _score(s.models.teacher if job.name == "teacher" else s.student_dir, test, s.models)
        else:
            if job.kind == "verbalize":
                steps = {"verbalize": s.verbalize_steps}
            elif job.name == "sft":
                steps = {"sft": s.sft_steps}
            else:
                steps = {"verbalize": s.verbalize_steps, "interact": s.distill_steps, "sft": s.sft_steps}
            extra = [*RUNS.get(job.name, []), "verbalize.models=[student]", *answer_settings(s)]
            if job.name in ON_POLICY:  # the live teacher scores the student's samples: no cache
                extra += on_policy_settings(s)
            elif job.kind == "train" and job.name != "sft":  # the runs with an interaction stage
                extra += cache
            cfg = stage_config(dataclasses.replace(s, seed=job.seed), folder, steps, data / "train.json", extra, 0)
            if answers.is_dir() and not (folder / "answers").exists():
                shutil.copytree(answers, folder / "answers")
            samples = load_samples(cfg)
            metrics = MetricsLog(folder / "metrics.jsonl")
            if job.kind == "verbalize":
                verbalize(cfg, str(s.student_dir), "student", folder / "verbalizers" / "student", metrics, samples)
            elif job.name == "sft":
                trained = sft(cfg, str(s.student_dir), folder / "student", metrics, samples)
                scores["student"] = _score(trained, test, s.models)
            else:
                shared = folder.parent.parent / "verbalize" / f"seed-{job.seed}" / "verbalizers" / "student"
                own = folder / "verbalizers" / "student"
                if not own.exists():
                    shutil.copytree(shared, own)
                scores["student"] = _score(run_train(cfg), test, s.models)
                scores["interact"] = _score(folder / "stages" / "interact" / "student", test, s.models)
    scores["seconds"] = round(time.time() - start, 1)
    write_json(done, scores, indent=2)  # whole or absent: its presence marks the job finished
    return scores


@contextlib.contextmanager
def output_to(stream):
    """Send print, progress bars and log records of the code inside to `stream`."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = [logging.StreamHandler(stream)]
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(stream), contextlib.redirect_stdout(stream):
            yield
    finally:
        root.handlers, root.level = handlers, level


# ----------------------------------------------------------------------------------------------- the whole


def _jobs(s: AblateSettings, runs_dir: Path) -> tuple[list[Job], list[Job]]:
    """(stage-1 jobs, one per seed; every other job). Longest first, so the last jobs finish together."""
    first = [Job("verbalize", "verbalize", n, str(runs_dir / "verbalize" / f"seed-{n}")) for n in range(s.seeds)]
    rest = [
        Job("train", run, seed, str(runs_dir / run / f"seed-{seed}"))
        for run in needed_runs(s)
        if run != "sft"
        for seed in range(s.seeds)
    ]
    if "sft" in needed_runs(s):
        rest += [Job("train", "sft", seed, str(runs_dir / "sft" / f"seed-{seed}")) for seed in range(s.seeds)]
    if "sft" in s.table_names():
        rest += [Job("score", "init", 0, str(runs_dir / "init"))]
    rest += [Job("score", "teacher", 0, str(runs_dir / "teacher"))]
    return first, rest


def _check_same_settings(out: Path, s: AblateSettings) -> None:
    now = dataclasses.asdict(s)
    keep = ("jobs", "tables")  # neither changes a run: more tables add runs, more jobs only go faster
    names = {k: k for k in now if k not in keep}
    check_settings(out / "settings.json", now, names, "an ablation", defaults=dataclasses.asdict(AblateSettings()))
    write_json(out / "settings.json", now, indent=2)


class RunFailed(RuntimeError):
    """A run of `vlsi ablate` or `vlsi study` failed; the message names the run and its log. `vlsi.cli.main` prints
    it as one line (exit 2), as it does bad input."""


def _end_with(parent: int) -> None:
    # a pool worker's initializer: a daemon thread ends the worker once `parent` is gone (the worker is re-parented)
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


@contextlib.contextmanager
def job_pool(jobs: int):
    """`jobs` spawned worker processes for `execute_jobs` (None for one: the runs go in this process). A worker ends
    within a second of this process ending, however it ends (SIGTERM or SIGKILL included, which skip every cleanup),
    so a stopped study or ablation leaves no run training on."""
    if jobs <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_end_with, initargs=(os.getpid(),))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def execute_jobs(jobs: list, work, pool, bar) -> dict:
    """{job: work(job)} for every job (each with .name, .seed, .folder), in `pool` if given (else here, in order);
    the first failure cancels the rest and raises RunFailed naming the job's log."""
    results: dict = {}
    if pool is None:
        for job in jobs:
            try:
                results[job] = work(job)
            except Exception as e:
                raise RunFailed(f"{job.name} seed {job.seed} failed ({e}); its log: {job.folder}/log.txt") from e
            bar.update(1)
            bar.set_postfix_str(f"{job.name} seed {job.seed}")
        return results
    pending: dict[Future, object] = {pool.submit(work, job): job for job in jobs}
    while pending:
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            job = pending.pop(future)
            try:
                results[job] = future.result()
            except Exception as e:
                for other in pending:
                    other.cancel()
                raise RunFailed(f"{job.name} seed {job.seed} failed ({e}); its log: {job.folder}/log.txt") from e
            bar.update(1)
            bar.set_postfix_str(f"{job.name} seed {job.seed}")
    return results


def collect(s: AblateSettings, scores: dict[tuple[str, int], dict]) -> dict:
    """{table: {"title", "rows": [...]}} from the scores of every (run, seed): each row's accuracy over seeds with its
    t CI (`stats.seed_mean`) and, for a trained row other than VLsI, "vs_vlsi": its difference to the VLsI run,
    paired by seed (`stats.paired_seeds`)."""
    vlsi = [scores[("vlsi", seed)]["student"]["accuracy"] for seed in range(s.seeds)]  # every table has its row
    tables = {}
    for name in s.table_names():
        title, rows = TABLES[name]
        out_rows = []
        for row in rows:
            seeds = [0] if row.run in ("init", "teacher") else list(range(s.seeds))
            values = [scores[(row.run, seed)][row.checkpoint]["accuracy"] for seed in seeds]
            compared = row.run not in ("init", "teacher", "vlsi") or row.checkpoint != "student"
            out_rows.append(
                {
                    "key": row.key,
                    "label": row.label,
                    "run": row.run,
                    "checkpoint": row.checkpoint,
                    "settings": RUNS.get(row.run, []),
                    "accuracy": {**seed_mean(values), "per_seed": values},
                    "vs_vlsi": paired_seeds(values, vlsi) if compared else None,
                    "paper": dict(zip(PAPER_COLUMNS, row.paper)),
                }
            )
        tables[name] = {"title": title, "rows": out_rows}
    return tables


def run_ablate(out: Path, s: AblateSettings, fast: bool = False) -> dict:
    """The whole ablation; writes DIR/results.json and DIR/report.md and returns the results."""
    from .ablate_report import write_ablate_report
    from .experiment import answer_pool, peak_memory_mib, share_length_scans, teacher_cache
    from .models import teacher_card
    from .tasks import chance_accuracy, make_split, write_split

    s.check()
    teacher_card(s.models)  # the shipped models are there, or one clear error
    start = time.time()
    torch.set_num_threads(s.threads)  # the main process answers the pool and builds the cache (`vlsi demo` does too)
    _check_same_settings(out, s)
    data, runs_dir = out / "data", out / "runs"
    tasks, styles = s.task_list, s.style_list
    print(
        f"== vlsi ablate: data: {s.n_labelled} labelled + {s.n_pool} unlabelled training questions, {s.n_test} "
        f"{s.eval_split} questions ({', '.join(tasks)}; answered as {', '.join(styles)})",
        file=sys.stderr,
    )
    test = make_split(s.eval_split, s.n_test, tasks, styles)
    mixed = write_split(make_split("train", s.n_labelled + s.n_pool, tasks, styles), data, "train", s.n_labelled)
    write_split(test, data, s.eval_split)
    print("== vlsi ablate: the teacher answers the unlabelled questions (once for every run)", file=sys.stderr)
    samples = answer_pool(s, out / "pool", mixed)
    print("== vlsi ablate: the teacher's distributions, cached once for every interaction run", file=sys.stderr)
    cache = teacher_cache(s, out / "pool" / "cache", mixed, samples)
    first, rest = _jobs(s, runs_dir)
    share_length_scans(
        samples, runs_dir / ".cache", [Path(j.folder) for j in first + rest if j.kind != "score"], s.student_dir
    )

    print(
        f"== vlsi ablate: {len(needed_runs(s))} runs x {s.seeds} seeds, {s.jobs} at a time; "
        f"each run's log: {runs_dir}/<run>/seed-<n>/log.txt",
        file=sys.stderr,
    )
    total = len(first) + len(rest)
    with job_pool(s.jobs) as pool, tqdm(total=total, desc="ablate", unit="run", dynamic_ncols=True) as bar:
        work = functools.partial(run_job, s=s, data=data, answers=out / "pool" / "answers", cache=tuple(cache))
        done = execute_jobs(first, work, pool, bar)
        done |= execute_jobs(rest, work, pool, bar)
    scores = {(job.name, job.seed): result for job, result in done.items() if job.kind != "verbalize"}
    results = {
        "tables": collect(s, scores),
        "teacher": scores[("teacher", 0)]["student"]["accuracy"],
        "n_test": len(test),
        "seeds": list(range(s.seeds)),
        "chance": chance_accuracy(test),
        "budget": {
            "verbalize_steps (once per seed, shared)": s.verbalize_steps,
            "interact_steps": s.distill_steps,
            "sft_steps": s.sft_steps,
            "batch_size": s.batch_size,
        },
        "seconds": round(time.time() - start, 1),
        "run_seconds": round(sum(r.get("seconds", 0.0) for r in done.values()), 1),
        "peak_memory_mib": peak_memory_mib(),
        "settings": {**dataclasses.asdict(s), "fast": fast},
        "machine": f"{s.jobs} run(s) at a time, 1 torch thread each, torch {torch.__version__}",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_ablate_report(out, results)
    print(f"== vlsi ablate: done in {results['seconds']:.0f} s -> {out / 'report.md'}", file=sys.stderr)
    return results
