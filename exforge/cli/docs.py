"""Keep README's settings table in step with the code (`python -m exforge.cli.docs`)."""

from __future__ import annotations

import sys

from exforge.core.settings import PROJECT_ROOT, describe_settings

README = PROJECT_ROOT / "README.md"
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
