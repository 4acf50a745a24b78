"""A small, real, offline setting to try `vlsi train` on: handwritten digits and two tiny Qwen2-VL checkpoints.

    python -m vlsi.toy OUT    # writes OUT/teacher, OUT/student, OUT/train.json, OUT/images/

The images are scikit-learn's bundled handwritten digits (8x8, upscaled); the models are random-weight
Qwen2-VL checkpoints sharing one tokenizer (the teacher deeper and wider, its LM head padded like 7B's).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .models.tiny import build_tiny_vlm, build_tokenizer

QUESTIONS = [
    ("Which digit is this?", "{d}"),
    ("Is this the digit {q}? Answer yes or no.", "{yn}"),
    ("What is shown in the image? Answer with a single word or number.", "{d}"),
]


def write_digits_dataset(out: Path, n: int = 64, seed: int = 0, size: int = 56) -> Path:
    """LLaVA-format JSON of `n` questions about scikit-learn digit images saved as PNG under out/images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(n):
        i = rng.randrange(len(digits.images))
        d = int(digits.target[i])
        pixels = (digits.images[i] / 16.0 * 255).astype(np.uint8)
        name = f"digit_{k:05d}.png"
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).convert("RGB").save(images / name)
        question, answer = QUESTIONS[k % len(QUESTIONS)]
        q = d if rng.random() < 0.5 else rng.randrange(10)
        records.append(
            {
                "id": f"digit-{k}",
                "image": f"images/{name}",
                "conversations": [
                    {"from": "human", "value": "<image>\n" + question.format(q=q)},
                    {"from": "gpt", "value": answer.format(d=d, yn="yes" if q == d else "no")},
                ],
            }
        )
    path = out / "train.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_tiny_pair(out: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny teacher (6 layers, hidden 96, head padded by 64 rows) and student (4 layers, hidden 64)."""
    tokenizer = build_tokenizer("qwen2_vl")
    teacher, student = out / "teacher", out / "student"
    build_tiny_vlm(teacher, hidden=96, layers=6, heads=4, vocab_pad=64, seed=seed, tokenizer=tokenizer)
    build_tiny_vlm(student, hidden=64, layers=4, heads=4, seed=seed + 1, tokenizer=tokenizer)
    return teacher, student


def write_toy(out: Path, n: int = 64) -> tuple[Path, Path, Path]:
    """The whole toy setting under `out`: the tiny pair and `n` digit questions; (teacher, student, data)."""
    teacher, student = write_tiny_pair(out)
    return teacher, student, write_digits_dataset(out, n)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    teacher, student, data = write_toy(Path(argv[0]))
    print(f"teacher: {teacher}\nstudent: {student}\ndata:    {data}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
