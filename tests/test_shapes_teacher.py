"""The demo's shipped teacher scores the same on its test questions whichever record shape they are written in: no
shape loses an image (issue: a `messages` + top-level `images` file once trained with every image dropped, and the
teacher then answered 8 % of these questions instead of 96 %). The score of each shape equals the demo's own
evaluation of the same questions."""

import base64
import json

import pytest
import torch

from vlsi.data import read_dataset
from vlsi.demo.evaluate import evaluate
from vlsi.demo.models import SHIPPED
from vlsi.demo.tasks import is_correct, make_split, write_split
from vlsi.eval.generate import Item, generate_answers
from vlsi.models.loading import load_model, load_processor

N = 48


def _question(path: str, question: str) -> dict:
    return {
        "llava": {"image": path, "conversations": [{"from": "human", "value": "<image>\n" + question}]},
        "llava_list": {"image": [path], "conversations": [{"from": "human", "value": "<image>\n" + question}]},
        "sharegpt": {"images": [path], "conversations": [{"from": "human", "value": "<image>\n" + question}]},
        "llava_untagged": {"images": [path], "conversations": [{"from": "human", "value": question}]},
        "swift": {"messages": [{"role": "user", "content": "<image>\n" + question}], "images": [path]},
        "trl": {
            "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            "images": [path],
        },
        "inline": {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": question}]}
            ]
        },
    }


@pytest.fixture(scope="module")
def teacher():
    return load_model(str(SHIPPED.teacher), torch.float32).eval(), load_processor(str(SHIPPED.teacher))


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    items = make_split("test", N)
    write_split(items, out, "test", answered=0)
    return out, items


def _accuracy(teacher, samples, items) -> float:
    model, processor = teacher
    prompts = [Item(s.id, s.messages, list(s.images), {}) for s in samples]
    replies = generate_answers(model, processor, prompts, max_new_tokens=4)
    by_id = {item.id: item for item in items}
    return sum(is_correct(reply, by_id[s.id]) for s, reply in zip(samples, replies)) / len(items)


def test_every_shape_gives_the_teacher_the_same_questions_with_their_images(teacher, questions):
    out, items = questions
    shapes = list(_question("x", "q"))
    scores = {}
    for shape in [*shapes, "data_uri"]:
        records = []
        for item in items:
            path = f"images/{item.id}.png"
            if shape == "data_uri":
                uri = "data:image/png;base64," + base64.b64encode((out / path).read_bytes()).decode()
                record = _question(uri, item.question)["inline"]
            else:
                record = _question(path, item.question)[shape]
            records.append({"id": item.id, **record})
        data = out / f"{shape}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        samples, _ = read_dataset(data, unanswered=True)
        assert [len(s.images) for s in samples] == [1] * N, shape
        assert all(s.messages[0]["content"][0] == {"type": "image"} for s in samples), shape
        assert not any("<image>" in str(s.messages) for s in samples), shape
        scores[shape] = _accuracy(teacher, samples, items)
    demo = evaluate(*teacher, items)["accuracy"]  # the demo's own scoring of the pictures as rendered in memory
    assert set(scores.values()) == {demo}, (demo, scores)
