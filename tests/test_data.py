"""Data layer: records -> samples -> encoded tensors with assistant-only labels -> padded batches -> tiny models."""

import copy
import json

import pytest
import torch
from PIL import Image

from vlsi.data import (
    IGNORE_INDEX,
    DataError,
    Overlong,
    Sample,
    VLDataset,
    encode,
    load_records,
    make_collate,
    read_dataset,
    response_positions,
)
from vlsi.data import dataset as dataset_module
from vlsi.models.tiny import build_tiny_vlm, build_tokenizer

FAMILIES = ["qwen2_vl", "llava_onevision"]


@pytest.fixture(scope="module")
def tiny():
    """{family: (model, processor)}; the models are only used for the forward-pass checks."""
    return {family: build_tiny_vlm(family=family) for family in FAMILIES}


@pytest.fixture
def images(tmp_path):
    """Two real PNGs of different aspect ratios, a.png and b.png, in tmp_path."""
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 90), (0, 0, 255)).save(tmp_path / "b.png")
    return tmp_path


def write_jsonl(path, records, blank_lines=False):
    path.write_text("".join(json.dumps(r) + ("\n\n" if blank_lines else "\n") for r in records))
    return path


def llava(id, answer="a cat", image="a.png", question=None):
    question = question or ("<image>\nWhat is this?" if image else "What is this?")
    record = {"id": id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    return record | ({"image": image} if image else {})


def text(content):
    return {"type": "text", "text": content}


IMAGE = {"type": "image"}


def labelled_text(processor, labels):
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


# ---------------------------------------------------------------- records


def test_llava_json_array_and_jsonl_give_the_same_samples(images):
    records = [llava("x"), llava("y", question="Describe <image> please", image=["b.png"]), llava("z", image=None)]
    array = images / "array.json"
    array.write_text(json.dumps(records, indent=2))
    lines = write_jsonl(images / "lines.json", records, blank_lines=True)  # JSONL despite the .json name

    samples, problems = read_dataset(array)
    assert (samples, problems) == read_dataset(lines)
    assert load_records(array) == load_records(lines) == records
    assert problems == []
    assert samples == [
        Sample("x", [{"role": "user", "content": [IMAGE, text("What is this?")]},
                     {"role": "assistant", "content": [text("a cat")]}], [images / "a.png"]),
        Sample("y", [{"role": "user", "content": [text("Describe "), IMAGE, text(" please")]},
                     {"role": "assistant", "content": [text("a cat")]}], [images / "b.png"]),
        Sample("z", [{"role": "user", "content": [text("What is this?")]},
                     {"role": "assistant", "content": [text("a cat")]}], []),
    ]  # fmt: skip


def test_llava_images_without_placeholder_open_the_first_human_turn(images, tmp_path_factory):
    data = tmp_path_factory.mktemp("elsewhere") / "d.jsonl"  # images resolve against image_root, not the file's dir
    record = {
        "image": ["a.png", str(images / "b.png")],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Compare them."},
            {"from": "gpt", "value": "yes"},
        ],
    }
    [sample], _ = read_dataset(write_jsonl(data, [record]), image_root=images)
    assert sample.id == "0"  # no id: the record's index
    assert sample.messages[1] == {"role": "user", "content": [IMAGE, IMAGE, text("Compare them.")]}
    assert sample.images == [images / "a.png", images / "b.png"]


def test_openai_format(images):
    record = {
        "id": "o1",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "image", "image": "a.png"},
                {"type": "image_url", "image_url": {"url": f"file://{images / 'b.png'}"}},
                {"type": "text", "text": "Which is taller?"},
            ]},
            {"role": "assistant", "content": [{"type": "text", "text": "the second"}]},
        ],
    }  # fmt: skip
    [sample], _ = read_dataset(write_jsonl(images / "d.jsonl", [record]))
    assert sample == Sample(
        "o1",
        [
            {"role": "system", "content": [text("Be brief.")]},
            {"role": "user", "content": [IMAGE, IMAGE, text("Which is taller?")]},
            {"role": "assistant", "content": [text("the second")]},
        ],
        [images / "a.png", images / "b.png"],
    )


def test_all_invalid_records_are_reported_at_once_and_can_be_skipped(images):
    (images / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    records = [
        llava("ok"),
        llava("two-placeholders", question="<image><image> same?"),
        llava("missing", image="nowhere.png"),
        llava("corrupt", image="garbage.png"),
        {"id": "no-answer", "conversations": [{"from": "human", "value": "hi"}]},
        "MALFORMED",
        {"id": "bad-role", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]},
        llava("empty-answer", answer="  "),
        {"id": "neither", "prompt": "hi", "response": "x"},
        {"id": "remote", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
            {"role": "assistant", "content": "x"},
        ]},
        {"id": "inline", "messages": [
            {"role": "user", "content": [{"type": "image", "image": "data:image/png;base64,AAAA"}]},
            {"role": "assistant", "content": "x"},
        ]},
    ]  # fmt: skip
    path = images / "d.jsonl"
    path.write_text("\n".join("{not json" if r == "MALFORMED" else json.dumps(r) for r in records) + "\n")

    with pytest.raises(DataError) as raised:
        read_dataset(path)
    message = str(raised.value)
    assert message.startswith(f"10 invalid records in {path} (set data.skip_invalid=true to skip them):")
    expected = [
        "record two-placeholders (line 2): 2 <image> tags or {'type': 'image'} items but 1 images in 'image'",
        "record missing (line 3): image 'nowhere.png': file not found",
        "record corrupt (line 4): image 'garbage.png': not an image file",
        "record no-answer (line 5): no assistant turn",
        "record 5 (line 6): malformed JSON at column 2",
        "record bad-role (line 7): turn 0: unknown role 'robot'",
        "record empty-answer (line 8): turn 1: assistant turn has no text",
        "record neither (line 9): neither LLaVA format",
        "record remote (line 10): image 'https://x.org/a.png': remote images are not read (vlsi reads no network)",
        "record inline (line 11): image 'data:image/png;base64,AAAA': not an image file",
    ]
    for fragment in expected:
        assert f"{path}: {fragment}" in message
    assert len(raised.value.problems) == len(expected)

    samples, skipped = read_dataset(path, skip_invalid=True)
    assert [s.id for s in samples] == ["ok"]
    assert skipped == raised.value.problems


def test_file_level_problems(tmp_path):
    for content in ["", "  \n\n", "[]"]:
        (tmp_path / "d.json").write_text(content)
        with pytest.raises(DataError, match=r"1 invalid records in .*d\.json \(no valid record\):\n.*d\.json: empty"):
            read_dataset(tmp_path / "d.json", skip_invalid=True)
    (tmp_path / "d.json").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"d\.json: not UTF-8 text \(byte 0\)"):
        read_dataset(tmp_path / "d.json")
    (tmp_path / "d.json").write_text('[\n  {"id": "a"},\n  {"id": }\n]')
    with pytest.raises(DataError, match=r"d\.json: malformed JSON at line 3 column 10"):
        read_dataset(tmp_path / "d.json")
    with pytest.raises(DataError, match=r"d\.json: malformed JSON at line 3 column 10"):
        load_records(tmp_path / "d.json")


def test_json_array_problems_name_the_line_and_at_most_20_are_shown(tmp_path):
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "hi"}]} for i in range(25)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records + [llava("ok", image=None)], indent=1))  # 9 lines a record after the "["
    with pytest.raises(DataError) as raised:
        read_dataset(path)
    lines = str(raised.value).splitlines()
    assert lines[0] == f"25 invalid records in {path} (set data.skip_invalid=true to skip them):"
    assert lines[1] == (
        f"{path}: record r0 (line 2): no assistant turn, so nothing to learn from; "
        "set data.answers=teacher to have the teacher answer it"
    )
    assert lines[2].startswith(f"{path}: record r1 (line 11): ")
    assert lines[21:] == ["... and 5 more"]


def test_duplicate_ids_are_rejected(images):
    with pytest.raises(DataError, match=r"record x \(line 2\): duplicate id \(also on line 1\)"):
        read_dataset(write_jsonl(images / "d.jsonl", [llava("x"), llava("x")]))


# ---------------------------------------------------------------- encode


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_exactly_the_assistant_turns(tiny, images, family):
    _, processor = tiny[family]
    sample = Sample(
        "multi",
        [
            {"role": "user", "content": [IMAGE, text("What is this?")]},
            {"role": "assistant", "content": [text("answer1")]},
            {"role": "user", "content": [text("And the colour?")]},
            {"role": "assistant", "content": [text("answer2")]},
        ],
        [images / "a.png"],
    )
    encoded = encode(sample, processor)
    ids, labels = encoded["input_ids"], encoded["labels"]  # [1, T]
    assert labels.shape == ids.shape
    assert labelled_text(processor, labels[0]) == "answer1<|im_end|>answer2<|im_end|>"
    labelled = labels != IGNORE_INDEX
    assert torch.equal(labels[labelled], ids[labelled])
    assert (ids == processor.image_token_id).sum() > 1  # the placeholder was expanded, and none of it is labelled
    assert not labelled[ids == processor.image_token_id].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_two_images_and_no_image(tiny, images, family):
    _, processor = tiny[family]
    chat = [{"role": "user", "content": [IMAGE, IMAGE, text("Same?")]}, {"role": "assistant", "content": [text("no")]}]
    two = encode(Sample("two", chat, [images / "a.png", images / "b.png"]), processor)
    if family == "qwen2_vl":
        assert two["image_grid_thw"].shape == (2, 3)
    else:  # one sample with two images: LLaVA-OneVision's multi-image mode, base crop only
        assert two["pixel_values"].shape[:2] == (2, 1)
        assert two["batch_num_images"].tolist() == [2]
    assert labelled_text(processor, two["labels"][0]) == "no<|im_end|>"

    chat = [{"role": "user", "content": [text("hi")]}, {"role": "assistant", "content": [text("hello")]}]
    none = encode(Sample("none", chat, []), processor)
    assert "pixel_values" not in none
    assert labelled_text(processor, none["labels"][0]) == "hello<|im_end|>"


def test_overlong_raises_instead_of_truncating(tiny, images):
    _, processor = tiny["qwen2_vl"]
    [sample], _ = read_dataset(write_jsonl(images / "d.jsonl", [llava("x")]))
    length = encode(sample, processor)["input_ids"].shape[1]
    assert encode(sample, processor, max_length=length)["input_ids"].shape[1] == length
    with pytest.raises(Overlong, match=rf"sample x: {length} tokens > data.max_length={length - 1}") as raised:
        encode(sample, processor, max_length=length - 1)
    assert raised.value.length == length


def test_template_that_rewrites_earlier_turns_is_rejected(tiny):
    _, processor = tiny["qwen2_vl"]
    counting = copy.copy(processor)
    counting.chat_template = "{{ messages | length }} turns\n" + processor.chat_template
    chat = [{"role": "user", "content": [text("hi")]}, {"role": "assistant", "content": [text("hello")]}]
    with pytest.raises(ValueError, match=r"sample s: the chat template of Qwen2VLProcessor renders the first 1 turns"):
        encode(Sample("s", chat, []), counting)


def test_response_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    assert response_positions(labels).tolist() == [
        [False, True, True, False, False],
        [True, False, False, True, False],
    ]


# ---------------------------------------------------------------- dataset


def test_overlong_samples_are_dropped_or_rejected(tiny, images):
    _, processor = tiny["qwen2_vl"]
    long_answer = " ".join(["The quick brown fox jumps over the lazy dog."] * 6)
    records = [llava("short"), llava("long", answer=long_answer), llava("short2", image=None)]
    samples, _ = read_dataset(write_jsonl(images / "d.jsonl", records))
    lengths = {s.id: encode(s, processor)["input_ids"].shape[1] for s in samples}
    max_length = lengths["short"]
    assert lengths["long"] > max_length >= lengths["short2"]

    dataset = VLDataset(samples, {"student": processor}, max_length=max_length)
    assert (dataset.dropped, dataset.n_dropped, len(dataset)) == (["long"], 1, 2)
    assert [s.id for s in dataset.samples] == ["short", "short2"]
    assert dataset.lengths == [lengths["short"], lengths["short2"]]
    assert labelled_text(processor, dataset[1]["student"]["labels"][0]) == "a cat<|im_end|>"

    fix = rf"set data.max_length={lengths['long']} or data.overlong=drop"
    with pytest.raises(DataError, match=rf"1 samples longer than data.max_length={max_length} tokens \({fix}\):\n"
                       rf"sample long: {lengths['long']} tokens"):  # fmt: skip
        VLDataset(samples, {"student": processor}, max_length=max_length, overlong="error")


def test_length_scan_is_cached(tiny, images, monkeypatch):
    _, processor = tiny["qwen2_vl"]
    samples, _ = read_dataset(write_jsonl(images / "d.jsonl", [llava("a"), llava("b", image=None)]))
    cache = images / "cache" / "lengths.json"
    first = VLDataset(samples, {"student": processor}, max_length=60, cache_path=cache)
    cached = json.loads(cache.read_text())
    assert cached["keys"] == [dataset_module.processor_key(processor)] and len(cached["lengths"]) == 2

    def no_scan(*args, **kwargs):
        raise AssertionError("re-scanned")

    monkeypatch.setattr(dataset_module, "_count", no_scan)
    again = VLDataset(samples, {"student": processor}, max_length=40, cache_path=cache)  # max_length: same scan
    assert again.lengths == [n for n in first.lengths if n <= 40]
    edited = [samples[0], Sample("b", [samples[1].messages[0], {"role": "assistant", "content": [text("no")]}], [])]
    with pytest.raises(AssertionError, match="re-scanned"):
        VLDataset(edited, {"student": processor}, max_length=60, cache_path=cache)


def test_length_scan_is_shared_by_stages_and_follows_the_images(tiny, images, monkeypatch):
    """Another stage's scan file in the same folder serves a processor it holds; an image whose file changed (size,
    mtime) makes the samples new, and they are scanned again."""
    processor, other = tiny["qwen2_vl"][1], tiny["llava_onevision"][1]
    path = write_jsonl(images / "d.jsonl", [llava("a"), llava("b", image=None)])
    samples, _ = read_dataset(path)
    folder = images / "cache"
    VLDataset(samples, {"teacher": processor, "student": other}, max_length=200, cache_path=folder / "interact.json")
    scanned = []
    real_count = dataset_module._count
    monkeypatch.setattr(
        dataset_module, "_count", lambda s, p, names, *a: scanned.append(names) or real_count(s, p, names, *a)
    )
    sft = VLDataset(samples, {"model": other}, max_length=200, cache_path=folder / "sft.json")
    assert scanned == [] and sft.lengths == VLDataset(samples, {"model": other}, max_length=200).lengths
    assert scanned == [["model"]]  # the one without a cache scans

    Image.new("RGB", (81, 40)).save(images / "a.png")
    samples, _ = read_dataset(path)
    VLDataset(samples, {"model": other}, max_length=200, cache_path=folder / "sft.json")
    assert scanned == [["model"], ["model"]]


def test_teacher_and_student_must_agree_on_response_tokens(tiny, images):
    _, processor = tiny["qwen2_vl"]
    _, char_level = build_tiny_vlm(family="qwen2_vl", tokenizer=build_tokenizer("qwen2_vl", corpus="x y z"))
    samples, _ = read_dataset(write_jsonl(images / "d.jsonl", [llava("fox", answer="The quick brown fox")]))
    with pytest.raises(DataError, match=r"response token counts differ between teacher, student.*\n"
                       r"sample fox: 9 for teacher, 20 for student"):  # fmt: skip
        VLDataset(samples, {"teacher": processor, "student": char_level}, max_length=200)


def test_processors_that_encode_alike_encode_once(tiny, images, monkeypatch):
    """A teacher and a student of one family share their encoding; the result equals encoding each separately."""
    _, processor = tiny["qwen2_vl"]
    twin = copy.deepcopy(processor)  # another object, same everything
    _, other = build_tiny_vlm(family="qwen2_vl", tokenizer=build_tokenizer("qwen2_vl", corpus="x y z"))
    samples, _ = read_dataset(write_jsonl(images / "d.jsonl", [llava("a"), llava("b", image=None)]))
    processors = {"teacher": processor, "student": twin, "other": other}
    keys = {name: dataset_module.processor_key(p) for name, p in processors.items()}
    assert dataset_module.same_encoding(keys) == {
        "teacher": "teacher",
        "student": "teacher",
        "other": "other",
    }
    calls = []
    real_encode = dataset_module.encode
    monkeypatch.setattr(dataset_module, "encode", lambda sample, p, *a: calls.append(p) or real_encode(sample, p, *a))
    dataset = VLDataset(samples, {"teacher": processor, "student": twin}, max_length=200)
    assert calls == [] and list(dataset_module._COUNTERS) == ["teacher"], "the scan counts with one processor"
    item = dataset[0]
    assert len(calls) == 1 and calls[-1] is processor
    reference = real_encode(samples[0], twin, 200)
    for name in ("teacher", "student"):
        assert item[name].keys() == reference.keys()
        assert all(torch.equal(item[name][k], reference[k]) for k in reference)
    assert item["teacher"] is not item["student"]


# ---------------------------------------------------------------- collate


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_collates_and_matches_unbatched_forward(tiny, images, family):
    model, processor = tiny[family]
    records = [
        llava("one"),
        llava("none", image=None, answer="The quick brown fox jumps over the lazy dog."),
        llava("two", question="<image>\n<image>\nSame?", image=["a.png", "b.png"], answer="no"),
    ]
    samples, _ = read_dataset(write_jsonl(images / "d.jsonl", records))
    dataset = VLDataset(samples, {"student": processor}, max_length=200)
    items = [dataset[i]["student"] for i in range(3)]
    batch = make_collate({"student": processor})([dataset[i] for i in range(3)])["student"]

    lengths = [item["input_ids"].shape[1] for item in items]
    longest = max(lengths)
    for key in ["input_ids", "attention_mask", "labels"]:
        assert batch[key].shape == (3, longest)
    for row, (item, n) in enumerate(zip(items, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"][0])
        assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    if family == "qwen2_vl":
        assert torch.equal(batch["image_grid_thw"], torch.cat([items[0]["image_grid_thw"], items[2]["image_grid_thw"]]))
        assert batch["pixel_values"].shape[0] == items[0]["pixel_values"].shape[0] + items[2]["pixel_values"].shape[0]
        assert (batch["mm_token_type_ids"][:, longest - 1] == 0).all()
    else:  # [1, 2 crops, ...] and [2, 1 crop, ...] -> [3, 2, ...], the missing crops zero
        assert batch["pixel_values"].shape == (3, 2, 3, 56, 56)
        assert not batch["pixel_values"][1:, 1].any()
        assert batch["batch_num_images"].tolist() == [1, 2]
        assert batch["image_sizes"].tolist() == [[40, 80], [40, 80], [90, 30]]

    with torch.no_grad():
        out = model(**batch)
        assert torch.isfinite(out.loss)
        for row, (item, n) in enumerate(zip(items, lengths, strict=True)):  # padding and packing change nothing
            torch.testing.assert_close(out.logits[row, :n], model(**item).logits[0], atol=1e-4, rtol=1e-4)


def test_teacher_and_student_processors_of_different_families(tiny, images):
    processors = {"teacher": tiny["qwen2_vl"][1], "student": tiny["llava_onevision"][1]}
    samples, _ = read_dataset(write_jsonl(images / "d.jsonl", [llava("a"), llava("b", image=None)]))
    dataset = VLDataset(samples, processors, max_length=200)
    batch = make_collate(processors)([dataset[0], dataset[1]])
    assert batch.keys() == {"teacher", "student"}
    assert "image_grid_thw" in batch["teacher"] and "image_sizes" in batch["student"]
    for name, (model, _) in [("teacher", tiny["qwen2_vl"]), ("student", tiny["llava_onevision"])]:
        positions = response_positions(batch[name]["labels"])
        assert positions.sum() == (batch[name]["labels"] != IGNORE_INDEX).sum()  # no response token comes first
        with torch.no_grad():
            assert torch.isfinite(model(**batch[name]).loss)
