"""`vlsi demo`: task generation, the held-out split, scoring, the shipped models, and a fast end-to-end run."""

import json
import re
import time

import pytest
import torch

from vlsi.cli import main
from vlsi.demo.evaluate import evaluate, score
from vlsi.demo.experiment import DemoSettings, budget
from vlsi.demo.models import (
    STUDENT_DIR,
    STUDENT_TARGET_LAYERS,
    TEACHER_DIR,
    TEACHER_TARGET_LAYERS,
    TEACHER_VERBALIZERS,
    teacher_card,
)
from vlsi.demo.report import ROWS, verdict, write_report
from vlsi.demo.tasks import (
    SLOTS,
    SPLITS,
    STYLES,
    TASKS,
    Item,
    _digits,
    chance_accuracy,
    digit_pools,
    is_correct,
    layout_side,
    make_split,
    normalise,
    read_split,
    write_split,
)


def _image_key(item: Item) -> bytes:
    return item.render().tobytes()


def test_splits_are_deterministic_and_cover_every_task_and_style():
    a, b = make_split("train", 60), make_split("train", 60)
    assert a == b
    assert [_image_key(x) for x in a[:12]] == [_image_key(x) for x in b[:12]]
    assert make_split("train", 30) == a[:30], "a longer split extends a shorter one"
    assert {(x.task, x.style) for x in a} == {(t, s) for t in TASKS for s in STYLES}
    assert a != make_split("val", 60)
    with pytest.raises(ValueError, match="unknown split"):
        make_split("dev", 3)


def test_answers_follow_from_the_images():
    _, target = _digits()
    for item in make_split("teacher", 240):
        values = [int(target[index]) for _, index in item.digits]
        cells = [cell for cell, _ in item.digits]
        if item.task == "count":
            truth = len(item.shapes)
            assert not item.digits and 1 <= truth <= 9
        elif item.task == "digit":
            (truth,) = values
        elif item.task == "compare":
            assert cells == [0, SLOTS - 1] and values[0] != values[1]
            truth = max(values)
            if item.style != "number":
                truth = {"yesno": "yes", "choice": "A"}[item.style] if values[0] > values[1] else None
                assert (item.answer in ("yes", "A")) == (truth is not None)
                continue
        else:
            step = values[1] - values[0]
            assert values[2] - values[1] == step and step in (-3, -2, -1, 1, 2, 3) and cells == [0, 1, 2]
            truth = values[2] + step
        if item.style == "number":
            assert item.answer == str(truth)
        elif item.style == "yesno":
            asked = int(re.search(r"\b(\d)\b", item.question).group(1))
            assert item.answer == ("yes" if asked == truth else "no")
        else:
            options = dict(re.findall(r"\b([A-D])\. (\d)\b", item.question))
            assert len(options) == 4 and options[item.answer] == str(truth)


def test_test_split_is_held_out():
    pools = digit_pools()
    train_pool = {i for indices in pools["train"].values() for i in indices}
    test_pool = {i for indices in pools["test"].values() for i in indices}
    assert not train_pool & test_pool and len(train_pool | test_pool) == len(_digits()[1])
    test = make_split("test", 600)
    for item in test:
        assert all(index in test_pool for _, index in item.digits)
        if item.shapes:
            assert layout_side(item.shapes) == "test"
    test_images = {_image_key(x) for x in test}
    for split in set(SPLITS) - {"test"}:
        items = make_split(split, 1200)
        assert all(index in train_pool for x in items for _, index in x.digits)
        assert not test_images & {_image_key(x) for x in items}, f"a test image appears in the {split} split"


def test_write_and_read_a_split(tmp_path):
    items = make_split("val", 5)
    path = write_split(items, tmp_path, "val")
    records = json.loads(path.read_text())
    assert records[0]["conversations"][0]["value"] == "<image>\n" + items[0].question
    assert records[0]["conversations"][1]["value"] == items[0].answer
    assert (tmp_path / records[0]["image"]).is_file()
    assert read_split(path) == items


@pytest.mark.parametrize(
    "reply, style, expected",
    [
        ("B", "choice", "B"),
        (" The answer is C.", "choice", "C"),
        ("b", "choice", ""),
        ("Yes.", "yesno", "yes"),
        ("no", "yesno", "no"),
        ("maybe", "yesno", ""),
        ("7", "number", "7"),
        ("07 shapes", "number", "7"),
        ("", "number", ""),
    ],
)
def test_normalise(reply, style, expected):
    assert normalise(reply, style) == expected


def test_scoring():
    item = Item("x", "digit", "number", "Which digit is shown?", "3")
    assert is_correct("3", item) and is_correct(" 3\n", item) and not is_correct("8", item) and not is_correct("", item)
    items = make_split("test", 24)
    result = score(items, [x.answer for x in items[:12]] + ["?"] * 12)
    assert result["accuracy"] == 0.5 and result["n"] == 24
    assert set(result["by_task"]) == set(TASKS) and set(result["by_style"]) == set(STYLES)
    assert 0.2 < chance_accuracy(make_split("test", 1200)) < 0.35


def test_budget_is_equal_for_every_method():
    s = DemoSettings()
    b = budget(s)
    assert sum(b["sft"].values()) == sum(b["kd"].values()) == sum(b["vlsi"].values()) == s.steps
    assert b["kd"]["kd"] == b["vlsi"]["verbalize"] + b["vlsi"]["interact"] and b["kd"]["sft"] == b["vlsi"]["sft"]
    with pytest.raises(ValueError, match="verbalize_steps < distill_steps"):
        DemoSettings(verbalize_steps=5, distill_steps=5).check()


def test_shipped_models_load_and_the_teacher_beats_the_student_and_chance():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlsi.models.loading import check_same_vocabulary
    from vlsi.models.verbalizer import Verbalizers

    card = teacher_card()
    processor = AutoProcessor.from_pretrained(TEACHER_DIR)
    check_same_vocabulary(processor, AutoProcessor.from_pretrained(STUDENT_DIR), "teacher", "student")
    teacher = AutoModelForImageTextToText.from_pretrained(TEACHER_DIR, dtype=torch.float32)
    student = AutoModelForImageTextToText.from_pretrained(STUDENT_DIR, dtype=torch.float32)
    assert teacher.config.text_config.num_hidden_layers > student.config.text_config.num_hidden_layers
    assert teacher.config.text_config.hidden_size > student.config.text_config.hidden_size
    verbalizers = Verbalizers.load(TEACHER_VERBALIZERS)
    assert verbalizers.target_layers == TEACHER_TARGET_LAYERS and len(STUDENT_TARGET_LAYERS) <= len(verbalizers)

    test = make_split("test", 120)
    chance = chance_accuracy(test)
    t, s = evaluate(teacher, processor, test)["accuracy"], evaluate(student, processor, test)["accuracy"]
    assert t > chance + 0.3, f"teacher {t:.3f} vs chance {chance:.3f}"
    assert t > s + 0.1, f"teacher {t:.3f} vs student initialisation {s:.3f}"
    assert card["accuracy"]["test"]["accuracy"] > card["student_accuracy"]["test"]["accuracy"] + 0.15


def _results(**over) -> dict:
    r = {
        "teacher": 0.9,
        "student_sft": 0.5,
        "student_kd": 0.55,
        "student_vlsi": 0.612,
        "n_test": 1000,
        "seeds": [0],
        "seconds": 170.0,
        "chance": 0.29,
        "by_task": {n: {t: 0.5 for t in TASKS} for n in ("teacher", "sft", "kd", "vlsi")},
        "by_style": {n: {s: 0.5 for s in STYLES} for n in ("teacher", "sft", "kd", "vlsi")},
        "budget": budget(DemoSettings()),
        "train_seconds": {"sft": 30.0, "kd": 50.0, "vlsi": 60.0},
        "peak_memory_mib": {"main": 1500.0, "largest_child": 900.0},
        "settings": {**DemoSettings().__dict__, "fast": False},
        "machine": "test",
    }
    return {**r, **over}


def test_report_states_the_numbers_and_the_verdict(tmp_path):
    write_report(tmp_path, _results(), None)
    text = (tmp_path / "report.md").read_text()
    assert "| teacher (shipped) | **90.0** |" in text and "**61.2**" in text
    assert "11.2 points above SFT only (better" in text and "6.2 points above final-layer KD" in text
    low = verdict(_results(student_vlsi=0.49))
    assert "below SFT only (within noise" in low and "below final-layer KD (worse" in low


def test_demo_is_a_vlsi_subcommand():
    from vlsi.cli import build_parser
    from vlsi.demo import run

    args = build_parser().parse_args(["demo", "--fast", "--output", "d", "seed=3"])
    assert args.func is run and args.fast and args.settings == ["seed=3"]


def test_bad_demo_settings_are_refused(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), "steps=many"]) == 2
    assert "steps: expected int" in capsys.readouterr().err
    assert main(["demo", "--output", str(tmp_path), "epochs=3"]) == 2
    assert "known key" in capsys.readouterr().err


def test_fast_demo_writes_consistent_results_and_report(tmp_path):
    out = tmp_path / "demo"
    start = time.time()
    assert main(["demo", "--fast", "--output", str(out)]) == 0
    assert time.time() - start < 120
    results = json.loads((out / "results.json").read_text())
    for key, _ in ROWS:
        assert 0.0 <= results[key] <= 1.0
    assert results["n_test"] == len(read_split(out / "data" / "test.json")) == 48
    assert results["seeds"] == [0] and results["seconds"] > 0
    assert results["budget"]["examples_per_student"] == 6 * 8
    text = (out / "report.md").read_text()
    for key, label in ROWS:
        assert f"| {label} | **{100 * results[key]:.1f}** |" in text
    assert f"**{results['n_test']} questions**" in text
    for png in ("verbalizer_loss.png", "layer_match.png", "example.png"):
        assert (out / png).is_file() and f"]({png})" in text
    assert "block" in text, "per-layer answers of the example"
    for method in ("sft", "kd", "vlsi"):
        assert (out / "runs" / method / "student" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "runs" / "vlsi" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == ["verbalize/student"] * 2 + ["interact"] * 2 + ["sft"] * 2
