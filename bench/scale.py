"""Scale benchmark: build, publish, memory, mining and evaluation of 100k-1M items, per index kind.

On N seeded clustered unit-norm embeddings (``clustered_embeddings``: class centres plus spread, where an
item's nearest wrong-label neighbour sits hundreds of ranks deep behind its own class), for each index kind:

* **build / publish**: ``VectorIndex.build`` and ``SnapshotStore.publish`` seconds (wall and CPU), the
  peak resident memory of building (``VmHWM`` reset before each step), and the published bytes per item;
* **mining**: ``mine`` of ``hardest`` and of ``semihard`` (random positive, margin 0.2, seeded) for every
  anchor, wall and CPU seconds;
* **recall**: on a seeded subset of anchors scattered over all classes, mined by both with the same seed (so
  with the same positives), the share whose mined negative is the exact one (one at the same distance
  counts: ties);
* **speed-up** over exact mining, side by side in the same process. Exact mining of every anchor of 1M
  items takes about an hour of CPU here, so exact mining is timed on two seeded anchor subsets of whole
  consecutive classes (about ``m`` and ``2m`` anchors, so that the miner's class blocks look like a full run's), their
  ratio is printed to show the cost is linear in the anchors, and the larger one's rate is extrapolated to
  N (``--exact-all`` times every anchor instead). Slow kinds (``--subset-kinds``, default hnsw) and
  strategies (``--subset-strategies``) are likewise mined on a whole-class subset and scaled to N; the
  table says so.

Then retrieval metrics (``hardneg.miner.metrics``) at scale: every query of an evaluation subset in blocks,
and a sampled-query estimate on all N items with its 95 % confidence interval; time and peak memory.

The machine may be shared: the load average is printed at the start and the end, CPU time beside wall time.
Run: ``.venv/bin/python bench/scale.py --quick`` (about a minute), or e.g.
``bench/scale.py -n 1000000 --dim 64 --classes 1000 --kinds flat ivf``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from hardneg.miner.index import SearchParams, VectorIndex, ivf_lists
from hardneg.miner.metrics import retrieval_metrics
from hardneg.miner.mining import MiningConfig, mine
from hardneg.miner.store import SnapshotStore

KINDS = ("flat", "ivf", "ivf-sq8", "hnsw")
STRATEGIES = ("hardest", "semihard")


@dataclass(frozen=True)
class Data:
    vectors: np.ndarray  # (n, d) float32, unit norm
    labels: np.ndarray  # (n,) int64


def clustered_embeddings(n: int, dim: int, n_classes: int, spread: float, seed: int, chunk: int = 1 << 17) -> Data:
    """Unit-norm class centres, items at isotropic Gaussian noise ``spread / sqrt(dim)`` per coordinate around
    them, normalised to unit norm as a trained embedding's output is; generated in chunks of float32.

    ``spread=1.0`` with 1,000 items per class puts the nearest wrong-label item at rank ~260 (median) of the
    unfiltered ranking (``wrong_label_rank``).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, size=n).astype(np.int64)
    vectors = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centres[labels[s:e]] + spread / math.sqrt(dim) * rng.normal(size=(e - s, dim))
        vectors[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return Data(vectors, labels)


def wrong_label_rank(data: Data, sample: int, depth: int, seed: int) -> np.ndarray:
    """Rank (0-based) of the nearest wrong-label item in the unfiltered ranking of ``sample`` items; ``depth`` when
    it lies deeper: (sample,)."""
    import faiss

    rows = np.random.default_rng(seed).choice(len(data.labels), size=min(sample, len(data.labels)), replace=False)
    _, nn = faiss.knn(data.vectors[rows], data.vectors, depth, metric=faiss.METRIC_INNER_PRODUCT)
    wrong = data.labels[nn] != data.labels[rows, None]
    return np.where(wrong.any(1), wrong.argmax(1), depth)


@dataclass(frozen=True)
class Cost:
    """Wall-clock and process CPU seconds (all threads) of one call, and the peak resident memory during it."""

    wall: float
    cpu: float
    peak_rss_gib: float


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def measured(fn: Callable[[], object]) -> tuple[Cost, object]:
    """Run ``fn``; its :class:`Cost` (the peak RSS is the process's, reset to the current RSS first) and value."""
    try:  # Linux: writing 5 resets VmHWM, the peak resident set, to the current one
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    cost = Cost(time.perf_counter() - wall, time.process_time() - cpu, _status_kib("VmHWM") / 2**20)
    return cost, value


def index_name(kind: str, n: int) -> tuple[str, SearchParams | None]:
    """What ``VectorIndex.build`` gets for a benchmark kind, and the search parameters mining uses."""
    nlist, nprobe = ivf_lists(n)
    if kind == "ivf-sq8":  # the ivf rule's lists over 8-bit codes; the exact vectors re-rank (RFlat)
        return f"IVF{nlist},SQ8,RFlat", SearchParams(nprobe=nprobe)
    return kind, None


def negatives_by_anchor(result, anchors: np.ndarray) -> np.ndarray:
    """The first mined negative id of each of ``anchors`` (m,) ids, ``-1`` where none: (m,)."""
    first = np.unique(result.anchor, return_index=True)
    neg = np.full(len(anchors), -1, np.int64)
    pos = np.searchsorted(first[0], anchors)
    pos = np.clip(pos, 0, max(len(first[0]) - 1, 0))
    hit = (first[0][pos] == anchors) if len(first[0]) else np.zeros(len(anchors), bool)
    neg[hit] = result.negative[first[1][pos[hit]]]
    return neg


def recall_vs_exact(data: Data, anchors: np.ndarray, approx: np.ndarray, exact: np.ndarray) -> float:
    """Share of ``anchors`` whose approximate negative is the exact one or lies at the same distance (ties)."""
    same = approx == exact
    both = (approx >= 0) & (exact >= 0) & ~same
    d_a = np.einsum("ij,ij->i", data.vectors[anchors[both]], data.vectors[approx[both]])
    d_e = np.einsum("ij,ij->i", data.vectors[anchors[both]], data.vectors[exact[both]])
    same[both] = np.abs(d_a - d_e) <= 1e-6
    return float(same.mean())


@dataclass
class Row:
    kind: str
    factory: str
    build: Cost
    publish: Cost
    bytes_per_item: float
    mining: dict[str, dict] = field(default_factory=dict)


def mining_config(strategy: str) -> MiningConfig:
    """One negative per anchor with a random positive (the defaults), seeded."""
    return MiningConfig(strategy=strategy, per_anchor=1, seed=0)


def class_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Ids (rows) of a run of consecutive classes, from a random one on, that together hold at least ``size``
    items (or every class from there to the last): ascending.

    Consecutive, because the exact miner groups the anchors of consecutive classes into blocks of up to 4,096:
    scattered classes would each make a block of their own, which costs more per anchor than a full run.
    """
    classes, counts = np.unique(labels, return_counts=True)
    start = int(rng.integers(len(classes)))
    end = start + int(np.searchsorted(np.cumsum(counts[start:]), size)) + 1
    return np.flatnonzero(np.isin(labels, classes[start:end])).astype(np.int64)


def exact_rates(flat: VectorIndex, subsets: list[np.ndarray], strategies: tuple[str, ...],
                recall_anchors: np.ndarray) -> dict[str, dict]:
    """Exact mining per strategy, timed on each anchor subset: the runs, the per-anchor rate of the last, and
    the exact negatives of ``recall_anchors``."""
    out = {}
    for strategy in strategies:
        runs = []
        for anchors in subsets:
            cost, _ = measured(lambda: mine(flat, mining_config(strategy), anchors=anchors))  # noqa: B023
            runs.append({"anchors": len(anchors), "cost": cost})
        last = runs[-1]
        res = mine(flat, mining_config(strategy), anchors=recall_anchors)
        out[strategy] = {"runs": runs, "wall_per_anchor": last["cost"].wall / last["anchors"],
                         "cpu_per_anchor": last["cost"].cpu / last["anchors"],
                         "negatives": negatives_by_anchor(res, recall_anchors)}
    return out


def bench_kind(kind: str, data: Data, store_root: str, strategies: tuple[str, ...], exact: dict, recall_anchors: np.ndarray,
               subset: np.ndarray, subset_strategies: tuple[str, ...], seed: int) -> Row:
    """Build, publish and mine one kind; strategies in ``subset_strategies`` mine the anchors ``subset`` only
    (their time scaled to N), the others every anchor."""
    name, params = index_name(kind, len(data.labels))
    build, index = measured(lambda: VectorIndex.build(data.vectors, data.labels, index=name, seed=seed))
    store = SnapshotStore(os.path.join(store_root, kind), keep=1)
    publish, snap_name = measured(lambda: store.publish(index))
    folder = store.path_of(snap_name)
    size = sum(p.stat().st_size for p in folder.iterdir())
    row = Row(kind, index.spec.factory, build, publish, size / index.count)
    shutil.rmtree(store.root, ignore_errors=True)
    n = index.count
    for strategy in strategies:
        mine_anchors = subset if strategy in subset_strategies else None
        cost, _ = measured(lambda: mine(index, mining_config(strategy), anchors=mine_anchors, params=params))  # noqa: B023
        mined = n if mine_anchors is None else len(mine_anchors)
        # Recall: the same anchors, in the same order and with the same seed as the exact run, so the random
        # positives (and so the semi-hard bands) are the same.
        neg = negatives_by_anchor(mine(index, mining_config(strategy), anchors=recall_anchors, params=params),
                                  recall_anchors)
        ex = exact[strategy]
        wall_all, cpu_all = cost.wall * n / mined, cost.cpu * n / mined
        row.mining[strategy] = {
            "anchors_mined": mined, "cost": cost, "wall_all": wall_all, "cpu_all": cpu_all,
            "speedup_wall": ex["wall_per_anchor"] * n / wall_all, "speedup_cpu": ex["cpu_per_anchor"] * n / cpu_all,
            "recall": recall_vs_exact(data, recall_anchors, neg, ex["negatives"]),
        }
    del index
    return row


def bench_eval(data: Data, eval_items: int, sample: int, seed: int) -> dict:
    """Retrieval metrics of the first ``eval_items`` items (every query, in blocks) and a sample on all items."""
    out = {}
    sub = Data(data.vectors[:eval_items], data.labels[:eval_items])
    cost, full = measured(lambda: retrieval_metrics(sub.vectors, sub.labels))
    out["blocked"] = {"items": eval_items, "cost": cost, "metrics": full}
    cost, est = measured(lambda: retrieval_metrics(sub.vectors, sub.labels, sample=sample, seed=seed))
    out["sampled_same_items"] = {"items": eval_items, "sample": sample, "cost": cost, "metrics": est}
    cost, est = measured(lambda: retrieval_metrics(data.vectors, data.labels, sample=sample, seed=seed))
    out["sampled_all_items"] = {"items": len(data.labels), "sample": sample, "cost": cost, "metrics": est}
    return out


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k items, 64-d, 200 classes, small subsets (~1 min)")
    parser.add_argument("-n", type=int, default=100_000, help="items")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=100, help="classes (1,000 items each by default)")
    parser.add_argument("--spread", type=float, default=1.0, help="class spread (see clustered_embeddings)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--exact-anchors", type=int, default=5_000,
                        help="exact mining is timed on this many and twice as many seeded anchors")
    parser.add_argument("--exact-all", action="store_true", help="time exact mining of every anchor instead")
    parser.add_argument("--recall-anchors", type=int, default=2_000, help="seeded anchors the recall is measured on")
    parser.add_argument("--subset-kinds", nargs="*", default=["hnsw"], choices=KINDS,
                        help="kinds mined on --approx-subset anchors only, their time extrapolated to N")
    parser.add_argument("--subset-strategies", nargs="*", default=[], choices=STRATEGIES,
                        help="strategies mined on --approx-subset anchors only, for every kind")
    parser.add_argument("--approx-subset", type=int, default=10_000, help="anchors (whole classes) of the subsets")
    parser.add_argument("--build-only", nargs="*", default=[], choices=KINDS,
                        help="kinds built and published but not mined (flat: its mining is the exact baseline)")
    parser.add_argument("--eval-items", type=int, default=50_000, help="items of the every-query evaluation")
    parser.add_argument("--eval-sample", type=int, default=2_000, help="queries of the sampled evaluation")
    parser.add_argument("--no-eval", action="store_true")
    parser.add_argument("--threads", type=int,
                        help="threads for FAISS, BLAS and OpenMP in the whole run (default: the libraries' own); on a "
                             "loaded 2-core machine 1 made both exact and IVF mining faster, IVF by far the more")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.n, args.classes, args.exact_anchors, args.eval_items, args.eval_sample = 20_000, 20, 1_000, 10_000, 500
        args.recall_anchors, args.approx_subset = 1_000, 2_000
    n = args.n
    import faiss

    if args.threads is not None:  # one setting for the baseline and every candidate alike
        from threadpoolctl import threadpool_limits  # a dependency of scikit-learn, hence of hardneg

        threadpool_limits(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(f"hardneg scale benchmark: n={n:,} d={args.dim} classes={args.classes:,} spread={args.spread} "
          f"faiss threads {faiss.omp_get_max_threads()}, BLAS threads {args.threads or 'default'}; {load()}", flush=True)
    cost, data = measured(lambda: clustered_embeddings(n, args.dim, args.classes, args.spread, args.seed))
    ranks = wrong_label_rank(data, sample=200, depth=min(n, 4096), seed=args.seed + 1)
    print(f"data: {cost.wall:.1f} s; nearest wrong-label item at rank {np.median(ranks):.0f} (median), "
          f"{np.percentile(ranks, 10):.0f} (p10), {np.percentile(ranks, 90):.0f} (p90) of the unfiltered ranking",
          flush=True)
    # Ids are rows of `data` (the default ids). Timing subsets are runs of whole consecutive classes, so that the
    # exact miner's class blocks look like those of a run over every anchor; the recall subset is scattered.
    rng = np.random.default_rng(args.seed + 2)
    m = min(args.exact_anchors, n // 2)
    subsets = [np.arange(n, dtype=np.int64)] if args.exact_all else [class_subset(data.labels, m, rng),
                                                                    class_subset(data.labels, 2 * m, rng)]
    recall_anchors = np.sort(rng.choice(n, size=min(args.recall_anchors, n), replace=False)).astype(np.int64)
    approx_subset = class_subset(data.labels, min(args.approx_subset, n), rng)
    strategies = tuple(args.strategies)
    flat = VectorIndex.build(data.vectors, data.labels)
    exact = exact_rates(flat, subsets, strategies, recall_anchors)
    del flat
    figures: dict = {"n": n, "dim": args.dim, "classes": args.classes, "spread": args.spread, "threads": args.threads,
                     "wrong_label_rank": {"median": float(np.median(ranks)), "p90": float(np.percentile(ranks, 90))},
                     "load_start": os.getloadavg(), "exact": {}, "kinds": []}
    for strategy, ex in exact.items():
        runs = ex["runs"]
        per = [(r["cost"].cpu / r["anchors"], r["cost"].wall / r["anchors"]) for r in runs]
        linear = "" if len(runs) < 2 else (f"; CPU per anchor of the larger / the smaller: {per[1][0] / per[0][0]:.2f} "
                                           f"(wall {per[1][1] / per[0][1]:.2f}; 1.00 = linear)")
        print(f"exact {strategy}: " + ", ".join(f"{r['anchors']:,} anchors {r['cost'].wall:.1f} s wall "
                                               f"{r['cost'].cpu:.1f} s CPU" for r in runs)
              + f"{linear} -> all {n:,}: {ex['wall_per_anchor'] * n:.0f} s wall, {ex['cpu_per_anchor'] * n:.0f} s CPU",
              flush=True)
        figures["exact"][strategy] = {"runs": [{"anchors": r["anchors"], **asdict(r["cost"])} for r in runs],
                                      "wall_all": ex["wall_per_anchor"] * n, "cpu_all": ex["cpu_per_anchor"] * n}
    store_root = tempfile.mkdtemp(prefix="hardneg-scale-")
    header = (f"{'kind':<8} {'factory':<22} {'build s':>8} {'publish s':>9} {'peak GiB':>8} {'B/item':>7} | "
              f"{'strategy':<8} {'mine s wall':>11} {'CPU':>7} {'speed-up wall':>13} {'CPU':>6} {'recall':>6}")
    print(header, flush=True)
    try:
        for kind in args.kinds:
            subset_strategies = strategies if kind in args.subset_kinds else tuple(args.subset_strategies)
            row = bench_kind(kind, data, store_root, () if kind in args.build_only else strategies, exact,
                             recall_anchors, approx_subset, subset_strategies, args.seed)
            figures["kinds"].append(_row_dict(row))
            if not row.mining:
                print(f"{row.kind:<8} {row.factory:<22} {row.build.wall:8.1f} {row.publish.wall:9.1f} "
                      f"{row.build.peak_rss_gib:8.2f} {row.bytes_per_item:7.0f} | (not mined)", flush=True)
            for strategy, mm in row.mining.items():
                note = "" if mm["anchors_mined"] == n else f"  ({mm['anchors_mined']:,} anchors, scaled to N)"
                print(f"{row.kind:<8} {row.factory:<22} {row.build.wall:8.1f} {row.publish.wall:9.1f} "
                      f"{row.build.peak_rss_gib:8.2f} {row.bytes_per_item:7.0f} | {strategy:<8} {mm['wall_all']:11.1f} "
                      f"{mm['cpu_all']:7.1f} {mm['speedup_wall']:12.2f}x {mm['speedup_cpu']:5.2f}x "
                      f"{mm['recall']:6.3f}{note}", flush=True)
    finally:
        shutil.rmtree(store_root, ignore_errors=True)
    if not args.no_eval:
        ev = bench_eval(data, min(args.eval_items, n), args.eval_sample, args.seed)
        figures["eval"] = {k: {**{kk: vv for kk, vv in v.items() if kk != "cost"}, **asdict(v["cost"])}
                           for k, v in ev.items()}
        for key, v in ev.items():
            mt = v["metrics"]
            ci = f" ± {mt['map_at_r_ci95']:.4f}" if "map_at_r_ci95" in mt else ""
            print(f"eval {key:<18} {v['items']:>9,} items, {mt['num_queries']:>7,} queries: MAP@R {mt['map_at_r']:.4f}{ci}"
                  f", P@1 {mt['precision_at_1']:.4f}  [{v['cost'].wall:.1f} s wall, {v['cost'].cpu:.1f} s CPU, "
                  f"peak {v['cost'].peak_rss_gib:.2f} GiB]", flush=True)
    figures["load_end"] = os.getloadavg()
    print(load())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2, default=float)


def _row_dict(row: Row) -> dict:
    return {"kind": row.kind, "factory": row.factory, "build": asdict(row.build), "publish": asdict(row.publish),
            "bytes_per_item": row.bytes_per_item,
            "mining": {s: {**{k: v for k, v in mm.items() if k != "cost"}, **asdict(mm["cost"])}
                       for s, mm in row.mining.items()}}


if __name__ == "__main__":
    main()
