"""The `exforge` command line: `exforge.cli.main` builds the root app and registers
every command; one module per command group."""

from exforge.cli.main import app, main

__all__ = ["app", "main"]
