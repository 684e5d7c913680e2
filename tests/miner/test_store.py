"""The snapshot store: manifest contract, round trips, checksums, retention, names."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from hardneg.miner.distances import get_distance
from hardneg.miner.errors import NotFoundError, SnapshotError, ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore

PAYLOAD = ("index.faiss", "ids.npy", "labels.npy", "model.pt2")
ALL_FILES = ("manifest.json", *PAYLOAD)


@pytest.fixture(scope="module")
def data(clusters):
    return clusters(300, 12, 6, seed=11, label_offset=-2)


@pytest.fixture(scope="module")
def flat(data) -> VectorIndex:
    return VectorIndex.build(data.vectors, data.labels, data.ids)


@pytest.fixture
def model_file(tmp_path) -> Path:
    """Stand-in bytes for model.pt2: the store treats the model as an opaque file."""
    path = tmp_path / "model-src.pt2"
    path.write_bytes(np.random.default_rng(12).bytes(5000))
    return path


@pytest.fixture
def published(tmp_path, flat, model_file) -> tuple[SnapshotStore, str]:
    store = SnapshotStore(tmp_path / "store")
    name = store.publish(flat, meta={"epoch": 3, "loss": 0.25}, model={"class": "EmbeddingNet", "dim": 12},
                         extra_files={"model.pt2": model_file})
    return store, name


# ------------------------------------------------------------------------------------------ manifest and files
def test_manifest_has_every_contract_field(published, flat, model_file):
    store, name = published
    path = store.path_of(name)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["name"] == name == "000001"
    created = dt.datetime.fromisoformat(manifest["created_at"])
    assert created.tzinfo is not None and abs(dt.datetime.now(dt.timezone.utc) - created) < dt.timedelta(minutes=5)
    assert (manifest["dim"], manifest["metric"], manifest["count"]) == (12, "cosine", 300)
    assert manifest["num_classes"] == 6
    assert manifest["index"] == {"kind": "flat", "factory": "Flat", "nprobe": None, "ef_search": None,
                                 "ef_construction": None}
    assert manifest["model"] == {"class": "EmbeddingNet", "dim": 12}
    assert manifest["meta"] == {"epoch": 3, "loss": 0.25}
    assert sorted(manifest["files"]) == sorted(PAYLOAD)
    for fname, entry in manifest["files"].items():
        blob = (path / fname).read_bytes()
        assert entry == {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
    assert (path / "model.pt2").read_bytes() == model_file.read_bytes()
    assert sorted(p.name for p in path.iterdir()) == sorted(ALL_FILES)
    assert store.verify(name) == manifest


def test_ids_and_labels_round_trip(published, flat, data):
    store, name = published
    path = store.path_of(name)
    ids = np.load(path / "ids.npy", allow_pickle=False)
    labels = np.load(path / "labels.npy", allow_pickle=False)
    assert ids.dtype == np.int64 and labels.dtype == np.int64
    np.testing.assert_array_equal(ids, flat.ids)
    np.testing.assert_array_equal(labels, flat.labels)
    snap = store.open()
    assert snap.name == name and snap.path == path and snap.model_path == path / "model.pt2"
    np.testing.assert_array_equal(snap.index.ids, flat.ids)
    np.testing.assert_array_equal(snap.index.labels, flat.labels)
    # Ids map to the right vectors: each stored vector finds its own id first, at d² ~ 0.
    np.testing.assert_allclose(snap.index.vectors_of(data.ids), get_distance("cosine").prepare(data.vectors),
                               atol=1e-6)
    hits = snap.index.search(data.vectors, 1)
    np.testing.assert_array_equal(hits.ids, data.ids)
    np.testing.assert_array_equal(hits.labels, data.labels)


@pytest.mark.parametrize(("metric", "kind"), [("l2", "ivf"), ("cosine", "hnsw")])
def test_approximate_indexes_round_trip(tmp_path, clusters, metric, kind):
    data = clusters(2000, 16, 10, seed=13)
    built = VectorIndex.build(data.vectors, data.labels, data.ids, metric=metric, index=kind)
    store = SnapshotStore(tmp_path)
    snap = store.open(store.publish(built))
    assert snap.index.spec == built.spec and snap.index.metric == metric and snap.model_path is None
    queries = data.vectors[:50]
    np.testing.assert_array_equal(snap.index.search(queries, 5).ids, built.search(queries, 5).ids)
    np.testing.assert_array_equal(snap.index.search(queries, 1).ids, data.ids[:50])


# ---------------------------------------------------------------------------------------------- corruption
def _flip(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("fname", ALL_FILES)
@pytest.mark.parametrize("where", ["first", "middle", "last", "random"])
def test_one_flipped_byte_is_refused_naming_the_file(published, fname, where):
    store, name = published
    path = store.path_of(name) / fname
    size = path.stat().st_size
    offset = {"first": 0, "middle": size // 2, "last": size - 1,
              "random": int(np.random.default_rng(size).integers(size))}[where]
    _flip(path, offset)
    for check in (store.verify, store.open):
        with pytest.raises(SnapshotError, match=rf"snapshot '{name}': .*{fname}.* corrupt|{fname} is corrupt"):
            check(name)
    with pytest.raises(SnapshotError, match=fname):
        store.open()  # LATEST names the corrupt one: refused as well, never half-loaded


@pytest.mark.parametrize("fname", ALL_FILES)
def test_missing_file_is_refused_naming_it(published, fname):
    store, name = published
    (store.path_of(name) / fname).unlink()
    with pytest.raises(SnapshotError, match=rf"{fname} is missing"):
        store.verify(name)
    with pytest.raises(SnapshotError, match=rf"{fname} is missing"):
        store.open()


@pytest.mark.parametrize("fname", ALL_FILES)
def test_truncated_file_is_refused_naming_it(published, fname):
    store, name = published
    path = store.path_of(name) / fname
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 3])
    with pytest.raises(SnapshotError, match=rf"{fname} is corrupt"):
        store.verify(name)
    with pytest.raises(SnapshotError, match=rf"{fname} is corrupt"):
        store.open(name)


def test_a_corrupt_latest_leaves_older_snapshots_readable(published, flat):
    store, first = published
    second = store.publish(flat)
    _flip(store.path_of(second) / "index.faiss", 100)
    with pytest.raises(SnapshotError, match="index.faiss is corrupt"):
        store.open()
    assert store.open(first).name == first
    infos = store.list()
    assert [i.name for i in infos] == [second, first] and all(i.error is None for i in infos)  # list reads manifests only


def test_manifest_that_names_another_snapshot_is_refused(published):
    store, name = published
    os.rename(store.path_of(name), store.snapshots_dir / "renamed")
    with pytest.raises(SnapshotError, match=r"manifest.json names a different snapshot \('000001'\)"):
        store.open("renamed")
    assert [(i.name, i.error is not None) for i in store.list()] == [("renamed", True)]


def test_unsupported_format_version_is_refused(published):
    store, name = published
    mpath = store.path_of(name) / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["format_version"] = 2
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    # A well-formed manifest from a future hardneg: its own digest is right, its version is not readable here.
    manifest["manifest_sha256"] = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(SnapshotError, match=r"format version 2 is not supported \(this hardneg reads version 1\)"):
        store.open()


# --------------------------------------------------------------------------------- listing and retention
def test_list_is_newest_first_and_marks_latest(tmp_path, flat):
    store = SnapshotStore(tmp_path, keep=10)
    assert store.list() == [] and store.latest_name() is None
    names = [store.publish(flat, meta={"i": i}) for i in range(3)]
    assert names == ["000001", "000002", "000003"]
    infos = store.list()
    assert [i.name for i in infos] == names[::-1]
    assert [i.latest for i in infos] == [True, False, False]
    assert all((i.count, i.dim, i.metric, i.index, i.error) == (300, 12, "cosine", "Flat", None) for i in infos)
    assert infos[0].created_at > infos[1].created_at > infos[2].created_at
    (tmp_path / "LATEST").write_text("000002\n")
    assert [i.latest for i in store.list()] == [False, True, False]
    assert store.open().name == "000002"


def test_retention_keeps_the_newest(tmp_path, flat):
    store = SnapshotStore(tmp_path, keep=2)
    names = [store.publish(flat) for _ in range(4)]
    assert store.names() == names[2:]
    assert store.latest_name() == names[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "snapshots"]  # no temp folders left over


def test_retention_never_deletes_the_one_latest_names(tmp_path, flat):
    store = SnapshotStore(tmp_path, keep=3)
    names = [store.publish(flat) for _ in range(3)]
    (tmp_path / "LATEST").write_text(names[0] + "\n")  # an operator rolled back by hand
    assert store.retain(keep=1) == [names[1]]
    assert store.names() == [names[0], names[2]]
    assert store.open().name == names[0]
    store.verify(names[2])
    newest = store.publish(flat)  # publishing moves LATEST on; the rolled-back one is then ordinary
    assert store.latest_name() == newest == "000004"
    assert store.retain(keep=1) == [names[0], names[2]] and store.names() == [newest]


def test_retention_orders_by_creation_not_by_name(tmp_path, flat):
    """Named snapshots: 'newest' is the last published, whatever its name sorts like."""
    store = SnapshotStore(tmp_path, keep=2)
    for name in ("zeta", "alpha", "mid"):
        store.publish(flat, name=name)
    assert store.names() == ["alpha", "mid"]
    assert [i.name for i in store.list()] == ["mid", "alpha"]


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValidationError, match="keep must be at least 1, got 0"):
        SnapshotStore(tmp_path, keep=0)
    with pytest.raises(ValidationError, match="keep must be at least 1, got -1"):
        SnapshotStore(tmp_path).retain(keep=-1)


# ------------------------------------------------------------------------------------------------- names
BAD_NAMES = ["a/b", "../x", "..", "a..b", "/abs", ".hidden", "", "x" * 129, "a b", "a\\b", "a/../b"]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_snapshot_names_cannot_climb_out_of_the_store(published, flat, bad):
    store, _ = published
    before = sorted(p.name for p in store.root.rglob("*"))
    message = r"invalid snapshot name .*: use 1-128 letters, digits, '\.', '_' or '-'"
    with pytest.raises(ValidationError, match=message):
        store.publish(flat, name=bad)
    with pytest.raises(ValidationError, match=message):
        store.path_of(bad)
    if bad:  # an empty name means "the latest" to open and verify
        for call in (store.open, store.verify, store.read_manifest):
            with pytest.raises(ValidationError, match=message):
                call(bad)
    assert sorted(p.name for p in store.root.rglob("*")) == before  # nothing written anywhere


def test_unknown_snapshot_is_not_found(published):
    store, _ = published
    for call in (store.open, store.verify):
        with pytest.raises(NotFoundError, match=r"snapshot 'nope' does not exist in .*; available: \['000001'\]"):
            call("nope")


def test_empty_store_has_no_latest(tmp_path):
    with pytest.raises(NotFoundError, match=r"has no snapshot yet \(no LATEST file\)"):
        SnapshotStore(tmp_path).open()


def test_latest_with_an_invalid_name_is_refused(published):
    store, _ = published
    (store.root / "LATEST").write_text("../../etc\n")
    with pytest.raises(SnapshotError, match=r"LATEST holds an invalid name"):
        store.open()


def test_publishing_an_existing_name_is_refused(published, flat):
    store, name = published
    with pytest.raises(SnapshotError, match=rf"cannot publish snapshot '{name}': it already exists"):
        store.publish(flat, name=name)
    assert store.latest_name() == name and not list(store.root.glob(".tmp-*"))


@pytest.mark.parametrize("fname", ["ids.npy", "manifest.json", "../escape", "sub/file", ".hidden"])
def test_extra_files_cannot_replace_payload_or_escape(tmp_path, flat, model_file, fname):
    with pytest.raises(ValidationError, match=rf"cannot publish an extra file named '{fname}'"):
        SnapshotStore(tmp_path).publish(flat, extra_files={fname: model_file})


def test_failed_publish_leaves_nothing_behind(published, flat, tmp_path):
    store, name = published
    with pytest.raises(FileNotFoundError):
        store.publish(flat, extra_files={"model.pt2": tmp_path / "does-not-exist"})
    assert store.latest_name() == name and store.names() == [name]
    assert not list(store.root.glob(".tmp-*"))


def test_empty_name_is_refused_not_taken_as_latest(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    store.publish(VectorIndex.build(np.eye(3, dtype=np.float32), np.array([0, 0, 1])))
    for call in (store.open, store.verify):
        with pytest.raises(ValidationError, match="invalid snapshot name"):
            call("")


def test_published_snapshot_folder_is_readable_by_other_users(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    name = store.publish(VectorIndex.build(np.eye(3, dtype=np.float32), np.array([0, 0, 1])))
    assert (store.path_of(name).stat().st_mode & 0o777) == 0o755
