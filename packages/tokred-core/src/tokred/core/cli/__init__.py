"""The ``tokred`` command; subcommands come from the ``tokred.commands`` entry-point group."""

from tokred.core.cli.main import COMMAND_ENTRY_POINT_GROUP, build_parser, main

__all__ = ["COMMAND_ENTRY_POINT_GROUP", "build_parser", "main"]
