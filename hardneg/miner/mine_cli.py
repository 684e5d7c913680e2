"""``hardneg mine``: mine triplets and pairs from a snapshot into an ``.npz`` file and print the statistics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hardneg.miner.cli import load_npy
from hardneg.miner.index import SearchParams
from hardneg.miner.mining import MiningConfig, MiningStats, mine
from hardneg.miner.mining.config import POSITIVES, SEMIHARD_FALLBACKS, STRATEGIES
from hardneg.miner.mining.stats import DistanceSummary
from hardneg.miner.store import SnapshotStore

_DEFAULTS = MiningConfig()


def register_mine(sub: argparse._SubParsersAction) -> None:
    """Add the ``mine`` subcommand to the ``hardneg`` parser."""
    p = sub.add_parser("mine", help="mine hard triplets and pairs from a snapshot into an .npz file",
                       description="Mine hard negatives (and positives, triplets, pairs) from a snapshot. Writes "
                                   "arrays anchor, positive, negative, pair_i, pair_j, pair_y (stored ids; "
                                   "pair_y 0 = similar, 1 = dissimilar) and prints the statistics. "
                                   "Distances and margins are squared Euclidean d².")
    p.add_argument("--store", required=True, type=Path,
                   help="snapshot store folder; with HARDNEG_STORE_KEY set, unsigned snapshots are refused")
    p.add_argument("--snapshot", help="snapshot name (default: LATEST)")
    p.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    p.add_argument("--per-anchor", type=int, default=_DEFAULTS.per_anchor, help="negatives (triplets) per anchor")
    p.add_argument("--margin", type=float, default=_DEFAULTS.margin, help="triplet margin, in d² units")
    p.add_argument("--positive", choices=POSITIVES, default=_DEFAULTS.positive,
                   help="random same-label item, or the farthest one")
    p.add_argument("--fallback", choices=SEMIHARD_FALLBACKS, default=_DEFAULTS.semihard_fallback,
                   help="semihard: what an anchor without a semi-hard negative gets")
    p.add_argument("--window-skip", type=int, default=_DEFAULTS.window_skip,
                   help="window: nearest admissible wrong-label neighbours to skip")
    p.add_argument("--window-width", type=int, default=_DEFAULTS.window_width,
                   help="window: how many of the next neighbours to sample from")
    p.add_argument("--dw-cutoff", type=float, default=_DEFAULTS.dw_cutoff,
                   help="distance-weighted: lower clip on Euclidean d")
    p.add_argument("--dw-nonzero-loss-cutoff", type=float, default=_DEFAULTS.dw_nonzero_loss_cutoff,
                   help="distance-weighted: weight 0 at Euclidean d >= this")
    p.add_argument("--positive-aware", type=float, metavar="FRACTION",
                   help="drop negatives more similar than FRACTION x the positive's similarity (e.g. 0.95)")
    p.add_argument("--near-duplicate", type=float, metavar="D2",
                   help="drop negatives closer to the anchor than this d²")
    p.add_argument("--candidates", type=int, default=_DEFAULTS.candidates,
                   help="wrong-label neighbours fetched per anchor before the guards (doubled as needed)")
    p.add_argument("--anchors", type=Path, help="(m,) integer .npy of anchor ids (default: every item)")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--nprobe", type=int, help="IVF lists to visit (approximate snapshots)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (approximate snapshots)")
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    p.set_defaults(func=cmd_mine)


def cmd_mine(args: argparse.Namespace) -> int:
    # Validate everything cheap before loading the snapshot.
    config = MiningConfig(
        strategy=args.strategy, per_anchor=args.per_anchor, margin=args.margin, positive=args.positive,
        semihard_fallback=args.fallback, window_skip=args.window_skip, window_width=args.window_width,
        dw_cutoff=args.dw_cutoff, dw_nonzero_loss_cutoff=args.dw_nonzero_loss_cutoff,
        positive_aware=args.positive_aware, near_duplicate=args.near_duplicate, candidates=args.candidates,
        seed=args.seed)
    params = SearchParams(nprobe=args.nprobe, ef_search=args.ef_search)
    anchors = load_npy(args.anchors, "--anchors") if args.anchors else None
    snap = SnapshotStore(args.store).open(args.snapshot)
    result = mine(snap.index, config, anchors, params=params)
    result.save_npz(args.out)
    if args.json:
        print(json.dumps({"snapshot": snap.name, "out": str(args.out), "stats": result.stats.to_dict()}))
    else:
        print(f"snapshot {snap.name}: wrote {args.out}")
        print(format_stats(result.stats))
    return 0


def format_stats(stats: MiningStats) -> str:
    """The statistics as aligned lines for people."""
    share = "n/a" if stats.nonzero_loss_share is None else f"{stats.nonzero_loss_share:.4f}"
    rows = [
        ("strategy", f"{stats.strategy} (metric {stats.metric}, margin {stats.margin:g}, per anchor {stats.per_anchor})"),
        ("anchors", f"{stats.anchors} ({stats.anchors_mined} mined, {stats.anchors_singleton} singleton, "
                    f"{stats.anchors_short} short of negatives)"),
        ("triplets", str(stats.triplets)),
        ("pairs", f"{stats.pairs} ({stats.positive_pairs} similar, {stats.negative_pairs} dissimilar)"),
        ("non-zero loss share", share),
        ("search", f"{stats.search_rounds} round(s), {stats.anchors_widened} anchor(s) widened, "
                   f"{stats.candidates_examined} candidates examined"),
    ]
    if stats.guard_dropped:
        rows.append(("guards dropped", ", ".join(f"{k} {v}" for k, v in stats.guard_dropped.items())))
    if stats.strategy == "semihard":
        rows.append(("semihard fallback", f"{stats.semihard_fallback_used} used, {stats.semihard_skipped} skipped"))
    rows += [("d²(a,p)", _describe(stats.d2_positive)), ("d²(a,n)", _describe(stats.d2_negative))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _describe(s: DistanceSummary) -> str:
    if s.count == 0:
        return "none"
    q = s.quantiles
    return (f"n={s.count} mean={s.mean:.4f} min={s.min:.4f} p05={q['0.05']:.4f} median={q['0.5']:.4f} "
            f"p95={q['0.95']:.4f} max={s.max:.4f}")
