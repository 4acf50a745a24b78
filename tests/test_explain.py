"""`vlsi explain`: per-layer verbalized decoding is exact, the final row is greedy `generate`, bad input is one line."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlsi.cli import main
from vlsi.explain import (
    LayerAnswer,
    align,
    block_output,
    eos_ids,
    explain,
    explain_pair,
    format_pair,
    greedy_decode,
    prompt_inputs,
)
from vlsi.models.family import model_parts
from vlsi.models.tiny import build_tiny_vlm
from vlsi.models.verbalizer import VerbalizerError, Verbalizers
from vlsi.toy import write_tiny_pair

QUESTION = "Which digit is this?"
STEPS = 6


def _image(seed: int = 0) -> Image.Image:
    pixels = torch.randint(0, 256, (56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module", params=["qwen2_vl", "llava_onevision"])
def tiny(request):
    model, processor = build_tiny_vlm(family=request.param, layers=4)
    torch.manual_seed(1)
    verbalizers = Verbalizers(64, [0, 2], family=request.param)
    return model.eval(), processor, verbalizers


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy teacher (6 blocks, hidden 96) / student (4 blocks, hidden 64) on disk, random verbalizers, an image."""
    root = tmp_path_factory.mktemp("explain")
    teacher, student = write_tiny_pair(root)
    torch.manual_seed(0)
    Verbalizers(64, [1, 2], family="qwen2_vl").save(root / "vs")
    Verbalizers(96, [0, 2, 4], family="qwen2_vl").save(root / "vt")
    _image().save(root / "digit.png")
    return root, str(teacher), str(student)


def test_final_row_is_greedy_generate(tiny):
    model, processor, verbalizers = tiny
    image = _image()
    answers = explain(model, processor, verbalizers, image, QUESTION, max_new_tokens=STEPS)
    assert [a.layer for a in answers] == [0, 2, "final"]
    inputs = prompt_inputs(processor, image, QUESTION)
    out = model.generate(**inputs, do_sample=False, max_new_tokens=STEPS)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in eos_ids(model, processor)), len(new))]
    assert answers[-1].token_ids == tuple(new) and len(new) > 0
    assert answers[-1].text == processor.tokenizer.decode(new, skip_special_tokens=True)


def test_padded_lm_head_rows_are_never_decoded():
    """Qwen2-VL-7B's head has rows past the tokenizer
    (docs/METHOD.md#models-and-the-shared-vocabulary): make them win and check they are skipped."""
    model, processor = build_tiny_vlm(layers=2, vocab_pad=8)
    vocab = len(processor.tokenizer)
    head = model_parts(model).lm_head.weight
    with torch.no_grad():
        head[vocab:] = 1000 * head[:8]
        logits = model(**prompt_inputs(processor, _image(), QUESTION)).logits[0, -1]
    assert int(logits.argmax()) >= vocab, "the padded rows win without the slice"
    answers = explain(model, processor, Verbalizers(64, [0], family="qwen2_vl"), _image(), QUESTION, 4)
    assert all(answer.token_ids and max(answer.token_ids) < vocab for answer in answers)


def test_early_exit_with_cache_equals_full_forward(tiny):
    """Layer l's answer = the verbalizer on hidden_states[l + 1] of full passes without cache, step by step."""
    model, processor, verbalizers = tiny
    image = _image(1)
    answers = explain(model, processor, verbalizers, image, QUESTION, max_new_tokens=STEPS)
    parts = model_parts(model)
    vocab, eos = len(processor.tokenizer), eos_ids(model, processor)
    for k, layer in enumerate(verbalizers.target_layers):
        head = verbalizers.head(k, parts.norm, parts.lm_head, vocab)
        inputs, ids = prompt_inputs(processor, image, QUESTION), []
        with torch.no_grad():
            for _ in range(STEPS):
                out = model(**inputs, output_hidden_states=True)
                ids.append(int(head(out.hidden_states[layer + 1][:, -1]).argmax(-1)))
                if ids[-1] in eos:
                    ids.pop()
                    break
                extra = {"input_ids": ids[-1], "attention_mask": 1, "mm_token_type_ids": 0}  # text token
                inputs = {
                    key: torch.cat([v, torch.full((1, 1), extra[key], dtype=v.dtype)], 1) if key in extra else v
                    for key, v in inputs.items()
                }
        assert answers[k].layer == layer
        assert answers[k].token_ids == tuple(ids), f"block {layer}"
    for block in parts.layers:
        assert "stop" not in [h.__name__ for h in block._forward_hooks.values()], "hooks removed"


def test_blocks_above_the_target_never_run(tiny):
    model, processor, _ = tiny
    layers = model_parts(model).layers
    calls = []
    handle = layers[2].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        h = block_output(model, layers[1], prompt_inputs(processor, _image(), QUESTION))
    finally:
        handle.remove()
    assert h.shape[-1] == 64 and calls == []
    assert "stop" not in [h.__name__ for h in layers[1]._forward_hooks.values()]


def test_decoding_stops_at_eos_and_at_max_new_tokens(tiny):
    model, processor, _ = tiny
    parts = model_parts(model)
    inputs = prompt_inputs(processor, _image(), QUESTION)
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos in eos_ids(model, processor)
    always = lambda token: lambda h: torch.nn.functional.one_hot(torch.tensor([token]), 400).float()
    assert greedy_decode(model, parts.layers[0], always(eos), inputs, {eos}, 5) == []
    assert greedy_decode(model, parts.layers[0], always(42), inputs, {eos}, 5) == [42] * 5


@pytest.mark.parametrize(
    "verbalizers, match",
    [
        (Verbalizers(96, [0], family="qwen2_vl"), "hidden size 96, but the model has hidden size 64"),
        (Verbalizers(64, [0], family="llava_onevision"), "trained for a llava_onevision model"),
        (Verbalizers(64, [1, 4], family="qwen2_vl"), r"blocks \[1, 4\], but the model has 4 decoder blocks"),
    ],
)
def test_verbalizers_of_another_model_are_refused(verbalizers, match):
    model, processor = build_tiny_vlm(layers=4)
    with pytest.raises(VerbalizerError, match=match):
        explain(model, processor, verbalizers, _image(), QUESTION)


def test_align_pairs_layers_by_relative_depth():
    def answers(blocks, num_layers):
        return [LayerAnswer(b, num_layers, f"{b}", ()) for b in blocks] + [LayerAnswer("final", num_layers, "", ())]

    student = answers(range(2, 27, 4), 28)  # the paper's Qwen2-VL 7B / 2B target layers
    teacher = answers(range(2, 79, 4), 80)  # and 72B's
    rows = align(student, teacher)
    assert [s.layer for s, _ in rows if s is not None] == [a.layer for a in student]
    assert [t.layer for _, t in rows if t is not None] == [a.layer for a in teacher]
    pairs = [(s.layer, t.layer) for s, t in rows if s is not None and t is not None]
    assert pairs == [(2, 6), (6, 18), (10, 30), (14, 42), (18, 54), (22, 66), (26, 78), ("final", "final")]
    assert all(abs(s.depth - t.depth) <= 0.025 for s, t in rows if s is not None and t is not None)
    # two student layers nearest the same teacher layer: the closer one takes it, the other gets its own row
    rows = align(answers([0, 1], 4), answers([1], 4))
    assert [(s and s.layer, t and t.layer) for s, t in rows] == [(0, None), (1, 1), ("final", "final")]
    cells = [[cell.strip() for cell in line.split(" | ")] for line in format_pair(rows).splitlines()[2:]]
    assert cells == [
        ["block 0 / 4 (25%)", "0"],
        ["block 1 / 4 (50%)", "1", "block 1 / 4 (50%)", "1"],
        ["final (block 3 / 4)", "(empty)", "final (block 3 / 4)", "(empty)"],
    ]


def test_explain_pair_aligns_the_two_models(toy):
    root, teacher, student = toy
    s_model, s_proc = AutoModelForImageTextToText.from_pretrained(student), AutoProcessor.from_pretrained(student)
    t_model, t_proc = AutoModelForImageTextToText.from_pretrained(teacher), AutoProcessor.from_pretrained(teacher)
    s_verb, t_verb = Verbalizers.load(root / "vs"), Verbalizers.load(root / "vt")
    image = root / "digit.png"
    rows = explain_pair(s_model, s_proc, s_verb, t_model, t_proc, t_verb, image, QUESTION, max_new_tokens=2)
    assert [(s and s.layer, t and t.layer) for s, t in rows] == [(None, 0), (1, 2), (2, 4), ("final", "final")]
    assert all(a.num_layers == n for row in rows for a, n in zip(row, (4, 6)) if a is not None)
    assert all(len(a.token_ids) <= 2 for row in rows for a in row if a is not None)


def test_cli_prints_every_target_layer_side_by_side(toy, capsys):
    root, teacher, student = toy
    argv = [
        *("--model", student, "--verbalizers", str(root / "vs"), "--teacher", teacher),
        *("--teacher-verbalizers", str(root / "vt"), "--image", str(root / "digit.png")),
        *("--question", QUESTION, "--max-new-tokens", "3"),
    ]
    assert main(["explain", *argv]) == 0
    table = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in table[0].split("|")]
    assert header == ["student", "student answer", "teacher", "teacher answer"]
    student_labels = ["block 1 / 4 (50%)", "block 2 / 4 (75%)", "final (block 3 / 4)"]
    teacher_labels = ["block 0 / 6 (17%)", "block 2 / 6 (50%)", "block 4 / 6 (83%)", "final (block 5 / 6)"]
    for label in student_labels + teacher_labels:
        assert sum(label in line for line in table) == 1, label
    rows = [[cell.strip() for cell in line.split(" | ")[::2]] for line in table[2:]]  # the two label columns
    assert rows == [
        ["", "block 0 / 6 (17%)"],
        ["block 1 / 4 (50%)", "block 2 / 6 (50%)"],
        ["block 2 / 4 (75%)", "block 4 / 6 (83%)"],
        ["final (block 3 / 4)", "final (block 5 / 6)"],
    ]


def test_cli_student_alone(toy, capsys):
    root, _, student = toy
    argv = ["--model", student, "--verbalizers", str(root / "vs"), "--image", str(root / "digit.png")]
    assert main(["explain", *argv, "--question", QUESTION]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0].strip() for line in table[2:]] == ["block 1 / 4", "block 2 / 4", "final (block 3 / 4)"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"verbalizers": "vt"}, "verbalizers in {root}/vt have hidden size 96, but {student} has hidden size 64"),
        ({"image": "missing.png"}, "image {root}/missing.png not found: give the path of an existing image"),
        ({"image": "vs/verbalizers.json"}, "image {root}/vs/verbalizers.json cannot be decoded"),
        ({"verbalizers": "nowhere"}, "{root}/nowhere: no verbalizers here"),
        ({"teacher": "teacher"}, "--teacher and --teacher-verbalizers go together"),
    ],
)
def test_cli_bad_input_is_one_line(toy, capsys, change, message):
    root, _, student = toy
    paths = {"verbalizers": "vs", "image": "digit.png", **change}
    argv = ["--model", student, "--question", QUESTION]
    for key, value in paths.items():
        argv += [f"--{key}", str(root / value)]
    assert main(["explain", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("vlsi explain: error: ") and captured.err.count("\n") == 1
    assert message.format(root=root, student=student) in captured.err
