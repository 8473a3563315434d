"""viz: plots and reports from run directories.

  report.py   PNG report of one run (loss, depth, experts, frontier)
  compare.py  curves of several runs on one figure

May import everything except bench.
"""
