"""Tiny Qwen2-VL / LLaVA-OneVision checkpoints built in-process: no download, real HF classes.

Used by the tests and by `vlsi demo`. A checkpoint directory written here loads with plain
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
]

# Same shape as the chat templates Qwen2-VL and LLaVA-OneVision ship: a system turn, then
# `<|im_start|>role\n ... <|im_end|>\n` per message; images are rendered where they appear in the content.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2VL_CHAT_TEMPLATE = _CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<|vision_start|><|image_pad|><|vision_end|>")
LLAVA_OV_CHAT_TEMPLATE = _CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>\n")

DEFAULT_CORPUS = (
    "You are a helpful assistant. What is shown in the image? Answer with the option's letter. "
    "Answer with a single word or number. How many objects are there? Which digit is this? "
    "Is the left one larger than the right one? yes no The answer is A B C D E. "
    "0 1 2 3 4 5 6 7 8 9 10 red green blue circle square triangle sequence next pattern count compare "
    "Describe the picture. There is a cat sitting on a mat. The quick brown fox jumps over the lazy dog. "
)


IMAGE_TOKENS = {"qwen2_vl": ("<|image_pad|>", "<|video_pad|>"), "llava_onevision": ("<image>", "<video>")}


def build_tokenizer(
    family: str = "qwen2_vl", corpus: str = DEFAULT_CORPUS, vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` (deterministic), with Qwen-style special tokens."""
    image_token, video_token = IMAGE_TOKENS[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": image_token, "video_token": video_token},
    )


def _qwen2_vl(tokenizer, hidden: int, layers: int, heads: int, vision_depth: int, vocab_rows: int, image_size: int):
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    head_dim = hidden // heads
    quarter = head_dim // 2 // 4
    mrope = [head_dim // 2 - 2 * quarter - quarter, quarter + quarter // 2, quarter + quarter - quarter // 2]
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_rows,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=1024,
            rope_scaling={"type": "mrope", "mrope_section": mrope},
            tie_word_embeddings=False,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=vision_depth,
            embed_dim=32,
            hidden_size=hidden,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            in_chans=3,
            temporal_patch_size=2,
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    return Qwen2VLForConditionalGeneration(config), processor


def _llava_onevision(
    tokenizer, hidden: int, layers: int, heads: int, vision_depth: int, vocab_rows: int, image_size: int
):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    ids = tokenizer.convert_tokens_to_ids
    patch = 14
    config = LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=vocab_rows,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=vision_depth,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
        ),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        image_grid_pinpoints=[[image_size, image_size]],
        vision_aspect_ratio="anyres_max_1",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    size = {"height": image_size, "width": image_size}
    image_processor = LlavaOnevisionImageProcessor(
        size=size, crop_size=size, image_grid_pinpoints=[[image_size, image_size]], do_pad=True
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(image_size // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_OV_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_1",
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


BUILDERS = {"qwen2_vl": _qwen2_vl, "llava_onevision": _llava_onevision}


def build_tiny_vlm(
    out_dir: str | Path | None = None,
    *,
    family: str = "qwen2_vl",
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    vision_depth: int = 1,
    vocab_pad: int = 0,
    image_size: int = 56,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
):
    """Build (and, with `out_dir`, save) a randomly initialised tiny VLM and its processor.

    `vocab_pad` adds unused LM-head rows past the tokenizer, as Qwen2-VL-7B's head is padded
    (152064 rows) beyond 2B's (151936). Returns `(model, processor)`.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(family)
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](
        tokenizer, hidden, layers, heads, vision_depth, len(tokenizer) + vocab_pad, image_size
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if out_dir is not None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor
