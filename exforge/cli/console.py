"""What every `exforge` sub-command shares: consoles, `--json`, settings loading, errors."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine

from exforge.core.settings import Settings, SettingsError, load_settings

console = Console()
errors = Console(stderr=True, soft_wrap=True)  # one line per error, whatever the width

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def settings() -> Settings:
    """The settings, or exit 2 with one line naming the bad variable."""
    try:
        return load_settings()
    except SettingsError as exc:
        errors.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


def database() -> Engine:
    """The ledger and registry database of the settings."""
    from exforge.core.db import open_database

    return open_database(settings())


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on stderr; raise the returned Exit."""
    errors.print(f"[red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    view = Table(title=title)
    for column in columns:
        view.add_column(column)
    for row in rows:
        view.add_row(*("" if cell is None else str(cell) for cell in row))
    console.print(view)
