"""Evaluation: sandboxed Elixir execution, benchmarks, pass@k and chrF, reports."""
