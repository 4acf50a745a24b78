"""Tiny checkpoints of every supported VLM family built in-process: no download, real HF classes.

Used by the tests and by `vlsi demo`. Each family gets its real config, model and processor classes, a byte-level
BPE tokenizer trained offline with the family's special tokens, and a chat template of the family's shape (role
markers, end-of-turn token, how an image is rendered). A checkpoint directory written here loads with plain
`AutoModelForImageTextToText.from_pretrained(dir)` and `AutoProcessor.from_pretrained(dir)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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


# Per tokenizer shape: extra special tokens (after SPECIAL_TOKENS), the attributes the family's processor reads
# from its tokenizer (image / video tokens, image wrappers), and the bos / eos / pad tokens.
_IDEFICS3_TILES = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
TOKENIZERS = {
    "qwen2_vl": dict(extra=[], attrs={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
    "llava_onevision": dict(extra=[], attrs={"image_token": "<image>", "video_token": "<video>"}),
    "glm4v": dict(
        extra=[
            "[gMASK]",
            "<sop>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
            "<|begin_of_image|>",
            "<|end_of_image|>",
            "<|image|>",
            "<|begin_of_video|>",
            "<|end_of_video|>",
            "<|video|>",
        ],
        attrs={"image_token": "<|image|>", "video_token": "<|video|>"},
        eos="<|endoftext|>",
    ),
    "internvl": dict(
        extra=["<img>", "</img>", "<IMG_CONTEXT>"],
        attrs={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    ),
    "gemma3": dict(
        extra=[
            "<pad>",
            "<bos>",
            "<start_of_turn>",
            "<end_of_turn>",
            "<start_of_image>",
            "<end_of_image>",
            "<image_soft_token>",
        ],
        attrs={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        bos="<bos>",
        eos="<end_of_turn>",
        pad="<pad>",
    ),
    "idefics3": dict(
        extra=["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *_IDEFICS3_TILES],
        attrs={
            "image_token": "<image>",
            "video_token": "<video>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        eos="<end_of_utterance>",
    ),
}
# family -> tokenizer shape: families of one lineage share a tokenizer, as Qwen2-VL, Qwen2.5-VL and Qwen3-VL do
TOKENIZER_OF = {
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "qwen3_vl": "qwen2_vl",
    "qwen3_vl_moe": "qwen2_vl",
    "qwen3_5": "qwen2_vl",
    "qwen3_5_moe": "qwen2_vl",
    "llava_onevision": "llava_onevision",
    "glm4v": "glm4v",
    "internvl": "internvl",
    "gemma3": "gemma3",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",
}

# GLM-4.1V: `[gMASK]<sop>`, then `<|role|>\n content` per message; an image is wrapped in begin/end markers.
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}<|endoftext|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# InternVL3 (HF): Qwen-style turns; an image is `<IMG_CONTEXT>\n`, which the processor wraps in <img> ... </img>.
INTERNVL_CHAT_TEMPLATE = _CHAT_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<IMG_CONTEXT>\n")
# Gemma 3: `<bos>`, `<start_of_turn>user|model\n ... <end_of_turn>\n`; an image is `<start_of_image>`, which the
# processor expands to `\n\n<start_of_image>` + N x `<image_soft_token>` + `<end_of_image>\n\n`.
GEMMA3_CHAT_TEMPLATE = (
    "<bos>{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<start_of_image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Idefics3 / SmolVLM: `<|im_start|>User:<image>text<end_of_utterance>\nAssistant: answer<end_of_utterance>\n`; the
# processor expands `<image>` to `<fake_token_around_image>` + (tile tags + image tokens per tile) + `<global-img>` ...
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tokenizer(
    family: str = "qwen2_vl", corpus: str = DEFAULT_CORPUS, vocab_size: int = 400
) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus` (deterministic), with Qwen-style special tokens plus the family's own."""
    shape = TOKENIZERS[TOKENIZER_OF[family]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + len(shape["extra"]),
        special_tokens=SPECIAL_TOKENS + shape["extra"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    if "bos" in shape:  # as Gemma's tokenizer does, prepend <bos> when asked to add special tokens
        bos = shape["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=shape.get("eos", "<|im_end|>"),
        pad_token=shape.get("pad", "<|endoftext|>"),
        **({"bos_token": shape["bos"]} if "bos" in shape else {}),
        extra_special_tokens=shape["attrs"],
    )


def _mrope(head_dim: int) -> list[int]:
    """Multimodal RoPE sections (temporal, height, width) summing to head_dim / 2, in the proportions Qwen uses."""
    quarter = head_dim // 2 // 4
    return [head_dim // 2 - 2 * quarter - quarter, quarter + quarter // 2, quarter + quarter - quarter // 2]


def _text(tokenizer, hidden: int, layers: int, heads: int, vocab_rows: int, **extra) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=vocab_rows,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=ids(tokenizer.bos_token or tokenizer.pad_token),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _qwen_processor(processor_class, tokenizer, image_size: int, video_class=None):
    """Qwen2-VL's image processor (patch 14, merge 2) pinned to one resolution: image_size^2 / 14^2 / 4 tokens;
    `video_class`: the family's video processor, Qwen2-VL's when None."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14)
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=(video_class or Qwen2VLVideoProcessor)(),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )


def _qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def _merger_vision(depth: int, out_hidden: int, **extra) -> dict:
    """The tiny vision tower of Qwen2.5-VL, Qwen3-VL, Qwen3.5 and GLM-4.1V: width 32, 14-pixel patches merged 2 x 2
    into one token of the text model's width `out_hidden`; `extra`: the family's own fields."""
    return dict(
        depth=depth,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        out_hidden_size=out_hidden,
        **extra,
    )


def _vit_vision(depth: int, image_size, patch_size, **extra) -> dict:
    """The tiny ViT tower of LLaVA-OneVision and Gemma 3 (SigLIP), InternVL and Idefics3 / SmolVLM: width 32, 2 heads,
    one `image_size` tile cut into `patch_size` patches; `extra`: the family's own fields."""
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=depth,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )


def _qwen2_vl(tokenizer, hidden: int, layers: int, heads: int, vision_depth: int, vocab_rows: int, image_size: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    rope = {"type": "mrope", "mrope_section": _mrope(hidden // heads)}
    config = Qwen2VLConfig(
        text_config=_text(tokenizer, hidden, layers, heads, vocab_rows, rope_scaling=rope),
        # Qwen2-VL names its vision width embed_dim, and hidden_size the text model's width the merger projects to
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
        **_qwen_ids(tokenizer),
    )
    processor = _qwen_processor(Qwen2VLProcessor, tokenizer, image_size)
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
        text_config=_text(tokenizer, hidden, layers, heads, vocab_rows, model_type="qwen2"),
        vision_config=_vit_vision(vision_depth, image_size, patch, model_type="siglip_vision_model"),
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


def _qwen2_5_vl(tokenizer, hidden, layers, heads, vision_depth, vocab_rows, image_size):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    rope = {"type": "mrope", "mrope_section": _mrope(hidden // heads)}
    config = Qwen2_5_VLConfig(
        text_config=_text(tokenizer, hidden, layers, heads, vocab_rows, rope_scaling=rope),
        vision_config=_merger_vision(vision_depth, hidden, window_size=56, fullatt_block_indexes=[vision_depth - 1]),
        **_qwen_ids(tokenizer),
    )
    processor = _qwen_processor(Qwen2_5_VLProcessor, tokenizer, image_size)
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _qwen3_vl_like(config_class, model_class, text_extra: dict, vision_extra: dict):
    """Qwen3-VL, Qwen3-VL-MoE and Qwen3.5 share Qwen3-VL's vision tower (DeepStack) and processor."""

    def build(tokenizer, hidden, layers, heads, vision_depth, vocab_rows, image_size):
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        head_dim = hidden // heads
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(head_dim)}
        rope["mrope_interleaved"] = True
        config = config_class(
            text_config=_text(
                tokenizer, hidden, layers, heads, vocab_rows, head_dim=head_dim, rope_parameters=rope, **text_extra
            ),
            vision_config=_merger_vision(
                vision_depth, hidden, temporal_patch_size=2, num_position_embeddings=16, **vision_extra
            ),
            **_qwen_ids(tokenizer),
        )
        processor = _qwen_processor(Qwen3VLProcessor, tokenizer, image_size, Qwen3VLVideoProcessor)
        return model_class(config), processor

    return build


def _qwen3_vl(*args):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    return _qwen3_vl_like(Qwen3VLConfig, Qwen3VLForConditionalGeneration, {}, {"deepstack_visual_indexes": [0]})(*args)


def _qwen3_vl_moe(*args):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    # 4 experts, 2 per token; the experts' weights are 3-D parameters (mlp.experts.gate_up_proj / down_proj)
    moe = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    return _qwen3_vl_like(Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, moe, {"deepstack_visual_indexes": [0]})(
        *args
    )


def _linear_attention(layers: int) -> dict:
    """Qwen3.5's Gated DeltaNet (linear attention) blocks with a full-attention block every other layer (real: 3 of 4
    linear)."""
    return dict(
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        layer_types=["linear_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    )


def _qwen3_5(tokenizer, hidden, layers, heads, *args):
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    build = _qwen3_vl_like(Qwen3_5Config, Qwen3_5ForConditionalGeneration, _linear_attention(layers), {})
    return build(tokenizer, hidden, layers, heads, *args)


def _qwen3_5_moe(tokenizer, hidden, layers, heads, *args):
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    # Qwen3.5's linear / full attention blocks with a sparse MoE (4 experts, 2 per token) plus a shared expert
    text = dict(
        _linear_attention(layers),
        moe_intermediate_size=hidden // 2,
        shared_expert_intermediate_size=hidden // 2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    build = _qwen3_vl_like(Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration, text, {})
    return build(tokenizer, hidden, layers, heads, *args)


def _glm4v(tokenizer, hidden, layers, heads, vision_depth, vocab_rows, image_size):
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    ids = tokenizer.convert_tokens_to_ids
    # GLM rotates half of each head (partial_rotary_factor 0.5): the M-RoPE sections cover head_dim / 4
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    rope["mrope_section"] = _mrope(hidden // heads // 2)
    config = Glm4vConfig(
        text_config=_text(tokenizer, hidden, layers, heads, vocab_rows, rope_parameters=rope),
        vision_config=_merger_vision(vision_depth, hidden, image_size=image_size, temporal_patch_size=2),
        image_token_id=ids("<|image|>"),
        video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"),
        image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"),
        video_end_token_id=ids("<|end_of_video|>"),
        tie_word_embeddings=False,
    )
    pixels = image_size * image_size
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    processor = Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size, patch_size=14),
        tokenizer=tokenizer,
        video_processor=Glm4vVideoProcessor(),
        chat_template=GLM4V_CHAT_TEMPLATE,
    )
    return Glm4vForConditionalGeneration(config), processor


def _internvl(tokenizer, hidden, layers, heads, vision_depth, vocab_rows, image_size):
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    patch = 14
    # pixel shuffle (downsample_ratio 0.5) merges 2x2 patches: (image_size / 14)^2 / 4 tokens per tile
    tokens = (image_size // patch) ** 2 // 4
    config = InternVLConfig(
        text_config=_text(tokenizer, hidden, layers, heads, vocab_rows, model_type="qwen2"),
        vision_config=_vit_vision(vision_depth, [image_size, image_size], [patch, patch]),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=tokens,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    size = {"height": image_size, "width": image_size}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, max_patches=2),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=size),
        image_seq_length=tokens,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return InternVLForConditionalGeneration(config), processor


def _gemma3(tokenizer, hidden, layers, heads, vision_depth, vocab_rows, image_size):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    patch = 14
    ids = tokenizer.convert_tokens_to_ids
    head_dim = hidden // heads
    # sliding-window blocks with a global block every other layer (real: 5 local : 1 global)
    text = _text(
        tokenizer,
        hidden,
        layers,
        heads,
        vocab_rows,
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=64,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    )
    tokens = (image_size // patch // 2) ** 2  # the projector average-pools 2x2 patches
    config = Gemma3Config(
        text_config=text,
        vision_config=_vit_vision(vision_depth, image_size, patch, model_type="siglip_vision_model"),
        mm_tokens_per_image=tokens,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        tie_word_embeddings=False,
    )
    size = {"height": image_size, "width": image_size}
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size=size),
        tokenizer=tokenizer,
        image_seq_length=tokens,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    return Gemma3ForConditionalGeneration(config), processor


def _idefics3_like(family: str):
    """Idefics3 and SmolVLM (SmolVLM-Instruct is an Idefics3; SmolVLM2 is `smolvlm`): images split into tiles of
    image_size, each tile and a global image wrapped in `<fake_token_around_image>` with its row/col tag."""

    def build(tokenizer, hidden, layers, heads, vision_depth, vocab_rows, image_size):
        import transformers

        prefix = "Idefics3" if family == "idefics3" else "SmolVLM"
        config_class = getattr(transformers, f"{prefix}Config")
        model_class = getattr(transformers, f"{prefix}ForConditionalGeneration")
        patch = 14
        tokens = (image_size // patch) ** 2 // 4  # scale_factor 2: pixel shuffle merges 2x2 patches
        config = config_class(
            text_config=_text(tokenizer, hidden, layers, heads, vocab_rows, model_type="llama"),
            vision_config=_vit_vision(vision_depth, image_size, patch),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            scale_factor=2,
            tie_word_embeddings=False,
        )
        image_processor = getattr(transformers, f"{prefix}ImageProcessor")(
            size={"longest_edge": 2 * image_size},  # at most 2 x 2 tiles plus the global image
            max_image_size={"longest_edge": image_size},
            do_image_splitting=True,
        )
        extra = {}
        if family == "smolvlm":
            extra["video_processor"] = transformers.SmolVLMVideoProcessor()
        processor = getattr(transformers, f"{prefix}Processor")(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=tokens,
            chat_template=IDEFICS3_CHAT_TEMPLATE,
            **extra,
        )
        return model_class(config), processor

    return build


BUILDERS = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "qwen3_vl_moe": _qwen3_vl_moe,
    "qwen3_5": _qwen3_5,
    "qwen3_5_moe": _qwen3_5_moe,
    "glm4v": _glm4v,
    "llava_onevision": _llava_onevision,
    "internvl": _internvl,
    "gemma3": _gemma3,
    "idefics3": _idefics3_like("idefics3"),
    "smolvlm": _idefics3_like("smolvlm"),
}


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
