"""Optional ``thumbs.npy`` in snapshots: stored in row order, checksummed, size-capped, never required."""

from __future__ import annotations

import numpy as np
import pytest

from hardneg.miner.errors import NotFoundError, SnapshotError, ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import THUMB_MAX_SIDE, THUMBS_FILE, SnapshotStore, to_thumbs


@pytest.fixture()
def index(clusters) -> VectorIndex:
    data = clusters(40, 4, 3, seed=2)  # sparse shuffled ids: rows are not in id order
    return VectorIndex.build(data.vectors, data.labels, data.ids)


def images(n: int, seed: int, shape=(8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def test_thumbnails_follow_their_ids(tmp_path, index):
    thumb_ids = np.random.default_rng(0).permutation(index.ids)
    thumbs = images(len(thumb_ids), 1, (6, 5, 3))
    store = SnapshotStore(tmp_path)
    name = store.publish(index, thumbs=thumbs, thumb_ids=thumb_ids)
    snap = store.open(name)
    assert snap.manifest["thumbs"] == {"shape": [40, 6, 5, 3], "dtype": "uint8"}
    assert THUMBS_FILE in snap.manifest["files"]
    loaded = store.load_thumbs(snap)
    for i, id_ in enumerate(thumb_ids.tolist()):
        np.testing.assert_array_equal(loaded[snap.index.rows_of([id_])[0]], thumbs[i])


def test_default_order_is_ascending_ids(tmp_path, index):
    thumbs = images(index.count, 2)
    store = SnapshotStore(tmp_path)
    snap = store.open(store.publish(index, thumbs=thumbs))
    first = int(np.sort(index.ids)[0])
    np.testing.assert_array_equal(store.load_thumbs(snap)[snap.index.rows_of([first])[0]], thumbs[0])


def test_a_snapshot_without_thumbnails_has_none(tmp_path, index):
    store = SnapshotStore(tmp_path)
    snap = store.open(store.publish(index))
    assert store.load_thumbs(snap) is None and snap.manifest["thumbs"] is None


def test_a_thumbnail_file_replaced_after_opening_is_refused(tmp_path, index):
    """Thumbnails are parsed from bytes checked against the manifest, not from whatever the path holds later."""
    store = SnapshotStore(tmp_path)
    snap = store.open(store.publish(index, thumbs=images(index.count, 7)))
    path = store.path_of(snap.name) / THUMBS_FILE
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="thumbs.npy is corrupt"):
        store.load_thumbs(snap)


def test_a_corrupt_thumbnail_file_is_refused(tmp_path, index):
    store = SnapshotStore(tmp_path)
    name = store.publish(index, thumbs=images(index.count, 3))
    path = store.path_of(name) / THUMBS_FILE
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="thumbs.npy is corrupt"):
        store.open(name)


@pytest.mark.parametrize("thumbs,match", [
    (np.zeros((40, 8, 8), np.float32), "uint8"),
    (np.zeros((40, 8), np.uint8), "shape"),
    (np.zeros((40, 8, 8, 2), np.uint8), "shape"),
    (np.zeros((39, 8, 8), np.uint8), "39 images but there are 40 items"),
    (np.zeros((40, THUMB_MAX_SIDE + 1, 8), np.uint8), "pixels a side"),
])
def test_bad_thumbnails_are_refused_and_nothing_is_published(tmp_path, index, thumbs, match):
    store = SnapshotStore(tmp_path)
    with pytest.raises(ValidationError, match=match):
        store.publish(index, thumbs=thumbs)
    assert store.names() == [] and store.latest_name() is None


def test_thumbnails_over_the_size_cap_are_refused(tmp_path, index, monkeypatch):
    monkeypatch.setattr("hardneg.miner.store.THUMBS_MAX_BYTES", 40 * 8 * 8 - 1)
    with pytest.raises(ValidationError, match="at most 2559 are stored"):
        SnapshotStore(tmp_path).publish(index, thumbs=images(40, 4))


def test_thumbnail_ids_must_be_the_index_ids(tmp_path, index):
    ids = index.ids.copy()
    ids[0] = -5
    with pytest.raises(NotFoundError, match="-5"):
        SnapshotStore(tmp_path).publish(index, thumbs=images(40, 5), thumb_ids=ids)
    ids[0] = ids[1]
    with pytest.raises(ValidationError, match="unique"):
        SnapshotStore(tmp_path).publish(index, thumbs=images(40, 5), thumb_ids=ids)


def test_to_thumbs_turns_model_inputs_into_thumbnails(tmp_path, index):
    rng = np.random.default_rng(6)
    grey = rng.random((40, 1, 8, 8)).astype(np.float32)  # torch's (n, C, H, W), values in [0, 1]
    t = to_thumbs(grey)
    assert t.dtype == np.uint8 and t.shape == (40, 8, 8)
    np.testing.assert_array_equal(t, (grey[:, 0] * 255).round().astype(np.uint8))
    rgb = rng.random((40, 3, 300, 150))
    small = to_thumbs(rgb)
    assert small.shape == (40, THUMB_MAX_SIDE, 64, 3)
    # BOX resampling averages: a constant image stays constant.
    flat = to_thumbs(np.full((2, 256, 256), 0.5))
    assert flat.shape == (2, 128, 128) and np.all(flat == 128)
    store = SnapshotStore(tmp_path)
    assert store.load_thumbs(store.open(store.publish(index, thumbs=t))).shape == (40, 8, 8)


@pytest.mark.parametrize("images,match", [
    (np.zeros((4, 8)), "must be \\(n, H, W\\)"),
    (np.zeros((4, 8, 8, 2)), "C 1, 3 or 4"),
    (np.zeros((4, 8, 8), np.int32), "floats in \\[0, 1\\] or uint8"),
])
def test_to_thumbs_refuses_what_is_not_an_image(images, match):
    with pytest.raises(ValidationError, match=match):
        to_thumbs(images)
