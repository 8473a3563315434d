"""scale: how work spreads over devices and processes.

  sharding.py   the mesh ('data', 'fsdp', 'expert', 'model'), logical-axis rules, constraints
  multihost.py  process set-up (jax.distributed, gloo on CPU), local multi-process launches

May import: errors, spec, telemetry. Ahead-of-time compilation for TPU slices is deploy/aot.py.
"""
