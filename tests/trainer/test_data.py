"""Every data source loads with the right shapes, values and labels; bad data is refused before training."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits as sk_digits

from hardneg.miner.errors import ValidationError
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import load_source, load_splits
from hardneg.trainer.models import build_model


def cfg(**kw) -> TrainConfig:
    return TrainConfig.from_dict(kw)


# ------------------------------------------------------------------ digits
def test_digits_are_scaled_images_with_their_labels() -> None:
    ds = load_source("digits", cfg())
    ref = sk_digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32
    np.testing.assert_array_equal(ds.x[:, 0], (ref.images / 16.0).astype(np.float32))
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    np.testing.assert_array_equal(ds.y, ref.target)


def test_heldout_classes_trains_on_the_first_half_and_evaluates_on_unseen_classes() -> None:
    s = load_splits(cfg(protocol="heldout-classes"))
    assert set(s.train.y.tolist()) == {0, 1, 2, 3, 4}
    assert set(s.eval.y.tolist()) == {5, 6, 7, 8, 9}
    assert len(s.train) + len(s.eval) == 1797
    assert s.train.x.shape[1:] == (1, 8, 8)


def test_heldout_samples_is_stratified_disjoint_and_seeded() -> None:
    a = load_splits(cfg(protocol="heldout-samples", eval_sample_fraction=0.25, seed=3))
    b = load_splits(cfg(protocol="heldout-samples", eval_sample_fraction=0.25, seed=3))
    c = load_splits(cfg(protocol="heldout-samples", eval_sample_fraction=0.25, seed=4))
    full = sk_digits()
    rows = {x.tobytes(): i for i, x in enumerate((full.images / 16.0).astype(np.float32))}
    train_rows = {rows[x[0].tobytes()] for x in a.train.x}
    eval_rows = {rows[x[0].tobytes()] for x in a.eval.x}
    assert not train_rows & eval_rows
    for label in range(10):
        n_class = int((full.target == label).sum())
        assert abs(int((a.eval.y == label).sum()) - 0.25 * n_class) <= 1  # stratified
    np.testing.assert_array_equal(a.eval.x, b.eval.x)
    assert not np.array_equal(a.eval.x, c.eval.x)


# -------------------------------------------------------------------- npz
def test_npz_images_and_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.random((6, 5, 4)).astype(np.float32)
    np.savez(tmp_path / "gray.npz", x=gray, y=np.array([0, 0, 1, 1, 2, 2]))
    ds = load_source(f"npz:{tmp_path / 'gray.npz'}", cfg())
    assert ds.x.shape == (6, 1, 5, 4)
    np.testing.assert_array_equal(ds.x[:, 0], gray)

    rgb = rng.integers(0, 256, size=(4, 3, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=rgb, y=np.array([1, 2, 1, 2]))
    ds = load_source(f"npz:{tmp_path / 'rgb.npz'}", cfg())
    assert ds.x.shape == (4, 3, 6, 6)
    np.testing.assert_allclose(ds.x, rgb / 255.0, atol=1e-7)  # uint8 scaled to [0, 1]

    vec = rng.normal(size=(5, 7))
    np.savez(tmp_path / "vec.npz", x=vec, y=np.array([0, 1, 0, 1, 0]))
    ds = load_source(f"npz:{tmp_path / 'vec.npz'}", cfg())
    assert ds.x.shape == (5, 7) and ds.y.tolist() == [0, 1, 0, 1, 0]


def test_separate_eval_npz_is_used_whole(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "tr.npz", x=rng.normal(size=(8, 3)), y=np.repeat([0, 1, 2, 3], 2))
    np.savez(tmp_path / "ev.npz", x=rng.normal(size=(4, 3)), y=np.array([7, 7, 8, 8]))
    s = load_splits(cfg(data=f"npz:{tmp_path / 'tr.npz'}", eval_data=f"npz:{tmp_path / 'ev.npz'}"))
    assert len(s.train) == 8 and s.eval.y.tolist() == [7, 7, 8, 8]
    np.savez(tmp_path / "ev_bad.npz", x=rng.normal(size=(4, 5)), y=np.array([7, 7, 8, 8]))
    with pytest.raises(ValidationError, match=r"eval data items have shape \(5,\) but training items have \(3,\)"):
        load_splits(cfg(data=f"npz:{tmp_path / 'tr.npz'}", eval_data=f"npz:{tmp_path / 'ev_bad.npz'}"))


# ----------------------------------------------------------------- folder
def write_folder(root: Path) -> None:
    """Two classes: 'cats' (2 uniform images of gray 200) and 'dogs' (3 images: red, green, blue), 10x12."""
    for name, colours in {"cats": [(200, 200, 200)] * 2, "dogs": [(255, 0, 0), (0, 255, 0), (0, 0, 255)]}.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (12, 10), colour).save(root / name / f"{i}.png")
    (root / "dogs" / "notes.txt").write_text("not an image, ignored")


def test_image_folder_grayscale_and_rgb(tmp_path: Path) -> None:
    write_folder(tmp_path / "imgs")
    ds = load_source(f"folder:{tmp_path / 'imgs'}", cfg(image_size=8, image_mode="L"))
    assert ds.x.shape == (5, 1, 8, 8)
    assert ds.y.tolist() == [0, 0, 1, 1, 1]  # sorted folder names: cats=0, dogs=1
    np.testing.assert_allclose(ds.x[0], 200 / 255, atol=1e-6)
    ds = load_source(f"folder:{tmp_path / 'imgs'}", cfg(image_size=6, image_mode="RGB"))
    assert ds.x.shape == (5, 3, 6, 6)
    np.testing.assert_allclose(ds.x[2].mean(axis=(1, 2)), [1.0, 0.0, 0.0], atol=1e-6)  # red, channel first


# ------------------------------------------------------------ module:attr
MODULE = textwrap.dedent('''
    import numpy as np
    import torch
    from torch import nn

    def make_arrays():
        return np.arange(24, dtype=np.float32).reshape(6, 4), np.array([0, 0, 1, 1, 2, 2])

    PAIR = (np.ones((4, 2)), np.array([5, 5, 6, 6]))

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, i):
            return torch.full((1, 3, 3), float(i)), i % 2

    ITEMS = Items()

    def tiny_model(input_shape, embedding_dim):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), embedding_dim))

    def fixed_model():
        return nn.Sequential(nn.Flatten(), nn.Linear(9, 5))
''')


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "hn_user_data.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "hn_user_data"
    sys.modules.pop("hn_user_data", None)


def test_module_sources(user_module: str) -> None:
    ds = load_source(f"{user_module}:make_arrays", cfg())
    assert ds.x.shape == (6, 4) and ds.y.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(ds.x[1], [4, 5, 6, 7])
    assert load_source(f"{user_module}:PAIR", cfg()).y.tolist() == [5, 5, 6, 6]
    ds = load_source(f"{user_module}:ITEMS", cfg())
    assert ds.x.shape == (4, 1, 3, 3) and ds.y.tolist() == [0, 1, 0, 1]
    np.testing.assert_array_equal(ds.x[:, 0, 0, 0], [0, 1, 2, 3])


def test_user_model_factory(user_module: str) -> None:
    model, spec = build_model(cfg(model=f"{user_module}:tiny_model", embedding_dim=6), (1, 3, 3))
    assert spec["class"] == "torch.nn.modules.container.Sequential"
    assert spec["input_shape"] == [1, 3, 3] and spec["embedding_dim"] == 6
    out = model(torch.randn(4, 1, 3, 3))
    np.testing.assert_allclose(out.norm(dim=1).detach().numpy(), 1.0, atol=1e-6)  # normalised by hardneg
    _, spec = build_model(cfg(model=f"{user_module}:fixed_model", embedding_dim=64), (1, 3, 3))
    assert spec["embedding_dim"] == 5  # the model's own output size wins
    with pytest.raises(ValidationError, match=r"cannot embed items of shape \(2, 3, 3\)"):
        build_model(cfg(model=f"{user_module}:fixed_model"), (2, 3, 3))


# --------------------------------------------------------------- bad data
def npz(tmp_path: Path, name: str, **arrays) -> str:
    np.savez(tmp_path / name, **arrays)
    return f"npz:{tmp_path / name}"


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((5, 3)), "y": np.array([0, 1, 0, 1])}, "x has 5 items but y has 4 labels"),
    ({"x": np.zeros((4, 3)), "y": np.array([0.5, 1, 0, 1])}, "labels y must be integers, got dtype float64"),
    ({"x": np.zeros((4, 3)), "y": np.array(["a", "b", "a", "b"])}, "labels y must be integers"),
    ({"x": np.array([[0, 1.0], [np.nan, 1], [0, 1], [2, 2]]), "y": np.array([0, 1, 0, 1])},
     r"x contains NaN or inf \(items \[1\]\)"),
    ({"x": np.zeros((4, 3)), "y": np.array([2, 2, 2, 2])}, "has 1 class; contrastive training needs at least 2"),
    ({"x": np.zeros((3, 3)), "y": np.array([0, 1, 2])}, "heldout-samples cannot split stratified"),
    ({"x": np.zeros((4, 2, 2, 2, 2)), "y": np.arange(4)}, r"x must be \(N, D\) vectors or"),
    ({"y": np.arange(4)}, r"lacks array\(s\) \['x'\]"),
])
def test_bad_npz_is_refused(tmp_path: Path, arrays: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        load_splits(cfg(data=npz(tmp_path, "bad.npz", **arrays)))


def test_one_class_after_a_split_is_refused(tmp_path: Path) -> None:
    train = npz(tmp_path, "tr.npz", x=np.zeros((4, 3)), y=np.array([1, 1, 1, 1]))
    ev = npz(tmp_path, "ev.npz", x=np.zeros((4, 3)), y=np.array([0, 1, 0, 1]))
    with pytest.raises(ValidationError, match="training data .* has 1 class"):
        load_splits(cfg(data=train, eval_data=ev))
    with pytest.raises(ValidationError, match="heldout-classes needs at least 2 classes on each side"):
        load_splits(cfg(data=ev, protocol="heldout-classes"))


def test_bad_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="has no class sub-folders"):
        load_source(f"folder:{tmp_path / 'empty'}", cfg())
    (tmp_path / "half" / "a").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / "half" / "a" / "0.png")
    (tmp_path / "half" / "b").mkdir()
    with pytest.raises(ValidationError, match="class folder .*b holds no images"):
        load_source(f"folder:{tmp_path / 'half'}", cfg())
    (tmp_path / "half" / "b" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValidationError, match="0.png cannot be read"):
        load_source(f"folder:{tmp_path / 'half'}", cfg())
    with pytest.raises(ValidationError, match="does not exist"):
        load_source(f"folder:{tmp_path / 'nowhere'}", cfg())


def test_bad_source_names_are_refused(user_module: str) -> None:
    with pytest.raises(ValidationError, match="accepted: digits, npz:PATH, folder:PATH or module:attr"):
        load_source("mnist", cfg())
    with pytest.raises(ValidationError, match="cannot import module 'no_such_module_hn'"):
        load_source("no_such_module_hn:data", cfg())
    with pytest.raises(ValidationError, match="has no attribute 'missing'"):
        load_source(f"{user_module}:missing", cfg())
    with pytest.raises(ValidationError, match="npz file .* does not exist"):
        load_source("npz:/nonexistent/file.npz", cfg())
