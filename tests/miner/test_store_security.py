"""The store as an attacker or a careless user meets it: signatures, malformed manifests, names, permissions,
temporary folders and what retention keeps."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from hardneg.miner.errors import SnapshotError, ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import MANIFEST, SIGNATURE, SnapshotStore, _manifest_digest, sign_manifest, validate_name

REPO = Path(__file__).resolve().parents[2]
real_load = np.load
KEY = "k-3b9e"


def hardneg(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HARDNEG_")}
    return subprocess.run([sys.executable, "-m", "hardneg.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**clean, **(env or {})})


@pytest.fixture
def index(clusters) -> VectorIndex:
    d = clusters(40, 4, 4, seed=21)
    return VectorIndex.build(d.vectors, d.labels, d.ids)


# ---------------------------------------------------------------- signatures
def test_publish_signs_the_manifest_bytes_with_the_key(tmp_path, index):
    store = SnapshotStore(tmp_path, key=KEY)
    name = store.publish(index)
    folder = tmp_path / "snapshots" / name
    want = sign_manifest(KEY.encode(), (folder / MANIFEST).read_bytes())
    assert (folder / SIGNATURE).read_text().strip() == want
    assert store.open(name).index.count == index.count


def test_the_key_defaults_to_the_environment(tmp_path, index, monkeypatch):
    monkeypatch.setenv("HARDNEG_STORE_KEY", KEY)
    name = SnapshotStore(tmp_path).publish(index)
    assert SnapshotStore(tmp_path, key=KEY).verify(name)["name"] == name
    monkeypatch.setenv("HARDNEG_STORE_KEY", "")  # empty means no key, as in a compose file
    assert not SnapshotStore(tmp_path).signed


@pytest.mark.parametrize(("tamper", "message"), [
    ("unsigned", "is not signed (manifest.sig is missing) but HARDNEG_STORE_KEY is set"),
    ("other key", "is badly signed"),
    ("manifest edited", "is badly signed"),
    ("garbage signature", "is badly signed"),
])
def test_a_reader_with_the_key_refuses_before_parsing_anything(tmp_path, index, monkeypatch, tamper, message):
    if tamper == "unsigned":
        name = SnapshotStore(tmp_path, key=None).publish(index)
    else:
        name = SnapshotStore(tmp_path, key="other" if tamper == "other key" else KEY).publish(index)
    folder = tmp_path / "snapshots" / name
    if tamper == "manifest edited":  # digest recomputed, as anyone with write access can
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["meta"] = {"edited": True}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest))
    if tamper == "garbage signature":
        (folder / SIGNATURE).write_bytes(b"\xff\xfe" * 40)

    def never(*args):
        raise AssertionError("a file was parsed before the signature was checked")

    for parser in ("deserialize_index", "read_index"):
        monkeypatch.setattr(faiss, parser, never)
    monkeypatch.setattr(np, "load", never)
    monkeypatch.setattr(json, "loads", never)  # not even the manifest is parsed before its signature
    store = SnapshotStore(tmp_path, key=KEY)
    for read in (store.open, store.verify, store.read_manifest):
        with pytest.raises(SnapshotError, match=re.escape(f"snapshot {name!r} {message}")):
            read(name)


def test_without_a_key_signed_snapshots_read_as_before(tmp_path, index):
    name = SnapshotStore(tmp_path, key=KEY).publish(index)
    assert SnapshotStore(tmp_path, key=None).open(name).index.count == index.count


def test_a_file_swapped_after_the_check_is_never_parsed(tmp_path, index, monkeypatch):
    """open() parses the bytes it checked, not the path again (which could have been replaced in between)."""
    store = SnapshotStore(tmp_path, key=KEY)
    name = store.publish(index)
    paths = []
    real = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda src, *a: paths.append(src) if isinstance(src, str) else real(src, *a))
    monkeypatch.setattr(np, "load", lambda src, **kw: paths.append(src) if isinstance(src, (str, Path)) else real_load(src, **kw))
    assert store.open(name).index.count == index.count
    assert paths == []


# ---------------------------------------------------------------- malformed manifests
def _malform(root: Path, name: str, **fields) -> None:
    path = root / "snapshots" / name / MANIFEST
    manifest = {**json.loads(path.read_text()), **fields}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("fields", [
    {"count": "12"}, {"dim": 0}, {"dim": True}, {"created_at": 5}, {"index": {"factory": 3}}, {"meta": []},
    {"files": {"index.faiss": {"sha256": "zz", "size": 1}}}, {"files": {"../x": {"sha256": "0" * 64, "size": 1}}},
    {"model": {"input_shape": [2, -3]}}, {"format_version": "1"},
], ids=lambda f: json.dumps(f)[:30])
def test_malformed_manifests_are_a_clear_error_everywhere(tmp_path, index, fields):
    store = SnapshotStore(tmp_path)
    store.publish(index, name="bad")
    _malform(tmp_path, "bad", **fields)
    field = next(iter(fields))
    for read in (store.read_manifest, store.verify, store.open):
        with pytest.raises(SnapshotError, match=f"snapshot 'bad': manifest.json is malformed: {field} must be"):
            read("bad")
    [info] = store.list()
    assert info.error and "malformed" in info.error


@pytest.mark.slow
def test_index_list_and_verify_report_a_malformed_manifest_without_a_traceback(tmp_path, index):
    store = SnapshotStore(tmp_path)
    store.publish(index, name="good")
    store.publish(index, name="bad")
    _malform(tmp_path, "bad", count="many")
    done = hardneg("index", "list", "--store", tmp_path)
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "* bad  INVALID: snapshot 'bad': manifest.json is malformed: count must be" in done.stdout
    assert "  good  " in done.stdout
    done = hardneg("index", "verify", "--store", tmp_path, "bad")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "manifest.json is malformed: count must be a non-negative integer, got 'many'" in done.stderr


# ---------------------------------------------------------------- names
@pytest.mark.parametrize("name", ["x\n", "x\r\n", "\nx", "a/b", "..", "a..b", "", "-x", "x" * 129])
def test_names_must_match_whole(name):
    with pytest.raises(ValidationError, match="invalid snapshot name"):
        validate_name(name)


@pytest.mark.slow
def test_index_build_refuses_a_name_with_a_trailing_newline(tmp_path, index):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32))
    np.save(tmp_path / "l.npy", np.arange(20) % 3)
    store = tmp_path / "store"
    assert hardneg("index", "build", "--store", store, "--vectors", tmp_path / "v.npy", "--labels",
                   tmp_path / "l.npy", "--name", "first").returncode == 0
    done = hardneg("index", "build", "--store", store, "--vectors", tmp_path / "v.npy", "--labels",
                   tmp_path / "l.npy", "--name", "x\n")
    assert done.returncode == 2 and "invalid snapshot name 'x\\n'" in done.stderr
    assert (store / "LATEST").read_text() == "first\n"
    assert sorted(p.name for p in (store / "snapshots").iterdir()) == ["first"]


# ---------------------------------------------------------------- permissions
def test_permissions_do_not_depend_on_the_umask(tmp_path, index):
    old = os.umask(0o077)
    try:
        store = SnapshotStore(tmp_path / "store", key=KEY)
        name = store.publish(index, extra_files={"notes.txt": _text(tmp_path / "notes.txt")})
    finally:
        os.umask(old)
    root = tmp_path / "store"
    folders = [root, root / "snapshots", root / "snapshots" / name]
    files = [root / "LATEST", *(root / "snapshots" / name).iterdir()]
    assert {p.name for p in files} >= {"LATEST", "manifest.json", "manifest.sig", "index.faiss", "ids.npy",
                                       "labels.npy", "notes.txt"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folders} == {p.name: 0o755 for p in folders}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}


def _text(path: Path) -> Path:
    path.write_text("hello")
    return path


# ---------------------------------------------------------------- temporary folders
def test_staging_folders_are_removed_even_on_error_and_swept_after_a_crash(tmp_path, index):
    store = SnapshotStore(tmp_path)
    with pytest.raises(RuntimeError), store.staging("export") as folder:
        (folder / "model.pt2").write_bytes(b"weights")
        raise RuntimeError("export failed")
    assert not folder.exists()
    with store.staging("export") as crashed:  # a publisher killed here leaves its folder behind ...
        (crashed / "model.pt2").write_bytes(b"weights")
        os.rename(crashed, tmp_path / (crashed.name + "-left"))
    left = tmp_path / (crashed.name + "-left")
    old = time.time() - 7200
    os.utime(left, (old, old))
    store.publish(index)  # ... and the next publisher's retention removes it once it is stale
    assert not left.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


# ---------------------------------------------------------------- retention
def test_retention_keeps_the_newest_snapshot_that_verifies(tmp_path, index):
    """If every newer snapshot is broken (an api refuses each and keeps serving the last good one), retention
    must not delete that one: a restarted api could then load nothing."""
    store = SnapshotStore(tmp_path, keep=2)
    good = store.publish(index)
    broken = []
    for _ in range(4):
        name = store.publish(index, retain=False)
        (tmp_path / "snapshots" / name / "ids.npy").write_bytes(b"corrupt")
        broken.append(name)
    assert store.retain() == broken[:2]  # the older broken ones go, the good one stays
    assert store.names() == [good, *broken[2:]]
    store.verify(good)
    newer = store.publish(index)  # once a newer snapshot verifies, the old good one is ordinary history
    assert good not in store.names() and newer in store.names()
