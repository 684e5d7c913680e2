"""The ``hardneg`` command: one tool with subcommands from each part of the project.

Each part registers its own subcommands (``hardneg.miner.cli``, ``hardneg.trainer.cli``,
``hardneg.api.cli``), so this file stays a thin dispatcher.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from hardneg import __version__
from hardneg.miner.errors import NotFoundError, SnapshotError, ValidationError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hardneg",
        description="Hard-negative mining for contrastive and metric learning.",
    )
    parser.add_argument("--version", action="version", version=f"hardneg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from hardneg.miner import cli as miner_cli

    miner_cli.register(sub)
    for module in ("hardneg.trainer.cli", "hardneg.api.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # that part is not built yet
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
