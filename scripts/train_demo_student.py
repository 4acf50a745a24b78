"""Train another student initialisation for `vlsi demo` (setting `student=DIR`), the shipped student's recipe at
another size: the same tokenizer (the shipped teacher's), vision pretraining, then instruction tuning on reading
single digits and counting only (scripts/train_demo_teacher.py, whose functions this reuses).

    python scripts/train_demo_student.py --output /tmp/big/student --layers 6 --hidden 128     # ~11 min, 2 cores
    vlsi demo --output /tmp/big/demo student=/tmp/big/student student_layers=0,1,2,3,4 eval_split=val

Writes OUTPUT/ (checkpoint + processor) and OUTPUT/student.json (command, sizes, steps, validation accuracy per
task, wall time). docs/DEMO.md ("What was tried") records what a 6 x 128 student gave.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from train_demo_teacher import PERCEPTION, instruction_config, instruction_tune, pretrain_vision, start_run

from vlsi.data import read_dataset
from vlsi.demo.evaluate import evaluate
from vlsi.demo.models import SHIPPED, build_model
from vlsi.demo.tasks import make_split, write_split
from vlsi.models.loading import load_processor
from vlsi.stages.loop import MetricsLog


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder for the student checkpoint")
    p.add_argument("--layers", type=int, default=6, help="decoder blocks (the shipped student: 4)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (the shipped student: 64)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vision-depth", type=int, default=1)
    p.add_argument("--steps", type=int, default=1000, help="instruction-tuning steps (digit and count questions)")
    p.add_argument("--vision-steps", type=int, default=600, help="vision pretraining steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-train", type=int, default=12000, help="questions drawn from the training split ('teacher')")
    p.add_argument("--n-eval", type=int, default=1200, help="validation questions scored at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start, log = start_run(args.threads)
    out = Path(args.output)
    work = Path(tempfile.mkdtemp(prefix="vlsi-demo-student-"))
    items = make_split("teacher", args.n_train)
    perception = [item for item in items if item.task in PERCEPTION]
    path = write_split(perception, work / "data", "perception")
    cfg = instruction_config(work, args)
    cfg.data.path = str(path)
    size = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, vision_depth=args.vision_depth)
    torch.manual_seed(args.seed)
    tokenizer = load_processor(
        str(SHIPPED.teacher)
    ).tokenizer  # shared with the teacher: the method needs one vocabulary
    model, processor = build_model(None, size, args.seed, tokenizer)
    pretrain_vision(model, processor, items, args.vision_steps, args.batch_size, args.lr, args.seed, log)
    instruction_tune(model, processor, cfg, read_dataset(path)[0], args.steps, "student", MetricsLog(work / "m.jsonl"))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    result = evaluate(model, processor, make_split("val", args.n_eval))
    log(f"validation: {result['accuracy']:.3f} {json.dumps(result['by_task'])}")
    card = {
        "command": "python scripts/train_demo_student.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "architecture": size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "training": {"tasks": list(PERCEPTION), "vision_steps": args.vision_steps, "steps": args.steps},
        "val": {k: result[k] for k in ("accuracy", "by_task")},
        "seconds": round(time.time() - start),
    }
    (out / "student.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
