"""What an image can import: a site directory holding only some distributions, and a
script that imports an `exforge` command's code there as its container would.

`link_site(distributions, directory)` links the top-level packages (and metadata) of
those installed distributions into `directory`; then

    PYTHONPATH=directory:REPO python -S -m tests.support.image_imports serve gateway

imports the CLI (every command module) and every module the command's function imports
when it runs (its function-level imports, found in its source). Exit 0, or the
ImportError of the module the image lacks.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def link_site(distributions: set[str], directory: Path) -> None:
    for dist in importlib.metadata.distributions():
        if canonical(dist.metadata["Name"]) not in distributions:
            continue
        for file in dist.files or []:
            top = file.parts[0]
            if top == ".." or top.endswith(".pth") or top == "__pycache__":
                continue
            link = directory / top
            source = Path(str(dist.locate_file(top)))
            if not link.exists() and source.exists():
                link.symlink_to(source)


def command_function(words: Sequence[str]) -> Any:
    import typer.main

    from exforge.cli.main import app

    command = typer.main.get_command(app)
    for word in words:
        command = command.commands[word]  # type: ignore[attr-defined]
    return inspect.unwrap(command.callback)  # type: ignore[attr-defined]


def imported_inside(function: Any) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in the function's body."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(function)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def main(words: Sequence[str]) -> None:
    for module, names in imported_inside(command_function(words)):
        loaded = importlib.import_module(module)
        for name in names:
            if not hasattr(loaded, name):
                importlib.import_module(f"{module}.{name}")


if __name__ == "__main__":
    main(sys.argv[1:])
