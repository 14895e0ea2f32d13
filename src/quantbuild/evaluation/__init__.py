"""Evaluation: scorers, generation, the per-family suites and their statistics."""
