"""Every supported VLM family, built tiny in-process from its real config, model and processor classes: the family
table finds its parts, freeze_vision reaches everything outside the language model, LoRA reaches its attention, MLP,
fused, linear-attention and (on request) expert weights, its processor's image expansion is never labelled, an
unsupported architecture gets one line, and `vlsi train` runs the three stages on a tiny pair whose student reloads
and generates (plus `vlsi eval` and `vlsi explain` on the families with wrapped image tokens)."""

import copy
import functools
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vlsi.cli import main
from vlsi.config import load_config
from vlsi.data import IGNORE_INDEX, Sample, encode, make_collate, split_batch
from vlsi.data.encode import _expand
from vlsi.losses import cross_entropy_from_logits
from vlsi.models.family import _get, default_target_layers, model_parts
from vlsi.models.loading import ModelError, add_lora
from vlsi.models.tiny import build_tiny_vlm, build_tokenizer
from vlsi.preflight import refuse_different_tokenizers
from vlsi.stages.sft import SFTStep
from vlsi.toy import write_digits_dataset

ROOT = Path(__file__).parent.parent
NEW = ["qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v", "internvl", "gemma3", "idefics3", "smolvlm"]
ALL = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", *NEW]
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}
LORA_TARGETS = {  # what the family's row adapts by default (lora.target_modules: null)
    "glm4v": ATTENTION | {"gate_up_proj", "down_proj"},
    "qwen3_5": ATTENTION | MLP | {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"},
    "qwen3_5_moe": ATTENTION | MLP | {"in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"},  # MLP: shared
    "qwen3_vl_moe": ATTENTION,
}


def _needs(family: str) -> str:
    if family == "smolvlm":  # SmolVLMProcessor imports num2words (video frame timestamps)
        pytest.importorskip("num2words", reason="SmolVLMProcessor needs the num2words package")
    return family


@functools.cache
def _tiny(family: str):
    """(model, processor), 2 blocks of width 32; cached: tests that change a model build their own."""
    model, processor = build_tiny_vlm(family=family, hidden=32, heads=2, layers=2)
    return model.eval(), processor


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (80, 40), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (30, 90), (0, 0, 255)).save(tmp_path / "b.png")
    return tmp_path


def _text(content: str) -> dict:
    return {"type": "text", "text": content}


# ---------------------------------------------------------------- family table, freezing, LoRA


@pytest.mark.parametrize("family", ALL)
def test_family_row_finds_the_parts_and_the_vision_side(family):
    model, _ = _tiny(_needs(family))
    parts = model_parts(model)
    assert parts.family == family
    assert parts.num_layers == 2 and parts.hidden_size == 32
    assert parts.layers is model.get_decoder().layers and parts.norm is model.get_decoder().norm
    assert parts.lm_head is model.get_output_embeddings()
    # freeze_vision=true freezes parts.vision: with the language model and the LM head, that is every weight
    language = {id(p) for p in _get(model, parts.language_model_path).parameters()} | {id(parts.lm_head.weight)}
    vision = {id(p) for m in parts.vision for p in (m.parameters() if isinstance(m, torch.nn.Module) else [m])}
    assert vision and not vision & language
    assert [n for n, p in model.named_parameters() if id(p) not in language | vision] == []


@pytest.mark.parametrize("family", ALL)
def test_default_lora_targets_reach_attention_and_mlp(family):
    model, _ = build_tiny_vlm(family=_needs(family), hidden=32, heads=2, layers=2)
    parts = model_parts(model)
    peft_model = add_lora(model, parts, r=2, alpha=2, dropout=0.0)
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert adapted == LORA_TARGETS.get(family, ATTENTION | MLP)
    lora = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert all(f".{parts.language_model_path}." in n for n in lora), "never the vision tower or projector"


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_lora_on_moe_experts_trains_and_merges(family):
    model, processor = build_tiny_vlm(family=family, hidden=32, heads=2, layers=2)
    experts = model.model.language_model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    peft_model = add_lora(model, model_parts(model), r=2, alpha=2, dropout=0.0, experts=True)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("mlp.experts" in n for n in trainable) and all("lora_" in n for n in trainable)
    torch.manual_seed(0)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # as after some training (LoRA starts as a no-op)
            torch.nn.init.normal_(p, std=0.1)
    ids = processor.tokenizer("How many objects are there?", return_tensors="pt")
    with torch.no_grad():
        adapted = peft_model(**ids).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(**ids).logits, adapted, atol=1e-5, rtol=1e-5)
    assert not [n for n, _ in merged.named_parameters() if "lora_" in n]
    assert not torch.equal(merged.model.language_model.layers[0].mlp.experts.gate_up_proj, experts)


def test_lora_settings_that_cannot_apply_are_refused():
    model, _ = build_tiny_vlm(family="glm4v", hidden=32, heads=2, layers=2)
    parts = model_parts(model)
    with pytest.raises(ModelError, match=r"no linear layer named \['gate_proj'\].*gate_up_proj"):
        add_lora(model, parts, 2, 2, 0.0, ["q_proj", "gate_proj"])
    with pytest.raises(ModelError, match="lora.experts=true, but model type 'glm4v' has no MoE expert weights"):
        add_lora(model, parts, 2, 2, 0.0, experts=True)
    moe, _ = build_tiny_vlm(family="qwen3_vl_moe", hidden=32, heads=2, layers=2)
    with pytest.raises(ModelError, match="lora.dropout=0"):
        add_lora(moe, model_parts(moe), 2, 2, 0.1, experts=True)


def test_moe_router_aux_loss_never_enters_the_loss(images):
    """The stages read logits only and pass no labels: even a MoE configured to return router logits (and so to
    compute its load-balancing loss) contributes plain next-token cross-entropy."""
    model, processor = build_tiny_vlm(family="qwen3_vl_moe", hidden=32, heads=2, layers=2)
    model.config.text_config.output_router_logits = True
    model.config.text_config.router_aux_loss_coef = 100.0
    sample = Sample("s", [{"role": "user", "content": [{"type": "image"}, _text("What is this?")]},
                          {"role": "assistant", "content": [_text("a red square")]}], [images / "a.png"])  # fmt: skip
    batch = make_collate({"model": processor})([{"model": encode(sample, processor)}])
    inputs, mask, targets = split_batch(batch["model"])
    with torch.no_grad():
        out = model(**inputs)
        loss, _ = SFTStep(model, model_parts(model), len(processor.tokenizer))(batch)
    assert out.aux_loss is not None and out.aux_loss > 0, "the router loss is computed ..."
    vocab = len(processor.tokenizer)
    torch.testing.assert_close(loss, cross_entropy_from_logits(out.logits[mask][:, :vocab], targets))  # ... unused


@pytest.mark.parametrize("model_type", ["blip-2", "instructblip", "kosmos-2", "git", "pix2struct"])
def test_unsupported_architecture_gets_one_line(model_type):
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(model_type))
    with pytest.raises(ValueError) as error:
        model_parts(model)
    message = str(error.value)
    assert "\n" not in message
    assert f"model type '{model_type}'" in message and "is not supported" in message
    assert "no decoder layers" in message or "no final norm" in message
    assert "vlsi.models.family.FAMILIES" in message


# ---------------------------------------------------------------- encoding: wrapped image tokens


@pytest.mark.parametrize("family", NEW)
def test_labels_cover_exactly_the_assistant_turns(family, images):
    model, processor = _tiny(_needs(family))
    sample = Sample(
        "multi",
        [
            {"role": "user", "content": [{"type": "image"}, _text("What is this?")]},
            {"role": "assistant", "content": [_text("answer1")]},
            {"role": "user", "content": [_text("And"), {"type": "image"}, _text("the colour?")]},
            {"role": "assistant", "content": [_text("answer2")]},
        ],
        [images / "a.png", images / "b.png"],
    )
    encoded = encode(sample, processor)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    labelled = labels != IGNORE_INDEX
    space = " " if family in ("idefics3", "smolvlm") else ""  # "Assistant:" + " answer"
    eot = processor.tokenizer.eos_token
    assert processor.tokenizer.decode(labels[labelled]) == f"{space}answer1{eot}{space}answer2{eot}"
    assert torch.equal(labels[labelled], ids[labelled])
    text = processor.apply_chat_template(sample.messages, tokenize=False)
    assert len(ids) > len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]), "images expanded"
    special = set(processor.tokenizer.all_special_ids)
    assert not [t for t in ids[labelled].tolist() if t in special and t != processor.tokenizer.eos_token_id]
    with torch.no_grad():  # the image features land on the expanded tokens
        assert torch.isfinite(model(**{k: v for k, v in encoded.items() if k != "labels"}).logits).all()


def test_expansion_with_merged_newlines_keeps_the_answer_labels():
    """Gemma 3-like: the text's "\\n" before `<start_of_image>` (50) merges with the processor's "\\n\\n" into one
    token (7), and 51 x 2 + `<end_of_image>` (52) + "\\n\\n" (8) follow it."""
    text_ids, mask = [1, 2, 50, 3, 4, 5], [False, False, False, False, True, True]
    ids = [1, 7, 50, 51, 51, 52, 8, 3, 4, 5]
    assert _expand(mask, text_ids, ids, {50, 51}, "s") == [False] * 8 + [True, True]


def test_a_mismatch_away_from_images_or_over_the_answer_is_refused():
    text_ids, mask = [1, 2, 50, 3, 4, 5], [False, False, False, False, True, True]
    with pytest.raises(ValueError, match=r"^sample s7: .* at token 5 .*away from any image/video placeholder"):
        _expand(mask, text_ids, [1, 2, 50, 51, 3, 9, 5], {50, 51}, "s7")
    with pytest.raises(ValueError, match=r"^sample s8: the processor's image/video expansion .* changes assistant"):
        _expand([False, False, True, True], [1, 50, 4, 5], [1, 50, 51, 99, 5], {50, 51}, "s8")


def test_mixed_family_pairs_share_a_tokenizer_or_are_refused():
    qwen25, qwen3 = _tiny("qwen2_5_vl")[1], _tiny("qwen3_vl")[1]
    refuse_different_tokenizers(qwen25, qwen3, "t", "s")  # one Qwen tokenizer, two processor classes
    with pytest.raises(ModelError, match="different tokenizers"):
        refuse_different_tokenizers(_tiny("internvl")[1], qwen3, "t", "s")  # Qwen + InternVL's own tokens
    other_turns = copy.deepcopy(qwen3)
    other_turns.chat_template = qwen3.chat_template.replace("<|im_end|>", "<|endoftext|>")
    with pytest.raises(ModelError, match=r"label the same answer with different tokens .*<\|endoftext\|>"):
        refuse_different_tokenizers(qwen3, other_turns, "t", "s")


# ---------------------------------------------------------------- presets


# num_hidden_layers of the language models (docs/METHOD.md#target-layers, README "Models")
REAL_LAYERS = {
    "Qwen/Qwen3-VL-235B-A22B-Instruct": 94,
    "Qwen/Qwen3-VL-32B-Instruct": 64,
    "Qwen/Qwen3-VL-8B-Instruct": 36,
    "Qwen/Qwen3-VL-4B-Instruct": 36,
    "Qwen/Qwen3-VL-2B-Instruct": 28,
    "OpenGVLab/InternVL3-78B-hf": 80,
    "OpenGVLab/InternVL3-2B-hf": 28,
    "google/gemma-3-27b-it": 62,
    "google/gemma-3-4b-it": 34,
}
PRESETS = ["qwen3vl-235b-a22b-to-8b", "qwen3vl-235b-a22b-to-2b", "qwen3vl-32b-to-4b", "internvl3-78b-to-2b",
           "gemma3-27b-to-4b"]  # fmt: skip


@pytest.mark.parametrize("name", PRESETS)
def test_presets_follow_the_target_layer_rule(name):
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    assert yaml.safe_load(path.read_text())["teacher"] == cfg.teacher
    assert cfg.verbalizer.teacher_layers == default_target_layers(REAL_LAYERS[cfg.teacher])
    assert cfg.verbalizer.student_layers == default_target_layers(REAL_LAYERS[cfg.student])
    assert len(cfg.verbalizer.student_layers) <= len(cfg.verbalizer.teacher_layers)
    assert cfg.interact.lora.target_modules is None and not cfg.interact.lora.experts  # the family's row


# ---------------------------------------------------------------- end to end

PAIRS = {  # student family -> (teacher family, extra settings)
    "qwen3_vl": ("qwen3_vl_moe", []),  # a MoE teacher, a dense student: Qwen3-VL-235B-A22B -> 8B in small
    "qwen3_vl_moe": ("qwen3_vl_moe", ["interact.lora.experts=true", "sft.lora.experts=true"]),
    "qwen3_vl<-qwen2_5_vl": ("qwen2_5_vl", []),  # two families, one tokenizer
    "qwen3_5": ("qwen3_5_moe", []),  # Qwen3.5-MoE teacher, dense Qwen3.5 student
    "glm4v": ("glm4v", []),
    "internvl": ("internvl", []),
    "gemma3": ("gemma3", []),
    "idefics3": ("idefics3", []),
    "smolvlm": ("smolvlm", []),
}
EXPLAINED = {"internvl", "gemma3", "idefics3", "smolvlm"}  # image tokens come wrapped: also eval + explain


@pytest.mark.parametrize("name", list(PAIRS))
def test_train_reload_generate(name, tmp_path):
    student_family = _needs(name.split("<-")[0])
    teacher_family, extra = PAIRS[name]
    tokenizer = build_tokenizer(student_family)
    build_tiny_vlm(tmp_path / "t", family=teacher_family, hidden=32, heads=2, layers=4, tokenizer=tokenizer)
    build_tiny_vlm(tmp_path / "s", family=student_family, hidden=32, heads=2, layers=2, tokenizer=tokenizer, seed=1)
    data = write_digits_dataset(tmp_path, n=4)
    out = tmp_path / "run"
    steps = [f"{stage}.{key}=1" for stage in ("verbalize", "interact", "sft") for key in ("max_steps", "grad_accum")]
    batches = [f"{stage}.batch_size=2" for stage in ("verbalize", "interact", "sft")]
    config = str(ROOT / "configs" / "tiny-cpu.yaml")
    argv = ["train", "--teacher", str(tmp_path / "t"), "--student", str(tmp_path / "s"), "--data", str(data),
            "--output", str(out), "--config", config, *steps, *batches, *extra]  # fmt: skip
    assert main(argv) == 0

    stages = [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["verbalize/teacher", "verbalize/student", "interact", "sft"]
    with (
        safe_open(out / "student" / "model.safetensors", "pt") as trained,
        safe_open(tmp_path / "s" / "model.safetensors", "pt") as original,
    ):
        assert sorted(trained.keys()) == sorted(original.keys()), "a plain checkpoint of the student's architecture"
        if extra:  # LoRA on the experts, merged into them
            key = next(k for k in trained.keys() if k.endswith("mlp.experts.gate_up_proj"))
            assert not torch.equal(trained.get_tensor(key), original.get_tensor(key))

    model = AutoModelForImageTextToText.from_pretrained(out / "student").eval()
    processor = AutoProcessor.from_pretrained(out / "student")
    assert model_parts(model).family == student_family
    image = next((tmp_path / "images").glob("*.png"))
    messages = [{"role": "user", "content": [{"type": "image"}, _text("Which digit is this?")]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[Image.open(image).convert("RGB")]], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    if student_family in EXPLAINED:
        evaluation = ["eval", "--model", str(out / "student"), "--benchmark", "custom", "--data", str(data),
                      "--output", str(tmp_path / "eval"), "--max-new-tokens", "2"]  # fmt: skip
        assert main(evaluation) == 0
        assert (tmp_path / "eval" / "scores.json").is_file()
        explain = ["explain", "--model", str(out / "student"), "--verbalizers", str(out / "verbalizers" / "student"),
                   "--image", str(image), "--question", "Which digit is this?", "--max-new-tokens", "2"]  # fmt: skip
        assert main(explain) == 0
