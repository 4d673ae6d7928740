"""The `edged` command (console script `edged.cli:main`): the top layer, free to use
every other one."""

from edged.cli.main import main

__all__ = ["main"]
