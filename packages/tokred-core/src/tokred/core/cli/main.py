"""Entry point of the ``tokred`` command.

Each installed tokred package contributes subcommands through the ``tokred.commands`` entry-point group:
an entry ``name = "module:register"`` points at a function ``register(subparsers)`` that adds its parser
(``subparsers.add_parser(name, ...)``) and sets ``func`` — a callable taking the parsed arguments and
returning an exit code — with ``parser.set_defaults(func=...)``. A package that fails to load is reported
on stderr and the other subcommands keep working.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

__all__ = ["COMMAND_ENTRY_POINT_GROUP", "build_parser", "main"]

COMMAND_ENTRY_POINT_GROUP = "tokred.commands"
"""Entry-point group through which packages add ``tokred`` subcommands."""

_DISTRIBUTIONS = ("tokred-core", "tokred-vlm", "tokred-mamba")


def _versions() -> str:
    found = []
    for dist in _DISTRIBUTIONS:
        try:
            found.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """Build the ``tokred`` parser from every installed ``tokred.commands`` entry point.

    Returns:
        The parser and a list of messages for command plug-ins that failed to load.
    """
    parser = argparse.ArgumentParser(
        prog="tokred",
        description="Token reduction for vision-language and Vision Mamba models.",
    )
    parser.add_argument("--version", action="version", version=_versions())
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    problems = []
    seen = set()
    for ep in sorted(metadata.entry_points(group=COMMAND_ENTRY_POINT_GROUP), key=lambda e: e.name):
        if ep.name in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(ep.name)
        try:
            ep.load()(subparsers)
        except Exception as exc:  # one broken plug-in must not take the command down
            problems.append(f"tokred: subcommand {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}")
    return parser, problems


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tokred`` command line; returns the exit code."""
    parser, problems = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given, for outputs that record how they were made
    for problem in problems:
        print(problem, file=sys.stderr)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2  # a missing subcommand is a usage error, as argparse treats an unknown one
    return int(func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
