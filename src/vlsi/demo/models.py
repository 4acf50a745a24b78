"""The demo's models, shipped in the package and made by scripts/train_demo_teacher.py: the teacher, its verbalizers,
and the student every method starts from.

All are tiny Qwen2-VL checkpoints sharing one tokenizer trained on the demo task's words; the processor keeps
the 112 x 28 canvas at its size (4 image tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .tasks import CANVAS, SLOT, corpus

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "demo"


@dataclass(frozen=True)
class ModelSet:
    """One shipped set of demo models sharing one tokenizer, as `scripts/train_demo_teacher.py --output FOLDER`
    writes it: the teacher, its verbalizers and the student initialisation pair only with each other."""

    folder: Path

    @property
    def teacher(self) -> Path:  # the Hugging Face checkpoint + processor
        return self.folder / "teacher"

    @property
    def verbalizers(self) -> Path:
        return self.folder / "teacher_verbalizers"

    @property
    def metrics(self) -> Path:  # the teacher's training and verbalizer losses, step by step
        return self.folder / "teacher_metrics.jsonl"

    @property
    def card(self) -> Path:  # how teacher and student were trained, and their accuracy
        return self.folder / "teacher.json"

    @property
    def student(self) -> Path:  # the student initialisation (pretrained on reading digits and counting)
        return self.folder / "student"


# The demo setting `teacher=NAME`: "" the shipped set (answer styles number, yesno, choice); "chain" the set trained
# on chains too (`--styles number yesno choice chain --n-train 16000 --output src/vlsi/assets/demo-chain`)
MODEL_SETS = {"": ModelSet(ASSETS), "chain": ModelSet(ASSETS.parent / "demo-chain")}
SHIPPED = MODEL_SETS[""]
# Shipped student initialisations of other shapes, by name (setting `student=NAME`), with the shipped set's
# tokenizer: folder and target layers.
# deep-thin: 8 blocks x 32, 2 heads, its layer terms on sparse blocks 1, 3, 5 (issue #26: as deep as and narrower
# than the teacher's 8 x 128), made by `python scripts/train_demo_student.py --output DIR --layers 8 --hidden 32
# --heads 2 --steps 2500` and copied here (its student.json: the command, sizes and validation accuracy; docs/DEMO.md)
STUDENTS = {"deep-thin": (ASSETS / "student_deep_thin", [1, 3, 5])}

VOCAB_SIZE = 512
# Qwen2-VL's chat template without the default system turn (13 tokens a sample that carry nothing here).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEACHER = dict(hidden=128, layers=8, heads=4, vision_depth=2)
STUDENT = dict(hidden=64, layers=4, heads=4, vision_depth=1)
TEACHER_TARGET_LAYERS = [1, 2, 3, 4, 5, 6]  # every block but the first and the last (covered by the last-layer loss)
STUDENT_TARGET_LAYERS = [0, 1, 2]


def build_model(out_dir: Path | None, size: dict, seed: int, tokenizer=None):
    """A randomly initialised demo model (`TEACHER` or `STUDENT` sizes); saved with its processor to `out_dir`."""
    from transformers import Qwen2VLImageProcessor

    from ..models.tiny import build_tiny_vlm, build_tokenizer

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(corpus=corpus(), vocab_size=VOCAB_SIZE)
    model, processor = build_tiny_vlm(None, seed=seed, tokenizer=tokenizer, image_size=SLOT, **size)
    pixels = CANVAS[0] * CANVAS[1]  # every demo image has this size: no resizing
    processor.image_processor = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels)
    processor.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


def student_folder(student: str, models: ModelSet = SHIPPED) -> Path:
    """The folder of the `student` setting: "" the student of `models`, a name of `STUDENTS`, else a folder."""
    if not student:
        return models.student
    return STUDENTS[student][0] if student in STUDENTS else Path(student)


def model_size(folder: Path) -> dict:
    """`TEACHER` / `STUDENT`-style sizes of a demo checkpoint, read from its config.json."""
    config = json.loads((Path(folder) / "config.json").read_text())
    text = config["text_config"]
    return dict(
        hidden=text["hidden_size"],
        layers=text["num_hidden_layers"],
        heads=text["num_attention_heads"],
        vision_depth=config["vision_config"]["depth"],
    )


def teacher_card(models: ModelSet = SHIPPED) -> dict:
    """The record of a set's teacher: sizes, training command and steps, seed, accuracy per split."""
    if not models.card.is_file():
        if models is not SHIPPED:
            raise FileNotFoundError(
                f"{models.card} is missing: train this set with `python scripts/train_demo_teacher.py --output "
                f"{models.folder}` and the styles it names (models.py: MODEL_SETS)"
            )
        raise FileNotFoundError(
            f"{models.card} is missing: the demo teacher ships inside the package; reinstall vlsi, or train it "
            "with `python scripts/train_demo_teacher.py`"
        )
    return json.loads(models.card.read_text())
