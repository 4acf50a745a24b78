"""DIR/report.md for `vlsi study`, formatted from results.json alone (the two always agree)."""

from __future__ import annotations

from pathlib import Path

from .report import _compare, pct

METHOD_NAMES = (
    ("sft", "SFT only"),
    ("sft_teacher", "SFT with the teacher's answers"),
    ("kd", "final-layer KD"),
    ("vlsi", "VLsI"),
)


def _cell(stats: dict) -> str:
    return f"{pct(stats['mean'])} ± {pct(stats['std'])}"


def findings(r: dict) -> list[str]:
    """One line per labelled-set size: the best student and VLsI's paired differences, from the numbers alone."""
    lines = []
    for n, row in r["table"].items():
        best = max(METHOD_NAMES, key=lambda m: row[m[0]]["mean"])[1]
        lines.append(
            f"- **{n} labelled**: best {best}; VLsI is {_compare('SFT only', row['paired']['vlsi_vs_sft'])}, "
            f"{_compare('SFT with the teacher answers', row['paired']['vlsi_vs_sft_teacher'])}, "
            f"{_compare('final-layer KD', row['paired']['vlsi_vs_kd'])} (paired over {len(r['seeds'])} seeds' "
            "test items)."
        )
    return lines


def write_study_report(out: Path, r: dict) -> Path:
    s = r["settings"]
    head = [
        "labelled questions",
        *(label for _, label in METHOD_NAMES),
        *(f"{label}, before its last SFT" for _, label in METHOD_NAMES),
    ]
    lines = [
        "# vlsi study: SFT only, SFT with the teacher's answers, final-layer KD and VLsI, by labelled questions",
        "",
        f"{'Held-out test' if s['eval_split'] == 'test' else 'Validation'} split: {r['n_test']} questions "
        f"({s['tasks']}; answered as {s['styles']}). Accuracy in %, mean ± standard deviation over "
        f"{len(r['seeds'])} seeds. Teacher {pct(r['teacher'])}, student initialisation {pct(r['student_init'])}. "
        f"Every run also has {s['n_pool']} questions answered by the teacher (every student but SFT only trains on "
        "them; SFT only has no teacher).",
        "",
        "![accuracy vs labelled questions](study.png)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for n, row in r["table"].items():
        cells = [_cell(row[m]) for m, _ in METHOD_NAMES] + [_cell(row[f"{m}_before_sft"]) for m, _ in METHOD_NAMES]
        lines.append("| " + " | ".join([n, *cells]) + " |")
    lines += [
        "",
        *findings(r),
        "",
        "## Run",
        "",
        f"- command: `vlsi study --output {out}{' --fast' if s['fast'] else ''}`; settings "
        + ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("fast", "n_labelled", "seed")),
        f"- wall time {r['seconds']:.0f} s ({r['run_seconds']:.0f} s of runs); peak memory "
        f"{r['peak_memory_mib']['main']:.0f} MiB (main process), {r['peak_memory_mib']['largest_child']:.0f} MiB "
        f"(largest run); {r['machine']}",
        "- per run: the budget and schedule of `vlsi demo` (docs/DEMO.md); `runs/n<size>-seed<k>/` holds each run.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
