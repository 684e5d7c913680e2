"""Every mining mode trains exactly as recorded: small seeded runs compared bit for bit with stored metrics.

``data/golden_metrics.json`` holds, per mode, what each epoch of a 3-epoch run on the built-in digits
produced (steps, loss, retrieval metrics, training counts and mining statistics), recorded from the
trainer's code before its structure last changed. A refactoring that keeps the arithmetic must reproduce
them exactly; a change that means to alter training re-records them (``python
tests/trainer/test_golden_metrics.py``) and says why in its commit.

The runs use the flag spellings of the first release, so the comparison also checks that they keep working.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "data" / "golden_metrics.json"
COMMON = ["--epochs", "3", "--refresh-every", "1", "--seed", "3", "--batch-size", "96"]
MODES: dict[str, list[str]] = {
    "global-classes": ["--mining", "global"],
    "global-classes-batch-hard": ["--mining", "global", "--inbatch-strategy", "batch-hard", "--per-class", "6"],
    "global-tuples-hardest": ["--mining", "global", "--global-batches", "tuples", "--strategy", "hardest"],
    "global-tuples-semihard": ["--mining", "global", "--global-batches", "tuples", "--strategy", "semihard",
                               "--positive", "hardest"],
    "global-tuples-window": ["--mining", "global", "--global-batches", "tuples", "--strategy", "window",
                             "--window-skip", "2", "--window-width", "8"],
    "global-tuples-distance-weighted": ["--mining", "global", "--global-batches", "tuples", "--strategy",
                                        "distance-weighted", "--per-anchor", "2"],
    "global-tuples-contrastive": ["--mining", "global", "--global-batches", "tuples", "--loss", "contrastive",
                                  "--near-duplicate", "0.01"],
    "global-tuples-mix": ["--mining", "global", "--global-batches", "tuples", "--inbatch-mix", "0.5",
                          "--positive-aware", "0.95"],
    "global-tuples-warmup-random": ["--mining", "global", "--global-batches", "tuples", "--warmup", "random"],
    "in-batch-pk": ["--mining", "in-batch"],
    "in-batch-random-batch-hard": ["--mining", "in-batch", "--batching", "random", "--strategy", "batch-hard"],
    "in-batch-contrastive": ["--mining", "in-batch", "--loss", "contrastive"],
    "random": ["--mining", "random"],
    "random-contrastive": ["--mining", "random", "--loss", "contrastive"],
    "self-supervised-mined": ["--mode", "self-supervised", "--ssl-per-anchor", "2", "--ssl-skip", "32"],
    "self-supervised-in-batch": ["--mode", "self-supervised", "--ssl-negatives", "in-batch"],
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def record_of(run_dir: Path) -> list[dict]:
    """Per epoch what training determines (not the clock, not snapshot names)."""
    keep = ("epoch", "step", "loss", "metrics", "train", "mining")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in keep} for line in lines]


# One process trains every mode in turn (``hardneg.cli.main``), so the interpreter and torch start once.
_SCRIPT = """
import json, sys
from hardneg.cli import main
common, work, modes = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
for mode, args in modes.items():
    code = main(["train", *common, *args, "--run-dir", f"{work}/{mode}", "--store", f"{work}/{mode}-store"])
    if code:
        sys.exit(f"{mode}: exit {code}")
"""


def train_all(modes: dict[str, list[str]], work: Path) -> dict[str, list[dict]]:
    """Train each mode with ``COMMON`` options; returns each run's :func:`record_of`."""
    cmd = [sys.executable, "-c", _SCRIPT, json.dumps(COMMON), str(work), json.dumps(modes)]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return {mode: record_of(work / mode) for mode in modes}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    return train_all(MODES, tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_metrics_match_the_recorded_ones_bit_for_bit(mode: str, runs: dict[str, list[dict]]) -> None:
    expected = json.loads(FIXTURE.read_text())[mode]
    got = runs[mode]
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        # through JSON text: floats compare by their exact repr, NaN equals NaN
        assert json.dumps(g, sort_keys=True) == json.dumps(e, sort_keys=True), f"{mode}, epoch {e['epoch']}"


if __name__ == "__main__":  # re-record: python tests/trainer/test_golden_metrics.py
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = train_all(MODES, Path(tmp))
    FIXTURE.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(out)} modes in {FIXTURE}")
