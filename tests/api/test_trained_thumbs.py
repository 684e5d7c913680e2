"""A trained run on images publishes thumbnails with every snapshot, and a real ``hardneg serve`` shows them: each
tile is the training image (the digits' 8 x 8 pixels, scaled to 0..255), for the refresh's snapshot and the final
one alike."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_support import API_KEY, STORE_KEY, wait_for
from PIL import Image

from hardneg.miner.store import SnapshotStore
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import load_digits
from hardneg.trainer.loop import Trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A 2-epoch class-batches run on 150 digits (a snapshot before epoch 2, and the final one), signed."""
    work = tmp_path_factory.mktemp("trained-thumbs")
    digits = load_digits()
    pick = np.concatenate([np.flatnonzero(digits.y == c)[:15] for c in range(10)])
    np.savez(work / "train.npz", x=digits.x[pick], y=digits.y[pick])
    np.savez(work / "eval.npz", x=digits.x[pick[::3]], y=digits.y[pick[::3]])
    cfg = TrainConfig.from_dict({"data": f"npz:{work / 'train.npz'}", "eval_data": f"npz:{work / 'eval.npz'}",
                                 "epochs": 2, "batch_size": 40, "threads": 1, "store": str(work / "store"),
                                 "run_dir": str(work / "run")})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARDNEG_STORE_KEY", STORE_KEY)
        Trainer.create(cfg).run()
    return work / "store", digits.x[pick]


def test_every_snapshot_of_a_trained_run_shows_its_images(trained, start_server) -> None:
    store, x = trained
    names = SnapshotStore(store, key=STORE_KEY).names()
    assert len(names) == 2
    server = start_server(store, {"HARDNEG_API_KEY": API_KEY, "HARDNEG_STORE_KEY": STORE_KEY})
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}) as http:
        wait_for(lambda: http.get("/readyz").status_code == 200, what="/readyz")
        for name in names:
            for item in (0, 77, 149):
                info = http.get(f"/items/{item}", params={"snapshot": name}).json()
                assert info["thumb"] is True and info["label"] == int(np.load(store.parent / "train.npz")["y"][item])
                r = http.get(f"/items/{item}/thumb.png", params={"snapshot": name})
                assert r.status_code == 200 and r.headers["content-type"] == "image/png"
                want = np.round(x[item, 0] * 255).astype(np.uint8)  # (8, 8): small enough to keep every pixel
                np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), want)
