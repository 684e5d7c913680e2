"""The snapshot store: the contract between trainer, miner and api (DESIGN.md section 2).

::

    STORE/
      LATEST                 name of the newest complete snapshot (replaced with os.replace)
      snapshots/<name>/      immutable once published
        manifest.json        format, name, created_at, dim, metric, count, index spec, model spec,
                             training metadata, sha256 and size of every other file
        index.faiss          FAISS index; row i holds ids[i]
        ids.npy labels.npy   int64, loaded with allow_pickle=False
        model.pt2            optional: the embedding model as a torch.export program

Publishing writes into a temporary folder inside STORE, fsyncs it, renames it into
``snapshots/`` and only then replaces ``LATEST``: a crash at any point leaves the
previous snapshot intact and ``LATEST`` naming a complete one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from hardneg.miner.distances import get_distance
from hardneg.miner.errors import NotFoundError, SnapshotError, ValidationError
from hardneg.miner.index import IndexSpec, VectorIndex

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "LATEST"
SNAPSHOTS = "snapshots"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
LABELS_FILE = "labels.npy"
MODEL_FILE = "model.pt2"
_TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REQUIRED = ("format_version", "name", "created_at", "dim", "metric", "count", "index", "files")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a safe snapshot name, else raise :class:`ValidationError`."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
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
        keep: how many of the newest snapshots :meth:`retain` keeps (the one ``LATEST`` names is always kept).
    """

    def __init__(self, root: str | os.PathLike, keep: int = 5) -> None:
        if keep < 1:
            raise ValidationError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

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
        names = [p.name for p in self.snapshots_dir.iterdir() if p.is_dir() and _NAME_RE.match(p.name)]
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
    ) -> str:
        """Write ``index`` as a new snapshot, atomically, and point ``LATEST`` at it.

        Args:
            index: the vectors, ids and labels to publish.
            meta: JSON-serialisable training metadata (epoch, step, config, metrics).
            model: JSON-serialisable model spec (class and config), stored as ``manifest["model"]``.
            extra_files: files to copy in, by their name in the snapshot (e.g. ``{"model.pt2": path}``).
            name: the snapshot's name; default the next zero-padded sequence number.
            retain: apply retention afterwards.

        Returns:
            The published snapshot's name.
        """
        if name is not None:
            validate_name(name)
        for fname in extra_files or {}:
            if fname in (MANIFEST, INDEX_FILE, IDS_FILE, LABELS_FILE) or not _NAME_RE.match(fname) or ".." in fname:
                raise ValidationError(f"cannot publish an extra file named {fname!r}")
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
        try:
            # mkdtemp makes the folder 0700; a published snapshot must be readable by readers running as
            # other users (an api replica under another uid). Not umask-derived: reading the umask races threads.
            os.chmod(tmp, 0o755)
            files = self._write_payload(tmp, index, extra_files or {})
            manifest = {
                "format_version": FORMAT_VERSION,
                "name": None,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
                "dim": index.dim,
                "metric": index.metric,
                "count": index.count,
                "num_classes": int(len(index.classes)),
                "index": index.spec.to_dict(),
                "model": dict(model) if model is not None else None,
                "meta": dict(meta or {}),
                "files": files,
            }
            final = self._rename_into_place(tmp, manifest, name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._point_latest(final)
        log.info("published snapshot %s (%d items, dim %d, %s)", final, index.count, index.dim, index.spec.factory)
        if retain:
            self.retain()
        return final

    def _write_payload(self, tmp: Path, index: VectorIndex, extra: Mapping[str, str | os.PathLike]) -> dict:
        faiss.write_index(index.index, str(tmp / INDEX_FILE))
        np.save(tmp / IDS_FILE, index.ids.astype(np.int64), allow_pickle=False)
        np.save(tmp / LABELS_FILE, index.labels.astype(np.int64), allow_pickle=False)
        for fname, src in extra.items():
            shutil.copyfile(src, tmp / fname)
        files = {}
        for p in sorted(tmp.iterdir()):
            _fsync_path(p)
            files[p.name] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        return files

    def _rename_into_place(self, tmp: Path, manifest: dict, name: str | None) -> str:
        """Name the snapshot, write its manifest and rename the folder into ``snapshots/``."""
        for _ in range(1000):
            final = name or self._next_name()
            manifest["name"] = final
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            mpath = tmp / MANIFEST
            with open(mpath, "w") as f:
                json.dump(manifest, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
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

    def _next_name(self) -> str:
        numbers = [int(n) for n in self.names() if n.isdigit()]
        return f"{(max(numbers) + 1) if numbers else 1:06d}"

    def _point_latest(self, name: str) -> None:
        tmp = self.root / f"{_TMP_PREFIX}{LATEST}-{uuid.uuid4().hex}"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / LATEST)
        _fsync_path(self.root)

    # ----------------------------------------------------------- read/verify
    def read_manifest(self, name: str) -> dict:
        """Parse and check the manifest of ``name`` (structure and its own digest), without checking files."""
        path = self.path_of(name)
        if not path.is_dir():
            raise NotFoundError(f"snapshot {name!r} does not exist in {self.root}; available: {self.names()[-10:]}")
        mpath = path / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
        except FileNotFoundError:
            raise SnapshotError(f"snapshot {name!r} is incomplete: {MANIFEST} is missing") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} is corrupt ({e})") from None
        if not isinstance(manifest, dict) or any(k not in manifest for k in _REQUIRED):
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} lacks required fields {list(_REQUIRED)}")
        if manifest.get("manifest_sha256") != _manifest_digest(manifest):
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} is corrupt (its checksum does not match its content)")
        if manifest["format_version"] != FORMAT_VERSION:
            raise SnapshotError(f"snapshot {name!r}: format version {manifest['format_version']} is not supported "
                                f"(this hardneg reads version {FORMAT_VERSION})")
        if manifest["name"] != name:
            raise SnapshotError(f"snapshot {name!r}: {MANIFEST} names a different snapshot ({manifest['name']!r})")
        return manifest

    def verify(self, name: str | None = None) -> dict:
        """Check ``name`` (default: LATEST) file by file; return its manifest or raise :class:`SnapshotError`
        naming the first missing or corrupt file."""
        name = self._require_latest() if name is None else name
        manifest = self.read_manifest(name)
        path = self.path_of(name)
        for required in (INDEX_FILE, IDS_FILE, LABELS_FILE):
            if required not in manifest["files"]:
                raise SnapshotError(f"snapshot {name!r}: {MANIFEST} does not list {required}")
        for fname, want in sorted(manifest["files"].items()):
            fpath = path / validate_name(fname)
            if not fpath.is_file():
                raise SnapshotError(f"snapshot {name!r}: {fname} is missing")
            if fpath.stat().st_size != want["size"]:
                raise SnapshotError(f"snapshot {name!r}: {fname} is corrupt (size {fpath.stat().st_size}, "
                                    f"manifest says {want['size']})")
            if sha256_file(fpath) != want["sha256"]:
                raise SnapshotError(f"snapshot {name!r}: {fname} is corrupt (sha256 mismatch)")
        return manifest

    def open(self, name: str | None = None) -> Snapshot:
        """Verify and load ``name`` (default: the one ``LATEST`` names)."""
        name = self._require_latest() if name is None else name
        manifest = self.verify(name)
        path = self.path_of(name)
        try:
            ids = np.load(path / IDS_FILE, allow_pickle=False)
            labels = np.load(path / LABELS_FILE, allow_pickle=False)
            fidx = faiss.read_index(str(path / INDEX_FILE))
        except (ValueError, OSError, RuntimeError) as e:
            raise SnapshotError(f"snapshot {name!r}: cannot load its files ({e})") from None
        if fidx.ntotal != manifest["count"] or fidx.d != manifest["dim"] or len(ids) != manifest["count"]:
            raise SnapshotError(f"snapshot {name!r}: files disagree with {MANIFEST} (count or dimension)")
        try:
            index = VectorIndex(fidx, ids.astype(np.int64), labels.astype(np.int64), get_distance(manifest["metric"]),
                                IndexSpec.from_dict(manifest["index"]))
        except (ValidationError, KeyError) as e:
            raise SnapshotError(f"snapshot {name!r}: {e}") from None
        return Snapshot(name, path, manifest, index)

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
        """Delete all but the newest ``keep`` snapshots (never the one ``LATEST`` names) and stale temp folders.

        Returns the deleted names.
        """
        keep = self.keep if keep is None else keep
        if keep < 1:
            raise ValidationError(f"keep must be at least 1, got {keep}")
        latest = self.latest_name()
        names = self.names()
        doomed = [n for n in names[:-keep] if n != latest] if len(names) > keep else []
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

    def _clean_tmp(self, max_age_s: float) -> None:
        """Remove temp folders of publishers that died (older than ``max_age_s``)."""
        now = time.time()
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - p.stat().st_mtime > max_age_s or p.name.startswith(f"{_TMP_PREFIX}del-"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except FileNotFoundError:
                continue
