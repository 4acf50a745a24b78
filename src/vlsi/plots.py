"""Plots written during `vlsi train`: per-layer verbalizer loss curves, and layer matching early vs late."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_verbalizer_loss(metrics: Path, png: Path) -> Path | None:
    """One panel per model (teacher, student): a loss curve per target layer over the verbalize stage."""
    curves: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in _read_jsonl(metrics):
        if row["stage"].startswith("verbalize/"):
            who = row["stage"].split("/", 1)[1]
            for key, value in row.items():
                if key.startswith("loss/layer"):
                    curves[who][key.removeprefix("loss/")].append((row["step"], value))
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4), squeeze=False)
    for ax, (who, layers) in zip(axes[0], sorted(curves.items())):
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(layers)))
        for color, (layer, points) in zip(colors, sorted(layers.items(), key=lambda kv: int(kv[0][5:]))):
            steps, values = zip(*points)
            ax.plot(steps, values, color=color, label=layer)
        ax.set_title(f"{who} verbalizers")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy on response tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def match_histograms(rows: list[dict], t_l: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequency of each matched teacher target layer per student layer, first vs last third of the stage.

    Returns two arrays [t_s, t_l] whose rows sum to 1 (bottom_k picks count 1/k each).
    """
    third = max(1, len(rows) // 3)
    out = []
    for part in (rows[:third], rows[-third:]):
        t_s = len(part[0]["match"])
        freq = np.zeros((t_s, t_l))
        for row in part:
            for i, chosen in enumerate(row["match"]):
                chosen = chosen if isinstance(chosen, list) else [chosen]
                for j in chosen:
                    freq[i, j] += 1 / len(chosen)
        out.append(freq / freq.sum(1, keepdims=True))
    return out[0], out[1]


def plot_layer_match(match_log: Path, png: Path, t_l: int | None = None) -> Path | None:
    """The paper's fig. 5: for each student target layer, where its matched teacher layers fall, early vs late."""
    rows = _read_jsonl(match_log)
    if not rows:
        return None
    if t_l is None:
        t_l = 1 + max(max(c if isinstance(c, list) else [c]) for row in rows for c in row["match"])
    early, late = match_histograms(rows, t_l)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * early.shape[0] + 2.5), sharey=True)
    for ax, freq, title in ((axes[0], early, "early (first third)"), (axes[1], late, "late (last third)")):
        image = ax.imshow(freq, aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"layer matching, {title}")
        ax.set_xlabel("teacher target layer")
        ax.set_xticks(range(t_l))
        ax.set_yticks(range(freq.shape[0]))
    axes[0].set_ylabel("student target layer")
    fig.colorbar(image, ax=axes, fraction=0.03)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return png
