"""The parts of scripts/benchmark.py: the cost suite (`cost`) and the accuracy suites' methods (`methods`)."""
