"""The run's PNG plot: training loss and retrieval metrics over epochs (matplotlib, headless Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

PLOTTED_METRICS = {"precision_at_1": "P@1", "recall_at_5": "Recall@5", "r_precision": "R-Precision",
                   "map_at_r": "MAP@R"}


def plot_history(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Draw ``history`` (one record per epoch, as in metrics.jsonl) to ``path``: loss left, metrics right."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metrics) = plt.subplots(1, 2, figsize=(10, 4))
    trained = [r for r in history if r.get("loss") is not None]
    ax_loss.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], marker="o")
    spans = refresh_spans(history)
    if spans is None:  # older records: a new snapshot, or the recipe refreshed from a sample, before the epoch
        spans = [(r["epoch"], r["epoch"]) for r in history
                 if r.get("snapshot") is not None or r.get("mining") is not None]
    for start, end in spans:
        if end > start:  # asynchronous: from the step of its weights to the step of the take-over
            ax_loss.axvspan(start, end, color="tab:orange", alpha=0.15, linewidth=0)
        else:
            ax_loss.axvline(start, color="grey", alpha=0.3, linestyle="--")
    shaded = any(end > start for start, end in spans)
    ax_loss.set(title=f"training loss ({'shaded: a refresh in flight' if shaded else 'dashed: refresh'})",
                xlabel="epoch", ylabel="mean loss")
    for key, label in PLOTTED_METRICS.items():
        points = [(r["epoch"], r["metrics"][key]) for r in history if key in r.get("metrics", {})]
        if points:
            ax_metrics.plot(*zip(*points), marker="o", label=label)
    ax_metrics.set(title="retrieval on the evaluation split (epoch 0: untrained)", xlabel="epoch", ylim=(0, 1))
    ax_metrics.legend(loc="lower right")
    for ax in (ax_loss, ax_metrics):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def refresh_spans(history: Sequence[dict[str, Any]]) -> list[tuple[float, float]] | None:
    """Each refresh's span ``[step of its weights, step its data took over]`` on the epoch axis (epoch ``e``'s
    point sits at the end of its steps; steps in between are placed linearly); None for a history without
    step-level refresh records (runs of older releases)."""
    import numpy as np

    if not any(r.get("refresh") for r in history):
        return None
    steps = np.array([r["step"] for r in history], dtype=float)
    epochs = np.array([r["epoch"] for r in history], dtype=float)
    spans = [s for r in history if r.get("refresh") for s in r["refresh"]["spans"]]
    return [(float(np.interp(a, steps, epochs)), float(np.interp(b, steps, epochs))) for a, b in spans]
