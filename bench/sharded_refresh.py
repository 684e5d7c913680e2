"""Peak memory per rank of a torchrun refresh with and without a sharded index (``--shard-index``).

For each mode (``replicated``: rank 0 gathers every embedding, publishes and sends the whole index to every rank,
which mines from its copy; ``sharded``: each rank embeds and indexes its block, rank 0 streams the snapshot to
the store, mining searches every shard) and each refresh (``mined-tuples``: publish + mine hardest negatives with
hardest positives for every anchor; ``class-batches``: publish + class centroids and the class-neighbour table),
two ranks run in a real gloo group (spawned processes, as torchrun starts them) on the same seeded data:
N items of 8 features in classes of ~``--class-size`` items, embedded to ``--dim`` by a fixed random linear map
(a tiny model: the embeddings, not the inputs, dominate memory). Every rank reports its resident memory after
loading the data and its peak over the refresh (``ru_maxrss``; each mode and refresh in fresh processes),
its wall and CPU seconds. The two modes' mined tuples are compared (hardest/hardest is deterministic).

    python bench/sharded_refresh.py --items 200000 --mine            # both refreshes, ~10 min CPU here
    python bench/sharded_refresh.py --items 1000000                   # class-batches only (no kNN mining)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RANKS = 2


def _rss_mib() -> float:
    """This process's resident memory now (/proc/self/statm), MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _data(n: int, class_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded inputs (n, 8) float32 around per-class centres, and labels (n,) int64."""
    rng = np.random.default_rng(seed)
    classes = max(2, n // class_size)
    labels = rng.integers(0, classes, size=n).astype(np.int64)
    centres = rng.normal(size=(classes, 8)).astype(np.float32)
    return centres[labels] + 0.35 * rng.normal(size=(n, 8)).astype(np.float32), labels


def _worker(rank: int, port: int, args: argparse.Namespace, mode: str, refresh: str, out: str) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "WORLD_SIZE": str(RANKS), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import faiss
    import torch

    from hardneg.miner.mining.miner import stored_vectors
    from hardneg.miner.store import SnapshotStore
    from hardneg.trainer.batching import centroid_stats, class_neighbours, composition_stats, confusable_classes
    from hardneg.trainer.config import TrainConfig
    from hardneg.trainer.distributed import process_group
    from hardneg.trainer.refresh import SnapshotPublisher
    from hardneg.trainer.sharded_index import mine_shards, publish_shards
    from hardneg.trainer.sharded_refresh import mine_sharded, publish_sharded

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    x_np, labels = _data(args.items, args.class_size, args.seed)
    torch.manual_seed(args.seed)
    model = torch.nn.Linear(8, args.dim)  # the same weights on every rank and in every mode
    x = torch.from_numpy(x_np)
    cfg = TrainConfig.from_dict({"recipe": "mined-tuples" if refresh == "mined-tuples" else "class-batches",
                                 "store": out + "/store", "seed": args.seed, "eval_batch_size": 4096,
                                 **({"strategy": "hardest", "positive": "hardest"} if refresh == "mined-tuples"
                                    else {})})
    spec = {"class": "Linear", "input_shape": [8]}
    with process_group("cpu") as ctx:
        publisher = SnapshotPublisher(SnapshotStore(cfg.store, keep=1), cfg, spec)
        ctx.total(0)  # every rank has its data: start together
        before = _rss_mib()
        t0, c0 = time.perf_counter(), time.process_time()
        publish = publish_shards if mode == "sharded" else publish_sharded
        published = publish(model, x, labels, publisher, {"epoch": 0}, ctx)
        t1, c1 = time.perf_counter(), time.process_time()
        digest = None
        if refresh == "mined-tuples":
            if mode == "sharded":
                tuples, _ = mine_shards(published.shard, cfg, 1)
            else:
                tuples, _ = mine_sharded(published.index, cfg, 1, ctx)
            digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes()
                                             for a in (tuples.first, tuples.second, tuples.third))).hexdigest()[:16]
        else:
            p = cfg.batch_size // cfg.recipe.per_class
            if mode == "sharded":
                classes, centroids = published.shard.class_centroids()
                table = class_neighbours(classes, centroids, p)
                centroid_stats(classes, centroids, table)
            else:  # what ClassBatches.refresh does on every rank with the shared index
                vectors = stored_vectors(published.index)
                table = confusable_classes(vectors, published.index.labels, p)
                composition_stats(vectors, published.index.labels, table)
            digest = hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest()[:16]
            if rank == 0:
                np.save(Path(out, "table.npy"), table)
        t2, c2 = time.perf_counter(), time.process_time()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record = {"rank": rank, "rss_data_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
                  "publish_wall_s": round(t1 - t0, 2), "publish_cpu_s": round(c1 - c0, 2),
                  "mine_wall_s": round(t2 - t1, 2), "mine_cpu_s": round(c2 - c1, 2), "digest": digest}
        records = ctx.all_gather_json(record)
        if rank == 0:
            Path(out, "result.json").write_text(json.dumps(records))


def run(args: argparse.Namespace, mode: str, refresh: str) -> tuple[list[dict], np.ndarray | None]:
    """Both ranks' records, and the class-neighbour table of a class-batches refresh."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="shard-bench-") as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(_worker, args=(port, args, mode, refresh, out), nprocs=RANKS, join=True)
        table = Path(out, "table.npy")
        return json.loads(Path(out, "result.json").read_text()), np.load(table) if table.exists() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--class-size", type=int, default=200)
    ap.add_argument("--mine", action="store_true", help="also the mined-tuples refresh (exact kNN of every anchor)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="append the results here")
    args = ap.parse_args()
    refreshes = ["class-batches"] + (["mined-tuples"] if args.mine else [])
    rows, tables = [], []
    for refresh in refreshes:
        for mode in ("replicated", "sharded"):
            records, table = run(args, mode, refresh)
            if table is not None:
                tables.append(table)
            for r in records:
                rows.append({"items": args.items, "dim": args.dim, "refresh": refresh, "mode": mode, **r})
                print(json.dumps(rows[-1]), flush=True)
    with open("/proc/loadavg") as f:
        print("load average:", f.read().split()[:3])
    for refresh in refreshes:
        digests = {r["digest"] for r in rows if r["refresh"] == refresh}
        print(f"{refresh}: both modes give the same result: {len(digests) == 1}")
    if len(tables) == 2:  # class batches: each class's row (the class, then its nearest classes)
        same_rows = (tables[0] == tables[1]).all(1)
        same_sets = [set(a[1:]) == set(b[1:]) for a, b in zip(tables[0], tables[1])]
        print(f"class-neighbour table: {same_rows.sum()} of {len(same_rows)} rows equal, {sum(same_sets)} with the "
              f"same neighbours in any order")
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
