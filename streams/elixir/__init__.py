"""Elixir source analysis (tree-sitter based)."""

from streams.elixir.analysis import FileAnalysis, analyse, normalise

__all__ = ["FileAnalysis", "analyse", "normalise"]
