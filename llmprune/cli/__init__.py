"""The command line: ``llmprune`` and its subcommands."""

from llmprune.cli.commands import main

__all__ = ["main"]
