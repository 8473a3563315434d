"""calibrate: certified operating points.

  ltt.py             Learn-then-Test (Angelopoulos et al. 2021): p-values, FWER control, selection
  operating_point.py the run's operating point; threshold sweeps, decode timing, evaluate_run
  frontier.py        fewest mean layers at an accuracy tolerance per depth cap; its plot
  certify.py         calibrate_run (Learn-then-Test or a layer budget), train_and_certify
  counts.py          per-point token counts of scored prompts; the serving shadow log

May import: errors ... config, run, train, infer.
"""
