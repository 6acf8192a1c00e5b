"""``tokred reducers``: list every registered reducer with a one-line description."""

from __future__ import annotations

import argparse
import json

from tokred.core.cli.main import set_command
from tokred.core.cli.tables import format_table

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``reducers`` subcommand."""
    parser = subparsers.add_parser(
        "reducers",
        help="list the registered token reducers",
        description="List every reducer registered by the installed tokred packages and plug-ins.",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    set_command(parser, run)


def run(args: argparse.Namespace) -> int:
    """Print the reducers; exit code 1 if some plug-in failed to load."""
    from tokred.core.registry import reducer_info

    infos = reducer_info()
    if args.json:
        print(json.dumps([info.__dict__ for info in infos], indent=2))
    else:
        rows = [[info.name, info.distribution or "-", info.summary] for info in infos]
        print(format_table(["name", "package", "description"], rows), end="")
        for info in infos:
            if info.error:
                print(f"\nerror: {info.error}")
    return 1 if any(info.error for info in infos) else 0
