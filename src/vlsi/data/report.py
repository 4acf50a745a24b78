"""`vlsi data check`: what the training path's own check and length scan find in the data, before a GPU job.

Per source and in total: records, images (of the valid records), records with problems (the first MAX_SHOWN listed
by source and record), and with a processor the text and image token counts of the valid samples (min / median /
p99 / max) and how many exceed data.max_length. The check is `sources.read_source` (as `load_samples` reads), the
scan `VLDataset`'s (as `build_loader` scans), with their progress bars or log lines on large sets.
"""

from __future__ import annotations

import sys

import numpy as np

from vlsi.data.dataset import VLDataset
from vlsi.data.records import MAX_SHOWN, DataError
from vlsi.data.scan import rule_tokens
from vlsi.data.sources import parse_sources, read_source

STATS = ("min", "median", "p99", "max")


def check_data(cfg, student: str | None = None, processor=None) -> dict:
    """The report of `cfg.data`'s sources: {"sources": [per source], "total": {...}} (JSON-able). `processor`: that of
    the model `student`, which counts the tokens (none: no token counts)."""
    unanswered = cfg.data.answers == "teacher"
    num_proc = cfg.data.num_proc or None
    reports, tokens, images = [], [], []
    for source in parse_sources(cfg.data):
        records, samples = 0, []
        try:
            records = len(read_source(source, unanswered=unanswered, lazy=True)[0])
            samples, problems = read_source(source, True, unanswered, num_proc)
        except DataError as error:  # no valid record: reported; a source that cannot be opened: one line (exit 2)
            if not error.problems:
                raise
            problems = error.problems
        report = {
            "source": source.name,
            "records": records,
            "valid": len(samples),
            "with_problems": records - len(samples),
            "images": int(samples.starts[-1]) if len(samples) else 0,
            "problems": problems[:MAX_SHOWN],
        }
        if processor is not None and len(samples):
            *counts, scanned = _token_counts(samples, processor, num_proc, cfg.data.special_tokens)
            report |= _token_report(*counts, cfg.data.max_length)
            report["valid"] = len(scanned.samples)  # less those the processor cannot encode
            report["with_problems"] += len(scanned.invalid)
            report["images"] = int(scanned.samples.starts[-1]) if len(scanned.samples) else 0
            report["problems"] = (problems + scanned.invalid)[:MAX_SHOWN]
            tokens.append(counts[0])
            images.append(counts[1])
        reports.append(report)
    total = {key: sum(r[key] for r in reports) for key in ("records", "valid", "with_problems", "images")}
    if tokens:
        by_rule = None if any(i is None for i in images) else np.concatenate(images)
        total |= _token_report(np.concatenate(tokens), by_rule, cfg.data.max_length)
    return {"sources": reports, "total": total, "student": student, "max_length": cfg.data.max_length}


def _token_counts(samples, processor, num_proc: int | None, special_tokens: str) -> tuple:
    """([n] tokens per sample (the length scan, every sample kept that the processor can encode), [n] image tokens
    per sample from the processor's size rule (None for a processor without one), the scanned `VLDataset`: its
    `samples` those n, its `invalid` the problems of the samples the processor cannot encode)."""
    dataset = VLDataset(
        samples,
        {"student": processor},
        max_length=sys.maxsize,
        num_proc=num_proc,
        special_tokens=special_tokens,
        skip_invalid=True,
    )
    tokens, kept = np.asarray(dataset.lengths, dtype=np.int64), dataset.samples
    if not hasattr(processor, "_get_num_multimodal_tokens") or not len(kept):
        return tokens, None, dataset
    per_image = np.asarray(rule_tokens(processor, [tuple(s) for s in kept.sizes.tolist()]), dtype=np.int64)
    starts = np.asarray(kept.starts, dtype=np.int64)
    summed = np.concatenate([[0], np.cumsum(per_image)])
    return tokens, summed[starts[1:]] - summed[starts[:-1]], dataset


def _token_report(tokens: np.ndarray, images: np.ndarray | None, max_length: int) -> dict:
    report = {"text_tokens": _stats(tokens - images if images is not None else tokens)}
    report["image_tokens"] = _stats(images) if images is not None else None
    report["over_max_length"] = int((tokens > max_length).sum())
    return report


def _stats(values: np.ndarray) -> dict | None:
    if not len(values):
        return None
    low, median, p99, high = np.percentile(values, [0, 50, 99, 100], method="nearest").tolist()
    return dict(zip(STATS, (int(low), int(median), int(p99), int(high)), strict=True))


def format_report(report: dict) -> str:
    """The report as one screen of text."""
    lines = []
    for part in [*report["sources"], {"source": "total", **report["total"]}]:
        lines.append(
            f"{part['source']}: {part['records']} records ({part['with_problems']} with problems), "
            f"{part['images']} images in the valid ones"
        )
        if "text_tokens" in part:
            tokens = ", ".join(
                f"{kind} tokens " + " / ".join(f"{stat} {part[key][stat]}" for stat in STATS)
                for kind, key in (("text", "text_tokens"), ("image", "image_tokens"))
                if part[key] is not None
            )
            lines.append(f"  {tokens}; {part['over_max_length']} over data.max_length={report['max_length']}")
        for problem in part.get("problems", []):
            lines.append(f"  {problem}")
        if part.get("with_problems", 0) > len(part.get("problems", [])) and part["source"] != "total":
            lines.append(f"  ... ({part['with_problems']} records with problems in all)")
    if report["student"] is None:
        lines.append("(token counts: add --student MODEL)")
    return "\n".join(lines)
