"""model.pt2: a torch.export program of the embedding model, loaded and run without the model's class."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hardneg.miner.errors import SnapshotError, ValidationError
from hardneg.miner.model_io import export_model, load_model

INPUT_SHAPE = (1, 8, 8)


class TinyEmbedder(torch.nn.Module):
    """conv -> batch norm -> ReLU -> dropout -> linear -> L2 normalise: (n, 1, 8, 8) -> (n, 6).

    Batch norm and dropout behave differently in train and eval mode, so matching the eager module in eval mode
    shows the program was exported in eval mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4 * 8 * 8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.conv(x))).flatten(1))
        return torch.nn.functional.normalize(self.fc(h), dim=1)


class DataDependent(torch.nn.Module):
    """Branches on tensor values, which torch.export cannot capture."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyEmbedder()
    with torch.no_grad():  # non-trivial running statistics, so eval-mode batch norm is not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    assert model.training
    path = tmp_path_factory.mktemp("model") / "model.pt2"
    assert export_model(model, INPUT_SHAPE, path) is True
    assert model.training, "export must restore the module's mode"
    return model, path


@pytest.mark.parametrize(("n", "batch_size"), [(1, 1024), (2, 1024), (3, 1024), (64, 1024), (11, 5)])
def test_loaded_program_embeds_like_the_eager_module(exported, n, batch_size):
    model, path = exported
    program = load_model(path, INPUT_SHAPE)
    x = np.random.default_rng(n).normal(size=(n, *INPUT_SHAPE)).astype(np.float32)
    got = program.embed(x, batch_size=batch_size)
    model.eval()
    try:
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
    finally:
        model.train()
    assert got.shape == (n, 6) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_train_mode_would_differ(exported):
    """Guard for the test above: in train mode this module gives other embeddings, so matching eval is informative."""
    model, path = exported
    x = np.random.default_rng(5).normal(size=(8, *INPUT_SHAPE)).astype(np.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        train_out = model(torch.from_numpy(x)).numpy()
    assert not np.allclose(load_model(path, INPUT_SHAPE).embed(x), train_out, atol=1e-3)


@pytest.mark.parametrize("shape", [(3, 1, 8, 7), (3, 8, 8), (1, 8, 8), (3, 2, 8, 8), (4, 64)])
def test_wrong_input_shape_is_refused(exported, shape):
    program = load_model(exported[1], INPUT_SHAPE)
    with pytest.raises(ValidationError, match=rf"inputs must have shape \(n, 1, 8, 8\), got \({shape[0]}, "):
        program.embed(np.zeros(shape, np.float32))


def test_empty_batch_is_refused(exported):
    program = load_model(exported[1], INPUT_SHAPE)
    with pytest.raises(ValidationError, match="at least one item"):
        program.embed(np.zeros((0, *INPUT_SHAPE), np.float32))


def test_non_finite_input_is_refused(exported):
    program = load_model(exported[1], INPUT_SHAPE)
    x = np.zeros((2, *INPUT_SHAPE), np.float32)
    x[1, 0, 3, 3] = np.inf
    with pytest.raises(ValidationError, match="inputs contain NaN or inf; only finite values are accepted"):
        program.embed(x)


def test_unexportable_model_returns_false_and_writes_nothing(tmp_path, caplog):
    path = tmp_path / "model.pt2"
    with caplog.at_level(logging.WARNING, logger="hardneg.miner.model_io"):
        assert export_model(DataDependent(), INPUT_SHAPE, path) is False
    assert not path.exists()
    assert "DataDependent cannot be exported with torch.export" in caplog.text


def test_corrupt_program_is_refused(exported, tmp_path):
    blob = bytearray(exported[1].read_bytes())
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(SnapshotError, match=r"model.pt2 is not a valid export archive"):
        load_model(broken, INPUT_SHAPE)
