"""The snapshot store: the contract between trainer, miner and api.

::

    STORE/
      LATEST                 name of the newest complete snapshot (replaced with os.replace)
      snapshots/<name>/      immutable once published
        manifest.json        format, name, created_at, dim, metric, count, index spec, model spec,
                             training metadata, sha256 and size of every other file
        manifest.sig         with a store key: HMAC-SHA256 of manifest.json's bytes (hex)
        index.faiss          FAISS index; row i holds ids[i]
        ids.npy labels.npy   int64, loaded with allow_pickle=False
        model.pt2            optional: the embedding model as a torch.export program
        thumbs.npy           optional: uint8 thumbnails (n, H, W) or (n, H, W, C); row i shows ids[i]

Publishing writes into a temporary folder inside STORE, fsyncs it, renames it into
``snapshots/`` and only then replaces ``LATEST``: a crash at any point leaves the
previous snapshot intact and ``LATEST`` naming a complete one.

**Signing.** With a store key (``HARDNEG_STORE_KEY`` by default), :meth:`SnapshotStore.publish`
writes ``manifest.sig``, an HMAC-SHA256 of the manifest's exact bytes; the manifest lists every
file's sha256, so the signature covers every file. A store with a key refuses an unsigned or
badly signed snapshot in :meth:`~SnapshotStore.read_manifest`, before any of its files is read,
let alone parsed by FAISS, NumPy or torch. The sha256 fields alone are checksums against
corruption, not against someone who can write to the store (they can recompute them).

**Permissions.** Published files are 0644 and folders 0755 whatever the umask, so readers running
as another user (an api container) can read them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import faiss
import numpy as np

from hardneg.miner.distances import get_distance
from hardneg.miner.errors import NotFoundError, SnapshotError, ValidationError
from hardneg.miner.index import IndexSpec, VectorIndex, check_int_array

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"
SNAPSHOTS = "snapshots"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
MODEL_FILE = "model.pt2"
SIGNATURE = "manifest.sig"
STORE_KEY_ENV = "HARDNEG_STORE_KEY"
FILE_MODE = 0o644
DIR_MODE = 0o755
THUMBS_FILE = "thumbs.npy"
THUMBS_MAX_BYTES = 64 * 1024 * 1024  # 8 KiB each for 8k images; thumbnails are for looking, not for training
THUMB_MAX_SIDE = 128  # pixels: a tile on a page, not the image
_TMP_PREFIX = ".tmp-"
# fullmatch, not match with "$": "$" also matches before a trailing newline.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_REQUIRED = ("format_version", "name", "created_at", "dim", "metric", "count", "index", "files")
# A manifest lists a few files and a training config; anything this large is not one of ours.
_MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class _FromEnv:
    """Default of ``SnapshotStore(key=...)``: read ``HARDNEG_STORE_KEY`` when the store is created."""

    def __repr__(self) -> str:
        return f"<from ${STORE_KEY_ENV}>"


FROM_ENV = _FromEnv()


def _is_name(name: object) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None and ".." not in name


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe snapshot name, else raise :class:`ValidationError`."""
    if not _is_name(name):
        raise ValidationError(
            f"invalid snapshot name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' or '/'")
    return name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sign_manifest(key: bytes, manifest_bytes: bytes) -> str:
    """HMAC-SHA256 of a manifest's exact bytes, as hex (the content of ``manifest.sig``)."""
    return hmac.new(key, manifest_bytes, hashlib.sha256).hexdigest()


def _key_bytes(key: str | bytes | None | _FromEnv) -> bytes | None:
    if isinstance(key, _FromEnv):
        key = os.environ.get(STORE_KEY_ENV) or None
    if key is None or key in ("", b""):
        return None
    return key.encode() if isinstance(key, str) else bytes(key)


def _check_manifest(name: str, m: dict) -> None:
    """Raise :class:`SnapshotError` naming the first field of a parsed manifest that has the wrong type or value.

    A manifest can be well-formed JSON with a matching digest and still be wrong (written by hand, by another
    tool or by a bug); nothing downstream should meet a string where a count belongs.
    """
    def bad(field: str, want: str) -> SnapshotError:
        return SnapshotError(f"snapshot {name!r}: {MANIFEST} is malformed: {field} must be {want}, "
                             f"got {str(m.get(field, '<missing>'))[:80]!r}")

    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(m["created_at"], str):
        raise bad("created_at", "an ISO 8601 string")
    if not is_int(m["dim"]) or m["dim"] < 1:
        raise bad("dim", "a positive integer")
    if not is_int(m["count"]) or m["count"] < 0:
        raise bad("count", "a non-negative integer")
    if not isinstance(m["metric"], str):
        raise bad("metric", "a string")
    if not isinstance(m["index"], dict) or not isinstance(m["index"].get("factory"), str):
        raise bad("index", "an object with a string 'factory'")
    if "num_classes" in m and m["num_classes"] is not None and not is_int(m["num_classes"]):
        raise bad("num_classes", "an integer")
    if not isinstance(m.get("meta", {}), dict):
        raise bad("meta", "an object")
    model = m.get("model")
    if model is not None:
        shape = model.get("input_shape") if isinstance(model, dict) else None
        if not isinstance(model, dict) or (shape is not None and not (
                isinstance(shape, list) and all(is_int(s) and s >= 1 for s in shape))):
            raise bad("model", "null or an object whose input_shape is a list of positive integers")
    files = m["files"]
    if not isinstance(files, dict) or not all(
            _is_name(f) and isinstance(v, dict) and isinstance(v.get("sha256"), str)
            and _SHA256_RE.fullmatch(v["sha256"]) and is_int(v.get("size")) and v["size"] >= 0
            for f, v in files.items()):
        raise bad("files", "an object mapping file names to {sha256: 64 hex digits, size: integer}")


def _check_names(name: str | None, extra_files: Mapping[str, str | os.PathLike] | None) -> None:
    if name is not None:
        validate_name(name)
    for fname in extra_files or {}:
        if fname in (MANIFEST, SIGNATURE, INDEX_FILE, IDS_FILE, LABELS_FILE, THUMBS_FILE) or not _is_name(fname):
            raise ValidationError(f"cannot publish an extra file named {fname!r}")


def _manifest(dim: int, metric: str, count: int, num_classes: int, spec: IndexSpec, model: Mapping | None,
              meta: Mapping | None, files: dict) -> dict:
    """A new snapshot's manifest, before it is named."""
    return {
        "format_version": FORMAT_VERSION,
        "name": None,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
        "dim": dim,
        "metric": metric,
        "count": count,
        "num_classes": num_classes,
        "index": spec.to_dict(),
        "model": dict(model) if model is not None else None,
        "thumbs": None,
        "meta": dict(meta or {}),
        "files": files,
    }


def _check_prepared(folder: Path) -> int:
    """The row count of the ids and labels written into ``folder``; ValidationError if they are not one unique id
    and one label per row with labels ascending (what :class:`VectorIndex` requires of a snapshot)."""
    for fname in (INDEX_FILE, IDS_FILE, LABELS_FILE):
        if not (folder / fname).is_file():
            raise ValidationError(f"{folder.name} has no {fname}; write the index, ids and labels first")
    ids = np.load(folder / IDS_FILE, mmap_mode="r", allow_pickle=False)
    labels = np.load(folder / LABELS_FILE, mmap_mode="r", allow_pickle=False)
    if ids.ndim != 1 or ids.shape != labels.shape or ids.dtype != np.int64 or labels.dtype != np.int64:
        raise ValidationError(f"ids and labels must be (n,) int64 each, got {ids.shape} {ids.dtype} and "
                              f"{labels.shape} {labels.dtype}")
    if len(labels) > 1 and (np.diff(labels) < 0).any():
        raise ValidationError("labels must ascend: a snapshot's rows are sorted by label")
    if len(np.unique(ids)) != len(ids):
        raise ValidationError("ids must be unique")
    return int(len(ids))


def _manifest_digest(manifest: Mapping) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SnapshotInfo:
    """One line of :meth:`SnapshotStore.list`."""

    name: str
    created_at: str | None
    count: int | None
    dim: int | None
    metric: str | None
    index: str | None
    latest: bool
    error: str | None  # why the manifest could not be read, if it could not


@dataclass
class Snapshot:
    """A verified, loaded snapshot."""

    name: str
    path: Path
    manifest: dict
    index: VectorIndex

    @property
    def model_path(self) -> Path | None:
        """The exported model file, when the snapshot has one."""
        return self.path / MODEL_FILE if MODEL_FILE in self.manifest["files"] else None


class SnapshotStore:
    """Publish, list, verify, open and retain snapshots under ``root``.

    Args:
        root: the store folder (created on first publish).
        keep: how many of the newest snapshots :meth:`retain` keeps (the one ``LATEST`` names, and the newest
            one that verifies, are always kept).
        key: the store key. With one, :meth:`publish` signs each manifest and every read refuses a snapshot
            that is unsigned or badly signed. Default: ``HARDNEG_STORE_KEY`` (unset or empty: no key).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 5, key: str | bytes | None | _FromEnv = FROM_ENV) -> None:
        if keep < 1:
            raise ValidationError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self._key = _key_bytes(key)

    @property
    def signed(self) -> bool:
        """True when this store has a key: what it reads was signed with that key."""
        return self._key is not None

    # ----------------------------------------------------------------- paths
    @property
    def snapshots_dir(self) -> Path:
        return self.root / SNAPSHOTS

    def path_of(self, name: str) -> Path:
        return self.snapshots_dir / validate_name(name)

    def latest_name(self) -> str | None:
        """The name ``LATEST`` holds, or None before the first publish."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        try:
            return validate_name(name)
        except ValidationError as e:
            raise SnapshotError(f"{self.root / LATEST} holds an invalid name: {e}") from None

    def names(self) -> list[str]:
        """Names of published snapshot folders, oldest first.

        Age is the manifest's ``created_at`` (names given with ``publish(name=...)`` need not sort by age);
        snapshots whose manifest cannot be read count as the oldest.
        """
        if not self.snapshots_dir.is_dir():
            return []
        names = [p.name for p in self.snapshots_dir.iterdir() if p.is_dir() and _is_name(p.name)]
        return sorted(names, key=lambda n: (self._created_at(n), n))

    def _created_at(self, name: str) -> str:
        """The ``created_at`` of ``name``'s manifest (UTC ISO 8601, so it sorts as text), or "" if unreadable."""
        try:
            manifest = json.loads((self.snapshots_dir / name / MANIFEST).read_text())
        except (OSError, ValueError):
            return ""
        return str(manifest.get("created_at", "")) if isinstance(manifest, dict) else ""

    # --------------------------------------------------------------- publish
    def publish(
        self,
        index: VectorIndex,
        *,
        meta: Mapping | None = None,
        model: Mapping | None = None,
        extra_files: Mapping[str, str | os.PathLike] | None = None,
        name: str | None = None,
        retain: bool = True,
        thumbs: np.ndarray | None = None,
        thumb_ids: np.ndarray | None = None,
    ) -> str:
        """Write ``index`` as a new snapshot, atomically, and point ``LATEST`` at it.

        Args:
            index: the vectors, ids and labels to publish.
            meta: JSON-serialisable training metadata (epoch, step, config, metrics).
            model: JSON-serialisable model spec (class and config), stored as ``manifest["model"]``.
            extra_files: files to copy in, by their name in the snapshot (e.g. ``{"model.pt2": path}``).
            name: the snapshot's name; default the next zero-padded sequence number.
            retain: apply retention afterwards.
            thumbs: optional uint8 thumbnails (m, H, W) or (m, H, W, C) with C 1, 3 or 4, at most
                ``THUMB_MAX_SIDE`` pixels a side and ``THUMBS_MAX_BYTES`` in all; ``thumbs[i]`` shows item
                ``thumb_ids[i]``. Every item needs one. :func:`to_thumbs` makes them from model inputs.
            thumb_ids: (m,) the ids the thumbnails show (default: the index's ids in ascending order, e.g. 0..n-1).

        Returns:
            The published snapshot's name.
        """
        _check_names(name, extra_files)
        thumbs = None if thumbs is None else thumbs_in_row_order(index, thumbs, thumb_ids)
        self._make_dirs()
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
        try:
            # mkdtemp makes the folder 0700; a published snapshot must be readable by readers running as
            # other users (an api replica under another uid). Not umask-derived: reading the umask races threads.
            os.chmod(tmp, DIR_MODE)
            files = self._write_payload(tmp, index, extra_files or {}, thumbs)
            manifest = _manifest(index.dim, index.metric, index.count, int(len(index.classes)), index.spec, model,
                                 meta, files)
            manifest["thumbs"] = None if thumbs is None else {"shape": list(thumbs.shape), "dtype": "uint8"}
            final = self._rename_into_place(tmp, manifest, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._point_latest(final)
        log.info("published snapshot %s (%d items, dim %d, %s)", final, index.count, index.dim, index.spec.factory)
        if retain:
            self.retain()
        return final

    def _make_dirs(self) -> None:
        """Create the store and ``snapshots/`` (0755 whatever the umask; existing folders are left as they are)."""
        for d in (self.root, self.snapshots_dir):
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, DIR_MODE)

    @contextmanager
    def staging(self, what: str) -> Iterator[Path]:
        """A private scratch folder inside the store, removed on exit (e.g. for a model export before publishing).

        Inside the store rather than in /tmp: a publisher killed before its ``finally`` runs leaves the folder
        under the store's temp prefix, and the next :meth:`retain` of any publisher removes it once it is stale.
        """
        self._make_dirs()
        path = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{what}-", dir=self.root))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _write_payload(self, tmp: Path, index: VectorIndex, extra: Mapping[str, str | os.PathLike],
                       thumbs: np.ndarray | None) -> dict:
        faiss.write_index(index.index, str(tmp / INDEX_FILE))
        if thumbs is not None:
            np.save(tmp / THUMBS_FILE, thumbs, allow_pickle=False)
        np.save(tmp / IDS_FILE, index.ids.astype(np.int64), allow_pickle=False)
        np.save(tmp / LABELS_FILE, index.labels.astype(np.int64), allow_pickle=False)
        return self._seal(tmp, extra)

    def publish_prepared(self, folder: Path, *, dim: int, metric: str, spec: IndexSpec, meta: Mapping | None = None,
                         model: Mapping | None = None, extra_files: Mapping[str, str | os.PathLike] | None = None,
                         name: str | None = None, retain: bool = True) -> str:
        """Publish the ``index.faiss``, ``ids.npy`` and ``labels.npy`` a writer put into ``folder`` (a
        :meth:`staging` folder of this store), atomically, and point ``LATEST`` at it; returns its name.

        For indexes too large to hold in one process: a trainer whose ranks each hold a shard of the embeddings
        streams the rows into ``index.faiss`` in blocks (:class:`hardneg.miner.flat_file.FlatIndexWriter`). The
        ids and labels are read back (memory-mapped) and checked: one id and label per row, ids unique, labels
        ascending, as :class:`~hardneg.miner.index.VectorIndex` requires; ``dim``, ``metric`` and ``spec``
        describe ``index.faiss``. The folder itself is moved into ``snapshots/``; the other arguments are
        :meth:`publish`'s.
        """
        _check_names(name, extra_files)
        folder = Path(folder)
        if folder.parent.resolve() != self.root.resolve() or not folder.name.startswith(_TMP_PREFIX):
            raise ValidationError(f"{folder} is not a staging folder of the store {self.root}; write into "
                                  "SnapshotStore.staging() so that publishing is a rename")
        count = _check_prepared(folder)
        if spec.kind == "flat":
            from hardneg.miner.flat_file import flat_header

            size, want = (folder / INDEX_FILE).stat().st_size, len(flat_header(dim, metric, count)) + 4 * count * dim
            if size != want:
                raise ValidationError(f"{INDEX_FILE} holds {size} bytes; a flat index of {count} rows of {dim} "
                                      f"floats takes {want}")
        labels = np.load(folder / LABELS_FILE, mmap_mode="r", allow_pickle=False)
        num_classes = int(np.count_nonzero(np.diff(labels))) + 1 if count else 0
        del labels
        os.chmod(folder, DIR_MODE)
        files = self._seal(folder, extra_files or {})
        final = self._rename_into_place(folder, _manifest(dim, metric, count, num_classes, spec, model, meta, files),
                                        name)
        self._point_latest(final)
        log.info("published snapshot %s (%d items, dim %d, %s, written in blocks)", final, count, dim, spec.factory)
        if retain:
            self.retain()
        return final

    def _seal(self, tmp: Path, extra: Mapping[str, str | os.PathLike]) -> dict:
        """Copy ``extra`` files into ``tmp``, make every file readable to all and durable; their sizes and sha256."""
        for fname, src in extra.items():
            shutil.copyfile(src, tmp / fname)
        files = {}
        for p in sorted(tmp.iterdir()):
            os.chmod(p, FILE_MODE)
            _fsync_path(p)
            files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        return files

    def _rename_into_place(self, tmp: Path, manifest: dict, name: str | None) -> str:
        """Name the snapshot, write its manifest and rename the folder into ``snapshots/``."""
        for _ in range(1000):
            final = name or self._next_name()
            manifest["name"] = final
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            data = (json.dumps(manifest, indent=2, sort_keys=True)).encode()
            self._write_file(tmp / MANIFEST, data)
            if self._key is not None:
                self._write_file(tmp / SIGNATURE, (sign_manifest(self._key, data) + "\n").encode())
            _fsync_path(tmp)
            try:
                os.rename(tmp, self.snapshots_dir / final)
            except OSError:
                if name is not None or not (self.snapshots_dir / final).exists():
                    raise SnapshotError(f"cannot publish snapshot {final!r}: it already exists") from None
                continue  # another publisher took this number; take the next
            _fsync_path(self.snapshots_dir)
            return final
        raise SnapshotError("could not find a free snapshot name")

    @staticmethod
    def _write_file(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, FILE_MODE)

    def _next_name(self) -> str:
        numbers = [int(n) for n in self.names() if n.isdigit()]
        return f"{(max(numbers) + 1) if numbers else 1:06d}"

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f"{_TMP_PREFIX}{LATEST}-{uuid.uuid4().hex}"
        self._write_file(tmp, (name + "\n").encode())
        os.replace(tmp, self.root / LATEST)
        _fsync_path(self.root)

    # ----------------------------------------------------------- read/verify
    def read_manifest(self, name: str) -> dict:
        """Parse and check the manifest of ``name`` (signature with a key, structure, its own digest), not the files."""
        path = self.path_of(name)
        if not path.is_dir():
            raise NotFoundError(f"snapshot {name!r} does not exist in the store; available: {self.names()[-10:]}")
        data = self._read_bounded(name, path / MANIFEST, _MAX_MANIFEST_BYTES)
        if data is None:
            raise SnapshotError(f"snapshot {name!r} is incomplete: {MANIFEST} is missing")
        self._check_signature(name, path, data)
        try:
            manifest = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} is corrupt ({e})") from None
        if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED):
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} lacks required fields {list(_REQUIRED)}")
        if manifest.get("manifest_sha256") != _manifest_digest(manifest):
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} is corrupt (its checksum does not match its content)")
        if not isinstance(manifest["format_version"], int) or isinstance(manifest["format_version"], bool):
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} is malformed: format_version must be an integer, "
                                f"got {manifest['format_version']!r}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise SnapshotError(f"snapshot {name!r}: format version {manifest['format_version']} is not supported "
                                f"(this hardneg reads version {FORMAT_VERSION})")
        if manifest["name"] != name:
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} names a different snapshot ({manifest['name']!r})")
        _check_manifest(name, manifest)
        return manifest

    @staticmethod
    def _read_bounded(name: str, path: Path, limit: int) -> bytes | None:
        """The bytes of ``path`` (None if it does not exist); SnapshotError if it is larger than ``limit``."""
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SnapshotError(f"snapshot {name!r}: cannot read {path.name} ({e.strerror})") from None
        if len(data) > limit:
            raise SnapshotError(f"snapshot {name!r}: {path.name} is larger than {limit} bytes; not a hardneg file")
        return data

    def _check_signature(self, name: str, path: Path, manifest_bytes: bytes) -> None:
        """With a key: SnapshotError unless ``manifest.sig`` holds the HMAC of ``manifest_bytes``."""
        if self._key is None:
            return
        sig = self._read_bounded(name, path / SIGNATURE, 1024)
        if sig is None:
            raise SnapshotError(f"snapshot {name!r} is not signed ({SIGNATURE} is missing) but {STORE_KEY_ENV} is "
                                "set: refused. Publish it again with the same key, or unset the key to read "
                                "unsigned snapshots")
        try:
            offered = sig.decode("ascii").strip().encode()
        except UnicodeDecodeError:
            offered = b""
        if not hmac.compare_digest(offered, sign_manifest(self._key, manifest_bytes).encode()):
            raise SnapshotError(f"snapshot {name!r} is badly signed ({SIGNATURE} does not match its {MANIFEST} "
                                f"under {STORE_KEY_ENV}): refused; it was changed after publishing or signed "
                                "with another key")

    def verify(self, name: str | None = None) -> dict:
        """Check ``name`` (default: LATEST) file by file; return its manifest or raise :class:`SnapshotError`
        naming the first missing or corrupt file. Nothing is parsed but the manifest (after its signature)."""
        name = self._require_latest() if name is None else name
        manifest = self._read_listed_manifest(name)
        for fname in sorted(manifest["files"]):
            self._check_file(name, manifest, fname, sha256_file)
        return manifest

    def read_file(self, name: str, fname: str, manifest: Mapping | None = None) -> bytes:
        """The bytes of snapshot ``name``'s file ``fname``, checked against the (signed) manifest's sha256.

        Read once into memory and checked there, so what a parser then sees is exactly what was checked
        (reading the path again could meet a file replaced in between).
        """
        manifest = self.read_manifest(name) if manifest is None else manifest
        if fname not in manifest["files"]:
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} does not list {fname}")
        return self._check_file(name, manifest, fname, lambda p: p.read_bytes())

    def _read_listed_manifest(self, name: str) -> dict:
        manifest = self.read_manifest(name)
        for required in (INDEX_FILE, IDS_FILE, LABELS_FILE):
            if required not in manifest["files"]:
                raise SnapshotError(f"snapshot {name!r}: {MANIFEST} does not list {required}")
        return manifest

    def _check_file(self, name: str, manifest: Mapping, fname: str, read: Callable[[Path], T]) -> T:
        """``read(path)`` of a listed file after checking its size; then its sha256 against the manifest.

        ``read`` returns either the file's sha256 (streaming) or its bytes (hashed here).
        """
        want = manifest["files"][fname]
        fpath = self.path_of(name) / validate_name(fname)
        try:
            size = fpath.stat().st_size
            if not fpath.is_file():
                raise FileNotFoundError
            if size != want["size"]:
                raise SnapshotError(f"snapshot {name!r}: {fname} is corrupt (size {size}, manifest says {want['size']})")
            got = read(fpath)
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {name!r}: {fname} is missing") from None
        except OSError as e:
            raise SnapshotError(f"snapshot {name!r}: cannot read {fname} ({e.strerror})") from None
        digest = hashlib.sha256(got).hexdigest() if isinstance(got, bytes) else got
        if digest != want["sha256"]:
            raise SnapshotError(f"snapshot {name!r}: {fname} is corrupt (sha256 mismatch)")
        return got

    def open(self, name: str | None = None) -> Snapshot:
        """Verify and load ``name`` (default: the one ``LATEST`` names).

        The signature (with a key) and every file's checksum are checked before FAISS or NumPy parse anything;
        the parsers read the very bytes that were checked. Other listed files (``model.pt2``) are checked too,
        but not loaded: see :meth:`read_file`.
        """
        name = self._require_latest() if name is None else name
        manifest = self._read_listed_manifest(name)
        blobs = {f: self.read_file(name, f, manifest) for f in (IDS_FILE, LABELS_FILE, INDEX_FILE)}
        for fname in sorted(set(manifest["files"]) - set(blobs)):
            self._check_file(name, manifest, fname, sha256_file)
        try:
            ids = np.load(io.BytesIO(blobs[IDS_FILE]), allow_pickle=False)
            labels = np.load(io.BytesIO(blobs[LABELS_FILE]), allow_pickle=False)
            fidx = faiss.deserialize_index(np.frombuffer(blobs.pop(INDEX_FILE), dtype=np.uint8))
        except (ValueError, OSError, RuntimeError) as e:
            raise SnapshotError(f"snapshot {name!r}: cannot load its files ({e})") from None
        count = manifest["count"]
        if fidx.ntotal != count or fidx.d != manifest["dim"] or ids.shape != (count,) or labels.shape != (count,):
            raise SnapshotError(f"snapshot {name!r}: files disagree with {MANIFEST} (count or dimension)")
        if not (np.issubdtype(ids.dtype, np.integer) and np.issubdtype(labels.dtype, np.integer)):
            raise SnapshotError(f"snapshot {name!r}: {IDS_FILE} and {LABELS_FILE} must hold integers")
        try:
            index = VectorIndex(fidx, ids.astype(np.int64), labels.astype(np.int64), get_distance(manifest["metric"]),
                                IndexSpec.from_dict(manifest["index"]))
        except (ValidationError, KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"snapshot {name!r}: {e}") from None
        return Snapshot(name, self.path_of(name), manifest, index)

    def load_thumbs(self, snap: Snapshot) -> np.ndarray | None:
        """``snap``'s thumbnails (n, H, W[, C]) uint8 in row order, or None when it has none.

        Parsed from the bytes checked against the (signed) manifest, like every other file; shape and dtype
        are checked too.
        """
        if THUMBS_FILE not in snap.manifest["files"]:
            return None
        data = self.read_file(snap.name, THUMBS_FILE, snap.manifest)
        try:
            thumbs = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError) as e:
            raise SnapshotError(f"snapshot {snap.name!r}: cannot load {THUMBS_FILE} ({e})") from None
        try:
            return check_thumbs(thumbs, snap.index.count)
        except ValidationError as e:
            raise SnapshotError(f"snapshot {snap.name!r}: {THUMBS_FILE} is invalid ({e})") from None

    def _require_latest(self) -> str:
        name = self.latest_name()
        if name is None:
            raise NotFoundError(f"the store {self.root} has no snapshot yet (no {LATEST} file)")
        return name

    # ------------------------------------------------------------- listing
    def list(self) -> list[SnapshotInfo]:
        """All snapshots, newest first; unreadable manifests are listed with their error."""
        latest = self.latest_name()
        out = []
        for name in reversed(self.names()):
            try:
                m = self.read_manifest(name)
                out.append(SnapshotInfo(name, m["created_at"], m["count"], m["dim"], m["metric"],
                                        m["index"].get("factory"), name == latest, None))
            except (SnapshotError, NotFoundError) as e:
                out.append(SnapshotInfo(name, None, None, None, None, None, name == latest, str(e)))
        return out

    # ------------------------------------------------------------ retention
    def retain(self, keep: int | None = None) -> list[str]:
        """Delete all but the newest ``keep`` snapshots and stale temp folders; returns the deleted names.

        Never deleted: the one ``LATEST`` names, and the newest snapshot that verifies. A reader (an api on a
        read-only mount) cannot tell the store which snapshot it serves, but it only ever serves one that
        verified; if the newest ``keep`` all fail to verify (each rejected by the api, which keeps serving an
        older one), that older one is the newest that verifies, and it stays, so a restarted api can load it.
        """
        keep = self.keep if keep is None else keep
        if keep < 1:
            raise ValidationError(f"keep must be at least 1, got {keep}")
        latest = self.latest_name()
        names = self.names()
        protected = {latest, self._newest_verifying(names)}
        doomed = [n for n in names[:-keep] if n not in protected] if len(names) > keep else []
        for n in doomed:
            # Rename first so that a reader never sees a half-deleted snapshot under its real name.
            trash = self.root / f"{_TMP_PREFIX}del-{n}-{uuid.uuid4().hex}"
            try:
                os.rename(self.snapshots_dir / n, trash)
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
        self._clean_tmp(max_age_s=3600.0)
        if doomed:
            log.info("retention removed snapshots %s", doomed)
        return doomed

    def _newest_verifying(self, names: list[str]) -> str | None:
        """The newest of ``names`` (oldest first) that passes :meth:`verify` (usually the newest: one check)."""
        for name in reversed(names):
            try:
                self.verify(name)
                return name
            except (SnapshotError, NotFoundError, ValidationError, OSError):
                continue
        return None

    def _clean_tmp(self, max_age_s: float) -> None:
        """Remove temp folders of publishers that died (older than ``max_age_s``)."""
        now = time.time()
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - p.stat().st_mtime > max_age_s or p.name.startswith(f"{_TMP_PREFIX}del-"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except FileNotFoundError:
                continue


def check_thumbs(thumbs: np.ndarray, count: int) -> np.ndarray:
    """Check thumbnails for ``count`` items: uint8, (count, H, W) or (count, H, W, C) with C in 1, 3, 4, each side
    at most ``THUMB_MAX_SIDE``, ``THUMBS_MAX_BYTES`` in all. Returns them; raises :class:`ValidationError`."""
    if not isinstance(thumbs, np.ndarray) or thumbs.dtype != np.uint8:
        raise ValidationError(f"thumbs must be a uint8 numpy array, got {getattr(thumbs, 'dtype', type(thumbs).__name__)}")
    if thumbs.ndim not in (3, 4) or (thumbs.ndim == 4 and thumbs.shape[3] not in (1, 3, 4)):
        raise ValidationError(f"thumbs must have shape (n, H, W) or (n, H, W, C) with C 1, 3 or 4, got {thumbs.shape}")
    if thumbs.shape[0] != count:
        raise ValidationError(f"thumbs holds {thumbs.shape[0]} images but there are {count} items; give one per item")
    if not all(1 <= side <= THUMB_MAX_SIDE for side in thumbs.shape[1:3]):
        raise ValidationError(f"thumbnails must be 1 to {THUMB_MAX_SIDE} pixels a side, got {thumbs.shape[1:3]}; "
                              "downscale them")
    if thumbs.nbytes > THUMBS_MAX_BYTES:
        raise ValidationError(f"thumbs take {thumbs.nbytes} bytes; at most {THUMBS_MAX_BYTES} are stored: "
                              "use smaller thumbnails")
    return thumbs


def thumbs_in_row_order(index: VectorIndex, thumbs: np.ndarray, thumb_ids: np.ndarray | None) -> np.ndarray:
    """``thumbs`` (m, ...) of items ``thumb_ids`` (default: ``index``'s ids ascending) reordered to the index's rows."""
    check_thumbs(thumbs, index.count)
    thumb_ids = np.sort(index.ids) if thumb_ids is None else check_int_array(thumb_ids, "thumb_ids", index.count)
    if len(np.unique(thumb_ids)) != len(thumb_ids):
        raise ValidationError("thumb_ids must be unique")
    out = np.empty_like(thumbs)
    out[index.rows_of(thumb_ids)] = thumbs  # NotFoundError names ids the index does not hold
    return out


def to_thumbs(images: np.ndarray, max_side: int = THUMB_MAX_SIDE) -> np.ndarray:
    """Model inputs as thumbnails for :meth:`SnapshotStore.publish`: (n, H, W) or (n, H, W, C) uint8.

    Args:
        images: (n, H, W), (n, C, H, W) (channels first, as torch holds images) or (n, H, W, C) with C 1, 3
            or 4; floats in [0, 1] (clipped) or uint8.
        max_side: images larger than this are shrunk (Pillow, area-averaged) to fit, keeping their aspect.
    """
    x = np.asarray(images)
    if x.ndim == 4 and x.shape[1] in (1, 3, 4) and x.shape[3] not in (1, 3, 4):
        x = x.transpose(0, 2, 3, 1)  # channels first -> last
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (3, 4)):
        raise ValidationError(f"images must be (n, H, W), (n, C, H, W) or (n, H, W, C) with C 1, 3 or 4; "
                              f"got shape {np.shape(images)}")
    if np.issubdtype(x.dtype, np.floating):
        x = (np.clip(np.nan_to_num(x), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif x.dtype != np.uint8:
        raise ValidationError(f"images must be floats in [0, 1] or uint8, got {x.dtype}")
    h, w = x.shape[1:3]
    if max(h, w) > max_side:
        from PIL import Image

        scale = max_side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        x = np.stack([np.asarray(Image.fromarray(im).resize(size, Image.Resampling.BOX)) for im in x])
    return np.ascontiguousarray(x)
