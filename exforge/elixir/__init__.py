"""Elixir as data: syntax analysis and features (tree-sitter), quality, redaction,
near-duplicate hashing, decontamination, and the BEAM pool that compiles and runs code."""
