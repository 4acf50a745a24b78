"""Train the models `vlsi demo` ships: the teacher, its verbalizers, and the student initialisation.

    python scripts/train_demo_teacher.py            # 29 minutes on a busy 2-core machine; less on an idle one
    python scripts/train_demo_teacher.py --teacher-steps 40 --student-steps 20 --vision-steps 20 \
        --verbalize-steps 10 --n-train 600 --n-eval 120 --output /tmp/t     # a quick try
    python scripts/train_demo_teacher.py --styles number yesno choice chain --n-train 16000 \
        --output src/vlsi/assets/demo-chain     # the set that also answers chains (`vlsi demo teacher=chain`)

Writes OUTPUT (default src/vlsi/assets/demo/):
  teacher/               tiny Qwen2-VL checkpoint (safetensors) + processor (tokenizer, chat template, image processor)
  teacher_verbalizers/   its verb-FFNs for the demo's target layers (`vlsi train teacher_verbalizers=...`)
  student/               the student initialisation every demo method starts from
  teacher.json           sizes, seed, command, steps, wall time, accuracy of both on the validation and test splits
  teacher_metrics.jsonl  every training step's losses (the demo plots the teacher's verbalizer losses from it)

Both models are trained from scratch, as a small VLM is usually built, in two stages:
  1. vision pretraining: the vision tower learns to classify what each image token shows (a digit 0-9, nothing,
     or 1-4 shapes) through a linear head that is then thrown away, as VLMs start from a pretrained vision encoder;
  2. instruction tuning with the vision tower frozen (the SFT step of `vlsi sft`, but the LM head trains too):
     the teacher on all four tasks, long; the student only on reading single digits and counting, briefly.
     Comparing and continuing sequences is what the demo's students must then learn, with or without the teacher.
The held-out test split is only evaluated at the end, never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vlsi.config import load_config
from vlsi.data import read_dataset
from vlsi.demo.evaluate import evaluate
from vlsi.demo.models import (
    ASSETS,
    STUDENT,
    STUDENT_TARGET_LAYERS,
    TEACHER,
    TEACHER_TARGET_LAYERS,
    VOCAB_SIZE,
    build_model,
)
from vlsi.demo.tasks import (
    ALL_STYLES,
    CELL,
    CELLS,
    SLOT,
    SLOTS,
    STYLES,
    _digits,
    chance_accuracy,
    corpus,
    make_split,
    write_split,
)
from vlsi.models.family import model_parts
from vlsi.models.loading import freeze
from vlsi.models.tiny import build_tokenizer
from vlsi.stages.loop import MetricsLog, make_accelerator, train
from vlsi.stages.samples import build_loader
from vlsi.stages.sft import SFTStep
from vlsi.stages.verbalize import verbalize

PERCEPTION = ("digit", "count")  # what the student initialisation is taught
N_CLASSES = 15  # per image token: digit 0-9, empty, 1-4 shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=str(ASSETS), help="where the models are written (default: the package assets)")
    p.add_argument("--work", help="scratch folder for data and checkpoints (default: a temporary folder)")
    p.add_argument("--teacher-steps", type=int, default=3000, help="instruction-tuning steps of the teacher")
    p.add_argument("--student-steps", type=int, default=1000, help="instruction-tuning steps of the student init")
    p.add_argument("--vision-steps", type=int, default=600, help="vision pretraining steps of each model")
    p.add_argument("--verbalize-steps", type=int, default=400, help="training steps of the teacher's verbalizers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=12000, help="questions in the training split ('teacher')")
    p.add_argument("--n-eval", type=int, default=1200, help="questions in the validation and test splits each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--styles",
        nargs="+",
        choices=ALL_STYLES,
        default=list(STYLES),
        help="answer styles both models are trained and evaluated on (default: the shipped set's; with chain, the "
        "tokenizer learns its words too, so the models pair only with each other: write them to their own --output)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (one more core feeds the data loader)")
    return p.parse_args(argv)


def token_labels(item, target) -> list[int]:
    """What each image token (slot) shows: its digit 0-9, 10 if empty, 10 + k for k drawn shapes."""
    labels = [10] * SLOTS
    for slot, index in item.digits:
        labels[slot] = int(target[index])
    for cell, *_ in item.shapes:
        labels[(cell % CELLS[0]) * CELL // SLOT] += 1
    return labels


def pretrain_vision(model, processor, items, steps: int, batch_size: int, lr: float, seed: int, log) -> None:
    """Train the vision tower (and merger) to classify every image token's content through a throwaway linear head."""
    vision = model_parts(model).vision[0]
    hidden = model_parts(model).hidden_size
    head = torch.nn.Linear(hidden, N_CLASSES)
    _, target = _digits()
    optimizer = torch.optim.AdamW([*vision.parameters(), *head.parameters()], lr=lr)
    rng = random.Random(seed)
    for step in range(steps):
        batch = rng.sample(items, batch_size)
        inputs = processor.image_processor(images=[item.render() for item in batch], return_tensors="pt")
        labels = torch.tensor([token_labels(item, target) for item in batch])  # [B, SLOTS]
        tokens = vision(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        tokens = tokens.pooler_output if hasattr(tokens, "pooler_output") else tokens  # [B * SLOTS, hidden]
        loss = torch.nn.functional.cross_entropy(head(tokens), labels.view(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"vision pretraining {step + 1}/{steps}: loss {loss.item():.3f}")


def instruction_config(work: Path, args: argparse.Namespace, extra: list[str] = ()):
    """The instruction-tuning settings (fp32, warm-up 50 steps, decay to lr/100) with `args`' batch, lr and seed."""
    lr = args.lr
    return load_config(
        None,
        [
            "precision=fp32",
            "data.num_workers=1",
            f"sft.batch_size={args.batch_size}",
            "sft.grad_accum=1",
            f"sft.lr={lr}",
            f"sft.min_lr={lr / 100}",
            "sft.warmup_steps=50",
            "sft.weight_decay=0.01",
            f"seed={args.seed}",
            *extra,
        ],
        output=str(work),
    )


def instruction_tune(model, processor, cfg, samples, steps: int, name: str, metrics: MetricsLog) -> None:
    """SFT of everything but the vision tower, in place (one process: the trained module is `model` itself)."""
    freeze(model_parts(model).vision[0])
    stage = cfg.sft
    stage.max_steps = steps
    accelerator = make_accelerator(stage, torch.float32)
    parts = model_parts(model)
    vocab = min(len(processor.tokenizer), parts.vocab_rows)
    loader = build_loader(cfg, samples, {"model": processor}, stage.batch_size, cfg.seed, name)
    train(accelerator, SFTStep(model, parts, vocab), loader, stage, name, metrics)


def start_run(threads: int) -> tuple[float, Callable[[str], None]]:
    """Log records shown, `threads` torch threads; (the start time, `log(text)` printing the seconds since then)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    start = time.time()

    def log(text: str) -> None:
        print(f"[{time.time() - start:5.0f} s] {text}", flush=True)

    return start, log


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start, log = start_run(args.threads)
    out = Path(args.output)
    work = Path(args.work or tempfile.mkdtemp(prefix="vlsi-demo-teacher-"))
    work.mkdir(parents=True, exist_ok=True)
    styles = tuple(args.styles)
    items = make_split("teacher", args.n_train, styles=styles)
    perception = [item for item in items if item.task in PERCEPTION]
    data = work / "data"
    all_path, perception_path = write_split(items, data, "teacher"), write_split(perception, data, "perception")
    val, test = make_split("val", args.n_eval, styles=styles), make_split("test", args.n_eval, styles=styles)
    log(f"data: {len(items)} questions, {len(perception)} of them on reading digits and counting")

    tokenizer = build_tokenizer(corpus=corpus(styles), vocab_size=VOCAB_SIZE)
    cfg = instruction_config(
        work,
        args,
        [
            f"verbalize.max_steps={args.verbalize_steps}",
            f"verbalize.batch_size={args.batch_size}",
            "verbalize.grad_accum=1",
            "verbalize.lr=3e-3",
            "verbalize.min_lr=3e-5",
            f"verbalizer.teacher_layers={json.dumps(TEACHER_TARGET_LAYERS)}",
            f"verbalizer.student_layers={json.dumps(STUDENT_TARGET_LAYERS)}",
        ],
    )
    metrics = MetricsLog(work / "metrics.jsonl")
    models = {}
    for name, size, path, steps in (
        ("student", STUDENT, perception_path, args.student_steps),
        ("teacher", TEACHER, all_path, args.teacher_steps),
    ):
        torch.manual_seed(args.seed)
        model, processor = build_model(None, size, args.seed, tokenizer)
        pretrain_vision(model, processor, items, args.vision_steps, args.batch_size, args.lr, args.seed, log)
        cfg.data.path = str(path)
        samples, _ = read_dataset(path)
        instruction_tune(model, processor, cfg, samples, steps, name, metrics)
        model.save_pretrained(work / name)
        processor.save_pretrained(work / name)
        models[name] = model
        log(f"{name} trained")

    cfg.data.path = str(all_path)
    samples, _ = read_dataset(all_path)
    verbalize(cfg, str(work / "teacher"), "teacher", work / "teacher_verbalizers", metrics, samples)
    log("teacher verbalizers trained")

    accuracy = {}
    for name, model in models.items():
        accuracy[name] = {}
        for split, split_items in (("val", val), ("test", test)):
            result = evaluate(model, processor, split_items)
            for detail in ("replies", "hits"):  # per-item: teacher.json keeps the summary
                result.pop(detail)
            accuracy[name][split] = result
            log(f"{name} {split}: {result['accuracy']:.3f} {json.dumps(result['by_task'])}")

    card = {
        "command": "python scripts/train_demo_teacher.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "architecture": {"teacher": TEACHER, "student": STUDENT, "vocab_size": len(tokenizer)},
        "parameters": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        "target_layers": {"teacher": TEACHER_TARGET_LAYERS, "student": STUDENT_TARGET_LAYERS},
        "training": {
            "split": "teacher",
            "styles": list(styles),
            "questions": len(items),
            "student_tasks": list(PERCEPTION),
            "vision_steps": args.vision_steps,
            "teacher_steps": args.teacher_steps,
            "student_steps": args.student_steps,
            "verbalize_steps": args.verbalize_steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
        },
        "accuracy": accuracy["teacher"],
        "student_accuracy": accuracy["student"],
        "chance": {"val": chance_accuracy(val), "test": chance_accuracy(test)},
        "seconds": round(time.time() - start),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s) + 1 data worker, "
        f"torch {torch.__version__}",
    }
    out.mkdir(parents=True, exist_ok=True)
    for name in ("teacher", "teacher_verbalizers", "student"):
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(work / name, out / name)
    (out / "teacher.json").write_text(json.dumps(card, indent=2) + "\n")
    shutil.copy(work / "metrics.jsonl", out / "teacher_metrics.jsonl")
    log(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
