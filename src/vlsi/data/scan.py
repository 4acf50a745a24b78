"""Token counts of samples as `encode` gives them, without loading an image or running the image processor.

`encode` tokenizes the chat-template text and lets the processor expand each image placeholder token. A sample's
response tokens are the text tokens inside assistant turns; texts are rendered and tokenized in batches. Its length
is counted in the cheapest of these ways that matches `encode` on probe samples (blank images of several sizes, and
one two-image sample), probed once per processor:

- rule: the expansion is a run of N tokens (possibly between fixed start / end tokens) that merges with nothing, so
  a sample has len(text tokens) + sum(N_i - 1) tokens, N_i from the processor's own size rule
  (`processor._get_num_multimodal_tokens`). Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4.1V, LLaVA-OneVision.
- expand: the expansion is text whose edges merge with the neighbouring text's tokens (Gemma 3's two newlines
  either side of `<start_of_image>...<end_of_image>`) or that holds more than N tokens (Idefics3 / SmolVLM tiles:
  row / column markers, a newline after each row, a global image; InternVL's `<img>` and `</img>` around the run),
  so each placeholder in the text is replaced by its expansion and the expanded text is tokenized. The expansion
  comes from the processor's own text path (`return_text_replacement_offsets`) run once on blank images, memoised by
  what the processor's rules say fixes it (token and tile counts, tile grid: `layouts`), else by the sizes
  themselves. Gemma 3, Idefics3, SmolVLM, InternVL.
- blank: N per image from the processor run on blank images of the sample's sizes (memoised), for expansions that
  are runs of one token the rule miscounts (LLaVA-OneVision's two-image samples).
- full: `encode` on every sample, where nothing else matches.

A sample `encode` would refuse (a special token's string in its text, a chat template that raises on it, an image
outside the processor's size or aspect-ratio limits) gets the reason instead of its counts (`checked`)."""

from __future__ import annotations

import logging
import tempfile
from bisect import bisect_left, bisect_right
from pathlib import Path

from jinja2.exceptions import TemplateError
from PIL import Image
from transformers.utils.chat_template_utils import _compile_jinja_template

from vlsi.data.encode import (
    IGNORE_INDEX,
    _assistant_spans,
    encode,
    refusal,
    special_pattern,
    special_reason,
    special_strings,
)
from vlsi.data.images import image_header
from vlsi.data.records import Sample, is_labelled

log = logging.getLogger("vlsi")
# (width, height) of the probe images: square, wide, tall, odd and large, so that rounding and resizing rules show
PROBE_SIZES = [(56, 56), (80, 40), (30, 90), (333, 127), (640, 480), (37, 1000)]
# what counting a sample raises when the sample, not the processor, is at fault: Unencodable (a ValueError) from
# `encode`'s checks, the template's TemplateError, the size rule's ValueError, an image that does not open
REFUSALS = (ValueError, TemplateError, OSError)


class TokenCounter:
    """`counter(samples)` -> [[tokens, response tokens]] per sample, equal to `encode(sample, processor)`'s
    (input_ids length, number of labelled tokens). `mode`: how image tokens are counted (rule, expand, blank, full);
    `by_size`: expansions memoised per image sizes, not per layout. `special_tokens`: data.special_tokens, as for
    `encode`."""

    def __init__(self, processor, special_tokens: str = "refuse"):
        self.processor, self.special_tokens = processor, special_tokens
        self.special = special_pattern(processor)
        self.media = {getattr(processor, n, None) for n in ("image_token_id", "video_token_id")} - {None}
        self.memo: dict[tuple, list[int]] = {}
        self.expansions_memo: dict[tuple, list[str]] = {}
        self.mode, self.multi_rule, self.by_size, self.direct = "full", False, False, True
        backend = getattr(processor.tokenizer, "backend_tokenizer", None)
        plain = backend is not None and backend.truncation is None and backend.padding is None
        self.backend = backend if plain else None
        if self.media:
            self.mode = "rule" if hasattr(processor, "_get_num_multimodal_tokens") else "blank"
            self._probe()
        if self.mode != "rule":
            log.info("%s: image tokens counted by %s", type(processor).__name__, self.describe())

    def describe(self) -> str:
        return {
            "rule": "the processor's size rule",
            "expand": f"the processor's expansion of each image, per {'size' if self.by_size else 'layout'}",
            "blank": "the processor on blank images of the same sizes (no rule matched it)",
            "full": "the full processor on the real images (its images do not expand into runs of one token)",
        }[self.mode]

    def __call__(self, samples: list[Sample]) -> list[list[int]]:
        if self.mode == "full":
            return [_full(sample, self.processor) for sample in samples]
        texts = self.render([s.messages for s in samples], False)
        spans = self.assistant_spans(samples, texts)
        tokens = self.tokenize(texts)
        lengths = self.lengths(texts, tokens, [sample_sizes(s) for s in samples])
        return [
            [length, _in_spans(ids, offsets, turns, self.media)]
            for length, (ids, offsets), turns in zip(lengths, tokens, spans, strict=True)
        ]

    def checked(self, samples: list[Sample]) -> list[list[int] | str]:
        """Per sample, [tokens, response tokens] as `self(samples)` gives them, or the one-line reason `encode`
        refuses it. Samples holding special tokens' strings are refused (data.special_tokens=refuse) or counted by
        `encode` itself (text: they are few); when counting the rest together fails, each is counted alone."""
        out: list[list[int] | str | None] = [None] * len(samples)
        plain = []
        for i, sample in enumerate(samples):
            found = special_strings(sample, self.special)
            if found and self.special_tokens == "refuse":
                out[i] = special_reason(found)
            elif found:
                out[i] = self._alone(sample, full=True)
            else:
                plain.append(i)
        try:
            counts = self([samples[i] for i in plain])
        except REFUSALS:
            counts = [self._alone(samples[i]) for i in plain]
        for i, count in zip(plain, counts, strict=True):
            out[i] = count
        return out

    def _alone(self, sample: Sample, full: bool = False) -> list[int] | str:
        try:
            return _full(sample, self.processor, self.special_tokens) if full else self([sample])[0]
        except REFUSALS as error:
            return refusal(error)

    def lengths(self, texts: list[str], tokens: list[tuple], sizes: list[list[tuple[int, int]]]) -> list[int]:
        """Tokens per sample once the processor has expanded its images: the text's tokens plus N - 1 per image, or
        (expand) the tokens of the text with each image placeholder replaced by its expansion, tokenized in a batch."""
        if self.mode != "expand":
            images = self.image_tokens(sizes)
            return [len(ids) + sum(n) - len(n) for (ids, _), n in zip(tokens, images, strict=True)]
        lengths = [len(ids) for ids, _ in tokens]
        with_images = [i for i, s in enumerate(sizes) if s]
        if with_images:
            placeholder = self.processor.image_token
            expansions = self.expansions([sizes[i] for i in with_images])
            expanded = [_expand(texts[i], placeholder, e) for i, e in zip(with_images, expansions, strict=True)]
            for i, (ids, _) in zip(with_images, self.tokenize(expanded), strict=True):
                lengths[i] = len(ids)
        return lengths

    def tokenize(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character offsets) of each text, as `processor.tokenizer(text, add_special_tokens=False)` gives them:
        in one batch call of the Rust tokenizer when it has one (checked equal on the probe texts)."""
        if self.backend is not None:
            return [(e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        return _tokenize(self.processor, texts)

    def render(self, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
        """`processor.apply_chat_template(c, tokenize=False)` of many conversations, rendered by the compiled template
        directly (checked equal on the probe conversations; else through the processor's method)."""
        if not conversations:
            return []
        if self.direct:
            template = _compile_jinja_template(self.processor._resolve_chat_template(None))
            special = self.processor.tokenizer.special_tokens_map
            options = dict(tools=None, documents=None, add_generation_prompt=generation_prompt, **special)
            return [template.render(messages=c, **options) for c in conversations]
        return [
            self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=generation_prompt)
            for c in conversations
        ]

    def assistant_spans(self, samples: list[Sample], texts: list[str]) -> list[list[tuple[int, int]]]:
        """`encode._assistant_spans` of every sample, its renders batched; a sample whose template rewrites earlier
        turns goes to `_assistant_spans` itself, which names it."""
        turns = [(i, k) for i, s in enumerate(samples) for k, m in enumerate(s.messages) if is_labelled(m)]
        prefixes = self.render([samples[i].messages[:k] for i, k in turns], True)
        inner = [(i, k) for i, k in turns if k + 1 < len(samples[i].messages)]  # the last turn's render is the text
        rendered = dict(zip(inner, self.render([samples[i].messages[: k + 1] for i, k in inner], False), strict=True))
        with_turns = [rendered.get((i, k), texts[i]).rstrip() for i, k in turns]
        spans: list[list[tuple[int, int]]] = [[] for _ in samples]
        for (i, _), prefix, with_turn in zip(turns, prefixes, with_turns, strict=True):
            if not (with_turn.startswith(prefix) and texts[i].startswith(with_turn)):
                _assistant_spans(samples[i], self.processor, texts[i])  # raises, naming the sample
            spans[i].append((len(prefix), len(with_turn)))
        return spans

    def image_tokens(self, sizes: list[list[tuple[int, int]]]) -> list[list[int]]:
        """N per image of each sample, from (width, height) per image; the rule is asked once for all."""
        by_rule = [i for i, s in enumerate(sizes) if s and self.mode == "rule" and (len(s) == 1 or self.multi_rule)]
        flat = rule_tokens(self.processor, [size for i in by_rule for size in sizes[i]]) if by_rule else []
        out, start = [[] for _ in sizes], 0
        for i in by_rule:
            out[i], start = flat[start : start + len(sizes[i])], start + len(sizes[i])
        rule = set(by_rule)
        for i, s in enumerate(sizes):
            if s and i not in rule:
                key = tuple(s)
                if key not in self.memo:
                    self.memo[key] = blank_tokens(self.processor, s, self.media)
                out[i] = self.memo[key]
        return out

    def expansions(self, sizes: list[list[tuple[int, int]]]) -> list[list[str]]:
        """The text each image placeholder becomes, per sample with images: from the processor run on blank images of
        the sample's sizes, memoised by its images' layouts (their sizes with `by_size`). Per sample, not per image:
        a processor may expand an image differently beside others (LLaVA-OneVision)."""
        flat = [size for s in sizes for size in s]
        keys = flat if self.by_size else layouts(self.processor, flat)
        out, start = [], 0
        for s in sizes:
            key, start = tuple(keys[start : start + len(s)]), start + len(s)
            if key not in self.expansions_memo:
                self.expansions_memo[key] = blank_expansions(self.processor, s)
            out.append(self.expansions_memo[key])
        return out

    def _probe(self) -> None:
        """Keep the cheapest way of counting image tokens that matches `encode` on probe samples."""
        with tempfile.TemporaryDirectory() as folder:
            probes = []
            for k, sizes in enumerate([[size] for size in PROBE_SIZES] + [PROBE_SIZES[1:3]]):
                paths = [Path(folder) / f"{k}-{i}.png" for i in range(len(sizes))]
                for path, size in zip(paths, sizes, strict=True):
                    Image.new("RGB", size, (127, 127, 127)).save(path)
                probes.append(_probe_sample(paths, sizes))
            expected = [_full(sample, self.processor) for sample in probes]
        conversations = [p.messages[:k] for p in probes for k in range(1, len(p.messages) + 1)]
        for prompt in (False, True):
            try:
                self.direct = self.direct and self.render(conversations, prompt) == [
                    self.processor.apply_chat_template(c, tokenize=False, add_generation_prompt=prompt)
                    for c in conversations
                ]
            except Exception:  # noqa: BLE001 -- a template the direct render cannot take: the processor's method
                self.direct = False
        texts = self.render(conversations, False)
        if self.backend is not None:
            self.backend = self.backend if self.tokenize(texts) == _tokenize(self.processor, texts) else None
        if self.mode == "rule":
            self.multi_rule = True
            self.multi_rule = self._matches(probes[-1:], expected[-1:])
            if self._matches(probes[:-1], expected[:-1]):
                return
        for self.mode, self.by_size in (("expand", False), ("blank", False), ("expand", True)):
            self.expansions_memo.clear()  # expansions memoised under a key that failed must not serve the next
            if self._matches(probes, expected):
                return
        self.mode = "full"

    def _matches(self, samples: list[Sample], expected: list[list[int]]) -> bool:
        try:
            return self(samples) == expected
        except Exception:  # noqa: BLE001 -- a rule that cannot be applied does not match
            return False


def _tokenize(processor, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    tokens = processor.tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
    return [(ids, [tuple(o) for o in offsets]) for ids, offsets in zip(tokens["input_ids"], tokens["offset_mapping"])]


def _in_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]], media: set[int]) -> int:
    """How many tokens, image tokens aside, overlap a [a, b) character span (`encode`'s labelled tokens). Token
    offsets run forward through the text, so those overlapping [a, b) are a contiguous run, found by bisection."""
    starts, ends = [start for start, _ in offsets], [end for _, end in offsets]
    count = 0
    for a, b in spans:
        lo, hi = bisect_right(ends, a), bisect_left(starts, b)  # first token ending after a, first starting at b
        run = ids[lo:hi]
        count += len(run) - (0 if media.isdisjoint(run) else sum(token in media for token in run))
    return count


def rule_tokens(processor, sizes: list[tuple[int, int]]) -> list[int]:
    """N per image from the processor's own size rule (it takes (height, width))."""
    data = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])
    return [int(n) for n in data.num_image_tokens]


def layouts(processor, sizes: list[tuple[int, int]]) -> list[tuple]:
    """Per (width, height), what the processor's rules say fixes its expansion: its image-token and tile counts
    (`_get_num_multimodal_tokens`) and, where the image processor gives one, its tile grid (Idefics3 / SmolVLM put
    as many tokens in 2 x 1 tiles as in 1 x 2, with other row markers). The probe checks that they fix it."""
    data = processor._get_num_multimodal_tokens(image_sizes=[(h, w) for w, h in sizes])
    tiles = data.num_image_patches or [None] * len(sizes)
    grid = getattr(processor.image_processor, "get_number_of_image_patches", None)
    options = processor._merge_kwargs()["images_kwargs"] if grid else None
    grids = [grid(h, w, options) if grid else None for w, h in sizes]
    return list(zip(data.num_image_tokens, tiles, grids, strict=True))


def blank_expansions(processor, sizes: list[tuple[int, int]]) -> list[str]:
    """The text the processor's own text path puts for each image placeholder, run on blank images of `sizes`."""
    images = [Image.new("RGB", size) for size in sizes]
    out = processor(text=[processor.image_token * len(sizes)], images=[images], return_text_replacement_offsets=True)
    return [offset["replacement"] for offset in out["text_replacement_offsets"][0]]


def _expand(text: str, placeholder: str, expansions: list[str]) -> str:
    """`text` with its i-th `placeholder` replaced by expansions[i], as the processor's text path replaces them."""
    parts = text.split(placeholder)
    return "".join(part + expansion for part, expansion in zip(parts, [*expansions, ""], strict=True))


def blank_tokens(processor, sizes: list[tuple[int, int]], media: set[int]) -> list[int]:
    """N per image from the processor run on blank images of `sizes`: the lengths of the image-token runs."""
    content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": "x"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    images = [Image.new("RGB", size) for size in sizes]
    ids = processor(text=[text], images=[images], return_tensors="pt")["input_ids"][0].tolist()
    runs, previous = [], None
    for token in ids:
        if token in media:
            if token == previous:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = token
    if len(runs) != len(sizes):
        raise ValueError(f"{type(processor).__name__}: {len(runs)} image-token runs for {len(sizes)} images")
    return runs


def sample_sizes(sample: Sample) -> list[tuple[int, int]]:
    """(width, height) of each image: from the check when it read them, else from the headers."""
    if sample.sizes is not None:
        return sample.sizes
    return [image_header(source) for source in sample.images]


def _full(sample: Sample, processor, special_tokens: str = "refuse") -> list[int]:
    labels = encode(sample, processor, special_tokens=special_tokens)["labels"]  # [1, T]
    return [labels.shape[1], int((labels != IGNORE_INDEX).sum())]


def _probe_sample(paths: list[Path], sizes: list[tuple[int, int]]) -> Sample:
    images = [{"type": "image"} for _ in paths]
    messages = [
        {"role": "user", "content": [*images, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat"}]},
    ]
    return Sample("probe", messages, paths, sizes)
