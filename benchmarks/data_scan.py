"""Records/s and peak memory of checking and length-scanning a data set, on 1 and 2 processes, and the time to the
first trained step of `vlsi sft` on it (docs/PERFORMANCE.md#data-check-and-length-scan).

Builds (once, reused from --data-dir) a synthetic LLaVA-format JSONL of --records records over as many distinct
real images, PNG and JPEG alternately, 56-224 px a side, drawn with PIL; the same records as a parquet file with the
images' bytes inside (LLaVA-OneVision-Data's columns: id, conversations, image); and the tiny student of `vlsi.toy`
(Qwen2-VL processor). `--formats` picks which of the two are measured (default both). Each measurement runs in a
fresh process, so that its peak RSS and timings stand alone:
  cache   (parquet) `datasets` converting the parquet file into its arrow cache, once (later opens map the cache)
  check   `vlsi.data.sources.read_sources`: parse + validate every record, read every image's header
  scan    `vlsi.data.VLDataset`: token and response-token counts of every sample (no cache)
  step    `python -m vlsi sft ... sft.max_steps=1`: wall time from launch to the end of one trained step (load, check,
          scan, model, one step), with a fresh output folder each time
  index   (--index-records N) check N records (over 1000 images) for the memory the index and the check take
  full    (--full N) the path vlsi took before: decode every image, run the whole processor on every sample, in one
          process, on the first N records, for comparison
Peak RSS: the measuring process's (main) and the largest of its child processes' (the workers; also a helper
process some import starts). CPU seconds (user + system, workers included) beside each wall time: on a machine other
jobs load, they leave out the waiting for a core. `--rounds N` measures every format and setting N times in turns
(each round measures each once) and the summary gives the medians.

    python benchmarks/data_scan.py                                   # 100k records, 1 and 2 processes, + one step
    python benchmarks/data_scan.py --rounds 3 --procs 2               # in turns, medians of 3: a loaded machine
    python benchmarks/data_scan.py --records 5000 --procs 1 2 --no-step                # a quick run
    python benchmarks/data_scan.py --records 20000 --formats parquet --procs 2        # the parquet path alone
    python benchmarks/data_scan.py --full 2000 --out benchmarks/results/data-scan.json
    python benchmarks/data_scan.py --no-scan --no-step --index-records 1000000        # memory of a 1M-record check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["What is shown in the image?", "Describe the picture.", "How many objects are there?", "Which one?"]
ANSWERS = ["There is a cat sitting on a mat.", "red", "The quick brown fox jumps over the lazy dog.", "3"]


def _draw(task: tuple[Path, int]) -> None:
    """Image number k: a distinct colour and rectangle, a size of 56-224 px a side, PNG or JPEG."""
    from PIL import Image, ImageDraw

    folder, k = task
    rng = random.Random(k)
    size = (rng.randint(56, 224), rng.randint(56, 224))
    image = Image.new("RGB", size, (k % 251, (k // 251) % 251, (k // 63001) % 251))
    ImageDraw.Draw(image).rectangle([5, 5, size[0] // 2, size[1] // 2], fill=(rng.randrange(256), 0, 255))
    image.save(folder / "images" / (f"{k:07d}.png" if k % 2 else f"{k:07d}.jpg"))


def build(folder: Path, records: int) -> tuple[Path, Path]:
    """folder/data.jsonl over folder/images/* and the tiny student folder/student; kept for later runs."""
    from concurrent.futures import ProcessPoolExecutor

    data, student = folder / "data.jsonl", folder / "student"
    if not data.is_file():  # data.parquet is made from it, so a rebuilt JSONL means a rebuilt parquet
        (folder / "data.parquet").unlink(missing_ok=True)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        print(f"drawing {records} images into {folder / 'images'} ...", file=sys.stderr)
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_draw, [(folder, k) for k in range(records)], chunksize=256))
        rng = random.Random(0)
        with open(folder / "data.tmp", "w") as f:
            for k in range(records):
                name = f"images/{k:07d}.png" if k % 2 else f"images/{k:07d}.jpg"
                conversations = [
                    {"from": "human", "value": "<image>\n" + " ".join(rng.choices(QUESTIONS, k=rng.randint(1, 3)))},
                    {"from": "gpt", "value": " ".join(rng.choices(ANSWERS, k=rng.randint(1, 4)))},
                ]
                f.write(json.dumps({"id": f"s{k}", "image": name, "conversations": conversations}) + "\n")
        (folder / "data.tmp").replace(data)
    if not student.is_dir():
        from vlsi.toy import write_tiny_pair

        write_tiny_pair(folder)
    return data, student


def build_parquet(folder: Path) -> Path:
    """folder/data.parquet: the records of folder/data.jsonl with their images' bytes in an `image` column (a
    `datasets.Image` column, as LLaVA-OneVision-Data stores them), written in row groups of 1000."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "data.parquet"
    if path.is_file():
        return path
    turns = datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")})
    features = datasets.Features({"id": datasets.Value("string"), "conversations": turns, "image": datasets.Image()})
    schema = features.arrow_schema  # carries the features: `datasets` reads the column back as images
    partial = folder / "data.parquet.tmp"
    with open(folder / "data.jsonl") as lines, pq.ParquetWriter(partial, schema) as writer:
        rows = []
        for line in lines:
            record = json.loads(line)
            image = {"bytes": (folder / record["image"]).read_bytes(), "path": None}
            rows.append({"id": record["id"], "conversations": record["conversations"], "image": image})
            if len(rows) == 1000:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    partial.replace(path)
    return path


def measure_cache(data: Path, student: Path, number: int) -> dict:
    """(In a fresh process.) Open the parquet file as `vlsi` does: the first time, `datasets` converts it into its
    arrow cache."""
    from vlsi.data.sources import open_dataset

    start = time.perf_counter()
    rows = len(open_dataset(str(data)))
    return {"records": rows, "open_s": time.perf_counter() - start, **_peak_rss()}


def measure(data: Path, student: Path, num_proc: int) -> dict:
    """(In a fresh process.) Check + scan with `num_proc` processes: seconds, records/s, peak RSS."""
    from vlsi.data import VLDataset
    from vlsi.data.sources import Source, read_sources
    from vlsi.models.loading import load_processor

    processor = load_processor(str(student), False)
    cpu = _cpu_seconds()
    start = time.perf_counter()
    samples, _ = read_sources([Source(str(data))], num_proc=num_proc)
    checked = time.perf_counter()
    dataset = VLDataset(samples, {"model": processor}, max_length=512, num_proc=num_proc)
    scanned = time.perf_counter()
    n = len(samples)
    return {
        "num_proc": num_proc,
        "records": n,
        "kept": len(dataset),
        "check_s": checked - start,
        "scan_s": scanned - checked,
        "check_scan_s": scanned - start,
        "check_scan_cpu_s": _cpu_seconds() - cpu,
        "records_per_s": n / (scanned - start),
        **_peak_rss(),
    }


def _cpu_seconds() -> float:
    """CPU seconds (user + system) this process and its finished workers have used: unlike wall time, the time spent
    waiting for a core that other jobs hold is not in it."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def build_index_set(folder: Path, records: int) -> Path:
    """folder/index-N.jsonl: `records` records over the set's first 1000 images (memory, not image I/O, is measured)."""
    data = folder / f"index-{records}.jsonl"
    if not data.is_file():
        lines = (folder / "data.jsonl").read_text().splitlines()[:1000]
        with open(folder / "index.tmp", "w") as f:
            for k in range(records):
                record = json.loads(lines[k % len(lines)])
                f.write(json.dumps(record | {"id": f"s{k}"}) + "\n")
        (folder / "index.tmp").replace(data)
    return data


def measure_index(data: Path, student: Path, num_proc: int) -> dict:
    """(In a fresh process.) Check a large set: seconds, peak RSS, and the bytes of the index kept."""
    from vlsi.data import read_dataset

    start = time.perf_counter()
    samples, _ = read_dataset(data, num_proc=num_proc)
    seconds = time.perf_counter() - start
    index = samples.table.nbytes + samples.sizes.nbytes + samples.starts.nbytes
    return {"num_proc": num_proc, "records": len(samples), "check_s": seconds, "index_mib": index / 2**20} | _peak_rss()


def measure_full(data: Path, student: Path, records: int) -> dict:
    """(In a fresh process.) The earlier path on the first `records` records: decode + full processor, one process."""
    from PIL import Image

    from vlsi.data import read_dataset
    from vlsi.data.scan import _full
    from vlsi.models.loading import load_processor

    processor = load_processor(str(student), False)
    samples, _ = read_dataset(data, num_proc=1)
    samples = samples[:records]
    start = time.perf_counter()
    for sample in samples:
        for path in sample.images:
            with Image.open(path) as image:
                image.load()
        _full(sample, processor)
    seconds = time.perf_counter() - start
    return {"num_proc": 1, "records": records, "full_s": seconds, "records_per_s": records / seconds}


def measure_step(data: Path, student: Path, num_proc: int) -> dict:
    """Seconds from launching `vlsi sft` (one optimizer step, fresh output folder) to its first line in
    OUT/metrics.jsonl, i.e. the first trained step, and to its exit (saving the model included); the peak RSS of its
    largest process (it and the workers it waited for)."""
    config = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"
    with tempfile.TemporaryDirectory() as out:
        settings = ["sft.max_steps=1", "sft.batch_size=4", f"data.num_proc={num_proc}"]
        command = [sys.executable, "-m", "vlsi", "sft", "--model", str(student), "--data", str(data)]
        command += ["--output", out, "--config", str(config), *settings]
        metrics, log, first_step = Path(out) / "metrics.jsonl", Path(out) / "stderr.log", None
        start = time.perf_counter()
        with open(log, "w") as stderr:
            run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=_env())
        while True:
            pid, status, usage = os.wait4(run.pid, os.WNOHANG)  # this child's own rusage, its workers included
            if first_step is None and metrics.is_file() and metrics.stat().st_size:
                first_step = time.perf_counter() - start
            if pid:
                break
            time.sleep(0.05)
        exit_s = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(log.read_text()[-3000:])
    return {
        "num_proc": num_proc,
        "first_step_s": first_step,
        "exit_s": exit_s,
        "cpu_s": usage.ru_utime + usage.ru_stime,  # the whole run's, its workers included
        "peak_rss_gib": usage.ru_maxrss / 2**20,
    }


def summary(results: dict, formats: list[str]) -> dict:
    """Per format and data.num_proc, the medians over the rounds: check + scan wall and CPU seconds, time to the
    first step and its CPU seconds, the largest peak RSS."""
    out = {}
    for name in formats:
        for kind, keys in (("scan", ("check_scan_s", "check_scan_cpu_s")), ("step", ("first_step_s", "cpu_s"))):
            runs = results.get(f"{kind}_{name}", [])
            for num_proc in sorted({run["num_proc"] for run in runs}):
                mine = [run for run in runs if run["num_proc"] == num_proc]
                row = out.setdefault(f"{name} num_proc={num_proc}", {})
                row.update({f"{key}_median": statistics.median(run[key] for run in mine) for key in keys})
                memory = ("peak_rss_gib", "peak_rss_main_gib", "peak_rss_worker_gib")
                row[f"{kind}_peak_rss_gib_max"] = max(run.get(key, 0.0) for run in mine for key in memory)
                row[f"{kind}_rounds"] = len(mine)
    return out


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _spin(n: int) -> int:
    return sum(i * i for i in range(n))


def free_cores(n: int = 10_000_000) -> float:
    """How much faster two processes run a pure-Python loop than one: about 2 on a quiet 2-core machine, about 1
    when other jobs hold a core. The 1 -> 2 process speed-up of the scan cannot beat it."""
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    _spin(n), _spin(n)
    serial = time.perf_counter() - start
    with ProcessPoolExecutor(2) as pool:
        start = time.perf_counter()
        list(pool.map(_spin, [n, n]))
    return serial / (time.perf_counter() - start)


def _peak_rss() -> dict:
    return {
        "peak_rss_main_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_rss_worker_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
    }


def _in_fresh_process(what: str, data: Path, student: Path, number: int) -> dict:
    command = [sys.executable, __file__, "--measure", what, str(data), str(student), str(number)]
    result = subprocess.run(command, capture_output=True, text=True, env=_env())
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="records (and distinct images) in the set")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="data.num_proc values to measure")
    parser.add_argument(
        "--formats", nargs="+", choices=["jsonl", "parquet"], default=["jsonl", "parquet"], help="which sets to measure"
    )
    parser.add_argument("--data-dir", type=Path, help="where the set is built and kept (default: a folder in /tmp)")
    parser.add_argument("--no-step", action="store_true", help="skip the time-to-first-step runs of `vlsi sft`")
    parser.add_argument("--no-scan", action="store_true", help="skip the check + scan measurements")
    parser.add_argument("--full", type=int, default=0, help="also time the earlier full path on this many records")
    parser.add_argument("--index-records", type=int, default=0, help="also check a set of this many records (memory)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every format and setting this many times")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)  # WHAT DATA STUDENT N, in a fresh process
    args = parser.parse_args()
    if args.measure:
        what, data, student, number = args.measure
        measurers = {"measure": measure, "measure_full": measure_full, "measure_index": measure_index}
        measurer = (measurers | {"measure_cache": measure_cache})[what]
        print(json.dumps(measurer(Path(data), Path(student), int(number))))
        return

    folder = args.data_dir or Path(tempfile.gettempdir()) / f"vlsi-data-scan-{args.records}"
    data, student = build(folder, args.records)
    sets = {"jsonl": data, "parquet": build_parquet(folder) if "parquet" in args.formats else None}
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_average_before": os.getloadavg(),
        "two_process_speedup_of_a_python_loop": free_cores(),
        "records": args.records,
    }
    if "parquet" in args.formats:
        results["parquet_cache"] = _in_fresh_process("measure_cache", sets["parquet"], student, 0)
        print(json.dumps(results["parquet_cache"]), file=sys.stderr)
    # In turns: every round measures each format once per setting, so a shared machine's changing load falls on the
    # formats alike; the summary gives each one's medians over the rounds.
    for round_ in range(args.rounds):
        for num_proc in [] if args.no_scan else args.procs:
            for name in args.formats:
                scan = _in_fresh_process("measure", sets[name], student, num_proc) | {"format": name, "round": round_}
                results.setdefault(f"scan_{name}", []).append(scan)
                print(json.dumps(scan), file=sys.stderr)
        for num_proc in [] if args.no_step else args.procs:
            for name in args.formats:
                step = measure_step(sets[name], student, num_proc) | {"format": name, "round": round_}
                results.setdefault(f"step_{name}", []).append(step)
                print(json.dumps(step), file=sys.stderr)
    results["summary"] = summary(results, args.formats)
    if args.full:
        results["full"] = _in_fresh_process("measure_full", data, student, args.full)
        print(json.dumps(results["full"]), file=sys.stderr)
    if args.index_records:
        big = build_index_set(folder, args.index_records)
        results["index"] = _in_fresh_process("measure_index", big, student, max(args.procs))
        print(json.dumps(results["index"]), file=sys.stderr)
    results["load_average_after"] = os.getloadavg()
    results["two_process_speedup_of_a_python_loop_after"] = free_cores()
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
