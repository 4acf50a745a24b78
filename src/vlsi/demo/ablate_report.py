"""DIR/report.md for `vlsi ablate`: each table with the mean and t CI over seeds, the paper's numbers beside it, and
what the numbers say. Every number is formatted from results.json, so the two always agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .report import command_line, pct, peak_memory, signed
from .stats import MARGIN, paired_seeds


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs or a constant side."""
    if len(a) < 3:
        return None

    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):  # ties share their mean rank
            r[x == value] = r[x == value].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def table_verdict(rows: list[dict], n_seeds: int) -> str:
    """Best row; which rows are within noise of it (the 95 % t CI of their difference, paired by seed, holds 0) and
    which are shown equivalent to it within the margin (TOST); agreement with the paper."""
    trained = [r for r in rows if r["run"] not in ("init", "teacher")]
    best = max(trained, key=lambda r: r["accuracy"]["mean"])
    close, equivalent = [], []
    for r in trained:
        if r is best or n_seeds < 2:
            continue
        difference = paired_seeds(best["accuracy"]["per_seed"], r["accuracy"]["per_seed"])
        if difference["low"] <= 0:
            close.append(r["label"])
        if difference["equivalent"]:
            equivalent.append(r["label"])
    text = f"Best: {best['label']} ({pct(best['accuracy']['mean'])} %)."
    if n_seeds > 1:
        text += (
            f" Within noise of it (the 95 % t CI of the difference, paired by seed over {n_seeds} seeds, holds 0): "
            + (", ".join(close) if close else "none")
            + f". Shown equivalent to it within ±{pct(MARGIN)} points (TOST, 5 %): "
            + (", ".join(equivalent) if equivalent else "none")
            + "."
        )
    paired = [(r["accuracy"]["mean"], r["paper"]["MMB"]) for r in trained if r["paper"].get("MMB") is not None]
    rho = rank_correlation([a for a, _ in paired], [b for _, b in paired])
    if rho is not None:
        text += f" Rank correlation with the paper's MMBench column over {len(paired)} rows: {rho:+.2f}."
    return text


def _paper(row: dict) -> list[str]:
    return ["" if v is None else f"{v:.1f}" for v in row["paper"].values()]


def _interval(c: dict) -> str:
    """'77.2 [76.1, 78.3]' from `stats.seed_mean` (the mean alone for one seed)."""
    if c["low"] is None:
        return f"**{pct(c['mean'])}**"
    return f"**{pct(c['mean'])}** [{pct(c['low'])}, {pct(c['high'])}]"


def _versus(c: dict | None) -> str:
    """'-1.8 [-3.5, -0.1]' from `stats.paired_seeds`, with "≈" where TOST shows it within the margin."""
    if c is None:
        return ""
    if c["low"] is None:
        return signed(c["difference"])
    mark = " ≈" if c["equivalent"] else ""
    return f"{signed(c['difference'])} [{signed(c['low'])}, {signed(c['high'])}]{mark}"


def _table(table: dict, n_seeds: int) -> list[str]:
    columns = list(table["rows"][0]["paper"])
    head = [
        "row",
        "accuracy, mean [95 % CI]",
        "per seed",
        "minus VLsI, paired by seed [95 % CI]",
        *(f"paper {c}" for c in columns),
        "settings",
    ]
    lines = [f"### {table['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"]:
        acc = row["accuracy"]
        seeds = " / ".join(pct(v) for v in acc["per_seed"])
        settings = " ".join(f"`{x}`" for x in row["settings"])
        if row["checkpoint"] == "interact":
            settings = "(the VLsI run, before its SFT stage)"
        elif row["run"] == "init":
            settings = "(shipped, not trained: one number)"
        elif row["run"] == "sft":
            settings = "(SFT alone, from the initialisation)"
        elif row["run"] == "vlsi":
            settings = "(the defaults: adaptive temperature, search range, order; KLD / KLD)"
        cells = [row["label"], _interval(acc), seeds, _versus(row.get("vs_vlsi")), *_paper(row), settings]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", table_verdict(table["rows"], n_seeds)]
    return lines


def write_ablate_report(out: Path, r: dict) -> Path:
    s, b = r["settings"], r["budget"]
    split = "held-out test" if s["eval_split"] == "test" else "validation (settings being chosen: not final numbers)"
    lines = [
        "# vlsi ablate: the paper's ablations at demo scale",
        "",
        f"Accuracy in % on the demo's {split} split, **{r['n_test']} questions**, chance {pct(r['chance'])} %, "
        f"the shipped teacher {pct(r['teacher'])} %. Each row: mean over seeds {r['seeds']} with its 95 % t confidence "
        "interval from the seed-to-seed spread (the seed sets the data order, the initialisation of the verbalizers "
        "and the matching draws; the test questions are the same for every seed), and its difference to the VLsI row "
        f"paired by seed, with its t interval; ≈ marks a difference shown to lie within ±{pct(MARGIN)} points "
        "(TOST at 5 %).",
        "",
        f"Data ({', '.join(s['tasks'].split(','))} questions, answered as {s['styles']}): {s['n_labelled']} "
        f"labelled training questions and {s['n_pool']} more answered by the teacher (once, shared by every run); "
        f"every stage warms up for {s['warmup']:.0%} of its steps and decays (cosine) from lr {s['lr']:g} to "
        f"{s['min_lr_ratio']:g} x lr. "
        f"Budget of every VLsI row, per seed: the student's verbalizers trained once "
        f"({b['verbalize_steps (once per seed, shared)']} steps, shared by every row of that seed), then "
        f"{b['interact_steps']} interaction steps with the row's setting and {b['sft_steps']} SFT steps, batch "
        f"{b['batch_size']}, full fine-tuning of the student's language model (vision tower and LM head frozen). "
        "The paper's columns are its 7B student on MMBench, BLINK, MM-Vet and MMMU (docs/METHOD.md, "
        "ablations), for orientation only: a different scale, task and metric.",
        "",
    ]
    for table in r["tables"].values():
        lines += [*_table(table, len(r["seeds"])), ""]
    lines += [
        "## Run",
        "",
        command_line("ablate", out, s),
        f"- wall time {r['seconds']:.0f} s ({r['run_seconds']:.0f} s of runs, {r['machine']}); "
        f"{peak_memory(r, 'worker')}",
        "- `results.json` holds every number above; `runs/<run>/seed-<n>/` each run's `vlsi train` output, "
        "`score.json` and `log.txt`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
