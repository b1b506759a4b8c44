"""Benchmarks that elbokit runs on itself: `estimators` measures every registered estimator
against ground truth (bias, spread, time, memory) on synthetic families and on a trained run;
`grid` trains and scores grids of term lists x priors x data x seeds (grid.py: cells, resuming,
aggregation; executors.py: local processes or Ray tasks; presets.py: the paper's Table II and
the estimator choices; cell.py: one cell, run in a process of its own)."""
