"""The evaluation table (laid out like the paper's Tables 4–6) and the metric-vs-label-fraction plot.

Rows are initializations; columns are dataset × label fraction; a cell is mean ± std over seeds, in percent as
the paper prints them. Where a dataset is one of the paper's, the paper's ECAMP number stands beside ours. The
`pixels` row (no encoder, `models.evaluate.baseline`) is the reference every encoder must beat: the table says
what it is under each table, and the plot draws it as a dashed grey line.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

# ECAMP's published numbers (1 / 10 / 100 % labels), paper Tables 4–6.
PAPER: dict[tuple[str, str], dict[int, float]] = {
    ("finetune", "chestxray14"): {1: 81.9, 10: 85.1, 100: 86.7},
    ("finetune", "chexpert"): {1: 88.8, 10: 89.5, 100: 89.7},
    ("finetune", "rsna"): {1: 91.5, 10: 93.2, 100: 94.2},
    ("finetune", "covidx"): {1: 83.0, 10: 95.5, 100: 97.5},
    ("linear_probe", "chestxray14"): {1: 81.0, 10: 83.8, 100: 85.1},
    ("linear_probe", "chexpert"): {1: 89.3, 10: 89.5, 100: 89.7},
    ("linear_probe", "rsna"): {1: 91.4, 10: 92.9, 100: 93.5},
    ("linear_probe", "covidx"): {1: 86.3, 10: 95.0, 100: 96.0},
    ("segmentation", "siim"): {1: 67.3, 10: 70.8, 100: 84.5},
    ("segmentation", "rsna"): {1: 77.1, 10: 78.6, 100: 79.5},
    ("detection", "rsna"): {1: 19.8, 10: 28.0, 100: 31.6},
}
TITLES = {
    "finetune": "Classification, fine-tuned",
    "linear_probe": "Classification, linear probe",
    "segmentation": "Segmentation",
    "detection": "Detection",
}
METRIC_NAMES = {"auc": "AUC", "accuracy": "ACC", "dice": "Dice", "map": "mAP"}
PIXELS = "pixels"  # models.evaluate.baseline.PIXELS (this module stays free of torch)
PIXELS_NOTE = {
    "finetune": "a linear model on the {s}×{s} image (no encoder to fine-tune: the linear probe's number)",
    "linear_probe": "a linear model on the {s}×{s} image, no encoder",
    "segmentation": "the same head on the raw grey patches, no encoder",
    "detection": "the same head on the raw grey patches, no encoder",
}


def summarize(
    rows: Sequence[dict[str, Any]],
) -> dict[tuple[str, str, str, str, int], tuple[float, float, int]]:
    """(task, metric, dataset, init, fraction) -> (mean, population std, n seeds), values in percent."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["metric"], r["dataset"], r["init"], int(r["fraction"]))].append(100 * r["value"])
    return {k: (mean(v), pstdev(v), len(v)) for k, v in groups.items()}


def _ordered(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def results_table(
    rows: Sequence[dict[str, Any]], paper_names: dict[str, str] | None = None, pixel_size: int = 32
) -> str:
    """Markdown: one table per (task, metric); `paper_names` maps our dataset name to the paper's key;
    `pixel_size` is the side of the image the `pixels` row's classifier reads (said under the table)."""
    stats = summarize(rows)
    paper_names = paper_names or {}
    out: list[str] = []
    for task, metric in _ordered([(r["task"], r["metric"]) for r in rows]):
        mine = [r for r in rows if r["task"] == task and r["metric"] == metric]
        datasets, inits = _ordered([r["dataset"] for r in mine]), _ordered([r["init"] for r in mine])
        fractions = sorted({int(r["fraction"]) for r in mine})
        cols = [(d, f) for d in datasets for f in fractions]
        out += [
            f"### {TITLES.get(task, task)} — {METRIC_NAMES.get(metric, metric)} (%, mean ± std over seeds)",
            "",
        ]
        out.append("| init | " + " | ".join(f"{d} {f}%" for d, f in cols) + " |")
        out.append("|---|" + "---|" * len(cols))
        for init in inits:
            cells = []
            for d, f in cols:
                s = stats.get((task, metric, d, init, f))
                cells.append("—" if s is None else f"{s[0]:.1f} ± {s[1]:.1f}")
            out.append(f"| {init} | " + " | ".join(cells) + " |")
        paper = [PAPER.get((task, paper_names.get(d, "")), {}).get(f) for d, f in cols]
        if any(p is not None for p in paper):
            out.append(
                "| ECAMP (paper) | " + " | ".join("—" if p is None else f"{p:.1f}" for p in paper) + " |"
            )
        n_seeds = sorted({s[2] for k, s in stats.items() if k[0] == task and k[1] == metric})
        out += ["", f"seeds per cell: {', '.join(map(str, n_seeds))}"]
        if PIXELS in inits:
            out.append(f"{PIXELS}: " + PIXELS_NOTE.get(task, "no encoder").format(s=pixel_size))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per (task, dataset): metric vs label fraction (log x), a line with seed error bars per
    init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = summarize(rows)
    panels = _ordered([(r["task"], r["metric"], r["dataset"]) for r in rows])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (task, metric, dataset) in zip(axes[0], panels, strict=True):
        for init in _ordered([r["init"] for r in rows if (r["task"], r["dataset"]) == (task, dataset)]):
            pts = sorted((k[4], v) for k, v in stats.items() if k[:4] == (task, metric, dataset, init))
            style = dict(linestyle="--", color="0.45", marker="s") if init == PIXELS else dict(marker="o")
            ax.errorbar(
                [p[0] for p in pts],
                [p[1][0] for p in pts],
                yerr=[p[1][1] for p in pts],
                capsize=3,
                label=init,
                **style,
            )
        ax.set_xscale("log")
        ax.set_xlabel("label fraction (%)")
        ax.set_ylabel(f"{METRIC_NAMES.get(metric, metric)} (%)")
        ax.set_title(f"{TITLES.get(task, task)}\n{dataset}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
