"""Helpers that only tests use: fixtures built from real components, reference
implementations that check the real ones."""
