"""Checkpoints written by the first release (format 1: a flat config, the mode's state in ``mined``,
``class_neighbours`` or ``ssl_negatives``) resume, and the resumed run equals that release's uninterrupted run.

``data/first_release`` holds, per mode, the ``last.pt`` of a run that release stopped after 2 of 3 epochs, the
data it trained on (small ``.npz`` files, named by relative paths in its config), and ``expected.json``: the
per-epoch metrics of the same command run for all 3 epochs by that release.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hardneg.miner.errors import ValidationError
from hardneg.trainer.checkpoint import load_checkpoint
from hardneg.trainer.loop import Trainer

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data" / "first_release"


@pytest.mark.parametrize("recipe", ["mined-tuples", "class-batches", "simclr"])
def test_a_first_release_checkpoint_resumes_to_that_releases_results(recipe: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(DATA, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)  # the stored config names its data and store by relative paths
    run_dir = Path(f"{recipe}-run")
    assert torch.load(run_dir / "last.pt", weights_only=True)["format"] == 1
    trainer = Trainer.resume(run_dir, {"epochs": 3})
    assert trainer.cfg.recipe.name == recipe
    trainer.run()
    keys = ("epoch", "step", "loss", "metrics", "train", "mining")
    got = [{k: r[k] for k in keys} for r in trainer.state.history]
    expected = json.loads((DATA / "expected.json").read_text())[recipe]
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert load_checkpoint(run_dir / "last.pt")["format"] == 2  # saved again in the current format


def test_an_unknown_checkpoint_format_is_refused_with_the_formats_read(tmp_path: Path) -> None:
    state = torch.load(DATA / "mined-tuples-run" / "last.pt", weights_only=True)
    torch.save({**state, "format": 7}, tmp_path / "last.pt")
    with pytest.raises(ValidationError, match="has format 7; this hardneg reads formats 1, 2"):
        load_checkpoint(tmp_path / "last.pt")
