"""``hardneg train --resume-if-exists``: the same command starts a run, continues it, or finds it finished.

This is what a supervisor (docker-compose's ``restart: on-failure``) relies on: it restarts the trainer with
the exact command it started it with. References: the run's own ``metrics.jsonl`` and snapshot store before
the repeated command, and the messages of the refusals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hardneg.cli import main
from hardneg.miner.store import SnapshotStore

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the test machine's cores are shared; results do not depend on it
RUN = ["train", "--run-dir", "run", "--store", "store", "--refresh-every", "1", "--seed", "3", "--resume-if-exists"]


def train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hardneg.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240, env=ENV)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch run started by the command itself (no run folder existed)."""
    cwd = tmp_path_factory.mktemp("resume_if_exists")
    proc = ok(train(cwd, *RUN, "--epochs", "2"))
    assert "resuming" not in proc.stderr
    assert [r["epoch"] for r in history(cwd / "run")] == [0, 1, 2]
    return cwd


def test_the_same_command_after_the_run_finished_changes_nothing(first_run: Path) -> None:
    store = SnapshotStore(first_run / "store")
    names, latest, before = store.names(), store.latest_name(), history(first_run / "run")
    proc = ok(train(first_run, *RUN, "--epochs", "2"))
    assert "resuming run after epoch 2 of 2" in proc.stderr
    assert store.names() == names and store.latest_name() == latest  # no snapshot published again
    assert history(first_run / "run") == before
    assert f"newest snapshot {latest} in store" in proc.stdout


def test_more_epochs_continue_the_run(first_run: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(first_run), str(cwd)], check=True)  # leave the fixture's run as it was
    before = history(cwd / "run")
    proc = ok(train(cwd, *RUN, "--epochs", "3"))
    assert "resuming run after epoch 2 of 3" in proc.stderr
    after = history(cwd / "run")
    assert [r["epoch"] for r in after] == [0, 1, 2, 3] and after[:3] == before
    store = SnapshotStore(cwd / "store")
    assert store.open().manifest["meta"]["epoch"] == 3  # the final snapshot holds the epoch-3 model


def test_a_changed_option_or_config_file_is_refused(first_run: Path, tmp_path: Path) -> None:
    proc = train(first_run, *RUN, "--epochs", "2", "--lr", "0.5")
    assert proc.returncode == 2 and "cannot change lr when resuming run" in proc.stderr, proc.stderr[-2000:]
    # a value from the TOML file counts as much as a flag: it is compared too, not ignored
    toml = tmp_path / "train.toml"
    toml.write_text("margin = 0.3\n")
    proc = train(first_run, *RUN, "--epochs", "2", "--config", str(toml))
    assert proc.returncode == 2 and "cannot change margin when resuming run" in proc.stderr, proc.stderr[-2000:]


def test_needs_a_run_dir_and_no_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # both are refused before torch is touched, so they can run in this process
    assert main(["train", "--store", str(tmp_path / "s"), "--resume-if-exists"]) == 2
    assert "--resume-if-exists needs --run-dir" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "--resume-if-exists"]) == 2
    assert "--resume-if-exists cannot be combined with --resume" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
