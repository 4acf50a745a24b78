"""Teacher-answered prompts (data.answers=teacher): generated once, cached, resumed, refused when stale; through
the real CLI on tiny local checkpoints."""

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText

from vlsi import answers as answers_module
from vlsi.cli import main
from vlsi.config import ConfigError, load_config
from vlsi.data import IGNORE_INDEX, DataError, Samples, encode, read_dataset, sources
from vlsi.eval import generate as generate_module
from vlsi.eval.generate import Item, generate_answers
from vlsi.models.loading import load_processor
from vlsi.runfolder import FolderError, seal
from vlsi.stages.samples import load_samples
from vlsi.toy import write_digits_dataset, write_tiny_pair

CONFIG = str(Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml")
UNANSWERED = {"digit-1", "digit-2", "digit-4", "digit-5"}
MULTI_TURN = "digit-5"  # answered, then asked again: only the trailing question is the teacher's
CUT = "data.keep_cut_answers=true"  # the toy teacher's random weights never end an answer: all are cut, and kept
# The tiny teacher's answers run to data.answer_max_tokens: kept, so that the resume tests see every prompt answered.
KEEP_CUT = ["data.keep_cut_answers=true"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(teacher, student, data): 6 records, 4 of them ending with an unanswered user turn."""
    root = tmp_path_factory.mktemp("toy")
    teacher, student = write_tiny_pair(root)
    records = json.loads(write_digits_dataset(root, n=6).read_text())
    for record in records:
        if record["id"] == MULTI_TURN:
            record["conversations"].append({"from": "human", "value": "Are you sure?"})
        elif record["id"] in UNANSWERED:
            record["conversations"] = record["conversations"][:1]
    data = root / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(teacher), str(student), str(data)


def _cfg(toy, out, *overrides, teacher=None):
    teacher_path, _, data = toy
    # The toy teacher's random weights never end an answer: every one is cut at answer_max_tokens, and kept.
    settings = [f"data.path={data}", "data.answers=teacher", "data.answer_max_tokens=6", "data.answer_batch_size=3"]
    settings.append("data.keep_cut_answers=true")
    return load_config(CONFIG, [*settings, *overrides], teacher=teacher or teacher_path, output=str(out))


@pytest.fixture
def calls(monkeypatch):
    """The ids of the prompts handed to the teacher, one list per generation batch."""
    batches = []

    def counting(model, processor, items, max_new_tokens):
        batches.append([item.index for item in items])
        return generate_answers(model, processor, items, max_new_tokens)

    monkeypatch.setattr(generate_module, "generate_answers", counting)
    return batches


def _cached(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "answers" / "answers.jsonl").read_text().splitlines()]


def test_unanswered_record_is_refused_without_the_setting(toy):
    _, _, data = toy
    with pytest.raises(DataError) as raised:
        read_dataset(data)
    message = str(raised.value)
    for sample_id in UNANSWERED - {MULTI_TURN}:
        [line] = [line for line in message.splitlines() if f"record {sample_id} (line" in line]
        assert line.endswith(
            "no assistant turn, so nothing to learn from; set data.answers=teacher to have the teacher answer it"
        )
    assert f"record {MULTI_TURN}" not in message  # gold answers before a trailing question: valid, as before
    samples, _ = read_dataset(data, unanswered=True)
    assert len(samples) == 6


def test_answers_are_generated_once_and_reused(toy, tmp_path, calls, monkeypatch):
    cfg = _cfg(toy, tmp_path / "out")
    gold = {s.id: s for s in read_dataset(cfg.data.path, unanswered=True)[0]}
    samples = load_samples(cfg)

    assert sorted(i for batch in calls for i in batch) == sorted(UNANSWERED)
    assert [len(batch) for batch in calls] == [3, 1]  # data.answer_batch_size=3
    cached = {row["id"]: row["answer"] for row in _cached(cfg.output)}
    assert set(cached) == UNANSWERED
    index = json.loads((tmp_path / "out" / "answers" / "index.json").read_text())
    assert index["teacher"] == cfg.teacher and index["data"] == cfg.data.path
    assert index["count"] == 4 and index["answer_max_tokens"] == 6
    assert {"teacher_identity", "processor", "prompts"} <= set(index)

    by_id = {s.id: s for s in samples}
    assert set(by_id) == set(gold)  # the tiny teacher answers with text: nothing left out
    for sample_id, sample in by_id.items():
        if sample_id not in UNANSWERED:
            assert sample == gold[sample_id], "a gold answer is kept as it is"
            continue
        assert sample.messages[:-1] == gold[sample_id].messages, "only a trailing user turn is answered"
        assert sample.messages[-1] == {"role": "assistant", "content": [{"type": "text", "text": cached[sample_id]}]}
    assert [m["role"] for m in by_id[MULTI_TURN].messages] == ["user", "assistant", "user", "assistant"]

    # The answer is what the stages train on: the labels cover it.
    processor = load_processor(cfg.teacher)
    answered = by_id["digit-1"]
    labels = encode(answered, processor)["labels"][0]
    assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]).startswith(cached["digit-1"])

    # Rerun: every answer read back, no teacher loaded, nothing generated.
    def no_model(*args, **kwargs):
        raise AssertionError("the teacher was loaded although every prompt is answered")

    monkeypatch.setattr(answers_module, "load_model", no_model)
    calls.clear()
    assert load_samples(cfg) == samples
    assert calls == []


def test_a_partial_cache_is_resumed(toy, tmp_path, calls):
    cfg = _cfg(toy, tmp_path / "out")
    first = load_samples(cfg)
    path = tmp_path / "out" / "answers" / "answers.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:7])  # killed while writing the third answer
    kept = {json.loads(line)["id"] for line in lines[:2]}

    calls.clear()
    assert load_samples(cfg) == first  # greedy: the same answers again
    assert sorted(i for batch in calls for i in batch) == sorted(UNANSWERED - kept)
    assert sorted(row["id"] for row in _cached(cfg.output)) == sorted(UNANSWERED)  # each once, no torn line


def test_an_answer_edited_by_hand_is_refused_naming_its_line(toy, tmp_path, calls):
    """Each answer line carries its checksum: an edited answer is never trained on; deleting the line (as the message
    says) has the teacher answer that prompt again."""
    cfg = _cfg(toy, tmp_path / "out")
    first = load_samples(cfg)
    path = tmp_path / "out" / "answers" / "answers.jsonl"
    rows = _cached(cfg.output)
    rows[1]["answer"] = "a better answer"  # its sha256 left as it was
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    calls.clear()
    with pytest.raises(FolderError) as refused:
        load_samples(cfg)
    message = str(refused.value)
    assert message.startswith(f"{path}: answer 2 (prompt {rows[1]['id']}) is not as the teacher gave it")
    assert "delete that line" in message and "\n" not in message
    assert calls == []
    path.write_text("".join(json.dumps(row) + "\n" for i, row in enumerate(rows) if i != 1))
    assert load_samples(cfg) == first
    assert calls == [[rows[1]["id"]]]


def test_the_answered_samples_are_read_from_the_data_not_held_in_memory(toy, tmp_path):
    """`with_answers` keeps an index into the data file and the answers, never the samples; it reads as the plain
    list of answered samples does."""
    _, _, data = toy
    cfg = _cfg(toy, tmp_path / "out")
    answered = load_samples(cfg)
    assert isinstance(answered, answers_module.Answered) and isinstance(answered.samples, Samples)
    samples, _ = read_dataset(data, unanswered=True)
    texts = {row["id"]: row["answer"] for row in _cached(cfg.output)}
    plain = [
        dataclasses.replace(s, messages=[*s.messages, {"role": "assistant", "content": [{"type": "text", "text": t}]}])
        if (t := texts.get(s.id)) is not None
        else s
        for s in samples
    ]
    assert list(answered) == plain and [answered[i] for i in range(len(plain))] == plain
    assert list(answered.take([4, 1])) == [plain[4], plain[1]] and answered[1:3] == plain[1:3]
    assert sources.where(answered.take([4]), 0) == sources.where(samples, 4)


def test_a_cache_made_otherwise_is_refused(toy, tmp_path, calls):
    _, student, data = toy
    out = tmp_path / "out"
    load_samples(_cfg(toy, out))
    before = (out / "answers" / "answers.jsonl").read_text()
    calls.clear()
    with pytest.raises(FolderError, match=r"answers made with other settings \(teacher\).*delete .*answers"):
        load_samples(_cfg(toy, out, teacher=student))  # same tokenizer, other weights
    with pytest.raises(FolderError, match=r"\(data.answer_max_tokens: 6 -> 7\)"):
        load_samples(_cfg(toy, out, "data.answer_max_tokens=7"))
    edited = tmp_path / "edited.jsonl"
    edited.write_text(Path(data).read_text().replace("Is this the digit", "Is this the number"))  # digit-1, -4
    with pytest.raises(FolderError, match=r"other settings \(prompts \(data\)\)"):
        load_samples(_cfg(toy, out, f"data.path={edited}", f"data.image_root={Path(data).parent}"))
    assert calls == [] and (out / "answers" / "answers.jsonl").read_text() == before


def test_a_teacher_changed_in_place_is_refused(toy, tmp_path, calls):
    """Same folder, same file names and sizes, other weight values: the answers are not reused (runfolder's rule)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(toy[0], teacher)
    out = tmp_path / "out"
    load_samples(_cfg(toy, out, teacher=str(teacher)))
    _change_a_weight_in_place(teacher)
    with pytest.raises(FolderError, match=r"answers made with other settings \(teacher\)") as refused:
        load_samples(_cfg(toy, out, teacher=str(teacher)))
    assert "\n" not in str(refused.value)


def _change_a_weight_in_place(model: Path) -> None:
    """Add 1 to every value of one weight of `model`: every file keeps its name, size and header."""
    path = model / "model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1
    size = path.stat().st_size
    save_file(weights, path, metadata={"format": "pt"})
    assert path.stat().st_size == size


def test_answers_without_their_index_are_answered_again(toy, tmp_path, calls, caplog):
    """A deleted index.json: nothing says what made the answers there: none is trusted, a new index is written."""
    out = tmp_path / "out"
    first = load_samples(_cfg(toy, out))
    path = out / "answers" / "answers.jsonl"
    path.write_text("".join(json.dumps({"id": i, "answer": "stale"}) + "\n" for i in UNANSWERED))
    (out / "answers" / "index.json").unlink()
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="vlsi"):
        assert load_samples(_cfg(toy, out)) == first
    assert "has no index.json" in caplog.text
    assert sorted(i for batch in calls for i in batch) == sorted(UNANSWERED)
    assert (out / "answers" / "index.json").is_file()
    assert "stale" not in path.read_text()


def test_empty_answers_are_left_out(toy, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(generate_module, "generate_answers", lambda model, processor, items, n: [""] * len(items))
    with caplog.at_level(logging.WARNING, logger="vlsi"):
        samples = load_samples(_cfg(toy, tmp_path / "out"))
    assert not UNANSWERED & {s.id for s in samples} and len(samples) == 2
    assert "the teacher answered 4 prompts with nothing" in caplog.text


def test_cut_answers_of_the_local_teacher_are_marked_refused_above_the_bound_and_left_out_below(toy, tmp_path):
    """The toy teacher never ends an answer within data.answer_max_tokens: every answer is cut, marked so in
    answers.jsonl, and (more than data.max_cut_fraction of them) the run stops naming the setting to raise."""
    settings = [f"data.path={toy[2]}", "data.answers=teacher", "data.answer_max_tokens=2"]
    cfg = load_config(CONFIG, settings, teacher=toy[0], output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"4 of the 4 prompts' answers .* stop at data.answer_max_tokens=2"):
        load_samples(cfg)
    assert all(row["cut"] is True for row in _cached(tmp_path / "out"))
    cfg = load_config(CONFIG, [*settings, "data.max_cut_fraction=1"], teacher=toy[0], output=str(tmp_path / "out"))
    assert not UNANSWERED & {s.id for s in load_samples(cfg)}  # the saved answers, reused, then left out


def test_a_teacher_is_required(toy, tmp_path):
    cfg = _cfg(toy, tmp_path / "out")
    cfg.teacher = ""
    with pytest.raises(ConfigError, match="data.answers=teacher needs a teacher.*--teacher"):
        load_samples(cfg)


def test_generation_leaves_the_padding_side_as_it_was(toy):
    teacher, _, data = toy
    processor = load_processor(teacher)
    model = AutoModelForImageTextToText.from_pretrained(teacher).eval()
    samples, _ = read_dataset(data, unanswered=True)
    items = [Item(s.id, s.messages, s.images, {}) for s in samples[:2]]
    assert processor.tokenizer.padding_side == "right"
    assert len(generate_answers(model, processor, items, 2)) == 2
    assert processor.tokenizer.padding_side == "right"


def _sft(toy, out, *extra, teacher=None):
    _, student, data = toy
    flags = ["--teacher", teacher] if teacher else []
    argv = ["sft", "--model", student, *flags, "--data", data, "--output", str(out), "--config", CONFIG]
    return main([*argv, "sft.max_steps=2", *extra])


def test_sft_with_teacher_answers_end_to_end(toy, tmp_path, capsys):
    teacher = toy[0]
    out = tmp_path / "s"
    assert _sft(toy, out, "data.answers=teacher", "data.answer_max_tokens=6", CUT, teacher=teacher) == 0
    assert sorted(row["id"] for row in _cached(out)) == sorted(UNANSWERED)
    assert (out / "model" / "model.safetensors").is_file()
    assert load_config(out / "config.yaml").teacher == teacher

    assert _sft(toy, tmp_path / "none", "data.answers=teacher") == 2
    assert "data.answers=teacher needs a teacher" in capsys.readouterr().err
    assert _sft(toy, tmp_path / "flag", teacher=teacher) == 2
    assert "--teacher is only used to answer prompts: add data.answers=teacher" in capsys.readouterr().err
    assert not (tmp_path / "flag" / "answers").exists()


def test_train_with_teacher_answers_end_to_end(toy, tmp_path):
    teacher, student, data = toy
    out = tmp_path / "run"
    argv = ["train", "--teacher", teacher, "--student", student, "--data", data, "--output", str(out)]
    steps = ["verbalize.max_steps=1", "interact.max_steps=1", "sft.max_steps=1", "data.answer_max_tokens=6"]
    assert main([*argv, "--config", CONFIG, *steps, "data.answers=teacher", CUT]) == 0
    assert sorted(row["id"] for row in _cached(out)) == sorted(UNANSWERED)
    assert (out / "student" / "model.safetensors").is_file()
    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["verbalize/teacher", "verbalize/student", "interact", "sft"]
    # The length scan saw the answered samples: each stage's cached lengths hold all six.
    for name in ("verbalize-teacher", "interact", "sft"):
        assert len(json.loads((out / ".cache" / f"{name}-lengths.json").read_text())["lengths"]) == 6


def test_read_answers_merges_the_processes_files(tmp_path):
    """answers.jsonl (the main process) and answers-R.jsonl (process R) are one set of answers, by prompt id; a line
    cut by a kill at the end of any of them is skipped."""
    rows = {
        "answers.jsonl": [{"id": "a", "answer": "one"}, {"id": "c", "answer": "three", "cut": True}],
        "answers-1.jsonl": [{"id": "b", "answer": "two"}, {"id": "other", "answer": "not asked"}],
        "answers-2.jsonl": [{"id": "d", "answer": "four", "cut": True}],
    }
    for name, lines in rows.items():
        (tmp_path / name).write_text("".join(json.dumps(seal(row)) + "\n" for row in lines))
    with (tmp_path / "answers-2.jsonl").open("a") as f:
        f.write('{"id": "e", "ans')  # killed while writing
    answers, cut = answers_module.read_answers(tmp_path, {"a", "b", "c", "d", "e"})
    assert answers == {"a": "one", "b": "two", "c": "three", "d": "four"}
    assert cut == {"c", "d"}


def test_answers_of_another_number_of_processes_are_resumed(toy, tmp_path, calls):
    """A 2-process run killed midway left answers in answers.jsonl and answers-1.jsonl (one torn line): one process
    reads both and answers only the prompts still missing, into answers.jsonl."""
    cfg = _cfg(toy, tmp_path / "out", *KEEP_CUT)
    first = load_samples(cfg)
    folder = tmp_path / "out" / "answers"
    lines = (folder / "answers.jsonl").read_text().splitlines(keepends=True)
    (folder / "answers.jsonl").write_text(lines[0])
    (folder / "answers-1.jsonl").write_text(lines[1] + lines[2][:7])
    kept = {json.loads(line)["id"] for line in lines[:2]}

    calls.clear()
    assert load_samples(cfg) == first
    assert sorted(i for batch in calls for i in batch) == sorted(UNANSWERED - kept)
    assert sorted(row["id"] for row in _cached(cfg.output)) == sorted(UNANSWERED - {json.loads(lines[1])["id"]})
    assert (folder / "answers-1.jsonl").read_text().startswith(lines[1]), "another process's file is left as it was"


def test_answers_without_their_index_are_answered_again_every_process_file_too(toy, tmp_path, calls):
    out = tmp_path / "out"
    first = load_samples(_cfg(toy, out, *KEEP_CUT))
    stale = out / "answers" / "answers-1.jsonl"
    stale.write_text("".join(json.dumps({"id": i, "answer": "stale"}) + "\n" for i in UNANSWERED))
    (out / "answers" / "index.json").unlink()
    calls.clear()
    assert load_samples(_cfg(toy, out, *KEEP_CUT)) == first
    assert sorted(i for batch in calls for i in batch) == sorted(UNANSWERED)
    assert not stale.exists()
