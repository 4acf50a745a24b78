"""`vlsi demo`: SFT only vs final-layer KD vs VLsI, from one student initialisation, on one budget, on CPU.

    vlsi demo --output /tmp/d            # about 4 minutes on 2 CPU cores; no network, no GPU
    vlsi demo --output /tmp/d --fast     # a seconds-long smoke run (CI)

DIR/
  results.json          accuracy of the teacher and the three students on the held-out test split, n_test, seeds,
                        seconds, and the details (per task and style, budget, wall time per method, peak memory)
  report.md             the table, the plots, one test example read layer by layer, what the budget counts
  verbalizer_loss.png   per-layer verbalizer loss (teacher: shipped with it; student: this run's stage 1)
  layer_match.png       which teacher layer each student layer matched, early vs late in the interaction stage
  data/                 the training and test splits (LLaVA JSON + PNG)
  runs/sft, runs/kd, runs/vlsi   the three students (`student/`), their metrics and configs
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import load_config, save_config
from ..data import VLDataset, read_dataset
from ..models.loading import load_model, load_processor
from ..pipeline import run_train
from ..plots import plot_verbalizer_loss
from ..stages.loop import MetricsLog
from ..stages.sft import sft
from .evaluate import encode_batches, evaluate
from .models import (
    STUDENT_DIR,
    STUDENT_TARGET_LAYERS,
    TEACHER_DIR,
    TEACHER_METRICS,
    TEACHER_TARGET_LAYERS,
    TEACHER_VERBALIZERS,
    teacher_card,
)
from .tasks import chance_accuracy, make_split, write_split

log = logging.getLogger("vlsi")
METHODS = ("sft", "kd", "vlsi")
RESULT_KEYS = {"sft": "student_sft", "kd": "student_kd", "vlsi": "student_vlsi"}


@dataclass
class DemoSettings:
    """Sizes and budget. Every student trains `steps` optimizer steps of `batch_size` examples in all, split so:
    SFT only: `steps` of SFT. KD: `distill_steps` of KL to the teacher's output, then SFT for the rest.
    VLsI: `verbalize_steps` of stage 1 and `distill_steps - verbalize_steps` of interaction, then SFT for the rest."""

    n_train: int = 2000
    n_test: int = 1200
    steps: int = 300
    distill_steps: int = 200
    verbalize_steps: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    verbalize_lr: float = 3e-3
    seed: int = 0
    threads: int = 1  # torch threads; one more core feeds the data loader (data.num_workers=1)
    eval_split: str = "test"  # "val" while choosing settings: the test split is for the final numbers only

    def check(self) -> DemoSettings:
        if not 0 < self.verbalize_steps < self.distill_steps < self.steps:
            raise ValueError(
                "demo settings need 0 < verbalize_steps < distill_steps < steps "
                f"(got {self.verbalize_steps}, {self.distill_steps}, {self.steps})"
            )
        if min(self.n_train, self.n_test, self.batch_size, self.threads) < 1:
            raise ValueError("demo settings n_train, n_test, batch_size and threads must be >= 1")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"demo setting eval_split must be test or val, got {self.eval_split!r}")
        return self


FAST = dict(n_train=64, n_test=48, steps=6, distill_steps=4, verbalize_steps=2, batch_size=8)


def budget(s: DemoSettings) -> dict:
    """Optimizer steps per stage and method; every method's total is `steps` (x `batch_size` examples)."""
    interact_steps = s.distill_steps - s.verbalize_steps
    return {
        "sft": {"sft": s.steps},
        "kd": {"kd": s.distill_steps, "sft": s.steps - s.distill_steps},
        "vlsi": {"verbalize": s.verbalize_steps, "interact": interact_steps, "sft": s.steps - s.distill_steps},
        "batch_size": s.batch_size,
        "examples_per_student": s.steps * s.batch_size,
    }


def demo_config(
    out: Path,
    stages: dict[str, int],
    *,
    seed: int,
    batch_size: int,
    lr: float,
    verbalize_lr: float,
    extra: list[str] = (),
    num_workers: int = 1,
):
    """A `vlsi train` configuration for the demo's models: `stages` gives each stage's optimizer steps (0: none)."""
    overrides = [
        "precision=fp32",
        "data.max_length=128",
        f"data.num_workers={num_workers}",
        "checkpoint.every=0",  # every run starts afresh: mid-stage checkpoints would only cost time
        f"seed={seed}",
        f"verbalizer.teacher_layers={json.dumps(TEACHER_TARGET_LAYERS)}",
        f"verbalizer.student_layers={json.dumps(STUDENT_TARGET_LAYERS)}",
    ]
    for stage in ("verbalize", "interact", "sft"):
        stage_lr = verbalize_lr if stage == "verbalize" else lr
        overrides += [
            f"{stage}.max_steps={stages.get(stage, 0)}",
            f"{stage}.batch_size={batch_size}",
            f"{stage}.grad_accum=1",
            f"{stage}.lr={stage_lr}",
            f"{stage}.min_lr={stage_lr / 10}",
        ]
    for stage in ("interact", "sft"):
        overrides += [f"{stage}.lora.enabled=false", f"{stage}.freeze_vision=true"]
    return load_config(
        None,
        [*overrides, *extra],
        teacher=str(TEACHER_DIR),
        student=str(STUDENT_DIR),
        output=str(out),
        teacher_verbalizers=str(TEACHER_VERBALIZERS),
    )


def _config(s: DemoSettings, out: Path, stages: dict[str, int], extra: list[str] = ()):
    return demo_config(
        out, stages, seed=s.seed, batch_size=s.batch_size, lr=s.lr, verbalize_lr=s.verbalize_lr, extra=extra
    )


def share_length_scans(samples, scans: Path, runs: list[Path], max_length: int = 128) -> None:
    """Scan the training samples' lengths once (into `scans`) and give every run folder the scan
    (`vlsi.data.VLDataset` checks each copy against its samples and processors, so a stale copy is only ignored)."""
    processor = load_processor(str(STUDENT_DIR))
    VLDataset(samples, {"model": processor}, max_length, cache_path=scans / "sft-lengths.json")
    VLDataset(samples, {"teacher": processor, "student": processor}, max_length, cache_path=scans / "interact.json")
    for run in runs:
        cache = run / ".cache"
        cache.mkdir(parents=True, exist_ok=True)
        for target in ("sft", "verbalize-student"):
            shutil.copy(scans / "sft-lengths.json", cache / f"{target}-lengths.json")
        shutil.copy(scans / "interact.json", cache / "interact-lengths.json")


def _banner(text: str) -> None:
    print(f"\n== vlsi demo: {text}", file=sys.stderr, flush=True)


def train_students(s: DemoSettings, out: Path, train_path: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Train the three students; -> ({method: final student dir}, {method: wall seconds})."""
    steps = budget(s)
    samples, _ = read_dataset(train_path)
    share_length_scans(samples, out / "runs" / ".cache", [out / "runs" / m for m in METHODS])
    finals, seconds = {}, {}

    _banner(f"(a) SFT only: {s.steps} SFT steps x {s.batch_size}")
    start = time.time()
    run = out / "runs" / "sft"
    cfg = _config(s, run, {"sft": s.steps})
    cfg.data.path = str(train_path)
    save_config(cfg, run / "config.yaml")
    finals["sft"] = sft(cfg, cfg.student, run / "student", MetricsLog(run / "metrics.jsonl"), samples)
    seconds["sft"] = time.time() - start

    kd = steps["kd"]
    _banner(f"(b) final-layer KD: {kd['kd']} KL steps, then {kd['sft']} SFT steps, x {s.batch_size}")
    start = time.time()
    run = out / "runs" / "kd"
    # Plain final-layer KD through the interaction stage: no intermediate loss, KL(teacher || student) at the output.
    # Its student verbalizers are never trained (verbalize.max_steps=0) and never used.
    cfg = _config(
        s,
        run,
        {"verbalize": 0, "interact": kd["kd"], "sft": kd["sft"]},
        ["interact.intermediate_loss=none", "interact.last_loss=kld", "verbalize.models=[student]"],
    )
    cfg.data.path = str(train_path)
    finals["kd"] = run_train(cfg)
    seconds["kd"] = time.time() - start

    v = steps["vlsi"]
    _banner(
        f"(c) VLsI: {v['verbalize']} verbalize + {v['interact']} interact + {v['sft']} SFT steps, x {s.batch_size} "
        "(teacher verbalizers shipped with the teacher)"
    )
    start = time.time()
    run = out / "runs" / "vlsi"
    cfg = _config(
        s,
        run,
        {"verbalize": v["verbalize"], "interact": v["interact"], "sft": v["sft"]},
        ["verbalize.models=[student]"],
    )
    cfg.data.path = str(train_path)
    finals["vlsi"] = run_train(cfg)
    seconds["vlsi"] = time.time() - start
    return finals, seconds


def evaluate_all(finals: dict[str, Path], test, batch_size: int = 128) -> dict[str, dict]:
    """Accuracy of the teacher and each student on the test items (one encoding of the test split for all)."""
    processor = load_processor(str(TEACHER_DIR))
    batches = encode_batches(processor, test, batch_size)
    results = {}
    for name, path in [("teacher", TEACHER_DIR), *finals.items()]:
        model = load_model(str(path), torch.float32)
        results[name] = evaluate(model, processor, test, batches)
        del model
    return results


def peak_memory_mib() -> dict[str, float]:
    """Peak resident memory of this process and of its largest child (the data loader workers), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"main": round(own, 1), "largest_child": round(children, 1)}


def run_demo(out: Path, s: DemoSettings, fast: bool = False) -> dict:
    """The whole demo; writes DIR/results.json and DIR/report.md and returns the results."""
    from .report import explain_example, write_report

    s.check()
    start = time.time()
    torch.set_num_threads(s.threads)
    card = teacher_card()
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "runs", ignore_errors=True)  # this command's own earlier output: never reuse stale stages

    _banner(f"data: {s.n_train} training and {s.n_test} held-out {s.eval_split} questions")
    train_items, test = make_split("train", s.n_train), make_split(s.eval_split, s.n_test)
    train_path = write_split(train_items, out / "data", "train")
    write_split(test, out / "data", s.eval_split)

    finals, seconds = train_students(s, out, train_path)

    _banner(f"evaluating the teacher and the three students on {len(test)} {s.eval_split} questions")
    evals = evaluate_all({m: finals[m] for m in METHODS}, test)

    _banner("plots and one test example read layer by layer")
    runs = out / "runs"
    merged = runs / "verbalizer_metrics.jsonl"
    teacher_rows = TEACHER_METRICS.read_text() if TEACHER_METRICS.is_file() else ""
    merged.write_text(teacher_rows + (runs / "vlsi" / "metrics.jsonl").read_text())
    plot_verbalizer_loss(merged, out / "verbalizer_loss.png")
    if (runs / "vlsi" / "layer_match.png").is_file():
        shutil.copy(runs / "vlsi" / "layer_match.png", out / "layer_match.png")
    example = explain_example(out, test, evals)

    results = {
        "teacher": evals["teacher"]["accuracy"],
        **{RESULT_KEYS[m]: evals[m]["accuracy"] for m in METHODS},
        "n_test": len(test),
        "seeds": [s.seed],
        "seconds": round(time.time() - start, 1),
        "chance": chance_accuracy(test),
        "by_task": {name: e["by_task"] for name, e in evals.items()},
        "by_style": {name: e["by_style"] for name, e in evals.items()},
        "budget": budget(s),
        "train_seconds": {m: round(t, 1) for m, t in seconds.items()},
        "peak_memory_mib": peak_memory_mib(),
        "settings": {**dataclasses.asdict(s), "fast": fast},
        "teacher_card": {k: card.get(k) for k in ("command", "seed", "architecture", "parameters", "training")},
        "machine": f"{torch.get_num_threads()} torch thread(s) + 1 data worker, torch {torch.__version__}",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out, results, example)
    _banner(
        f"done in {results['seconds']:.0f} s: teacher {results['teacher']:.3f}, SFT {results['student_sft']:.3f}, "
        f"KD {results['student_kd']:.3f}, VLsI {results['student_vlsi']:.3f} -> {out / 'report.md'}"
    )
    return results
