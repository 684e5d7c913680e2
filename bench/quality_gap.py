"""The gap between global mining and the best baseline at equal CPU time, against the number of classes.

Reads the summaries bench/quality.py wrote for the composed-digit tasks (``--task pairs``, ``triples``,
``quads``: 100, 1000 and 10,000 classes) and, per task and protocol, takes MAP@R at the longest common
time budget (the shortest run's clock): the default global configuration (``global``), the best baseline
(in-batch, pytorch-metric-learning and XBM rows; random is no contender) and the best lever (another global
configuration). The gap is ``global - best baseline``; its error is the standard deviation of a difference of
two independent means over seeds, ``sqrt(s_g² + s_b²)``, and beside it the seeds' spread, the larger of the
two stds, which is what the verdict compares the gap with.

Usage: ``.venv/bin/python bench/quality_gap.py RESULTS.json [RESULTS.json ...] [--out bench/results]``;
writes ``many_classes_gap.{md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CLASSES = {"pairs": 100, "triples": 1000, "quads": 10_000}
BASELINE_GROUPS = ("in-batch", "external")


def gap_rows(summary: dict[str, Any], task: str, default: str = "global") -> list[dict[str, Any]]:
    """One row per protocol of a task's summary: the default, best baseline and best lever at the last budget."""
    rows = []
    for protocol, s in summary.items():
        b = s["budgets"][-1]
        key = f"map_at_r@{b}s"
        by = {r["method"]: r for r in s["rows"]}
        if default not in by:
            continue
        base = [r for r in s["rows"] if r["group"] in BASELINE_GROUPS]
        levers = [r for r in s["rows"] if r["group"] == "lever"]
        best = max(base, key=lambda r: r[key]["mean"])
        g, o = by[default][key], best[key]
        row = {"task": task, "classes": CLASSES[task], "protocol": protocol, "budget_s": b,
               "global": g, "baseline": best["method"], "baseline_cell": o,
               "gap": g["mean"] - o["mean"], "gap_err": math.hypot(g["std"], o["std"]),
               "spread": max(g["std"], o["std"]), "seeds": by[default]["seeds"]}
        if levers:
            lever = max(levers, key=lambda r: r[key]["mean"])
            row.update(lever=lever["method"], lever_cell=lever[key], lever_gap=lever[key]["mean"] - o["mean"])
        rows.append(row)
    return rows


def cell(c: dict[str, float]) -> str:
    return f"{c['mean']:.3f} ± {c['std']:.3f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["classes", "protocol", "budget (CPU s)", "global (default)", "best baseline", "its MAP@R",
            "gap", "seeds' spread", "best lever", "its MAP@R"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lever = [r.get("lever", "-"), cell(r["lever_cell"]) if "lever_cell" in r else "-"]
        lines.append("| " + " | ".join([f"{r['classes']:,}", r["protocol"], f"{r['budget_s']:g}", cell(r["global"]),
                                         r["baseline"], cell(r["baseline_cell"]),
                                         f"{r['gap']:+.3f} ± {r['gap_err']:.3f}", f"{r['spread']:.3f}", *lever])
                     + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, protocol in enumerate(sorted({r["protocol"] for r in rows})):
        rs = sorted((r for r in rows if r["protocol"] == protocol), key=lambda r: r["classes"])
        x = [r["classes"] * (1.04 if i else 1 / 1.04) for r in rs]  # side by side, not on top of each other
        ax.errorbar(x, [r["gap"] for r in rs], yerr=[r["gap_err"] for r in rs], marker="o", capsize=3,
                    label=f"{protocol}: global (default) − best baseline")
        if all("lever_gap" in r for r in rs):
            ax.plot(x, [r["lever_gap"] for r in rs], marker="x", ls=":", color=ax.lines[-1].get_color(),
                    label=f"{protocol}: best global lever − best baseline")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set(xlabel="classes (composed digits; few items each from 1000 on)",
           ylabel="MAP@R gap at equal CPU time", title="Global mining against the best baseline")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="bench/quality.py JSON files (one per task)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    rows = []
    for path in args.results:
        data = json.loads(path.read_text())
        rows += gap_rows(data["summary"], data["task"])
    rows.sort(key=lambda r: (r["protocol"], r["classes"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "many_classes_gap.md").write_text(markdown(rows))
    plot(rows, args.out / "many_classes_gap.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
