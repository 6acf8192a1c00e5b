"""The ``tokred`` command; subcommands come from the ``tokred.commands`` entry-point group."""

from tokred.core.cli.main import COMMAND_ENTRY_POINT_GROUP, CommandParser, build_parser, main, set_command
from tokred.core.cli.tables import format_table

__all__ = ["COMMAND_ENTRY_POINT_GROUP", "CommandParser", "build_parser", "format_table", "main", "set_command"]
