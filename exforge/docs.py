"""Keep README's settings table in step with the code (`python -m exforge.docs`)."""

from __future__ import annotations

import sys
from pathlib import Path

from exforge.settings import describe_settings

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"


def settings_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    rows += [f"| `{var}` | `{default}` | {doc} |" for var, default, doc in describe_settings()]
    return "\n".join(rows)


def with_settings_table(readme: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{settings_table()}\n{END}{tail}"


if __name__ == "__main__":
    README.write_text(with_settings_table(README.read_text()))
    sys.stdout.write(f"updated the settings table in {README}\n")
