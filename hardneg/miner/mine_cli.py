"""``hardneg mine``: mine triplets and pairs from a snapshot and print the statistics.

Label mode (the default) mines the snapshot's own items into an ``.npz``. Query mode (``--queries``) mines
outside queries against the snapshot as a corpus, with positives from a qrels file, and writes one of the
trainer layouts of :mod:`hardneg.miner.formats`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.formats import FORMATS, Cells, read_qrels, read_texts, write_mined
from hardneg.miner.index import SearchParams
from hardneg.miner.mining import MiningConfig, MiningStats, mine
from hardneg.miner.mining.config import POSITIVES, SEMIHARD_FALLBACKS, STRATEGIES, WINDOW_SAMPLINGS
from hardneg.miner.mining.queries import mine_queries
from hardneg.miner.mining.rescore import RescoreGuard, load_scorer
from hardneg.miner.mining.stats import DistanceSummary
from hardneg.miner.npy import load_npy
from hardneg.miner.store import SnapshotStore

_DEFAULTS = MiningConfig()
# Label-mode options refused in query mode: their default, and the query-mode option to use instead.
_LABEL_ONLY = {"per_anchor": (_DEFAULTS.per_anchor, "--num-negatives"), "positive": (_DEFAULTS.positive, None),
               "fallback": (_DEFAULTS.semihard_fallback, None), "window_skip": (_DEFAULTS.window_skip, "--range-min"),
               "window_width": (_DEFAULTS.window_width, "--range-max"), "dw_cutoff": (_DEFAULTS.dw_cutoff, None),
               "dw_nonzero_loss_cutoff": (_DEFAULTS.dw_nonzero_loss_cutoff, None), "anchors": (None, None),
               "exclude_suspects": (None, None)}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``mine`` subcommand to the ``hardneg`` parser."""
    p = sub.add_parser("mine", help="mine hard negatives from a snapshot (its own items, or queries against it)",
                       description="Label mode: mine hard negatives (and positives, triplets, pairs) among a "
                                   "snapshot's items; writes arrays anchor, positive, negative, pair_i, pair_j, "
                                   "pair_y (stored ids; pair_y 0 = similar, 1 = dissimilar) to an .npz. Query mode "
                                   "(--queries, --qrels): mine each query's negatives from the snapshot as a "
                                   "corpus, never one of its qrels positives, and write --format. Both print the "
                                   "statistics. Distances and --margin are squared Euclidean d²; the score guards "
                                   "use the similarity (cosine snapshots: the cosine; l2: -d²).")
    p.add_argument("--store", required=True, type=Path,
                   help="snapshot store folder; with HARDNEG_STORE_KEY set, unsigned snapshots are refused")
    p.add_argument("--snapshot", help="snapshot name (default: LATEST)")
    p.add_argument("--out", required=True, type=Path,
                   help="the file to write: .npz (label mode, --format pml), .jsonl or .parquet (query mode)")
    p.add_argument("--strategy", choices=STRATEGIES, help="label mode: how negatives are picked (required there)")
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
    p.add_argument("--absolute-margin", type=float, metavar="M",
                   help="drop negatives scoring above the positive's score - M (sentence-transformers' rule)")
    p.add_argument("--relative-margin", type=float, metavar="R",
                   help="drop negatives scoring above s_p - |s_p| x R, e.g. 0.05 (NV-Retriever's TopK-PercPos)")
    p.add_argument("--max-score", type=float, help="drop negatives scoring above this")
    p.add_argument("--exclude-suspects", type=float, metavar="FRACTION",
                   help="label mode: never use the top FRACTION of label-noise suspects (hardneg audit labels) "
                        "as negatives")
    p.add_argument("--candidates", type=int, default=_DEFAULTS.candidates,
                   help="wrong-label neighbours fetched per anchor before the guards (doubled as needed)")
    p.add_argument("--anchors", type=Path, help="(m,) integer .npy of anchor ids (default: every item)")
    p.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    p.add_argument("--nprobe", type=int, help="IVF lists to visit (approximate snapshots)")
    p.add_argument("--ef-search", type=int, help="HNSW search breadth (approximate snapshots)")
    p.add_argument("--json", action="store_true", help="print the statistics as one JSON object")
    q = p.add_argument_group("query mode", "mine outside queries against the snapshot as a corpus")
    q.add_argument("--queries", type=Path, help="(m, dim) float .npy of query embeddings")
    q.add_argument("--query-ids", type=Path, help="(m,) integer .npy of the queries' ids (default 0..m-1)")
    q.add_argument("--qrels", type=Path,
                   help="TSV 'query_id doc_id [relevance]' (BEIR / MS MARCO); relevance > 0 marks a positive")
    q.add_argument("--num-negatives", type=int, default=3, help="negatives per query")
    q.add_argument("--range-min", type=int, default=0, help="skip this many nearest admissible documents")
    q.add_argument("--range-max", type=int,
                   help="pick among admissible ranks [range-min, range-max) (default range-min + num-negatives)")
    q.add_argument("--sampling", choices=WINDOW_SAMPLINGS, default="top",
                   help="top: the nearest of the window; random: uniformly without replacement")
    q.add_argument("--format", choices=FORMATS, default="triplet", help="output layout (see docs)")
    q.add_argument("--texts", type=Path, help="id -> text of the documents (.jsonl with _id/text, or TSV id<TAB>text)")
    q.add_argument("--query-texts", type=Path, help="id -> text of the queries (same layouts)")
    q.add_argument("--rescore", metavar="MODULE:ATTR",
                   help="a callable scoring lists of (query, document) pairs, e.g. rerank:model.predict")
    q.add_argument("--rescore-max", type=float, help="drop candidates the rescorer scores above this")
    q.add_argument("--rescore-relative", type=float, metavar="FRACTION",
                   help="drop candidates the rescorer scores above FRACTION x the query's (lowest) positive score")
    q.add_argument("--rescore-batch", type=int, default=256, help="pairs per rescorer call")
    p.set_defaults(func=cmd_mine)


def _guards(args: argparse.Namespace) -> dict:
    return {"absolute_margin": args.absolute_margin, "relative_margin": args.relative_margin,
            "max_score": args.max_score, "positive_aware": args.positive_aware, "near_duplicate": args.near_duplicate}


def cmd_mine(args: argparse.Namespace) -> int:
    if args.queries is not None:
        return cmd_mine_queries(args)
    if args.strategy is None:
        raise ValidationError("label mode needs --strategy (or give --queries and --qrels for query mode)")
    stray = [f for f in ("query_ids", "qrels", "texts", "query_texts", "rescore") if getattr(args, f) is not None]
    if stray:
        raise ValidationError(f"--{stray[0].replace('_', '-')} belongs to query mode: give --queries too")
    # Validate everything cheap before loading the snapshot.
    config = MiningConfig(
        strategy=args.strategy, per_anchor=args.per_anchor, margin=args.margin, positive=args.positive,
        semihard_fallback=args.fallback, window_skip=args.window_skip, window_width=args.window_width,
        dw_cutoff=args.dw_cutoff, dw_nonzero_loss_cutoff=args.dw_nonzero_loss_cutoff,
        candidates=args.candidates, seed=args.seed, exclude_suspects=args.exclude_suspects, **_guards(args))
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


def cmd_mine_queries(args: argparse.Namespace) -> int:
    """Query mode: qrels positives, the rank window and the guards, then one of the trainer layouts."""
    if args.strategy is not None:
        raise ValidationError("query mode picks negatives from the rank window (--range-min, --range-max, "
                              "--sampling); --strategy is for label mode")
    if args.qrels is None:
        raise ValidationError("query mode needs --qrels (each query's positive documents)")
    for flag, (default, instead) in _LABEL_ONLY.items():
        if getattr(args, flag) != default:
            hint = f"; use {instead}" if instead else ""
            raise ValidationError(f"--{flag.replace('_', '-')} belongs to label mode{hint}")
    if args.num_negatives < 1:
        raise ValidationError(f"--num-negatives must be >= 1, got {args.num_negatives}")
    range_max = args.range_min + args.num_negatives if args.range_max is None else args.range_max
    if args.range_min < 0 or range_max - args.range_min < args.num_negatives:
        raise ValidationError(f"the window [--range-min {args.range_min}, --range-max {range_max}) must hold at "
                              f"least --num-negatives {args.num_negatives} ranks, with range-min >= 0")
    config = MiningConfig(strategy="window", per_anchor=args.num_negatives, window_skip=args.range_min,
                          window_width=range_max - args.range_min, window_sampling=args.sampling,
                          margin=args.margin, candidates=args.candidates, seed=args.seed, **_guards(args))
    queries = load_npy(args.queries, "--queries")
    if queries.ndim != 2:
        raise ValidationError(f"--queries must be a 2-D (m, dim) array, got shape {queries.shape}")
    query_ids = load_npy(args.query_ids, "--query-ids") if args.query_ids else np.arange(len(queries))
    if query_ids.shape != (len(queries),) or not np.issubdtype(query_ids.dtype, np.integer):
        raise ValidationError(f"--query-ids must be a ({len(queries)},) integer array, one id per query; got "
                              f"{query_ids.dtype} {query_ids.shape}")
    if len(np.unique(query_ids)) != len(query_ids):
        raise ValidationError("--query-ids holds repeated ids; give each query its own id")
    positives, other = read_qrels(args.qrels, query_ids)
    doc_texts = read_texts(args.texts) if args.texts else None
    query_texts = read_texts(args.query_texts) if args.query_texts else None
    if args.format == "pml" and (doc_texts or query_texts):
        raise ValidationError("format pml writes id arrays; drop --texts / --query-texts")
    snap = SnapshotStore(args.store).open(args.snapshot)
    extra = []
    if args.rescore:
        q_cell, d_cell, ids = Cells(query_texts, "query"), Cells(doc_texts, "document"), snap.index.ids
        guard = RescoreGuard(load_scorer(args.rescore), [q_cell(i) for i in query_ids],
                             lambda row: d_cell(ids[row]), max_score=args.rescore_max,
                             relative=args.rescore_relative, batch_size=args.rescore_batch)
        if args.rescore_relative is not None:
            guard.score_positives([[d_cell(p) for p in positives[i]] for i in range(len(positives))])
        extra.append(guard)
    elif args.rescore_max is not None or args.rescore_relative is not None:
        raise ValidationError("--rescore-max and --rescore-relative need --rescore MODULE:ATTR")
    res = mine_queries(snap.index, queries, config, positives=positives, query_ids=query_ids,
                       params=SearchParams(nprobe=args.nprobe, ef_search=args.ef_search), extra_guards=extra)
    rows = write_mined(res, args.format, args.out, query_texts, doc_texts)
    info = {"snapshot": snap.name, "out": str(args.out), "format": args.format, "rows": rows,
            "qrels_other_queries": other, "stats": res.stats.to_dict()}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"snapshot {snap.name}: wrote {rows} {args.format} rows to {args.out}"
              + (f" ({other} qrels lines name other queries)" if other else ""))
        print(format_stats(res.stats))
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
    if stats.suspects_excluded:
        rows.append(("suspects excluded", f"{stats.suspects_excluded} items never used as negatives"))
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
