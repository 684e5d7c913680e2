"""Benchmark of mining quality: global index mining against in-batch and random mining, side by side.

The tasks (``--task``): scikit-learn digits side by side, labelled by the number they write: ``pairs`` (8 x 16
images, 100 classes, 30 training items each), and the many-class tasks with few items per class, ``triples``
(1000 classes) and ``quads`` (10,000 classes). The 1797 digit images are split first (stratified, seeded) into
a training side and an evaluation side, and compositions are drawn on each side, so no evaluation image was
ever trained on. Two protocols:

* ``heldout-classes``: train on half of the classes (drawn once, seeded), evaluate on the other half;
* ``heldout-samples``: train and evaluate on every class, with disjoint images.

Every method trains the same model (hardneg's CNN), with the same loss, margin, batch size and optimiser,
in-process through the trainer's API (:class:`~hardneg.trainer.loop.Trainer` on ``npz:`` data), for
several seeds. Each epoch's MAP@R, R-Precision and P@1 come from the trainer's own evaluation. The clock
of a run is the trainer's per-epoch ``timing``: training steps, plus, for global mining, the refreshes
that it needs (embed the training set, publish the snapshot with its exported model, mine or compose).
In-batch and random mining need no snapshot, so their refresh time is not charged to them (the trainer
still publishes one for serving; those runs publish only twice here). By default the clock counts the
training process's CPU seconds: every run uses one thread, so on an idle machine that is its wall-clock
time, and unlike wall-clock it does not stretch when other jobs share the cores (``--clock wall``).

The table compares methods at equal epochs and at equal seconds: each run's metric is linearly
interpolated at fixed time budgets (fractions of the shortest run), then summarised over seeds (mean ±
std, and min-max in the JSON). Runs that embed every item once per epoch (item batches) get twice the
epochs of runs that embed three items per anchor (triplets), so that every method reaches every budget.

External baselines: where ``pytorch-metric-learning`` is installed (an optional benchmark dependency,
never a runtime one), its ``TripletMarginMiner(type_of_triplets="semihard")`` and ``BatchHardMiner`` mine
the same P x K batches of the same model, with squared Euclidean distances so the margin means what it
means in hardneg, and hardneg's triplet loss; its ``CrossBatchMemory`` (XBM) trains as a recipe of its own
(bench/pml_baselines.py).

Usage: ``.venv/bin/python bench/quality.py [--quick] [--task pairs|triples|quads] [--protocols ...]
[--seeds N] [--methods a,b] [--workers 2]``; results go to ``bench/results/quality[-TASK].{json,md,png}``,
and every finished run to ``...runs.jsonl`` at once (a rerun skips the runs it holds).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pml_baselines import CrossBatchMemoryRecipe, PMLMiner  # bench/: sys.path[0] when run as a script
from pool import run_in_pool
import torch

from hardneg.trainer import loop
from hardneg.trainer.config import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"
METRICS = (("map_at_r", "MAP@R"), ("r_precision", "R-Prec"), ("precision_at_1", "P@1"))
PROTOCOLS = ("heldout-classes", "heldout-samples")
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)  # equal-time comparison points, as fractions of the shortest method's time

log = logging.getLogger("bench.quality")


# ---------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class TaskSizes:
    """A composed-digits task: ``digits`` digit images side by side (label: the number they write, so
    ``10 ** digits`` classes) and how many composed items each side gets per class."""

    train_per_class_samples: int = 30  # heldout-samples: 100 classes x 30 = 3000 training items
    eval_per_class_samples: int = 10  # 100 x 10 = 1000 evaluation items, R = 9 per query
    train_per_class_classes: int = 60  # heldout-classes: 50 classes x 60 = 3000 training items
    eval_per_class_classes: int = 20  # 50 x 20 = 1000 evaluation items, R = 19
    eval_image_fraction: float = 1 / 3  # share of the 1797 digit images kept for the evaluation side
    digits: int = 2  # digit images side by side: 8 x 8·digits images, 10 ** digits classes

    @property
    def classes(self) -> int:
        return 10 ** self.digits


# The tasks: ``pairs`` (100 classes, many items each) and the many-class ones, with few items per class as in
# product and identity datasets (Stanford Online Products: 11,318 training classes of ~5 images). Held-out
# classes train on half of the classes (500 and 5,000) and evaluate on the other half.
TASKS: dict[str, TaskSizes] = {
    "pairs": TaskSizes(),
    # 1000 classes: heldout-samples 6,000 training items (6 a class), 3,000 evaluation items (R = 2);
    # heldout-classes 500 classes x 8 = 4,000 training items, 500 x 4 = 2,000 evaluation items (R = 3)
    "triples": TaskSizes(train_per_class_samples=6, eval_per_class_samples=3, train_per_class_classes=8,
                         eval_per_class_classes=4, digits=3),
    # 10,000 classes: heldout-samples 40,000 training items (4 a class), 30,000 evaluation items (R = 2);
    # heldout-classes 5,000 classes x 6 = 30,000 training items, 5,000 x 3 = 15,000 evaluation items (R = 2)
    "quads": TaskSizes(train_per_class_samples=4, eval_per_class_samples=3, train_per_class_classes=6,
                       eval_per_class_classes=3, digits=4),
}


def split_digit_images(eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digit images (1797, 8, 8) in [0, 1] and labels, and disjoint train/eval image indices (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    train, evaluate = train_test_split(np.arange(len(images)), test_size=eval_fraction, random_state=seed,
                                       stratify=digits.target)
    return images, digits.target.astype(np.int64), np.sort(train), np.sort(evaluate)


def compose_digits(images: np.ndarray, digit: np.ndarray, pool: np.ndarray, classes: Sequence[int], per_class: int,
                   digits: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` distinct compositions of ``digits`` images from ``pool`` side by side for each class, the class
    being the number they write (class 305 of 3 digits: a 3, a 0 and a 5, left to right).

    Returns x (len(classes)·per_class, 1, 8, 8·digits) float32 and y (same,) int64.
    """
    by_digit = [pool[digit[pool] == d] for d in range(10)]
    n = len(classes) * per_class
    x = np.empty((n, 1, 8, 8 * digits), np.float32)
    for row, c in enumerate(classes):
        parts = [by_digit[(c // 10 ** (digits - 1 - k)) % 10] for k in range(digits)]  # leftmost digit first
        pick = rng.choice(math.prod(len(p) for p in parts), size=per_class, replace=False)  # distinct compositions
        chosen = np.unravel_index(pick, [len(p) for p in parts])
        rows = slice(row * per_class, (row + 1) * per_class)
        for k, (part, ik) in enumerate(zip(parts, chosen)):
            x[rows, 0, :, 8 * k:8 * (k + 1)] = images[part[ik]]
    return x, np.repeat(np.asarray(classes, np.int64), per_class)


def make_digit_task(out: Path, sizes: TaskSizes, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Write the train/eval ``.npz`` files of both protocols under ``out``; returns protocol -> (train, eval).

    The digit images are split first (stratified, seeded) into a training side and an evaluation side, and
    every composition is drawn on one side, so no evaluation image was ever trained on. ``heldout-classes``
    trains on half of the classes (drawn once, seeded) and evaluates on the other half; ``heldout-samples``
    trains and evaluates on every class, with disjoint images.
    """
    images, digit, train_pool, eval_pool = split_digit_images(sizes.eval_image_fraction, seed)
    rng = np.random.default_rng(seed)
    all_classes = np.arange(sizes.classes)
    train_classes = np.sort(rng.permutation(sizes.classes)[:sizes.classes // 2])
    eval_classes = np.setdiff1d(all_classes, train_classes)
    plan = {
        "heldout-classes": ((train_classes, sizes.train_per_class_classes),
                            (eval_classes, sizes.eval_per_class_classes)),
        "heldout-samples": ((all_classes, sizes.train_per_class_samples),
                            (all_classes, sizes.eval_per_class_samples)),
    }
    files = {}
    out.mkdir(parents=True, exist_ok=True)
    for protocol, ((tr_classes, tr_n), (ev_classes, ev_n)) in plan.items():
        paths = (out / f"{protocol}-train.npz", out / f"{protocol}-eval.npz")
        for path, pool, classes, n in ((paths[0], train_pool, tr_classes, tr_n),
                                       (paths[1], eval_pool, ev_classes, ev_n)):
            x, y = compose_digits(images, digit, pool, classes, n, sizes.digits, rng)
            np.savez(path, x=x, y=y)
        files[protocol] = paths
    return files


# ------------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """One configuration under comparison.

    ``changes`` are TrainConfig fields over the bench's common ones; ``charge_refresh`` says whether the
    refresh time counts on its clock (global mining trains on what the refresh mines); ``item_batches``
    says whether an epoch embeds each item once (in-batch mining over item batches: it runs the longer
    epoch count) rather than three times (triplets); ``pml`` names a pytorch-metric-learning miner that
    replaces the in-batch miner; ``xbm`` trains with PML's cross-batch memory with these options
    (bench/pml_baselines.py); ``group`` orders the table and styles the plot.
    """

    name: str
    changes: dict[str, Any]
    charge_refresh: bool
    group: str
    item_batches: bool = False
    pml: str | None = None
    note: str = ""
    xbm: dict[str, Any] | None = None  # CrossBatchMemoryRecipe's options: PML miner, memory_size, start_epoch


def _global(name: str, note: str, **changes: Any) -> Method:
    item_batches = changes.get("global_batches", "classes") == "classes"  # the default recipe: class batches
    return Method(name, {"mining": "global", **changes}, True, "lever" if name != "global" else "global",
                  item_batches, note=note)


def _inbatch(name: str, strategy: str, batching: str = "pk", pml: str | None = None, note: str = "") -> Method:
    group = "external" if pml else "in-batch"
    return Method(name, {"mining": "in-batch", "strategy": strategy, "batching": batching}, False, group, True, pml,
                  note)


XBM_MINERS = {"semihard": "TripletMarginMiner(semihard)", "batch-hard": "BatchHardMiner",
              "multi-similarity": "MultiSimilarityMiner"}


def _xbm(miner: str, memory: int, start: int = 1) -> Method:
    name = f"pml XBM {memory} {XBM_MINERS[miner]}" + (f" from epoch {start + 1}" if start != 1 else "")
    return Method(name, {"mining": "in-batch", "batching": "pk"}, False, "external", True,
                  note=f"PML CrossBatchMemory, {memory} embeddings, {XBM_MINERS[miner]} inside, P x K, "
                       f"memory from epoch {start + 1}",
                  xbm={"miner": miner, "memory_size": memory, "start_epoch": start})


METHODS: dict[str, Method] = {m.name: m for m in (
    # the trainer's defaults for --mining global (see docs/benchmarks.md, "Mining quality")
    _global("global", "hardneg's default for --mining global: batches of confusable classes, semi-hard inside"),
    # baselines
    _inbatch("in-batch batch-hard", "batch-hard", note="P x K batches (Hermans et al. 2017)"),
    _inbatch("in-batch semihard", "semihard", note="P x K batches (FaceNet's semi-hard)"),
    _inbatch("in-batch semihard random-batches", "semihard", batching="random", note="shuffled batches"),
    Method("random", {"mining": "random"}, False, "random", note="random triplets"),
    _inbatch("pml TripletMarginMiner(semihard)", "semihard", pml="semihard", note="pytorch-metric-learning, P x K"),
    _inbatch("pml BatchHardMiner", "batch-hard", pml="batch-hard", note="pytorch-metric-learning, P x K"),
    # the cross-batch memory (XBM): PML's TripletMarginMiner(semihard) keeps a (B, M, M) mask, so up to 2048
    *(_xbm(miner, m, start) for miner in ("multi-similarity", "batch-hard") for m in (1024, 4096, 8192)
      for start in (1, 4)),
    *(_xbm("semihard", m, start) for m in (1024, 2048) for start in (1, 4)),
    # the levers, one change at a time from the default ...
    _global("global batch-hard inside", "in-batch batch-hard inside the class batches",
            inbatch_strategy="batch-hard"),
    _global("global warmup 0", "no warm-up epoch", warmup_epochs=0),
    _global("global warmup 3", "3 warm-up epochs", warmup_epochs=3),
    _global("global refresh 1", "a snapshot every epoch", refresh_every=1),
    _global("global refresh 8", "a snapshot every 8 epochs", refresh_every=8),
    _global("global refresh 2", "a snapshot every 2 epochs", refresh_every=2),
    _global("global seed-hardness 1", "seed classes drawn ∝ 1 / (mean d² to their batch's classes)",
            seed_hardness=1.0),
    _global("global seed-hardness 2", "seed classes drawn ∝ (mean d² to their batch's classes)^-2",
            seed_hardness=2.0),
    # ... and on the mined-tuple path (global_batches "tuples"), where the triplet miner's options act
    _global("global tuples", "mined semi-hard triplets", global_batches="tuples"),
    _global("global tuples mix 0.5", "mined triplets + 0.5 x in-batch semi-hard over their items",
            global_batches="tuples", inbatch_mix=0.5),
    _global("global tuples hardest", "mined hardest negatives", global_batches="tuples", strategy="hardest"),
    _global("global tuples window 2-16", "rank window: skip 2, sample from the next 16", global_batches="tuples",
            strategy="window", window_skip=2, window_width=16),
    _global("global tuples positive-aware 0.95", "positive-aware guard 0.95", global_batches="tuples",
            positive_aware=0.95),
    _global("global tuples previous default", "hardneg's default before this benchmark: random warm-up, refresh 2",
            global_batches="tuples", warmup="random", refresh_every=2),
)}
DEFAULT_METHODS = tuple(METHODS)
# The many-class tasks run fewer configurations: each baseline in its best setup from a one-seed sweep on the
# 1000-class task (docs/benchmarks.md, "Mining quality: many classes"), and the global levers.
XBM_BEST = ("pml XBM 1024 BatchHardMiner from epoch 5", "pml XBM 4096 MultiSimilarityMiner from epoch 5")
TASK_METHODS: dict[str, tuple[str, ...]] = {
    "pairs": DEFAULT_METHODS,
    "triples": ("global", "in-batch semihard", "in-batch batch-hard", "pml TripletMarginMiner(semihard)",
                "pml BatchHardMiner", *XBM_BEST, "random", "global seed-hardness 2", "global refresh 2",
                "global refresh 8"),
    # 10,000 classes: the best hardneg and PML in-batch miners of the 1000-class task, both XBM setups
    "quads": ("global", "in-batch semihard", "pml BatchHardMiner", *XBM_BEST, "random", "global refresh 8",
              "global seed-hardness 2"),
}
QUICK_METHODS = ("global", "in-batch semihard", "random", "pml TripletMarginMiner(semihard)", "global tuples",
                 "global tuples mix 0.5")


# -------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSpec:
    """One training run: a method on a protocol's data with a seed, for ``epochs`` epochs."""

    method: Method
    protocol: str
    seed: int
    epochs: int
    train: str
    eval: str
    workdir: str
    clock: str = "cpu"  # which clock is the run's `seconds`: cpu or wall (see run_one)
    eval_every: int = 1
    eval_sample: int | None = None
    task: str = "pairs"


@dataclass
class RunRecord:
    """What one run measured: per epoch (0 = untrained) the clocks and the metrics.

    ``seconds`` is the run's clock (CPU or wall seconds, see :func:`run_one`); ``wall_seconds`` and
    ``cpu_seconds`` are both clocks; ``refresh_seconds`` the part of ``seconds`` spent in charged refreshes.
    """

    method: str
    group: str
    protocol: str
    seed: int
    epochs: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    wall_seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=dict)
    refresh_seconds: float = 0.0


def pml_available() -> bool:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


def run_one(spec: RunSpec) -> RunRecord:
    """Train ``spec.method`` once through the trainer's API and return its per-epoch clocks and metrics.

    ``spec.clock`` picks ``seconds``: ``cpu`` (the process's CPU seconds; with one thread that is the wall-clock
    time of an idle machine, and it does not grow when other jobs share the cores) or ``wall``.
    """
    torch.set_num_threads(1)
    method, clock = spec.method, spec.clock
    tag = f"{spec.protocol}-{method.name.replace(' ', '_')}-{spec.seed}"
    cfg = TrainConfig.from_dict({
        "data": f"npz:{spec.train}", "eval_data": f"npz:{spec.eval}", "epochs": spec.epochs, "seed": spec.seed,
        "store": str(Path(spec.workdir) / "stores" / tag), "run_dir": str(Path(spec.workdir) / "runs" / tag),
        "keep_snapshots": 1, "eval_every": spec.eval_every, "eval_sample": spec.eval_sample,
        # in-batch and random runs publish only for serving: rarely, as their clock does not include it
        **({} if method.charge_refresh else {"refresh_every": spec.epochs, "warmup_epochs": 0}),
        **method.changes,
    })
    parts = loop.Parts()
    if method.pml is not None:  # pytorch-metric-learning's miner is handed to the in-batch recipe as its miner
        parts = loop.Parts(miner=PMLMiner(method.pml, cfg.margin))
    elif method.xbm is not None:  # the cross-batch memory is a recipe of its own
        parts = loop.Parts(recipe=functools.partial(CrossBatchMemoryRecipe, **method.xbm))
    trainer = loop.Trainer.create(cfg, parts=parts)
    trainer.run()
    rec = RunRecord(method.name, method.group, spec.protocol, spec.seed)
    wall = cpu = 0.0
    suffix = "_cpu_s" if clock == "cpu" else "_s"
    for r in trainer.state.history:
        t = r.get("timing")
        if t is not None:
            charged = 1.0 if method.charge_refresh else 0.0
            wall += t["train_s"] + charged * t["refresh_s"]
            cpu += t["train_cpu_s"] + charged * t["refresh_cpu_s"]
            rec.refresh_seconds += charged * t["refresh" + suffix]
        if not r["metrics"]:
            continue  # not evaluated (eval_every): its time counts towards the next evaluated epoch
        rec.epochs.append(r["epoch"])
        rec.wall_seconds.append(round(wall, 4))
        rec.cpu_seconds.append(round(cpu, 4))
        rec.seconds.append(round(cpu if clock == "cpu" else wall, 4))
        for key, _ in METRICS:
            rec.metrics.setdefault(key, []).append(r["metrics"][key])
    return rec


def run_all(specs: Sequence[RunSpec], workers: int,
            keep: Callable[[RunSpec, RunRecord], None] | None = None) -> list[RunRecord]:
    """Run ``specs`` in ``workers`` processes (in order of submission), logging progress; ``keep(spec, record)``
    is called as each run finishes."""
    def describe(spec: RunSpec, rec: RunRecord) -> str:
        if keep is not None:
            keep(spec, rec)
        return (f"{spec.task} {spec.protocol:<16} {spec.method.name:<36} seed {spec.seed}: MAP@R "
                f"{rec.metrics['map_at_r'][-1]:.3f} after {rec.epochs[-1]} epochs ({rec.seconds[-1]:.1f} s)")

    return run_in_pool(run_one, specs, workers, describe)


# ------------------------------------------------------------------------------------------------ summary
@dataclass(frozen=True)
class Cell:
    """Mean, std, min and max over seeds of one metric."""

    mean: float
    std: float
    lo: float
    hi: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Cell:
        v = np.asarray(values, dtype=np.float64)
        return cls(float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, float(v.min()), float(v.max()))

    def text(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


def at_epoch(rec: RunRecord, key: str, epoch: int) -> float:
    return rec.metrics[key][rec.epochs.index(epoch)]


def at_time(rec: RunRecord, key: str, seconds: float) -> float:
    """The metric at ``seconds`` of the run's clock, linearly interpolated between evaluated epochs."""
    if seconds > rec.seconds[-1] + 1e-9:
        return math.nan  # the run ended before this budget
    return float(np.interp(seconds, rec.seconds, rec.metrics[key]))


def summarise(records: Sequence[RunRecord], compare_epoch: int) -> dict[str, Any]:
    """Per protocol: the time budgets, and per method its cells at ``compare_epoch`` and at each budget."""
    out: dict[str, Any] = {}
    requested = compare_epoch
    for protocol in sorted({r.protocol for r in records}):
        recs = [r for r in records if r.protocol == protocol]
        # the latest epoch at or before the requested one that every run evaluated (eval_every)
        compare_epoch = max(set.intersection(*[{e for e in r.epochs if e <= requested} for r in recs]))
        methods = list(dict.fromkeys(r.method for r in recs))
        totals = {m: float(np.mean([r.seconds[-1] for r in recs if r.method == m])) for m in methods}
        shortest = min(min(r.seconds[-1] for r in recs if r.method == m) for m in methods)
        budgets = [math.floor(f * shortest * 100) / 100 for f in BUDGET_FRACTIONS]  # never past a run's end
        rows = []
        for m in methods:
            runs = [r for r in recs if r.method == m]
            row: dict[str, Any] = {"method": m, "group": runs[0].group,
                                   "seeds": len(runs), "train_seconds": round(totals[m], 2),
                                   "epochs": runs[0].epochs[-1],
                                   "seconds_per_epoch": round(totals[m] / runs[0].epochs[-1], 3)}
            for key, _ in METRICS:
                if all(compare_epoch in r.epochs for r in runs):
                    row[f"{key}@epoch{compare_epoch}"] = asdict(Cell.of([at_epoch(r, key, compare_epoch)
                                                                         for r in runs]))
                for b in budgets:
                    row[f"{key}@{b}s"] = asdict(Cell.of([at_time(r, key, b) for r in runs]))
            rows.append(row)
        out[protocol] = {"budgets": budgets, "compare_epoch": compare_epoch, "rows": rows}
    return out


def verdict(summary: dict[str, Any], default: str = "global") -> list[str]:
    """Plain sentences: does ``default`` beat the best baseline (in-batch, pytorch-metric-learning's miners, its
    cross-batch memory) on MAP@R at equal time by more than the spread (the larger of the two stds) at the
    longest common budget?"""
    lines = []
    for protocol, s in summary.items():
        b = s["budgets"][-1]
        rows = {r["method"]: r for r in s["rows"]}
        if default not in rows:
            continue
        base = [r for r in s["rows"] if r["group"] in ("in-batch", "external")]
        if not base:
            continue
        best = max(base, key=lambda r: r[f"map_at_r@{b}s"]["mean"])
        g, o = rows[default][f"map_at_r@{b}s"], best[f"map_at_r@{b}s"]
        gap, spread = g["mean"] - o["mean"], max(g["std"], o["std"])
        word = "beats" if gap > spread else ("ties with" if gap > -spread else "loses to")
        lines.append(f"{protocol}: {default} {word} the best baseline ({best['method']}) on MAP@R at "
                     f"{b} s: {g['mean']:.3f} ± {g['std']:.3f} vs {o['mean']:.3f} ± {o['std']:.3f} "
                     f"(gap {gap:+.3f}, spread {spread:.3f})")
    return lines


# ---------------------------------------------------------------------------------------------- writers
def table_rows(summary: dict[str, Any], key: str = "map_at_r") -> list[list[str]]:
    """Rows of text: protocol, method, s/epoch, metric at the compare epoch and at every budget."""
    rows = []
    for protocol, s in summary.items():
        e = s["compare_epoch"]
        for r in s["rows"]:
            cells = [r.get(f"{key}@epoch{e}")] + [r[f"{key}@{b}s"] for b in s["budgets"]]
            rows.append([protocol, r["method"], f"{r['seconds_per_epoch']:.2f}"]
                        + ["-" if c is None or math.isnan(c["mean"]) else Cell(**c).text() for c in cells])
    return rows


def table_header(summary: dict[str, Any]) -> list[str]:
    s = next(iter(summary.values()))
    return (["protocol", "method", "s/epoch", f"epoch {s['compare_epoch']}"]
            + [f"{f:g} x budget" for f in BUDGET_FRACTIONS])


def markdown(summary: dict[str, Any]) -> str:
    """Markdown tables (one per metric), the budgets in seconds, and the verdict."""
    parts = []
    for key, label in METRICS:
        parts.append(f"**{label}** (mean ± std over seeds)\n")
        head = table_header(summary)
        parts.append("| " + " | ".join(head) + " |")
        parts.append("|" + "---|" * len(head))
        parts += ["| " + " | ".join(r) + " |" for r in table_rows(summary, key)]
        parts.append("")
    for protocol, s in summary.items():
        parts.append(f"- {protocol}: budgets {', '.join(f'{b:g} s' for b in s['budgets'])}")
    parts += ["", *[f"- {line}" for line in verdict(summary)]]
    return "\n".join(parts) + "\n"


def print_table(summary: dict[str, Any]) -> None:
    head = table_header(summary)
    for key, label in METRICS:
        print(f"\n{label} (mean ± std over seeds); budgets: "
              + "; ".join(f"{p} {', '.join(f'{b:g}s' for b in s['budgets'])}" for p, s in summary.items()))
        rows = table_rows(summary, key)
        widths = [max(len(x) for x in col) for col in zip(head, *rows)]
        for r in [head, *rows]:
            print("  ".join(x.ljust(w) for x, w in zip(r, widths)))
    print()
    for line in verdict(summary):
        print(line)


def plot(records: Sequence[RunRecord], path: Path, methods: Sequence[str]) -> None:
    """MAP@R against epochs and against seconds, per protocol: mean over seeds, band = min-max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = sorted({r.protocol for r in records})
    fig, axes = plt.subplots(len(protocols), 2, figsize=(13, 4.5 * len(protocols)), squeeze=False)
    colours = plt.get_cmap("tab20")
    for row, protocol in zip(axes, protocols):
        for i, m in enumerate(methods):
            runs = [r for r in records if r.protocol == protocol and r.method == m]
            if not runs:
                continue
            style = {"color": colours(i % 20), "lw": 2.2 if m == "global" else 1.1,
                     "ls": ":" if runs[0].group == "lever" else "-"}
            epochs = np.asarray(runs[0].epochs)
            vals = np.asarray([r.metrics["map_at_r"] for r in runs])
            row[0].plot(epochs, vals.mean(0), label=m, **style)
            row[0].fill_between(epochs, vals.min(0), vals.max(0), color=style["color"], alpha=0.12)
            grid = np.linspace(0, min(r.seconds[-1] for r in runs), 60)
            tv = np.asarray([[at_time(r, "map_at_r", t) for t in grid] for r in runs])
            row[1].plot(grid, tv.mean(0), **style)
            row[1].fill_between(grid, tv.min(0), tv.max(0), color=style["color"], alpha=0.12)
        row[0].set(title=f"{protocol}: MAP@R by epoch", xlabel="epoch", ylabel="MAP@R")
        row[1].set(title=f"{protocol}: MAP@R by training seconds", xlabel="seconds (training + charged refresh)")
        for ax in row:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- main
@dataclass(frozen=True)
class BenchConfig:
    """The sizes of one benchmark run."""

    seeds: int = 3
    epochs: int = 12  # runs whose epochs embed every item three times (triplets): ~1.3 s an epoch here
    inbatch_epochs: int = 24  # runs over item batches (~0.4-0.5 s an epoch): about the same clock in all
    sizes: TaskSizes = TaskSizes()
    eval_every: int = 1  # evaluate every N epochs (and the last); the metric is interpolated in between
    eval_sample: int | None = None  # evaluate this many seeded queries against every evaluation item; None: all
    protocols: tuple[str, ...] = PROTOCOLS


QUICK = BenchConfig(seeds=2, epochs=5, inbatch_epochs=8,
                    sizes=TaskSizes(train_per_class_samples=8, eval_per_class_samples=4,
                                    train_per_class_classes=16, eval_per_class_classes=8))
# Per task, the full configuration. The many-class tasks' epochs are long (6,000 and 40,000 items), so they run
# fewer epochs, and the 10,000-class task evaluates every other epoch on 4,000 sampled queries.
BENCHES: dict[str, BenchConfig] = {
    "pairs": BenchConfig(),
    "triples": BenchConfig(epochs=8, inbatch_epochs=16, sizes=TASKS["triples"]),
    "quads": BenchConfig(epochs=5, inbatch_epochs=10, sizes=TASKS["quads"], eval_every=2, eval_sample=4000),
}


def make_specs(bench: BenchConfig, methods: Sequence[Method], files: dict[str, tuple[Path, Path]],
               workdir: Path, clock: str = "cpu", task: str = "pairs") -> list[RunSpec]:
    """Every (method, protocol, seed) run, seed by seed, so that a cut-short run still has whole seeds."""
    specs = []
    for seed in range(bench.seeds):
        for protocol, (train, evaluate) in files.items():
            if protocol not in bench.protocols:
                continue
            for m in methods:
                epochs = bench.inbatch_epochs if m.item_batches else bench.epochs
                specs.append(RunSpec(m, protocol, seed, epochs, str(train), str(evaluate), str(workdir), clock,
                                     bench.eval_every, bench.eval_sample, task))
    return specs


def run_key(task: str, method: str, protocol: str, seed: int, epochs: int) -> str:
    """What identifies a run in the partial-results file."""
    return f"{task}|{method}|{protocol}|{seed}|{epochs}"


def load_partial(path: Path) -> dict[str, RunRecord]:
    """Runs already recorded in ``path`` (one JSON object a line: the run's key and its record)."""
    done: dict[str, RunRecord] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = RunRecord(**row["record"])
    return done


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small smoke configuration (about a minute)")
    p.add_argument("--task", choices=tuple(TASKS), default="pairs",
                   help="pairs: 100 classes (default); triples: 1000 classes; quads: 10,000 classes")
    p.add_argument("--protocols", help=f"comma-separated subset of: {', '.join(PROTOCOLS)} (default: the task's)")
    p.add_argument("--seeds", type=int, help="seeds per configuration (default 3)")
    p.add_argument("--epochs", type=int, help="epochs of runs that train on triplets (default: the task's)")
    p.add_argument("--inbatch-epochs", type=int, help="epochs of runs that train on item batches (default: the "
                                                      "task's)")
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes (default 2)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="what 'seconds' counts: CPU seconds of the training process (default; steady on a shared "
                        "machine, and equal to wall-clock on an idle one, as each run uses one thread) or wall-clock")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    p.add_argument("--name", help="results file stem (default quality, quality-TASK, or quality-quick)")
    return p.parse_args(argv)


def bench_of(args: argparse.Namespace) -> BenchConfig:
    """The task's configuration (or the quick one) with the command line's changes."""
    bench = QUICK if args.quick else BENCHES[args.task]
    protocols = tuple(x.strip() for x in args.protocols.split(",")) if args.protocols else bench.protocols
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise SystemExit(f"unknown protocols {unknown}; accepted: {', '.join(PROTOCOLS)}")
    return dataclasses.replace(bench, seeds=args.seeds or bench.seeds, epochs=args.epochs or bench.epochs,
                               inbatch_epochs=args.inbatch_epochs or bench.inbatch_epochs, protocols=protocols)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ["OMP_NUM_THREADS"] = "1"
    bench = bench_of(args)
    default = QUICK_METHODS if args.quick else TASK_METHODS[args.task]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(default)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; accepted: {', '.join(METHODS)}")
    selected = [METHODS[m] for m in methods]
    if not pml_available():
        skipped = [m.name for m in selected if m.pml or m.xbm]
        selected = [m for m in selected if not (m.pml or m.xbm)]
        if skipped:
            log.info("pytorch-metric-learning is not installed: skipping %s", ", ".join(skipped))
    name = args.name or ("quality-quick" if args.quick else "quality" if args.task == "pairs" else f"quality-{args.task}")
    args.out.mkdir(parents=True, exist_ok=True)
    # every finished run is appended here at once, and a rerun skips the runs it holds: nothing is lost to a kill
    partial = args.out / f"{name}.runs.jsonl"
    done = {} if args.quick else load_partial(partial)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hardneg-quality-") as tmp:
        files = make_digit_task(Path(tmp) / "data", bench.sizes)
        specs = make_specs(bench, selected, files, Path(tmp), args.clock, args.task)
        key = {id(s): run_key(args.task, s.method.name, s.protocol, s.seed, s.epochs) for s in specs}
        todo = [s for s in specs if key[id(s)] not in done]
        log.info("%d runs (%d methods x %d protocols x %d seeds; %d already in %s) in %d workers", len(specs),
                 len(selected), len(bench.protocols), bench.seeds, len(specs) - len(todo), partial, args.workers)

        def keep(spec: RunSpec, rec: RunRecord) -> None:
            done[key[id(spec)]] = rec
            if not args.quick:
                with open(partial, "a") as f:
                    f.write(json.dumps({"key": key[id(spec)], "record": asdict(rec)}) + "\n")

        run_all(todo, args.workers, keep)
        records = [done[key[id(s)]] for s in specs]
    summary = summarise(records, compare_epoch=bench.epochs)
    (args.out / f"{name}.json").write_text(json.dumps(
        {"task": args.task, "bench": asdict(bench), "summary": summary, "runs": [asdict(r) for r in records]},
        indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(summary))
    plot(records, args.out / f"{name}.png", [m.name for m in selected])
    print_table(summary)
    print(f"\n{len(records)} runs in {time.monotonic() - started:.0f} s; results in {args.out}/{name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
