"""TrainConfig: defaults < TOML file < command-line flags; impossible values name the field and what it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from hardneg.cli import build_parser
from hardneg.miner.errors import ValidationError
from hardneg.trainer.cli import _given
from hardneg.trainer.config import TrainConfig


def from_cli(argv: list[str]) -> TrainConfig:
    """Parse ``hardneg train ARGV`` with the real parser and build the config the command would use."""
    args = build_parser().parse_args(["train", *argv])
    return TrainConfig.from_sources(getattr(args, "config", None), _given(args))


def test_cli_overrides_toml_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('epochs = 7\nlr = 0.01\nloss = "contrastive"\nrefresh-every = 3\nglobal_batches = "tuples"\n'
                 'positive_aware = 0.9\n')  # the triplet miner's guard: global mining on mined tuples
    c = from_cli(["--config", str(f), "--epochs", "5", "--margin", "0.4"])
    assert c.epochs == 5  # flag beats file
    assert c.lr == 0.01 and c.loss == "contrastive" and c.refresh_every == 3 and c.positive_aware == 0.9  # file
    assert c.margin == 0.4  # flag
    assert c.batch_size == TrainConfig().batch_size and c.data == "digits"  # defaults


def test_a_train_table_and_plain_defaults(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('[train]\nmining = "in-batch"\nstrategy = "batch-hard"\n')
    c = from_cli(["--config", str(f)])
    assert c.mining == "in-batch" and c.resolved_strategy == "batch-hard"
    assert from_cli([]) == TrainConfig()
    assert TrainConfig().resolved_strategy == "semihard"


@pytest.mark.parametrize("toml, message", [
    ("epochs = 0", "epochs must be an integer >= 1, got 0"),
    ("epochs = 2.5", "epochs must be an integer, got 2.5"),
    ("lr = -0.1", "lr must be a number > 0"),
    ('margin = "big"', "margin must be a number, got 'big'"),
    ('protocol = "random-split"', "protocol must be one of heldout-classes, heldout-samples, got 'random-split'"),
    ('strategy = "batch-hard"', "strategy must be one of hardest, semihard, window, distance-weighted with mining "
                                "'global', got 'batch-hard'"),
    ('mining = "random"\nstrategy = "hardest"', "strategy 'hardest' has no meaning with mining 'random'"),
    ("eval_sample_fraction = 1.0", "eval_sample_fraction must lie strictly between 0 and 1"),
    ("positive_aware = 1.5", r"positive_aware must lie in \(0, 1\]"),
    ("warmup_epochs = 3\nepochs = 3", r"warmup_epochs \(3\) must be below epochs \(3\)"),
    ("learning_rate = 0.1", "unknown option 'learning_rate' in .*bad.toml; accepted: .*lr"),
    ("epochs = ", "is not valid TOML"),
])
def test_impossible_values_name_the_field(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml + "\n")
    with pytest.raises(ValidationError, match=message):
        from_cli(["--config", str(f)])


def test_flags_are_validated_too() -> None:
    with pytest.raises(ValidationError, match="batch_size must be an integer >= 1, got 0"):
        from_cli(["--batch-size", "0"])
    with pytest.raises(ValidationError, match="does not exist"):
        from_cli(["--config", "/nonexistent/run.toml"])


def test_refresh_schedule() -> None:
    c = TrainConfig(warmup_epochs=1, refresh_every=2, epochs=7)
    assert [e for e in range(1, 8) if c.is_refresh_epoch(e)] == [2, 4, 6]
    c = TrainConfig(warmup_epochs=0, refresh_every=3, epochs=7)
    assert [e for e in range(1, 8) if c.is_refresh_epoch(e)] == [1, 4, 7]


def test_round_trip_through_a_dict() -> None:
    c = TrainConfig(epochs=4, global_batches="tuples", near_duplicate=0.01, model=None)
    assert TrainConfig.from_dict(c.to_dict()) == c
