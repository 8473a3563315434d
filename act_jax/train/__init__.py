"""train: losses, steps, the training loop and seed sweeps.

  training.py  losses, jitted train/eval steps, evaluate, train_and_evaluate, summaries
  sweep.py     several seeds of one config, mean and spread

May import: errors, spec, telemetry, scale, data, model, config, run.
"""
