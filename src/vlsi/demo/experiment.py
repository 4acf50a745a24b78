"""`vlsi demo`: SFT only vs SFT with the teacher's answers vs final-layer KD vs VLsI, from one student
initialisation, on one budget, on CPU.

    vlsi demo --output /tmp/d            # about 4 minutes on 2 CPU cores; no network, no GPU
    vlsi demo --output /tmp/d --fast     # a seconds-long smoke run (CI)

DIR/
  results.json          accuracy of the teacher, the student initialisation and the four students on the held-out
                        test split, n_test, seeds, seconds, each student before its last SFT stage, paired
                        comparisons (a bootstrap over task x pattern clusters, docs/DEMO.md#statistics), and the
                        details (per task, budget, wall time per method, peak memory)
  report.md             the table, the plots, one test example read layer by layer, what the budget counts
  verbalizer_loss.png   per-layer verbalizer loss (teacher: shipped with it; student: this run's stage 1)
  layer_match.png       which teacher layer each student layer matched, early vs late in the interaction stage
  data/                 the training and test splits (LLaVA JSON + PNG)
  runs/sft, runs/sft_teacher, runs/kd, runs/vlsi   the four students (`student/`), their metrics and configs
  runs/kd_on_policy, runs/vlsi_on_policy   with `on_policy=λ` > 0: KD and VLsI on the student's own samples too
  runs/.teacher-cache   the teacher's verbalized distributions on the training questions, run once for KD and VLsI
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import resource
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..cache import build_cache
from ..config import load_config, save_config
from ..data import VLDataset, read_dataset
from ..models.loading import load_model, load_processor
from ..models.verbalizer import Verbalizers
from ..pipeline import run_train
from ..plots import plot_verbalizer_loss
from ..runfolder import read_jsonl
from ..stages.loop import MetricsLog
from ..stages.samples import load_samples
from ..stages.sft import sft
from ..stages.verbalize import verbalize
from .evaluate import answer_tokens, encode_batches, evaluate, layer_accuracy
from .models import (
    MODEL_SETS,
    SHIPPED,
    STUDENT_TARGET_LAYERS,
    STUDENTS,
    TEACHER_TARGET_LAYERS,
    ModelSet,
    student_folder,
    teacher_card,
)
from .stats import cluster_bootstrap, paired
from .tasks import ALL_STYLES, CHAIN, TASKS, chance_accuracy, make_split, write_split

log = logging.getLogger("vlsi")
METHODS = ("sft", "sft_teacher", "kd", "vlsi")
ON_POLICY = ("kd_on_policy", "vlsi_on_policy")  # with `on_policy=λ` > 0: KD and VLsI with interact.on_policy=λ
RESULT_KEYS = {
    "sft": "student_sft",
    "sft_teacher": "student_sft_teacher",
    "kd": "student_kd",
    "vlsi": "student_vlsi",
    "kd_on_policy": "student_kd_on_policy",
    "vlsi_on_policy": "student_vlsi_on_policy",
}


@dataclass
class DemoSettings:
    """The task, the data and the budget (docs/DEMO.md). The student must learn `tasks` (its initialisation reads
    digits and counts, but has never compared two digits or continued a sequence); the teacher answers them right.

    Data: `n_labelled` training questions with gold answers, and `n_pool` more questions without answers, which the
    teacher answers (`data.answers=teacher`). SFT only has no teacher, so it trains on the labelled questions alone.
    Budget, in optimizer steps of `batch_size` examples, equal for every method:
      SFT only: `distill_steps` of SFT, then `sft_steps` of SFT (the same two-stage schedule as the others)
      KD:       `distill_steps` of KL to the teacher's output, then `sft_steps` of SFT
      VLsI:     `distill_steps` of interaction, then `sft_steps` of SFT; before that `verbalize_steps` of stage 1,
                which trains only the student's verbalizers on its frozen backbone (not charged; its time is shown)
    Each stage warms up for `warmup` of its steps, then decays (cosine) from its lr to `min_lr_ratio` x lr."""

    tasks: str = "compare,sequence"
    styles: str = "number"
    n_labelled: int = 150
    n_pool: int = 2000
    n_test: int = 1200
    distill_steps: int = 200
    sft_steps: int = 100
    verbalize_steps: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    verbalize_lr: float = 3e-3
    warmup: float = 0.1
    min_lr_ratio: float = 0.01
    seed: int = 0
    threads: int = 1  # torch threads; one more core feeds the data loader (data.num_workers=1)
    eval_split: str = "test"  # "val" while choosing settings: the test split is for the final numbers only
    intermediate_reduction: str = "sum"  # VLsI's layer terms: their sum (the paper) or mean (interact.* in CONFIG.md)
    intermediate_weight: float = 1.0  # λ on VLsI's (and the control's) layer terms: interact.intermediate_weight
    freeze_student_verbalizers: int = 0  # 1: the student's verbalizers stay as stage 1 left them in the interaction
    on_policy: float = 0.0  # λ > 0: two more students, KD and VLsI with interact.on_policy=λ (live teacher, no cache)
    # stage 3 (every student's last SFT stage) as the paper runs it: LoRA of rank R (alpha R) on the language model
    # instead of full fine-tuning (0), at `stage3_lr` (0: `lr`; the paper: 1e-4), decayed to min_lr_ratio x it
    stage3_lora: int = 0
    stage3_lr: float = 0.0
    # the shipped models (teacher, its verbalizers, student initialisation; `models.MODEL_SETS`): "" the set trained on
    # number, yesno and choice answers; "chain" the set trained on chains too (styles=chain needs it)
    teacher: str = ""
    # another student initialisation: a folder (with the shipped tokenizer) or a shipped one by name (`STUDENTS`:
    # deep-thin, 8 blocks x 32); "": the chosen set's 4 x 64 one
    student: str = ""
    student_layers: str = ""  # its target layers, e.g. 0,1,2,3,4; "": the shipped student's (0,1,2) or the named one's

    @property
    def models(self) -> ModelSet:
        return MODEL_SETS[self.teacher]

    @property
    def student_dir(self) -> Path:
        return student_folder(self.student, self.models)

    @property
    def student_target_layers(self) -> list[int]:
        if self.student_layers:
            return [int(x) for x in self.student_layers.split(",")]
        return STUDENTS[self.student][1] if self.student in STUDENTS else STUDENT_TARGET_LAYERS

    @property
    def methods(self) -> tuple[str, ...]:
        """The students this run trains: the four, then the two on-policy ones with `on_policy` > 0."""
        return (*METHODS, *ON_POLICY) if self.on_policy else METHODS

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        """Its paired comparisons: `PAIRS`, then `ON_POLICY_PAIRS` with `on_policy` > 0."""
        return (*PAIRS, *ON_POLICY_PAIRS) if self.on_policy else PAIRS

    @property
    def task_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())

    @property
    def style_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.styles.split(",") if t.strip())

    def check(self) -> DemoSettings:
        for name, chosen, known in (("tasks", self.task_list, TASKS), ("styles", self.style_list, ALL_STYLES)):
            if not chosen or set(chosen) - set(known):
                raise ValueError(f"demo setting {name}={getattr(self, name)!r}: use some of {','.join(known)}")
        if min(self.distill_steps, self.sft_steps, self.verbalize_steps) < 1:
            raise ValueError("demo settings distill_steps, sft_steps and verbalize_steps must be >= 1")
        if min(self.n_labelled, self.n_test, self.batch_size, self.threads) < 1 or self.n_pool < 0:
            raise ValueError("demo settings n_labelled, n_test, batch_size and threads must be >= 1, n_pool >= 0")
        if not (0 <= self.warmup < 1 and 0 < self.min_lr_ratio <= 1):
            raise ValueError("demo settings need 0 <= warmup < 1 and 0 < min_lr_ratio <= 1")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"demo setting eval_split must be test or val, got {self.eval_split!r}")
        if self.intermediate_reduction not in ("sum", "mean"):
            raise ValueError(f"demo setting intermediate_reduction: sum or mean, not {self.intermediate_reduction!r}")
        if not (math.isfinite(self.intermediate_weight) and self.intermediate_weight >= 0):
            raise ValueError(f"demo setting intermediate_weight={self.intermediate_weight}: a finite number >= 0")
        if self.freeze_student_verbalizers not in (0, 1):
            raise ValueError(f"demo setting freeze_student_verbalizers={self.freeze_student_verbalizers}: 0 or 1")
        if self.stage3_lora < 0 or not (math.isfinite(self.stage3_lr) and self.stage3_lr >= 0):
            raise ValueError(
                f"demo settings stage3_lora={self.stage3_lora}, stage3_lr={self.stage3_lr}: a LoRA rank >= 0 (0: "
                "full fine-tuning) and a learning rate >= 0 (0: lr)"
            )
        if not 0 <= self.on_policy <= 1:
            raise ValueError(f"demo setting on_policy={self.on_policy}: a share of interaction batches, 0 to 1")
        if self.teacher not in MODEL_SETS:
            raise ValueError(f"demo setting teacher={self.teacher!r}: a shipped set, one of {list(MODEL_SETS)}")
        if CHAIN in self.style_list and not self.teacher:
            raise ValueError(
                f"demo setting styles={self.styles}: the shipped teacher was not trained on chain answers; add "
                "teacher=chain (the set trained on them)"
            )
        if self.teacher and self.student in STUDENTS:
            raise ValueError(
                f"demo settings teacher={self.teacher}, student={self.student}: the named students share the default "
                "set's tokenizer, not this one's; leave student out (the set's own) or give a folder"
            )
        if self.student and not (self.student_dir / "config.json").is_file():
            raise ValueError(
                f"demo setting student={self.student}: no Hugging Face checkpoint (config.json) there; or name a "
                f"shipped one ({', '.join(STUDENTS)})"
            )
        if self.student_layers and not all(x.strip().isdigit() for x in self.student_layers.split(",")):
            raise ValueError(f"demo setting student_layers={self.student_layers!r}: write block indices, e.g. 0,1,2")
        return self


FAST = dict(n_labelled=16, n_pool=48, n_test=48, distill_steps=4, sft_steps=2, verbalize_steps=2, batch_size=8)


def budget(s: DemoSettings) -> dict:
    """Optimizer steps per stage and method: every method's charged total is `distill_steps + sft_steps`."""
    return {
        "sft": {"sft_1": s.distill_steps, "sft": s.sft_steps},
        "sft_teacher": {"sft_1": s.distill_steps, "sft": s.sft_steps},
        "kd": {"kd": s.distill_steps, "sft": s.sft_steps},
        "vlsi": {"interact": s.distill_steps, "sft": s.sft_steps},
        "uncharged": {"vlsi_verbalize": s.verbalize_steps},
        "batch_size": s.batch_size,
        "examples_per_student": (s.distill_steps + s.sft_steps) * s.batch_size,
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
    warmup: float = 0.0,
    min_lr_ratio: float = 0.1,
    student: Path | None = None,
    student_layers: list[int] = STUDENT_TARGET_LAYERS,
    models: ModelSet = SHIPPED,
):
    """A `vlsi train` configuration for the demo's models: `stages` gives each stage's optimizer steps (0: none);
    every stage warms up for `warmup` of its steps and decays to `min_lr_ratio` x its learning rate. `models`: the
    shipped set whose teacher and verbalizers it uses; `student`: None for that set's student."""
    overrides = [
        "precision=fp32",
        "data.max_length=128",
        f"data.num_workers={num_workers}",
        "checkpoint.every=0",  # every run starts afresh: mid-stage checkpoints would only cost time
        f"seed={seed}",
        f"verbalizer.teacher_layers={json.dumps(TEACHER_TARGET_LAYERS)}",
        f"verbalizer.student_layers={json.dumps(student_layers)}",
    ]
    for stage in ("verbalize", "interact", "sft"):
        stage_lr = verbalize_lr if stage == "verbalize" else lr
        steps = stages.get(stage, 0)
        overrides += [
            f"{stage}.max_steps={steps}",
            f"{stage}.batch_size={batch_size}",
            f"{stage}.grad_accum=1",
            f"{stage}.lr={stage_lr}",
            f"{stage}.min_lr={stage_lr * min_lr_ratio}",
            f"{stage}.warmup_steps={int(warmup * steps)}",
        ]
    for stage in ("interact", "sft"):
        overrides += [f"{stage}.lora.enabled=false", f"{stage}.freeze_vision=true"]
    return load_config(
        None,
        [*overrides, *extra],
        teacher=str(models.teacher),
        student=str(student or models.student),
        output=str(out),
        teacher_verbalizers=str(models.verbalizers),
    )


def stage_config(
    s: DemoSettings,
    out: Path,
    stages: dict[str, int],
    data: Path,
    extra: list[str] = (),
    num_workers: int = 1,
    stage3: bool = True,
):
    """`demo_config` with the demo settings' seed, batch, learning rates and schedule, training on `data`. Its SFT
    stage is stage 3 (`stage3_lora`, `stage3_lr`) unless `stage3` is False (SFT standing in for stage 2)."""
    cfg = demo_config(
        out,
        stages,
        seed=s.seed,
        batch_size=s.batch_size,
        lr=s.lr,
        verbalize_lr=s.verbalize_lr,
        extra=extra,
        warmup=s.warmup,
        min_lr_ratio=s.min_lr_ratio,
        num_workers=num_workers,
        student=s.student_dir,
        student_layers=s.student_target_layers,
        models=s.models,
    )
    cfg.interact.intermediate_reduction = s.intermediate_reduction
    cfg.interact.intermediate_weight = s.intermediate_weight
    cfg.interact.freeze_student_verbalizers = bool(s.freeze_student_verbalizers)
    if stage3 and s.stage3_lora:
        cfg.sft.lora.enabled = True
        cfg.sft.lora.r = cfg.sft.lora.alpha = s.stage3_lora
    if stage3 and s.stage3_lr:
        cfg.sft.lr, cfg.sft.min_lr = s.stage3_lr, s.stage3_lr * s.min_lr_ratio
    cfg.data.path = str(data)
    return cfg


def share_length_scans(samples, scans: Path, runs: list[Path], student: Path, max_length: int = 128) -> None:
    """Scan the training samples' lengths once (into `scans`) and give every run folder the scan
    (`vlsi.data.VLDataset` checks each copy against its samples and processors, so a stale copy is only ignored)."""
    processor = load_processor(str(student))
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


@functools.cache
def _answer_length(teacher: Path, tasks: tuple[str, ...], styles: tuple[str, ...]) -> int:
    return answer_tokens(load_processor(str(teacher)).tokenizer, tasks, styles)


def answer_length(s: DemoSettings) -> int:
    """New tokens the longest answer of the settings' tasks and styles takes, with its end-of-turn token (a number:
    2; "3 5 7 so 9": 7): what the teacher generates per answer and every evaluation decodes."""
    return _answer_length(s.models.teacher, s.task_list, s.style_list)


def answer_settings(s: DemoSettings) -> list[str]:
    """The `vlsi train` settings that make the teacher answer the unlabelled questions, to the task's answer length
    (the same for every run of a task, as the answers' identity in `vlsi.answers` requires)."""
    return ["data.answers=teacher", f"data.answer_max_tokens={answer_length(s)}"]


def answer_pool(s: DemoSettings, folder: Path, mixed: Path) -> list:
    """The teacher answers the unlabelled questions of `mixed` (`data.answers=teacher`, cached in folder/answers, so
    answered once); -> every sample of `mixed`, answered."""
    return load_samples(stage_config(s, folder, {}, mixed, answer_settings(s)))


def teacher_cache(s: DemoSettings, folder: Path, data: Path, samples) -> list[str]:
    """Run the teacher once over the answered training `samples` of `data` into `folder` (docs/CACHE.md), every target
    layer's whole distribution (`cache.top_k=0`: the vocabulary is 406 tokens, so exact and small), for every
    interaction run on these samples to read instead of running the teacher at each step; -> the settings that make a
    run read it."""
    reads = [f"teacher_cache={folder}", "cache.top_k=0"]
    cfg = stage_config(s, folder, {}, data, [*answer_settings(s), *reads, "cache.batch_size=64"])
    build_cache(cfg, folder, s.models.verbalizers, samples)
    return reads


def sft_twice(s: DemoSettings, run: Path, data: Path, samples, num_workers: int) -> tuple[Path, Path]:
    """SFT in two stages of `distill_steps` and `sft_steps`, each with the stage schedule the other methods get, the
    second as stage 3 (run/config.yaml, run/config-stage3.yaml); -> (student after the first stage, final student)."""
    cfg = stage_config(s, run, {"sft": s.distill_steps}, data, num_workers=num_workers, stage3=False)
    save_config(cfg, run / "config.yaml")
    metrics = MetricsLog(run / "metrics.jsonl")
    first = sft(cfg, cfg.student, run / "stage1", metrics, samples)
    cfg = stage_config(s, run, {"sft": s.sft_steps}, data, num_workers=num_workers)
    save_config(cfg, run / "config-stage3.yaml")
    return first, sft(cfg, str(first), run / "student", metrics, samples)


class Trained(NamedTuple):
    finals: dict[str, Path]  # method -> final student
    before: dict[str, Path]  # method -> student before its last SFT stage
    seconds: dict[str, float]  # method or stage -> wall seconds
    answered: list  # the training samples, the unlabelled ones with the teacher's answers


CONTROL = "ce_kld"  # the deep-supervision control: CE to the answers at the intermediate layers, no teacher layers
CONTROL_SETTINGS = ["interact.intermediate_loss=ce", "interact.last_loss=kld"]
KD_SETTINGS = ["interact.intermediate_loss=none", "interact.last_loss=kld"]  # final-layer KD through the interaction


def on_policy_settings(s: DemoSettings) -> list[str]:
    """The `vlsi train` settings of an on-policy arm: a share λ = `on_policy` of its interaction batches answered by
    the student itself (docs/METHOD.md#on-policy-distillation), sampled up to the task's answer length (the teacher's
    answers' cap), scored by the live teacher (a teacher cache holds the fixed answers' targets only)."""
    return [f"interact.on_policy={s.on_policy}", f"interact.sample.max_new_tokens={answer_length(s)}"]


def train_students(
    s: DemoSettings,
    out: Path,
    labelled: Path,
    mixed: Path,
    num_workers: int = 1,
    control: bool = False,
    cached: list[str] | None = None,
) -> Trained:
    """Train the four students into out/runs (`num_workers` data-loader workers each); with `control`, a fifth:
    VLsI's run with CE to the answers at its intermediate layers instead of the matched KLs to the teacher's layers
    (`CONTROL`, the ablation's CE / KLD row), from VLsI's stage-1 verbalizers, on the same budget; with `on_policy`,
    the two on-policy students (`ON_POLICY`). `cached`: the settings that read a teacher cache already built for
    `mixed` (`teacher_cache`, as `vlsi study` shares one); None: the teacher runs once into out/runs/.teacher-cache."""
    runs = out / "runs"
    steps = budget(s)
    finals, before, seconds = {}, {}, {}

    _banner(f"the teacher answers the {s.n_pool} unlabelled training questions")
    start = time.time()
    answered = answer_pool(s, runs / "kd", mixed)
    if (runs / "kd" / "answers").is_dir():  # none with n_pool=0
        shutil.copytree(runs / "kd" / "answers", runs / "vlsi" / "answers", dirs_exist_ok=True)  # VLsI's: the same
    seconds["teacher_answers"] = time.time() - start
    gold, _ = read_dataset(labelled)
    share_length_scans(gold, runs / ".cache-labelled", [runs / "sft"], s.student_dir)
    mixed_runs = [runs / name for name in ("sft_teacher", "kd", "vlsi", *([CONTROL] if control else []))]
    mixed_runs += [runs / name for name in s.methods if name in ON_POLICY]
    share_length_scans(answered, runs / ".cache-mixed", mixed_runs, s.student_dir)
    if cached is None:
        _banner("the teacher's verbalized distributions at every target layer, cached once for KD and VLsI")
        start = time.time()
        cached = teacher_cache(s, runs / ".teacher-cache", mixed, answered)
        seconds["teacher_cache"] = time.time() - start

    _banner(f"(a) SFT only, {s.n_labelled} labelled questions: {s.distill_steps} + {s.sft_steps} SFT steps")
    start = time.time()
    before["sft"], finals["sft"] = sft_twice(s, runs / "sft", labelled, gold, num_workers)
    seconds["sft"] = time.time() - start

    _banner(f"(b) SFT on the labelled and the teacher-answered questions: {s.distill_steps} + {s.sft_steps} steps")
    start = time.time()
    before["sft_teacher"], finals["sft_teacher"] = sft_twice(s, runs / "sft_teacher", mixed, answered, num_workers)
    seconds["sft_teacher"] = time.time() - start

    kd = steps["kd"]
    _banner(f"(c) final-layer KD: {kd['kd']} KL steps, then {kd['sft']} SFT steps")
    start = time.time()
    run = out / "runs" / "kd"
    # Plain final-layer KD through the interaction stage: no intermediate loss, KL(teacher || student) at the output.
    # Its student verbalizers are never trained (verbalize.max_steps=0) and never used.
    cfg = stage_config(
        s,
        run,
        {"verbalize": 0, "interact": kd["kd"], "sft": kd["sft"]},
        mixed,
        [*KD_SETTINGS, "verbalize.models=[student]", *answer_settings(s), *cached],
        num_workers=num_workers,
    )
    finals["kd"] = run_train(cfg)
    before["kd"] = run / "stages" / "interact" / "student"
    seconds["kd"] = time.time() - start

    _banner(
        f"(d) VLsI: {s.verbalize_steps} verbalize (not charged) + {s.distill_steps} interact + {s.sft_steps} SFT "
        "steps (teacher verbalizers shipped with the teacher)"
    )
    run = out / "runs" / "vlsi"
    cfg = stage_config(
        s,
        run,
        {"verbalize": s.verbalize_steps, "interact": s.distill_steps, "sft": s.sft_steps},
        mixed,
        ["verbalize.models=[student]", *answer_settings(s), *cached],
        num_workers=num_workers,
    )
    start = time.time()  # stage 1 on its own first, to time it; `run_train` then reuses its verbalizers
    verbalize(cfg, cfg.student, "student", run / "verbalizers" / "student", MetricsLog(run / "metrics.jsonl"), answered)
    seconds["vlsi_verbalize"] = time.time() - start
    start = time.time()
    finals["vlsi"] = run_train(cfg)
    before["vlsi"] = run / "stages" / "interact" / "student"
    seconds["vlsi"] = time.time() - start
    if control:
        _banner(f"(e) the CE / KLD control: VLsI's {s.distill_steps} interaction steps with CE at the layers, then SFT")
        start = time.time()
        run = out / "runs" / CONTROL
        shutil.copytree(runs / "vlsi" / "verbalizers" / "student", run / "verbalizers" / "student")
        if (runs / "kd" / "answers").is_dir():
            shutil.copytree(runs / "kd" / "answers", run / "answers", dirs_exist_ok=True)
        cfg = stage_config(
            s,
            run,
            {"verbalize": s.verbalize_steps, "interact": s.distill_steps, "sft": s.sft_steps},
            mixed,
            [*CONTROL_SETTINGS, "verbalize.models=[student]", *answer_settings(s), *cached],
            num_workers=num_workers,
        )
        finals[CONTROL] = run_train(cfg)
        before[CONTROL] = run / "stages" / "interact" / "student"
        seconds[CONTROL] = time.time() - start
    arms = {  # method -> (the recipe it repeats on the student's own samples, its stages, its loss settings)
        "kd_on_policy": ("(c) final-layer KD", {"verbalize": 0, "interact": kd["kd"], "sft": kd["sft"]}, KD_SETTINGS),
        "vlsi_on_policy": (
            "(d) VLsI",
            {"verbalize": s.verbalize_steps, "interact": s.distill_steps, "sft": s.sft_steps},
            [],
        ),
    }
    for method in (m for m in s.methods if m in ON_POLICY):
        label, stages, settings = arms[method]
        _banner(
            f"on-policy {label}: its recipe with interact.on_policy={s.on_policy} (the student answers that share of "
            "the interaction batches itself; the live teacher scores them: no teacher cache)"
        )
        start = time.time()
        run = out / "runs" / method
        if method == "vlsi_on_policy":  # VLsI's stage-1 verbalizers: the two VLsI students differ in λ alone
            shutil.copytree(runs / "vlsi" / "verbalizers" / "student", run / "verbalizers" / "student")
        if (runs / "kd" / "answers").is_dir():
            shutil.copytree(runs / "kd" / "answers", run / "answers", dirs_exist_ok=True)
        cfg = stage_config(
            s,
            run,
            stages,
            mixed,
            [*settings, *on_policy_settings(s), "verbalize.models=[student]", *answer_settings(s)],
            num_workers=num_workers,
        )
        finals[method] = run_train(cfg)
        before[method] = run / "stages" / "interact" / "student"
        seconds[method] = time.time() - start
    return Trained(finals, before, seconds, answered)


def encode_test(test, models: ModelSet = SHIPPED, batch_size: int = 128) -> tuple:
    """(processor, left-padded batches) of the test questions with the tokenizer of `models`: encoded once, shared by
    every model scored."""
    processor = load_processor(str(models.teacher))
    return processor, encode_batches(processor, test, batch_size)


def evaluate_all(models: dict[str, Path], test, encoded: tuple) -> dict[str, dict]:
    """Accuracy of each model on the test items (`encoded` from `encode_test`), with per-item `hits`."""
    processor, batches = encoded
    results = {}
    for name, path in models.items():
        model = load_model(str(path), torch.float32)
        results[name] = evaluate(model, processor, test, batches)
        del model
    return results


PAIRS = (("vlsi", "sft"), ("vlsi", "kd"), ("vlsi", "sft_teacher"), ("kd", "sft_teacher"), ("sft_teacher", "sft"))
# each on-policy student against its off-policy recipe and against (b); on-policy VLsI against on-policy KD
ON_POLICY_PAIRS = (
    ("kd_on_policy", "kd"),
    ("vlsi_on_policy", "vlsi"),
    ("kd_on_policy", "sft_teacher"),
    ("vlsi_on_policy", "sft_teacher"),
    ("vlsi_on_policy", "kd_on_policy"),
)
CONTROL_PAIRS = (("vlsi", CONTROL), (CONTROL, "kd"))  # teacher layers vs deep supervision; deep supervision vs KD


def comparisons(evals: dict[str, dict], clusters: list[str], pairs=PAIRS) -> dict[str, dict]:
    """Paired comparisons on the same test items (VLsI against each other student, KD against SFT on the
    teacher's answers, and that against SFT only): {"a_vs_b": `stats.cluster_bootstrap` over the items' `clusters`
    (`tasks.Item.pattern`), with "item_level": `stats.paired` (SE and McNemar's p counting items as independent)}."""
    result = {}
    for a, b in pairs:
        hits_a, hits_b = evals[a]["hits"], evals[b]["hits"]
        item_level = paired(hits_a, hits_b)
        item_level.pop("difference")  # the bootstrap's, the same number
        result[f"{a}_vs_{b}"] = {**cluster_bootstrap(hits_a, hits_b, clusters), "item_level": item_level}
    return result


def probe_layers(s: DemoSettings, runs: Path, data: Path, samples, num_workers: int = 1) -> dict[str, Path]:
    """Fresh verbalizers for the KD and the VLsI student after their interaction stage: stage 1 (`verbalize_steps` on
    the frozen model, the same data), so both students' layers are read by the same probe. Not charged to any
    method: analysis only. -> {"kd" | "vlsi": verbalizers folder}"""
    probes = {}
    for method in ("kd", "vlsi"):
        run = runs / method
        cfg = stage_config(
            s,
            run,
            {"verbalize": s.verbalize_steps},
            data,
            ["verbalize.models=[student]", *answer_settings(s)],
            num_workers,
        )
        model = run / "stages" / "interact" / "student"
        metrics = MetricsLog(run / "probe_metrics.jsonl")
        probes[method] = verbalize(cfg, str(model), "student", run / "probe_verbalizers", metrics, samples)
    return probes


def layer_accuracies(
    runs: Path, probes: dict[str, Path], test, encoded: tuple, student: Path, models: ModelSet = SHIPPED
) -> dict[str, dict]:
    """Per task, how often each verbalized layer names the answer: {model: {task: {layer: accuracy}}} for the teacher
    (its shipped verbalizers), the student initialisation (VLsI's stage-1 verbalizers), the KD and the VLsI students
    after interaction (`probe_layers`), and the VLsI student with the verbalizers trained alongside it."""
    processor, batches = encoded
    interacted = runs / "vlsi" / "stages" / "interact"
    readers = (
        ("teacher", models.teacher, models.verbalizers),
        ("init", student, runs / "vlsi" / "verbalizers" / "student"),
        ("kd", runs / "kd" / "stages" / "interact" / "student", probes["kd"]),
        ("vlsi", interacted / "student", probes["vlsi"]),
        ("vlsi_own", interacted / "student", interacted / "verbalizers"),
    )
    return {
        name: layer_accuracy(
            load_model(str(model), torch.float32), Verbalizers.load(verbalizers), processor, test, batches
        )
        for name, model, verbalizers in readers
    }


def match_sharpness(metrics: Path) -> dict[str, float]:
    """Mean normalised entropy of each student layer's match draw over the interaction stage (1: uniform)."""
    rows = read_jsonl(metrics)
    keys = sorted({k for r in rows if r.get("stage") == "interact" for k in r if k.startswith("match_entropy/")})
    return {k: statistics.fmean(r[k] for r in rows if k in r) for k in keys}


def interaction_diagnostics(runs: Path, methods: tuple[str, ...]) -> dict[str, dict]:
    """Per student with an interaction stage (KD, VLsI and their on-policy forms): its last-layer KL to the teacher
    (`last`) averaged over the first and the last tenth of the interaction steps, the median gradient norm before
    clipping and the share of steps clipped at interact.max_grad_norm (`grad_norm`, `clipped`: `vlsi.stages.loop`)."""
    found = {}
    for method in methods:
        rows = [r for r in read_jsonl(runs / method / "metrics.jsonl") if r.get("stage") == "interact" and "last" in r]
        if not rows:  # SFT only and (b) have no interaction stage
            continue
        tenth = max(1, len(rows) // 10)
        found[method] = {
            "last_kl_first_tenth": statistics.fmean(r["last"] for r in rows[:tenth]),
            "last_kl_last_tenth": statistics.fmean(r["last"] for r in rows[-tenth:]),
        }
        clipping = [r for r in rows if "grad_norm" in r]  # logged where interact.max_grad_norm > 0
        if clipping:
            found[method]["grad_norm_median"] = statistics.median(r["grad_norm"] for r in clipping)
            found[method]["clipped_share"] = statistics.fmean(r["clipped"] for r in clipping)
    return found


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
    card = teacher_card(s.models)
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "runs", ignore_errors=True)  # this command's own earlier output: never reuse stale stages

    tasks, styles = s.task_list, s.style_list
    _banner(
        f"data: {s.n_labelled} labelled + {s.n_pool} unlabelled training questions, {s.n_test} held-out "
        f"{s.eval_split} questions ({', '.join(tasks)}; answered as {', '.join(styles)})"
    )
    train_items = make_split("train", s.n_labelled + s.n_pool, tasks, styles)
    test = make_split(s.eval_split, s.n_test, tasks, styles)
    labelled = write_split(train_items[: s.n_labelled], out / "data", "labelled")
    mixed = write_split(train_items, out / "data", "train", answered=s.n_labelled)
    write_split(test, out / "data", s.eval_split)

    finals, before, seconds, answered = train_students(s, out, labelled, mixed)

    _banner(
        f"evaluating the teacher, the student initialisation and the four students on {len(test)} {s.eval_split} "
        "questions"
    )
    encoded = encode_test(test, s.models)
    clusters = [item.pattern for item in test]
    evals = evaluate_all({"teacher": s.models.teacher, "init": s.student_dir, **finals}, test, encoded)
    earlier = evaluate_all(before, test, encoded)
    _banner("what each layer knows: fresh verbalizers (stage 1) on the KD and VLsI students, then every layer scored")
    probe_start = time.time()
    probes = probe_layers(s, out / "runs", mixed, answered)
    layers = layer_accuracies(out / "runs", probes, test, encoded, s.student_dir, s.models)
    seconds["probes"] = time.time() - probe_start

    _banner("plots and one test example read layer by layer")
    runs = out / "runs"
    merged = runs / "verbalizer_metrics.jsonl"
    teacher_rows = s.models.metrics.read_text() if s.models.metrics.is_file() else ""
    merged.write_text(teacher_rows + (runs / "vlsi" / "metrics.jsonl").read_text())
    plot_verbalizer_loss(merged, out / "verbalizer_loss.png")
    if (runs / "vlsi" / "layer_match.png").is_file():
        shutil.copy(runs / "vlsi" / "layer_match.png", out / "layer_match.png")
    example = explain_example(out, test, evals, answer_length(s), s.models)

    results = {
        "teacher": evals["teacher"]["accuracy"],
        **{RESULT_KEYS[m]: evals[m]["accuracy"] for m in s.methods},
        "n_test": len(test),
        "n_clusters": len(set(clusters)),
        "answer_tokens": answer_length(s),
        "seeds": [s.seed],
        "seconds": round(time.time() - start, 1),
        "student_init": evals["init"]["accuracy"],
        "before_sft": {m: earlier[m]["accuracy"] for m in s.methods},
        "paired": comparisons(evals, clusters, s.pairs),
        "paired_before_sft": comparisons(earlier, clusters, s.pairs),
        "chance": chance_accuracy(test),
        "by_task": {name: e["by_task"] for name, e in evals.items()},
        "by_task_before_sft": {name: e["by_task"] for name, e in earlier.items()},
        "by_style": {name: e["by_style"] for name, e in evals.items()},
        **({"chain_exact": {name: e["chain_exact"] for name, e in evals.items()}} if "chain" in styles else {}),
        "match_entropy": match_sharpness(out / "runs" / "vlsi" / "metrics.jsonl"),
        "interaction": interaction_diagnostics(out / "runs", s.methods),
        "layer_accuracy": layers,
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
        f"SFT with the teacher's answers {results['student_sft_teacher']:.3f}, KD {results['student_kd']:.3f}, "
        f"VLsI {results['student_vlsi']:.3f} -> {out / 'report.md'}"
    )
    return results
