"""calibrate: certified operating points.

  ltt.py             Learn-then-Test (Angelopoulos et al. 2021): p-values, FWER control, selection
  operating_point.py threshold sweeps, calibrate_run / train_and_certify, the run's default point

May import: errors ... config, run, train, infer.
"""
