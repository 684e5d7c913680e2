"""The thumbnails a trained run's snapshots carry (``training_thumbs``): the store's ``to_thumbs`` at most
``TRAIN_THUMB_SIDE`` pixels a side, shrunk to fit the store's byte cap, none for vectors."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from hardneg.miner.store import to_thumbs
from hardneg.trainer import refresh
from hardneg.trainer.refresh import training_thumbs


def images(n: int, c: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0).random((n, c, h, w), dtype=np.float32)


def test_small_images_are_kept_whole() -> None:
    x = images(5, 1, 8, 8)
    np.testing.assert_array_equal(training_thumbs(x), np.round(x[:, 0] * 255).astype(np.uint8))


def test_large_images_are_shrunk_to_the_side_then_to_the_byte_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    x = images(6, 3, 100, 50)
    np.testing.assert_array_equal(training_thumbs(x), to_thumbs(x, max_side=64))
    assert training_thumbs(x).shape == (6, 64, 32, 3)
    monkeypatch.setattr(refresh, "THUMBS_MAX_BYTES", 6 * 3 * 20 * 20)  # fits 20 x 20 RGB tiles
    got = training_thumbs(x)
    np.testing.assert_array_equal(got, to_thumbs(x, max_side=20))
    assert got.nbytes <= refresh.THUMBS_MAX_BYTES


def test_none_for_vectors_or_when_tiles_would_be_too_small(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    assert training_thumbs(np.zeros((4, 10), np.float32)) is None
    monkeypatch.setattr(refresh, "THUMBS_MAX_BYTES", 6 * 7 * 7)
    with caplog.at_level(logging.WARNING):
        assert training_thumbs(images(6, 1, 16, 16)) is None
    assert "no thumbnails" in caplog.text
