"""Training on noisy labels: global mining with ``--exclude-suspects`` against without, evaluated on clean labels.

Task: scikit-learn's 1797 digits, split once (seed 0) into 75% training and 25% evaluation items, stratified
(the trainer's ``heldout-samples`` split). In the training items a fraction (default 20%) of the labels is
flipped at random, each to another class drawn uniformly (``bench/audit.py``'s ``flip_labels``, seeded by the
run's seed); the evaluation items keep their clean labels. Both arms train with the trainer's defaults
(recipe ``class-batches``: 12 epochs, a snapshot before epochs 2, 6 and 10) on the same noisy ``.npz``, seed
and flips; the other arms add ``exclude_suspects`` (default 0.1 and 0.2: the top 10% / 20% of each snapshot's
label-audit suspects are left out of the batches until the next refresh). Both global-mining recipes run:
``class-batches`` (the default) and ``mined-tuples`` (the tuple miner's defaults: semi-hard triplets). Two
references bound what exclusion can reach: the same run on the training items without the flipped ones
(a perfect audit), and on clean labels.

Reported per recipe and arm: MAP@R and P@1 of the final model on the clean evaluation labels, mean ± std
over the seeds (population std); the gain per seed (paired: same flips and initial weights); the share of
flipped items among those left out at the last refresh (the audit's precision on the run's own snapshot);
and the wall and process CPU seconds of each run (one thread).

Usage: ``.venv/bin/python bench/noisy_training.py [--seeds 0 1 2] [--noise 0.2] [--fractions 0.1 0.2]
[--recipes class-batches mined-tuples]``; results go to ``bench/results/noisy_training.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit import flip_labels  # noqa: E402  (bench/audit.py: the same flips as the audit benchmark)

from hardneg.miner.audit import audit_labels  # noqa: E402
from hardneg.miner.mining.miner import suspect_k  # noqa: E402
from hardneg.miner.store import SnapshotStore  # noqa: E402
from hardneg.trainer.config import TrainConfig  # noqa: E402
from hardneg.trainer.data import load_digits, split_heldout_samples  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def train_once(train_npz: Path, eval_npz: Path, recipe: str, seed: int, fraction: float | None,
               work: Path) -> dict:
    """One run; its final metrics on the clean evaluation labels, times, and the last refresh's suspects."""
    import torch

    from hardneg.trainer.loop import Trainer

    torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = TrainConfig.from_dict({"data": f"npz:{train_npz}", "eval_data": f"npz:{eval_npz}", "recipe": recipe,
                                 "seed": seed, "threads": 1, "exclude_suspects": fraction,
                                 "store": str(work / "store"), "run_dir": str(work / "run")})
    t0, c0 = time.perf_counter(), time.process_time()
    summary = Trainer.create(cfg).run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    history = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    refreshes = [r for r in history if r["snapshot"]]
    return {"map_at_r": summary.final["map_at_r"], "precision_at_1": summary.final["precision_at_1"],
            "wall_s": wall, "cpu_s": cpu, "last_refresh": refreshes[-1]["snapshot"],
            "suspects_excluded": refreshes[-1]["mining"].get("suspects_excluded")}


def last_refresh_suspects(store: Path, name: str, fraction: float) -> np.ndarray:
    """Ids the run left out after its last refresh: the snapshot's top ``fraction`` of suspects."""
    index = SnapshotStore(store).open(name).index
    return audit_labels(index, suspect_k(index)).top(fraction)


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


def arms(args: argparse.Namespace) -> list[tuple[str, float | None]]:
    """(name, exclude_suspects) of each arm; the two references train on other data (see :func:`main`)."""
    return [("off", None), *((f"exclude_suspects {f}", f) for f in args.fractions),
            ("reference: flipped items removed", None), ("reference: no flips", None)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noise", type=float, default=0.2, help="share of training labels flipped")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2], help="exclude_suspects arms")
    ap.add_argument("--recipes", nargs="+", default=["class-batches", "mined-tuples"])
    args = ap.parse_args()
    digits = load_digits()
    train, evalset = split_heldout_samples(digits, 0.25, 0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.savez(work / "eval.npz", x=evalset.x, y=evalset.y)
        np.savez(work / "clean.npz", x=train.x, y=train.y)
        for seed in args.seeds:
            noisy, flipped = flip_labels(train.y, args.noise, seed)
            np.savez(work / f"noisy-{seed}.npz", x=train.x, y=noisy)
            np.savez(work / f"removed-{seed}.npz", x=train.x[~flipped], y=train.y[~flipped])
            data = {"reference: flipped items removed": f"removed-{seed}.npz", "reference: no flips": "clean.npz"}
            for recipe in args.recipes:
                for arm, fraction in arms(args):
                    run = work / f"{recipe}-{seed}-{len(rows)}"
                    res = train_once(work / data.get(arm, f"noisy-{seed}.npz"), work / "eval.npz", recipe, seed,
                                     fraction, run)
                    if fraction is not None:
                        left_out = last_refresh_suspects(run / "store", res["last_refresh"], fraction)
                        res["suspect_precision"] = float(flipped[left_out].mean())
                    rows.append({"recipe": recipe, "arm": arm, "seed": seed, "exclude_suspects": fraction, **res})
                    print(json.dumps(rows[-1]), flush=True)
    report = summarise(rows, args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "noisy_training.json").write_text(json.dumps({"args": vars(args), "runs": rows}, indent=2) + "\n")
    (RESULTS / "noisy_training.md").write_text(report)
    print(report)
    return 0


def summarise(rows: list[dict], args: argparse.Namespace) -> str:
    out = [f"digits, {args.noise:.0%} of training labels flipped, clean evaluation labels; seeds {args.seeds}; "
           f"mean ± std (population) over seeds", "",
           "| recipe | arm | MAP@R | P@1 | MAP@R gain over off, per seed | flipped share of the left-out | "
           "wall s / run | CPU s / run |", "|---|---|---|---|---|---|---|---|"]
    for recipe in args.recipes:
        plain = [r for r in rows if r["recipe"] == recipe and r["arm"] == "off"]
        for arm, fraction in arms(args):
            runs = [r for r in rows if r["recipe"] == recipe and r["arm"] == arm]
            gains = "" if arm == "off" else ", ".join(f"{e['map_at_r'] - p['map_at_r']:+.4f}"
                                                     for p, e in zip(plain, runs))
            prec = mean_std([r["suspect_precision"] for r in runs]) if fraction is not None else ""
            out.append(f"| {recipe} | {arm} | {mean_std([r['map_at_r'] for r in runs])} | "
                       f"{mean_std([r['precision_at_1'] for r in runs])} | {gains} | {prec} | "
                       f"{statistics.mean(r['wall_s'] for r in runs):.1f} | "
                       f"{statistics.mean(r['cpu_s'] for r in runs):.1f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
