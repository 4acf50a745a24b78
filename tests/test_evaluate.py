"""`vlsi eval` through its real argument parser on a tiny random-weight Qwen2-VL: predictions and scores written,
batched generation equal to one row at a time, resume after a kill, the custom benchmark, prompts and errors."""

import base64
import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from commands import onevision_dataset
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlsi.cli import main
from vlsi.eval.custom import custom_hit, question_type
from vlsi.eval.generate import Item, generate_answers
from vlsi.models.tiny import build_tiny_vlm
from vlsi.toy import write_digits_dataset

FAST = ["--max-new-tokens", "4", "--batch-size", "4"]


def cli(*argv: str) -> int:
    return main(["eval", *argv])


def png(color, width: int = 56) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, 56), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tsv(path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def mmbench_rows() -> list[dict]:
    """Three questions, each with one rotation (index + 1e6, options shifted) whose image cell refers to the
    question's row, as VLMEvalKit's MMBench TSV stores repeated images."""
    options = ["red", "green", "blue"]
    rows = []
    for k in range(3):
        image = base64.b64encode(png((80 * k, 120, 40), width=56 + 14 * k)).decode()
        for rotation in range(2):
            shifted = options[rotation:] + options[:rotation]
            rows.append(
                {
                    "index": k + rotation * 1_000_000,
                    "question": f"What colour is the square number {k}?",
                    "hint": "The image shows one square." if k == 1 else "",
                    "A": shifted[0],
                    "B": shifted[1],
                    "C": shifted[2],
                    "answer": "ABC"[(k - rotation) % 3],
                    "category": "colour",
                    "image": image if rotation == 0 else str(k),
                }
            )
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    build_tiny_vlm(path)
    return str(path)


@pytest.fixture(scope="module")
def mmbench_run(model_dir, tmp_path_factory):
    """One finished mmbench run: (data file, output folder)."""
    root = tmp_path_factory.mktemp("mmbench")
    data = write_tsv(root / "MMBench_DEV_EN.tsv", mmbench_rows())
    assert (
        cli("--model", model_dir, "--benchmark", "mmbench", "--data", data, "--output", str(root / "out"), *FAST) == 0
    )
    return data, root / "out"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_writes_every_prediction_and_the_score(mmbench_run):
    _, out = mmbench_run
    predictions = read_jsonl(out / "predictions.jsonl")
    assert sorted(row["index"] for row in predictions) == sorted(str(row["index"]) for row in mmbench_rows())
    assert all(isinstance(row["prediction"], str) and "image" not in row for row in predictions)
    assert predictions[0]["question"] == "What colour is the square number 0?" and predictions[0]["A"] == "red"
    scores = json.loads((out / "scores.json").read_text())
    assert scores["benchmark"] == "mmbench_en" and scores["num_questions"] == 3 and scores["num_rows"] == 6
    assert scores["rules"] == "vlmevalkit" and 0.0 <= scores["score"] == scores["score_vlmevalkit"] <= 100.0
    settings = json.loads((out / "eval.json").read_text())
    assert settings["benchmark"] == "mmbench_en" and settings["max_new_tokens"] == 4


def test_batched_generation_equals_one_row_at_a_time(model_dir):
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    questions = ["Which digit is this?", "What is shown in the image? Answer with a single word or number.", "Count"]

    def item(question: str, images: list[bytes]) -> Item:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        return Item(question, [{"role": "user", "content": content}], images, {})

    # Prompts of different lengths (text, image size, image count, no image): the batch needs real padding.
    items = [
        item(questions[0], [png((10, 20, 30))]),
        item(questions[1], [png((200, 20, 30), width=112)]),
        item(questions[2], []),
        item(questions[2], [png((0, 0, 0)), png((250, 250, 250), width=84)]),
    ]
    batched = generate_answers(model, processor, items, max_new_tokens=6)
    alone = [generate_answers(model, processor, [one], max_new_tokens=6)[0] for one in items]
    assert batched == alone
    assert len(set(alone)) > 1  # the rows really differ, so equality is not trivial


def test_resume_after_a_kill_generates_each_row_once(mmbench_run, model_dir, tmp_path, monkeypatch):
    data, full = mmbench_run
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(full / "eval.json", out / "eval.json")
    lines = (full / "predictions.jsonl").read_text().splitlines(keepends=True)
    # Killed while writing line 4: three rows saved (marked, to see they are kept), half a line after them.
    kept = [json.dumps({**json.loads(line), "prediction": "KEPT"}) + "\n" for line in lines[:3]]
    (out / "predictions.jsonl").write_text("".join(kept) + lines[3][: len(lines[3]) // 2])

    assert cli("--model", model_dir, "--benchmark", "mmbench", "--data", data, "--output", str(out), *FAST) == 0
    resumed = read_jsonl(out / "predictions.jsonl")
    assert [row["index"] for row in resumed] == [json.loads(line)["index"] for line in lines]  # each once, in order
    assert [row["prediction"] for row in resumed[:3]] == ["KEPT"] * 3
    assert resumed[3:] == read_jsonl(full / "predictions.jsonl")[3:]  # regenerated exactly as in the full run

    # A finished run is only rescored, also under other rules: the model is not even loaded.
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a finished run")

    monkeypatch.setattr("vlsi.eval.harness.load_model", no_model)
    argv = ["--model", model_dir, "--benchmark", "mmbench", "--data", data, "--output", str(out), *FAST]
    assert cli(*argv, "--rules", "lenient") == 0
    assert len(read_jsonl(out / "predictions.jsonl")) == 6
    scores = json.loads((out / "scores.json").read_text())
    assert scores["rules"] == "lenient" and scores["score"] == scores["score_lenient"]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--batch-size", "2"], "(--batch-size: 4 -> 2)"),
        (["--max-new-tokens", "5"], "(--max-new-tokens: 4 -> 5, the decoding options)"),
        (["--dtype", "fp16"], "(--dtype: 'fp32' -> 'fp16')"),
        (["--generation-config", "model"], "(--generation-config: 'vlmevalkit' -> 'model', the decoding options)"),
    ],
)
def test_resume_refuses_other_settings(mmbench_run, model_dir, tmp_path, capsys, change, message):
    data, out = mmbench_run
    argv = ["--model", model_dir, "--benchmark", "mmbench", "--data", data, "--output", str(out), *FAST, *change]
    assert cli(*argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("vlsi eval: error:") and message in error and "pass another --output" in error
    assert len(error.strip().splitlines()) == 1


def test_resume_refuses_other_data_or_another_model(mmbench_run, model_dir, tmp_path, capsys):
    data, full = mmbench_run
    out = tmp_path / "out"
    shutil.copytree(full, out)
    before = (out / "predictions.jsonl").read_text()
    argv = ["--benchmark", "mmbench", "--output", str(out), *FAST]
    # The TSV edited in place (one answer flipped): same path, other contents.
    edited = tmp_path / "MMBench_DEV_EN.tsv"
    edited.write_text(Path(data).read_text().replace("\tA\tcolour", "\tB\tcolour", 1))
    assert edited.read_text() != Path(data).read_text()
    assert cli("--model", model_dir, "--data", str(edited), *argv) == 2
    assert "predictions.jsonl made with other settings (the contents of --data" in capsys.readouterr().err
    # Another model put at the path of the one that wrote the predictions.
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    assert cli("--model", str(model), "--data", data, *argv) == 0  # the same files: resumed (nothing to answer)
    capsys.readouterr()
    build_tiny_vlm(model, seed=1)
    assert cli("--model", str(model), "--data", data, *argv) == 2
    assert "made with other settings (the model (its config or weight files))" in capsys.readouterr().err
    assert (out / "predictions.jsonl").read_text() == before


def test_a_second_run_on_the_output_folder_stops(mmbench_run, model_dir, tmp_path, capsys):
    import fcntl
    import os

    data, full = mmbench_run
    out = tmp_path / "out"
    shutil.copytree(full, out)
    held = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # another run holds the folder
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        argv = ["--model", model_dir, "--benchmark", "mmbench", "--data", data, "--output", str(out), *FAST]
        assert cli(*argv) == 2
        assert "is in use by another run" in capsys.readouterr().err
    finally:
        os.close(held)
    assert cli(*argv) == 0


def test_the_score_joins_the_model_card(mmbench_run, model_dir, tmp_path):
    from huggingface_hub import ModelCard

    data, full = mmbench_run
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "README.md").write_text("---\nlibrary_name: transformers\n---\n\nA student.\n")  # as vlsi exports one
    out = tmp_path / "out"
    shutil.copytree(full, out)  # the card is outside the model's fingerprint: the finished run is only rescored
    assert cli("--model", str(model), "--benchmark", "mmbench", "--data", data, "--output", str(out), *FAST) == 0
    score = json.loads((out / "scores.json").read_text())["score"]
    [result] = ModelCard.load(model / "README.md").data.eval_results
    assert result.dataset_name == "mmbench_en" and result.metric_value == round(score, 2)


def test_the_model_generation_config_is_ignored_unless_asked(model_dir, tmp_path):
    """A generation_config.json whose options turn answers to noise changes nothing by default; with
    --generation-config model it applies, and eval.json records the options in both cases."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(
        json.dumps({**config, "repetition_penalty": 3.0, "no_repeat_ngram_size": 1})
    )
    data = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", mmbench_rows())
    runs = {}
    for source, folder in [("vlmevalkit", "plain"), ("vlmevalkit", "noisy"), ("model", "model")]:
        path = model_dir if folder == "plain" else str(model)
        argv = ["--model", path, "--benchmark", "mmbench", "--data", data, "--output", str(tmp_path / folder)]
        assert cli(*argv, "--max-new-tokens", "8", "--generation-config", source) == 0
        runs[folder] = read_jsonl(tmp_path / folder / "predictions.jsonl")
        settings = json.loads((tmp_path / folder / "eval.json").read_text())
        assert settings["generation_config"] == source and settings["generation"]["do_sample"] is False
        assert settings["generation"]["max_new_tokens"] == 8 and settings["vlmevalkit_wrapper"].startswith(
            "Qwen2VLChat"
        )
        if source == "vlmevalkit":  # Qwen2VLChat passes repetition_penalty=1.0
            assert settings["generation"]["repetition_penalty"] == 1.0
            assert "no_repeat_ngram_size" not in settings["generation"]
        else:
            assert settings["generation"]["repetition_penalty"] == 3.0
            assert settings["generation"]["no_repeat_ngram_size"] == 1
    answers = {folder: [row["prediction"] for row in rows] for folder, rows in runs.items()}
    assert answers["noisy"] == answers["plain"] != answers["model"]


def test_answers_cut_at_the_limit_are_flagged_and_counted(mmbench_run):
    _, out = mmbench_run
    predictions = read_jsonl(out / "predictions.jsonl")
    scores = json.loads((out / "scores.json").read_text())
    # A random-weight model rarely ends within 4 tokens: most answers are cut, each flagged.
    assert all(isinstance(row["cut"], bool) for row in predictions)
    assert scores["cut"] == sum(row["cut"] for row in predictions) > 0


def test_generate_answers_says_which_answer_was_cut(model_dir):
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    items = [Item(str(k), [{"role": "user", "content": [{"type": "text", "text": q}]}], [], {}) for k, q in
             enumerate(["Count", "Which digit is this?"])]  # fmt: skip
    cut = generate_answers(model, processor, items, max_new_tokens=4)
    assert all(isinstance(answer, str) for answer in cut) and any(answer.cut for answer in cut)
    # Every token an end token: each answer ends at its first token, well within the limit.
    model.generation_config.eos_token_id = list(range(model.config.text_config.vocab_size))
    ended = generate_answers(model, processor, items, max_new_tokens=4)
    assert not any(answer.cut for answer in ended)


def test_custom_benchmark_on_the_digits(model_dir, tmp_path, capsys):
    data = write_digits_dataset(tmp_path, n=6)
    argv = ["--model", model_dir, "--benchmark", "custom", "--data", str(data), "--output", str(tmp_path / "o")]
    assert cli(*argv, *FAST) == 0
    predictions = read_jsonl(tmp_path / "o" / "predictions.jsonl")
    records = json.loads(data.read_text())
    assert [row["index"] for row in predictions] == [record["id"] for record in records]
    assert [row["answer"] for row in predictions] == [record["conversations"][-1]["value"] for record in records]
    assert {row["question_type"] for row in predictions} == {"number", "yes_no"}
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["num_questions"] == 6 and 0.0 <= scores["score"] <= 100.0
    assert sum(kind["num_questions"] for kind in scores["question_types"].values()) == 6
    assert json.loads(capsys.readouterr().out) == scores
    # `vlsi score --benchmark custom` on vlsi eval's own predictions.jsonl gives the same numbers.
    assert main(["score", "--benchmark", "custom", "--predictions", str(tmp_path / "o" / "predictions.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out) == {key: value for key, value in scores.items() if key != "cut"}
    # Another benchmark named for that file is refused: its eval.json says what it answers.
    assert main(["score", "--benchmark", "pope", "--predictions", str(tmp_path / "o" / "predictions.jsonl")]) == 2
    assert "holds vlsi eval's answers to custom" in capsys.readouterr().err


def test_custom_benchmark_on_a_parquet_dataset_answers_as_on_its_json_records(model_dir, tmp_path, capsys):
    """The same held-out digits as JSON records over PNG files and as a parquet written with `datasets` (the images'
    bytes inside, LLaVA-OneVision's columns with the turns renamed, mapped by --column): the same predictions."""
    pytest.importorskip("datasets")
    data = write_digits_dataset(tmp_path, n=6)
    records = json.loads(data.read_text())
    parquet = tmp_path / "heldout.parquet"
    onevision_dataset(tmp_path, records, turns="turns").to_parquet(parquet)
    images = tmp_path / "images"
    images.rename(tmp_path / "moved")  # the parquet run reads no image file
    argv = ["--model", model_dir, "--benchmark", "custom", "--data", str(parquet), "--output", str(tmp_path / "pq")]
    assert cli(*argv, "--column", "conversations=turns", *FAST) == 0
    (tmp_path / "moved").rename(images)
    argv = ["--model", model_dir, "--benchmark", "custom", "--data", str(data), "--output", str(tmp_path / "js")]
    assert cli(*argv, *FAST) == 0
    from_parquet, from_json = (read_jsonl(tmp_path / name / "predictions.jsonl") for name in ("pq", "js"))
    assert [row["index"] for row in from_parquet] == [r["id"] for r in records]
    assert from_parquet == from_json
    settings = json.loads((tmp_path / "pq" / "eval.json").read_text())
    assert settings["data_fingerprint"] == json.loads((tmp_path / "js" / "eval.json").read_text())["data_fingerprint"]
    capsys.readouterr()
    assert cli(*argv[:-2], "--output", str(tmp_path / "pq"), "--data", str(parquet), *FAST) == 2  # no column mapped
    assert "turns" in capsys.readouterr().err
    mmbench = ["--model", model_dir, "--benchmark", "mmbench_en", "--data", "x.tsv", "--output", str(tmp_path / "m")]
    assert cli(*mmbench, "--preset", "trl") == 2
    assert "--preset and --column map a dataset's columns for --benchmark custom" in capsys.readouterr().err


def test_a_trailing_user_turn_in_a_custom_record_is_refused(model_dir, tmp_path, capsys):
    data = write_digits_dataset(tmp_path, n=2)
    records = json.loads(data.read_text())
    records[1]["conversations"].append({"from": "human", "value": "And the next one?"})
    data.write_text(json.dumps(records))
    argv = ["--model", model_dir, "--benchmark", "custom", "--data", str(data), "--output", str(tmp_path / "o")]
    assert cli(*argv, *FAST) == 2
    error = capsys.readouterr().err
    assert "record digit-1 ends with a user turn after its last assistant turn" in error and "drop" in error
    assert not (tmp_path / "o").exists()


def test_a_unicode_line_separator_in_a_question_survives_resume(model_dir, tmp_path, monkeypatch):
    image = base64.b64encode(png((10, 200, 30))).decode()
    rows = [
        {"index": k, "question": f"Which colour\u2028is square {k}?", "A": "red", "B": "green", "answer": "B",
         "image": image}
        for k in range(2)
    ]  # fmt: skip
    data = write_tsv(tmp_path / "AI2D_TEST.tsv", rows)
    argv = ["--model", model_dir, "--benchmark", "ai2d", "--data", data, "--output", str(tmp_path / "o"), *FAST]
    assert cli(*argv) == 0
    predictions = tmp_path / "o" / "predictions.jsonl"
    assert "\u2028" not in predictions.read_text() and len(predictions.read_text().splitlines()) == 2  # escaped
    assert [row["question"] for row in read_jsonl(predictions)] == [row["question"] for row in rows]

    def no_model(*args, **kwargs):
        raise AssertionError("a finished run loaded the model")

    monkeypatch.setattr("vlsi.eval.harness.load_model", no_model)
    # Written as the character itself (by another writer): lines still end at "\n" only, and the run resumes.
    raw = predictions.read_text().replace("\\u2028", "\u2028")
    predictions.write_text(raw)
    assert cli(*argv) == 0
    assert predictions.read_text() == raw


def test_image_paths_and_a_judged_benchmark_without_judge(model_dir, tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (56, 56), "red").save(images / "a.png")
    data = write_tsv(
        tmp_path / "MMVet.tsv",
        [
            {
                "index": i,
                "question": "What is this?",
                "answer": "a red square",
                "category": "rec",
                "image_path": "a.png",
            }
            for i in range(2)
        ],
    )
    argv = ["--model", model_dir, "--benchmark", "mm-vet", "--data", data, "--image-root", str(images)]
    assert cli(*argv, "--output", str(tmp_path / "o"), *FAST) == 0
    assert len(read_jsonl(tmp_path / "o" / "predictions.jsonl")) == 2
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["score"] is None and scores["scored"] is False
    assert "--judge-url" in capsys.readouterr().err


# ---------------------------------------------------------------- custom matching (pure)


@pytest.mark.parametrize(
    "reference, kind",
    [
        ("B", "multiple_choice"),
        ("(C)", "multiple_choice"),
        ("Yes.", "yes_no"),
        ("no", "yes_no"),
        ("7", "number"),
        ("1,200", "number"),
        ("12%", "number"),
        ("a red circle", "open"),
        ("F", "open"),
    ],
)
def test_question_type(reference, kind):
    assert question_type(reference) == kind


QUESTION = "What animal is it?\nA. dog\nB. cat\nC. bird"


@pytest.mark.parametrize(
    "reference, prediction, question, hit",
    [
        ("B", "The answer is B.", "", True),
        ("B", "(B)", "", True),
        ("B", "B. cat", QUESTION, True),
        ("B", "cat", QUESTION, True),  # the option's text, when the question lists the options
        ("B", "A", "", False),
        ("B", "cat", "", False),  # no options listed: only a letter counts
        ("yes", "Yes.", "", True),
        ("Yes", "yes, there is one", "", True),
        ("no", "Yes, it is.", "", False),
        ("yes", "yes and no", "", False),
        ("7", "7.0", "", True),
        ("7", "seven", "", True),  # a number word zero-twenty on its own
        ("7", "There are 7 objects.", "", True),  # the last number in the text
        ("7", "The answer is 7, not 3.", "", True),  # the stated answer wins over the last number
        ("7", "8", "", False),
        ("7", "seven apples", "", False),  # number words only as the whole answer
        ("1,200", "1200", "", True),
        ("12%", "0.12", "", True),
        ("3.5", "3.50001", "", True),  # within 1e-4 relative
        ("3.5", "3.6", "", False),
        ("a red circle", "Red circle.", "", True),
        ("red circle", "blue circle", "", False),
    ],
)
def test_custom_hit(reference, prediction, question, hit):
    assert custom_hit(reference, prediction, question) is hit


# ---------------------------------------------------------------- errors


def test_bad_input_is_one_error_line(mmbench_run, model_dir, tmp_path, capsys):
    data, out = mmbench_run
    rows = mmbench_rows()
    no_answer = write_tsv(tmp_path / "no_answer.tsv", [{k: v for k, v in row.items() if k != "answer"} for row in rows])
    bad_image = write_tsv(tmp_path / "bad_image.tsv", [{**row, "image": "x" * 100} for row in rows[:1]])
    dangling = write_tsv(tmp_path / "dangling.tsv", [{**row, "image": "42"} for row in rows[:1]])
    orphan = write_tsv(tmp_path / "orphan.tsv", rows[1:2])  # a rotation without its main row
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(out / "eval.json", broken / "eval.json")
    no_weights = tmp_path / "no_weights"  # its config reads, its weights do not
    shutil.copytree(model_dir, no_weights)
    (no_weights / "model.safetensors").write_bytes(b"not a checkpoint")
    (broken / "predictions.jsonl").write_text('{"index": "0", "prediction": "A"}\nnot json\n{"index": "1"}\n')
    cases = [
        (["--data", no_answer], "missing answer"),
        (["--data", bad_image], "row with index 0: image cannot be decoded"),
        (["--data", dangling], "row with index 0: image cell '42'"),
        (["--data", orphan], "main row"),
        (["--data", str(tmp_path / "absent.tsv")], "no such file"),
        (["--data", data, "--benchmark", "nope"], "unknown benchmark"),
        (["--data", data, "--output", str(broken), *FAST], "line 2: not a prediction row"),
        (["--data", data, "--model", str(tmp_path / "no_model")], "cannot load"),  # leaves "o" reusable
        (["--data", data, "--model", str(no_weights)], "cannot load"),
        (["--data", data, "--device", "cuda:7"] if not _has_cuda() else ["--data", data, "--device", "gpu"], "device"),
    ]
    for extra, message in cases:
        argv = ["--model", model_dir, "--benchmark", "mmbench", "--output", str(tmp_path / "o"), *extra]
        assert cli(*argv) == 2, extra
        error = capsys.readouterr().err
        assert error.startswith("vlsi eval: error:") and message in error, (extra, error)
        assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    assert not (tmp_path / "o" / "eval.json").exists()  # nothing written for a model that did not load


def test_the_parser_offers_every_dtype_and_evaluate_refuses_another(tmp_path):
    from vlsi.cli import parse_args
    from vlsi.eval import EvalError, evaluate
    from vlsi.eval.harness import DTYPES

    argv = ["eval", "--model", "m", "--benchmark", "mmbench", "--data", "d.tsv", "--output", "o", "--dtype"]
    assert [parse_args([*argv, name]).dtype for name in ["auto", *DTYPES]] == ["auto", *DTYPES]
    with pytest.raises(EvalError, match="--dtype 'fp8' is not a dtype; use auto, bf16, fp16, fp32"):
        evaluate("m", "mmbench", tmp_path / "d.tsv", tmp_path / "o", dtype="fp8")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
