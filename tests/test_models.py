import pytest
import torch

from vlsi.config import TrainConfig
from vlsi.models.family import capture, default_target_layers, model_parts
from vlsi.models.loading import ModelError, add_lora, load_processor
from vlsi.models.tiny import build_tiny_vlm, build_tokenizer
from vlsi.models.verbalizer import Verbalizers, VerbFFN, target_layers
from vlsi.preflight import refuse_different_tokenizers


@pytest.fixture(scope="module", params=["qwen2_vl", "llava_onevision"])
def tiny(request):
    model, processor = build_tiny_vlm(family=request.param, vocab_pad=8)
    return request.param, model.eval(), processor


def test_default_target_layers_match_the_paper():
    assert default_target_layers(28) == [2, 6, 10, 14, 18, 22, 26]
    assert len(default_target_layers(80)) == 20 and default_target_layers(80)[-1] == 78
    assert 27 not in default_target_layers(28)  # the last block is covered by the last-layer loss


def test_target_layers_refuses_bad_lists(tiny):
    _, model, _ = tiny
    parts, cfg = model_parts(model), TrainConfig()
    assert target_layers(cfg, parts, "student") == default_target_layers(parts.num_layers)
    cfg.verbalizer.student_layers = [1, 0]
    with pytest.raises(ValueError, match="verbalizer.student_layers: .* strictly increasing"):
        target_layers(cfg, parts, "student")
    cfg.verbalizer.student_layers = [0, parts.num_layers]
    with pytest.raises(ValueError, match=rf"in \[0, {parts.num_layers - 1}\]"):
        target_layers(cfg, parts, "student")
    cfg.verbalizer.student_layers, cfg.verbalizer.offset = None, parts.num_layers
    with pytest.raises(ValueError, match="no target layers"):
        target_layers(cfg, parts, "student")


def test_family_table_finds_the_parts(tiny):
    family, model, processor = tiny
    parts = model_parts(model)
    assert parts.family == family
    assert parts.num_layers == 4 and parts.hidden_size == 64
    assert parts.vocab_rows == len(processor.tokenizer) + 8
    assert parts.lm_head is model.get_output_embeddings()
    assert parts.vision, "the vision tower is found so it can be frozen"


def test_capture_equals_output_hidden_states(tiny):
    _, model, processor = tiny
    ids = processor.tokenizer("How many objects are there?", return_tensors="pt")
    layer = model_parts(model).layers[0]
    with torch.no_grad(), capture(model_parts(model).layers, [0, 2]) as states:
        out = model(**ids, output_hidden_states=True)
    torch.testing.assert_close(states[0], out.hidden_states[1])
    torch.testing.assert_close(states[2], out.hidden_states[3])
    assert not [h for h in layer._forward_hooks.values() if h.__name__ == "record"], "our hooks are removed"


def test_verbalizer_shapes_and_round_trip(tmp_path, tiny):
    _, model, processor = tiny
    parts = model_parts(model)
    verb = Verbalizers(parts.hidden_size, [0, 2], family=parts.family)
    assert sum(p.numel() for p in verb.parameters()) == 2 * 3 * 64 * 64  # 3 d^2 per layer, no expansion
    vocab = len(processor.tokenizer)
    h = torch.randn(5, 64)
    logits = verb.head(1, parts.norm, parts.lm_head, vocab)(h)
    assert logits.shape == (5, vocab)
    verb.save(tmp_path / "v")
    again = Verbalizers.load(tmp_path / "v")
    assert again.target_layers == [0, 2] and again.family == parts.family
    torch.testing.assert_close(again.head(1, parts.norm, parts.lm_head, vocab)(h), logits)
    names = {k for k in again.state_dict()}
    assert not any("lm_head" in k or "norm" in k for k in names), "norm and LM head are shared, not copied"


def test_residual_verbalizer_starts_as_identity():
    ffn = VerbFFN(16, residual=True)
    h = torch.randn(3, 16)
    torch.testing.assert_close(ffn(h), h)


def test_missing_verbalizers_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no verbalizers here"):
        Verbalizers.load(tmp_path)


def test_vocabulary_check(tmp_path):
    build_tiny_vlm(tmp_path / "a", layers=2)
    build_tiny_vlm(tmp_path / "b", layers=3, hidden=32, heads=2, vocab_pad=16)
    other = build_tokenizer(corpus="completely different words here " * 10, vocab_size=300)
    build_tiny_vlm(tmp_path / "c", layers=2, tokenizer=other)
    a, b, c = (load_processor(str(tmp_path / n)) for n in "abc")
    refuse_different_tokenizers(a, b, "a", "b")  # same tokenizer, different padded head: fine
    with pytest.raises(ModelError, match="different tokenizers"):
        refuse_different_tokenizers(a, c, "a", "c")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load a processor"):
        load_processor(str(tmp_path / "nothing-here"))


def test_lora_only_touches_the_language_model(tiny):
    _, model, _ = tiny
    model, _ = build_tiny_vlm(family=model.config.model_type)
    parts = model_parts(model)
    peft_model = add_lora(model, parts, r=4, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    lora_names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
