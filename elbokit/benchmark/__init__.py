"""Benchmarks that elbokit runs on itself: `estimators` measures every registered estimator
against ground truth (bias, spread, time, memory) on synthetic families and on a trained run."""
