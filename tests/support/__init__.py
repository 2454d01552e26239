"""Helpers the tests (and the benchmarks that measure the same things) share: fixtures
built from real components, reference implementations that check the real ones."""
