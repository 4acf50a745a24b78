"""The 1 -> 2 process speed-up of local teacher answering (`data.answers=teacher` under `accelerate launch`, every
process answering its share: `vlsi.answers`), on this machine's CPU
(docs/PERFORMANCE.md#teacher-answers-local-and-served).

Each run launches `accelerate launch --num_processes P` (ACCELERATE_USE_CPU=true, gloo, one thread per process) of
this script with --worker, which answers every prompt through `vlsi.answers.teacher_answers` into a fresh folder, as
`vlsi sft` would; the main process times that call (teacher loading included, process start-up and imports not).
The answers of every run are checked to equal the 1-process run's.

    python benchmarks/local_answers.py --out /tmp/local-answers.json     # 64 prompts, 1 and 2 processes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
TEACHER = ROOT / "src" / "vlsi" / "assets" / "demo" / "teacher"


def worker(args) -> None:
    from vlsi.answers import teacher_answers
    from vlsi.config import load_config
    from vlsi.data import read_dataset
    from vlsi.distributed import process_state

    settings = [f"data.path={args.data}", "data.answers=teacher", "data.keep_cut_answers=true"]
    settings += [f"data.answer_max_tokens={args.max_tokens}", f"data.answer_batch_size={args.batch}"]
    cfg = load_config(CONFIG, settings, teacher=args.teacher, output=args.output)
    samples, _ = read_dataset(args.data, unanswered=True)
    start = time.perf_counter()
    answered = teacher_answers(cfg, list(samples))
    seconds = time.perf_counter() - start
    if process_state().is_main_process:
        answers = {s.id: s.messages[-1]["content"][0]["text"] for s in answered}
        Path(args.result).write_text(json.dumps({"seconds": seconds, "answers": answers}))


def launch(processes: int, args, root: Path) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = root / f"result-{processes}.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes)]
    command += ["--main_process_port", str(port), __file__, "--worker", "--data", str(root / "questions.jsonl")]
    command += ["--teacher", args.teacher, "--output", str(root / f"out-{processes}"), "--result", str(result)]
    command += ["--max-tokens", str(args.max_tokens), "--batch", str(args.batch)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    subprocess.run(command, env=env, check=True)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(TEACHER))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="data.answer_batch_size")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--output", "--result"):  # the worker's
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from vlsi.toy import write_digits_dataset

    root = Path(tempfile.mkdtemp(prefix="local-answers-"))
    records = json.loads(write_digits_dataset(root, n=args.prompts).read_text())
    for record in records:
        record["conversations"] = record["conversations"][:1]
    (root / "questions.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    runs, reference = [], None
    for processes in args.processes:
        got = launch(processes, args, root)
        reference = reference or got["answers"]
        runs.append({"processes": processes, "seconds": got["seconds"], "same": got["answers"] == reference})
    for run in runs:
        run["answers_per_second"] = args.prompts / run["seconds"]
        run["speed_up"] = runs[0]["seconds"] / run["seconds"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "teacher": args.teacher,
        "prompts": args.prompts,
        "answer_max_tokens": args.max_tokens,
        "answer_batch_size": args.batch,
        "load_average_after": os.getloadavg(),
        "runs": runs,
    }
    print(f"{'processes':>9} {'seconds':>8} {'answers/s':>10} {'speed-up':>9}  same answers as the first")
    for run in runs:
        print(
            f"{run['processes']:9d} {run['seconds']:8.2f} {run['answers_per_second']:10.2f} {run['speed_up']:9.2f}"
            f"  {run['same']}"
        )
    print(f"load average after: {os.getloadavg()}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
