"""Datasets for the trainer: built-in digits, ``.npz`` files, image folders and a user's ``module:attr``.

Every source ends as an :class:`ArrayDataset`: ``x`` float32 (n, *input_shape) and ``y`` int64 (n,),
held in memory. Images are (C, H, W) with values in [0, 1]; feature vectors are (D,).
All validation happens here, before any training starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.plugins import resolve_attr
from hardneg.trainer.config import TrainConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SOURCE_FORMS = "digits, npz:PATH, folder:PATH or module:attr"


@dataclass(frozen=True)
class ArrayDataset:
    """An in-memory labelled dataset: ``x`` float32 (n, *input_shape), ``y`` int64 (n,)."""

    x: np.ndarray
    y: np.ndarray
    name: str

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    def subset(self, idx: np.ndarray, name: str) -> ArrayDataset:
        return ArrayDataset(self.x[idx], self.y[idx], name)


@dataclass(frozen=True)
class DataSplits:
    """What the trainer trains on (its dataset indices are the snapshot ids) and evaluates on."""

    train: ArrayDataset
    eval: ArrayDataset
    description: str


# ----------------------------------------------------------------- loading
def load_splits(cfg: TrainConfig) -> DataSplits:
    """Load ``cfg.data`` (and ``cfg.eval_data``) and split them by ``cfg.protocol``; validated."""
    full = load_source(cfg.data, cfg)
    if cfg.eval_data is not None:
        train, evalset = full, load_source(cfg.eval_data, cfg)
        if evalset.input_shape != train.input_shape:
            raise ValidationError(f"eval data items have shape {evalset.input_shape} but training items have "
                                  f"{train.input_shape}; they must match")
        how = f"train on {train.name}, evaluate on {evalset.name}"
    elif cfg.protocol == "heldout-classes":
        train, evalset = split_heldout_classes(full, cfg.eval_class_fraction)
        how = (f"{full.name}, held-out classes: train on classes {np.unique(train.y).tolist()}, "
               f"evaluate on unseen classes {np.unique(evalset.y).tolist()}")
    else:
        train, evalset = split_heldout_samples(full, cfg.eval_sample_fraction, cfg.seed)
        how = f"{full.name}, held-out samples: {len(train)} train / {len(evalset)} eval items of the same classes"
    if cfg.recipe.needs_labels:  # self-supervised training reads no labels (recipe "simclr")
        check_trainable(train, "training data")
    check_evaluable(evalset, "evaluation data")
    return DataSplits(train, evalset, f"{how} ({len(train)} train, {len(evalset)} eval items, "
                                      f"input shape {train.input_shape})")


def load_source(spec: str, cfg: TrainConfig) -> ArrayDataset:
    """Load one data source named by ``spec`` (digits, npz:PATH, folder:PATH or module:attr)."""
    if spec == "digits":
        return load_digits()
    kind, sep, rest = spec.partition(":")
    if not sep or not rest or not kind:
        raise ValidationError(f"data source {spec!r} is not understood; accepted: {SOURCE_FORMS}")
    if kind == "npz":
        return load_npz(Path(rest))
    if kind == "folder":
        return load_folder(Path(rest), cfg.image_size, cfg.image_mode)
    return load_module_dataset(spec)


def load_digits() -> ArrayDataset:
    """scikit-learn's bundled digits: 1797 images (1, 8, 8), values 0..16 scaled to [0, 1], labels 0..9."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return ArrayDataset(x, bunch.target.astype(np.int64), "digits")


def load_npz(path: Path) -> ArrayDataset:
    """An ``.npz`` with ``x`` (N, ...) float or uint8 and ``y`` (N,) integer labels."""
    if not path.is_file():
        raise ValidationError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise ValidationError(f"npz file {path} lacks array(s) {missing}; it must hold 'x' (N, ...) and "
                                      f"'y' (N,) integer labels, found {f.files}")
            x, y = f["x"], f["y"]
    except ValidationError:
        raise
    except (ValueError, OSError) as e:
        raise ValidationError(f"npz file {path} cannot be read as plain arrays ({e})") from None
    return make_dataset(x, y, f"npz:{path}")


def load_folder(root: Path, size: int, mode: str) -> ArrayDataset:
    """An image folder with one sub-folder per class (sorted names -> labels 0..K-1), resized to size x size."""
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise ValidationError(f"image folder {root} does not exist")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValidationError(f"image folder {root} has no class sub-folders; put each class's images in its own "
                              f"sub-folder ({', '.join(IMAGE_EXTENSIONS)})")
    xs, ys = [], []
    for label, folder in enumerate(classes):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValidationError(f"class folder {folder} holds no images; accepted: {', '.join(IMAGE_EXTENSIONS)}")
        for file in files:
            try:
                with Image.open(file) as im:
                    im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                    xs.append(np.asarray(im, dtype=np.uint8))
            except (UnidentifiedImageError, OSError) as e:
                raise ValidationError(f"image {file} cannot be read ({e})") from None
            ys.append(label)
    x = np.stack(xs)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)  # (N, H, W) or (N, H, W, C) -> (N, C, H, W)
    log.info("loaded %d images of %d classes from %s", len(ys), len(classes), root)
    return make_dataset(x, np.asarray(ys, dtype=np.int64), f"folder:{root}")


def load_module_dataset(spec: str) -> ArrayDataset:
    """``module:attr``: (x, y) arrays, a callable returning them, or a torch-style Dataset of (x, y) items."""
    obj = resolve_attr(spec, "dataset")
    if callable(obj) and not _is_map_dataset(obj):
        obj = obj()
    if _is_map_dataset(obj) and not isinstance(obj, tuple):
        items = [obj[i] for i in range(len(obj))]
        if not items or not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise ValidationError(f"dataset {spec} must yield (x, y) pairs and not be empty")
        x = np.stack([_to_numpy(it[0]) for it in items])
        y = np.asarray([_to_numpy(it[1]) for it in items])
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = _to_numpy(obj[0]), _to_numpy(obj[1])
    else:
        raise ValidationError(f"dataset {spec} must be (x, y) arrays, a callable returning them, or a Dataset of "
                              f"(x, y) items; got {type(obj).__name__}")
    return make_dataset(x, y, spec)


def _is_map_dataset(obj: Any) -> bool:
    return hasattr(obj, "__getitem__") and hasattr(obj, "__len__") and not isinstance(obj, (np.ndarray, str))


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v)


# -------------------------------------------------------------- validation
def make_dataset(x: Any, y: Any, name: str) -> ArrayDataset:
    """Validate raw arrays and normalise them: images (N, C, H, W) in [0, 1], vectors (N, D), labels int64.

    Accepted ``x``: (N, D) vectors, (N, H, W) or (N, C, H, W) images; float (used as is) or uint8 (scaled by 1/255).
    """
    x, y = np.asarray(x), np.asarray(y)
    if y.ndim != 1:
        raise ValidationError(f"{name}: labels y must be a 1-D array (N,), got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValidationError(f"{name}: labels y must be integers, got dtype {y.dtype}; "
                              f"save them as integer class ids (e.g. y.astype(np.int64))")
    if x.ndim not in (2, 3, 4) or x.shape[0] == 0 or 0 in x.shape:
        raise ValidationError(f"{name}: x must be (N, D) vectors or (N, H, W) / (N, C, H, W) images, got shape "
                              f"{x.shape}")
    if len(x) != len(y):
        raise ValidationError(f"{name}: x has {len(x)} items but y has {len(y)} labels; they must match")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32)
    else:
        raise ValidationError(f"{name}: x must be float or uint8, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))[:10].tolist()
        raise ValidationError(f"{name}: x contains NaN or inf (items {bad}); only finite values are accepted")
    if x.ndim == 3:
        x = x[:, None]
    return ArrayDataset(np.ascontiguousarray(x), y.astype(np.int64), name)


def check_trainable(ds: ArrayDataset, what: str) -> None:
    """Training needs two classes and at least one class with two items (an anchor and a positive)."""
    classes, counts = np.unique(ds.y, return_counts=True)
    if len(classes) < 2:
        raise ValidationError(f"{what} ({ds.name}) has {len(classes)} class; contrastive training needs at least "
                              f"2 classes (negatives come from other classes)")
    if counts.max() < 2:
        raise ValidationError(f"{what} ({ds.name}) has no class with 2 or more items, so no positive pairs")


def check_evaluable(ds: ArrayDataset, what: str) -> None:
    """Leave-one-out retrieval needs a class with at least two items."""
    _, counts = np.unique(ds.y, return_counts=True)
    if len(ds) < 2 or counts.max() < 2:
        raise ValidationError(f"{what} ({ds.name}) has no class with 2 or more items; retrieval metrics need them")


# ------------------------------------------------------------------ splits
def split_heldout_classes(ds: ArrayDataset, eval_fraction: float) -> tuple[ArrayDataset, ArrayDataset]:
    """Train on the first classes (sorted), evaluate on the last ``eval_fraction`` of them (CUB/SOP protocol)."""
    classes = np.unique(ds.y)
    n_eval = int(round(len(classes) * eval_fraction))
    if len(classes) < 4 or not 2 <= n_eval <= len(classes) - 2:
        raise ValidationError(f"{ds.name}: protocol heldout-classes needs at least 2 classes on each side, got "
                              f"{len(classes)} classes and eval_class_fraction {eval_fraction}; "
                              f"use protocol heldout-samples or --eval-data")
    eval_classes = classes[len(classes) - n_eval:]
    in_eval = np.isin(ds.y, eval_classes)
    return ds.subset(np.flatnonzero(~in_eval), ds.name + " train"), ds.subset(np.flatnonzero(in_eval),
                                                                               ds.name + " eval")


def split_heldout_samples(ds: ArrayDataset, eval_fraction: float,
                          seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Same classes on both sides, disjoint samples, stratified by class and seeded."""
    from sklearn.model_selection import train_test_split

    try:
        tr, ev = train_test_split(np.arange(len(ds)), test_size=eval_fraction, random_state=seed, stratify=ds.y)
    except ValueError as e:
        raise ValidationError(f"{ds.name}: protocol heldout-samples cannot split stratified ({e}); every class "
                              f"needs 2 items or more, and eval_sample_fraction of the data at least one item "
                              f"per class") from None
    return ds.subset(np.sort(tr), ds.name + " train"), ds.subset(np.sort(ev), ds.name + " eval")

