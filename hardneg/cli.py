"""The ``hardneg`` command: one tool with subcommands from each part of the project.

Each part registers its own subcommands (``hardneg.miner.cli``, ``hardneg.miner.mine_cli``,
``hardneg.trainer.cli``, ``hardneg.api.cli``), so this file stays a thin dispatcher. Only the module of the
subcommand being run is imported (all of them for ``hardneg --help``): ``hardneg index ...``, ``hardneg mine``
and ``hardneg serve`` start without importing torch or the trainer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hardneg import __version__
from hardneg.miner.errors import NotFoundError, SnapshotError, ValidationError


# Each subcommand and the module that registers it (a ``register(sub)`` function).
COMMANDS = {"index": "hardneg.miner.cli", "mine": "hardneg.miner.mine_cli", "train": "hardneg.trainer.cli",
            "eval": "hardneg.trainer.cli", "serve": "hardneg.api.cli", "audit": "hardneg.miner.audit_cli",
            "drift": "hardneg.miner.audit_cli"}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv`` (default: every subcommand; with a subcommand first, that one's module only)."""
    parser = argparse.ArgumentParser(
        prog="hardneg",
        description="Hard-negative mining for contrastive and metric learning.",
    )
    parser.add_argument("--version", action="version", version=f"hardneg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    command = next((a for a in (argv or []) if not a.startswith("-")), None)
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        __import__(module, fromlist=["register"]).register(sub)  # (an import statement's path: -X importtime logs it)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except (ValidationError, SnapshotError, NotFoundError, FileNotFoundError) as e:
        print(f"hardneg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
