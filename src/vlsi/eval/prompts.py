"""The message VLMEvalKit sends a model for a benchmark row, and the decoding options its wrapper for the model's
family passes to `generate` (VLMEvalKit at commit e8e78f0; docs/EVALUATION.md, "Identical to VLMEvalKit").

Two prompt builders: `dataset`, the benchmark's own `build_prompt` (vlmeval/dataset/image_mcq.py, image_yorn.py,
image_vqa.py, image_base.py), which VLMEvalKit uses for every model without a builder of its own; and `qwen2_vl`,
`Qwen2VLPromptMixin` (vlmeval/vlm/qwen2_vl/prompt.py), which Qwen2-VL's wrapper uses where its `use_custom_prompt`
says so (Qwen2.5-VL's config turns it off). Rows come typed as pandas types them (`cells.read_like_pandas`): an option
`4` in a column with blanks prints `4.0`, a cell `None` / `NA` / `N/A` is missing, and nothing is stripped.
"""

from __future__ import annotations

import re
import string

from .cells import is_na

DATASET, QWEN2_VL = "dataset", "qwen2_vl"
PROMPT_BUILDERS = (DATASET, QWEN2_VL)

# Benchmark -> the kind of VLMEvalKit dataset class that builds its prompt. MM-Vet v2 and LLaVA-Wilder are not
# VLMEvalKit datasets: they follow MMVet and LLaVABench; the combined CV-Bench follows CVBench.
KIND = {
    **dict.fromkeys(("ai2d", "blink", "mmbench_cn", "mmbench_en", "mmstar", "q_bench", "seed_2_plus"), "mcq"),
    "mmmu": "mmmu",
    **dict.fromkeys(("cv_bench", "cv_bench_2d", "cv_bench_3d"), "cv_bench"),
    **dict.fromkeys(("hallusionbench", "mme", "pope"), "yes_no"),
    "chartqa": "vqa",
    **dict.fromkeys(("llava_wilder", "mathvista", "mm_vet", "mm_vet_v2"), "question"),
}
# Qwen2VLPromptMixin.use_custom_prompt: every MCQ dataset, HallusionBench and POPE among the yes/no ones (MME keeps
# its own prompt), every VQA dataset but MMVet.
_QWEN2_VL_OWN = frozenset(
    name
    for name, kind in KIND.items()
    if kind in ("mcq", "mmmu", "cv_bench") or name in ("hallusionbench", "pope")
    or kind in ("vqa", "question") and name not in ("mm_vet", "mm_vet_v2")
)  # fmt: skip

SELECT = "Please select the correct answer from the options above."
SELECT_CN = "请直接回答选项字母。"
SHORT = "Answer the question using a single word or phrase."
SHORT_QWEN2_VL = "Please try to answer the question with short words or phrases if possible."
YES_NO = "Please answer yes or no."
_CJK = re.compile("[\u4e00-\u9fff]")
_MMMU_IMAGE = "<image "


class PromptError(ValueError):
    """A row VLMEvalKit's builder cannot turn into a prompt (it would stop on an assertion)."""


def prompt_builder(model_type: str) -> str:
    """The builder VLMEvalKit uses for a model of this `model_type` (config.json)."""
    return QWEN2_VL if model_type == "qwen2_vl" else DATASET


def builder_used(benchmark: str, builder: str) -> str:
    """The builder that really builds `benchmark`'s prompt: Qwen2-VL's only where its wrapper takes over."""
    return QWEN2_VL if builder == QWEN2_VL and benchmark in _QWEN2_VL_OWN else DATASET


def build_message(benchmark: str, row: dict, images: list, builder: str = DATASET) -> tuple[list[dict], list]:
    """(content, images in the order of the content's image items) for a row typed as pandas types it.

    `images` are the row's images as VLMEvalKit resolves them; the content is a chat message's content list,
    [{"type": "image"}, ..., {"type": "text", "text": ...}]. Raises PromptError for an MMMU `<image N>` tag that
    names no image."""
    kind = KIND[benchmark]
    own = builder_used(benchmark, builder) == QWEN2_VL
    question = row["question"]
    if kind == "mmmu" and not own:
        return _split_mmmu(_options_prompt(row, SELECT + " \n"), images)
    if kind in ("mcq", "mmmu") or (kind == "cv_bench" and own):
        if own:
            text = _options_prompt(row, SELECT if kind == "mmmu" else None).rstrip()
        else:
            text = _options_prompt(row, SELECT + " \n")
    elif kind == "cv_bench":
        text = f"{row['prompt']}"
    elif kind == "yes_no":
        text = f"{question} {YES_NO}" if own else f"{question}"
    elif kind == "vqa" or own:
        text = f"{question}\n{SHORT_QWEN2_VL if own else SHORT}"
    else:
        text = f"{question}"
    return [*({"type": "image"} for _ in images), {"type": "text", "text": text}], list(images)


def _options_prompt(row: dict, select: str | None) -> str:
    """ "Hint: ...\\nQuestion: ...\\nOptions:\\nA. ...\\n" + the request to select; `select` None: Qwen2-VL's MCQ
    request, in Chinese when the prompt so far has a Chinese character."""
    options = {c: row[c] for c in string.ascii_uppercase if c in row and not _missing(row[c])}
    hint = row.get("hint")
    prompt = "" if _missing(hint) else f"Hint: {hint}\n"
    prompt += f"Question: {row['question']}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
        prompt += select if select is not None else SELECT_CN if _CJK.search(prompt) else SELECT
    return prompt


def _missing(value) -> bool:
    return value is None or is_na(value)


def _split_mmmu(text: str, images: list) -> tuple[list[dict], list]:
    """MMMUDataset.split_MMMU: the text cut at each `<image N>` (N one digit), image N put in its place; without a
    tag, all images before the text."""
    pieces = text.split(_MMMU_IMAGE)
    if len(pieces) == 1:
        return [*({"type": "image"} for _ in images), {"type": "text", "text": text}], list(images)
    content, ordered = [{"type": "text", "text": pieces[0]}], []
    for piece in pieces[1:]:
        if len(piece) < 2 or not piece[0].isdigit() or piece[1] != ">" or not 1 <= int(piece[0]) <= len(images):
            raise PromptError(
                f"the question's tag {_MMMU_IMAGE}{piece[:2]} names none of its {len(images)} images "
                "(VLMEvalKit reads <image 1> to <image 9>)"
            )
        ordered.append(images[int(piece[0]) - 1])
        content += [{"type": "image"}, {"type": "text", "text": piece[2:]}]
    return content, ordered


# ---------------------------------------------------------------- decoding

# model_type -> (VLMEvalKit's wrapper, max_new_tokens, the other generation options it passes). Sampling options
# are not listed: Qwen2VLChat samples with top_k=1 (the most likely token: greedy), the others decode greedily.
WRAPPERS = {
    "qwen2_vl": ("Qwen2VLChat (vlmeval/vlm/qwen2_vl/model.py)", 2048, {"repetition_penalty": 1.0}),
    "qwen2_5_vl": ("Qwen2VLChat (vlmeval/vlm/qwen2_vl/model.py)", 2048, {"repetition_penalty": 1.0}),
    "llava_onevision": ("LLaVA_OneVision_HF (vlmeval/vlm/llava/llava.py)", 2048, {}),
    "gemma3": ("Gemma3 (vlmeval/vlm/gemma.py)", 4096, {}),
    "idefics3": ("SmolVLM (vlmeval/vlm/smolvlm.py)", 2048, {}),
    "internvl": ("InternVLChat (vlmeval/vlm/internvl/internvl_chat.py)", 4096, {}),
}
# Any other family (none of VLMEvalKit, or one whose wrapper samples, as Qwen3-VL's does with top_k=20): neutral
# greedy options and Qwen2VLChat's length limit.
NO_WRAPPER = ("none reproduced: neutral greedy options", 2048, {})


def wrapper(model_type: str) -> tuple[str, int, dict]:
    """(VLMEvalKit's wrapper for the family, its max_new_tokens, its other generation options)."""
    return WRAPPERS.get(model_type, NO_WRAPPER)
