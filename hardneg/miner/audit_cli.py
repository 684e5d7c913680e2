"""``hardneg audit labels|duplicates`` and ``hardneg drift``: look at a snapshot's data, and at how two differ."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from hardneg.miner.audit import DEFAULT_K, audit_labels, find_duplicates
from hardneg.miner.drift import DEFAULT_SAMPLE, snapshot_drift
from hardneg.miner.store import SnapshotStore


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``audit`` and ``drift`` subcommands to the ``hardneg`` parser."""
    audit = sub.add_parser("audit", help="find suspected label errors and near-duplicates in a snapshot")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="WHAT")

    lab = asub.add_parser("labels", help="rank items by how much their nearest neighbours disagree with their label",
                          description="Score every item by how well its embedding supports its label: the mean of "
                                      "the share of its k nearest other items that carry it and of a class-mean "
                                      "confidence; lowest first, with the neighbours' most frequent label as the "
                                      "suggestion. Exact on flat snapshots.")
    _snapshot_args(lab)
    lab.add_argument("-k", type=int, default=DEFAULT_K, help=f"voting neighbours per item (default {DEFAULT_K})")
    lab.add_argument("--out", type=Path, help="write every item's row to this CSV file, most suspicious first")
    lab.add_argument("--limit", type=int, default=20, help="suspects to print (default 20)")
    lab.add_argument("--json", action="store_true", help="print the printed suspects as JSON lines")
    lab.set_defaults(func=cmd_audit_labels)

    dup = asub.add_parser("duplicates", help="group items within a d² threshold: same-label copies and conflicts")
    _snapshot_args(dup)
    dup.add_argument("--threshold", type=float, required=True, metavar="D2",
                     help="squared distance at or below which two items are near-duplicates (e.g. 0.001)")
    dup.add_argument("--max-pairs", type=int, default=1_000_000, help="refuse thresholds linking more pairs")
    dup.add_argument("--json", action="store_true", help="print one JSON object")
    dup.set_defaults(func=cmd_audit_duplicates)

    d = sub.add_parser("drift", help="how much the embedding moved between two snapshots (neighbour overlap, "
                                     "centroid shift, hardest-negative change)")
    d.add_argument("--store", required=True, type=Path, help="snapshot store folder")
    d.add_argument("from_name", metavar="A", help="the older snapshot")
    d.add_argument("to_name", metavar="B", help="the newer snapshot")
    d.add_argument("-k", type=int, default=10, help="neighbours compared per anchor (default 10)")
    d.add_argument("--sample", type=int, default=DEFAULT_SAMPLE, help=f"anchors (default {DEFAULT_SAMPLE})")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_drift)


def _snapshot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path, help="snapshot store folder")
    p.add_argument("--snapshot", help="snapshot name (default: LATEST)")


def cmd_audit_labels(args: argparse.Namespace) -> int:
    snap = SnapshotStore(args.store).open(args.snapshot)
    audit = audit_labels(snap.index, args.k)
    if args.out:
        with open(args.out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["rank", "id", "label", "quality", "p_given", "p_centroid", "suggested",
                                                   "p_suggested"])
            writer.writeheader()
            writer.writerows(audit.rows())
    rows = audit.rows(max(args.limit, 0))
    if args.json:
        for row in rows:
            print(json.dumps({"snapshot": snap.name, **row}))
        return 0
    disagree = int((audit.p_given < 1).sum())
    print(f"snapshot {snap.name}: {len(audit)} items, k={audit.k}; {disagree} have a neighbour of another label"
          + (f"; wrote {args.out}" if args.out else ""))
    print(f"{'rank':>6} {'id':>10} {'label':>6} {'quality':>8} {'p_given':>8} {'p_centr':>8} {'suggested':>9}")
    for r in rows:
        print(f"{r['rank']:>6} {r['id']:>10} {r['label']:>6} {r['quality']:>8.3f} {r['p_given']:>8.2f} "
              f"{r['p_centroid']:>8.3f} {r['suggested']:>9}")
    return 0


def cmd_audit_duplicates(args: argparse.Namespace) -> int:
    snap = SnapshotStore(args.store).open(args.snapshot)
    dup = find_duplicates(snap.index, args.threshold, args.max_pairs)
    same = [dup.group_dict(i) for i in dup.same_label]
    conflicts = [dup.group_dict(i) for i in dup.conflicts]
    if args.json:
        print(json.dumps({"snapshot": snap.name, "threshold": dup.threshold, "pairs": dup.pairs,
                          "same_label": same, "different_label": conflicts}))
        return 0
    print(f"snapshot {snap.name}: {dup.pairs} pairs within d² {dup.threshold:g} in {len(dup.groups)} groups: "
          f"{len(same)} same-label (redundant), {len(conflicts)} different-label (conflicts)")
    for title, groups in (("different-label", conflicts), ("same-label", same)):
        for g in groups:
            print(f"  {title}: ids {g['ids']} labels {g['labels']}")
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    store = SnapshotStore(args.store)
    a, b = store.open(args.from_name), store.open(args.to_name)
    drift = snapshot_drift(a.index, b.index, k=args.k, sample=args.sample, seed=args.seed)
    if args.json:
        print(json.dumps({"from": a.name, "to": b.name, **drift.to_dict()}))
        return 0
    changed = "n/a" if drift.hardest_negative_changed is None else f"{drift.hardest_negative_changed:.3f}"
    print(f"{a.name} -> {b.name}: {drift.common} common items ({drift.only_from} only in {a.name}, "
          f"{drift.only_to} only in {b.name}), {drift.anchors} anchors")
    print(f"neighbour overlap at k={drift.k}: {drift.overlap_mean:.3f}")
    print(f"centroid shift (d², mean over classes): {drift.centroid_shift_mean:.4f}")
    print(f"hardest negative changed: {changed}")
    print(f"{'class':>8} {'overlap':>8} {'shift':>8}")
    for c, o in drift.overlap_per_class.items():
        shift = drift.centroid_shift.get(c)
        print(f"{c:>8} {o:>8.3f} {'-' if shift is None else f'{shift:.4f}':>8}")
    return 0
