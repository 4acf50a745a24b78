"""Answers per second of the teacher answering unanswered prompts: locally (`data.answers=teacher`, batched
`generate`) against served (`data.answers=server`, `transformers serve` of the same teacher on 127.0.0.1), on this
machine's CPU (docs/PERFORMANCE.md#teacher-answers-local-and-served).

The teacher is the demo's (src/vlsi/assets/demo/teacher, a tiny Qwen2-VL; --teacher for another), the prompts
--prompts digit questions of `vlsi.toy` without their answers. Each run answers every prompt through
`vlsi.answers.teacher_answers` into a fresh output folder, as `vlsi sft` / `vlsi train` would: local runs include
loading the teacher, served runs the check that the server serves it (the server is started once, before; its
start-up time is reported on its own). The served answers are checked to equal the local ones.

    python benchmarks/served_answers.py --continuous-batching --out /tmp/served-answers.json   # 64 prompts
    python benchmarks/served_answers.py --prompts 16 --batch 8 --concurrency 8                  # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from vlsi.answers import teacher_answers
from vlsi.config import load_config
from vlsi.data import read_dataset
from vlsi.toy import write_digits_dataset

CONFIG = Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml"
TEACHER = Path(__file__).parent.parent / "src" / "vlsi" / "assets" / "demo" / "teacher"


def questions(folder: Path, n: int) -> Path:
    records = json.loads(write_digits_dataset(folder, n=n).read_text())
    for record in records:
        record["conversations"] = record["conversations"][:1]
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def start_server(teacher: str, log_path: Path, flags: list[str]) -> tuple[subprocess.Popen, str, float]:
    """`transformers serve TEACHER FLAGS` on a free port of 127.0.0.1: (process, base URL, seconds until it lists
    the teacher)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", teacher]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning", *flags]
    start = time.perf_counter()
    with log_path.open("w") as log_file:
        server = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    while server.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                if teacher in response.read().decode():
                    return server, url, time.perf_counter() - start
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"transformers serve stopped: {log_path.read_text()[-2000:]}")


def answer(data: Path, teacher: str, out: Path, settings: list[str]) -> tuple[dict[str, str], float]:
    """({id: answer}, seconds) of answering every prompt of `data` into the fresh folder `out`."""
    cfg = load_config(CONFIG, [f"data.path={data}", "data.keep_cut_answers=true", *settings], output=str(out))
    cfg.teacher = teacher
    samples, _ = read_dataset(data, unanswered=True)
    start = time.perf_counter()
    answered = teacher_answers(cfg, list(samples))
    seconds = time.perf_counter() - start
    return {s.id: s.messages[-1]["content"][0]["text"] for s in answered}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(TEACHER))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="data.answer_batch_size (local)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="data.answer_concurrency (served)")
    parser.add_argument(
        "--continuous-batching",
        action="store_true",
        help="also serve with `transformers serve --continuous-batching` (the requests in flight batched together)",
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="served-answers-"))
    data = questions(root, args.prompts)
    common = [f"data.answer_max_tokens={args.max_tokens}"]
    served = [*common, "data.answers=server", f"data.answer_model={args.teacher}"]
    runs, reference = [], None
    for size in args.batch:
        got, seconds = answer(data, args.teacher, root / f"local-{size}", [*common, "data.answers=teacher",
                              f"data.answer_batch_size={size}"])  # fmt: skip
        reference = reference or got
        runs.append({"mode": "local", "data.answer_batch_size": size, "seconds": seconds, "same": got == reference})
    startup = {}
    for flags in [[], ["--continuous-batching"]][: 1 + args.continuous_batching]:
        mode = " ".join(["served", *flags])
        server, url, startup[mode] = start_server(args.teacher, root / "serve.log", flags)
        try:
            for concurrency in args.concurrency:
                settings = [*served, f"data.answer_server={url}", f"data.answer_concurrency={concurrency}"]
                got, seconds = answer(data, args.teacher, root / f"{mode}-{concurrency}".replace(" ", ""), settings)
                runs.append({"mode": mode, "data.answer_concurrency": concurrency, "seconds": seconds,
                             "same": got == reference})  # fmt: skip
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    for run in runs:
        run["answers_per_second"] = args.prompts / run["seconds"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "teacher": args.teacher,
        "prompts": args.prompts,
        "answer_max_tokens": args.max_tokens,
        "server_startup_seconds": startup,
        "load_average_after": os.getloadavg(),
        "runs": runs,
    }
    print(f"{'mode':28} {'setting':28} {'seconds':>8} {'answers/s':>10}  same answers as local")
    for run in runs:
        setting = next(f"{key}={value}" for key, value in run.items() if key.startswith("data."))
        print(f"{run['mode']:28} {setting:28} {run['seconds']:8.2f} {run['answers_per_second']:10.2f}  {run['same']}")
    for mode, seconds in startup.items():
        print(f"{mode}: start-up {seconds:.1f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
