"""The ``respect-hpc`` command line: commands, their options and the views they print."""

from respect_hpc.cli.commands import app

__all__ = ["app"]
