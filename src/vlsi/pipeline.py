"""`vlsi train`: verbalize (teacher, student) -> interact -> SFT, reusing stages already finished in OUT.

    vlsi train --teacher T --student S --data train.json --image-root imgs --output OUT [key=value ...]

OUT/
  .lock                  held by the main process while a run works here (`runfolder.lock`)
  config.yaml            the resolved configuration
  inputs.json            fingerprints of the teacher, student, data and given teacher verbalizers (`check_inputs`)
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
from .cache import check_before_training as check_cache_before_training
from .card import student_card
from .config import ConfigError, TrainConfig, save_config, to_dict
from .distributed import process_state
from .models.family import Parts
from .models.loading import check_same_vocabulary, load_processor, model_outline
from .models.verbalizer import META, WEIGHTS, Verbalizers, check_verbalizers
from .plots import plot_layer_match, plot_verbalizer_loss
from .runfolder import (
    IMAGE_MARKS,
    check_settings,
    files_fingerprint,
    kept_marks,
    lock,
    model_fingerprint,
    record_checksums,
    samples_fingerprint,
    verify_checksums,
    write_json,
)
from .stages.common import atomic_dir, load_samples, reuse, target_layers
from .stages.interact import interact
from .stages.loop import MetricsLog
from .stages.sft import sft
from .stages.verbalize import verbalize

log = logging.getLogger("vlsi")


def check_same_run(cfg: TrainConfig, out: Path) -> None:
    """Refuse to mix stages made under another configuration into this output folder."""
    fix = "finished stages would be reused wrongly: use a new --output, or delete that folder"
    check_settings(out / "config.yaml", to_dict(cfg), holds="a run", fix=fix)


# What a run's folder records of its inputs beyond its settings (OUT/inputs.json), and how a refusal names each.
INPUTS = {
    "teacher": "teacher (its files)",
    "student": "student (its files)",
    "model": "model (its files)",
    "data": "data (its records or images)",
    "teacher_verbalizers": "teacher_verbalizers (their files)",
}


def data_fingerprint(cfg: TrainConfig, samples, is_main: bool) -> str:
    """`runfolder.samples_fingerprint` of the data as read (`samples`, answered), computed once per run and passed to
    every check that needs it; the images' stats are kept in OUT/.cache (`kept_marks`), so a rerun on unchanged image
    files reads none of them."""
    with kept_marks(Path(cfg.output) / ".cache" / IMAGE_MARKS, is_main) as marks:
        return samples_fingerprint(samples, marks)


def run_inputs(cfg: TrainConfig, data: str, models: dict[str, str]) -> dict:
    """The fingerprints (`vlsi.runfolder`) of what a run is made from: `models` ({role: path}), the data as read
    (`data`: its `data_fingerprint`), and the teacher verbalizers given with teacher_verbalizers=DIR."""
    inputs = {who: model_fingerprint(path) for who, path in models.items()}
    inputs["data"] = data
    if cfg.teacher_verbalizers:
        folder = Path(cfg.teacher_verbalizers)
        inputs["teacher_verbalizers"] = files_fingerprint([folder / META, folder / WEIGHTS])
    return inputs


def check_inputs(out: Path, inputs: dict, is_main: bool) -> None:
    """Refuse to resume or reuse the stages in OUT when what they were made from changed behind the same settings
    (data edited, a model or the verbalizers replaced in place); record the inputs of a new run."""
    fix = f"its stages and checkpoints were made from the old ones: put those back, use a new --output, or delete {out}"
    check_settings(out / "inputs.json", inputs, {key: INPUTS.get(key, key) for key in inputs}, "a run", fix)
    if is_main:
        write_json(out / "inputs.json", inputs, indent=2)


def existing_verbalizers(cfg: TrainConfig, out: Path, who: str) -> Path | None:
    """The verbalizers this run will use for `who` without training them: reused from OUT, or (the teacher's) given
    with teacher_verbalizers=DIR; None: stage 1 trains them."""
    reused = out / "verbalizers" / who
    given = cfg.teacher_verbalizers if who == "teacher" else ""
    if reused.exists():
        verify_checksums(reused, f"delete {reused} to have them trained (or copied) again")
        return reused
    return Path(given) if given else None


def check_target_layers(cfg: TrainConfig, out: Path, outlines: dict[str, Parts]) -> None:
    """Before anything trains: each model's target layers, from its architecture built on the meta device (`outlines`
    of teacher and student: no weight read); verbalizers given with teacher_verbalizers=DIR, or reused from OUT,
    against the model they claim to verbalize and against verbalizer.*_layers; and at least as many teacher target
    layers as student ones (each student layer is matched to its own teacher layer)."""
    count = {}
    for who, parts in outlines.items():
        path = getattr(cfg, who)  # cfg.teacher, cfg.student
        folder = existing_verbalizers(cfg, out, who)
        if folder is None:
            count[who] = len(target_layers(cfg, parts, who))
            continue
        verbalizers = Verbalizers.load(folder)
        name = f"verbalizers in {folder}"
        check_verbalizers(verbalizers, parts, name, path)
        wanted = getattr(cfg.verbalizer, f"{who}_layers")
        if wanted is not None and wanted != verbalizers.target_layers:
            raise ConfigError(
                f"verbalizer.{who}_layers={wanted}, but the {name} are for blocks {verbalizers.target_layers}: "
                f"drop verbalizer.{who}_layers, or give verbalizers trained for those blocks"
            )
        count[who] = len(verbalizers)
    if count["student"] > count["teacher"]:
        raise ConfigError(
            f"the student has {count['student']} target layers but the teacher only {count['teacher']}: each student "
            "layer needs its own teacher layer (set verbalizer.student_layers / verbalizer.teacher_layers)"
        )


def run_train(cfg: TrainConfig) -> Path:
    """Every stage into OUT, the main process holding OUT's lock for the run (a second run on OUT stops at once)."""
    for key in ("teacher", "student", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"--{key} is required")
    if not cfg.data.path:
        raise ConfigError("--data is required")
    with lock(cfg.output, enabled=process_state().is_main_process):
        return _stages(cfg, Path(cfg.output))


def _stages(cfg: TrainConfig, out: Path) -> Path:
    state = process_state()
    check_same_run(cfg, out)
    state.wait_for_everyone()  # every process has read OUT/config.yaml before the main process writes it
    # Tokenizers first: a pair that cannot be distilled stops before any weights are loaded.
    t_proc, s_proc = (
        load_processor(cfg.teacher, cfg.trust_remote_code),
        load_processor(cfg.student, cfg.trust_remote_code),
    )
    check_same_vocabulary(t_proc, s_proc, cfg.teacher, cfg.student)
    outlines = {who: model_outline(getattr(cfg, who), cfg.trust_remote_code) for who in ("teacher", "student")}
    check_target_layers(cfg, out, outlines)
    samples = load_samples(cfg)  # data.answers=teacher: the teacher answers here, before any stage
    data = data_fingerprint(cfg, samples, state.is_main_process)
    inputs = run_inputs(cfg, data, {"teacher": cfg.teacher, "student": cfg.student})
    check_inputs(out, inputs, state.is_main_process)
    if cfg.teacher_cache:
        rows = {who: parts.vocab_rows for who, parts in outlines.items()}
        verbalizers = existing_verbalizers(cfg, out, "teacher")
        check_cache_before_training(cfg, verbalizers, t_proc, samples, **rows, fingerprint=data)
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
        if who not in cfg.verbalize.models:
            raise ConfigError(f"verbalize.models leaves out the {who}, but {target} does not exist")
        verbalize(cfg, path, who, target, metrics, samples)
    if state.is_main_process:
        plot_verbalizer_loss(out / "metrics.jsonl", out / "verbalizer_loss.png")

    interacted = out / "stages" / "interact"
    if not reuse(interacted, "interaction"):
        if cfg.teacher_cache:  # the teacher runs once, into the cache (or a matching cache is reused), not here
            build_cache(cfg, cfg.teacher_cache, teacher_verb, samples, fingerprint=data)
        interact(cfg, out, metrics, samples, fingerprint=data)
    if state.is_main_process:
        plot_layer_match(out / "layer_match.jsonl", out / "layer_match.png")

    final = out / "student"
    if not reuse(final, "SFT"):
        card = student_card(cfg, "train", inputs["data"])
        sft(cfg, str(interacted / "student"), final, metrics, samples, card)
    return final
