"""The screenshot of the /ui page in docs/ui.png, made from a real run.

``hardneg train`` on digits with 5% of the labels flipped (seeded; all 1797 items train, so snapshot ids are
the rows of the ``.npz``), then its last two snapshots are republished with the digit images as thumbnails
(the trainer does not write ``thumbs.npy`` yet), served by ``hardneg serve``, and the page is opened in
headless chromium on a flipped item, with the label suspects and the drift between the two snapshots shown.

Usage: ``.venv/bin/python bench/ui_screenshot.py [--out docs/ui.png]`` (needs the ``browser`` extra and
Debian's chromium and chromium-driver).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from sklearn.datasets import load_digits

from hardneg.miner.store import MODEL_FILE, SnapshotStore

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "api"))
from api_support import free_port, wait_for  # noqa: E402
from browser_support import chrome  # noqa: E402
from audit import flip_labels  # noqa: E402  (bench/audit.py)


def build_store(work: Path) -> tuple[Path, int]:
    """A served store of two trained snapshots with thumbnails; returns it and a flipped item's id."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    clean = digits.target.astype(np.int64)
    noisy, flipped = flip_labels(clean, 0.05, seed=0)
    np.savez(work / "noisy.npz", x=x, y=noisy)
    np.savez(work / "clean.npz", x=x, y=clean)
    subprocess.run([sys.executable, "-m", "hardneg.cli", "train", "--data", f"npz:{work / 'noisy.npz'}",
                    "--eval-data", f"npz:{work / 'clean.npz'}", "--epochs", "12", "--store", str(work / "trained"),
                    "--run-dir", str(work / "run")], check=True, capture_output=True)
    trained = SnapshotStore(work / "trained")
    served = SnapshotStore(work / "served")
    thumbs = (digits.images * (255 / 16)).round().astype(np.uint8)
    for name in trained.names()[-2:]:
        snap = trained.open(name)
        extra = {MODEL_FILE: snap.model_path} if snap.model_path else None
        served.publish(snap.index, meta=snap.manifest["meta"], model=snap.manifest["model"], extra_files=extra,
                       name=f"epoch-{snap.manifest['meta'].get('epoch', name)}", thumbs=thumbs)
    return work / "served", int(np.flatnonzero(flipped)[3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "ui.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hardneg-ui-shot-") as tmp:
        work = Path(tmp)
        store, item = build_store(work)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HARDNEG_")}
        server = subprocess.Popen([sys.executable, "-m", "hardneg.cli", "serve", "--store", str(store), "--port",
                                   str(port), "--no-access-log"], env=env, stderr=subprocess.DEVNULL)
        driver = None
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(lambda: _ready(url), timeout=60, what="hardneg serve")
            driver = chrome(work / "profile")
            driver.set_window_size(1400, 2000)
            driver.get(f"{url}/ui?id={item}")
            wait_for(lambda: driver.execute_script("return document.querySelectorAll('#neighbors .tile').length") > 0,
                     what="the neighbours")
            driver.execute_script("document.getElementById('load-suspects').click();"
                                  "document.getElementById('load-drift').click();")
            wait_for(lambda: driver.execute_script(
                "return document.querySelectorAll('#suspects .tile').length > 0 && "
                "document.querySelector('#drift table') !== null && "
                "[...document.querySelectorAll('.tile img')].every(i => i.complete && i.naturalWidth > 0)"),
                what="the audit, the drift and the thumbnails")
            time.sleep(0.3)
            height = driver.execute_script("return document.body.scrollHeight")
            driver.set_window_size(1400, height + 200)  # the window includes what headless chromium keeps of its frame
            driver.save_screenshot(str(args.out))
        finally:
            if driver is not None:
                driver.quit()
            server.terminate()
            server.wait(10)
    print(f"screenshot: {args.out}")


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    main()
