"""`vlsi demo`: task generation, the held-out split, scoring, the shipped models, and a fast end-to-end run."""

import json
import re

import pytest
import torch
import yaml

from vlsi.cli import main
from vlsi.demo.evaluate import evaluate, score
from vlsi.demo.experiment import ON_POLICY, ON_POLICY_PAIRS, PAIRS, DemoSettings, budget, comparisons
from vlsi.demo.models import MODEL_SETS, SHIPPED, STUDENT_TARGET_LAYERS, TEACHER_TARGET_LAYERS, teacher_card
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


def test_budget_is_equal_for_every_method_and_stage_1_is_not_charged():
    s = DemoSettings()
    b = budget(s)
    total = s.distill_steps + s.sft_steps
    assert sum(b["sft"].values()) == sum(b["kd"].values()) == sum(b["vlsi"].values()) == total
    assert b["kd"]["kd"] == b["vlsi"]["interact"] == b["sft"]["sft_1"], "equal interaction steps for KD and VLsI"
    assert b["kd"]["sft"] == b["vlsi"]["sft"] == b["sft"]["sft"]
    assert "verbalize" not in b["vlsi"] and b["uncharged"] == {"vlsi_verbalize": s.verbalize_steps}
    assert b["examples_per_student"] == total * s.batch_size
    with pytest.raises(ValueError, match="must be >= 1"):
        DemoSettings(sft_steps=0).check()
    with pytest.raises(ValueError, match="tasks='compare,dance'"):
        DemoSettings(tasks="compare,dance").check()


def test_split_of_chosen_tasks_and_styles_and_questions_without_answers(tmp_path):
    items = make_split("train", 20, ("compare", "sequence"), ("number",))
    assert {(x.task, x.style) for x in items} == {("compare", "number"), ("sequence", "number")}
    assert make_split("train", 10, ("compare", "sequence"), ("number",)) == items[:10]
    with pytest.raises(ValueError, match="unknown or no tasks"):
        make_split("train", 3, ("dance",))
    records = json.loads(write_split(items, tmp_path, "mixed", answered=5).read_text())
    assert [len(r["conversations"]) for r in records] == [2] * 5 + [1] * 15
    assert read_split(tmp_path / "mixed.json") == items, "the items keep their true answers, for scoring"


def test_paired_comparison_against_a_reference():
    from scipy.stats import binomtest

    from vlsi.demo.stats import mcnemar_p, paired

    a = [1, 1, 0, 1, 0, 1, 1, 1, 0, 1] * 12
    b = [1, 0, 0, 1, 1, 0, 0, 1, 0, 1] * 12
    c = paired(a, b)
    diffs = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    assert c["difference"] == pytest.approx(float(diffs.mean()))
    assert c["se"] == pytest.approx(float(diffs.std() / len(a) ** 0.5))
    assert (c["a_only"], c["b_only"]) == (36, 12)
    assert c["p_mcnemar"] == pytest.approx(binomtest(12, 48, 0.5).pvalue)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    with pytest.raises(ValueError, match="equally long"):
        paired([1, 0], [1])


@pytest.mark.parametrize("name, styles", [("", STYLES), ("chain", ("chain",))])
def test_shipped_models_load_and_the_teacher_beats_the_student_and_chance(name, styles):
    """Each shipped set (`teacher=NAME`): one tokenizer, a teacher larger than the student that answers its styles
    well above chance and the student initialisation; the chain set's teacher answers whole chains."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlsi.models.verbalizer import Verbalizers
    from vlsi.preflight import refuse_different_tokenizers

    models = MODEL_SETS[name]
    card = teacher_card(models)
    processor = AutoProcessor.from_pretrained(models.teacher)
    refuse_different_tokenizers(processor, AutoProcessor.from_pretrained(models.student), "teacher", "student")
    teacher = AutoModelForImageTextToText.from_pretrained(models.teacher, dtype=torch.float32)
    student = AutoModelForImageTextToText.from_pretrained(models.student, dtype=torch.float32)
    assert teacher.config.text_config.num_hidden_layers > student.config.text_config.num_hidden_layers
    assert teacher.config.text_config.hidden_size > student.config.text_config.hidden_size
    verbalizers = Verbalizers.load(models.verbalizers)
    assert verbalizers.target_layers == TEACHER_TARGET_LAYERS and len(STUDENT_TARGET_LAYERS) <= len(verbalizers)

    test = make_split("test", 120, ("compare", "sequence"), styles) if name else make_split("test", 120)
    chance = chance_accuracy(test)
    t, s = evaluate(teacher, processor, test)["accuracy"], evaluate(student, processor, test)["accuracy"]
    assert t > chance + 0.3, f"teacher {t:.3f} vs chance {chance:.3f}"
    assert t > s + 0.1, f"teacher {t:.3f} vs student initialisation {s:.3f}"
    assert card["accuracy"]["test"]["accuracy"] > card["student_accuracy"]["test"]["accuracy"] + 0.15
    if name:
        assert card["accuracy"]["test"]["chain_exact"] > 0.8 and "--styles number yesno choice chain" in card["command"]


CLUSTERS = [f"pattern {k % 50}" for k in range(1000)]


def _results(**over) -> dict:
    n = 1000
    hits = {
        "sft": [1] * 500 + [0] * 500,
        "sft_teacher": [1] * 540 + [0] * 460,
        "kd": [1] * 550 + [0] * 450,
        "vlsi": [1] * 612 + [0] * 388,
    }
    r = {
        "teacher": 0.9,
        "student_init": 0.3,
        "student_sft": 0.5,
        "student_sft_teacher": 0.54,
        "student_kd": 0.55,
        "student_vlsi": 0.612,
        "n_test": n,
        "seeds": [0],
        "seconds": 170.0,
        "chance": 0.1,
        "before_sft": {"sft": 0.48, "sft_teacher": 0.52, "kd": 0.53, "vlsi": 0.6},
        "n_clusters": 50,
        "paired": comparisons({m: {"hits": h} for m, h in hits.items()}, CLUSTERS),
        "by_task": {n: {t: 0.5 for t in ("compare", "sequence")} for n in ("teacher", "init", *hits)},
        "layer_accuracy": {
            "teacher": {"sequence": {"block 5": 0.83, "block 6": 0.93, "output": 0.947}},
            "vlsi": {"sequence": {"block 2": 0.567, "output": 0.59}},
        },
        "budget": budget(DemoSettings()),
        "train_seconds": {
            "sft": 30.0,
            "sft_teacher": 30.0,
            "kd": 50.0,
            "vlsi": 60.0,
            "vlsi_verbalize": 5.0,
            "teacher_answers": 9.0,
        },
        "peak_memory_mib": {"main": 1500.0, "largest_child": 900.0},
        "settings": {**DemoSettings().__dict__, "fast": False},
        "machine": "test",
    }
    return {**r, **over}


def test_report_states_the_numbers_and_the_verdict(tmp_path):
    write_report(tmp_path, _results(), None)
    text = (tmp_path / "report.md").read_text()
    assert "| teacher (shipped) | **90.0** |" in text and "| **61.2** | 60.0 |" in text
    assert "11.2 points above SFT only (95 % CI +" in text and ": beyond noise; item-level McNemar p = 3.9e-34)" in text
    assert "6.2 points above final-layer KD" in text and "Best student: VLsI" in text
    assert "7.2 points above SFT with the teacher's answers" in text
    assert "1000 questions fall into 50 task x pattern clusters" in text and "a cluster bootstrap" in text
    assert "not charged: it took 5 s" in text
    assert "| teacher | block 5 | block 6 | output |" in text and "| sequence | 56.7 | 59.0 |" in text
    same = {"hits": [1] * 100}
    clusters = [f"p{k % 10}" for k in range(100)]
    evals = {"vlsi": {"hits": [0] * 10 + [1] * 90}, "sft": same, "kd": same, "sft_teacher": same}
    worse = comparisons(evals, clusters, (("vlsi", "sft"), ("vlsi", "kd"), ("vlsi", "sft_teacher")))
    low = verdict(_results(student_vlsi=0.49, paired=worse))
    assert "10.0 points below SFT only (95 % CI -10.0 to -10.0" in low and "beyond noise" in low


def test_the_verdict_says_within_noise_and_whether_equivalent():
    """A difference whose interval holds 0 is "within noise"; TOST says whether it is also within +-2 points."""
    from vlsi.demo.report import _compare

    clusters = [f"p{k % 40}" for k in range(1200)]
    # every pattern: a right on the items b gets wrong and the other way round, as often
    a = [(k // 40) % 2 for k in range(1200)]
    tie = comparisons({"a": {"hits": a}, "b": {"hits": [1 - x for x in a]}}, clusters, (("a", "b"),))["a_vs_b"]
    assert tie["difference"] == 0.0 and "equivalent within ±2.0 points (TOST, 5 %)" in _compare("b", tie)
    # a gets 21 of 40 patterns right, b 19: the clusters make a 5-point difference undecidable either way
    a = [int(k % 40 < 21) for k in range(1200)]
    b = [int(k % 40 < 19) for k in range(1200)]
    wide = comparisons({"a": {"hits": a}, "b": {"hits": b}}, clusters, (("a", "b"),))["a_vs_b"]
    assert wide["item_level"]["p_mcnemar"] < 1e-10, "counted as independent items it would look decisive"
    assert "within noise, but not shown equivalent within ±2.0 points" in _compare("b", wide)


def test_demo_is_a_vlsi_subcommand():
    from vlsi.cli import build_parser
    from vlsi.demo import demo_command

    args = build_parser().parse_args(["demo", "--fast", "--output", "d", "seed=3"])
    assert args.func is demo_command and args.fast and args.settings == ["seed=3"]


@pytest.mark.parametrize(
    "setting, message",
    [
        ("sft_steps=many", "sft_steps: expected int"),
        ("epochs=3", "known key"),
        ("intermediate_reduction=max", "intermediate_reduction: sum or mean"),
        ("student=/nonexistent", "no Hugging Face checkpoint"),
        ("student_layers=first", "write block indices"),
        ("intermediate_weight=-1", "intermediate_weight=-1.0: a finite number >= 0"),
        ("freeze_student_verbalizers=2", "freeze_student_verbalizers=2: 0 or 1"),
        ("on_policy=1.5", "on_policy=1.5: a share of interaction batches, 0 to 1"),
        ("teacher=big", "teacher='big': a shipped set"),
        ("styles=chain", "the shipped teacher was not trained on chain answers; add teacher=chain"),
        ("teacher=chain student=deep-thin", "the named students share the default set's tokenizer"),
    ],
)
def test_bad_demo_settings_are_refused(tmp_path, capsys, setting, message):
    assert main(["demo", "--output", str(tmp_path), *setting.split()]) == 2
    assert message in capsys.readouterr().err


def test_fast_demo_with_another_student_and_the_layer_terms_averaged_weighted_frozen(tmp_path):
    """`student=DIR student_layers=...` (a student initialisation of another size, with the shipped tokenizer),
    `intermediate_reduction=mean`, `intermediate_weight` and `freeze_student_verbalizers` reach every run: the
    students start from it, VLsI matches its layers, and its verbalizers leave the interaction as stage 1 made them."""
    from safetensors.torch import load_file

    from vlsi.demo.models import build_model
    from vlsi.models.loading import load_processor

    student = tmp_path / "student"
    tokenizer = load_processor(str(SHIPPED.teacher)).tokenizer  # one vocabulary with the teacher
    build_model(student, dict(hidden=32, layers=3, heads=2, vision_depth=1), 0, tokenizer)
    out = tmp_path / "demo"
    settings = [
        f"student={student}",
        "student_layers=0,1",
        "intermediate_reduction=mean",
        "intermediate_weight=0.3",
        "freeze_student_verbalizers=1",
    ]
    assert main(["demo", "--fast", "--output", str(out), *settings]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["student"] == str(student) and results["settings"]["intermediate_reduction"] == "mean"
    assert set(results["match_entropy"]) == {"match_entropy/layer0", "match_entropy/layer1"}
    assert list(results["layer_accuracy"]["init"]["compare"]) == ["block 0", "block 1", "output"]
    config = (out / "runs" / "vlsi" / "config.yaml").read_text()
    assert f"student: {student}" in config and "intermediate_reduction: mean" in config
    assert "intermediate_weight: 0.3" in config and "freeze_student_verbalizers: true" in config
    stage1 = load_file(out / "runs" / "vlsi" / "verbalizers" / "student" / "verbalizers.safetensors")
    after = load_file(out / "runs" / "vlsi" / "stages" / "interact" / "verbalizers" / "verbalizers.safetensors")
    assert stage1.keys() == after.keys() and all(torch.equal(stage1[k], after[k]) for k in stage1)
    assert "3 layers x 32" in (out / "report.md").read_text()


def test_fast_demo_writes_consistent_results_and_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    off_policy = [(key, label) for key, label in ROWS if "on_policy" not in key]  # on_policy=0: only these
    assert not any(key in results for key, _ in ROWS if (key, _) not in off_policy)
    for key, _ in off_policy:
        assert 0.0 <= results[key] <= 1.0
    assert results["n_test"] == len(read_split(out / "data" / "test.json")) == 48
    assert results["seeds"] == [0] and results["seconds"] > 0
    assert results["seconds"] >= sum(results["train_seconds"].values()), "the whole run takes at least its parts"
    assert results["budget"]["examples_per_student"] == 6 * 8
    assert set(results["before_sft"]) == {"sft", "sft_teacher", "kd", "vlsi"}
    assert set(results["paired"]) == set(results["paired_before_sft"]) == {f"{a}_vs_{b}" for a, b in PAIRS}
    assert set(results["match_entropy"]) == {f"match_entropy/layer{i}" for i in STUDENT_TARGET_LAYERS}
    assert set(results["layer_accuracy"]) == {"teacher", "init", "kd", "vlsi", "vlsi_own"}
    assert (out / "runs" / "kd" / "probe_verbalizers" / "verbalizers.safetensors").is_file()
    assert set(results["interaction"]) == {"kd", "vlsi"}, "the students with an interaction stage"
    for method, seen in results["interaction"].items():  # against the run's own metrics: 4 steps, a tenth is 1
        rows = [json.loads(x) for x in (out / "runs" / method / "metrics.jsonl").open()]
        rows = [r for r in rows if r["stage"] == "interact"]
        assert seen["last_kl_first_tenth"] == rows[0]["last"] and seen["last_kl_last_tenth"] == rows[-1]["last"]
        assert seen["clipped_share"] == sum(r["clipped"] for r in rows) / 4 and seen["grad_norm_median"] > 0
    for name, layers in [("teacher", TEACHER_TARGET_LAYERS)] + [
        (m, STUDENT_TARGET_LAYERS) for m in ("init", "kd", "vlsi", "vlsi_own")
    ]:
        for accuracy in results["layer_accuracy"][name].values():
            assert list(accuracy) == [f"block {i}" for i in layers] + ["output"]
            assert all(0.0 <= a <= 1.0 for a in accuracy.values())
    answers = out / "runs" / "kd" / "answers" / "answers.jsonl"
    assert len(answers.read_text().splitlines()) == 48, "the teacher answered every unlabelled question, once"
    assert (out / "runs" / "vlsi" / "answers" / "answers.jsonl").read_text() == answers.read_text()
    text = (out / "report.md").read_text()
    assert "## What each layer knows" in text and "last-layer KL to the teacher over its first and last" in text
    for key, label in off_policy:
        assert f"| {label} | **{100 * results[key]:.1f}** |" in text
    assert f"**{results['n_test']} questions**" in text
    for png in ("verbalizer_loss.png", "layer_match.png", "example.png"):
        assert (out / png).is_file() and f"]({png})" in text
    assert "block" in text, "per-layer answers of the example"
    for method in ("sft", "sft_teacher", "kd", "vlsi"):
        assert (out / "runs" / method / "student" / "model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "runs" / "vlsi" / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == ["verbalize/student"] * 2 + ["interact"] * 4 + ["sft"] * 2


def test_answer_lengths_follow_from_the_task_never_a_fixed_four():
    from vlsi.demo.evaluate import answer_tokens
    from vlsi.demo.experiment import answer_length, answer_settings
    from vlsi.demo.tasks import possible_answers
    from vlsi.models.loading import load_processor

    tokenizer = load_processor(str(SHIPPED.teacher)).tokenizer
    assert answer_tokens(tokenizer, ("compare", "sequence"), ("number",)) == 2, "one digit + end-of-turn"
    assert answer_tokens(tokenizer, TASKS, STYLES) == 3, '"no" is two tokens of the shipped tokenizer'
    assert len(tokenizer("9 8 7 so 6", add_special_tokens=False).input_ids) == 6
    chain = DemoSettings(tasks="compare,sequence", styles="chain", teacher="chain").check()
    tokenizer = load_processor(str(chain.models.teacher)).tokenizer  # the chain set's: "so" is one token
    assert len(tokenizer("9 8 7 so 6", add_special_tokens=False).input_ids) == 5
    assert answer_length(chain) == 6 and "data.answer_max_tokens=6" in answer_settings(chain)
    longest = max(len(tokenizer(a, add_special_tokens=False).input_ids) for a in possible_answers(TASKS, ("chain",)))
    assert answer_tokens(tokenizer, TASKS, ("chain",)) == longest + 1 > 5
    items = make_split("train", 400, TASKS, ("chain",))
    assert {item.answer for item in items} <= set(possible_answers(TASKS, ("chain",))), "every drawn answer foreseen"


@pytest.mark.parametrize(
    "reply, right, whole",
    [("3 5 7 so 9", True, True), ("3 5 8 so 9", True, False), ("3 5 7 so", False, False), ("9", False, False)],
)
def test_chain_answers_are_scored_on_the_answer_after_so_and_whole(reply, right, whole):
    item = Item("x", "sequence", "chain", "...", "3 5 7 so 9")
    assert is_correct(reply, item) == right
    assert score([item], [reply])["chain_exact"] == float(whole)
    assert "chain_exact" not in score([Item("y", "sequence", "number", "...", "9")], ["9"])


def test_an_answer_longer_than_four_tokens_is_generated_and_scored_whole():
    """The shipped student, taught one chain answer ("8 6 4 so 2": 6 tokens + end-of-turn), answers it whole at the
    task's decoding length; cut at the old fixed 4 tokens it would be "8 6 4 s" and scored wrong."""
    from vlsi.demo.evaluate import answer_tokens
    from vlsi.models.loading import load_model, load_processor

    torch.manual_seed(0)
    (item,) = make_split("test", 1, ("sequence",), ("chain",))
    processor = load_processor(str(SHIPPED.teacher))
    model = load_model(str(SHIPPED.student), torch.float32)
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]},
        {"role": "assistant", "content": [{"type": "text", "text": item.answer}]},
    ]
    text = processor.apply_chat_template(turns, tokenize=False)  # ends "<|im_end|>\n"
    inputs = processor(text=[text], images=[[item.render()]], return_tensors="pt", add_special_tokens=False)
    n = len(processor.tokenizer(item.answer, add_special_tokens=False).input_ids)
    assert n == 6
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -(n + 2) : -1] = inputs["input_ids"][:, -(n + 2) : -1]  # the answer and its end-of-turn token
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(100):
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert answer_tokens(processor.tokenizer, ("sequence",), ("chain",)) == 7
    whole = evaluate(model, processor, [item])
    assert whole["replies"] == [item.answer] and whole["accuracy"] == 1.0 and whole["chain_exact"] == 1.0
    cut = evaluate(model, processor, [item], max_new_tokens=4)
    assert cut["replies"] == ["8 6 4 s"] and cut["accuracy"] == 0.0


def test_fast_chain_demo_answers_and_decodes_to_the_chain_length_and_adds_the_on_policy_arms(tmp_path):
    """`teacher=chain styles=chain` reaches every run: the chain set's teacher answers to 6 new tokens, the report
    gives whole-chain accuracy. `on_policy=0.5` adds on-policy KD and VLsI (their own samples to the same 6 tokens,
    the live teacher, no cache), paired against their off-policy recipes and (b), and leaves the four students and
    their numbers as they were."""
    out = tmp_path / "demo"
    chain = ["tasks=sequence", "styles=chain", "teacher=chain"]
    assert main(["demo", "--fast", "--output", str(out), *chain]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["answer_tokens"] == 6 and set(results["chain_exact"]) == {
        "teacher",
        "init",
        *PAIRS[0],
        "kd",
        "sft_teacher",
    }
    assert "student_kd_on_policy" not in results and not (out / "runs" / "vlsi_on_policy").exists()
    for run in ("kd", "vlsi"):
        assert "answer_max_tokens: 6" in (out / "runs" / run / "config.yaml").read_text()
    assert all(item.style == "chain" for item in read_split(out / "data" / "test.json"))
    text = (out / "report.md").read_text()
    assert "Chain answers (6 new tokens decoded at most)" in text and "whole chains right" in text
    assert "on-policy" not in text

    mixed = tmp_path / "on-policy"
    assert main(["demo", "--fast", "--output", str(mixed), *chain, "on_policy=0.5"]) == 0
    both = json.loads((mixed / "results.json").read_text())
    for key in ("student_sft", "student_sft_teacher", "student_kd", "student_vlsi", "layer_accuracy"):
        assert both[key] == results[key], f"{key}: the off-policy students are untouched by the on-policy arms"
    assert {k: both["before_sft"][k] for k in results["before_sft"]} == results["before_sft"]
    assert {k: both["paired"][k] for k in results["paired"]} == results["paired"]
    assert set(both["paired"]) == {f"{a}_vs_{b}" for a, b in (*PAIRS, *ON_POLICY_PAIRS)}
    for method in ON_POLICY:
        assert (
            0.0 <= both[f"student_{method}"] <= 1.0 and method in both["before_sft"] and method in both["chain_exact"]
        )
        config = (mixed / "runs" / method / "config.yaml").read_text()
        assert "on_policy: 0.5" in config and "max_new_tokens: 6" in config and "teacher_cache: ''" in config
        rows = [json.loads(line) for line in (mixed / "runs" / method / "metrics.jsonl").read_text().splitlines()]
        interact = [r for r in rows if r["stage"] == "interact"]
        assert len(interact) == 4 and any("sample/length" in r for r in interact), "it sampled on some batches"
    assert (
        "teacher_cache: " + str(mixed / "runs" / ".teacher-cache")
        in (mixed / "runs" / "vlsi" / "config.yaml").read_text()
    )
    stage1 = mixed / "runs" / "vlsi" / "verbalizers" / "student" / "verbalizers.safetensors"
    copied = mixed / "runs" / "vlsi_on_policy" / "verbalizers" / "student" / "verbalizers.safetensors"
    assert copied.read_bytes() == stage1.read_bytes(), "the two VLsI students share stage 1"
    assert "intermediate_loss: none" in (mixed / "runs" / "kd_on_policy" / "config.yaml").read_text()
    text = (mixed / "report.md").read_text()
    for key, label in ROWS:
        assert f"| {label} | **{100 * both[key]:.1f}** |" in text
    assert "On the student's own samples (λ = 0.5 of the interaction batches): on-policy KD is " in text
    versus = both["paired"]["vlsi_on_policy_vs_vlsi"]
    assert f"(95 % CI {100 * versus['low']:+.1f} to {100 * versus['high']:+.1f}" in text


def test_the_shipped_deep_thin_student_reads_digits_and_has_sparse_target_layers():
    from vlsi.demo.models import STUDENTS, model_size

    folder, layers = STUDENTS["deep-thin"]
    assert model_size(folder) == dict(hidden=32, layers=8, heads=2, vision_depth=1) and layers == [1, 3, 5]
    s = DemoSettings(student="deep-thin").check()
    assert s.student_dir == folder and s.student_target_layers == [1, 3, 5]
    assert DemoSettings(student="deep-thin", student_layers="0,7").student_target_layers == [0, 7]
    card = json.loads((folder / "student.json").read_text())
    assert card["architecture"] == model_size(folder) and card["training"]["tasks"] == ["digit", "count"]
    assert "--layers 8 --hidden 32 --heads 2 --steps 2500" in card["command"] and card["training"]["steps"] == 2500


def test_fast_demo_with_the_deep_thin_student_frozen_verbalizers_and_stage_3_with_lora(tmp_path):
    """`student=deep-thin` (8 x 32, target blocks 1, 3, 5) with `freeze_student_verbalizers=1`, and stage 3 as the paper
    runs it (`stage3_lora=4 stage3_lr=1e-4`): LoRA of rank 4 at the lower lr in every student's last SFT stage alone,
    merged into a plain checkpoint; stage 2 keeps full fine-tuning at lr."""
    from safetensors.torch import load_file

    out = tmp_path / "demo"
    settings = ["student=deep-thin", "freeze_student_verbalizers=1", "stage3_lora=4", "stage3_lr=1e-4"]
    assert main(["demo", "--fast", "--output", str(out), *settings]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["match_entropy"]) == {f"match_entropy/layer{i}" for i in (1, 3, 5)}
    assert list(results["layer_accuracy"]["init"]["compare"]) == ["block 1", "block 3", "block 5", "output"]
    runs = out / "runs"
    stage1 = load_file(runs / "vlsi" / "verbalizers" / "student" / "verbalizers.safetensors")
    after = load_file(runs / "vlsi" / "stages" / "interact" / "verbalizers" / "verbalizers.safetensors")
    assert stage1.keys() == after.keys() and all(torch.equal(stage1[k], after[k]) for k in stage1)
    for run in ("kd", "vlsi"):
        config = yaml.safe_load((runs / run / "config.yaml").read_text())
        assert config["verbalizer"]["student_layers"] == [1, 3, 5] and "student_deep_thin" in config["student"]
        lora = config["sft"]["lora"]
        assert (lora["enabled"], lora["r"], lora["alpha"]) == (True, 4, 4)
        assert (config["sft"]["lr"], config["interact"]["lr"]) == (1e-4, 1e-3)
        assert not config["interact"]["lora"]["enabled"]
    first = yaml.safe_load((runs / "sft" / "config.yaml").read_text())["sft"]
    last = yaml.safe_load((runs / "sft" / "config-stage3.yaml").read_text())["sft"]
    assert (first["lora"]["enabled"], first["lr"]) == (False, 1e-3), "SFT standing in for stage 2 is not stage 3"
    assert (last["lora"]["enabled"], last["lora"]["r"], last["lr"]) == (True, 4, 1e-4)
    for method in ("sft", "sft_teacher", "kd", "vlsi"):
        rows = [json.loads(line) for line in (runs / method / "metrics.jsonl").read_text().splitlines()]
        stage3 = [r for r in rows if r["stage"] == "sft"][-2:]  # the last sft_steps=2 rows: stage 3
        assert all(0 < r["lr"] <= 1e-4 for r in stage3), method
        final = load_file(runs / method / "student" / "model.safetensors")
        assert not any("lora" in k for k in final), f"{method}: LoRA merged into a plain checkpoint"
    text = (out / "report.md").read_text()
    assert "8 layers x 32" in text and "LoRA of rank 4 (alpha 4, merged at its end)" in text
    assert "cosine from lr 0.0001 to 1e-06" in text


def test_report_of_the_on_policy_students(tmp_path):
    """With `on_policy` the report adds their rows, their budget rows, the live-teacher note and their verdict."""
    hits = {
        "sft": [1] * 500 + [0] * 500,
        "sft_teacher": [1] * 540 + [0] * 460,
        "kd": [1] * 550 + [0] * 450,
        "vlsi": [1] * 612 + [0] * 388,
        "kd_on_policy": [1] * 560 + [0] * 440,
        "vlsi_on_policy": [1] * 650 + [0] * 350,
    }
    r = _results(
        student_kd_on_policy=0.56,
        student_vlsi_on_policy=0.65,
        paired=comparisons({m: {"hits": h} for m, h in hits.items()}, CLUSTERS, (*PAIRS, *ON_POLICY_PAIRS)),
        before_sft={
            "sft": 0.48,
            "sft_teacher": 0.52,
            "kd": 0.53,
            "vlsi": 0.6,
            "kd_on_policy": 0.5,
            "vlsi_on_policy": 0.6,
        },
        settings={**DemoSettings(on_policy=0.5).__dict__, "fast": False},
    )
    r["by_task"] |= {m: {t: 0.5 for t in ("compare", "sequence")} for m in ON_POLICY}
    r["train_seconds"] |= {"kd_on_policy": 70.0, "vlsi_on_policy": 80.0}
    write_report(tmp_path, r, None)
    text = (tmp_path / "report.md").read_text()
    assert "| student, on-policy VLsI: (d) on its own samples too | **65.0** | 60.0 |" in text and "| 80 s |" in text
    assert (
        "| on-policy KD | the same as (b) | (c)'s 200 steps, a share 0.5 of its batches answered by the student" in text
    )
    assert "the live teacher ran at each of their interaction steps" in text
    assert "On the student's own samples (λ = 0.5 of the interaction batches): on-policy KD is 1.0 points above" in text
    assert "on-policy VLsI is 3.8 points above VLsI (95 % CI +" in text and "Best student: on-policy VLsI." in text
