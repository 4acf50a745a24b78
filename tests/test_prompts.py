"""The message `vlsi eval` sends for a benchmark row equals VLMEvalKit's, text and images, for every benchmark and
both prompt builders. The expected messages in tests/data/prompts/expected.json were recorded by running
VLMEvalKit's own dataset classes and Qwen2VLPromptMixin on the fixture TSVs there
(scripts/record_vlmevalkit_prompts.py): option and hint cells None / NA / N/A / nan / #N/A, an integer option column
with blanks (printed 4.0), hints and questions with spaces around them, a Chinese question, image references to a
row with one image and to a row with two, MMMU's <image N> tags, CV-Bench's prompt column."""

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlsi.eval import SCORERS
from vlsi.eval.generate import EvalError, benchmark_items
from vlsi.eval.io import read_rows
from vlsi.eval.prompts import DATASET, KIND, QWEN2_VL, build_message, builder_used, prompt_builder

FIXTURES = Path(__file__).parent / "data" / "prompts"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def pixels(source: bytes) -> str:
    with Image.open(io.BytesIO(source)) as image:
        return hashlib.md5(image.convert("RGB").tobytes()).hexdigest()


def sent(item) -> list[dict]:
    """The item's message as VLMEvalKit's recording writes one: images as the md5 of their pixels, in order."""
    images = iter(item.images)
    return [
        {"type": "image", "value": pixels(next(images))}
        if part["type"] == "image"
        else {"type": "text", "value": part["text"]}
        for part in item.messages[0]["content"]
    ]


def test_recorded_against_the_commit_the_docs_name():
    assert EXPECTED["vlmevalkit_commit"] == "e8e78f05f3080fe28154f2130321f17951c3be94"
    assert "e8e78f0" in (Path(__file__).parents[1] / "docs" / "EVALUATION.md").read_text()


def test_every_benchmark_has_a_builder_and_a_recorded_prompt():
    assert KIND.keys() == SCORERS.keys()
    # Not VLMEvalKit datasets: built as their kind (mm_vet_v2 as MMVet, cv_bench as CV-Bench-2D/3D).
    assert set(SCORERS) - set(EXPECTED["benchmarks"]) == {"cv_bench", "mm_vet_v2"}


@pytest.mark.parametrize("builder", [DATASET, QWEN2_VL])
@pytest.mark.parametrize("name", sorted(EXPECTED["benchmarks"]))
def test_the_message_is_vlmevalkits(name, builder):
    recorded = EXPECTED["benchmarks"][name]
    path = FIXTURES / recorded["fixture"]
    rows = read_rows(path, error=EvalError, drop=())
    for row in rows:
        row["index"] = str(row["index"])
    items = benchmark_items(name, rows, FIXTURES, path, builder)
    assert [item.index for item in items] == recorded["index"]
    uses_qwen2_vl = builder_used(name, builder) == QWEN2_VL
    expected = recorded["qwen2_vl_prompt" if uses_qwen2_vl else "dataset_prompt"]
    assert (recorded["qwen2_vl_prompt"] is not None) == (builder_used(name, QWEN2_VL) == QWEN2_VL)
    assert [sent(item) for item in items] == expected


def test_the_builder_follows_the_model_family():
    assert prompt_builder("qwen2_vl") == QWEN2_VL
    # vlmeval/config.py turns Qwen2VLPromptMixin off for Qwen2.5-VL; other families get the dataset's builder.
    assert prompt_builder("qwen2_5_vl") == DATASET and prompt_builder("llava_onevision") == DATASET
    assert builder_used("mme", QWEN2_VL) == DATASET and builder_used("pope", QWEN2_VL) == QWEN2_VL
    assert builder_used("mm_vet", QWEN2_VL) == DATASET and builder_used("mathvista", QWEN2_VL) == QWEN2_VL


def test_pope_is_asked_for_yes_or_no_only_by_qwen2_vl():
    row = {"question": "Is there a dog?"}
    assert build_message("pope", row, [], DATASET)[0][-1]["text"] == "Is there a dog?"
    assert build_message("pope", row, [], QWEN2_VL)[0][-1]["text"] == "Is there a dog? Please answer yes or no."


def test_an_mmmu_tag_without_its_image_is_refused(tmp_path):
    rows = [{"index": "0", "question": "See <image 2>.", "A": "x", "B": "y", "answer": "A", "image_path": "a.png"}]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(EvalError, match=r"row with index 0: the question's tag <image 2> names none of its 1 images"):
        benchmark_items("mmmu", rows, tmp_path, tmp_path / "MMMU.tsv")
