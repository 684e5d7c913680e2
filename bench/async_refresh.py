"""Benchmark of the asynchronous refresh: global mining refreshed in a worker process, against the same mining
refreshed synchronously and against in-batch mining, side by side in one process, on bench/quality.py's tasks.

Methods (hardneg's CNN, triplet loss, margin, batch and Adam of bench/quality.py, heldout-samples):

* ``in-batch``: in-batch semi-hard mining over P x K batches (the strongest in-batch baseline there); it
  needs no snapshot, so its one publish (for serving) is not on its clock;
* ``sync``: global mining with class batches (hardneg's default recipe), a refresh every ``--steps`` steps,
  training waiting for each (embed, publish with the exported model, compose);
* ``async``: the same, refreshed by the worker process (``refresh = "async"``) while training goes on.

Clocks per epoch: wall-clock seconds of training and of the refresh work the training process does (all of
a sync refresh; the hand-over of an async one); CPU seconds of the training process plus, for ``async``, the
worker's CPU seconds, all of them: each finished refresh's in its epoch, the rest (the worker's start, and a
refresh cut short at the end) in epoch 1; and the training process's own CPU seconds (training and its
refresh work, without the worker's): its wall-clock when it has a core to itself, which a loaded machine's wall
figures do not show. Every run uses one thread (the worker one more), and the runs go one after another, so
that the worker has the second core. Each method's MAP@R is compared at equal
epochs and at equal wall and CPU time (interpolated, :func:`quality.at_time`), mean ± std over seeds.

Usage: ``.venv/bin/python bench/async_refresh.py [--seeds 3] [--epochs 8] [--tasks pairs,triples]``;
results go to ``bench/results/async_refresh.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from quality import RESULTS, TASKS, Cell, RunRecord, at_epoch, at_time, make_digit_task  # bench/quality.py

from hardneg.trainer import loop
from hardneg.trainer.config import TrainConfig

log = logging.getLogger("bench.async_refresh")
METHODS: dict[str, dict[str, Any]] = {
    "in-batch": {"recipe": "in-batch", "strategy": "semihard", "batching": "pk"},
    "sync": {"recipe": "class-batches", "refresh": "sync"},
    "async": {"recipe": "class-batches", "refresh": "async"},
}
PROTOCOL = "heldout-samples"


@dataclass(frozen=True)
class Spec:
    method: str
    task: str
    seed: int
    epochs: int
    steps: int  # refresh_every_steps of the global methods
    train: str
    eval: str
    workdir: str
    publish_every: int = 1  # of the global methods: every refresh published (1), or every N-th


@dataclass
class Record(RunRecord):
    """:class:`quality.RunRecord` plus per-epoch staleness and refresh counts."""

    staleness: list[float | None] | None = None
    refreshes: list[int] | None = None
    skipped: list[int] | None = None
    trainer_cpu_seconds: float = 0.0  # the training process's own CPU (training and refresh work), whole run


def run_one(spec: Spec) -> Record:
    """Train ``spec`` through the trainer's API; per epoch the clocks, MAP@R, staleness and refresh counts."""
    tag = f"{spec.task}-{spec.method}-{spec.seed}"
    common = {"data": f"npz:{spec.train}", "eval_data": f"npz:{spec.eval}", "epochs": spec.epochs, "seed": spec.seed,
              "threads": 1, "keep_snapshots": 1, "store": str(Path(spec.workdir) / "stores" / tag),
              "run_dir": str(Path(spec.workdir) / "runs" / tag)}
    schedule = ({"refresh_every": spec.epochs, "warmup_epochs": 0} if spec.method == "in-batch" else
                {"refresh_every_steps": spec.steps, "publish_every": spec.publish_every})
    cfg = TrainConfig.from_dict({**common, **schedule, **METHODS[spec.method]})
    trainer = loop.Trainer.create(cfg)
    children = _children_cpu()
    trainer.run()
    worker_total = _children_cpu() - children  # the refresh worker's whole CPU time, its start included
    rec = Record(spec.method, spec.method, spec.task, spec.seed, staleness=[], refreshes=[], skipped=[])
    wall = cpu = 0.0
    charged = spec.method != "in-batch"
    per_refresh = sum(v for r in trainer.state.history if r.get("refresh")
                      for k, v in r["refresh"]["worker"].items() if k.endswith("_cpu_s"))
    startup = max(0.0, worker_total - per_refresh)  # charged to epoch 1, when the worker starts
    for r in trainer.state.history:
        t = r.get("timing")
        if t is not None:
            worker_cpu = sum(v for k, v in r["refresh"]["worker"].items() if k.endswith("_cpu_s"))
            worker_cpu += startup if r["epoch"] == 1 else 0.0
            wall += t["train_s"] + charged * t["refresh_s"]
            rec.trainer_cpu_seconds += t["train_cpu_s"] + charged * t["refresh_cpu_s"]
            cpu += t["train_cpu_s"] + charged * (t["refresh_cpu_s"] + worker_cpu)
            rec.staleness.append(r["staleness"]["mean"])
            rec.refreshes.append(r["refresh"]["finished"])
            rec.skipped.append(r["refresh"]["skipped"])
        rec.epochs.append(r["epoch"])
        rec.wall_seconds.append(round(wall, 4))
        rec.cpu_seconds.append(round(cpu, 4))
        rec.metrics.setdefault("map_at_r", []).append(r["metrics"]["map_at_r"])
    return rec


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished (joined) child processes."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def with_clock(rec: Record, clock: str) -> Record:
    return replace(rec, seconds=rec.wall_seconds if clock == "wall" else rec.cpu_seconds)


def summarise(records: Sequence[Record], epochs: int) -> dict[str, Any]:
    """Per task: per method seconds per epoch (wall, CPU), MAP@R per epoch, and MAP@R at equal wall and CPU
    time (budgets: fractions of the shortest run on that clock)."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r.protocol for r in records):
        recs = [r for r in records if r.protocol == task]
        methods = list(dict.fromkeys(r.method for r in recs))
        budgets = {clock: [math.floor(f * min(with_clock(r, clock).seconds[-1] for r in recs) * 100) / 100
                           for f in (0.5, 1.0)] for clock in ("wall", "cpu")}  # never past a run's end
        rows = []
        for m in methods:
            runs = [r for r in recs if r.method == m]
            row: dict[str, Any] = {
                "method": m, "seeds": len(runs),
                "wall_s_per_epoch": asdict(Cell.of([r.wall_seconds[-1] / epochs for r in runs])),
                "cpu_s_per_epoch": asdict(Cell.of([r.cpu_seconds[-1] / epochs for r in runs])),
                "trainer_cpu_s_per_epoch": asdict(Cell.of([r.trainer_cpu_seconds / epochs for r in runs])),
                "map_at_r_by_epoch": [asdict(Cell.of([at_epoch(r, "map_at_r", e) for r in runs]))
                                      for e in range(epochs + 1)],
                "staleness_mean": _mean([s for r in runs for s in r.staleness or [] if s is not None]),
                "refreshes": float(np.mean([sum(r.refreshes or []) for r in runs])),
                "skipped": float(np.mean([sum(r.skipped or []) for r in runs])),
            }
            for clock, bs in budgets.items():
                for b in bs:
                    row[f"map_at_r@{clock}{b}s"] = asdict(Cell.of([at_time(with_clock(r, clock), "map_at_r", b)
                                                                   for r in runs]))
            rows.append(row)
        out[task] = {"budgets": budgets, "rows": rows}
    return out


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 2) if values else None


def markdown(summary: dict[str, Any], epochs: int, load: str) -> str:
    lines = []
    for task, s in summary.items():
        b = s["budgets"]
        head = (["method", "wall s/epoch", "CPU s/epoch", "trainer CPU s/epoch", "refreshes (skipped)",
                 "staleness (steps)"]
                + [f"MAP@R ep {e}" for e in (2, epochs // 2, epochs)]
                + [f"MAP@R @{x} s wall" for x in b["wall"]] + [f"MAP@R @{x} s CPU" for x in b["cpu"]])
        lines += [f"**{task}** ({10 ** TASKS[task].digits} classes, {PROTOCOL}; load average {load})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in s["rows"]:
            cells = [row["method"], _cell(row["wall_s_per_epoch"], 2), _cell(row["cpu_s_per_epoch"], 2),
                     _cell(row["trainer_cpu_s_per_epoch"], 2),
                     f"{row['refreshes']:.1f} ({row['skipped']:.1f})",
                     "-" if row["staleness_mean"] is None else f"{row['staleness_mean']:.1f}"]
            cells += [_cell(row["map_at_r_by_epoch"][e]) for e in (2, epochs // 2, epochs)]
            cells += [_cell(row[f"map_at_r@{clock}{x}s"]) for clock in ("wall", "cpu") for x in b[clock]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(c: dict[str, float], digits: int = 3) -> str:
    return "-" if np.isnan(c["mean"]) else f"{c['mean']:.{digits}f} ± {c['std']:.{digits}f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="summarise the runs of these results files (of the same --epochs) instead of training")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--tasks", default="pairs,triples", help=f"comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--steps", type=int, default=0, help="refresh every N steps (default: a third of an epoch)")
    p.add_argument("--publish-every", type=int, default=1,
                   help="global methods: publish every N-th refresh's snapshot (the others export and store nothing)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    loop.plot_history = lambda history, path: None  # outside the clock, and not needed here
    started, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    records: list[Record] = []
    if args.merge:
        records = [Record(**r) for f in args.merge for r in json.loads(f.read_text())["runs"]]
        args.tasks = ""
    with tempfile.TemporaryDirectory(prefix="hardneg-async-") as tmp:
        for task in filter(None, args.tasks.split(",")):
            sizes = TASKS[task]
            files = make_digit_task(Path(tmp) / task, sizes)
            train, evaluate = (str(f) for f in files[PROTOCOL])
            steps = args.steps or max(1, sizes.classes * sizes.train_per_class_samples // 128 // 3)
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                for method in args.methods.split(","):
                    rec = run_one(Spec(method, task, seed, args.epochs, steps, train, evaluate, tmp,
                                       args.publish_every))
                    records.append(rec)
                    log.info("%-8s %-8s seed %d: MAP@R %.3f, %.2f s wall, %.2f s CPU (refresh every %d steps)",
                             task, method, seed, rec.metrics["map_at_r"][-1], rec.wall_seconds[-1],
                             rec.cpu_seconds[-1], steps)
    load = (", ".join(json.loads(f.read_text())["load_average"] for f in args.merge) if args.merge else
            " / ".join(f"{x:.1f}" for x in os.getloadavg()))
    summary = summarise(records, args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "async_refresh.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "load_average": load, "summary": summary,
         "runs": [asdict(r) for r in records]}, indent=1) + "\n")
    text = markdown(summary, args.epochs, load)
    (args.out / "async_refresh.md").write_text(text)
    print(text)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"{len(records)} runs in {time.monotonic() - started:.0f} s wall, "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0 + children.ru_utime:.0f} s CPU "
          f"(with the refresh workers); load average {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
