"""DIR/report.md for `vlsi demo`: the comparison table, budget, plots and one test example read layer by layer.

Every number in the report is formatted from results.json (`write_report`), so the two always agree.
"""

from __future__ import annotations

import math
from pathlib import Path

from .models import STUDENT, STUDENT_DIR, TEACHER, TEACHER_DIR, TEACHER_VERBALIZERS
from .tasks import STYLES, TASKS, Item, is_correct

ROWS = (
    ("teacher", "teacher (shipped)"),
    ("student_sft", "student, (a) SFT only"),
    ("student_kd", "student, (b) final-layer KD, then SFT"),
    ("student_vlsi", "student, (c) VLsI: verbalize, interact, SFT"),
)
BY = {"teacher": "teacher", "student_sft": "sft", "student_kd": "kd", "student_vlsi": "vlsi"}
STYLE_NAMES = {"number": "number", "yesno": "yes/no", "choice": "letter"}


def _split_name(r: dict) -> str:
    if r["settings"].get("eval_split", "test") == "test":
        return "Held-out test split"
    return "Validation split (settings being chosen: not the final numbers)"


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _size(size: dict) -> str:
    return f"{size['layers']} layers x {size['hidden']}, vision depth {size['vision_depth']}"


def difference_se(a: float, b: float, n: int) -> float:
    """Standard error of the difference of two accuracies on the same n questions, treated as independent
    (an upper bound: paired answers on the same questions correlate, which only shrinks it)."""
    return math.sqrt((a * (1 - a) + b * (1 - b)) / max(1, n))


def verdict(r: dict) -> str:
    """One paragraph saying what happened, from the numbers alone."""
    n = r["n_test"]
    v, kd, sft = r["student_vlsi"], r["student_kd"], r["student_sft"]
    lines = []
    for name, other in (("SFT only", sft), ("final-layer KD", kd)):
        diff = v - other
        se = difference_se(v, other, n)
        size = "within noise" if abs(diff) <= 2 * se else ("better" if diff > 0 else "worse")
        lines.append(
            f"{pct(abs(diff))} points {'above' if diff >= 0 else 'below'} {name} ({size}; 2 SE = {pct(2 * se)})"
        )
    gap = r["teacher"] - sft
    text = f"VLsI is {lines[0]} and {lines[1]}."
    if gap > 0:
        text += (
            f" The teacher is {pct(gap)} points above SFT only; the share of that gap closed by VLsI is "
            f"{100 * (v - sft) / gap:.0f} %, by KD {100 * (kd - sft) / gap:.0f} % (negative: below SFT only)."
        )
    if len(r["seeds"]) == 1:
        text += " One seed: differences of a few points can come from the seed alone."
    return text


def _table(r: dict) -> list[str]:
    head = ["model", "accuracy", *TASKS, *(STYLE_NAMES[s] for s in STYLES), "training wall time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in ROWS:
        name = BY[key]
        tasks = [pct(r["by_task"][name].get(t, 0.0)) for t in TASKS]
        styles = [pct(r["by_style"][name].get(s, 0.0)) for s in STYLES]
        wall = "shipped" if name == "teacher" else f"{r['train_seconds'][name]:.0f} s"
        lines.append("| " + " | ".join([label, f"**{pct(r[key])}**", *tasks, *styles, wall]) + " |")
    return lines


def _budget(r: dict) -> list[str]:
    b = r["budget"]
    return [
        f"Every student starts from the same checkpoint and trains {b['examples_per_student']} examples: "
        f"{r['settings']['steps']} optimizer steps of batch {b['batch_size']}, split by method:",
        "",
        "| method | stage 1 | stage 2 | stage 3 | total steps |",
        "|---|---|---|---|---|",
        f"| (a) SFT only | | | SFT {b['sft']['sft']} | {sum(b['sft'].values())} |",
        f"| (b) final-layer KD | | KL to the teacher's output {b['kd']['kd']} | SFT {b['kd']['sft']} "
        f"| {sum(b['kd'].values())} |",
        f"| (c) VLsI | verbalize {b['vlsi']['verbalize']} | interact {b['vlsi']['interact']} | SFT {b['vlsi']['sft']} "
        f"| {sum(b['vlsi'].values())} |",
        "",
        "- VLsI's stage 1 (training the student's verb-FFNs on a frozen backbone) is charged as full steps, although "
        "it updates no student weight: a handicap for VLsI, not a head start.",
        "- KD's distillation stage is exactly as long as VLsI's stages 1 + 2, and both then get the same SFT.",
        "- The teacher's verbalizers were trained once with the teacher (`scripts/train_demo_teacher.py`) and ship "
        "with it, as a teacher's verbalizers are reused across students (DESIGN §5); they are not charged to VLsI.",
        "- Teacher forward passes (KD, VLsI) are not charged: the budget counts the student's training examples. "
        "The wall times in the table show what they cost.",
        "- Same optimizer (AdamW, cosine schedule), learning rate, batch, data order seed, full fine-tuning of the "
        "language model, frozen vision tower and LM head, for all three.",
    ]


def _example(example: dict | None) -> list[str]:
    if not example:
        return ["(no example: per-layer decoding was not available)"]
    item = example["item"]
    lines = [
        f"![test example]({example['image']})",
        "",
        f"Question: *{item['question']}*  Expected answer: **{item['answer']}**",
        "",
        "Final answers: "
        + ", ".join(f"{label} `{example['replies'][key] or '(empty)'}`" for key, label in ROWS_SHORT)
        + ".",
        "",
    ]
    if example.get("table"):
        lines += [example["note"], "", "```", example["table"], "```"]
    else:
        lines.append(example["note"])
    return lines


ROWS_SHORT = (("teacher", "teacher"), ("sft", "SFT only"), ("kd", "KD"), ("vlsi", "VLsI"))


def write_report(out: Path, r: dict, example: dict | None) -> Path:
    s = r["settings"]
    card = r.get("teacher_card") or {}
    lines = [
        "# vlsi demo: SFT only vs final-layer KD vs VLsI",
        "",
        f"{_split_name(r)}: **{r['n_test']} questions** (images never seen in training), chance level "
        f"{pct(r['chance'])} %. Accuracy in %, greedy decoding, exact match after normalisation.",
        "",
        *_table(r),
        "",
        verdict(r),
        "",
        f"Teacher: Qwen2-VL architecture, {_size(TEACHER)}, trained from scratch "
        f"(`{card.get('command', 'scripts/train_demo_teacher.py')}`). "
        f"Student: {_size(STUDENT)}, initialised from `{STUDENT_DIR.name}/` (pretrained on reading single digits "
        "and counting only; compare and sequence questions are new to it).",
        "",
        "## Budget",
        "",
        *_budget(r),
        "",
        "## Task",
        "",
        "Images are 112 x 28: four slots of one image token each, holding scikit-learn's handwritten digits "
        "(test digits come from 20 % of the images that training never uses) or drawn shapes. "
        "Four tasks (read a digit, count shapes, compare two digits, continue a sequence of three digits), each "
        "asked three ways (a number, yes/no, a multiple-choice letter).",
        "",
        "## Per-layer verbalizer loss",
        "",
        "![verbalizer loss](verbalizer_loss.png)",
        "",
        "Left: this run's student verbalizers (VLsI stage 1, student backbone frozen); right: the shipped "
        "teacher's verbalizers, recorded when they were trained with it.",
        "",
        "## Layer matching, early vs late",
        "",
        "![layer matching](layer_match.png)",
        "",
        "Which teacher target layer each student target layer was matched to, in the first and last third of the "
        "interaction stage.",
        "",
        "## One test example, layer by layer",
        "",
        *_example(example),
        "",
        "## Run",
        "",
        f"- command: `vlsi demo --output {out}{' --fast' if s['fast'] else ''}`; settings "
        + ", ".join(f"{k}={v}" for k, v in s.items() if k != "fast"),
        f"- seeds: {r['seeds']}; wall time {r['seconds']:.0f} s; peak memory {r['peak_memory_mib']['main']:.0f} MiB "
        f"(main process), {r['peak_memory_mib']['largest_child']:.0f} MiB (largest data worker); {r['machine']}",
        "- timings depend on the machine's load: on a shared machine they vary by 2x.",
        "- `results.json` holds every number above; `runs/{sft,kd,vlsi}/` the students, metrics and configs.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def pick_example(test: list[Item], evals: dict[str, dict]) -> int:
    """The first sequence question (the hardest task) the teacher answers right and SFT only wrong; else the first
    one the teacher answers right; else the first question."""
    right = {name: [is_correct(reply, item) for reply, item in zip(e["replies"], test)] for name, e in evals.items()}
    for wanted in (lambda k: right["teacher"][k] and not right["sft"][k], lambda k: right["teacher"][k]):
        for k, item in enumerate(test):
            if item.task == "sequence" and wanted(k):
                return k
    return 0


def explain_example(out: Path, test: list[Item], evals: dict[str, dict]) -> dict | None:
    """One test item with every model's final answer and, teacher beside VLsI student, each target layer's answer."""
    import torch

    from ..explain import explain_pair, format_pair
    from ..models.loading import load_model, load_processor
    from ..models.verbalizer import Verbalizers

    k = pick_example(test, evals)
    item = test[k]
    image = out / "example.png"
    item.render().resize((448, 112)).save(image)
    example = {
        "item": item.to_dict(),
        "image": image.name,
        "replies": {name: e["replies"][k].strip() for name, e in evals.items()},
    }
    interacted = out / "runs" / "vlsi" / "stages" / "interact"
    processor = load_processor(str(TEACHER_DIR))
    rows = explain_pair(
        load_model(str(interacted / "student"), torch.float32),
        processor,
        Verbalizers.load(interacted / "verbalizers"),
        load_model(str(TEACHER_DIR), torch.float32),
        processor,
        Verbalizers.load(TEACHER_VERBALIZERS),
        item.render(),
        item.question,
        max_new_tokens=3,
    )
    example["table"] = format_pair(rows)
    example["note"] = (
        "Each target layer's greedy answer through its verbalizer (`vlsi.explain`), student layers beside the teacher "
        "layers nearest in relative depth. The student is the VLsI student after the interaction stage, with the "
        "verbalizers trained alongside it (its final SFT stage changes the backbone, not the verbalizers)."
    )
    return example
