"""What a refresh embeds and publishes: channels-last embedding, sampled class centroids, the publish cadence.

References: the model's contiguous-layout forward pass; class tables computed with numpy from every item's
embedding; the schedule worked out by hand from warmup_epochs, refresh_every and publish_every.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_config import from_cli  # hardneg train ARGV through the real parser
from test_throughput_settings import run  # a class-batches run on 6 Gaussian classes in 10-d
from torch import nn

from hardneg.miner.errors import ValidationError
from hardneg.miner.store import SnapshotStore
from hardneg.trainer.batching import class_sample
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.losses import make_loss
from hardneg.trainer.models import EmbeddingCNN
from hardneg.trainer.recipes.base import RecipeContext, Snapshot, TrainData
from hardneg.trainer.recipes.class_batches import ClassBatches
from hardneg.trainer.refresh import embed_items


# ------------------------------------------------------------------ embedding
def contiguous_embeddings(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x).numpy()


def test_images_embed_as_the_contiguous_model_does_also_for_chosen_items() -> None:
    torch.manual_seed(0)
    model = EmbeddingCNN(1, 8, 16).train()
    x = torch.rand(300, 1, 8, 8)
    want = contiguous_embeddings(model, x)
    model.train()
    np.testing.assert_allclose(embed_items(model, x, 64), want, rtol=1e-5, atol=1e-6)
    items = np.array([299, 3, 3, 150, 0])
    np.testing.assert_allclose(embed_items(model, x, 2, items), want[items], rtol=1e-5, atol=1e-6)
    assert model.training  # the mode it found
    assert all(p.is_contiguous() for p in model.parameters())  # the training model keeps its layout


def test_a_model_that_needs_the_contiguous_layout_falls_back_to_it(caplog: pytest.LogCaptureFixture) -> None:
    class Viewing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 6 * 6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.fc(h.view(len(h), -1))  # a channels-last h refuses this view

    torch.manual_seed(1)
    model = Viewing()
    x = torch.rand(10, 1, 6, 6)
    with caplog.at_level(logging.WARNING, logger="hardneg.trainer.refresh"):
        got = embed_items(model, x, 4)
    assert "channels-last" in caplog.text
    np.testing.assert_array_equal(got, contiguous_embeddings(model, x))


# ------------------------------------------------------------------ sampled class centroids
def test_class_sample_takes_up_to_m_distinct_items_of_each_class_of_two_or_more() -> None:
    labels = np.array([5] * 7 + [2] * 3 + [9] + [4] * 2)  # class 9 has a single item
    rng = np.random.default_rng(0)
    items = class_sample(labels, 4, rng)
    assert np.array_equal(items, np.sort(items)) and len(np.unique(items)) == len(items)
    classes, counts = np.unique(labels[items], return_counts=True)
    assert dict(zip(classes.tolist(), counts.tolist())) == {2: 3, 4: 2, 5: 4}
    draws = np.concatenate([class_sample(labels, 4, rng) for _ in range(400)])
    share = np.bincount(draws, minlength=7)[:7] / 400  # class 5: each item in 4 of 7 draws
    np.testing.assert_allclose(share, 4 / 7, atol=0.08)


def numpy_class_table(vectors: np.ndarray, labels: np.ndarray, p: int) -> np.ndarray:
    """Each class, then its p - 1 nearest classes by squared distance between means of unit vectors: brute force."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    classes = np.unique(labels)
    centroids = np.stack([unit[labels == c].mean(0) for c in classes]).astype(np.float64)
    d2 = ((centroids[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    near = np.argsort(d2, axis=1, kind="stable")[:, :p - 1]
    return np.concatenate([classes[:, None], classes[near]], axis=1)


def test_a_sampled_refresh_gives_the_full_class_table_on_separable_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n_classes, per, dim = 24, 30, 16
    centres = rng.normal(size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per)
    emb = (centres[labels] + 2e-5 * rng.normal(size=(len(labels), dim))).astype(np.float32)
    cfg = TrainConfig.from_dict({"data": "digits", "recipe": "class-batches", "batch_size": 32, "per_class": 4,
                                 "centroid_sample": 5, "store": str(tmp_path / "store")})
    p = cfg.batch_size // 4
    want = numpy_class_table(emb, labels, p)
    data = TrainData(torch.zeros(len(labels), 1), torch.from_numpy(labels), labels)
    recipe = ClassBatches(RecipeContext(cfg, data, make_loss(cfg.loss, cfg.margin)))
    items = recipe.refresh_items(epoch=2)
    assert items is not None and len(items) == 5 * n_classes
    # the premise: each row's neighbour distances are further apart than the sample can move them
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    full = np.stack([unit[labels == c].mean(0) for c in range(n_classes)]).astype(np.float64)
    sampled = np.stack([unit[items][labels[items] == c].mean(0) for c in range(n_classes)])
    shift = np.linalg.norm(full - sampled, axis=1).max()  # |d(a, b)² - d(a', b')²| <= 4 (|a-b| + 2 shift) shift
    d2 = np.sort(((full[:, None] - full[None]) ** 2).sum(-1), axis=1)[:, 1:p + 1]
    assert np.diff(d2, axis=1).min() > 2 * 4 * (2.0 + 2 * shift) * shift > 0

    stats = recipe.refresh(nn.Identity(), Snapshot(None, None, emb[items], 2, items=items))
    np.testing.assert_array_equal(recipe.neighbours, want)
    assert stats["centroid_items"] == 5 * n_classes and stats["classes_per_batch"] == p
    assert np.array_equal(recipe.refresh_items(epoch=2), items)  # seeded by (seed, epoch)
    assert not np.array_equal(recipe.refresh_items(epoch=3), items)


# ------------------------------------------------------------------ publish cadence
def train(tmp_path: Path, name: str, **changes: object) -> tuple[str, list[dict]]:
    """A class-batches run of 6 epochs on blobs, a refresh before each after the first; its store and history."""
    history, _ = run(tmp_path, name, **{"epochs": 6, "refresh_every": 1, "keep_snapshots": 10, **changes})
    return str(tmp_path / f"store_{name}"), history


def published_epochs(store: str) -> list[tuple[int, str]]:
    """(epoch, reason) of every snapshot in the store, oldest first; opening each verifies it is complete."""
    s = SnapshotStore(store)
    return [(s.open(n).manifest["meta"]["epoch"], s.open(n).manifest["meta"]["reason"]) for n in s.names()]


def test_every_other_refresh_publishes_and_the_final_model_always(tmp_path: Path) -> None:
    store, history = train(tmp_path, "cadence", publish_every=2, centroid_sample=3)
    # refreshes before epochs 2-6 (k = 0..4): k = 0, 2, 4 publish; 1, 3 embed 3 items of each of 6 classes
    assert [r["snapshot"] is not None for r in history] == [False, False, True, False, True, False, True]
    for r in history[2:]:
        assert r["mining"] is not None  # every refresh composed the class table
        assert ("centroid_items" in r["mining"]) == (r["snapshot"] is None)
    assert history[3]["mining"]["centroid_items"] == 18
    assert "export_s" not in history[3]["timing"] and "embed_s" in history[3]["timing"]
    # the models after epochs 1, 3 and 5 were published by refreshes, the final one (epoch 6) after training
    assert published_epochs(store) == [(1, "refresh"), (3, "refresh"), (5, "refresh"), (6, "final")]
    assert SnapshotStore(store).latest_name() == SnapshotStore(store).names()[-1]


def test_publishing_every_refresh_is_the_default_and_samples_nothing(tmp_path: Path) -> None:
    store, history = train(tmp_path, "every", epochs=3)
    assert [r["snapshot"] is not None for r in history] == [False, False, True, True]
    assert all("centroid_items" not in r["mining"] for r in history[2:])
    assert published_epochs(store) == [(1, "refresh"), (2, "refresh"), (3, "final")]


def test_in_batch_refreshes_that_publish_nothing_embed_nothing(tmp_path: Path) -> None:
    store, history = train(tmp_path, "inbatch", recipe="in-batch", epochs=4, publish_every=10)
    assert [r["snapshot"] is not None for r in history] == [False, False, True, False, False]
    assert all("embed_s" not in r["timing"] for r in history[3:])
    assert published_epochs(store) == [(1, "refresh"), (4, "final")]


def test_impossible_cadence_and_sample_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="publish_every must be an integer >= 1, got 0"):
        from_cli(["--publish-every", "0"])
    with pytest.raises(ValidationError, match="centroid_sample must be an integer >= 2"):
        from_cli(["--recipe", "class-batches", "--centroid-sample", "1"])
    with pytest.raises(ValidationError, match="centroid_sample.*recipe 'class-batches'"):
        from_cli(["--recipe", "in-batch", "--centroid-sample", "8"])
    cfg = from_cli(["--publish-every", "3", "--centroid-sample", "5", "--refresh-every", "2", "--epochs", "20"])
    assert (cfg.publish_every, cfg.recipe.centroid_sample) == (3, 5)
    assert [e for e in range(1, 21) if cfg.is_refresh_epoch(e)] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert [e for e in range(1, 21) if cfg.is_publish_epoch(e)] == [2, 8, 14, 20]
