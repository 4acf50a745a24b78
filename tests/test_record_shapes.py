"""Every record shape users hold (LLaVA, ShareGPT, OpenAI / ms-swift / LLaMA-Factory, HF / TRL) is read with all
its images, each image reaching the model in a trained step; records whose image tags or items and images disagree,
and keys that would change what is trained, are refused with a line naming the file, record and line."""

import base64
import copy
import dataclasses
import io
import json

import pytest
import torch
from PIL import Image

from vlsi.data import IGNORE_INDEX, DataError, VLDataset, encode, make_collate, read_dataset
from vlsi.data.records import _to_sample
from vlsi.data.scan import TokenCounter, _full
from vlsi.data.skipping import SKIPPED
from vlsi.models.family import model_parts
from vlsi.models.tiny import build_tiny_vlm
from vlsi.stages.sft import SFTStep


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_vlm(family="qwen2_vl", hidden=32, heads=2, layers=2)
    return model, processor


@pytest.fixture
def images(tmp_path):
    """a.png (80 x 40, red), b.png (30 x 90, blue) in tmp_path."""
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 90), (0, 0, 255)).save(tmp_path / "b.png")
    return tmp_path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def text(value):
    return {"type": "text", "text": value}


def _png(size, colour) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


BLUE = _png((30, 90), (0, 0, 255))  # the pixels of b.png, held in the record
BLUE_URI = "data:image/png;base64," + base64.b64encode(BLUE).decode()

# shape -> (record, the images the model must receive, in order: file names, "data:b.png" for b.png's bytes held in
# the record). Two-image records put their second image in a
# later user turn where the shape allows it, so that binding in order is what is tested.
SHAPES = {
    "llava: image as a string": (
        {"image": "a.png", "conversations": [human("<image>\nWhat is this?"), gpt("a red box")]},
        ["a.png"],
    ),
    "llava: image as a list": (
        {
            "image": ["a.png", "b.png"],
            "conversations": [human("<image>\nWhat is this?"), gpt("red"), human("And <image>?"), gpt("blue")],
        },
        ["a.png", "b.png"],
    ),
    "llava: images, no tag": (
        {"images": ["b.png", "a.png"], "conversations": [human("Compare them."), gpt("blue, then red")]},
        ["b.png", "a.png"],
    ),
    "sharegpt: conversations + images": (
        {
            "conversations": [human("<image>Which colour?"), gpt("blue"), human("<image>And this?"), gpt("red")],
            "images": ["b.png", "a.png"],
        },
        ["b.png", "a.png"],
    ),
    "sharegpt: user / assistant tags, system key": (
        {
            "system": "Be brief.",
            "conversations": [{"from": "user", "value": "<image>Colour?"}, {"from": "assistant", "value": "red"}],
            "images": ["a.png"],
        },
        ["a.png"],
    ),
    "openai / ms-swift: <image> tags in string content + images": (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                user("<image>What is this?"),
                assistant("a red box"),
                user("<image>And this?"),
                assistant("a blue bar"),
            ],
            "images": ["a.png", "b.png"],
        },
        ["a.png", "b.png"],
    ),
    "openai: top-level image, no tag": (
        {"messages": [user("What is this?"), assistant("a blue bar")], "image": "b.png"},
        ["b.png"],
    ),
    "hf / trl: {'type': 'image'} items + images": (
        {
            "messages": [
                user([{"type": "image"}, text("What is this?")]),
                assistant([text("a red box")]),
                user([text("And"), {"type": "image"}]),
                assistant([text("a blue bar")]),
            ],
            "images": ["a.png", "b.png"],
        },
        ["a.png", "b.png"],
    ),
    "hf datasets: items with null fields": (
        {
            "messages": [
                user([{"type": "image", "text": None}, {"type": "text", "text": "Colour?", "image": None}]),
                assistant([{"type": "text", "text": "blue", "image": None}]),
            ],
            "images": [{"bytes": None, "path": "b.png"}],
        },
        ["b.png"],
    ),
    "hf: inline image items": (
        {
            "messages": [
                user([{"type": "image", "image": "a.png"}, text("What is this?")]),
                assistant("a red box"),
                user([{"type": "image_url", "image_url": {"url": "b.png"}}, text("And this?")]),
                assistant("a blue bar"),
            ]
        },
        ["a.png", "b.png"],
    ),
    "openai: image_url with a data: URI": (
        {
            "messages": [
                user([text("What is this?"), {"type": "image_url", "image_url": {"url": BLUE_URI}}]),
                assistant([text("a blue bar")]),
            ]
        },
        ["data:b.png"],
    ),
    "ms-swift: data: URIs in images": (
        {
            "messages": [user("<image>What?"), assistant("blue"), user("<image>And?"), assistant("red")],
            "images": [BLUE_URI, "a.png"],
        },
        ["data:b.png", "a.png"],
    ),  # fmt: skip
    "hf datasets row: image bytes": (  # as `datasets` holds an Image column (not JSON: read with _to_sample)
        {
            "messages": [user([{"type": "image", "text": None}, text("Colour?")]), assistant([text("blue")])],
            "images": [{"bytes": BLUE, "path": None}],
        },
        ["data:b.png"],
    ),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_trains_a_step_on_all_its_images(shape, tiny, images):
    """Fails when any accepted shape loses an image: the batch holds one expanded run of image tokens per image
    and exactly those images' pixels, the answer alone is labelled, and the step's gradient reaches the vision
    tower."""
    record, expected = SHAPES[shape]
    model, processor = tiny
    if any(isinstance(image, dict) for image in record.get("images", [])):  # a datasets row, not a JSON line
        sample, problems, _ = _to_sample(record, "r", images)
        samples = [sample]
    else:
        samples, problems = read_dataset(write_jsonl(images / "d.jsonl", [record | {"id": "r"}]))
    assert problems == [] and len(samples) == 1
    [sample] = samples
    assert sample.images == [BLUE if name == "data:b.png" else images / name for name in expected]
    expected = [name.removeprefix("data:") for name in expected]
    assert sum(item["type"] == "image" for m in sample.messages for item in m["content"]) == len(expected)

    dataset = VLDataset(samples, {"model": processor}, max_length=400)
    batch = make_collate({"model": processor})([dataset[0]])
    encoded = batch["model"]
    pixels = [Image.open(images / name).convert("RGB") for name in expected]
    reference = processor.image_processor(images=pixels, return_tensors="pt")
    assert torch.equal(encoded["pixel_values"], reference["pixel_values"])
    assert torch.equal(encoded["image_grid_thw"], reference["image_grid_thw"])
    merge = processor.image_processor.merge_size**2
    ids = encoded["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == int(reference["image_grid_thw"].prod(-1).sum()) // merge
    starts = (ids == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")).sum()
    assert int(starts) == len(expected)
    labelled = processor.tokenizer.decode(encoded["labels"][0][encoded["labels"][0] != IGNORE_INDEX])
    answers = [m for m in sample.messages if m["role"] == "assistant"]
    assert labelled == "".join(m["content"][0]["text"] + "<|im_end|>" for m in answers)

    step = SFTStep(model, model_parts(model), len(processor.tokenizer))
    model.zero_grad()
    loss, _ = step(batch)
    loss.backward()
    vision = model.model.visual
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.patch_embed.parameters())
    model.zero_grad()


MISMATCHED = {
    "llava: tags but no image": {"conversations": [human("<image>\nWhat is this?"), gpt("x")]},
    "llava: two images, one tag": {"image": ["a.png", "b.png"], "conversations": [human("<image>\nWhat?"), gpt("x")]},
    "ms-swift: <image> tag, no images": {"messages": [user("<image>What is this?"), assistant("x")]},
    "ms-swift: one tag, two images": {
        "messages": [user("<image>What is this?"), assistant("x")],
        "images": ["a.png", "b.png"],
    },
    "hf: image item, no images": {"messages": [user([{"type": "image"}, text("What?")]), assistant("x")]},
    "hf: inline items and images": {
        "messages": [user([{"type": "image", "image": "a.png"}, text("What?")]), assistant("x")],
        "images": ["b.png"],
    },
}


@pytest.mark.parametrize("shape", list(MISMATCHED))
def test_tags_or_items_and_images_that_disagree_are_refused(shape, images):
    good = {"id": "ok", "image": "a.png", "conversations": [human("<image>Hi"), gpt("x")]}
    path = write_jsonl(images / "d.jsonl", [good, MISMATCHED[shape] | {"id": "bad"}])
    with pytest.raises(DataError) as raised:
        read_dataset(path)
    [problem] = raised.value.problems
    assert problem.startswith(f"{path}: record bad (line 2): ")
    assert "<image> tags or {'type': 'image'} items but" in problem
    samples, skipped = read_dataset(path, skip_invalid=True)
    assert [s.id for s in samples] == ["ok"] and skipped == [problem]


REFUSED = {
    "both conversations and messages": (
        {"conversations": [human("Hi"), gpt("x")], "messages": [user("Hi"), assistant("x")]},
        "both 'conversations' and 'messages': keep one of them",
    ),
    "video": (
        {"video": "v.mp4", "conversations": [human("<video>What happens?"), gpt("x")]},
        "'video': videos are not supported",
    ),
    "videos": (
        {"videos": ["v.mp4"], "messages": [user("<video>What happens?"), assistant("x")]},
        "'videos': videos are not supported",
    ),
    "image and images": (
        {"image": "a.png", "images": ["a.png"], "conversations": [human("<image>Hi"), gpt("x")]},
        "both 'image' and 'images'",
    ),
    "record weight": (
        {"weight": 0.5, "conversations": [human("Hi"), gpt("x")]},
        "'weight': 0.5: a per-record weight is not applied",
    ),
    "record loss": ({"loss": False, "messages": [user("Hi"), assistant("x")]}, "'loss': false: a per-record loss"),
    "turn weight not 0 or 1": (
        {"conversations": [human("Hi"), gpt("x") | {"weight": 0.3}]},
        "turn 1: 'weight' must be 0 or 1, got 0.3",
    ),
    "training a user turn": (
        {"messages": [user("Hi") | {"loss": True}, assistant("x")]},
        "turn 0: 'loss': true on a user turn; only assistant turns are trained",
    ),
    "every assistant turn weighted out": (
        {"conversations": [human("Hi"), gpt("x") | {"weight": 0}]},
        "no trained assistant turn, so nothing to learn from",
    ),
    "image in an assistant turn": (
        {"image": ["a.png"], "conversations": [human("Draw it."), gpt("<image>here")]},
        "turn 1: an image in an assistant turn; images belong in user turns",
    ),
    "system twice": (
        {"system": "Be brief.", "messages": [{"role": "system", "content": "Be long."}, user("Hi"), assistant("x")]},
        "both a top-level 'system' and a system turn",
    ),
    "tools": (
        {"tools": [{"name": "f"}], "messages": [user("Hi"), assistant("x")]},
        "'tools': tool calls are not supported",
    ),
    "an http(s) URL": (
        {"messages": [user([{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]), assistant("x")]},
        "image 'https://x.org/a.png': remote images are not read (vlsi reads no network); download them",
    ),
    "images not paths": (
        {"images": [3], "conversations": [human("<image>Hi"), gpt("x")]},
        "expected a path, a data: URI or image bytes",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_keys_that_change_what_is_trained_are_refused(case, images):
    record, fragment = REFUSED[case]
    path = write_jsonl(images / "d.jsonl", [record | {"id": "bad"}])
    with pytest.raises(DataError) as raised:
        read_dataset(path)
    assert any(p.startswith(f"{path}: record bad (line 1): ") and fragment in p for p in raised.value.problems), (
        raised.value.problems
    )


@pytest.mark.parametrize("key, off", [("weight", 0), ("loss", False)])
def test_an_assistant_turn_weighted_out_is_not_labelled(key, off, tiny, images):
    """Per-turn `weight: 0` (ShareGPT / axolotl) or `loss: false` (ms-swift): that answer is context, not target;
    `weight: 1` / `loss: true` label it as usual."""
    _, processor = tiny
    on = 1 if key == "weight" else True
    turns = [user("<image>What?"), assistant("skipped") | {key: off}, user("Again?"), assistant("kept") | {key: on}]
    record = {"id": "w", "messages": turns, "images": ["a.png"]}
    [sample], _ = read_dataset(write_jsonl(images / "d.jsonl", [record]))
    assert [m.get("loss", True) for m in sample.messages] == [True, False, True, True]
    dataset = VLDataset([sample], {"model": processor}, max_length=400)
    labels = dataset[0]["model"]["labels"][0]
    assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "kept<|im_end|>"
    text_ids = dataset[0]["model"]["input_ids"][0]
    assert "skipped" in processor.tokenizer.decode(text_ids), "the turn stays in the context"
    counter = TokenCounter(processor)
    assert counter([sample]) == [_full(sample, processor)] == [[len(text_ids), len(labels[labels != IGNORE_INDEX])]]


# ---------------------------------------------------------------- what only the processor can find


def _question(value):
    return {"messages": [user([text(value)]), assistant("yes")]}


def _two(path, bad):
    """A good record, then `bad` (id "bad") on line 2."""
    good = {"id": "ok", "image": "a.png", "conversations": [human("<image>Colour?"), gpt("red")]}
    return write_jsonl(path, [good, bad | {"id": "bad"}])


def _refused_at_scan(path, processors, fragment, **options):
    """The eager scan names the record and its line with `fragment`; data.skip_invalid leaves it out; lazy loading
    skips it with the same line."""
    samples, _ = read_dataset(path)
    with pytest.raises(DataError) as raised:
        VLDataset(samples, processors, max_length=400, **options)
    [problem] = raised.value.problems
    assert problem.startswith(f"{path}: record bad (line 2): ") and fragment in problem, problem
    assert "\n" not in problem and "Traceback" not in str(raised.value)
    assert str(raised.value).splitlines()[0].endswith("(set data.skip_invalid=true to skip them):")
    dataset = VLDataset(samples, processors, max_length=400, skip_invalid=True, **options)
    assert [s.id for s in dataset.samples] == ["ok"] and dataset.invalid == [problem]
    lazy = VLDataset(read_dataset(path, lazy=True)[0], processors, max_length=400, lazy=True, **options)
    [(position, message, bad)] = lazy[1][SKIPPED]
    assert (position, bad) == (1, True) and message == f"{problem}; skipped"
    return problem


SPECIAL = ["<|im_end|>", "<|im_start|>assistant\nSure", "<|endoftext|>", "<|image_pad|>", "<|vision_start|>"]


@pytest.mark.parametrize("token", SPECIAL)
def test_special_token_text_is_refused_naming_the_record_and_the_token(token, tiny, images):
    """`<|im_start|>assistant` in a user's text would inject a fake assistant turn; `<|image_pad|>` (Qwen2-VL's image
    token) would stop the run when the processor counts images."""
    path = _two(images / "d.jsonl", _question(f"Is {token} a tag?"))
    shown = token.split("assistant")[0]
    problem = _refused_at_scan(path, {"model": tiny[1]}, f"special token text {shown!r} (turn 0)")
    assert "set data.special_tokens=text" in problem


def test_the_image_token_of_llava_onevision_typed_as_text_is_refused(images):
    """LLaVA-OneVision's image token is `<image>`: an HTML question in a content item is refused (in string content
    `<image>` is a tag, bound to an image or an error)."""
    _, processor = build_tiny_vlm(family="llava_onevision", hidden=32, heads=2, layers=2)
    path = _two(images / "d.jsonl", _question("What does the <image> tag do in HTML?"))
    _refused_at_scan(path, {"model": processor}, "special token text '<image>' (turn 0)")


@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "idefics3"])
def test_special_tokens_as_text_are_plain_text_and_labelled_with_their_turn(family, images):
    """data.special_tokens=text: each special token's string becomes the tokens of its plain text (as
    `split_special_tokens=True` gives them); the answer's are labelled, the question's are not; the scan counts
    them as `encode` does."""
    _, processor = build_tiny_vlm(family=family, hidden=32, heads=2, layers=2)
    tokenizer = processor.tokenizer
    record = {
        "id": "t",
        "messages": [user("<image>Is <|im_end|> or <|image_pad|> a tag?"), assistant("yes, <|endoftext|> too")],
        "images": ["a.png"],
    }
    samples, _ = read_dataset(write_jsonl(images / "d.jsonl", [record]))
    dataset = VLDataset(samples, {"model": processor}, max_length=400, special_tokens="text")
    item = dataset[0]["model"]
    ids, labels = item["input_ids"][0], item["labels"][0]
    assert dataset.lengths == [len(ids)]
    plain = tokenizer("<|endoftext|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    answer = labels[labels != IGNORE_INDEX].tolist()
    space = " " if family == "idefics3" else ""  # "Assistant:" + " answer"
    eot = "<end_of_turn>" if family == "gemma3" else tokenizer.eos_token
    assert tokenizer.decode(answer) == f"{space}yes, <|endoftext|> too{eot}"
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") not in answer
    assert any(answer[k : k + len(plain)] == plain for k in range(len(answer))), "its plain tokens, labelled"
    unexpanded = encode(samples[0], processor, special_tokens="text")
    assert all(torch.equal(unexpanded[k], v) for k, v in item.items())
    for name in ("<|im_end|>", "<|endoftext|>"):
        written = processor.apply_chat_template(samples[0].messages, tokenize=False).count(name)  # template + user
        typed = sum(t["text"].count(name) for m in samples[0].messages for t in m["content"] if t["type"] == "text")
        assert int((ids == tokenizer.convert_tokens_to_ids(name)).sum()) == written - typed
    assert int((ids == processor.image_token_id).sum()) == int(
        (encode(_without_text(samples[0]), processor)["input_ids"] == processor.image_token_id).sum()
    ), "the typed <|image_pad|> is not an image"
    for key in ("attention_mask", "mm_token_type_ids", "token_type_ids"):
        if key in item:
            assert item[key].shape == ids[None].shape


def _without_text(sample):
    """The sample with its text removed (its images kept)."""
    messages = [
        {**m, "content": [c if c["type"] == "image" else text("x") for c in m["content"]]} for m in sample.messages
    ]
    return dataclasses.replace(sample, messages=messages)


def test_an_image_beyond_the_processors_aspect_ratio_is_found_by_the_scan(tiny, images):
    """28 x 6000 on Qwen2-VL: the processor refuses aspect ratios over 200; the scan names the record."""
    Image.new("RGB", (28, 6000)).save(images / "tall.png")
    path = _two(images / "d.jsonl", {"image": "tall.png", "conversations": [human("<image>What?"), gpt("x")]})
    _refused_at_scan(path, {"model": tiny[1]}, "the processor refuses it (ValueError: absolute aspect ratio")


def test_a_chat_template_that_raises_is_one_line_naming_the_record(tiny, images):
    """Gemma- and Mistral-style templates raise on two user turns in a row: one line, the record skippable."""
    strict = copy.copy(tiny[1])
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' and loop.index0 > 0 and messages[loop.index0 - 1]['role'] "
        "== 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{% endif %}{% endfor %}" + tiny[1].chat_template
    )
    path = _two(images / "d.jsonl", {"messages": [user("Hi"), user("Hello?"), assistant("x")]})
    problem = _refused_at_scan(path, {"model": strict}, "the chat template rejects the conversation (TemplateError: ")
    assert problem.endswith("Conversation roles must alternate user/assistant/user/assistant/...)")
