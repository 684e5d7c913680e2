"""``hardneg`` subcommands that need no model start without torch or the trainer (``python -X importtime``).

The reference is the interpreter's own import log: every module imported, by name. ``train --help`` is the
control that shows the log would name the trainer when it is imported.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def imported(*args: str, cwd: Path) -> set[str]:
    """The modules ``hardneg ARGS`` imports, from ``-X importtime``'s log on stderr."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "hardneg.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # the first line is the header


def heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] == "torch" or m.startswith("hardneg.trainer")}


@pytest.mark.parametrize("args", [["index", "list", "--store", "store"], ["serve", "--help"], ["mine", "--help"],
                                  ["index", "build", "--help"]])
def test_commands_without_a_model_import_no_torch_and_no_trainer(args: list[str], tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    modules = imported(*args, cwd=tmp_path)
    assert "hardneg.cli" in modules or "hardneg" in modules
    assert heavy(modules) == set()


def test_the_import_log_names_the_trainer_when_it_is_imported(tmp_path: Path) -> None:
    modules = imported("train", "--help", cwd=tmp_path)
    assert "hardneg.trainer.cli" in modules and "hardneg.trainer.config" in modules
