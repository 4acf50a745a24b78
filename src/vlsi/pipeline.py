"""`vlsi train`: verbalize (teacher, student) -> interact -> SFT, reusing stages already finished in OUT.

    vlsi train --teacher T --student S --data train.json --image-root imgs --output OUT [key=value ...]

OUT/
  .lock                  held by the main process while a run works here (`runfolder.lock`)
  config.yaml            the resolved configuration
  inputs.json            fingerprints of the teacher, student, data and given teacher verbalizers (`preflight`)
  answers/               data.answers=teacher: the teacher's answers to unanswered records (vlsi.answers)
  metrics.jsonl          one line per optimizer step: stage, step, lr, losses
  layer_match.jsonl      one line per interaction micro-step and process: matched teacher target layer per
                         student layer
  verbalizers/teacher/   verbalizers.safetensors + verbalizers.json
  verbalizers/student/
  (teacher_cache=C: C holds the teacher's cached targets, built here after the teacher's verbalizers if absent)
  stages/interact/       the student after interaction (merged) and its verbalizers
  student/               the final student: a plain Hugging Face checkpoint + processor + model card (README.md)
  verbalizer_loss.png, layer_match.png
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .cache import build_cache
from .card import student_card
from .config import TrainConfig, save_config
from .distributed import process_state
from .plots import plot_layer_match, plot_verbalizer_loss
from .preflight import before_training, refuse_missing_arguments
from .runfolder import lock, record_checksums
from .stages.interact import interact
from .stages.loop import MetricsLog
from .stages.output import atomic_dir, reuse
from .stages.sft import sft
from .stages.verbalize import verbalize

log = logging.getLogger("vlsi")


def run_train(cfg: TrainConfig) -> Path:
    """Every stage into OUT, the main process holding OUT's lock for the run (a second run on OUT stops at once)."""
    refuse_missing_arguments(cfg)
    with lock(cfg.output, enabled=process_state().is_main_process):
        return _stages(cfg, Path(cfg.output))


def _stages(cfg: TrainConfig, out: Path) -> Path:
    state = process_state()
    samples, inputs = before_training(cfg, out)  # every check, before anything trains (`vlsi.preflight`)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    state.wait_for_everyone()
    metrics = MetricsLog(out / "metrics.jsonl", enabled=state.is_main_process)

    teacher_verb = out / "verbalizers" / "teacher"
    if cfg.teacher_verbalizers and not teacher_verb.exists() and state.is_main_process:
        with atomic_dir(teacher_verb) as copy:  # checked against OUT/inputs.json's fingerprint above
            shutil.copytree(cfg.teacher_verbalizers, copy, dirs_exist_ok=True)
            record_checksums(copy)
    state.wait_for_everyone()
    for who, path in (("teacher", cfg.teacher), ("student", cfg.student)):
        target = out / "verbalizers" / who
        if reuse(target, f"verbalizers for the {who}"):
            continue
        verbalize(cfg, path, who, target, metrics, samples)  # verbalize.models holds it: `preflight` checked
    if state.is_main_process:
        plot_verbalizer_loss(out / "metrics.jsonl", out / "verbalizer_loss.png")

    interacted = out / "stages" / "interact"
    if not reuse(interacted, "interaction"):
        if cfg.teacher_cache:  # the teacher runs once, into the cache (or a matching cache is reused), not here
            build_cache(cfg, cfg.teacher_cache, teacher_verb, samples, fingerprint=inputs["data"])
        interact(cfg, out, metrics, samples, fingerprint=inputs["data"])
    if state.is_main_process:
        plot_layer_match(out / "layer_match.jsonl", out / "layer_match.png")

    final = out / "student"
    if not reuse(final, "SFT"):
        card = student_card(cfg, "train", inputs["data"])
        sft(cfg, str(interacted / "student"), final, metrics, samples, card)
    return final
