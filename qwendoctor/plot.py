"""The tune plot: seconds per image against PSNR for every trial, feasible and infeasible marked, written as a
PNG beside the lock, so the trade-off the study saw can be read at a glance."""

from __future__ import annotations

import math
import os
from typing import Any

from qwendoctor import files, quality


def plot_path(lock_path: str) -> str:
    stem, _ = os.path.splitext(lock_path)
    return f"{stem}-tune.png"


def write_tune_plot(rows: list[dict[str, Any]], baseline_s: float, best_number: int, floor: quality.Floor,
                    path: str, title: str) -> str:
    """Draw the trials and write the PNG atomically; returns the path. Failed trials have no point (no
    latency); the legend counts them. Trials skipped as slower are drawn at their estimate, in a row below."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file is the product
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["state"] != "failed" and r.get("latency_median_s") is not None]
    finite = [r["psnr_db"] for r in measured if r.get("psnr_db") is not None and math.isfinite(r["psnr_db"])]
    # An exact match (PSNR infinite) is drawn just above the best finite value, and labelled so.
    exact_at = (max(finite + [floor.psnr_db]) + 5) if measured else floor.psnr_db + 5

    def y(row) -> float:
        value = row.get("psnr_db")
        return exact_at if value is None or not math.isfinite(value) else value

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for state, marker, color, label in (("complete", "o", "tab:green", "feasible"),
                                        ("infeasible", "x", "tab:red", "below the floor")):
        points = [r for r in measured if r["state"] == state]
        if points:
            axes.scatter([r["latency_median_s"] for r in points], [y(r) for r in points], marker=marker, c=color,
                         label=f"{label} ({len(points)})")
    # Trials timed but not rendered (slower than the best at the time) have no PSNR: a row of their own, under
    # everything else, at their estimated seconds per image.
    slower = [r for r in rows if r["state"] == "slower" and r.get("estimate_s") is not None]
    if slower:
        lowest = min([y(r) for r in measured] + [floor.psnr_db])
        axes.scatter([r["estimate_s"] for r in slower], [lowest - 4] * len(slower), marker="|", s=120,
                     c="grey", label=f"slower than the best, not rendered ({len(slower)})")
        axes.text(min(r["estimate_s"] for r in slower), lowest - 3.5, " estimated", va="bottom", fontsize=8,
                  color="grey")
    best = next((r for r in measured if r["number"] == best_number), None)
    if best is not None:
        axes.scatter([best["latency_median_s"]], [y(best)], marker="*", s=250, c="gold", edgecolors="black",
                     zorder=3, label=f"best: {best['profile']}")
    failed = sum(r["state"] == "failed" for r in rows)
    not_drawn = f" ({failed} failed, not drawn)" if failed else ""
    axes.axhline(floor.psnr_db, color="grey", linestyle="--", linewidth=1,
                 label=f"floor {floor.name}: {floor.psnr_db:g} dB{not_drawn}")
    axes.axvline(baseline_s, color="tab:blue", linestyle=":", linewidth=1, label=f"default: {baseline_s:.3g} s")
    axes.axhline(exact_at, color="lightgrey", linewidth=0.5)
    axes.text(axes.get_xlim()[0], exact_at, " exact", va="bottom", fontsize=8, color="grey")
    axes.set_xlabel("seconds per image (median)")
    axes.set_ylabel("PSNR vs the default's images (dB)")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7, loc="best")  # the slower-trials row runs along the bottom
    figure.tight_layout()
    try:
        with files.atomic_write(path, "wb") as handle:
            figure.savefig(handle, format="png")
    finally:
        plt.close(figure)
    return path
