"""Drift between consecutive snapshots of a real training run, plotted against the run's MAP@R.

Runs today's ``hardneg train`` on digits with a snapshot every epoch, all kept (a TOML config:
``refresh_every = 1``, ``keep_snapshots = 100``; nothing else changed), then compares each snapshot with the
next (:func:`hardneg.miner.drift.snapshot_drift`, k=10, every item an anchor): neighbour overlap, the share
of items whose hardest negative changed, and the mean class-centroid shift. ``--store`` and ``--run-dir``
reuse a finished run instead of training.

Usage: ``.venv/bin/python bench/drift.py [--epochs 40] [--out docs/drift.png]``; the numbers also go to
``bench/results/drift.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hardneg.miner.drift import snapshot_drift  # noqa: E402
from hardneg.miner.store import SnapshotStore  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def train(work: Path, epochs: int, seed: int) -> tuple[Path, Path]:
    config = work / "drift.toml"
    config.write_text(f"epochs = {epochs}\nrefresh_every = 1\nkeep_snapshots = 100\nseed = {seed}\n"
                      f'store = "{work / "store"}"\nrun_dir = "{work / "run"}"\n')
    subprocess.run([sys.executable, "-m", "hardneg.cli", "train", "--config", str(config)], check=True,
                   capture_output=True, text=True)
    return work / "store", work / "run"


def consecutive_drift(store_dir: Path, k: int) -> list[dict]:
    store = SnapshotStore(store_dir)
    names = store.names()  # oldest first
    out = []
    prev = store.open(names[0])
    for name in names[1:]:
        cur = store.open(name)
        d = snapshot_drift(prev.index, cur.index, k=k, sample=prev.index.count)
        out.append({"from": prev.name, "to": cur.name, "epoch": cur.manifest["meta"].get("epoch"),
                    "overlap": d.overlap_mean, "hardest_negative_changed": d.hardest_negative_changed,
                    "centroid_shift": d.centroid_shift_mean})
        prev = cur
    return out


def plot(rows: list[dict], metrics: list[dict], out: Path, k: int) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["overlap"] for r in rows], "o-", label=f"neighbour overlap at k={k}")
    ax.plot(epochs, [r["hardest_negative_changed"] for r in rows], "s-", label="hardest negative changed")
    ax.plot(epochs, [r["centroid_shift"] for r in rows], "^-", label="class-centroid shift (mean d²)")
    ax.plot([m["epoch"] for m in metrics], [m["metrics"]["map_at_r"] for m in metrics], "k--", label="MAP@R (eval)")
    ax.set_xlabel("epoch (snapshot compared with the previous epoch's)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title("Drift between consecutive snapshots, digits, default recipe")
    fig.legend(loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--store", type=Path, help="reuse this finished run's store (with --run-dir)")
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/drift.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hardneg-drift-") as tmp:
        store, run = (args.store, args.run_dir) if args.store else train(Path(tmp), args.epochs, args.seed)
        rows = consecutive_drift(store, args.k)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "drift.json").write_text(json.dumps({"drift": rows, "metrics": metrics}, indent=1))
    plot(rows, metrics, args.out, args.k)
    for r in rows:
        print(f"epoch {r['epoch']:>3}  overlap {r['overlap']:.3f}  hardest-negative changed "
              f"{r['hardest_negative_changed']:.3f}  centroid shift {r['centroid_shift']:.4f}")
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
