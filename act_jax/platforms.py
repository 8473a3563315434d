"""Which JAX platforms a process initialises, chosen before JAX first touches a backend.

With the `tpu` extra installed (libtpu), JAX initialises the TPU plugin in every process,
and on a machine without TPU chips libtpu prints several lines of warnings and errors
("Failed to find host bounds for accelerator type", "unexpected worker hostname ...")
before falling back to the CPU. quiet_tpu_probe() avoids that probe where it cannot
succeed: when JAX_PLATFORMS is unset, libtpu is installed, and this machine shows no TPU
(no /dev/accel* or /dev/vfio/<n> device, no TPU_ACCELERATOR_TYPE / TPU_NAME / TPU_WORKER_ID
variable), it sets JAX_PLATFORMS to the other platforms whose plugins are installed
(cuda / rocm, then cpu). An explicit JAX_PLATFORMS always wins. Compiling for TPU
topologies ahead of time (deploy/aot.py) does not need a TPU backend and still works.

Imports nothing from JAX: call it before anything imports jax (experiments/__init__ does).
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Mapping, MutableMapping

_TPU_ENV = ('TPU_ACCELERATOR_TYPE', 'TPU_NAME', 'TPU_WORKER_ID')  # not TPU_SKIP_MDS_QUERY: jax sets it
_PLUGINS = (('cuda', ('jax_cuda12_plugin', 'jax_cuda13_plugin')),
            ('rocm', ('jax_rocm60_plugin', 'jax_rocm7_plugin')))


def _installed(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def tpu_present(environ: Mapping[str, str] | None = None) -> bool:
  """TPU chips on this host (device files or the variables a TPU VM / pod sets)."""
  env = os.environ if environ is None else environ
  if any(env.get(k) for k in _TPU_ENV):
    return True
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def quiet_tpu_probe(environ: MutableMapping[str, str] | None = None) -> str | None:
  """Sets JAX_PLATFORMS (see the module docstring) and returns what it set, else None."""
  env = os.environ if environ is None else environ
  if env.get('JAX_PLATFORMS') or not _installed('libtpu') or tpu_present(env):
    return None
  chosen = [p for p, mods in _PLUGINS if any(_installed(m) for m in mods)] + ['cpu']
  env['JAX_PLATFORMS'] = ','.join(chosen)
  return env['JAX_PLATFORMS']
