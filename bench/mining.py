"""Benchmark of hardneg's miner, printed as ratios against baselines run side by side in the same process.

On N clustered items (d=64, 100 classes, seeded), with every item as an anchor:

(a) the miner's total time for ``hardest`` over a plain unfiltered FAISS flat search of the same anchors
    for the same k (goal <= 1.3);
(b) the miner against a straightforward torch miner (chunked ``q @ x.T``, same-label entries masked,
    ``topk``) (goal >= 1.5x faster);
(c) on ivf and hnsw snapshots: speed-up over exact mining and recall of the exact hardest negatives
    (goal >= 5x faster at recall >= 0.95).

The machine may be shared: (a) and (b) alternate baseline and miner ``--repeats`` times and report the
median ratio of wall-clock and of process CPU time (CPU time does not count waiting for a core), and the
load average is printed. Run: ``.venv/bin/python bench/mining.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from hardneg.miner.index import SearchParams, VectorIndex
from hardneg.miner.mining import MiningConfig, mine


@dataclass(frozen=True)
class Data:
    vectors: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n,) int64


def clustered_data(n: int, dim: int, n_classes: int, noise: float, seed: int) -> Data:
    """Class centres on the unit sphere, items at Gaussian noise ``noise / sqrt(dim)`` per coordinate around them.

    ``noise=1.2`` puts an item's nearest wrong-label neighbour at rank ~150 (median) behind its own class
    for 100k items in 100 classes: the regime where filtered search must look deep.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, size=n).astype(np.int64)
    vectors = centres[labels] + noise / np.sqrt(dim) * rng.normal(size=(n, dim))
    return Data(vectors.astype(np.float32), labels)


def wrong_label_rank(index: VectorIndex, sample: int, seed: int) -> np.ndarray:
    """Rank (0-based) of the nearest wrong-label item in the unfiltered ranking, for ``sample`` anchors: (sample,)."""
    rows = np.random.default_rng(seed).choice(index.count, size=min(sample, index.count), replace=False)
    xb = index.index.reconstruct_n(0, index.count)
    _, nn = faiss.knn(xb[rows], xb, index.count, metric=index.distance.faiss_metric)
    return (index.labels[nn] != index.labels[rows, None]).argmax(1)


def faiss_flat_search(index: VectorIndex, k: int) -> np.ndarray:
    """Plain unfiltered search of every stored vector for ``k`` neighbours: (n, k) rows."""
    xb = index.index.reconstruct_n(0, index.count)
    return index.index.search(xb, k)[1]


def torch_miner(vectors: np.ndarray, labels: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """The straightforward miner: chunked ``q @ x.T``, same-label entries masked, ``topk``: (n, k) rows.

    ``vectors`` are L2-normalised, so the largest inner products are the nearest items.
    """
    x = torch.from_numpy(vectors)
    lab = torch.from_numpy(labels)
    out = np.empty((len(vectors), k), np.int64)
    with torch.inference_mode():
        for s in range(0, len(vectors), chunk):
            sims = x[s:s + chunk] @ x.T
            sims.masked_fill_(lab[s:s + chunk, None] == lab[None, :], float("-inf"))
            out[s:s + chunk] = sims.topk(k, dim=1).indices.numpy()
    return out


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process CPU seconds (all threads) of one call. On a shared machine CPU time is the
    steadier of the two: it does not count the time spent waiting for a core."""

    wall: float
    cpu: float


def timed(fn: Callable[[], object]) -> tuple[Timing, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), value


def side_by_side(baseline: Callable[[], object], candidate: Callable[[], object],
                 repeats: int) -> tuple[list[Timing], list[Timing], object]:
    """Alternate ``baseline`` and ``candidate`` ``repeats`` times; their timings and the candidate's last value."""
    tb, tc, value = [], [], None
    for _ in range(repeats):
        tb.append(timed(baseline)[0])
        t, value = timed(candidate)
        tc.append(t)
    return tb, tc, value


def median_ratio(num: list[Timing], den: list[Timing], attr: str) -> float:
    """Median over the alternations of ``num / den`` for ``attr`` (``wall`` or ``cpu``)."""
    return statistics.median(getattr(a, attr) / getattr(b, attr) for a, b in zip(num, den))


def hardest_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of anchors whose mined hardest negative is the exact one (both (n,) ids in the same anchor order)."""
    return float((approx == exact).mean())


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k items instead of 100k, one repeat")
    parser.add_argument("-n", type=int, help="items (default 100000, or 20000 with --quick)")
    parser.add_argument("--repeats", type=int, help="baseline/miner alternations for (a) and (b) (default 3, 1 quick)")
    parser.add_argument("--noise", type=float, default=1.2, help="class spread (see clustered_data)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    n = args.n or (20_000 if args.quick else 100_000)
    repeats = args.repeats or (1 if args.quick else 3)
    dim, n_classes, k = 64, 100, 1
    logging.basicConfig(level=logging.WARNING)
    figures: dict = {"n": n, "dim": dim, "classes": n_classes, "k": k, "noise": args.noise,
                     "faiss_threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads()}
    print(f"hardneg mining benchmark: n={n} d={dim} classes={n_classes} k={k} (all items as anchors), "
          f"faiss threads {figures['faiss_threads']}, torch threads {figures['torch_threads']}; {load()}")

    data = clustered_data(n, dim, n_classes, args.noise, seed=0)
    flat = VectorIndex.build(data.vectors, data.labels)
    ranks = wrong_label_rank(flat, sample=200, seed=1)
    figures["wrong_label_rank"] = {"median": float(np.median(ranks)), "p90": float(np.percentile(ranks, 90))}
    print(f"geometry: the nearest wrong-label item sits at rank {np.median(ranks):.0f} (median), "
          f"{np.percentile(ranks, 90):.0f} (p90) of the unfiltered ranking")
    config = MiningConfig(strategy="hardest", per_anchor=k)

    # (a) miner vs plain unfiltered FAISS flat search
    t_faiss, t_mine, exact = side_by_side(lambda: faiss_flat_search(flat, k), lambda: mine(flat, config), repeats)
    figures["a"] = {"faiss": _dicts(t_faiss), "miner": _dicts(t_mine), "ratio_wall": median_ratio(t_mine, t_faiss, "wall"),
                    "ratio_cpu": median_ratio(t_mine, t_faiss, "cpu")}
    print(f"(a) miner hardest / plain FAISS flat search: {figures['a']['ratio_wall']:.2f} wall, "
          f"{figures['a']['ratio_cpu']:.2f} CPU  (goal <= 1.3)  [faiss {_fmt(t_faiss)}; miner {_fmt(t_mine)}]")

    # (c) approximate snapshots, before torch runs: torch's own OpenMP threads keep spinning after each call
    # and would slow the FAISS calls that follow.
    exact_wall = statistics.median(t.wall for t in t_mine)
    exact_cpu = statistics.median(t.cpu for t in t_mine)
    figures["c"] = []
    # None: the snapshot's default parameters. IVF-Flat is searched by hardneg's label-aware, list-major path;
    # hnsw through VectorIndex.search, which widens efSearch by a class's worth of blocked items.
    for kind, sweep in (("ivf", [None, 40, 160]), ("IVF256,Flat", [24, 33, 40]), ("hnsw", [None, 16])):
        t_build, index = timed(lambda: VectorIndex.build(data.vectors, data.labels, index=kind))
        for value in sweep:
            params = None if value is None else (
                SearchParams(ef_search=value) if kind == "hnsw" else SearchParams(nprobe=value))
            t, res = timed(lambda: mine(index, config, params=params))
            recall = hardest_recall(res.negative, exact.negative)
            setting = _setting(kind, index, value)
            row = {"index": index.spec.factory, "setting": setting, "miner": t.__dict__, "build_s": t_build.wall,
                   "speedup_wall": exact_wall / t.wall, "speedup_cpu": exact_cpu / t.cpu, "recall": recall}
            figures["c"].append(row)
            print(f"(c) {index.spec.factory:<14} {setting:<23} speed-up over exact {row['speedup_wall']:5.2f}x wall "
                  f"{row['speedup_cpu']:5.2f}x CPU, recall {recall:.4f}  [{t.wall:.2f} s]  (goal >= 5x at recall >= 0.95)")

    # (b) miner vs a straightforward torch miner
    xb = flat.index.reconstruct_n(0, flat.count)
    t_torch, t_mine_b, _ = side_by_side(lambda: torch_miner(xb, flat.labels, k), lambda: mine(flat, config), repeats)
    torch_rows = torch_miner(xb, flat.labels, k)[:, 0]
    agree = float((flat.ids[torch_rows] == exact.negative).mean())
    figures["b"] = {"torch": _dicts(t_torch), "miner": _dicts(t_mine_b), "same_negatives": agree,
                    "speedup_wall": median_ratio(t_torch, t_mine_b, "wall"),
                    "speedup_cpu": median_ratio(t_torch, t_mine_b, "cpu")}
    print(f"(b) torch miner / miner: {figures['b']['speedup_wall']:.2f}x faster wall, {figures['b']['speedup_cpu']:.2f}x "
          f"CPU  (goal >= 1.5)  [torch {_fmt(t_torch)}; miner {_fmt(t_mine_b)}; same negatives for {agree:.4f} "
          f"of anchors]")
    print(load())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


def _setting(kind: str, index: VectorIndex, value: int | None) -> str:
    if kind == "hnsw":
        return f"ef_search={value or index.spec.ef_search}{'' if value else ' (default)'}"
    return f"nprobe={value or index.spec.nprobe}{'' if value else ' (default)'}"


def _fmt(times: list[Timing]) -> str:
    return "wall " + "/".join(f"{t.wall:.2f}" for t in times) + " s, CPU " + "/".join(f"{t.cpu:.2f}" for t in times) + " s"


def _dicts(times: list[Timing]) -> list[dict]:
    return [t.__dict__ for t in times]


if __name__ == "__main__":
    main()
