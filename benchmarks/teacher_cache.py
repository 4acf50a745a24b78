"""The teacher cache on the demo's shipped models (docs/CACHE.md#measured): how far the top-k estimate is from the
exact divergence for each k, what a cached token costs on disk, and how fast `vlsi.cache.build_cache` runs.

Error: for every response token of a demo split, the exact forward KL(teacher || student) against the top-k estimate
(`vlsi.losses.token_divergence`, tail as one bucket) at every teacher target layer and the teacher's output. A
teacher layer is compared with every student target layer (the entries of the matching matrix D), the teacher's
output with the student's output (the last-layer term). Reported per teacher layer: mean absolute error (nats), and
relative error = sum |error| / sum exact. The student is the demo student with verbalizers from a `vlsi train` run
(`--student-verbalizers RUN/verbalizers/student`; without it, logit-lens verbalizers: the identity, then the frozen
head). Size and speed: `build_cache` end to end (processor, length scan, teacher load, forward, writing) per k.

    python benchmarks/teacher_cache.py --student-verbalizers /tmp/x/runs/vlsi/verbalizers/student --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from vlsi.cache import INDEX, build_cache, teacher_targets
from vlsi.config import load_config
from vlsi.data import VLDataset, make_collate, read_dataset, split_batch
from vlsi.demo.models import SHIPPED, TEACHER_TARGET_LAYERS
from vlsi.demo.tasks import make_split, write_split
from vlsi.losses import TopK, log_probs, token_divergence, top_k
from vlsi.models.family import capture, model_parts
from vlsi.models.loading import freeze, load_model, load_processor
from vlsi.models.verbalizer import Verbalizers
from vlsi.stages.samples import load_samples

KS = (8, 32, 64, 256)


def student_log_probs(student, parts, verbalizers, inputs, mask, vocab) -> torch.Tensor:
    """[N, S + 1, V]: each student target layer's verbalized log-probabilities, then its output's."""
    with torch.no_grad(), capture(parts.layers, verbalizers.target_layers) as states:
        logits = student(**inputs, logits_to_keep=mask).logits[:, :vocab]
        layers = [
            log_probs(verbalizers.head(i, parts.norm, parts.lm_head, vocab)(states[layer][mask]))
            for i, layer in enumerate(verbalizers.target_layers)
        ]
    return torch.stack([*layers, log_probs(logits)], 1)


def errors(data: Path, student_verbalizers: str | None, ks, batch_size: int) -> dict:
    """{k (and "k=64 float16" ...): {teacher layer: [mean |error|, sum |error| / sum exact]}}."""
    processor = load_processor(str(SHIPPED.teacher))
    teacher = freeze(load_model(str(SHIPPED.teacher), torch.float32)).eval()
    student = freeze(load_model(str(SHIPPED.student), torch.float32)).eval()
    t_parts, s_parts = model_parts(teacher), model_parts(student)
    t_verb = Verbalizers.load(SHIPPED.verbalizers)
    if student_verbalizers:
        s_verb = Verbalizers.load(student_verbalizers)
    else:  # logit lens: h + 0, read by the frozen final norm and head
        s_verb = Verbalizers(s_parts.hidden_size, [0, 1, 2], residual=True)
    vocab = min(len(processor.tokenizer), t_parts.vocab_rows, s_parts.vocab_rows)
    samples, _ = read_dataset(data)
    dataset = VLDataset(samples, {"m": processor}, 512)
    collate = make_collate({"m": processor})
    names = [f"layer {layer}" for layer in t_verb.target_layers] + ["output"]
    variants = [(k, "float32") for k in ks] + [(64, "float16"), (64, "bfloat16")]
    sums = {v: torch.zeros(len(names), 2, dtype=torch.float64) for v in variants}  # [L, (sum |err|, count)]
    exact_sum = torch.zeros(len(names), dtype=torch.float64)
    for start in range(0, len(dataset), batch_size):
        inputs, mask, _ = split_batch(
            collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])["m"]
        )
        full = teacher_targets(teacher, t_parts, t_verb, inputs, mask, vocab, 0, 1024).log_probs  # [N, L, V]
        s_lp = student_log_probs(student, s_parts, s_verb, inputs, mask, vocab)  # [N, S + 1, V]
        for j in range(len(names)):
            # teacher layer j against every student target layer; the output against the student's output
            pairs = [s_lp[:, -1]] if j == len(names) - 1 else list(s_lp[:, :-1].unbind(1))
            exact = torch.stack([token_divergence(s, TopK(full[:, j])) for s in pairs])  # [pairs, N]
            exact_sum[j] += exact.double().sum()
            for k, dtype in variants:
                cached = top_k(full[:, j], k)
                stored = getattr(torch, dtype)
                cached = TopK(cached.log_probs.to(stored).float(), cached.ids, cached.log_tail)
                estimate = torch.stack([token_divergence(s, cached) for s in pairs])
                sums[(k, dtype)][j] += torch.tensor([(estimate - exact).abs().double().sum(), exact.numel()])
    result = {}
    for (k, dtype), s in sums.items():
        label = str(k) if dtype == "float32" else f"{k} {dtype}"
        result[label] = {
            name: [(s[j, 0] / s[j, 1]).item(), (s[j, 0] / exact_sum[j]).item()] for j, name in enumerate(names)
        }
    result["exact mean KL"] = {name: (exact_sum[j] / sums[variants[0]][j, 1]).item() for j, name in enumerate(names)}
    result["vocab"] = vocab
    result["tokens"] = int(sums[variants[0]][0, 1].item() / len(s_verb))
    return result


def sizes(data: Path, image_root: Path, ks) -> dict:
    """{k: {bytes_per_token, tokens_per_s, seconds}}: `build_cache` end to end into a fresh folder."""
    result = {}
    for k in (*ks, 0):
        folder = Path(tempfile.mkdtemp(prefix=f"cache-k{k}-"))
        cfg = load_config(
            None,
            [f"verbalizer.teacher_layers={json.dumps(TEACHER_TARGET_LAYERS)}", "precision=fp32", f"cache.top_k={k}"],
            teacher=str(SHIPPED.teacher),
            output=str(folder),
            teacher_verbalizers=str(SHIPPED.verbalizers),
        )
        cfg.data.path, cfg.data.image_root, cfg.data.max_length = str(data), str(image_root), 128
        start = time.perf_counter()
        build_cache(cfg, folder, SHIPPED.verbalizers, load_samples(cfg))
        seconds = time.perf_counter() - start
        index = json.loads((folder / INDEX).read_text())
        total = sum(s["bytes"] for s in index["shards"])
        result[k] = {
            "bytes_per_token": total / index["rows"],
            "tokens_per_s": index["rows"] / seconds,
            "samples_per_s": index["samples"] / seconds,
            "s": seconds,
        }
        shutil.rmtree(folder)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a demo split (LLaVA JSON, answered); default: 512 new train-split items")
    parser.add_argument("--items", type=int, default=512, help="items of the split made when --data is not given")
    parser.add_argument("--student-verbalizers", help="the demo student's verbalizers (RUN/verbalizers/student)")
    parser.add_argument("--build-items", type=int, default=128, help="samples of the data each timed build caches")
    parser.add_argument("--ks", type=int, nargs="+", default=list(KS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else write_split(make_split("train", args.items), Path(tmp), "bench")
        report = {
            "machine": f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} thread(s)), torch {torch.__version__}",
            "load_average": os.getloadavg(),
            "student_verbalizers": args.student_verbalizers or "logit lens",
            "errors": errors(data, args.student_verbalizers, args.ks, args.batch_size),
        }
        print(json.dumps(report["errors"]), flush=True)  # the slow part is done
        records = json.loads(data.read_text())[: args.build_items]
        (Path(tmp) / "build.json").write_text(json.dumps(records))
        report["build_items"] = len(records)
        report["sizes"] = sizes(Path(tmp) / "build.json", data.parent, args.ks)
    print(table(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def table(report: dict) -> str:
    e = report["errors"]
    names = list(e["exact mean KL"])
    rows = [
        f"{report['machine']}, load average {', '.join(f'{x:.1f}' for x in report['load_average'])}; "
        f"{e['tokens']} response tokens, vocabulary {e['vocab']}, student verbalizers: {report['student_verbalizers']}",
        "mean |top-k estimate - exact forward KL| in nats (relative: sum |error| / sum exact)",
        "| k | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
        "| exact mean KL | " + " | ".join(f"{e['exact mean KL'][n]:.3f}" for n in names) + " |",
    ]
    for label, per_layer in e.items():
        if label in ("exact mean KL", "vocab", "tokens"):
            continue
        rows.append(
            f"| {label} | " + " | ".join(f"{a:.1e} ({100 * r:.0e} %)" for a, r in (per_layer[n] for n in names)) + " |"
        )
    rows += [
        "",
        f"build_cache end to end, {report['build_items']} samples, float32",
        "| k | bytes per token | response tokens/s | samples/s | s |",
        "|---|---|---|---|---|",
    ]
    for k, s in report["sizes"].items():
        label = f"{k} (whole)" if int(k) == 0 else str(k)
        speed = f"{s['tokens_per_s']:.1f} | {s['samples_per_s']:.1f} | {s['s']:.1f}"
        rows.append(f"| {label} | {s['bytes_per_token']:.0f} | {speed} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
