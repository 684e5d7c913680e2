"""Benchmark of training throughput: hardneg's trainer against a plain PyTorch loop, side by side.

Both train the same model (a small two-layer CNN, given to hardneg as ``--model module:attr`` would be) on the
same generated data, with the same batch size, optimiser (Adam), P x K batches and semi-hard in-batch mining
(FaceNet's: for each anchor-positive pair the nearest negative with ``d_ap < d_an < d_ap + m``, squared
distances), all in one process, one after the other: plain, hardneg in-batch, plain, hardneg global
(``class-batches``), plain. Each hardneg run is compared with the mean of the plain epochs run right before and
right after it, so that a drift in the machine's load hits both sides.

The plain loop is what a user writes in an afternoon: draw the epoch's P x K batches, then per batch index the
tensors, embed, mine inline under ``no_grad``, triplet loss, ``backward``, ``step``. Its clock per epoch is
wall-clock and this process's CPU seconds (every thread). hardneg's comes from its own ``metrics.jsonl``: per
epoch ``train_s`` / ``train_cpu_s`` (the epoch's steps), ``refresh_s`` / ``refresh_cpu_s`` (embed the training
set, index, export the model, publish the snapshot, the recipe's refresh), and the phases of
:mod:`hardneg.trainer.timing`. Refreshes are amortised as in a long run: the mean refresh over
``refresh_every`` epochs. A global run needs them; an in-batch run's only publish snapshots for serving, so
its ratio is also given without them ("training only").

Allocator: hardneg's trainer has glibc's malloc keep the memory a step frees
(:func:`hardneg.trainer.runtime.keep_freed_memory`: a third fewer CPU seconds per step of this model); the
plain loop gets the same setting, so the ratio measures the loops, not the allocator.

Threads: both loops run with ``--threads`` (default 1) torch threads, and hardneg with the same FAISS threads
(its ``threads`` setting). On a shared machine whose two cores are busy, two threads cost 3-6x the CPU of one
per training step (each OpenMP pool waits for the other's jobs), so CPU seconds only compare at one thread.

For class-batches the results also hold ``centroid_sample_check``: on the run's final snapshot, how well class
centroids from M items per class (the ``centroid_sample`` of a refresh that publishes nothing) stand in for
every item's.

The evaluation of the whole generated set (leave-one-out retrieval of every item, MAP@R) is timed as the
trainer's ``eval`` phase; ``--eval-sample`` and ``--eval-every`` are the trainer's settings that bound it.

Usage: ``.venv/bin/python bench/throughput.py [--quick] [--items N] [--classes C] [--epochs E] [--threads T]
[--recipes class-batches]``
(the full size, 60,000 images of 28 x 112 in 10,000 classes, as in the report that asked for this benchmark,
takes tens of minutes on two busy cores: run it under ``flock /tmp/hardneg-bench.lock nice -n 5``). Results go
to ``bench/results/throughput.json`` (``--out``) and a table on stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import ArrayDataset, DataSplits
from hardneg.trainer.loop import Trainer
from hardneg.trainer.models import Normalized
from hardneg.trainer.runtime import keep_freed_memory
from hardneg.trainer.timing import REFRESH_PHASES, TRAIN_PHASES

RESULTS = Path(__file__).resolve().parent / "results"
MODULE = Path(__file__).stem  # importable as this name: sys.path[0] is bench/ when run as a script

log = logging.getLogger("bench.throughput")


# ---------------------------------------------------------------------------------------------------- setup
@dataclass(frozen=True)
class Setup:
    """One benchmark's sizes and training settings (the defaults: the full size)."""

    items: int = 60_000
    classes: int = 10_000  # 6 items per class
    height: int = 28
    width: int = 112
    noise: float = 2.0  # pixel noise over prototypes of std 1: an untrained model's MAP@R is about 0.4 at 500 classes
    epochs: int = 5  # global: a warm-up epoch, a refresh, then refresh_every epochs on its batches
    batch_size: int = 128
    per_class: int = 4  # K of the P x K batches
    margin: float = 0.2
    lr: float = 1e-3
    refresh_every: int = 4
    embedding_dim: int = 64
    seed: int = 0
    plain_epochs: int = 2  # epochs of each plain-loop block (before, between and after the hardneg runs)
    threads: int = 1  # torch intra-op threads, both loops (0: torch's default); see the module docstring
    eval_sample: int | None = None  # the trainer's settings that bound the evaluation's cost
    eval_every: int = 1
    publish_every: int = 1  # the trainer's: refreshes between published snapshots (the others sample centroids)


QUICK = Setup(items=3_000, classes=500, height=28, width=56, epochs=3, refresh_every=1, plain_epochs=1)


def make_data(s: Setup) -> tuple[np.ndarray, np.ndarray]:
    """``items`` images (n, 1, H, W) float32 of ``classes`` classes (equal sizes, sorted by label), and labels (n,).

    Each class is a random prototype (a 7 x 7 pattern upsampled to H x W, so that classes differ in structure a
    CNN can learn), each item its class's prototype plus ``noise`` x Gaussian pixel noise: hard enough that
    semi-hard mining keeps finding triplets in every batch.
    """
    if s.items % s.classes:
        raise SystemExit(f"items ({s.items}) must be a multiple of classes ({s.classes})")
    rng = np.random.default_rng(s.seed)
    coarse = torch.from_numpy(rng.standard_normal((s.classes, 1, 7, 7), dtype=np.float32))
    protos = F.interpolate(coarse, size=(s.height, s.width), mode="bilinear", align_corners=False).numpy()
    per = s.items // s.classes
    y = np.repeat(np.arange(s.classes, dtype=np.int64), per)
    x = np.empty((s.items, 1, s.height, s.width), np.float32)
    for start in range(0, s.items, 8192):  # in chunks: no second full-size array of noise
        stop = min(start + 8192, s.items)
        noise = rng.standard_normal((stop - start, 1, s.height, s.width), dtype=np.float32)
        x[start:stop] = protos[y[start:stop]] + s.noise * noise
    return x, y


class TwoLayerCNN(nn.Module):
    """Two 3x3 conv layers (16, 32 channels) with max-pooling, a 4 x 4 average pool and a linear head."""

    def __init__(self, in_channels: int = 1, embedding_dim: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(32 * 16, embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def two_layer_cnn(input_shape: tuple[int, ...], embedding_dim: int) -> nn.Module:
    """The model factory hardneg is given (``--model throughput:two_layer_cnn``)."""
    return TwoLayerCNN(input_shape[0], embedding_dim)


# ---------------------------------------------------------------------------------------------- plain loop
def plain_pk_batches(labels: np.ndarray, batch_size: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of P x K batches over items sorted by label in equal classes: ceil(n / batch) batches."""
    classes, counts = np.unique(labels, return_counts=True)
    per, p = int(counts[0]), batch_size // k
    out = []
    for _ in range(-(-len(labels) // batch_size)):
        chosen = rng.choice(len(classes), p, replace=False)
        cols = np.argsort(rng.random((p, per)), axis=1)[:, :k]
        out.append((chosen[:, None] * per + cols).reshape(-1))
    return out


def plain_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                batches: list[np.ndarray], margin: float) -> float:
    """One epoch of the plain loop; returns the mean loss over the mined triplets."""
    model.train()
    total, count = 0.0, 0
    for b in batches:
        idx = torch.from_numpy(b)
        xb, yb = x[idx], y[idx]
        emb = F.normalize(model(xb).flatten(1), dim=1)
        with torch.no_grad():  # semi-hard mining of every anchor-positive pair
            d2 = torch.cdist(emb, emb).pow(2)
            same = yb[:, None] == yb[None, :]
            a, p = torch.nonzero(same & ~torch.eye(len(yb), dtype=torch.bool), as_tuple=True)
            d_ap = d2[a, p][:, None]
            semi = ~same[a] & (d2[a] > d_ap) & (d2[a] < d_ap + margin)
            keep = semi.any(1)
            n = d2[a].masked_fill(~semi, float("inf")).argmin(1)
            a, p, n = a[keep], p[keep], n[keep]
        if len(a) == 0:
            continue
        terms = torch.clamp((emb[a] - emb[p]).pow(2).sum(1) - (emb[a] - emb[n]).pow(2).sum(1) + margin, min=0)
        loss = terms.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(a)
        count += len(a)
    return total / max(count, 1)


def run_plain(s: Setup, x: torch.Tensor, y: torch.Tensor, labels: np.ndarray, epochs: int) -> list[dict[str, float]]:
    """``epochs`` epochs of the plain loop from a fresh model; per epoch wall and CPU seconds."""
    torch.manual_seed(s.seed)
    model = two_layer_cnn(tuple(x.shape[1:]), s.embedding_dim)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, foreach=True)
    rng = np.random.default_rng(s.seed)
    out = []
    for _ in range(epochs):
        t, c = time.perf_counter(), time.process_time()
        batches = plain_pk_batches(labels, s.batch_size, s.per_class, rng)
        loss = plain_epoch(model, opt, x, y, batches, s.margin)
        out.append({"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "loss": loss})
    return out


# ------------------------------------------------------------------------------------------------- hardneg
def hardneg_config(s: Setup, recipe: str, work: Path) -> TrainConfig:
    extra: dict[str, Any] = {}
    if s.eval_sample is not None:
        extra["eval_sample"] = s.eval_sample
    if s.eval_every != 1:
        extra["eval_every"] = s.eval_every
    if s.threads:
        extra["threads"] = s.threads
    if s.publish_every != 1:
        extra["publish_every"] = s.publish_every
    return TrainConfig.from_dict({
        "data": "npz:unused", "model": f"{MODULE}:two_layer_cnn", "embedding_dim": s.embedding_dim,
        "recipe": recipe, recipe: {"per_class": s.per_class}, "epochs": s.epochs, "batch_size": s.batch_size,
        "margin": s.margin, "lr": s.lr, "refresh_every": s.refresh_every, "seed": s.seed,
        "store": str(work / f"{recipe}-store"), "run_dir": str(work / recipe), **extra})


def run_hardneg(s: Setup, recipe: str, x: np.ndarray, y: np.ndarray, work: Path) -> list[dict[str, Any]]:
    """A hardneg run of ``recipe`` on the data (evaluated on the same items); its metrics.jsonl lines."""
    cfg = hardneg_config(s, recipe, work)
    data = ArrayDataset(x, y, "generated")
    (work / recipe).mkdir(parents=True)
    trainer = Trainer(cfg, DataSplits(data, data, "generated: train and evaluate on every item"), work / recipe)
    trainer.run()
    return [json.loads(line) for line in (work / recipe / "metrics.jsonl").read_text().splitlines()]


def phase_breakdown(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per trained epoch of every phase (wall and CPU), plus the train steps' unphased rest."""
    epochs = [r["timing"] for r in records if r["timing"] is not None]
    out: dict[str, float] = {}
    for key in sorted({k for t in epochs for k in t}):
        out[key] = sum(t.get(key, 0.0) for t in epochs) / len(epochs)
    for clock in ("", "_cpu"):
        phased = sum(out.get(f"{p}{clock}_s", 0.0) for p in TRAIN_PHASES)
        out[f"train_other{clock}_s"] = out.get(f"train{clock}_s", 0.0) - phased
    return out


def epoch_costs(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per trained epoch: training and refresh seconds (wall, CPU), evaluation, and the epoch's whole wall time."""
    out = []
    for prev, r in zip(records, records[1:]):
        t = r["timing"]
        out.append({"train_s": t["train_s"], "train_cpu_s": t["train_cpu_s"], "refresh_s": t["refresh_s"],
                    "refresh_cpu_s": t["refresh_cpu_s"], "eval_s": t.get("eval_s", 0.0),
                    "eval_cpu_s": t.get("eval_cpu_s", 0.0), "elapsed_s": r["elapsed_s"] - prev["elapsed_s"]})
    return out


# -------------------------------------------------------------------------------------------------- report
def mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def compare(plain: list[dict[str, float]], costs: list[dict[str, float]],
            refresh_every: int | None) -> dict[str, float]:
    """hardneg's mean epoch over the plain loop's mean epoch, by CPU and by wall-clock.

    With ``refresh_every``, hardneg's epoch also carries the mean refresh divided by ``refresh_every``: the
    steady state of a long run (one refresh every ``refresh_every`` epochs), whatever the epochs run here.
    """
    out = {}
    for clock, key in (("cpu", "cpu_s"), ("wall", "wall_s")):
        suffix = "_cpu_s" if clock == "cpu" else "_s"
        hard = mean([c[f"train{suffix}"] for c in costs])
        if refresh_every is not None:
            hard += mean([c[f"refresh{suffix}"] for c in costs if c[f"refresh{suffix}"] > 0]) / refresh_every
        out[f"hardneg_{clock}_s"] = hard
        out[f"plain_{clock}_s"] = mean([p[key] for p in plain])
        out[f"ratio_{clock}"] = hard / out[f"plain_{clock}_s"]
    return out


RECIPES = ("in-batch", "class-batches")


def run(s: Setup, work: Path, recipes: tuple[str, ...] = RECIPES) -> dict[str, Any]:
    if s.threads:
        torch.set_num_threads(s.threads)
    keep_freed_memory()  # the allocator setting hardneg's trainer makes, for the plain loop from its first epoch
    x, y = make_data(s)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    started = time.perf_counter()
    plain: list[list[dict[str, float]]] = [run_plain(s, xt, yt, y, s.plain_epochs)]
    hard: dict[str, list[dict[str, Any]]] = {}
    for recipe in recipes:
        hard[recipe] = run_hardneg(s, recipe, x, y, work)
        plain.append(run_plain(s, xt, yt, y, s.plain_epochs))
    result: dict[str, Any] = {
        "setup": dataclasses.asdict(s), "torch_threads": torch.get_num_threads(), "uptime": _uptime(),
        "total_wall_s": time.perf_counter() - started, "plain": plain, "hardneg": {}}
    for i, (recipe, records) in enumerate(hard.items()):
        costs = epoch_costs(records)
        around = plain[i] + plain[i + 1]  # the plain epochs right before and right after
        result["hardneg"][recipe] = {
            "epochs": costs, "phases": phase_breakdown(records),
            "vs_plain": compare(around, costs, s.refresh_every),
            "vs_plain_train_only": compare(around, costs, None),
            "eval_untrained_wall_s": records[0]["elapsed_s"],
            "metrics": records[-1]["metrics"]}
        if recipe == "class-batches":
            result["hardneg"][recipe]["centroid_sample_check"] = centroid_sample_check(
                hardneg_config(s, recipe, work), s.batch_size // s.per_class)
    return result


def centroid_sample_check(cfg: TrainConfig, p: int, samples: tuple[int, ...] = (4, 8, 16, 32),
                          draws: int = 3) -> dict[str, Any]:
    """How well class centroids from M items per class stand in for every item's, on the run's final snapshot.

    Per M (``draws`` seeded samples each): the largest distance between a class's sampled and full centroid
    (beside the mean distance from a class's centroid to the nearest other class's), and the share of the
    class table's neighbour entries (each class's P - 1 nearest classes, as sets) the sample finds.
    """
    from hardneg.miner.distances import COSINE
    from hardneg.miner.index import stored_vectors
    from hardneg.miner.store import SnapshotStore
    from hardneg.trainer.batching import class_centroids, class_sample, confusable_classes

    index = SnapshotStore(cfg.store).open().index
    vectors, labels = stored_vectors(index), index.labels
    classes, full = class_centroids(vectors, labels)
    table = confusable_classes(vectors, labels, p)
    d2 = ((full[table[:, 1]] - full) ** 2).sum(1)
    out: dict[str, Any] = {"classes": len(classes), "p": p, "nearest_class_distance": float(np.sqrt(d2).mean())}
    for m in samples:
        shift, agree = [], []
        for seed in range(draws):
            items = class_sample(labels, m, np.random.default_rng(seed))
            got = confusable_classes(COSINE.prepare(vectors[items]), labels[items], p)
            shift.append(float(np.linalg.norm(class_centroids(vectors[items], labels[items])[1] - full, axis=1).max()))
            agree.append(float(np.mean([len(set(a[1:]) & set(b[1:])) / (p - 1) for a, b in zip(got, table)])))
        out[str(m)] = {"items": len(items), "max_centroid_shift": float(np.mean(shift)),
                       "table_agreement": float(np.mean(agree)), "table_agreement_min": float(np.min(agree))}
    return out


def time_evaluation(s: Setup) -> dict[str, Any]:
    """Wall and CPU seconds of the trainer's evaluation of every generated item with an untrained model."""
    from hardneg.trainer.evaluate import evaluate

    if s.threads:
        torch.set_num_threads(s.threads)
    x, y = make_data(s)
    cfg = hardneg_config(s, "in-batch", Path(tempfile.gettempdir()))
    torch.manual_seed(s.seed)
    model = Normalized(two_layer_cnn(tuple(x.shape[1:]), s.embedding_dim))
    t, c = time.perf_counter(), time.process_time()
    metrics = evaluate(model, torch.from_numpy(x), y, **eval_options(cfg))
    return {"setup": dataclasses.asdict(s), "uptime": _uptime(), "eval_wall_s": time.perf_counter() - t,
            "eval_cpu_s": time.process_time() - c, "metrics": metrics}


def eval_options(cfg: TrainConfig) -> dict[str, Any]:
    """The keyword arguments the trainer evaluates with (those this version of it has)."""
    return {"batch_size": cfg.eval_batch_size}


def _uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def table(result: dict[str, Any]) -> str:
    """The result as a Markdown table: ratios, then hardneg's phases per epoch."""
    lines = ["| hardneg recipe | per epoch CPU s (hardneg / plain) | ratio CPU | wall s (hardneg / plain) | "
             "ratio wall | ratio CPU, training only |", "|---|---|---|---|---|---|"]
    for recipe, h in result["hardneg"].items():
        v, t = h["vs_plain"], h["vs_plain_train_only"]
        lines.append(f"| {recipe} | {v['hardneg_cpu_s']:.2f} / {v['plain_cpu_s']:.2f} | {v['ratio_cpu']:.3f} | "
                     f"{v['hardneg_wall_s']:.2f} / {v['plain_wall_s']:.2f} | {v['ratio_wall']:.3f} | "
                     f"{t['ratio_cpu']:.3f} |")
    phases = [*REFRESH_PHASES, *TRAIN_PHASES, "train_other", "eval"]
    lines += ["", "| phase (CPU s / wall s per epoch) | " + " | ".join(result["hardneg"]) + " |",
              "|---|" + "---|" * len(result["hardneg"])]
    for p in phases:
        cells = [f"{h['phases'].get(f'{p}_cpu_s', 0.0):.3f} / {h['phases'].get(f'{p}_s', 0.0):.3f}"
                 for h in result["hardneg"].values()]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[Setup, Path]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3,000 images of 28 x 56, 3 epochs (about a minute)")
    for f in dataclasses.fields(Setup):
        kind = float if f.type == "float" else int
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None)
    ap.add_argument("--eval-only", action="store_true",
                    help="only time the trainer's evaluation of every item (untrained model)")
    ap.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES),
                    help="the hardneg recipes to run (default: both), each between two plain-loop blocks")
    ap.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else Setup()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Setup) if getattr(args, f.name) is not None}
    return dataclasses.replace(base, **given), args.out, args.eval_only, tuple(args.recipes)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    s, out, eval_only, recipes = parse_args(argv)
    if eval_only:
        result = time_evaluation(s)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="hardneg-throughput-") as tmp:
        result = run(s, Path(tmp), recipes)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{s.items} items of {s.height} x {s.width}, {s.classes} classes, {s.epochs} epochs, batch {s.batch_size}, "
          f"torch threads {result['torch_threads']}, load {result['uptime']}, pid {os.getpid()}")
    print(table(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
