"""Evaluation helpers for generation benchmarks: answer extraction, metrics, code execution, judging."""
