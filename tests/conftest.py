"""Shared pytest setup: f32 matmuls on CPU are exact enough for 1e-5 equivalence tests."""
import os
import subprocess
import sys
import textwrap

import pytest

# With the 'tpu' extra installed on a CPU machine, jax would probe for a TPU at start-up;
# the tests run on the CPU (AOT tests reach libtpu through jax.experimental.topologies).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_multidevice(code: str, devices: int = 8, timeout: int = 600) -> str:
  """Runs `code` in a fresh interpreter that sees `devices` fake CPU devices.

  XLA_FLAGS must be set before jax is imported, hence a subprocess.
  """
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
  return proc.stdout


@pytest.fixture
def multidevice():
  return run_multidevice
