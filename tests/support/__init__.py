"""Helpers the tests (and the benchmarks that measure the same things) share."""
