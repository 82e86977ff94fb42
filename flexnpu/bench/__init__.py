"""Measuring tools that belong beside the benchmark scripts (scripts/bench_*.py): the
phase classifier's accuracy against the emulator's ground truth (accuracy.py)."""
