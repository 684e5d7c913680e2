"""Built-in models (shapes, unit norm, torch.export round trip) and weights-only checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hardneg.miner.errors import ValidationError
from hardneg.miner.model_io import export_model, load_model
from hardneg.trainer.checkpoint import load_checkpoint, save_checkpoint
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.models import EmbeddingCNN, EmbeddingMLP, build_model, build_model_from_spec


@pytest.mark.parametrize("shape, cls", [((1, 8, 8), EmbeddingCNN), ((3, 20, 14), EmbeddingCNN), ((10,), EmbeddingMLP)])
def test_model_follows_the_data_shape_and_normalises(shape: tuple, cls: type) -> None:
    torch.manual_seed(0)
    model, spec = build_model(TrainConfig(embedding_dim=12), shape)
    assert isinstance(model, cls)
    assert spec == {"class": f"hardneg.trainer.models.{cls.__name__}", "config": model.config,
                    "input_shape": list(shape), "embedding_dim": 12}
    out = model(torch.rand(5, *shape))
    assert out.shape == (5, 12)
    np.testing.assert_allclose(out.norm(dim=1).detach().numpy(), 1.0, atol=1e-6)
    rebuilt = build_model_from_spec(spec)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(3, *shape)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_no_builtin_model_for_other_shapes() -> None:
    with pytest.raises(ValidationError, match=r"items of shape \(2, 3\) have no built-in model"):
        build_model(TrainConfig(), (2, 3))


def test_exported_model_embeds_like_the_module(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model, spec = build_model(TrainConfig(), (1, 8, 8))
    assert export_model(model, spec["input_shape"], tmp_path / "model.pt2")
    x = np.random.default_rng(0).random((7, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(load_model(tmp_path / "model.pt2", spec["input_shape"]).embed(x), want, atol=1e-5)


def minimal_state(**extra) -> dict:
    return {"config": TrainConfig().to_dict(), "model_spec": {"class": "x"}, "epoch": 2, "step": 10,
            "model": {"w": torch.arange(3.0)}, "history": [{"epoch": 0, "metrics": {"map_at_r": 0.5}}], **extra}


def test_checkpoint_round_trip_leaves_no_temp_files(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "last.pt", minimal_state())
    save_checkpoint(tmp_path / "last.pt", minimal_state(epoch=3))  # replaced atomically
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 3 and state["history"][0]["metrics"]["map_at_r"] == 0.5
    torch.testing.assert_close(state["model"]["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Payload:  # an arbitrary object: a weights-only load must refuse to rebuild it
    pass


def test_checkpoint_with_objects_is_refused(tmp_path: Path) -> None:
    torch.save({"format": 1, **minimal_state(), "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValidationError, match="cannot be loaded as a hardneg checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"format": 1, "epoch": 1}, tmp_path / "partial.pt")
    with pytest.raises(ValidationError, match="lacks required entries"):
        load_checkpoint(tmp_path / "partial.pt")
    with pytest.raises(ValidationError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
