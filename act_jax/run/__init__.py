"""run: the owner of a run directory (RUN/).

  directory.py     RUN's layout (config.json, checkpoints/, calibration.json, quantization and
                   draft files, metrics), the one atomic JSON writer, load -> (spec, variables)
  state.py         what a checkpoint holds: train state layout, abstract shapes, shardings
  checkpointing.py Orbax checkpoints: atomic, resumable, restorable onto any mesh

Only binaries and this package take a workdir path; library functions take a spec and
variables. May import: errors, spec, telemetry, scale, data, model, config.
"""
