"""Benchmark of self-supervised training: index-mined hard negatives against plain in-batch SimCLR.

Both methods train hardneg's CNN on the built-in digits (held-out samples: 1347 training images, 450
evaluation images) with ``mode = "self-supervised"``: the same augmentations, NT-Xent temperature, batch size
and optimiser, through the trainer's API (:class:`~hardneg.trainer.loop.Trainer`), for several seeds.

* ``simclr``: ``ssl_negatives = "in-batch"``, random batches (Chen et al. 2020);
* ``mined``: hardneg's default, batches composed from each refresh's snapshot so that every seed image meets
  its mined negatives (:mod:`hardneg.trainer.selfsup`); plus variants of it, one lever changed each.

The clock of a run is its training steps plus, for the mined methods, every refresh (embed the training set,
publish the snapshot with its exported model, mine): they train on what the refresh mines. ``simclr`` needs no
snapshot, so it publishes only at the end, outside its clock. MAP@R and P@1 come from the trainer's own
evaluation after every epoch (outside the clock); each run's metric is interpolated linearly at fixed time
budgets (fractions of the shortest run's time) and averaged over seeds (mean ± std, min-max).
``simclr`` runs more epochs, since its epochs cost less, so every method has data at every budget.

Also reported, from the training labels (never used to train): the share of the last refresh's mined
candidates that show the same digit as their image, i.e. false negatives (a random batch has about 10 %).

Usage: ``.venv/bin/python bench/selfsup.py [--quick] [--seeds N] [--first-seed S] [--methods a,b] [--workers 2]``;
results go to ``bench/results/selfsup.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pool import run_in_pool  # bench/pool.py: sys.path[0] is bench/ when run as a script

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = (("map_at_r", "MAP@R"), ("precision_at_1", "P@1"))
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)

log = logging.getLogger("bench.selfsup")


@dataclass(frozen=True)
class Method:
    """One configuration: TrainConfig ``changes`` over the common self-supervised ones."""

    name: str
    changes: dict[str, Any]
    mined: bool
    note: str


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("simclr", {"ssl_negatives": "in-batch"}, False, "plain SimCLR: random batches"),
    Method("mined", {}, True, "hardneg's defaults: batches composed from the snapshot"),
    Method("mined skip 16", {"ssl_skip": 16}, True, "skip 16: mostly the same digit"),
    Method("mined skip 0", {"ssl_skip": 0}, True, "no skip: the nearest neighbours are the negatives"),
    Method("mined per-anchor 3", {"ssl_per_anchor": 3}, True, "groups of 4 neighbours"),
    Method("mined refresh 5", {"refresh_every": 5}, True, "a refresh every 5 epochs"),
    Method("mined max-sim 0.9", {"ssl_max_similarity": 0.9}, True, "similarity ceiling 0.9"),
)}
DEFAULT_METHODS = ("simclr", "mined", "mined skip 16", "mined per-anchor 3")


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    epochs: int
    workdir: str


@dataclass
class RunRecord:
    """Per epoch (0 = untrained): the clock (s) and the metrics; the last mined table's same-class share."""

    method: str
    seed: int
    epochs: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    refresh_seconds: float = 0.0
    same_class_share: float | None = None


def run_one(spec: RunSpec) -> RunRecord:
    """Train one (method, seed) through the trainer's API, timing its steps and refreshes."""
    import torch

    from hardneg.trainer import loop
    from hardneg.trainer.config import TrainConfig

    torch.set_num_threads(1)
    method = METHODS[spec.method]

    tag = f"{spec.method.replace(' ', '_')}-{spec.seed}"
    cfg = TrainConfig.from_dict({
        "mode": "self-supervised", "epochs": spec.epochs, "seed": spec.seed, "keep_snapshots": 1,
        "store": str(Path(spec.workdir) / "stores" / tag), "run_dir": str(Path(spec.workdir) / "runs" / tag),
        # plain SimCLR publishes for serving only, at the end: rarely, as its clock does not include it
        **({} if method.mined else {"refresh_every": spec.epochs, "warmup_epochs": 0}),
        **method.changes,
    })
    trainer = loop.Trainer.create(cfg)
    trainer.run()
    rec = RunRecord(spec.method, spec.seed)
    total = 0.0
    for r in trainer.state.history:
        e, timing = r["epoch"], r["timing"] or {}  # the loop's clocks of the epoch (evaluation not included)
        refresh_s = timing.get("refresh_s", 0.0) if method.mined else 0.0
        total += timing.get("train_s", 0.0) + refresh_s
        rec.refresh_seconds += refresh_s
        rec.epochs.append(e)
        rec.seconds.append(round(total, 4))
        for key, _ in METRICS:
            rec.metrics.setdefault(key, []).append(r["metrics"][key])
    table = trainer.recipe.negatives  # the last refresh's mined negatives (n, C)
    if table is not None:
        y = trainer.splits.train.y
        valid = table >= 0
        rec.same_class_share = float((y[table[valid]] == np.repeat(y, valid.sum(1))).mean())
    return rec


def run_all(specs: Sequence[RunSpec], workers: int) -> list[RunRecord]:
    return run_in_pool(run_one, specs, workers, lambda spec, rec: (
        f"{spec.method:<20} seed {spec.seed}: MAP@R {rec.metrics['map_at_r'][-1]:.3f} after {rec.epochs[-1]} "
        f"epochs ({rec.seconds[-1]:.1f} s, refresh {rec.refresh_seconds:.1f} s)"))


# ------------------------------------------------------------------------------------------------ summary
def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std, min and max of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def at_time(rec: RunRecord, key: str, seconds: float) -> float:
    """The metric at ``seconds`` of the run's clock, linearly interpolated between evaluated epochs."""
    if seconds > rec.seconds[-1] + 1e-9:
        return math.nan
    return float(np.interp(seconds, rec.seconds, rec.metrics[key]))


def summarise(records: Sequence[RunRecord], compare_epoch: int) -> dict[str, Any]:
    methods = list(dict.fromkeys(r.method for r in records))
    shortest = min(r.seconds[-1] for r in records)  # every run has data at every budget
    budgets = [round(f * shortest, 2) for f in BUDGET_FRACTIONS]
    rows = []
    for m in methods:
        runs = [r for r in records if r.method == m]
        row: dict[str, Any] = {
            "method": m, "note": METHODS[m].note, "seeds": len(runs), "epochs": runs[0].epochs[-1],
            "seconds_per_epoch": float(np.mean([r.seconds[-1] / r.epochs[-1] for r in runs])),
            "untrained": spread([r.metrics["map_at_r"][0] for r in runs]),
            "same_class_share": (spread([r.same_class_share for r in runs])
                                 if all(r.same_class_share is not None for r in runs) else None),
        }
        for key, _ in METRICS:
            row[f"{key}@epoch{compare_epoch}"] = spread([r.metrics[key][r.epochs.index(compare_epoch)] for r in runs])
            for b in budgets:
                row[f"{key}@{b}s"] = spread([at_time(r, key, b) for r in runs])
        rows.append(row)
    return {"budgets": budgets, "compare_epoch": compare_epoch, "rows": rows}


def verdict(summary: dict[str, Any], baseline: str = "simclr") -> list[str]:
    """Each mined method against ``baseline`` on MAP@R at the longest budget: beats / ties / loses, by the spread."""
    b = summary["budgets"][-1]
    rows = {r["method"]: r for r in summary["rows"]}
    if baseline not in rows:
        return []
    base = rows[baseline][f"map_at_r@{b}s"]
    lines = []
    for name, r in rows.items():
        if name == baseline:
            continue
        c = r[f"map_at_r@{b}s"]
        if math.isnan(c["mean"]) or math.isnan(base["mean"]):
            continue
        gap, width = c["mean"] - base["mean"], max(c["std"], base["std"])
        word = "beats" if gap > width else ("ties with" if gap > -width else "loses to")
        lines.append(f"{name} {word} {baseline} on MAP@R at {b:g} s: {c['mean']:.3f} ± {c['std']:.3f} vs "
                     f"{base['mean']:.3f} ± {base['std']:.3f} (gap {gap:+.3f}, spread {width:.3f})")
    return lines


def _cell(c: dict[str, float] | None) -> str:
    return "-" if c is None or math.isnan(c["mean"]) else f"{c['mean']:.3f} ± {c['std']:.3f}"


def table(summary: dict[str, Any], key: str) -> list[list[str]]:
    e, budgets = summary["compare_epoch"], summary["budgets"]
    head = ["method", "s/epoch", "same-class share", f"epoch {e}"] + [f"{b:g} s" for b in budgets]
    rows = [[r["method"], f"{r['seconds_per_epoch']:.2f}", _cell(r["same_class_share"]), _cell(r[f"{key}@epoch{e}"])]
            + [_cell(r[f"{key}@{b}s"]) for b in budgets] for r in summary["rows"]]
    return [head, *rows]


def markdown(summary: dict[str, Any]) -> str:
    parts = []
    for key, label in METRICS:
        rows = table(summary, key)
        parts += [f"**{label}** (mean ± std over seeds; time budgets in training seconds)\n",
                  "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        parts += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
    untrained = summary["rows"][0]["untrained"]
    parts.append(f"- untrained model: MAP@R {untrained['mean']:.3f} ± {untrained['std']:.3f}")
    parts += [f"- {line}" for line in verdict(summary)]
    return "\n".join(parts) + "\n"


def print_table(summary: dict[str, Any]) -> None:
    for key, label in METRICS:
        rows = table(summary, key)
        widths = [max(len(x) for x in col) for col in zip(*rows)]
        print(f"\n{label} (mean ± std over seeds)")
        for r in rows:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
    print()
    for line in verdict(summary):
        print(line)


# --------------------------------------------------------------------------------------------------- main
@dataclass(frozen=True)
class BenchConfig:
    seeds: int = 5
    first_seed: int = 0
    epochs: int = 30  # mined methods; MAP@R still rises slowly by then
    simclr_epochs: int = 60  # its epochs cost ~2x less with refreshes charged, so it gets about the same clock


QUICK = BenchConfig(seeds=2, epochs=4, simclr_epochs=6)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke configuration (under a minute)")
    p.add_argument("--seeds", type=int, help=f"seeds per method (default {BenchConfig.seeds})")
    p.add_argument("--first-seed", type=int, help="the first seed (default 0); seeds are consecutive")
    p.add_argument("--epochs", type=int, help=f"epochs of mined runs (default {BenchConfig.epochs})")
    p.add_argument("--simclr-epochs", type=int, help=f"epochs of simclr runs (default {BenchConfig.simclr_epochs})")
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)} "
                   f"(default: {', '.join(DEFAULT_METHODS)})")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (default 2)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers before they import numpy and torch
    base = QUICK if args.quick else BenchConfig()
    bench = BenchConfig(seeds=args.seeds or base.seeds,
                        first_seed=base.first_seed if args.first_seed is None else args.first_seed,
                        epochs=args.epochs or base.epochs, simclr_epochs=args.simclr_epochs or base.simclr_epochs)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(DEFAULT_METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; accepted: {', '.join(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hardneg-selfsup-") as tmp:
        specs = [RunSpec(m, s, bench.epochs if METHODS[m].mined else bench.simclr_epochs, tmp)
                 for s in range(bench.first_seed, bench.first_seed + bench.seeds) for m in methods]
        specs.sort(key=lambda s: -s.epochs)  # longest first, so the workers finish together
        log.info("%d runs (%d methods x %d seeds) in %d workers", len(specs), len(methods), bench.seeds,
                 args.workers)
        records = run_all(specs, args.workers)
    summary = summarise(records, compare_epoch=bench.epochs)
    name = "selfsup-quick" if args.quick else "selfsup"
    (args.out / f"{name}.json").write_text(json.dumps(
        {"bench": asdict(bench), "summary": summary, "runs": [asdict(r) for r in records]}, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(summary))
    print_table(summary)
    print(f"\n{len(records)} runs in {time.monotonic() - started:.0f} s; results in {args.out}/{name}.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
