"""DIR/report.md for `vlsi study`, formatted from results.json alone (the two always agree)."""

from __future__ import annotations

from pathlib import Path

from .report import noise, pct, signed

METHOD_NAMES = (
    ("sft", "SFT only"),
    ("sft_teacher", "SFT with the teacher's answers"),
    ("kd", "final-layer KD"),
    ("vlsi", "VLsI"),
    ("ce_kld", "CE / KLD control"),
    ("kd_on_policy", "on-policy KD"),
    ("vlsi_on_policy", "on-policy VLsI"),
)


def _methods(r: dict) -> list[tuple[str, str]]:
    """The methods this study ran (the CE / KLD control only with `control=1`)."""
    first = next(iter(r["table"].values()))
    return [(m, label) for m, label in METHOD_NAMES if m in first]


def _point(r: dict, n: str) -> str:
    return f"{n} interaction steps" if r["settings"]["axis"] == "steps" else f"{n} labelled"


def _cell(stats: dict) -> str:
    """'75.3 [73.1, 77.5]': the mean over seeds and its 95 % t CI (the mean alone for one seed)."""
    if stats["low"] is None:
        return pct(stats["mean"])
    return f"{pct(stats['mean'])} [{pct(stats['low'])}, {pct(stats['high'])}]"


def seed_difference(name: str, c: dict) -> str:
    """'+0.3 points over final-layer KD (95 % CI -1.2 to +1.8 over 8 seeds: within noise, ...)' from a
    `stats.paired_seeds` result."""
    if c["low"] is None:
        return f"{signed(c['difference'])} points against {name} (one seed: no interval)"
    return (
        f"{signed(c['difference'])} points against {name} (95 % CI {signed(c['low'])} to {signed(c['high'])} over "
        f"{c['n']} seeds, paired t: {noise(c)})"
    )


def findings(r: dict) -> list[str]:
    """One line per labelled-set size: the best student and VLsI's seed-level paired differences."""
    lines = []
    for n, row in r["table"].items():
        best = max(_methods(r), key=lambda m: row[m[0]]["mean"])[1]
        paired = row["paired"]
        line = (
            f"- **{_point(r, n)}**: best {best}; VLsI is {seed_difference('SFT only', paired['vlsi_vs_sft'])}, "
            f"{seed_difference('SFT with the teacher answers', paired['vlsi_vs_sft_teacher'])}, "
            f"{seed_difference('final-layer KD', paired['vlsi_vs_kd'])}; before the last SFT stage "
            f"{seed_difference('final-layer KD', row['paired_before_sft']['vlsi_vs_kd'])}"
        )
        if "vlsi_vs_ce_kld" in paired:
            line += (
                f". Teacher layers or deep supervision: VLsI is "
                f"{seed_difference('the CE / KLD control', paired['vlsi_vs_ce_kld'])}; before the last SFT stage "
                f"{seed_difference('it', row['paired_before_sft']['vlsi_vs_ce_kld'])}"
            )
        if "vlsi_on_policy_vs_vlsi" in paired:
            line += (
                f". On the student's own samples (λ = {r['settings']['on_policy']:g}): on-policy KD is "
                f"{seed_difference('final-layer KD', paired['kd_on_policy_vs_kd'])}, on-policy VLsI "
                f"{seed_difference('VLsI', paired['vlsi_on_policy_vs_vlsi'])}; against SFT with the teacher answers "
                f"on-policy KD {seed_difference('it', paired['kd_on_policy_vs_sft_teacher'])}, on-policy VLsI "
                f"{seed_difference('it', paired['vlsi_on_policy_vs_sft_teacher'])}"
            )
        lines.append(line + ".")
    return lines


def write_study_report(out: Path, r: dict) -> Path:
    s = r["settings"]
    methods = _methods(r)
    head = [
        "interaction steps" if s["axis"] == "steps" else "labelled questions",
        *(label for _, label in methods),
        *(f"{label}, before its last SFT" for _, label in methods),
    ]
    axis = (
        f"by interaction steps (the budget curve; {s['n_labelled']} labelled questions, {s['sft_steps']} SFT steps)"
        if s["axis"] == "steps"
        else "by labelled questions"
    )
    lines = [
        f"# vlsi study: {', '.join(label for _, label in methods)}, {axis}",
        "",
        f"{'Held-out test' if s['eval_split'] == 'test' else 'Validation'} split: {r['n_test']} questions "
        f"({s['tasks']}; answered as {s['styles']}; {r['n_clusters']} task x pattern clusters). Accuracy in %, "
        f"mean over {len(r['seeds'])} seeds [95 % t confidence interval from the seed-to-seed spread]; differences "
        "are paired by seed (each seed trains every student once), never pooled over items. Teacher "
        f"{pct(r['teacher'])}, student initialisation {pct(r['student_init'])}. "
        f"Every run also has {s['n_pool']} questions answered by the teacher (every student but SFT only trains on "
        "them; SFT only has no teacher).",
        "",
        "![accuracy vs labelled questions](study.png)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for n, row in r["table"].items():
        cells = [_cell(row[m]) for m, _ in methods] + [_cell(row[f"{m}_before_sft"]) for m, _ in methods]
        lines.append("| " + " | ".join([n, *cells]) + " |")
    lines += [
        "",
        *findings(r),
        "",
        "## Run",
        "",
        f"- command: `vlsi study --output {out}{' --fast' if s['fast'] else ''}`; settings "
        + ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("fast", "seed")),
        f"- wall time {r['seconds']:.0f} s ({r['run_seconds']:.0f} s of runs); peak memory "
        f"{r['peak_memory_mib']['main']:.0f} MiB (main process), {r['peak_memory_mib']['largest_child']:.0f} MiB "
        f"(largest run); {r['machine']}",
        "- per run: the budget and schedule of `vlsi demo` (docs/DEMO.md); `runs/n<size>-seed<k>/` holds each run.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
