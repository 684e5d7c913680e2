"""``hardneg index build|list|verify|search`` end to end, as a user runs them (a real process per command)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def hardneg(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hardneg.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def _save(folder: Path, **arrays: np.ndarray) -> dict[str, Path]:
    paths = {}
    for key, value in arrays.items():
        paths[key] = folder / f"{key}.npy"
        np.save(paths[key], value)
    return paths


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, clusters):
    """A store with an l2 snapshot (000001) then a cosine one (000002, LATEST), both built through the CLI."""
    folder = tmp_path_factory.mktemp("cli")
    data = clusters(200, 8, 5, seed=31, label_offset=10)
    queries, q_labels = data.near(12, seed=32)
    files = _save(folder, vectors=data.vectors, labels=data.labels, ids=data.ids, queries=queries, q_labels=q_labels)
    store = folder / "store"
    outputs = []
    for metric in ("l2", "cosine"):
        done = hardneg("index", "build", "--vectors", files["vectors"], "--labels", files["labels"],
                       "--ids", files["ids"], "--store", store, "--metric", metric)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    return data, queries, q_labels, files, store, outputs


def test_build_prints_the_name(cli_store):
    outputs = cli_store[-1]
    assert outputs == ["000001\n", "000002\n"]


def test_list_marks_latest(cli_store):
    store = cli_store[4]
    done = hardneg("index", "list", "--store", store)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line[:8] for line in lines] == ["* 000002", "  000001"]
    assert "count=200 dim=8 metric=cosine index=Flat" in lines[0] and "metric=l2" in lines[1]
    as_json = [json.loads(line) for line in hardneg("index", "list", "--store", store, "--json").stdout.splitlines()]
    assert [(r["name"], r["latest"], r["metric"], r["error"]) for r in as_json] == [
        ("000002", True, "cosine", None), ("000001", False, "l2", None)]


def _neighbours(stdout: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["query"] for r in rows] == list(range(len(rows)))
    return [(np.array([n["id"] for n in r["neighbors"]], dtype=np.int64),
             np.array([n["label"] for n in r["neighbors"]], dtype=np.int64),
             np.array([n["distance"] for n in r["neighbors"]])) for r in rows]


def test_search_equals_brute_force(cli_store, knn_reference):
    data, queries, _, files, store, _ = cli_store
    reference_distances, assert_knn_matches = knn_reference
    done = hardneg("index", "search", "--store", store, "--vectors", files["queries"], "-k", "7")
    assert done.returncode == 0, done.stderr
    assert {json.loads(line)["snapshot"] for line in done.stdout.splitlines()} == {"000002"}
    d2 = reference_distances(data.vectors, queries, "cosine")
    assert_knn_matches(_neighbours(done.stdout), d2, data.ids, data.labels, 7)


def test_filtered_search_on_a_pinned_snapshot_equals_brute_force(cli_store, knn_reference):
    data, queries, q_labels, files, store, _ = cli_store
    reference_distances, assert_knn_matches = knn_reference
    excluded = data.ids[:15]
    done = hardneg("index", "search", "--store", store, "--snapshot", "000001", "--vectors", files["queries"],
                   "-k", "60", "--labels", files["q_labels"], "--different-label", "--label-not-in", "12",
                   "--exclude-ids", ",".join(map(str, excluded)))
    assert done.returncode == 0, done.stderr
    admissible = ((data.labels[None, :] != q_labels[:, None]) & (data.labels != 12)[None, :]
                  & ~np.isin(data.ids, excluded)[None, :])
    d2 = reference_distances(data.vectors, queries, "l2", admissible)
    assert_knn_matches(_neighbours(done.stdout), d2, data.ids, data.labels, 60)


def test_label_in_with_fewer_items_than_k(cli_store, knn_reference):
    data, queries, _, files, store, _ = cli_store
    reference_distances, assert_knn_matches = knn_reference
    done = hardneg("index", "search", "--store", store, "--vectors", files["queries"], "-k", "500",
                   "--label-in", "11,13")
    assert done.returncode == 0, done.stderr
    d2 = reference_distances(data.vectors, queries, "cosine", np.isin(data.labels, [11, 13])[None, :])
    hits = _neighbours(done.stdout)
    assert {len(h[0]) for h in hits} == {int(np.isin(data.labels, [11, 13]).sum())}
    assert_knn_matches(hits, d2, data.ids, data.labels, 500)


def test_verify_names_the_corrupt_file(cli_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(cli_store[4], store)
    done = hardneg("index", "verify", "--store", store)
    assert (done.returncode, done.stdout) == (0, "000002: ok (3 files verified)\n")
    labels = store / "snapshots" / "000001" / "labels.npy"
    blob = bytearray(labels.read_bytes())
    blob[-3] ^= 0xFF
    labels.write_bytes(bytes(blob))
    done = hardneg("index", "verify", "--store", store, "000001")
    assert done.returncode == 2
    assert "hardneg index: error: snapshot '000001': labels.npy is corrupt (sha256 mismatch)" in done.stderr
    (store / "snapshots" / "000002" / "index.faiss").unlink()
    done = hardneg("index", "verify", "--store", store)
    assert done.returncode == 2 and "snapshot '000002': index.faiss is missing" in done.stderr
    done = hardneg("index", "search", "--store", store, "--vectors", cli_store[3]["queries"])
    assert done.returncode == 2 and "index.faiss is missing" in done.stderr and done.stdout == ""


@pytest.fixture(scope="module")
def bad_cases(cli_store, tmp_path_factory) -> tuple[list[tuple[tuple, str]], Path]:
    """(arguments, what stderr must say) for bad input to every index subcommand, and the store the refused
    builds name."""
    data, queries, q_labels, files, store, _ = cli_store
    folder = tmp_path_factory.mktemp("bad")
    bad = _save(folder, narrow=queries[:, :3], nan=np.where(queries > 1.5, np.nan, queries),
                short_labels=data.labels[:-1], float_labels=data.labels.astype(np.float64),
                dup_ids=np.where(data.ids == data.ids[1], data.ids[0], data.ids))
    pickled = folder / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    build = ("index", "build", "--store", folder / "new-store", "--vectors", files["vectors"])
    search = ("index", "search", "--store", store, "--vectors")
    cases = [
        (search + (bad["narrow"],), "queries have dimension 3 but the index has dimension 8"),
        (search + (bad["nan"],), "queries contain NaN or inf"),
        (search + (files["queries"], "-k", "0"), "k must be a positive integer, got 0"),
        (search + (files["queries"], "--different-label"), "different_label needs the labels of the queries"),
        (search + (files["queries"], "--label-in", "a,b"), "expected comma-separated integers, got 'a,b'"),
        (search + (files["queries"], "--snapshot", "nope"), "snapshot 'nope' does not exist"),
        (search + (files["queries"], "--snapshot", "../store"), "invalid snapshot name '../store'"),
        (search + (files["queries"], "--nprobe", "0"), "nprobe must be a positive integer, got 0"),
        (search + (folder / "missing.npy",), "--vectors file"),
        (build + ("--labels", bad["short_labels"]), "labels has 199 entries but there are 200 vectors"),
        (build + ("--labels", bad["float_labels"]), "labels must be integers, got dtype float64"),
        (build + ("--labels", files["labels"], "--ids", bad["dup_ids"]), "ids must be unique"),
        (build + ("--labels", pickled), "is not a plain .npy array"),
        (build + ("--labels", files["labels"], "--name", "a/b"), "invalid snapshot name 'a/b'"),
        (build + ("--labels", files["labels"], "--metric", "dot"), "invalid choice: 'dot'"),
        (("index", "verify", "--store", folder / "empty"), "has no snapshot yet"),
    ]
    return cases, folder / "new-store"


def test_bad_input_exits_2_with_a_clear_message(bad_cases):
    """A few cases as real processes (exit status, stderr, no traceback)..."""
    for args, message in bad_cases[0][::5]:
        done = hardneg(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr and done.stdout == ""


def test_every_bad_input_exits_2_with_a_clear_message(bad_cases, capsys):
    """...and all of them through the same entry point in-process (a process each would take seconds)."""
    from hardneg.cli import main

    cases, new_store = bad_cases
    for args, message in cases:
        try:
            status = main([str(a) for a in args])
        except SystemExit as e:  # argparse refuses malformed arguments itself, with status 2
            status = e.code
        out, err = capsys.readouterr()
        assert status == 2, (args, out, err)
        assert message in err, (args, err)
        assert out == ""
    assert not (new_store / "LATEST").exists()  # no refused build published anything
