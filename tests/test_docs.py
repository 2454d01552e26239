"""The README stays true: its settings table is the one the code describes."""

from __future__ import annotations

from exforge.cli.docs import README, with_settings_table
from exforge.core.settings import Settings


def test_readme_settings_table_is_current() -> None:
    text = README.read_text()
    assert with_settings_table(text) == text, "run: .venv/bin/python -m exforge.cli.docs"
    for field in Settings.model_fields:
        assert f"`EXFORGE_{field.upper()}`" in text


def test_readme_gives_the_two_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
