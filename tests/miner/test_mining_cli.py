"""``hardneg mine`` end to end, as a user runs it (a real process per command).

The npz arrays and the printed statistics must equal what the library computes in-process with the same
configuration and seed, and bad input must exit non-zero with a message that says what is accepted.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hardneg.miner.index import VectorIndex
from hardneg.miner.mining import MiningConfig, mine
from hardneg.miner.store import SnapshotStore

REPO = Path(__file__).resolve().parents[2]
ARRAYS = ("anchor", "positive", "negative", "pair_i", "pair_j", "pair_y")


def hardneg(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hardneg.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory, clusters):
    """A store whose LATEST snapshot holds 150 cosine items in 5 classes, plus one singleton class."""
    data = clusters(150, 8, 5, seed=51)
    labels = data.labels.copy()
    labels[0] = 99  # a class of one
    index = VectorIndex.build(data.vectors, labels, data.ids)
    root = tmp_path_factory.mktemp("mine") / "store"
    SnapshotStore(root).publish(index)
    return root, index


def test_mine_writes_the_npz_and_prints_the_stats(store, tmp_path):
    root, index = store
    out = tmp_path / "mined.npz"
    done = hardneg("mine", "--store", root, "--strategy", "semihard", "--per-anchor", "2", "--margin", "0.3",
                   "--positive", "hardest", "--positive-aware", "0.95", "--seed", "7", "--out", out)
    assert done.returncode == 0, done.stderr
    want = mine(index, MiningConfig(strategy="semihard", per_anchor=2, margin=0.3, positive="hardest",
                                    positive_aware=0.95, seed=7))
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(ARRAYS)
        for name in ARRAYS:
            np.testing.assert_array_equal(z[name], getattr(want, name), err_msg=name)
    s = want.stats
    # "key  value" lines, the keys padded to one width
    lines = dict(re.match(r"(\S.*?)\s{2,}(.*)$", line).groups() for line in done.stdout.splitlines()[1:])
    assert done.stdout.startswith(f"snapshot 000001: wrote {out}\n")
    assert lines["triplets"] == str(s.triplets)
    assert lines["anchors"].startswith(f"{s.anchors} ({s.anchors_mined} mined, 1 singleton")
    assert lines["non-zero loss share"] == f"{s.nonzero_loss_share:.4f}"
    assert lines["guards dropped"] == f"positive_aware {s.guard_dropped['positive_aware']}"
    assert lines["semihard fallback"] == f"{s.semihard_fallback_used} used, {s.semihard_skipped} skipped"
    assert f"mean={s.d2_negative.mean:.4f}" in lines["d²(a,n)"]


def test_mine_json_stats_equal_the_library(store, tmp_path):
    root, index = store
    out = tmp_path / "w.npz"
    done = hardneg("mine", "--store", root, "--snapshot", "000001", "--strategy", "window", "--window-skip", "2",
                   "--window-width", "5", "--per-anchor", "3", "--seed", "3", "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    want = mine(index, MiningConfig(strategy="window", window_skip=2, window_width=5, per_anchor=3, seed=3))
    assert printed["snapshot"] == "000001"
    assert printed["stats"] == json.loads(json.dumps(want.stats.to_dict()))
    assert printed["stats"]["anchors_singleton"] == 1 and printed["stats"]["triplets"] == 3 * 149
    with np.load(out, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["negative"], want.negative)


@pytest.mark.parametrize("args,message", [
    (["--strategy", "nearest"], "invalid choice: 'nearest'"),
    (["--strategy", "hardest", "--per-anchor", "0"], "per_anchor must be an integer >= 1, got 0"),
    (["--strategy", "semihard", "--margin", "-0.5"], "margin must be a finite number >= 0, got -0.5"),
    (["--strategy", "window", "--window-width", "2", "--per-anchor", "3"], "window_width (2) must be at least"),
])
def test_mine_refuses_bad_options(store, tmp_path, args, message):
    out = tmp_path / "never.npz"
    done = hardneg("mine", "--store", store[0], "--out", out, *args)
    assert done.returncode != 0
    assert message in done.stderr
    assert not out.exists()


def test_mine_refuses_a_missing_store(tmp_path):
    done = hardneg("mine", "--store", tmp_path / "nowhere", "--strategy", "hardest", "--out", tmp_path / "x.npz")
    assert done.returncode != 0
    assert "has no snapshot yet" in done.stderr and "nowhere" in done.stderr
