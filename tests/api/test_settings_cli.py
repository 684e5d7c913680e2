"""Settings come from HARDNEG_* variables, `hardneg serve` flags override them, and threads fit the cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hardneg.api.cli import settings_from_args
from hardneg.api.main import create_app
from hardneg.api.settings import Settings, available_cores
from hardneg.cli import build_parser
from hardneg.miner.errors import ValidationError


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private copy of the environment without HARDNEG_* variables (the CLI writes into it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARDNEG_")}
    monkeypatch.setattr(os, "environ", env)
    return env


def test_flags_override_environment(environ: dict[str, str], tmp_path: Path) -> None:
    environ.update(HARDNEG_MAX_K="7", HARDNEG_POLL_SECONDS="0.5", HARDNEG_STORE="/somewhere/else",
                   HARDNEG_API_KEY="k1")
    args = build_parser().parse_args(["serve", "--store", str(tmp_path), "--max-k", "9", "--lanes", "3",
                                      "--no-access-log"])
    s = settings_from_args(args)
    assert (s.store, s.max_k, s.search_lanes, s.access_log) == (tmp_path, 9, 3, False)  # flags win
    assert s.poll_seconds == 0.5 and s.api_key.get_secret_value() == "k1"  # the rest still from the environment
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_bad_settings_name_the_variable(environ: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="no snapshot store: pass --store DIR or set HARDNEG_STORE"):
        settings_from_args(build_parser().parse_args(["serve"]))
    with pytest.raises(ValidationError, match="HARDNEG_MAX_K: Input should be greater than or equal to 1"):
        settings_from_args(build_parser().parse_args(["serve", "--store", str(tmp_path), "--max-k", "0"]))
    environ.clear()  # the flags above were written into it
    with pytest.raises(ValidationError, match="set HARDNEG_STORE or pass --store"):
        create_app(Settings())


def test_lanes_times_threads_fit_the_cores(environ: dict[str, str]) -> None:
    cores = available_cores()
    assert Settings(search_lanes=1).faiss_threads == cores
    assert Settings(search_lanes=cores).faiss_threads == 1
    assert Settings(search_lanes=cores * 4).faiss_threads == 1  # never zero
    assert Settings(search_lanes=1, workers=cores).faiss_threads == 1
    assert Settings(search_lanes=2, omp_threads=5).faiss_threads == 5  # explicit wins
    assert Settings().search_lanes == cores


def test_empty_api_key_means_no_key(environ: dict[str, str]) -> None:
    environ["HARDNEG_API_KEY"] = ""
    assert Settings().api_key is None
    environ["HARDNEG_API_KEY"] = "secret"
    assert Settings().api_key.get_secret_value() == "secret"
