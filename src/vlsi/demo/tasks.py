"""The demo's vision-language task: handwritten digits and drawn shapes, asked about in three answer styles.

Every image is a 112 x 28 canvas: a row of four 28 x 28 slots, one Qwen2-VL image token each (patch 14, merge
2 x 2). A slot holds one handwritten digit (scikit-learn's bundled 8 x 8 digits, upscaled), up to four drawn
shapes (one per 14 x 14 patch), or nothing. Four tasks, in the spirit of the paper's fig. 3 (read, count, compare,
complete a sequence):

    digit     one handwritten digit in a random slot: which digit is it?
    count     1-9 drawn shapes: how many are there?
    compare   two different handwritten digits in the first and last slots: which is larger?
    sequence  three handwritten digits a, a+d, a+2d (d = +-1, 2, 3) in the first three slots: which comes next?

and three answer styles, as in the benchmarks: a short number, yes/no, or a multiple-choice letter; and a fourth,
`chain`, that gives the intermediate results before the answer ("3 5 7 so 9": the digits read, then "so" and the
next term; for counting, the shapes in each non-empty slot), a multi-token answer scored on the number after "so"
(and, whole, by `chain_exact`). `chain` is not among the default STYLES: the shipped teacher was not trained on it.

The held-out test split never shares an image with the other splits, by construction: its digits come from a
fixed 20 % of scikit-learn's 1797 digit images that the other splits never use, and drawn-shape layouts are
assigned to the test side or the training side by a hash of the layout. Every split is a pure function of its
name and size.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("digit", "count", "compare", "sequence")
STYLES = ("number", "yesno", "choice")  # the default: every style the shipped teacher was trained on
CHAIN = "chain"
ALL_STYLES = (*STYLES, CHAIN)
SPLITS = {"teacher": 1, "train": 2, "val": 3, "test": 4}  # split name -> generator seed
TEST_SPLIT = "test"
SLOT = 28  # one image token
SLOTS = 4
CELL = 14  # one patch: a drawn shape's cell
CANVAS = (SLOTS * SLOT, SLOT)  # width, height
CELLS = (CANVAS[0] // CELL, CANVAS[1] // CELL)  # columns, rows
TEST_FRACTION = 0.2
LETTERS = "ABCD"

ASK_NUMBER = "Answer with a single number."
ASK_YESNO = "Answer yes or no."
ASK_LETTER = "Answer with the option's letter."
ASK_CHAIN = "Give what you read, then so and the answer."
QUESTIONS = {
    ("digit", "number"): "Which digit is shown? " + ASK_NUMBER,
    ("digit", "yesno"): "Is the digit {q}? " + ASK_YESNO,
    ("digit", "choice"): "Which digit is shown? {options} " + ASK_LETTER,
    ("count", "number"): "How many shapes are there? " + ASK_NUMBER,
    ("count", "yesno"): "Are there {q} shapes? " + ASK_YESNO,
    ("count", "choice"): "How many shapes are there? {options} " + ASK_LETTER,
    ("compare", "number"): "What is the larger of the two digits? " + ASK_NUMBER,
    ("compare", "yesno"): "Is the left digit larger than the right digit? " + ASK_YESNO,
    ("compare", "choice"): "Which digit is larger? {options} " + ASK_LETTER,
    ("sequence", "number"): "The digits form a sequence. Which number comes next? " + ASK_NUMBER,
    ("sequence", "yesno"): "The digits form a sequence. Does {q} come next? " + ASK_YESNO,
    ("sequence", "choice"): "The digits form a sequence. Which number comes next? {options} " + ASK_LETTER,
    ("digit", CHAIN): "Which digit is shown? " + ASK_CHAIN,
    ("count", CHAIN): "How many shapes are there? " + ASK_CHAIN,
    ("compare", CHAIN): "What is the larger of the two digits? " + ASK_CHAIN,
    ("sequence", CHAIN): "The digits form a sequence. Which number comes next? " + ASK_CHAIN,
}
SIDES = ("left", "right")
SHAPES = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Item:
    """One question about one image. `digits` are (slot, index into scikit-learn's digits); `shapes` are
    (cell, kind, size, dx, dy), cells numbered row by row."""

    id: str
    task: str
    style: str
    question: str
    answer: str
    digits: tuple[tuple[int, int], ...] = ()
    shapes: tuple[tuple[int, str, int, int, int], ...] = ()

    def render(self) -> Image.Image:
        return render(self.digits, self.shapes)

    @property
    def pattern(self) -> str:
        """The cluster of items this one is answered with, for statistics that must not count near-copies as
        independent (`stats.cluster_bootstrap`): its task and what decides its answer. "compare 3-7" (the digit
        pair, left-right), "sequence 2+3" (the start and the step), "digit 5", "count 4"; not the style, the
        handwriting or the shape layout."""
        _, target = _digits()
        values = [int(target[index]) for _, index in self.digits]
        if self.task == "compare":
            return f"compare {values[0]}-{values[1]}"
        if self.task == "sequence":
            return f"sequence {values[0]}{values[1] - values[0]:+d}"
        if self.task == "count":
            return f"count {len(self.shapes)}"
        return f"digit {values[0]}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Item:
        digits, shapes = (tuple(tuple(x) for x in d.get(key, ())) for key in ("digits", "shapes"))
        return cls(**{**d, "digits": digits, "shapes": shapes})


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target.astype(int)


@lru_cache(maxsize=1)
def digit_pools() -> dict[str, dict[int, list[int]]]:
    """{"train" | "test": {digit value: [image indices]}}: a fixed, stratified 80/20 split of the 1797 images."""
    _, target = _digits()
    rng = np.random.default_rng(0)
    pools: dict[str, dict[int, list[int]]] = {"train": {}, "test": {}}
    for value in range(10):
        indices = rng.permutation(np.flatnonzero(target == value)).tolist()
        n_test = round(TEST_FRACTION * len(indices))
        pools["test"][value], pools["train"][value] = sorted(indices[:n_test]), sorted(indices[n_test:])
    return pools


def layout_side(shapes) -> str:
    """Which side of the split a drawn-shape layout belongs to: a fixed hash partition, about 20 % "test"."""
    key = hashlib.sha1(repr(sorted(shapes)).encode()).hexdigest()
    return TEST_SPLIT if int(key[:8], 16) % 5 == 0 else "train"


def render(digits=(), shapes=()) -> Image.Image:
    """The 112 x 28 RGB canvas: white handwritten digits (one per slot) and drawn shapes (one per cell) on black."""
    images, _ = _digits()
    canvas = Image.new("L", CANVAS, 0)
    for slot, index in digits:
        pixels = np.clip(images[index] * 16, 0, 255).astype(np.uint8)  # 8 x 8, values 0..16 -> 0..255
        canvas.paste(Image.fromarray(pixels).resize((SLOT, SLOT), Image.BILINEAR), (slot * SLOT, 0))
    draw = ImageDraw.Draw(canvas)
    for cell, kind, size, dx, dy in shapes:
        cx, cy = (cell % CELLS[0]) * CELL + CELL // 2 + dx, (cell // CELLS[0]) * CELL + CELL // 2 + dy
        box = (cx - size, cy - size, cx + size, cy + size)
        if kind == "circle":
            draw.ellipse(box, fill=255)
        elif kind == "square":
            draw.rectangle(box, fill=255)
        else:
            draw.polygon([(cx, cy - size), (cx - size, cy + size), (cx + size, cy + size)], fill=255)
    return canvas.convert("RGB")


def _options(rng: random.Random, correct: int, low: int, high: int) -> tuple[str, str]:
    """-> ("A. 3 B. 7 C. 1 D. 5", letter of `correct`): distinct values in [low, high], `correct` at a random letter."""
    values = [correct, *rng.sample([v for v in range(low, high + 1) if v != correct], len(LETTERS) - 1)]
    rng.shuffle(values)
    text = " ".join(f"{letter}. {value}" for letter, value in zip(LETTERS, values))
    return text, LETTERS[values.index(correct)]


def chain(steps, value: int) -> str:
    """The chain-style answer: the intermediate results, then "so" and the answer ("3 5 7 so 9")."""
    return " ".join(str(x) for x in steps) + f" so {value}"


def _ask(rng: random.Random, task: str, style: str, value: int, low: int, high: int, steps=()) -> tuple[str, str]:
    """(question, answer) asking for `value` in `style` (`steps`: the intermediate results a chain answer gives
    first); yes/no questions are true half of the time. Number and chain questions draw nothing from `rng`."""
    template = QUESTIONS[task, style]
    if style == "number":
        return template, str(value)
    if style == CHAIN:
        return template, chain(steps, value)
    if style == "yesno":
        q = value if rng.random() < 0.5 else rng.choice([v for v in range(low, high + 1) if v != value])
        return template.format(q=q), "yes" if q == value else "no"
    options, letter = _options(rng, value, low, high)
    return template.format(options=options), letter


def _pick(rng: random.Random, pool: dict[int, list[int]], value: int) -> int:
    return rng.choice(pool[value])


def _make(rng: random.Random, task: str, style: str, side: str, item_id: str) -> Item:
    pool = digit_pools()[side]
    if task == "digit":
        value = rng.randrange(10)
        question, answer = _ask(rng, task, style, value, 0, 9, steps=(value,))
        digits = ((rng.randrange(SLOTS), _pick(rng, pool, value)),)
        return Item(item_id, task, style, question, answer, digits=digits)
    if task == "count":
        while True:
            n = rng.randint(1, 9)
            shapes = tuple(
                sorted(
                    (cell, rng.choice(SHAPES), rng.randint(3, 5), rng.randint(-1, 1), rng.randint(-1, 1))
                    for cell in rng.sample(range(CELLS[0] * CELLS[1]), n)
                )
            )
            if layout_side(shapes) == side:
                break
        question, answer = _ask(rng, task, style, n, 1, 9, steps=slot_counts(shapes))
        return Item(item_id, task, style, question, answer, shapes=shapes)
    if task == "compare":
        left, right = rng.sample(range(10), 2)
        if style == "choice":
            question = QUESTIONS[task, style].format(options="A. left B. right")
            answer = "A" if left > right else "B"
        elif style == "yesno":
            question, answer = QUESTIONS[task, style], "yes" if left > right else "no"
        elif style == CHAIN:
            question, answer = QUESTIONS[task, style], chain((left, right), max(left, right))
        else:
            question, answer = QUESTIONS[task, style], str(max(left, right))
        digits = ((0, _pick(rng, pool, left)), (SLOTS - 1, _pick(rng, pool, right)))
        return Item(item_id, task, style, question, answer, digits=digits)
    # sequence: a, a+d, a+2d shown; a+3d asked; every term a digit
    d = rng.choice([-3, -2, -1, 1, 2, 3])
    a = rng.choice([a for a in range(10) if 0 <= a + 3 * d <= 9])
    terms = tuple((k, _pick(rng, pool, a + k * d)) for k in range(3))
    question, answer = _ask(rng, task, style, a + 3 * d, 0, 9, steps=(a, a + d, a + 2 * d))
    return Item(item_id, task, style, question, answer, digits=terms)


def slot_counts(shapes) -> list[int]:
    """Shapes per non-empty slot, left to right: a slot is two cell columns wide."""
    per_slot = [0] * SLOTS
    for cell, *_ in shapes:
        per_slot[(cell % CELLS[0]) * CELL // SLOT] += 1
    return [n for n in per_slot if n]


def possible_answers(tasks: tuple[str, ...], styles: tuple[str, ...]) -> list[str]:
    """Every answer a question of `tasks` x `styles` can have (chain counts: every split of 1-9 shapes into non-empty
    slots of at most 4), so that answer lengths follow from the task, not from the items drawn."""
    values = {"digit": range(10), "count": range(1, 10), "compare": range(1, 10), "sequence": range(10)}
    found: set[str] = set()
    for task in tasks:
        for style in styles:
            if style == "yesno":
                found |= {"yes", "no"}
            elif style == "choice":
                found |= set(LETTERS[:2] if task == "compare" else LETTERS)
            elif style == "number":
                found |= {str(v) for v in values[task]}
            elif task == "digit":
                found |= {chain((v,), v) for v in range(10)}
            elif task == "compare":
                found |= {chain((a, b), max(a, b)) for a in range(10) for b in range(10) if a != b}
            elif task == "sequence":
                found |= {
                    chain((a, a + d, a + 2 * d), a + 3 * d)
                    for d in (-3, -2, -1, 1, 2, 3)
                    for a in range(10)
                    if 0 <= a + 3 * d <= 9
                }
            else:
                found |= {chain(split, sum(split)) for split in _slot_splits(SLOTS) if 1 <= sum(split) <= 9}
    return sorted(found)


def _slot_splits(slots: int) -> list[tuple[int, ...]]:
    """Every tuple of 1-4 shapes per slot over at most `slots` non-empty slots (four cells a slot)."""
    if slots == 0:
        return [()]
    shorter = _slot_splits(slots - 1)
    return [()] + [(n, *rest) for n in range(1, 5) for rest in shorter]


def make_split(split: str, n: int, tasks: tuple[str, ...] = TASKS, styles: tuple[str, ...] = STYLES) -> list[Item]:
    """`n` items of `split` (a key of SPLITS), cycling through every (task, style) pair of `tasks` x `styles`;
    deterministic (a longer split extends a shorter one with the same tasks and styles)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    for name, chosen, known in (("task", tasks, TASKS), ("style", styles, ALL_STYLES)):
        if not chosen or set(chosen) - set(known):
            raise ValueError(f"unknown or no {name}s {list(chosen)}; expected some of {', '.join(known)}")
    rng = random.Random(SPLITS[split])
    side = TEST_SPLIT if split == TEST_SPLIT else "train"
    pairs = [(task, style) for task in tasks for style in styles]
    return [_make(rng, *pairs[k % len(pairs)], side, f"{split}-{k:05d}") for k in range(n)]


def write_split(items: list[Item], out: Path, name: str, answered: int | None = None) -> Path:
    """Images as PNG under out/images/ and out/NAME.json: LLaVA-format records (`vlsi train --data`) that also
    keep each item's task, style and answer. Only the first `answered` items (default: all) carry their answer as
    the assistant turn; the others are questions alone, for a teacher to answer (`data.answers=teacher`)."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for k, item in enumerate(items):
        path = images / f"{item.id}.png"
        if not path.is_file():
            item.render().save(path)
        turns = [{"from": "human", "value": "<image>\n" + item.question}]
        if answered is None or k < answered:
            turns.append({"from": "gpt", "value": item.answer})
        records.append({"id": item.id, "image": f"images/{path.name}", "conversations": turns, "item": item.to_dict()})
    target = out / f"{name}.json"
    target.write_text(json.dumps(records))
    return target


def read_split(path: Path) -> list[Item]:
    return [Item.from_dict(record["item"]) for record in json.loads(Path(path).read_text())]


def corpus(styles: tuple[str, ...] = STYLES) -> str:
    """Every word the task uses in `styles`, for training the shared tokenizer (`vlsi.models.tiny.build_tokenizer`).
    The default is the shipped tokenizer's: chain words are not in it."""
    words = ["user assistant system", *SIDES, "yes no", *LETTERS, *(["so"] if CHAIN in styles else [])]
    for (_task, style), template in QUESTIONS.items():
        if style not in styles:
            continue
        for q in range(10):
            options = " ".join(f"{letter}. {q}" for letter in LETTERS)
            words.append(template.format(q=q, options=options if style == "choice" else "A. left B. right"))
    words += [str(v) for v in range(10)]
    return " ".join(words)


_LETTER = re.compile(r"\b([A-D])\b")
_NUMBER = re.compile(r"-?\d+")
_CHAIN_ANSWER = re.compile(r"\bso\s*(-?\d+)")


def normalise(text: str, style: str) -> str:
    """The answer a free-text reply gives in `style`: a letter A-D, "yes"/"no", an integer, or for a chain the
    integer after "so"; "" if none."""
    text = text.strip()
    if style == CHAIN:
        match = _CHAIN_ANSWER.search(text)
        return str(int(match.group(1))) if match else ""
    if style == "choice":
        match = _LETTER.search(text)
        return match.group(1) if match else ""
    if style == "yesno":
        words = re.findall(r"[a-z]+", text.lower())
        found = [w for w in words if w in ("yes", "no")]
        return found[0] if found else ""
    match = _NUMBER.search(text)
    return str(int(match.group())) if match else ""


def is_correct(prediction: str, item: Item) -> bool:
    """Exact match after normalisation; an unreadable reply is wrong."""
    guess = normalise(prediction, item.style)
    return guess != "" and guess == normalise(item.answer, item.style)


def chain_exact(prediction: str, item: Item) -> bool:
    """A chain reply right as a whole: every intermediate result and the answer, spacing aside."""
    return prediction.split() == item.answer.split()


def chance_accuracy(items: list[Item]) -> float:
    """Expected accuracy of uniform guessing: 1/2 for yes/no, 1/4 per letter, 1/(values possible) per number."""
    per_style = {"yesno": 1 / 2, "choice": 1 / len(LETTERS)}
    total = 0.0
    for item in items:
        if item.style in ("number", CHAIN):  # a chain is scored on its answer alone
            total += 1 / (9 if item.task in ("count", "compare") else 10)
        elif item.task == "compare" and item.style == "choice":
            total += 1 / 2
        else:
            total += per_style[item.style]
    return total / max(1, len(items))
