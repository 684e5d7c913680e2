"""One way to install hardneg: the Dockerfile, the Makefile (the README's ``make test``) and CI (``.ci/run``)
all go through ``scripts/install.sh``; and the image is laid out the way docker-compose.yml needs.

References: the Dockerfile's instructions as Docker reads them (continuation lines joined), the Makefile's
recipes, ``.ci/run`` and the README's quick start, and Docker's ``.dockerignore`` matching rules.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib

import pytest
from compose_support import DOCKERFILE, REPO, dockerfile_instructions, load_compose, read_image

INSTALL = "scripts/install.sh"


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line, split at ``&&``, ``||`` and ``;`` (enough for these files)."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;", script) if part.strip()]


def runs_install(commands: list[list[str]]) -> bool:
    return any(c[-2:] == ["sh", INSTALL] or c[-1:] == [f"./{INSTALL}"] for c in commands)


def test_the_image_installs_with_the_install_script_only() -> None:
    runs = [i for i in dockerfile_instructions() if i.keyword == "RUN"]
    assert any(runs_install(shell_commands(r.args)) for r in runs), [r.args for r in runs]
    # no second recipe beside it: pip, uv or poetry appear only inside the script
    for r in runs:
        assert not re.search(r"\b(pip|uv|poetry)\b", r.args), f"installs outside {INSTALL}: {r.args}"


def test_make_and_ci_use_the_same_script_and_the_readmes_test_command() -> None:
    makefile = (REPO / "Makefile").read_text()
    recipes = [line.strip() for line in makefile.splitlines() if line.startswith("\t")]
    assert any(runs_install(shell_commands(r.replace("$(VENV)", "v").replace("$(PYTHON)", "p"))) for r in recipes)
    assert re.search(r"^test:.*\binstall\b", makefile, re.M)  # make test installs through that recipe
    readme = (REPO / "README.md").read_text()
    assert re.search(r"^make test\b", readme, re.M), "the README's test command"
    ci = [shlex.split(line) for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    # the README's command, then the image built and the compose file run for real
    assert ci[-2:] == [["make", "test"], ["bash", "scripts/compose-smoke.sh"]]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a path is excluded when the last pattern matching it or one of its parent folders is not
    a ``!`` exception; ``*`` and ``?`` stay within one path segment, ``**`` spans any number."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        rx = re.escape(body.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        rx = rx.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path, pattern, excluded", [
    ("tests/e2e/x.py", "tests", True), ("hardneg/a/__pycache__/m.pyc", "**/__pycache__", True),
    ("hardneg.egg-info/PKG-INFO", "*.egg-info", True), ("hardneg/cli.py", "*.py", False),
    ("README.md", "*.md", True), ("docs/a.md", "docs\n!docs/a.md", False),
])
def test_dockerignore_matching(path: str, pattern: str, excluded: bool) -> None:
    assert dockerignored(path, pattern.split("\n")) == excluded


def test_the_build_context_holds_everything_the_install_reads() -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied: list[str] = []
    for ins in dockerfile_instructions():
        if ins.keyword == "COPY" and "--from" not in ins.args:
            copied += shlex.split(ins.args)[:-1]
    files = []  # what a fresh clone holds under each COPY source
    for src in copied:
        tracked = subprocess.run(["git", "ls-files", "--", src], cwd=REPO, capture_output=True, text=True,
                                 check=True).stdout.split()
        assert tracked, f"COPY {src}: not in the repository"
        files += tracked
    assert files
    excluded = [f for f in files if dockerignored(f, patterns)]
    assert not excluded, f".dockerignore drops files the Dockerfile copies: {excluded[:5]}"
    # what pip reads while installing: pyproject.toml, its readme, the package, and the script's constraints
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    script = (REPO / INSTALL).read_text()
    needed = {"pyproject.toml", pyproject["project"]["readme"], INSTALL, "hardneg/cli.py",
              *re.findall(r"-c\s+(\S+)", script)}
    assert needed <= set(files), needed - set(files)


def test_the_image_user_owns_every_volume_mount_point() -> None:
    """A new named volume takes the owner of its mount point in the image: the trainer must own the store."""
    image = read_image()
    last = max(i.stage for i in dockerfile_instructions())
    commands = [c for i in dockerfile_instructions() if i.keyword == "RUN" and i.stage == last
                for c in shell_commands(i.args)]
    created = {a for c in commands if c[0] == "mkdir" for a in c[1:] if not a.startswith("-")}
    owned = {a.rstrip("/") for c in commands if c[:2] == ["chown", "-R"] and c[2] == f"{image.user}:{image.user}"
             for a in c[3:]}
    assert any(c[0] == "useradd" and c[-1] == image.user for c in commands) and image.user != "root"
    services, _ = load_compose({})
    targets = {m.target for s in services.values() for m in s.mounts}
    assert targets
    for target in targets:
        assert target in created, f"{target} is not created in the image"
        assert any(target == o or target.startswith(o + "/") for o in owned), f"{target} is not owned by {image.user}"


def test_the_image_runs_hardneg_under_tini_with_cpu_torch() -> None:
    assert read_image().entrypoint == ["tini", "--", "hardneg"]  # exec form under an init: SIGTERM reaches hardneg
    assert "https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()  # never the multi-GB CUDA build


def test_build_args_default_to_a_plain_docker_build() -> None:
    """scripts/compose-smoke.sh builds with a local base, the host's CA bundle and wheels; without build-args
    the image is the usual one: python:3.11-slim for both stages, torch from PyTorch's CPU index, pip as is
    (an empty PIP_CERT or PIP_FIND_LINKS is no setting to pip)."""
    instructions = dockerfile_instructions()
    defaults = dict(i.args.partition("=")[::2] for i in instructions if i.keyword == "ARG")
    assert defaults == {"BASE": "python:3.11-slim", "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu",
                        "PIP_CERT": "", "PIP_FIND_LINKS": ""}
    assert [i.args.split()[0] for i in instructions if i.keyword == "FROM"] == ["${BASE}", "${BASE}"]
    # the global ARG comes before the first FROM, so that FROM can use it
    assert [i.keyword for i in instructions][:2] == ["ARG", "FROM"]
