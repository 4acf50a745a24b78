"""Rule-based benchmark scorers, answer extraction and the `vlsi score` file / CLI path.

Every headline number is worked out by hand in the comments next to the assertion, under VLMEvalKit's rules (the
default) and, where they differ, the lenient rules.
"""

import csv
import json

import pytest

from vlsi.cli import main
from vlsi.eval import SCORERS, ScoreError, read_predictions, resolve_benchmark, score_file
from vlsi.eval.cells import column_like_pandas, is_na, read_like_pandas
from vlsi.eval.extract import infer_option, infer_option_vlmevalkit, number_values, yes_no, yes_no_vlmevalkit
from vlsi.eval.judge import mathvista_prompt
from vlsi.eval.mcq import score_cv_bench, score_mcq, score_mmbench, score_mmmu
from vlsi.eval.numeric import relaxed_match, relaxed_match_vlmevalkit, score_chartqa, score_mathvista
from vlsi.eval.yesno import score_hallusionbench, score_mme, score_pope

OPTIONS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("The answer is (B).", "B"),
        ("B. cat", "B"),
        ("Option C is correct", "C"),  # a letter inside a sentence, near its end
        ("The answer is D because the picture shows an animal swimming in a large glass tank.", "D"),
        ("cat", "B"),  # the option text instead of the letter
        ("It is a bird.", "C"),
        ("The answer is a cat.", "B"),  # the article "a" is not option A
        ("A cat is sitting on the mat.", "B"),  # "A" far from the end is not the answer; "cat" is
        ("Cannot determine the answer", "Z"),  # refusal
        ("dog or cat, hard to say", None),  # two options' texts
        ("", None),
    ],
)
def test_infer_option(prediction, expected):
    assert infer_option(prediction, OPTIONS) == expected


@pytest.mark.parametrize("prediction, expected", [("答案是B", "B"), ("选项：(C)", "C"), ("猫", "B"), ("一只狗", "A")])
def test_infer_option_chinese(prediction, expected):
    assert infer_option(prediction, {"A": "狗", "B": "猫", "C": "鸟"}) == expected


@pytest.mark.parametrize(
    "prediction, vlmevalkit, lenient",
    [
        ("The answer is (B).", "B", "B"),  # the letter is among the last five tokens: both read it
        ("The answer is a cat.", "A", "B"),  # VLMEvalKit: "answer is a" -> A; lenient: "a" is no letter, "cat" is B
        ("The answer is clear from the fins and the scales and the water all around", "C", None),  # "answer is c"
        ("The answer is (D) because the picture shows an animal swimming in a tank.", None, "D"),  # "(" stops it
        ("The correct answer is **D**. It lives in the water, so nothing else fits at all.", "D", "D"),
        ("答案是B", None, "B"),  # Chinese is not read by VLMEvalKit's exact matching
        ("Failed to obtain answer via API", None, None),
    ],
)
def test_infer_option_vlmevalkit_and_lenient(prediction, vlmevalkit, lenient):
    assert infer_option_vlmevalkit(prediction, OPTIONS) == vlmevalkit
    assert infer_option(prediction, OPTIONS) == lenient


def test_infer_option_vlmevalkit_reads_option_text_after_an_api_failure():
    # can_infer_option gives up on the API-failure message, but can_infer then matches option texts in it
    assert infer_option_vlmevalkit("Failed to obtain answer via API", {"A": "via API", "B": "x" * 20}) == "A"
    assert infer_option("Failed to obtain answer via API", {"A": "via API", "B": "x" * 20}) is None


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("Yes.", "Yes"),
        ("no", "No"),
        ("Yes, there is a dog in the image.", "Yes"),
        ("No, there isn't.", "No"),
        ("YES!", "Yes"),
        ("Yes and no.", "Unknown"),
        ("Nope", "Unknown"),
    ],
)
def test_yes_no(prediction, expected):
    assert yes_no(prediction) == expected == yes_no_vlmevalkit(prediction)


def test_yes_no_vlmevalkit_drops_only_32_stray_periods():
    # VLMEvalKit passes re.UNICODE (32) as re.sub's count: a 33rd period stays, glued to "yes"
    assert yes_no_vlmevalkit("." * 32 + "yes.") == "Unknown"
    assert yes_no_vlmevalkit("." * 31 + "yes.") == "Yes"
    assert yes_no("." * 32 + "yes.") == "Yes"


# ---------------------------------------------------------------- cells as pandas reads them (checked with pandas 2.2)


@pytest.mark.parametrize(
    "cells, typed",
    [
        (["4", "5", "6"], [4, 5, 6]),
        (["4", "", "6"], [4.0, "NA", 6.0]),  # a blank turns whole numbers into floats: str(4.0) == "4.0"
        (["4", "NA", " 6 "], [4.0, "NA", 6.0]),
        (["4", "5.5", "1e3"], [4.0, 5.5, 1000.0]),
        (["inf", "-Infinity", "5"], [float("inf"), float("-inf"), 5.0]),
        (["True", "false", "TRUE"], [True, False, True]),
        (["True", "", "False"], [True, "NA", False]),
        (["None", "x", "null", "N/A", "nan"], ["NA", "x", "NA", "NA", "NA"]),
        ([" NA", "x"], [" NA", "x"]),  # only exact NA spellings are missing
        (["1,234", "5"], ["1,234", "5"]),  # no thousands separator: text
        (["4", "cat"], ["4", "cat"]),
        (["1_000", "5"], ["1_000", "5"]),  # Python's float() reads it, pandas does not
        (["-12345678901234567890", "1"], ["-12345678901234567890", "1"]),
        (["", ""], ["NA", "NA"]),
    ],
)
def test_column_like_pandas(cells, typed):
    got = column_like_pandas(cells)
    assert ["NA" if is_na(value) else value for value in got] == typed
    assert [type(value) for value in got] == [float if v == "NA" else type(v) for v in typed]


def test_read_like_pandas_gives_every_row_every_column():
    rows = read_like_pandas([{"A": "4", "B": "x"}, {"A": "5"}])
    assert rows[1]["A"] == 5 and is_na(rows[1]["B"]) and rows[0]["B"] == "x"


@pytest.mark.parametrize(
    "text, values",
    [
        ("1,234", [1234.0]),
        ("12%", [12.0, 0.12]),
        ("45 percent", [45.0, 0.45]),
        ("$3.5 million", [3.5]),
        ("12 kg", [12.0]),
        ("-5", [-5.0]),
        ("twelve", []),
        ("12 and 13", []),
    ],
)
def test_number_values(text, values):
    assert number_values(text) == values


# ---------------------------------------------------------------- multiple choice


def mcq_row(index, answer, prediction, **extra):
    return {"index": str(index), "answer": answer, "prediction": prediction, **OPTIONS, **extra}


def test_score_mcq_accuracy_and_categories():
    rows = [
        mcq_row(0, "B", "The answer is (B).", category="animals"),  # right
        mcq_row(1, "B", "cat", category="animals"),  # right: option text
        mcq_row(2, "D", "Option C is correct", category="scenes"),  # wrong: C
        mcq_row(3, "A", "A", category="scenes"),  # right
    ]
    result = score_mcq(rows)
    assert result["score"] == pytest.approx(75.0)  # 3 of 4
    assert result["categories"] == {"animals": 100.0, "scenes": 50.0}  # 2/2, 1/2


def test_score_mmbench_circular_group_with_one_wrong_rotation_is_wrong():
    # Question 0 and its three rotations all right; question 1 right, but its rotation 1000001 wrong.
    rows = [
        mcq_row(0, "B", "B", category="ocr"),
        mcq_row(1_000_000, "A", "(A)"),
        mcq_row(2_000_000, "D", "The answer is D."),
        mcq_row(3_000_000, "C", "bird"),
        mcq_row(1, "C", "C", category="count"),
        mcq_row(1_000_001, "B", "A"),
    ]
    result = score_mmbench(rows)
    assert result["score"] == pytest.approx(50.0)  # 1 of 2 questions survive CircularEval
    assert result["num_questions"] == 2 and result["num_rows"] == 6
    assert result["vanilla_accuracy"] == pytest.approx(100 * 5 / 6)  # 5 of 6 rows right on their own
    assert result["categories"] == {"count": 0.0, "ocr": 100.0}


def test_score_mmbench_cn():
    options = {"A": "狗", "B": "猫", "C": "鸟", "D": "鱼"}
    rows = [
        {"index": "5", "answer": "B", "prediction": "答案是B", **options},
        {"index": "1000005", "answer": "C", "prediction": "猫", **{"A": "鱼", "B": "狗", "C": "猫", "D": "鸟"}},
        {"index": "6", "answer": "A", "prediction": "鸟", **options},
    ]
    assert score_mmbench(rows, rules="lenient")["score"] == pytest.approx(50.0)  # question 5 (both rotations) right
    assert score_mmbench(rows)["score"] == 0.0  # VLMEvalKit cannot read 答案是B, so question 5 fails too


def test_score_mcq_vlmevalkit_reads_cells_as_pandas_and_the_answer_as_written():
    rows = [
        mcq_row(0, "C", "4", C="4"),  # column C holds 4, 5, a blank, 6: pandas reads 4.0, which "4" does not contain
        mcq_row(1, "B", "B", C="5"),  # right under both rules
        mcq_row(2, "(B)", "B", C=""),  # VLMEvalKit compares "B" with "(B)"
        mcq_row(3, "A", "None", A="None", C="6"),  # "None" is missing there: no option A, and the prediction is "nan"
    ]
    assert score_mcq(rows)["score"] == pytest.approx(25.0)  # row 1
    assert score_mcq(rows, rules="lenient")["score"] == pytest.approx(100.0)


def test_score_mmmu_vlmevalkit_truth_is_a_for_any_answer_but_one_capital_letter():
    rows = [
        mcq_row(1, "(C)", "C", split="validation"),  # VLMEvalKit's truth is A: wrong there, right when lenient
        {"index": "2", "answer": "6.5", "prediction": "6.5", "split": "validation", "A": ""},  # open: A. 6.5
    ]
    assert score_mmmu(rows)["score"] == pytest.approx(50.0)
    assert score_mmmu(rows, rules="lenient")["score"] == pytest.approx(100.0)


def test_score_mmbench_rejects_rotation_without_main_row_and_bad_index():
    with pytest.raises(ScoreError, match="main row .index 7. is missing"):
        score_mmbench([mcq_row(1_000_007, "A", "A")])
    with pytest.raises(ScoreError, match="integer indices"):
        score_mmbench([mcq_row("q7", "A", "A")])


def test_score_mmmu_open_and_multiple_choice_on_validation():
    open_row = {"index": "3", "answer": "6.5", "prediction": "6.5", "split": "validation", "category": "Physics"}
    rows = [
        mcq_row(1, "B", "The answer is (B).", split="validation", category="Art"),  # right
        mcq_row(2, "C", "B", split="validation", category="Art"),  # wrong
        open_row,  # right: VLMEvalKit re-poses it as "A. 6.5  B. Other Answers"; the text "6.5" picks A
        {**open_row, "index": "4", "answer": "42", "prediction": "about 41"},  # wrong: no option readable
        mcq_row(5, "A", "A", split="dev", category="Art"),  # right, but not in the validation split
    ]
    result = score_mmmu(rows)
    assert result["score"] == pytest.approx(50.0)  # validation: 2 of 4
    assert result["split"] == "validation" and result["num_questions"] == 4
    assert result["multiple_choice"] == pytest.approx(50.0)  # rows 1, 2
    assert result["open"] == pytest.approx(50.0)  # rows 3, 4
    assert result["splits"] == {"dev": 100.0, "validation": 50.0}
    assert result["categories"] == {"Art": 50.0, "Physics": 50.0}


def test_score_cv_bench_averages_2d_sources_then_2d_and_3d(tmp_path):
    rows = [
        mcq_row(0, "A", "A", split="2D", source="ADE20K"),
        mcq_row(1, "A", "B", split="2D", source="ADE20K"),  # ADE20K 1/2 = 50
        mcq_row(2, "C", "(C)", split="2D", source="COCO"),  # COCO 1/1 = 100 -> 2D = (50 + 100) / 2 = 75
        mcq_row(3, "B", "cat", split="3D", source="Omni3D"),
        mcq_row(4, "D", "A", split="3D", source="Omni3D"),  # 3D = 1/2 = 50
    ]
    result = score_cv_bench(rows)
    assert result["2d"] == pytest.approx(75.0)
    assert result["3d"] == pytest.approx(50.0)
    assert result["score"] == pytest.approx(62.5)  # (75 + 50) / 2
    assert score_cv_bench(rows[:3])["score"] == pytest.approx(75.0)  # a 2D-only file scores 2D alone
    # VLMEvalKit's two datasets, each on its own rows
    assert score_file("CV-Bench-2D", write_jsonl(tmp_path / "2d.jsonl", rows[:3]))["score"] == pytest.approx(75.0)
    assert score_file("CV-Bench-3D", write_jsonl(tmp_path / "3d.jsonl", rows[3:]))["score"] == pytest.approx(50.0)
    with pytest.raises(ScoreError, match=r"split must be 3D, got '2D'; this benchmark is CV-Bench-3D, use cv_bench"):
        score_file("CV-Bench-3D", write_jsonl(tmp_path / "both.jsonl", rows))


# ---------------------------------------------------------------- yes / no


def mme_row(category, image, answer, prediction):
    return {"category": category, "image_path": image, "answer": answer, "prediction": prediction}


def test_score_mme_acc_plus_over_image_pairs():
    rows = [
        mme_row("existence", "e1.jpg", "Yes", "Yes."),
        mme_row("existence", "e1.jpg", "No", "no"),  # e1: both right
        mme_row("existence", "e2.jpg", "Yes", "Yes, there is a dog."),
        mme_row("existence", "e2.jpg", "No", "Yes"),  # e2: one wrong
        mme_row("code_reasoning", "c1.png", "Yes", "yes"),
        mme_row("code_reasoning", "c1.png", "No", "No, it prints 3."),
    ]
    result = score_mme(rows)
    # existence: acc = 3/4 = 75, acc+ = 1/2 images = 50 -> 125 points; code_reasoning: 100 + 100 = 200 points.
    assert result["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert result["perception"] == pytest.approx(125.0)
    assert result["cognition"] == pytest.approx(200.0)
    assert result["score"] == pytest.approx(325.0)
    assert "count" in result["missing_subtasks"] and len(result["missing_subtasks"]) == 12


def test_score_mme_needs_both_questions_of_an_image():
    with pytest.raises(ScoreError, match="e1.jpg .existence. has 1 question"):
        score_mme([mme_row("existence", "e1.jpg", "Yes", "Yes")])
    with pytest.raises(ScoreError, match="unknown MME category 'colour'"):
        score_mme([mme_row("colour", "e1.jpg", "Yes", "Yes")])


def test_score_pope_precision_recall_f1_with_yes_positive():
    adv = "adversarial"
    rows = [
        {"answer": "Yes", "prediction": "Yes.", "category": adv},  # TP
        {"answer": "Yes", "prediction": "no", "category": adv},  # FN
        {"answer": "No", "prediction": "Yes, there is a dog.", "category": adv},  # FP
        {"answer": "No", "prediction": "No.", "category": adv},  # TN
        {"answer": "No", "prediction": "I am not sure.", "category": adv},  # Unknown: a negative, but wrong
        {"answer": "Yes", "prediction": "No", "category": adv},  # FN
        {"answer": "Yes", "prediction": "yes", "category": "adversarial,popular"},  # TP in both splits
    ]
    result = score_pope(rows)
    # Pooled over 8 (row, split) pairs: TP = 3, FP = 1, FN = 2.
    assert result["precision"] == pytest.approx(75.0)  # 3 / (3 + 1)
    assert result["recall"] == pytest.approx(60.0)  # 3 / (3 + 2)
    assert result["f1"] == pytest.approx(100 * 2 * 0.75 * 0.6 / 1.35)  # 66.67
    assert result["score"] == result["f1"]
    assert result["accuracy"] == pytest.approx(50.0)  # 4 of 8 pairs right (TP x3, TN x1)
    # adversarial alone: TP = 2, FP = 1, FN = 2 -> P = 2/3, R = 1/2, F1 = 4/7.
    assert result["categories"]["adversarial"]["f1"] == pytest.approx(100 * 4 / 7)
    assert result["categories"]["popular"] == {"f1": 100.0, "accuracy": 100.0, "precision": 100.0, "recall": 100.0}


def test_score_pope_vlmevalkit_compares_the_answer_as_written_and_keeps_category_spaces():
    rows = [
        {"answer": "yes", "prediction": "Yes", "category": "adversarial, popular"},  # a negative there: FP twice
        {"answer": "Yes", "prediction": "Yes", "category": "random"},  # TP
    ]
    result = score_pope(rows)
    assert result["precision"] == pytest.approx(100 / 3) and result["recall"] == 100.0  # TP 1, FP 2
    assert set(result["categories"]) == {"adversarial", " popular", "random"}
    with pytest.raises(ScoreError, match="answer must be Yes or No"):
        score_pope([{"answer": "maybe", "prediction": "Yes"}], rules="lenient")
    lenient = score_pope(rows[:1], rules="lenient")
    assert lenient["score"] == 100.0 and set(lenient["categories"]) == {"adversarial", "popular"}


def test_score_hallusionbench_figure_and_question_groups():
    def row(index, answer, prediction):
        l2 = index.split("_")[1]
        return {"index": index, "answer": answer, "prediction": prediction, "category": index[:2], "l2-category": l2}

    rows = [
        row("VD_chart_0_0_0_0", "Yes", "Yes."),  # right
        row("VD_chart_0_0_0_1", "No", "no"),  # right
        row("VD_chart_0_0_1_0", "No", "Yes, it is."),  # wrong
        row("VD_chart_0_0_1_1", "Yes", "yes"),  # right
        row("VS_map_1_1_0_0", "Yes", "Yes"),  # right
    ]
    result = score_hallusionbench(rows)
    assert result["aAcc"] == pytest.approx(80.0)  # 4 of 5
    # figures: chart/0/fig0 all right, chart/0/fig1 not, map/1/fig0 right -> 2/3
    assert result["fAcc"] == pytest.approx(100 * 2 / 3)
    # questions: chart/0/q0 (rows 1, 3) not all right, chart/0/q1 (rows 2, 4) right, map/1/q0 right -> 2/3
    assert result["qAcc"] == pytest.approx(100 * 2 / 3)
    assert result["score"] == pytest.approx((80 + 200 / 3 + 200 / 3) / 3)  # 71.11
    assert result["l2_categories"]["chart"]["fAcc"] == pytest.approx(50.0)
    with pytest.raises(ScoreError, match="HallusionBench index must read"):
        score_hallusionbench([row("VD_chart_0", "Yes", "Yes")])


# ---------------------------------------------------------------- free-form answers


@pytest.mark.parametrize(
    "target, prediction, relaxed, vlmevalkit",
    [
        ("12", "12%", True, False),  # a percentage for a share written as 12
        ("0.35", "35%", True, True),  # VLMEvalKit already reads 35% as 0.35
        ("1234", "1,250", True, False),  # thousands separator; 1.3% off
        ("100", "$104 million", True, False),  # currency and unit; 4% off
        ("100", "106", False, False),  # 6% off
        ("Yes", "yes", True, True),  # text: case-insensitive exact match
        ("Red", "Red.", False, False),  # text must match exactly
    ],
)
def test_chartqa_relaxed_match(target, prediction, relaxed, vlmevalkit):
    assert relaxed_match(target, prediction) is relaxed
    assert relaxed_match_vlmevalkit(target, prediction) is vlmevalkit


def test_score_chartqa_relaxed_accuracy_per_split():
    rows = [
        {"answer": "12", "prediction": "12%", "split": "human"},  # right (VLMEvalKit: wrong)
        {"answer": "0.35", "prediction": "35%", "split": "human"},  # right
        {"answer": "1234", "prediction": "1,250", "split": "human"},  # right (VLMEvalKit: wrong)
        {"answer": "100", "prediction": " 106 ", "split": "human"},  # wrong
        {"answer": "Yes", "prediction": "yes", "split": "augmented"},  # right
        {"answer": "Red", "prediction": "Red.", "split": "augmented"},  # wrong
        {"answer": "['2019', '2020']", "prediction": "2020", "split": "augmented"},  # right: any answer
        {"answer": "25", "prediction": "24.2", "split": "augmented"},  # right: 3.2% off
    ]
    result = score_chartqa(rows, rules="lenient")
    assert result["score"] == pytest.approx(75.0)  # 6 of 8
    assert result["splits"] == {"augmented": 75.0, "human": 75.0}
    result = score_chartqa(rows)
    assert result["score"] == pytest.approx(50.0)  # VLMEvalKit: 4 of 8
    assert result["splits"] == {"augmented": 75.0, "human": 25.0}


def test_score_chartqa_vlmevalkit_reads_cells_as_pandas_does():
    # "None" is a missing cell there, printed "nan", and float("nan") equals nothing, not even itself
    rows = [{"answer": "None", "prediction": "None"}, {"answer": "Yes", "prediction": "yes"}]
    assert score_chartqa(rows)["score"] == pytest.approx(50.0)
    assert score_chartqa(rows, rules="lenient")["score"] == pytest.approx(100.0)


def mathvista_row(answer, prediction, question_type="free_form", answer_type="integer", **extra):
    return {
        "answer": answer,
        "prediction": prediction,
        "question_type": question_type,
        "answer_type": answer_type,
        "task": "math word problem",
        "skills": "['arithmetic reasoning']",
        **extra,
    }


def test_score_mathvista_rule_extraction():
    mc = {"question_type": "multi_choice", "answer_type": "text"}
    rows = [
        mathvista_row("8/11", "The correct answer is (B) 8/11.", choices="['3/11', '8/11', '6/11']", **mc),  # right
        mathvista_row("blue", "blue", choices=["red", "blue"], **mc),  # right: option text, letter from answer
        mathvista_row("14", "14"),  # right: a bare integer
        mathvista_row("14", "The missing number is 14."),  # right: last number
        mathvista_row("1.45", "So the answer is 1.449 dollars.", answer_type="float", precision="2"),  # right: 1.45
        mathvista_row("0.6", "0.68", answer_type="float", precision="1"),  # wrong: rounds to 0.7
        mathvista_row("3", "3.5"),  # wrong: not an integer
        mathvista_row("[2007, 2008]", "It peaks between [2007, 2008].", answer_type="list"),  # right
    ]
    result = score_mathvista(rows, rules="lenient")
    assert result["score"] == pytest.approx(75.0)  # 6 of 8
    assert result["question_types"] == {"free_form": pytest.approx(100 * 4 / 6), "multi_choice": 100.0}
    assert result["skills"] == {"arithmetic reasoning": 75.0}
    assert result["judge_calls"] == 0
    # VLMEvalKit with a judge that never answers: only what it reads as written counts, here rows 1-3
    assert score_mathvista(rows)["score"] == pytest.approx(100 * 3 / 8)


def test_score_mathvista_vlmevalkit_without_judge_and_its_quirks():
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": "['an', 'the']"}
    rows = [
        mathvista_row("14", " 14 "),  # right: int(" 14 ") == 14 (14.0 once its column is read back, still 14)
        mathvista_row("14", "14.0"),  # wrong: int("14.0") fails
        mathvista_row("1.45", "1.449", answer_type="float", precision="2"),  # wrong: floats compared exactly
        mathvista_row("0", "0"),  # wrong: right as written, but post_check returns 0, which reads as "not read"
        mathvista_row("[1, 2]", "[1, 2]", answer_type="list"),  # wrong: lists are never credited
        # right: the judge's empty extraction is read back as "nan", which contains the text of option A
        mathvista_row("an", "I cannot tell.", answer_option="A", **mc),
    ]
    assert score_mathvista(rows)["score"] == pytest.approx(100 * 2 / 6)


def test_score_mathvista_judge_extracts_only_what_the_rules_cannot_settle():
    rows = [mathvista_row("14", "14"), mathvista_row("14", "After counting I get fourteen.")]
    prompts = []

    def judge(prompt, temperature=0.0, system=None):
        prompts.append(prompt)
        return "14"

    assert score_mathvista(rows, rules="lenient")["score"] == pytest.approx(50.0)  # no number in the second answer
    result = score_mathvista(rows, judge, rules="lenient")
    assert result["score"] == pytest.approx(100.0)  # the judge extracted 14
    assert result["judge_calls"] == 1 and len(prompts) == 1
    assert prompts[0] == mathvista_prompt("", "After counting I get fourteen.")
    assert prompts[0].endswith("\nModel respone: After counting I get fourteen.Extracted answer:")  # as VLMEvalKit
    assert score_mathvista(rows, judge)["score"] == pytest.approx(100.0)  # VLMEvalKit asks the same row


# ---------------------------------------------------------------- files and CLI


def write_tsv(path, rows):
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(column, "") for column in columns])
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


MMBENCH_ROWS = [
    {**mcq_row(0, "B", "The answer is (B).", category="ocr"), "image": "iVBOR" + "A" * 300_000},
    {**mcq_row(1_000_000, "A", "A"), "image": "0"},
    {**mcq_row(1, "C", "dog", category="count"), "image": "1"},
]


def test_score_file_tsv_and_jsonl_agree(tmp_path):
    # A 300 kB base64 image cell exceeds csv's default field limit; it must be read and then ignored.
    tsv = score_file("MMBench", write_tsv(tmp_path / "preds.tsv", MMBENCH_ROWS))
    jsonl = score_file("mmbench_en", write_jsonl(tmp_path / "preds.jsonl", MMBENCH_ROWS))
    assert tsv["benchmark"] == jsonl["benchmark"] == "mmbench_en"
    assert tsv["score"] == jsonl["score"] == pytest.approx(50.0)  # question 0 right on both rotations, 1 wrong
    assert "image" not in read_predictions(tmp_path / "preds.tsv")[0]


def test_a_quoted_cell_never_closed_is_refused_naming_its_line(tmp_path):
    # csv alone reads every later row into the open cell (1 question, score 0); pandas refuses the file.
    path = tmp_path / "pope.tsv"
    path.write_text('answer\tprediction\nYes\tYes\nNo\t"No\nYes\tYes\nNo\tNo\n')
    with pytest.raises(ScoreError, match=r"pope.tsv line 3: a quoted cell opens here and is never closed"):
        score_file("pope", path)
    path.write_text('answer\tprediction\nYes\t"Yes, a ""dog"""\nNo\tno "quotes" here\n')  # pandas reads these
    assert [row["prediction"] for row in read_predictions(path)] == ['Yes, a "dog"', 'no "quotes" here']


def test_jsonl_list_columns(tmp_path):
    rows = [
        {"answer": "Yes", "prediction": "Yes", "category": ["adversarial", "popular"]},
        {"answer": "No", "prediction": "No", "category": "popular"},
    ]
    # A category list is the TSV's "adversarial,popular": a row counted in both splits, not in bogus ones.
    tsv = [{**rows[0], "category": "adversarial,popular"}, rows[1]]
    jsonl_scores = score_file("pope", write_jsonl(tmp_path / "pope.jsonl", rows))
    assert jsonl_scores == score_file("pope", write_tsv(tmp_path / "pope.tsv", tsv))
    assert set(jsonl_scores["categories"]) == {"adversarial", "popular"}
    hallusion = [{"index": "VD_chart_1_0_2_1", "answer": "Yes", "prediction": "Yes", "l2-category": ["VD", "VS"]}]
    with pytest.raises(ScoreError, match=r"line 1: column 'l2-category' holds a list; .* write it as text"):
        score_file("hallusionbench", write_jsonl(tmp_path / "h.jsonl", hallusion))


def test_a_unicode_line_separator_stays_inside_its_jsonl_line(tmp_path):
    rows = [
        {"answer": "Yes", "prediction": "Yes\u2028indeed", "question": "Is it\u2029red?"},
        {"answer": "No", "prediction": "No"},
    ]
    read = read_predictions(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [row["prediction"] for row in read] == ["Yes\u2028indeed", "No"] and read[0]["question"] == "Is it\u2029red?"


def test_a_key_passed_as_the_key_variable_is_refused_unprinted():
    from vlsi.eval.score import judge_from_options

    for key in ["sk-proj-abc123DEF456ghi789", "AIzaSyD4f8kE2Lq9Xw7Pz3Nm5Rt1Vb6Hc0Jk"]:
        with pytest.raises(ScoreError, match="looks like a key itself") as error:
            judge_from_options("http://127.0.0.1:9/v1", "judge", key)
        assert key not in str(error.value) and key[:6] not in str(error.value)
    with pytest.raises(ScoreError, match=r"names \$MY_JUDGE_KEY, which is not set"):
        judge_from_options("http://127.0.0.1:9/v1", "judge", "MY_JUDGE_KEY")  # a variable's name is named


def test_read_predictions_normalizes_column_names(tmp_path):
    rows = read_predictions(write_jsonl(tmp_path / "p.jsonl", [{"Question": "q", "A": 1, "Prediction": None}]))
    assert rows == [{"question": "q", "A": "1", "prediction": ""}]


@pytest.mark.parametrize("name, key", [("MMBench", "mmbench_en"), ("SEED-2-Plus", "seed_2_plus"), ("mm-vet", "mm_vet")])
def test_resolve_benchmark_aliases(name, key):
    assert resolve_benchmark(name) == key


@pytest.mark.parametrize(
    "name, key",
    [
        ("MMBench_DEV_EN", "mmbench_en"), ("MMBench_DEV_CN", "mmbench_cn"), ("MMBench_DEV_EN_V11", "mmbench_en"),
        ("MMBench_TEST_CN_V11", "mmbench_cn"), ("MathVista_MINI", "mathvista"), ("AI2D_TEST", "ai2d"),
        ("AI2D_TEST_NO_MASK", "ai2d"), ("ChartQA_TEST", "chartqa"), ("MME", "mme"), ("POPE", "pope"),
        ("HallusionBench", "hallusionbench"), ("MMStar", "mmstar"), ("MMMU_DEV_VAL", "mmmu"), ("MMMU_TEST", "mmmu"),
        ("BLINK", "blink"), ("SEEDBench2_Plus", "seed_2_plus"), ("Q-Bench1_VAL", "q_bench"),
        ("Q-Bench1_TEST", "q_bench"), ("MMVet", "mm_vet"), ("MMVet_Hard", "mm_vet"), ("CV-Bench-2D", "cv_bench_2d"),
        ("CV-Bench-3D", "cv_bench_3d"),
    ],
)  # fmt: skip
def test_vlmevalkit_dataset_names_are_accepted(name, key):
    assert resolve_benchmark(name) == key


def test_every_benchmark_is_registered():
    assert set(SCORERS) == {
        "mme", "mmbench_en", "mmbench_cn", "pope", "hallusionbench", "chartqa", "ai2d", "mmstar", "mmmu",
        "mathvista", "blink", "seed_2_plus", "cv_bench", "cv_bench_2d", "cv_bench_3d", "q_bench", "mm_vet",
        "mm_vet_v2", "llava_wilder",
    }  # fmt: skip


@pytest.mark.parametrize(
    "name, content, suffix, message",
    [
        ("mmbench_en", "index\tanswer\tA\tB\n0\tA\tx\ty\n", ".tsv", r"line 1: no 'prediction' field"),
        ("mme", "category\tanswer\tprediction\nOCR\tYes\tYes\n", ".tsv", r"line 1: missing image_path for mme"),
        ("ai2d", "answer\tA\tB\tprediction\nA\tx\ty\n", ".tsv", r"line 2: 3 fields but the header has 4"),
        ("ai2d", '{"answer": "A", "A": "x", "B": "y", "prediction": "A"}\n{oops\n', ".jsonl", "line 2: not valid JSON"),
        ("pope", '{"answer": "Yes", "prediction": "Yes"}\n{"prediction": "No"}\n', ".jsonl", "line 2: missing answer"),
        ("pope", "answer,prediction\n", ".csv", "unsupported file type '.csv'"),
        ("pope", "answer\tprediction\n", ".tsv", "no prediction rows"),
    ],
)
def test_score_file_errors_name_file_line_and_fix(tmp_path, name, content, suffix, message):
    path = tmp_path / f"preds{suffix}"
    path.write_text(content)
    with pytest.raises(ScoreError, match=message) as error:
        score_file(name, path)
    assert str(path) in str(error.value)


def test_unknown_benchmark_lists_known_ones(tmp_path):
    with pytest.raises(ScoreError, match=r"unknown benchmark 'mmbench-xx'; known: ai2d, blink, chartqa"):
        score_file("mmbench-xx", tmp_path / "missing.tsv")


def run_cli(*argv):
    return main(["score", *argv])


def test_cli_prints_json(tmp_path, capsys):
    rows = [{"answer": "Yes", "prediction": "Yes."}, {"answer": "No", "prediction": "Yes"}]
    path = write_tsv(tmp_path / "pope.tsv", rows)
    assert run_cli("--benchmark", "POPE", "--predictions", str(path)) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out)[:5] == ["benchmark", "rules", "score", "score_vlmevalkit", "score_lenient"]
    assert out["benchmark"] == "pope" and out["rules"] == "vlmevalkit"
    assert out["accuracy"] == pytest.approx(50.0)  # 1 of 2
    assert out["score"] == out["score_vlmevalkit"] == out["score_lenient"] == pytest.approx(100 * 2 * 0.5 / 1.5)


def test_cli_rules_choose_the_headline_and_both_numbers_are_always_there(tmp_path, capsys):
    rows = [{"answer": "1234", "prediction": "1,234"}, {"answer": "12", "prediction": "12"}]
    path = write_tsv(tmp_path / "chartqa.tsv", rows)
    assert run_cli("--benchmark", "ChartQA_TEST", "--predictions", str(path)) == 0
    default = json.loads(capsys.readouterr().out)
    assert run_cli("--benchmark", "chartqa", "--predictions", str(path), "--rules", "lenient") == 0
    lenient = json.loads(capsys.readouterr().out)
    assert default["rules"] == "vlmevalkit" and default["score"] == pytest.approx(50.0)  # "1,234" is text there
    assert lenient["rules"] == "lenient" and lenient["score"] == pytest.approx(100.0)
    for out in (default, lenient):
        assert out["score_vlmevalkit"] == pytest.approx(50.0) and out["score_lenient"] == pytest.approx(100.0)
    with pytest.raises(ScoreError, match="unknown rules 'strict'; use vlmevalkit or lenient"):
        score_file("chartqa", path, rules="strict")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--benchmark", "nope", "--predictions", "x.tsv"], "unknown benchmark 'nope'"),
        (["--benchmark", "pope", "--predictions", "missing.tsv"], "missing.tsv: no such file"),
        (["--benchmark", "mm-vet", "--predictions", "x.tsv"], "mm_vet is scored by an LLM judge; pass --judge-url"),
        (["--benchmark", "pope", "--predictions", "x.tsv", "--judge-url", "http://x"], "--judge-model go together"),
    ],
)
def test_cli_errors_are_one_line_exit_2(capsys, argv, message):
    assert run_cli(*argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("vlsi score: error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
