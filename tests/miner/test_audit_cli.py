"""``hardneg audit labels|duplicates``, ``hardneg drift``, ``mine --exclude-suspects`` and ``index build --thumbs``
through the command's own entry point (one test in a real process): the output must equal what the library
computes in-process, and bad input must exit 2 with a reason."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hardneg.cli import main
from hardneg.miner.audit import audit_labels, find_duplicates
from hardneg.miner.drift import snapshot_drift
from hardneg.miner.index import VectorIndex
from hardneg.miner.mining import MiningConfig, mine
from hardneg.miner.store import SnapshotStore

REPO = Path(__file__).resolve().parents[2]


def hardneg(*args: str | Path) -> subprocess.CompletedProcess:
    """``hardneg ARGS`` in this process (``main``, as the console script runs it): exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def hardneg_process(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hardneg.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory, clusters) -> tuple[Path, VectorIndex, VectorIndex]:
    """Two snapshots: ``old``, then ``new`` (moved vectors, a few flipped labels and planted copies)."""
    data = clusters(200, 8, 4, seed=41, spread=0.6)
    rng = np.random.default_rng(41)
    x, labels = data.vectors.copy(), data.labels.copy()
    labels[:8] = (labels[:8] + 1) % 4
    x[10:14] = x[20:24]  # exact copies: 10/20 and 11/21 same label, 12/22 and 13/23 conflicting
    labels[10:12] = labels[20:22]
    labels[12:14] = (labels[22:24] + 1) % 4
    root = tmp_path_factory.mktemp("audit") / "store"
    store = SnapshotStore(root)
    old = VectorIndex.build(data.vectors, data.labels, data.ids)
    new = VectorIndex.build(x + 0.2 * rng.normal(size=x.shape).astype(np.float32) * (np.arange(200) >= 30)[:, None],
                            labels, data.ids)
    store.publish(old, name="old")
    store.publish(new, name="new")
    return root, old, new


def test_audit_labels_csv_and_json_equal_the_library(store, tmp_path):
    root, _, new = store
    out = tmp_path / "suspects.csv"
    done = hardneg("audit", "labels", "--store", root, "-k", "5", "--out", out, "--limit", "6", "--json")
    assert done.returncode == 0, done.stderr
    want = audit_labels(new, 5).rows()
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == [w["id"] for w in want]
    assert [float(r["p_given"]) for r in rows] == pytest.approx([w["p_given"] for w in want])
    assert [int(r["suggested"]) for r in rows] == [w["suggested"] for w in want]
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    assert printed == [{"snapshot": "new", **w} for w in want[:6]]


def test_audit_labels_table_names_the_snapshot(store):
    root, old, _ = store
    done = hardneg("audit", "labels", "--store", root, "--snapshot", "old", "--limit", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("snapshot old: 200 items, k=10")
    top = audit_labels(old).rows(3)
    assert [int(line.split()[1]) for line in lines[2:]] == [r["id"] for r in top]


def test_audit_duplicates_json_equals_the_library(store):
    root, _, new = store
    done = hardneg("audit", "duplicates", "--store", root, "--threshold", "1e-6", "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    want = find_duplicates(new, 1e-6)
    assert got["pairs"] == want.pairs == 4
    assert got["same_label"] == [want.group_dict(i) for i in want.same_label]
    assert got["different_label"] == [want.group_dict(i) for i in want.conflicts]
    assert len(got["same_label"]) == 2 and len(got["different_label"]) == 2


def test_drift_json_equals_the_library(store):
    root, old, new = store
    done = hardneg_process("drift", "--store", root, "old", "new", "-k", "4", "--sample", "50", "--seed", "2",
                           "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    want = snapshot_drift(old, new, k=4, sample=50, seed=2).to_dict()
    assert got.pop("from") == "old" and got.pop("to") == "new"
    assert got == json.loads(json.dumps(want))  # JSON turns the per-class keys into strings
    text = hardneg("drift", "--store", root, "old", "new")
    assert text.returncode == 0 and "neighbour overlap at k=10" in text.stdout


def test_mine_exclude_suspects_equals_the_library(store, tmp_path):
    root, _, new = store
    out = tmp_path / "mined.npz"
    done = hardneg("mine", "--store", root, "--strategy", "hardest", "--exclude-suspects", "0.05", "--out", out,
                   "--json")
    assert done.returncode == 0, done.stderr
    want = mine(new, MiningConfig(strategy="hardest", exclude_suspects=0.05))
    with np.load(out) as z:
        np.testing.assert_array_equal(z["negative"], want.negative)
    stats = json.loads(done.stdout)["stats"]
    assert stats["suspects_excluded"] == want.stats.suspects_excluded > 0
    assert stats["guard_dropped"] == want.stats.guard_dropped


@pytest.mark.parametrize("args,match", [
    (("audit", "labels", "-k", "0"), "k must be a positive integer"),
    (("audit", "duplicates", "--threshold", "-1"), "threshold must be"),
    (("drift", "old", "nope"), "snapshot 'nope' does not exist"),
    (("mine", "--strategy", "hardest", "--out", "x.npz", "--exclude-suspects", "1.5"), "exclude_suspects must be"),
])
def test_bad_input_exits_2_with_a_reason(store, args, match):
    root = store[0]
    done = hardneg(args[0], *((args[1],) if args[0] == "audit" else ()), "--store", root,
                   *args[2 if args[0] == "audit" else 1:])
    assert done.returncode == 2, done.stdout + done.stderr
    assert match in done.stderr


def test_index_build_thumbs(tmp_path, clusters):
    data = clusters(30, 4, 3, seed=3)
    thumbs = np.random.default_rng(3).integers(0, 256, size=(30, 8, 8), dtype=np.uint8)
    for name, arr in (("v", data.vectors), ("l", data.labels), ("i", data.ids), ("t", thumbs)):
        np.save(tmp_path / f"{name}.npy", arr)
    done = hardneg("index", "build", "--store", tmp_path / "s", "--vectors", tmp_path / "v.npy", "--labels",
                   tmp_path / "l.npy", "--ids", tmp_path / "i.npy", "--thumbs", tmp_path / "t.npy")
    assert done.returncode == 0, done.stderr
    store = SnapshotStore(tmp_path / "s")
    loaded = store.load_thumbs(snap := store.open())
    for j in (0, 7, 29):
        np.testing.assert_array_equal(loaded[snap.index.rows_of([data.ids[j]])[0]], thumbs[j])
    np.save(tmp_path / "bad.npy", thumbs.astype(np.float32))
    bad = hardneg("index", "build", "--store", tmp_path / "s", "--vectors", tmp_path / "v.npy", "--labels",
                  tmp_path / "l.npy", "--thumbs", tmp_path / "bad.npy")
    assert bad.returncode == 2 and "thumbs must be a uint8" in bad.stderr
