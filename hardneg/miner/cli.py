"""``hardneg index ...`` subcommands: build, list, verify and search snapshots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hardneg.miner.index import SearchParams, VectorIndex
from hardneg.miner.npy import load_npy
from hardneg.miner.store import SnapshotStore


def register(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="build, list, verify and search snapshots of precomputed embeddings")
    isub = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    b = isub.add_parser("build", help="publish a snapshot from precomputed embeddings; prints its name")
    b.add_argument("--vectors", required=True, type=Path, help="(n, d) float .npy file")
    b.add_argument("--labels", required=True, type=Path, help="(n,) integer .npy file")
    b.add_argument("--ids", type=Path, help="(n,) unique integer .npy file (default 0..n-1)")
    _store_arg(b)
    b.add_argument("--metric", choices=("cosine", "l2"), default="cosine")
    b.add_argument("--index", default="flat", help="flat (exact), ivf, hnsw or a FAISS factory string")
    b.add_argument("--name", help="snapshot name (default: next sequence number)")
    b.add_argument("--keep", type=int, default=5, help="snapshots to retain")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--thumbs", type=Path, help="(n, H, W) or (n, H, W, C) uint8 .npy of thumbnails, in the order "
                                               "of --ids (default: ids 0..n-1), at most 128 pixels a side")
    b.set_defaults(func=cmd_build)

    ls = isub.add_parser("list", help="list snapshots, newest first; * marks the one LATEST names")
    _store_arg(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=cmd_list)

    v = isub.add_parser("verify", help="check a snapshot's checksums (default: LATEST)")
    _store_arg(v)
    v.add_argument("name", nargs="?")
    v.set_defaults(func=cmd_verify)

    s = isub.add_parser("search", help="k nearest neighbours of query vectors, as JSON lines")
    _store_arg(s)
    s.add_argument("--snapshot", help="snapshot name (default: LATEST)")
    s.add_argument("--vectors", required=True, type=Path, help="(n, d) float .npy file of queries")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--labels", type=Path, help="(n,) .npy labels of the queries (for --different-label)")
    s.add_argument("--different-label", action="store_true", help="only neighbours whose label differs")
    s.add_argument("--label-in", type=_int_csv, help="comma-separated labels to keep")
    s.add_argument("--label-not-in", type=_int_csv, help="comma-separated labels to drop")
    s.add_argument("--exclude-ids", type=_int_csv, help="comma-separated ids to drop")
    s.add_argument("--nprobe", type=int, help="IVF lists to visit")
    s.add_argument("--ef-search", type=int, help="HNSW search breadth")
    s.set_defaults(func=cmd_search)


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path,
                   help="snapshot store folder; with HARDNEG_STORE_KEY set, snapshots are signed when built and "
                        "refused when read unless signed with that key")


def _int_csv(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def cmd_build(args: argparse.Namespace) -> int:
    vectors = load_npy(args.vectors, "--vectors")
    labels = load_npy(args.labels, "--labels")
    ids = load_npy(args.ids, "--ids") if args.ids else None
    thumbs = load_npy(args.thumbs, "--thumbs") if args.thumbs else None
    index = VectorIndex.build(vectors, labels, ids, metric=args.metric, index=args.index, seed=args.seed)
    name = SnapshotStore(args.store, keep=args.keep).publish(
        index, meta={"source": "hardneg index build", "vectors": str(args.vectors)}, name=args.name,
        thumbs=thumbs, thumb_ids=ids)
    print(name)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for info in SnapshotStore(args.store).list():
        if args.json:
            print(json.dumps(info.__dict__))
        elif info.error:
            print(f"{'*' if info.latest else ' '} {info.name}  INVALID: {info.error}")
        else:
            print(f"{'*' if info.latest else ' '} {info.name}  {info.created_at}  count={info.count} "
                  f"dim={info.dim} metric={info.metric} index={info.index}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    manifest = SnapshotStore(args.store).verify(args.name)
    print(f"{manifest['name']}: ok ({len(manifest['files'])} files verified)")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    snap = SnapshotStore(args.store).open(args.snapshot)
    queries = load_npy(args.vectors, "--vectors")
    qlabels = load_npy(args.labels, "--labels") if args.labels else None
    result = snap.index.search(
        queries, args.k, query_labels=qlabels, different_label=args.different_label,
        label_in=args.label_in, label_not_in=args.label_not_in, exclude_ids=args.exclude_ids,
        params=SearchParams(nprobe=args.nprobe, ef_search=args.ef_search))
    out = sys.stdout
    for i, hits in enumerate(result):
        out.write(json.dumps({"query": i, "snapshot": snap.name, "neighbors": [
            {"id": int(a), "label": int(b), "distance": float(c)}
            for a, b, c in zip(hits.ids, hits.labels, hits.distances)]}) + "\n")
    return 0
