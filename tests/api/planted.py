"""An attacker's snapshot: a ``model.pt2`` whose weights entry torch unpickles, planted with recomputed checksums.

The payload writes a marker file when it is unpickled, so a test sees whether any code ran. Whoever can write
the store can recompute every sha256 field and the manifest's own digest; only a key signs.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path

from hardneg.miner.store import MANIFEST, MODEL_FILE, SIGNATURE, _manifest_digest


class MarkerPayload:
    """Unpickling this object writes ``marker`` (the pickle protocol calls ``exec`` with the code below)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def plant_payload(src: Path, dst: Path, marker: Path) -> None:
    """Copy the export archive ``src`` to ``dst`` with its first weight replaced by a pickled payload.

    Its payload config then says ``use_pickle``, which makes torch 2.13's ``torch.export.load`` call
    ``torch.load(weights_only=False)`` on the payload's bytes.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("weights/model_weights_config.json"):
                config = json.loads(data)
                for meta in config["config"].values():
                    meta["use_pickle"] = meta["use_pickle"] or meta["path_name"] == "weight_0"
                data = json.dumps(config).encode()
            elif info.filename.endswith("weights/weight_0"):
                data = pickle.dumps(MarkerPayload(marker))
            zout.writestr(info.filename, data)


def plant_snapshot(root: Path, source: str, name: str, marker: Path, signature: str = "drop") -> Path:
    """Copy snapshot ``source`` of the store ``root`` to a new snapshot ``name`` with a planted ``model.pt2``.

    Every sha256 field and ``manifest_sha256`` are recomputed, as anyone who can write the store can.
    ``signature``: ``"drop"`` removes ``manifest.sig``, ``"keep"`` leaves the source's (now wrong) one.
    """
    src, dst = root / "snapshots" / source, root / "snapshots" / name
    shutil.copytree(src, dst)
    plant_payload(src / MODEL_FILE, dst / MODEL_FILE, marker)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["name"] = name
    data = (dst / MODEL_FILE).read_bytes()
    manifest["files"][MODEL_FILE] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (dst / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if signature == "drop":
        (dst / SIGNATURE).unlink(missing_ok=True)
    return dst


def point_latest(root: Path, name: str) -> None:
    tmp = root / ".tmp-LATEST-test"
    tmp.write_text(name + "\n")
    tmp.replace(root / "LATEST")
