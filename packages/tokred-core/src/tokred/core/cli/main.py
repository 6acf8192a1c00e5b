"""Entry point of the ``tokred`` command.

Each installed tokred package contributes subcommands through the ``tokred.commands`` entry-point group:
an entry ``name = "module:register"`` points at a function ``register(subparsers)`` that adds its parser
(``subparsers.add_parser(name, ...)``) and sets its function with [`set_command`][tokred.core.cli.set_command]
(or ``parser.set_defaults(func=...)``): a callable taking the parsed arguments and returning an exit code. A
package that fails to load is reported on stderr and the other subcommands keep working.

A user's mistake — a bad value, a missing file, an unknown name — is answered with one line on stderr and exit
status 2: every [`TokredError`][tokred.core.errors.TokredError] and every ``OSError`` a command raises, and every
argument the parser refuses. ``--debug`` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import NoReturn

from tokred.core.errors import TokredError

__all__ = ["COMMAND_ENTRY_POINT_GROUP", "CommandParser", "build_parser", "main", "set_command"]

COMMAND_ENTRY_POINT_GROUP = "tokred.commands"
"""Entry-point group through which packages add ``tokred`` subcommands."""

USAGE_ERROR = 2
"""Exit status of a user's mistake."""


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2, naming the command."""

    def error(self, message: str) -> NoReturn:
        """Print ``<command>: <message> (see <command> --help)`` and exit with status 2."""
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def set_command(parser: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int | None]) -> None:
    """Make ``func`` the function of a subcommand's parser (its messages then start with the command's name)."""
    parser.set_defaults(func=func, command_name=parser.prog)


def _versions() -> str:
    """The versions of the installed distributions that add ``tokred`` subcommands."""
    found = {"tokred-core": metadata.version("tokred-core")} if _installed("tokred-core") else {}
    for ep in metadata.entry_points(group=COMMAND_ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        if dist is not None:
            found[dist.metadata["Name"]] = dist.version
    return ", ".join(f"{name} {version}" for name, version in sorted(found.items()))


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """Build the ``tokred`` parser from every installed ``tokred.commands`` entry point.

    Returns:
        The parser and a list of messages for command plug-ins that failed to load.
    """
    parser = CommandParser(
        prog="tokred",
        description="Token reduction for vision-language and Vision Mamba models.",
    )
    parser.add_argument("--version", action="version", version=_versions())
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error (also accepted after the command)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
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


def _one_line(error: BaseException) -> str:
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tokred`` command line; returns the exit code.

    Args:
        argv: The arguments after ``tokred``; ``sys.argv[1:]`` by default.

    Returns:
        0 on success, 2 for a user's mistake (one line on stderr), the command's own code otherwise.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv_without_debug = [a for a in argv if a != "--debug"]
    parser, problems = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv_without_debug)
    except SystemExit as done:  # --help, --version, or a refused argument (already reported in one line)
        return done.code if isinstance(done.code, int) else USAGE_ERROR
    if unknown:  # reported by the command they were given to, not by the top-level parser
        name = getattr(args, "command_name", None) or "tokred"
        print(f"{name}: unrecognized arguments: {' '.join(unknown)} (see {name} --help)", file=sys.stderr)
        return USAGE_ERROR
    args.argv = argv  # the command line as given, for outputs that record how they were made
    args.debug = debug
    for problem in problems:
        print(problem, file=sys.stderr)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return USAGE_ERROR  # a missing subcommand is a usage error, as argparse treats an unknown one
    name = getattr(args, "command_name", None) or f"tokred {args.command}"
    format_warning = warnings.formatwarning
    if not debug:  # a warning is one line naming the command, like an error; --debug keeps file and line
        warnings.formatwarning = lambda message, *_, **__: f"{name}: warning: {_one_line(message)}\n"
    try:
        return int(func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`tokred reducers --json | head`); anything still buffered cannot be written.
        _silence_stdout()
        print(f"{name}: the output pipe was closed before everything was written", file=sys.stderr)
        return USAGE_ERROR
    except (TokredError, OSError) as error:
        if debug:
            raise
        print(f"{name}: {_one_line(error)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = format_warning


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured streams in tests)
        pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
