"""Every check made before a stage trains, each named after what it refuses, with one line naming the file or setting
and the fix. `vlsi train` runs them through `before_training`, in the order they run; `vlsi verbalize`, `vlsi sft` and
`vlsi cache` call theirs from the CLI. A model too large for its device is refused where it loads
(`vlsi.models.loading.check_fits`), a bad record where it is read (`vlsi.data`)."""

from __future__ import annotations

from pathlib import Path

from .cache import cache_identity, check_identity, read_index
from .config import ConfigError, TrainConfig, to_dict
from .data.encode import IGNORE_INDEX, encode
from .data.records import Sample
from .distributed import process_state, sharded_launch
from .models.family import Parts
from .models.loading import ModelError, load_processor, model_outline
from .models.verbalizer import META, WEIGHTS, Verbalizers, check_verbalizers, target_layers
from .runfolder import (
    IMAGE_MARKS,
    check_settings,
    files_fingerprint,
    kept_marks,
    model_fingerprint,
    samples_fingerprint,
    verify_checksums,
    write_json,
)
from .stages.samples import load_samples


def before_training(cfg: TrainConfig, out: Path) -> tuple[list, dict]:
    """Every check of `vlsi train` on OUT before a stage trains, cheapest first: no weight is read before the settings,
    tokenizers and target layers pass, and the teacher answers (data.answers=teacher) only after them. Returns the
    samples (`load_samples`) and the run's inputs (`run_inputs`, recorded in OUT/inputs.json; "data": the samples'
    `data_fingerprint`, for every later check that needs it)."""
    state = process_state()
    refuse_on_policy_under_sharding(cfg)
    refuse_other_settings(cfg, out)
    state.wait_for_everyone()  # every process has read OUT/config.yaml before the main process writes it
    refuse_missing_verbalizers(cfg, out)
    # Tokenizers first: a pair that cannot be distilled stops before any weights are loaded.
    t_proc, s_proc = (
        load_processor(cfg.teacher, cfg.trust_remote_code),
        load_processor(cfg.student, cfg.trust_remote_code),
    )
    refuse_different_tokenizers(t_proc, s_proc, cfg.teacher, cfg.student)
    outlines = {who: model_outline(getattr(cfg, who), cfg.trust_remote_code) for who in ("teacher", "student")}
    refuse_unmatched_target_layers(cfg, out, outlines)
    samples = load_samples(cfg)  # data.answers=teacher: the teacher answers here, before any stage
    data = data_fingerprint(cfg, samples, state.is_main_process)
    inputs = run_inputs(cfg, data, {"teacher": cfg.teacher, "student": cfg.student})
    refuse_changed_inputs(out, inputs, state.is_main_process)
    if cfg.teacher_cache:
        rows = {who: parts.vocab_rows for who, parts in outlines.items()}
        verbalizers = existing_verbalizers(cfg, out, "teacher")
        refuse_unusable_cache(cfg, verbalizers, t_proc, samples, **rows, fingerprint=data)
    return samples, inputs


def refuse_missing_arguments(cfg: TrainConfig) -> None:
    """`vlsi train` needs a teacher, a student, an output folder and data."""
    for key in ("teacher", "student", "output"):
        if not getattr(cfg, key):
            raise ConfigError(f"--{key} is required")
    if not cfg.data.path:
        raise ConfigError("--data is required")


def refuse_unused_teacher(cfg: TrainConfig, teacher: str | None) -> None:
    """`vlsi verbalize` / `vlsi sft` take --teacher only to answer the data's prompts."""
    if teacher and cfg.data.answers != "teacher":
        raise ConfigError("--teacher is only used to answer prompts: add data.answers=teacher, or drop --teacher")


def refuse_missing_teacher_verbalizers(cfg: TrainConfig) -> None:
    """`vlsi cache` computes the teacher's targets at its verbalized layers: it needs trained teacher verbalizers."""
    if not cfg.teacher_verbalizers:
        raise ConfigError(
            "vlsi cache needs the teacher's verbalizers: add teacher_verbalizers=DIR (from `vlsi verbalize --who "
            "teacher`, or OUT/verbalizers/teacher of a `vlsi train` run)"
        )
    missing = [n for n in (META, WEIGHTS) if not (Path(cfg.teacher_verbalizers) / n).is_file()]
    if missing:
        raise ConfigError(f"teacher_verbalizers={cfg.teacher_verbalizers}: no {' or '.join(missing)} there")


def refuse_on_policy_under_sharding(cfg: TrainConfig) -> None:
    """On-policy batches (interact.on_policy > 0) generate token by token: under FSDP2 or ZeRO-3
    (`distributed.sharded_launch`) every forward pass gathers the student's weights, a collective all processes must
    join, and their samples end at different lengths."""
    launch = sharded_launch()
    if cfg.interact.on_policy > 0 and launch:
        raise ConfigError(
            f"interact.on_policy={cfg.interact.on_policy} is not supported under {launch} (sampling would gather the "
            "student's sharded weights once per token, on processes whose samples end at different lengths); launch "
            "with configs/accelerate/ddp.yaml or ZeRO-2, or set interact.on_policy=0"
        )


def refuse_missing_verbalizers(cfg: TrainConfig, out: Path) -> None:
    """A model that verbalize.models leaves out is not verbalized by this run: its verbalizers must be in OUT already
    (or, the teacher's, given with teacher_verbalizers=DIR)."""
    for who in ("teacher", "student"):
        if who not in cfg.verbalize.models and existing_verbalizers(cfg, out, who) is None:
            given = ", give teacher_verbalizers=DIR" if who == "teacher" else ""
            raise ConfigError(
                f"verbalize.models leaves out the {who}, but {out / 'verbalizers' / who} does not exist: add {who} "
                f"to verbalize.models{given}, or put verbalizers trained for the {who} there"
            )


def refuse_other_settings(cfg: TrainConfig, out: Path) -> None:
    """Refuse to mix stages made under another configuration into this output folder."""
    fix = "finished stages would be reused wrongly: use a new --output, or delete that folder"
    check_settings(out / "config.yaml", to_dict(cfg), holds="a run", fix=fix, defaults=to_dict(TrainConfig()))


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


def refuse_changed_inputs(out: Path, inputs: dict, is_main: bool) -> None:
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


def refuse_unmatched_target_layers(cfg: TrainConfig, out: Path, outlines: dict[str, Parts]) -> None:
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


def refuse_different_tokenizers(teacher_processor, student_processor, teacher: str, student: str) -> None:
    """Teacher and student must give the same ids to the same tokens
    (docs/METHOD.md#models-and-the-shared-vocabulary); sizes alone are not enough. Then they must also label an
    answer alike (`refuse_different_answer_tokens`)."""
    t_vocab = teacher_processor.tokenizer.get_vocab()
    s_vocab = student_processor.tokenizer.get_vocab()
    if t_vocab == s_vocab:
        refuse_different_answer_tokens(teacher_processor, student_processor, teacher, student)
        return
    differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])
    token, _ = differing[0]
    raise ModelError(
        f"teacher '{teacher}' and student '{student}' have different tokenizers ({len(t_vocab)} vs {len(s_vocab)} "
        f"tokens; e.g. {token!r} is {t_vocab.get(token)} vs {s_vocab.get(token)}): VLsI compares next-token "
        "distributions, so both models must share one vocabulary; pick a student of the teacher's family"
    )


# A text-only conversation both processors encode, to check they label an answer with the same token ids
_PROBE = [
    {"role": "user", "content": [{"type": "text", "text": "How many objects are there? Answer with a number."}]},
    {"role": "assistant", "content": [{"type": "text", "text": "There are 3 objects: a cat, a dog and 1 fox."}]},
]


def refuse_different_answer_tokens(teacher_processor, student_processor, teacher: str, student: str) -> None:
    """Teacher and student must label an answer with the same token ids, end-of-turn token included: the
    interaction stage compares their predictions position by position over the answer tokens. A shared vocabulary
    is not enough when the tokenizers split text differently or the chat templates end a turn differently
    (e.g. a mixed-family pair)."""
    probe = Sample("probe", _PROBE, [])
    answers = {}
    for name, processor in (("teacher", teacher_processor), ("student", student_processor)):
        labels = encode(probe, processor)["labels"][0]  # [T]
        answers[name] = labels[labels != IGNORE_INDEX].tolist()
    if answers["teacher"] != answers["student"]:
        t = teacher_processor.tokenizer.convert_ids_to_tokens(answers["teacher"])
        s = student_processor.tokenizer.convert_ids_to_tokens(answers["student"])
        raise ModelError(
            f"teacher '{teacher}' and student '{student}' label the same answer with different tokens "
            f"(teacher {t} vs student {s}): their tokenizers split text or their chat templates end a turn "
            "differently, and VLsI compares the two models token by token on the answers; pick a student of the "
            "teacher's family"
        )


def refuse_unusable_cache(
    cfg: TrainConfig,
    verbalizers_dir: str | Path | None,
    processor,
    samples,
    teacher: int,
    student: int,
    fingerprint: str | None = None,
) -> None:
    """What `vlsi train` checks of teacher_cache=C before any stage trains: the student's LM head covers the tokens a
    cache holds (`teacher`, `student`: the two heads' rows), the l2 term needs whole distributions, and a cache
    already in C must be for this teacher, data, processor and settings, and for these teacher verbalizers when they
    exist (`verbalizers_dir`; None: stage 1 trains them, and the interaction stage checks). `fingerprint`: the
    samples' fingerprint when the run has it already."""
    cached = min(len(processor.tokenizer), teacher)  # as `build_cache` keeps them
    if student < cached:
        raise ConfigError(
            f"teacher_cache={cfg.teacher_cache}: the student's LM head has {student} rows, fewer than the {cached} "
            "tokens of every cached teacher distribution, so the two cannot be compared: train this pair without "
            "teacher_cache"
        )
    if cfg.interact.intermediate_loss == "l2" and cfg.cache.top_k:
        raise ConfigError(
            f"interact.intermediate_loss=l2 needs the whole teacher distributions, but teacher_cache="
            f"{cfg.teacher_cache} keeps the top {cfg.cache.top_k} (cache.top_k): use a cache built with cache.top_k=0"
        )
    folder = Path(cfg.teacher_cache)
    index = read_index(folder)
    if index is not None:
        check_identity(folder, index, cache_identity(cfg, verbalizers_dir, processor, samples, fingerprint))
