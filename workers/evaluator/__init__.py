"""Evaluation: benchmarks, generation, pass@k and chrF in the BEAM sandbox, reports."""
