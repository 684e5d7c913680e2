"""docker-compose.yml itself: accepted by ``docker-compose config``, the shape the README describes,
defaults that agree with ``hardneg train`` / ``hardneg serve`` and ``.env.example``, and the tests' compose
interpolation checked against docker-compose's own.

``docker-compose`` (Debian's package, 1.29) needs no Docker engine for ``config``. Where it is not on PATH
its tests skip, unless ``HARDNEG_REQUIRE_COMPOSE=1`` (``.ci/run`` sets it after installing the package),
so that CI can never skip them silently.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_support import (COMPOSE_FILE, REPO, InterpolationError, compose_variables, interpolate, load_compose)

from hardneg.api.settings import Settings
from hardneg.trainer.config import TrainConfig

ENV_EXAMPLE = REPO / ".env.example"
DOCKER_COMPOSE = shutil.which("docker-compose")
# Every variable set, none to its default (the port as a range, as the README suggests for replicas).
_VALID = {"HARDNEG_PORT": "8000-8002", "HARDNEG_BIND": "0.0.0.0"}  # values docker compose parses itself
OVERRIDES = {name: _VALID.get(name, f"x-{name.lower()}")
             for name in compose_variables(yaml.safe_load(COMPOSE_FILE.read_text()))}


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


# ---------------------------------------------------------------- the shape
@pytest.fixture(scope="module")
def services() -> dict:
    return load_compose({})[0]


def test_two_services_from_one_image_sharing_the_store_volume(services: dict) -> None:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "version" not in doc  # the compose specification; docker-compose 1.29 needs no version either
    assert set(services) == {"trainer", "api"}
    trainer, api = services["trainer"], services["api"]
    for s in (trainer, api):
        assert s.raw["image"] == "hardneg:latest" and s.raw["build"] == "."
    assert trainer.command[0] == "train" and api.command[0] == "serve"
    # the trainer writes the store the api reads: one named volume, mounted where each --store points
    (t_store,) = [m for m in trainer.mounts if m.target == flag_value(trainer.command, "--store")]
    (a_store,) = [m for m in api.mounts if m.target == flag_value(api.command, "--store")]
    assert t_store.volume == a_store.volume and t_store.volume in doc["volumes"]
    assert not t_store.read_only and a_store.read_only
    assert api.mounts == [a_store]  # the api sees nothing it could write, and not the trainer's checkpoints
    # the run folder is on a volume too, so a restarted trainer container finds last.pt
    run_dir = flag_value(trainer.command, "--run-dir")
    assert any(run_dir.startswith(m.target + "/") and m.volume in doc["volumes"] for m in trainer.mounts)
    assert "--resume-if-exists" in trainer.command


def test_api_publishes_its_port_and_is_checked_on_readyz(services: dict) -> None:
    api = services["api"]
    port = int(flag_value(api.command, "--port"))
    assert flag_value(api.command, "--host") == "0.0.0.0"  # reachable through the published port
    assert api.ports == [("127.0.0.1:8000", port)] and services["trainer"].ports == []  # this host only by default
    check = api.healthcheck
    assert check["test"][:3] == ["CMD", "python", "-c"]
    assert re.search(rf"urlopen\('http://127\.0\.0\.1:{port}/readyz'", check["test"][3])
    assert {"interval", "timeout", "retries", "start_period"} <= set(check)


def test_one_store_key_for_both_services(services: dict) -> None:
    """The trainer signs with the key the api verifies with: one variable, passed to both."""
    assert services["trainer"].environment["HARDNEG_STORE_KEY"] == services["api"].environment["HARDNEG_STORE_KEY"] == ""
    set_key = load_compose({"HARDNEG_STORE_KEY": "k"})[0]
    assert set_key["trainer"].environment["HARDNEG_STORE_KEY"] == set_key["api"].environment["HARDNEG_STORE_KEY"] == "k"


def test_restart_policies(services: dict) -> None:
    # a finished trainer (exit 0) must stay stopped, so never "always"/"unless-stopped" for it
    assert re.fullmatch(r"on-failure(:\d+)?", services["trainer"].restart)
    assert services["api"].restart in ("on-failure", "unless-stopped", "always")


# ------------------------------------------------------------ the defaults
def test_trainer_defaults_are_hardneg_trains_own(services: dict) -> None:
    """The trainer's command with every variable at its default gives ``hardneg train``'s default config."""
    from hardneg.cli import build_parser
    from hardneg.trainer.cli import _given

    command = list(services["trainer"].command)
    flags = [a for a in command if a.startswith("--") and a not in ("--store", "--run-dir", "--resume-if-exists")]
    assert len(flags) >= 8
    for flag in ("--store", "--run-dir"):
        del command[command.index(flag):command.index(flag) + 2]
    command.remove("--resume-if-exists")
    given = _given(build_parser(command).parse_args(command))
    assert set(given) == {flag[2:].replace("-", "_") for flag in flags}
    assert TrainConfig.from_sources(None, given) == TrainConfig()


def test_api_defaults_are_hardneg_serves_own(services: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("HARDNEG_")]:
        monkeypatch.delenv(name)
    env = services["api"].environment
    assert env and all(name.startswith("HARDNEG_") for name in env)
    from_compose = Settings(**{name.removeprefix("HARDNEG_").lower(): value for name, value in env.items()})
    assert from_compose == Settings()


def test_env_example_lists_every_variable_with_its_default_and_a_comment() -> None:
    wanted = compose_variables(yaml.safe_load(COMPOSE_FILE.read_text()))
    lines = ENV_EXAMPLE.read_text().splitlines()
    listed = {}
    for i, line in enumerate(lines):
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            assert name not in listed, f"{name} twice"
            assert lines[i - 1].startswith("# ") and len(lines[i - 1]) > 10, f"{name} has no comment above it"
            listed[name] = value
    assert listed == {name: default or "" for name, default in wanted.items()}


# ----------------------------------------------------------- interpolation
@pytest.mark.parametrize("text, variables, expected", [
    ("${A:-d}", {}, "d"),
    ("${A:-d}", {"A": ""}, "d"),
    ("${A:-d}", {"A": "v"}, "v"),
    ("${A-d}", {"A": ""}, ""),
    ("${A-d}", {}, "d"),
    ("/data/runs/${A:-compose}/x", {}, "/data/runs/compose/x"),
    ("$A/$$A/${A}", {"A": "v"}, "v/$A/v"),
    ("${A}", {}, ""),
    ("${A:?needed}", {"A": "v"}, "v"),
])
def test_interpolation(text: str, variables: dict, expected: str) -> None:
    assert interpolate(text, variables) == expected


@pytest.mark.parametrize("text, variables", [("${A:?needed}", {}), ("${A:?needed}", {"A": ""}), ("${A:+x}", {}),
                                             ("cost $5", {})])
def test_interpolation_refuses(text: str, variables: dict) -> None:
    with pytest.raises(InterpolationError):
        interpolate(text, variables)


# ----------------------------------------------------------- docker-compose
def docker_compose_config(compose_file: Path, variables: dict[str, str], tmp_path: Path) -> dict:
    """``docker-compose config`` of ``compose_file`` with exactly ``variables`` (no shell or .env leaks in)."""
    if DOCKER_COMPOSE is None:
        if os.environ.get("HARDNEG_REQUIRE_COMPOSE") == "1":
            pytest.fail("HARDNEG_REQUIRE_COMPOSE=1 but docker-compose is not on PATH")
        pytest.skip("docker-compose is not on PATH (apt-get install docker-compose; .ci/run installs it)")
    empty = tmp_path / "empty.env"
    empty.touch()
    proc = subprocess.run([DOCKER_COMPOSE, "--env-file", str(empty), "-f", str(compose_file), "config"],
                          cwd=tmp_path, env={"PATH": os.environ["PATH"], **variables}, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return unescape(yaml.safe_load(proc.stdout))


def unescape(node: Any) -> Any:
    """docker-compose writes a literal ``$`` as ``$$`` in its output, so that the output is a compose file too."""
    if isinstance(node, str):
        return node.replace("$$", "$")
    if isinstance(node, dict):
        return {k: unescape(v) for k, v in node.items()}
    if isinstance(node, list):
        return [unescape(v) for v in node]
    return node


@pytest.mark.parametrize("variables", [{}, OVERRIDES], ids=["defaults", "all-set"])
def test_docker_compose_accepts_the_file_and_interpolates_like_the_tests(variables: dict, tmp_path: Path) -> None:
    theirs = docker_compose_config(COMPOSE_FILE, variables, tmp_path)["services"]
    ours = load_compose(variables)[0]
    assert set(theirs) == set(ours)
    for name, service in ours.items():
        assert theirs[name]["command"] == service.command, name
        assert theirs[name].get("environment", {}) == service.environment, name
        assert theirs[name]["restart"] == service.restart
        assert sorted(theirs[name]["volumes"]) == sorted(
            f"{m.volume}:{m.target}:{'ro' if m.read_only else 'rw'}" for m in service.mounts)
        assert [_port(p) for p in theirs[name].get("ports", [])] == service.ports
        assert theirs[name].get("healthcheck", {}).get("test") == (service.healthcheck or {}).get("test")


def _port(entry: str | dict) -> tuple[str, int]:
    """A port of ``docker-compose config`` as (published, target): a dict, or "IP:PUBLISHED:TARGET/tcp" (v1 with an IP)."""
    if isinstance(entry, str):
        published, _, target = entry.removesuffix("/tcp").rpartition(":")
        return published, int(target)
    published = str(entry["published"])
    return (f"{entry['host_ip']}:{published}" if entry.get("host_ip") else published), entry["target"]


def test_docker_compose_interpolates_each_form_like_the_tests(tmp_path: Path) -> None:
    cases = {"UNSET_DEFAULT": "${U:-d}", "EMPTY_COLON_DEFAULT": "${E:-d}", "EMPTY_DASH_DEFAULT": "${E-d}",
             "UNSET_DASH_DEFAULT": "${U-d}", "ESCAPED": "$$S", "BRACED": "${S}/x", "PLAIN": "$S", "SET": "${S:-d}",
             "UNSET_PLAIN": "${U}"}
    variables = {"S": "s", "E": ""}
    path = tmp_path / "forms.yml"
    path.write_text(yaml.safe_dump({"services": {"probe": {"image": "busybox", "environment": cases}}}))
    theirs = docker_compose_config(path, variables, tmp_path)["services"]["probe"]["environment"]
    assert theirs == {name: interpolate(text, variables) for name, text in cases.items()}


def test_readme_compose_section_names_real_settings(services: dict) -> None:
    readme = (REPO / "README.md").read_text()
    section = re.split(r"^## ", readme.split("\n## Run with Docker Compose\n", 1)[1], flags=re.M)[0]
    known = compose_variables(yaml.safe_load(COMPOSE_FILE.read_text()))
    mentioned = set(re.findall(r"\bHARDNEG_[A-Z_]+\b", section))
    assert mentioned and mentioned <= set(known), mentioned - set(known)
    assert f"restart: {services['trainer'].restart}" in section
    assert "cp .env.example .env" in section and "docker compose up --build" in section
