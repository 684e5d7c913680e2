"""Helpers of the hardneg deployment tests: read ``docker-compose.yml`` and the ``Dockerfile`` as Docker
would, and run a compose service's exact command and environment as a local process (no Docker engine).

The container is replaced by, and only by:

- the image's ``ENTRYPOINT ["tini", "--", "hardneg"]``: ``tini`` only forwards signals, and ``hardneg``
  is the console script of ``hardneg.cli:main``, so it becomes ``[sys.executable, "-m", "hardneg.cli"]``;
- each named volume: a folder shared by every service that mounts it; a container path under a mount
  point (``/data/store/...``) in the command or the environment becomes the same path in that folder;
  a read-only mount is emulated by ``readonly_mount/sitecustomize.py``;
- each published container port: a free local port (the value after ``--port``, and the healthcheck URL);
- the image's ``ENV`` (other than ``PATH``), then the service's ``environment``, over a minimal base
  (``PATH``, ``HOME``, ``OMP_NUM_THREADS=1`` since the test machine's cores are shared).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
READONLY_HOOK = Path(__file__).resolve().parent / "readonly_mount"
READONLY_MARKER = "HARDNEG-E2E-READONLY-VIOLATION"  # printed by readonly_mount/sitecustomize.py
ENTRYPOINT = ["tini", "--", "hardneg"]  # what the mapping to a local process assumes
LOCAL_HARDNEG = [sys.executable, "-m", "hardneg.cli"]


# ------------------------------------------------------------------ interpolation
class InterpolationError(ValueError):
    """A ``${VAR:?message}`` whose variable is missing, or a ``$`` form compose does not accept."""


# Compose's forms: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}.
_VAR = re.compile(r"""\$(?:
    (?P<escaped>\$)
  | (?P<named>[_A-Za-z][_A-Za-z0-9]*)
  | \{(?P<braced>[_A-Za-z][_A-Za-z0-9]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}
  | (?P<invalid>)
)""", re.VERBOSE)


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """``text`` with compose-style ``$`` references replaced from ``variables`` (the shell and ``.env``).

    An unset plain ``${VAR}`` becomes the empty string (compose warns); ``:-``/``:?`` treat an empty
    value as unset, ``-``/``?`` do not.
    """
    def one(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["invalid"] is not None:
            raise InterpolationError(f"invalid interpolation format in {text!r} at {m.start()}")
        name, op, arg = m["named"] or m["braced"], m["op"], m["arg"]
        value = variables.get(name)
        if op is None:
            return value or ""
        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return arg if missing else value
        if missing:
            raise InterpolationError(f"{name} is required: {arg}")
        return value

    return _VAR.sub(one, text)


def interpolate_tree(node: Any, variables: Mapping[str, str]) -> Any:
    """Interpolate every string value (not key) of a parsed YAML tree."""
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, dict):
        return {k: interpolate_tree(v, variables) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, variables) for v in node]
    return node


def compose_variables(node: Any) -> dict[str, str | None]:
    """Each variable the string values of a parsed YAML tree refer to, with its ``:-``/``-`` default (None if none)."""
    out: dict[str, str | None] = {}
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        for child in node:
            for name, default in compose_variables(child).items():
                out[name] = default if out.get(name) is None else out[name]
    elif isinstance(node, str):
        for m in _VAR.finditer(node):
            if m["named"] or m["braced"]:
                name = m["named"] or m["braced"]
                default = m["arg"] if m["op"] in (":-", "-") else None
                out[name] = default if out.get(name) is None else out[name]
    return out


# ----------------------------------------------------------------------- compose
@dataclass(frozen=True)
class Mount:
    volume: str
    target: str
    read_only: bool


@dataclass(frozen=True)
class Service:
    """One service of the compose file after interpolation, in the forms the tests use."""

    name: str
    command: list[str]
    environment: dict[str, str]
    mounts: list[Mount]
    ports: list[tuple[str, int]]  # (published host port or range, container port)
    healthcheck: dict[str, Any] | None
    restart: str | None
    raw: dict[str, Any]


def load_compose(variables: Mapping[str, str], path: Path = COMPOSE_FILE) -> tuple[dict[str, Service], dict]:
    """The services of ``path`` interpolated with ``variables``, and the whole interpolated document."""
    doc = interpolate_tree(yaml.safe_load(path.read_text()), variables)
    services = {name: _service(name, spec, variables) for name, spec in doc["services"].items()}
    return services, doc


def _service(name: str, spec: dict, variables: Mapping[str, str]) -> Service:
    command = spec.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
    env = spec.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    # "VAR:" without a value passes the shell's VAR through, and is left out when the shell has none
    environment = {k: str(v) if v is not None else variables[k] for k, v in env.items()
                   if v is not None or k in variables}
    mounts = []
    for entry in spec.get("volumes", []):
        volume, target, *mode = entry.split(":")
        mounts.append(Mount(volume, target, mode == ["ro"]))
    ports = []
    for entry in spec.get("ports", []):
        published, target = str(entry).rsplit(":", 1)
        ports.append((published, int(target)))
    return Service(name, command, environment, mounts, ports, spec.get("healthcheck"), spec.get("restart"), spec)


# --------------------------------------------------------------------- Dockerfile
@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the (joined) line
    stage: int  # 0-based index of the FROM it belongs to


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions of a Dockerfile, continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    stage, pending = -1, ""
    for line in path.read_text().splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full, pending = (pending + line).strip(), ""
        if not full or full.startswith("#"):
            continue
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        stage += keyword == "FROM"
        out.append(Instruction(keyword, " ".join(args.split()), stage))
    return out


@dataclass(frozen=True)
class Image:
    """What the final stage of the Dockerfile gives a container."""

    entrypoint: list[str]
    env: dict[str, str]
    user: str
    workdir: str


def read_image(path: Path = DOCKERFILE) -> Image:
    instructions = dockerfile_instructions(path)
    last = max(i.stage for i in instructions)
    entrypoint: list[str] = []
    env: dict[str, str] = {}
    user, workdir = "root", "/"
    for ins in (i for i in instructions if i.stage == last):
        if ins.keyword == "ENTRYPOINT":
            entrypoint = json.loads(ins.args)  # exec form; the shell form would not forward signals
        elif ins.keyword == "ENV":
            for token in shlex.split(ins.args):
                key, _, value = token.partition("=")
                env[key] = value
        elif ins.keyword == "USER":
            user = ins.args
        elif ins.keyword == "WORKDIR":
            workdir = ins.args
    return Image(entrypoint, env, user, workdir)


# ------------------------------------------------------------------ local process
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalContainer:
    """Where a service's container paths and ports lie on this machine.

    Args:
        service: the interpolated compose service.
        image: the Dockerfile's final stage.
        volumes: named volume -> local folder (the same folders for every service, as Docker shares them).
        workdir: the local stand-in for the container's own filesystem (its working folder).
    """

    service: Service
    image: Image
    volumes: Mapping[str, Path]
    workdir: Path
    ports: dict[int, int] = field(init=False)  # container port -> a free local port

    def __post_init__(self) -> None:
        if self.image.entrypoint != ENTRYPOINT:
            raise AssertionError(f"the Dockerfile's ENTRYPOINT is {self.image.entrypoint}; these tests map "
                                 f"{ENTRYPOINT} to {LOCAL_HARDNEG} and need updating")
        self.ports = {target: free_port() for _, target in self.service.ports}
        self.workdir.mkdir(parents=True, exist_ok=True)

    def host_path(self, value: str) -> str:
        """``value`` with a leading container mount point replaced by its volume's local folder."""
        for m in sorted(self.service.mounts, key=lambda m: len(m.target), reverse=True):
            if value == m.target or value.startswith(m.target + "/"):
                return str(self.volumes[m.volume]) + value[len(m.target):]
        return value

    def argv(self) -> list[str]:
        """The service's exact command, run by the local ``hardneg``, paths and ports mapped."""
        out = [self.host_path(a) for a in self.service.command]
        for i in range(1, len(out)):
            if out[i - 1] == "--port" and int(out[i]) in self.ports:
                out[i] = str(self.ports[int(out[i])])
        return [*LOCAL_HARDNEG, *out]

    def environ(self) -> dict[str, str]:
        """The image's ENV, then the service's environment, over a minimal base; paths mapped."""
        env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               "HOME": str(self.workdir), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(READONLY_HOOK),
               "HARDNEG_E2E_READONLY": os.pathsep.join(
                   str(self.volumes[m.volume]) for m in self.service.mounts if m.read_only)}
        env.update({k: self.host_path(v) for k, v in self.image.env.items() if k != "PATH"})
        env.update({k: self.host_path(v) for k, v in self.service.environment.items()})
        return env

    def healthcheck_argv(self) -> list[str]:
        """The healthcheck's ``CMD`` as a local command: ``python`` is this interpreter, ports mapped."""
        test = list(self.service.healthcheck["test"])
        if test[0] != "CMD" or test[1] != "python":
            raise AssertionError(f"healthcheck {test} is not the exec form ['CMD', 'python', ...] these tests map")
        out = [sys.executable, *test[2:]]
        for target, local in self.ports.items():
            out = [re.sub(rf"//(127\.0\.0\.1|localhost):{target}\b", f"//127.0.0.1:{local}", a) for a in out]
        return out

    def start(self) -> ServiceProcess:
        log = self.workdir / f"{self.service.name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(self.argv(), cwd=self.workdir, env=self.environ(), stdout=out,
                                    stderr=subprocess.STDOUT, text=True)
        return ServiceProcess(self.service.name, proc, log)

    def run_healthcheck(self) -> int:
        return subprocess.run(self.healthcheck_argv(), cwd=self.workdir, env=self.environ(), capture_output=True,
                              timeout=30).returncode


@dataclass
class ServiceProcess:
    """A running service; its stdout and stderr go to ``log``."""

    name: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not exit within {timeout} s; output:\n{self.output()[-3000:]}")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM, as ``docker stop`` sends through tini; the exit status, or an error after ``timeout``."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
