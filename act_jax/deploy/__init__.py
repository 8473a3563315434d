"""deploy: compile ahead of time for TPU slices, export a run for serving.

  aot.py     lower + compile train and decode steps for a topology, memory and FLOP report
  export.py  write a run's weights as a standalone serving bundle

May import: errors ... infer, calibrate.
"""
