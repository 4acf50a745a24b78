"""Teacher-answered prompts (`data.answers=teacher`): the teacher answers every record that ends with a user turn,
once, and every stage trains on those answers as if they were the records' assistant turns.

    vlsi train --teacher T --student S --data questions.jsonl --output OUT data.answers=teacher
    vlsi sft --model M --teacher T --data questions.jsonl --output OUT data.answers=teacher

Users hold far more images and questions than answers. With this setting `read_dataset` accepts records whose
conversation ends with a user turn and has no assistant turn; before any stage trains, the teacher answers the
trailing user turn of every record that has one (batched greedy generation with its own processor, left padding:
`vlsi.eval.generate.generate_answers`; with `data.answers=server` a served teacher answers: `vlsi.served`), and the
answer is appended as the assistant turn. Assistant turns already in the data (gold answers) are kept as they are;
in a multi-turn record only the trailing user turn is answered.

This module sits beside the stages rather than in `vlsi.data` (which turns records into tensors and never loads a
model) or in one stage (every stage reads the answered samples, through `stages.samples.load_samples`).

OUT/answers/
  index.json      what the answers were made with: teacher (path and `runfolder.model_fingerprint`), its processor
                  (`processor_key`), data (path and `runfolder.samples_fingerprint` of the prompts answered: ids,
                  messages, image files' content), answer_max_tokens, and count (the number of prompts to answer)
  answers.jsonl   {"id": ..., "answer": ..., "sha256": ...} per prompt, appended and flushed after each batch (served:
                  each answer), with "cut": true where the answer stopped at data.answer_max_tokens, and the checksum
                  of the line's other fields (`runfolder.seal`): a killed run resumes with the prompts still
                  unanswered (a torn last line is dropped); a line edited since (by hand) is refused, naming it; a
                  rerun that finds every prompt answered loads no model
  answers-R.jsonl the same, the answers of process R (R >= 1) of a multi-process launch; answers.jsonl holds the
                  main process's. The answers are the union of the files, by prompt id: a run with any number of
                  processes reads (and resumes) what a run with another number wrote
With data.answers=server the teacher is "MODEL served at URL" and there is no processor.

Cut answers are left out of training (data.keep_cut_answers=true keeps them), counted and logged; when more than
data.max_cut_fraction of the prompts are cut the run stops, naming data.answer_max_tokens.

Answers made with another teacher, processor, prompts or answer_max_tokens are refused with one line, never
regenerated: stages already finished in OUT were trained on them, and silently new answers would mix two data sets
in one run. Delete OUT/answers (and the finished stages) or use a new --output. Answers without an index (deleted)
cannot be checked: they are answered again, never trusted.

Under a multi-process launch every process loads the local teacher on its device and answers its share: the main
process clears answers left without an index, writes the index and sends the others the ids still unanswered
(quick file work before one broadcast), and process R of N answers the pending prompts R, R+N, R+2N, ... into its
own file. Then each process polls the files until every prompt is answered: a barrier would time out (10 minutes
under NCCL) long before a large teacher has answered a large data set. A served teacher (data.answers=server) is
asked by the main process alone while the others poll; so is a teacher spread over the machine's devices
(teacher_device_map=auto: accelerate's big-model inference, GPUs first, then CPU memory, then disk under
OUT/.cache/teacher-offload, deleted when the answers are made). If a process fails, the launcher stops the others.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import served
from .config import ConfigError, TrainConfig
from .data import Sample, sources
from .data.dataset import processor_key
from .distributed import on_main_process, process_state
from .eval.generate import Answer, Item, append_answers
from .models.loading import QUANTIZE, SERVE, check_fits, compute_dtype, load_model, load_processor, spread_memory
from .runfolder import (
    IMAGE_MARKS,
    FolderError,
    check_settings,
    is_sealed,
    kept_marks,
    lock,
    model_fingerprint,
    read_jsonl,
    samples_fingerprint,
    seal,
    storage,
    truncate_jsonl,
    write_json,
)

log = logging.getLogger("vlsi")

ANSWERS, INDEX = "answers.jsonl", "index.json"
SHARE_GLOB = "answers-*.jsonl"  # the answers of processes 1, 2, ... of a launch
# Index entries that must match to reuse the answers, and how the refusal names them.
REUSE_KEYS = {
    "teacher_identity": "teacher",
    "teacher_quantization": "teacher_quantization",
    "processor": "teacher processor",
    "prompts": "prompts (data)",
    "answer_max_tokens": "data.answer_max_tokens",
}
POLL_SECONDS = 5.0


def is_unanswered(sample: Sample) -> bool:
    """Whether the conversation ends with a user turn, which the teacher answers."""
    return sample.messages[-1]["role"] == "user"


def with_answers(samples: Sequence[Sample], answers: dict[str, str], kept=None) -> Answered:
    """`samples`, each unanswered one in `answers` ({id: text}) with its answer appended as an assistant turn; only
    the positions `kept` (None: all). Read from `samples` on access (`Answered`)."""
    return Answered(samples, answers, np.arange(len(samples)) if kept is None else np.asarray(kept, dtype=np.int64))


class Answered(Sequence):
    """The data's samples with the teacher's answers, read from `samples` (an index into the data file or dataset)
    on access: held in memory are the answers and the kept positions, never the samples, whose images may be
    embedded bytes."""

    def __init__(self, samples: Sequence[Sample], answers: dict[str, str], positions: np.ndarray):
        self.samples, self.answers, self.positions = samples, answers, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(range(len(self))[i])
        return self._answered(self.samples[int(self.positions[i])])

    def __iter__(self):
        if len(self.positions) == len(self.samples):  # every sample, in order: one pass (one file handle)
            yield from map(self._answered, self.samples)
        else:
            yield from (self[i] for i in range(len(self)))

    def _answered(self, sample: Sample) -> Sample:
        if not is_unanswered(sample) or sample.id not in self.answers:
            return sample
        return dataclasses.replace(sample, messages=[*sample.messages, _assistant(self.answers[sample.id])])

    def take(self, positions) -> Answered:
        return Answered(self.samples, self.answers, self.positions[np.asarray(positions, dtype=np.int64)])

    def where(self, i: int) -> str:
        return sources.where(self.samples, int(self.positions[i]))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None


def _take(samples: Sequence[Sample], positions: list[int]) -> Sequence[Sample]:
    """The samples at `positions`: a sub-index of an index into the data (`take`), else a list."""
    return samples.take(positions) if hasattr(samples, "take") else [samples[i] for i in positions]


class _Items(Sequence):
    """`samples` as the generation's `Item`s, made when a batch asks for them."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(len(self))[i]]
        s = self.samples[i]
        return Item(s.id, s.messages, list(s.images), {})


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def teacher_answers(cfg: TrainConfig, samples: Sequence[Sample]) -> Sequence[Sample]:
    """`samples` with every unanswered one answered by `cfg.teacher` (data.answers=teacher) or by the served teacher
    (data.answers=server, `vlsi.served`): read back from OUT/answers, the missing answers generated first (main
    process). Prompts the teacher answered with nothing are left out, and counted; so are answers cut at
    data.answer_max_tokens unless data.keep_cut_answers. The result reads the samples from `samples` on access
    (`Answered`): a large data set's samples are never all in memory."""
    server = cfg.data.answers == "server"
    if not server and not cfg.teacher:
        raise ConfigError(
            "data.answers=teacher needs a teacher to answer the prompts: pass --teacher (or teacher=PATH)"
        )
    # one pass over the data: the prompts are kept as positions into it (`_take`), never as samples in memory
    positions, ids = [], []
    for position, sample in enumerate(samples):
        if is_unanswered(sample):
            positions.append(position)
            ids.append(sample.id)
    if not positions:
        return samples
    prompts = _take(samples, positions)
    folder = Path(cfg.output) / "answers"
    # The server applies its own processor: the answers are the served model's, at that address.
    processor = None if server else load_processor(cfg.teacher, cfg.trust_remote_code)
    index = {
        "teacher": served.identity(cfg.data) if server else cfg.teacher,
        "teacher_identity": served.identity(cfg.data) if server else model_fingerprint(cfg.teacher),
        "teacher_quantization": "" if server else cfg.teacher_quantization,
        "processor": None if server else processor_key(processor),
        "data": cfg.data.path,
        "prompts": prompts_fingerprint(cfg, prompts),
        "answer_max_tokens": cfg.data.answer_max_tokens,
        "count": len(ids),
    }
    fix = f"delete {folder} (and the stages finished beside it) to have the teacher answer again, or use a new --output"
    recorded = check_settings(folder / INDEX, index, REUSE_KEYS, "teacher answers", fix)
    wanted = set(ids)
    # no index: nothing says what made answers already there, so none is trusted (the main process drops them)
    answers, cut = read_answers(folder, wanted) if recorded is not None else ({}, set())
    state = process_state()
    if len(answers) == len(wanted):
        log.info("teacher answers: reusing %d from %s", len(answers), folder)
    elif server:
        if state.is_main_process:
            client = served.connect(cfg.data)  # a model not served: nothing is written, fixing the name is enough
            with lock(folder):  # one teacher answering into the folder (OUT's lock covers it under vlsi train and sft)
                pending = set(_prepare(folder, index, recorded, ids, answers))
                asked = _take(prompts, [k for k, i in enumerate(ids) if i in pending])
                _serve(cfg, client, asked, folder, index, answers, cut)
        answers, cut = _wait(folder, wanted)
    else:
        with lock(folder, enabled=state.is_main_process):  # the main process holds it for the launch
            pending = on_main_process(_prepare, folder, index, recorded, ids, answers)
            # every process holds the same `pending`; one teacher spread over the machine's devices answers alone
            mine = set(share(pending, state.process_index, 1 if cfg.teacher_device_map else state.num_processes))
            _generate(cfg, processor, _take(prompts, [k for k, i in enumerate(ids) if i in mine]), folder)
        answers, cut = _wait(folder, wanted)
    check_cut(cfg, cut, len(wanted), folder)
    empty = sorted(i for i, text in answers.items() if not text)
    left_out = set(empty) | (set() if cfg.data.keep_cut_answers else cut)
    if empty:
        log.warning("the teacher answered %d prompts with nothing (e.g. %s); they are left out", len(empty), empty[0])
    if cut:
        log.warning(
            "%d of %d answers were cut at data.answer_max_tokens=%d (e.g. %s); %s",
            len(cut),
            len(wanted),
            cfg.data.answer_max_tokens,
            min(cut),
            "they are trained as they are (data.keep_cut_answers=true)"
            if cfg.data.keep_cut_answers
            else "they are left out (data.keep_cut_answers=true keeps them)",
        )
    dropped = [position for position, i in zip(positions, ids, strict=True) if i in left_out]
    return with_answers(samples, answers, np.setdiff1d(np.arange(len(samples)), dropped))


def prompts_fingerprint(cfg: TrainConfig, prompts: Sequence[Sample]) -> str:
    """`runfolder.samples_fingerprint` of the prompts, with the images' stats kept in OUT/.cache as the run's own data
    fingerprint keeps them (`preflight.data_fingerprint`): a rerun on unchanged image files reads none of them."""
    with kept_marks(Path(cfg.output) / ".cache" / IMAGE_MARKS, process_state().is_main_process) as marks:
        return samples_fingerprint(prompts, marks)


def check_cut(cfg: TrainConfig, cut: set[str], count: int, folder: Path) -> None:
    """Stop when the answers cut at data.answer_max_tokens and left out are more than data.max_cut_fraction of the
    `count` prompts: answer_max_tokens is too small for this teacher and data."""
    if cfg.data.keep_cut_answers or len(cut) <= cfg.data.max_cut_fraction * count:
        return
    raise ConfigError(
        f"{len(cut)} of the {count} prompts' answers (e.g. {min(cut)}) stop at data.answer_max_tokens="
        f"{cfg.data.answer_max_tokens}, more than data.max_cut_fraction={cfg.data.max_cut_fraction:g}: raise "
        f"data.answer_max_tokens (and delete {folder} to answer again), or raise data.max_cut_fraction to train "
        "without them, or set data.keep_cut_answers=true to train on them as they are"
    )


def read_answers(folder: Path, wanted: set[str]) -> tuple[dict[str, str], set[str]]:
    """{id: answer} of the prompts in `wanted` answered in folder/answers.jsonl and the processes' answers-*.jsonl
    (the first answer of a prompt counts), and the ids of those cut at data.answer_max_tokens (`"cut": true`); a
    line cut by a kill is skipped, a line whose checksum does not match (edited) stops with one line naming it."""
    answers, cut = {}, set()
    for path in [folder / ANSWERS, *sorted(folder.glob(SHARE_GLOB))]:
        for number, row in enumerate(read_jsonl(path), start=1):
            if not is_sealed(row):
                raise FolderError(
                    f"{path}: answer {number} (prompt {row.get('id') if isinstance(row, dict) else '?'}) is not as "
                    f"the teacher gave it (its checksum does not match: edited by hand?); delete that line to have "
                    f"the teacher answer the prompt again, or delete {folder}"
                )
            if row.get("id") in answers:
                continue
            if row.get("id") in wanted and isinstance(row.get("answer"), str):
                answers[row["id"]] = row["answer"]
                if row.get("cut") is True:
                    cut.add(row["id"])
    return answers, cut


def share(pending: list[str], rank: int, answering: int) -> list[str]:
    """The prompts process `rank` answers when the first `answering` processes share `pending`: rank, rank + N, ..."""
    return pending[rank::answering] if rank < answering else []


def answers_file(folder: Path) -> Path:
    """The file this process appends its answers to: answers.jsonl (the main process), answers-R.jsonl (process R)."""
    rank = process_state().process_index
    return folder / (ANSWERS if rank == 0 else f"answers-{rank}.jsonl")


def _prepare(folder: Path, index: dict, recorded: dict | None, ids: list[str], answers: dict) -> list[str]:
    """(main process) The prompts' `ids` not in `answers`, once the answer files left without an index are deleted
    and the index is written (atomically: other processes may be reading it)."""
    files = [folder / ANSWERS, *folder.glob(SHARE_GLOB)]
    if recorded is None and any(path.is_file() for path in files):
        log.warning("%s has no %s to say what made its answers: the teacher answers again", folder, INDEX)
        for path in files:
            path.unlink(missing_ok=True)
    pending = [i for i in ids if i not in answers]
    log.info("the teacher answers %d prompts (%d already in %s)", len(pending), len(answers), folder)
    write_json(folder / INDEX, index, indent=2)
    return pending


def _wait(folder: Path, wanted: set[str]) -> tuple[dict[str, str], set[str]]:
    """The answers to every prompt in `wanted`, polled from the folder's files until the other processes (or the
    main process, serving) have written theirs."""
    while True:
        # before the index is written the main process may still delete answers left without one
        answers, cut = read_answers(folder, wanted) if (folder / INDEX).is_file() else ({}, set())
        if len(answers) == len(wanted):
            return answers, cut
        time.sleep(POLL_SECONDS)


def _start(path: Path, pending: Sequence[Sample]) -> None:
    """Drop from the answer file `path` a line cut by a kill (appending after it would break the next line too),
    before the `pending` prompts' answers are appended."""
    wanted = {s.id for s in pending}
    truncate_jsonl(path, lambda row: isinstance(row, dict) and row.get("id") not in wanted)


def _serve(
    cfg: TrainConfig, client, pending: Sequence[Sample], folder: Path, index: dict, answers: dict, cut: set
) -> None:
    """The served teacher's (`client`'s) answers to the `pending` prompts, each appended to folder/answers.jsonl and
    flushed as it arrives and added to `answers` (and `cut`); stops as soon as the cut answers are sure to be too
    many."""
    _start(folder / ANSWERS, pending)
    bar = tqdm(total=index["count"], initial=len(answers), desc="teacher answers", unit="prompt", mininterval=1.0)
    with (
        bar,
        storage(folder / ANSWERS),  # a full disk: one line naming the file; a line it cut is dropped when resumed
        (folder / ANSWERS).open("a", encoding="utf-8") as f,
        closing(served.answers(client, cfg.data, pending)) as got,
    ):
        for answer in got:
            row = seal({"id": answer.id, "answer": answer.text} | ({"cut": True} if answer.cut else {}))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            answers[answer.id] = answer.text
            if answer.cut:
                cut.add(answer.id)
                check_cut(cfg, cut, index["count"], folder)
            bar.update()


def _generate(cfg: TrainConfig, processor, pending: Sequence[Sample], folder: Path) -> None:
    """The local teacher's answers to the `pending` prompts (this process's share), each batch's appended to this
    process's `answers_file` and flushed, "cut" where an answer reached data.answer_max_tokens before an end token."""
    path = answers_file(folder)
    _start(path, pending)
    if not pending:
        return
    model = _load_teacher(cfg)
    size = cfg.data.answer_batch_size

    def record(item: Item, text: Answer) -> dict:
        stopped = getattr(text, "cut", False)  # `generate_answers` gives an Answer; a plain str was not cut
        return seal({"id": item.index, "answer": str(text)} | ({"cut": True} if stopped else {}))

    main = process_state().is_main_process
    bar = tqdm(total=len(pending), desc="teacher answers", unit="prompt", mininterval=1.0, disable=not main)
    with bar, storage(path):  # a full disk: one line naming the file; a line it cut is dropped when resumed
        append_answers(
            model,
            processor,
            _Items(pending),
            cfg.data.answer_max_tokens,
            size,
            path,
            record,
            bar,
            lambda saved: ConfigError(
                f"out of memory answering with the teacher at data.answer_batch_size={size}; lower it and rerun "
                f"to resume (the answers made so far are saved in {folder}, {saved} of them in {path.name})"
            ),
        )
    del model
    gc.collect()  # the stages load their models next: the teacher's memory must be free
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    shutil.rmtree(offload_folder(cfg), ignore_errors=True)


def offload_folder(cfg: TrainConfig) -> Path:
    """Where teacher_device_map=auto keeps the teacher weights it places on the disk while answering."""
    return Path(cfg.output) / ".cache" / "teacher-offload"


def _load_teacher(cfg: TrainConfig):
    """The teacher for answering, in evaluation mode: whole on this process's device, or (teacher_device_map=auto)
    spread over this machine's devices by accelerate; stopped first when it cannot fit there (`check_fits`)."""
    dtype, device = compute_dtype(cfg.precision), process_state().device
    spread = cfg.teacher_max_memory if cfg.teacher_device_map else None
    if spread is None:
        memory, fix = None, "spread it over this machine's GPUs, CPU memory and disk (teacher_device_map=auto)"
    else:
        memory = spread_memory(spread)
        fix = "give it more devices or memory (teacher_max_memory; naming disk there offloads the rest, slowly)"
    fixes = f"{fix}, {QUANTIZE}, or {SERVE}"
    options = {"trust_remote_code": cfg.trust_remote_code, "memory": memory, "fixes": fixes}
    check_fits(cfg.teacher, dtype, device, cfg.teacher_quantization, **options)
    offload = str(offload_folder(cfg))
    model = load_model(
        cfg.teacher, dtype, cfg.trust_remote_code, quantization=cfg.teacher_quantization, spread=spread, offload=offload
    )
    if spread is None:
        return model.to(device).eval()
    # {module name: GPU index, "cpu" or "disk"}; none when all of it went to one device
    where = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
    placed = Counter(str(device) for device in where.values())
    log.info("the teacher answers spread over %s (modules per device)", dict(placed))
    return model.eval()
