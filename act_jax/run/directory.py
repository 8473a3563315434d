"""The owner of a run directory: what RUN/ holds, how it is read, how it is written.

RUN/ (a training workdir) holds:
  config.json          the resolved spec of the run (Spec.to_dict); older runs may lack
                       fields: they take today's defaults (config.complete)
  checkpoints/         Orbax checkpoints (run/checkpointing.py), one per saved step
  metrics.jsonl        train / eval records (telemetry.MetricsWriter), TensorBoard files
  calibration.json     certified operating points (calibrate/certify.calibrate_run)
  calibration.png      their frontier
  exact_draft.json     measured exact-mode draft choices per batch size (infer/draft.py)
  quantization.json    what a quantized run was made from (quant/ptq.py)

Every JSON file of a run is written by write_json: to a temporary file, fsync'd, then
os.replace'd over the old one, so a kill mid-write leaves the previous file or the new one,
never half of either. Readers go through read_json (None when the file is absent).

load(workdir) is the one way from a directory to what library functions take: the resolved
Spec (for one device) and the variables {'params', 'moe_state'} a model applies, plus the
checkpoint step. Library functions take (spec, variables); only binaries, the training loop
and this module take a workdir path.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Optional

from act_jax import config as config_lib
from act_jax.errors import CheckpointError
from act_jax.run import checkpointing
from act_jax.run import state as state_lib
from act_jax.scale import sharding
from act_jax.spec import Spec

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
METRICS = 'metrics.jsonl'
CALIBRATION = 'calibration.json'
CALIBRATION_PLOT = 'calibration.png'
DRAFT = 'exact_draft.json'
QUANTIZATION = 'quantization.json'


def path(workdir: str, name: str) -> str:
  """RUN/name for one of the names above (or a file a binary adds next to them)."""
  return os.path.join(workdir, name)


# ----------------------------------------------------------------------------- JSON
def write_json(file: str, obj: Any, indent: int = 2, default: Any = None) -> None:
  """Atomically: a kill mid-write leaves the previous file (or none), never half of one."""
  tmp = file + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=indent, default=default)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, file)


def read_json(file: str) -> Optional[Any]:
  """The parsed file, or None when it does not exist."""
  if not os.path.isfile(file):
    return None
  with open(file) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- config
def write_config(workdir: str, spec: Spec) -> None:
  write_json(path(workdir, CONFIG), spec.to_dict())


def read_config(workdir: str) -> Spec:
  """The Spec of a run's config.json, resolved for one device (fields an older version did
  not write take today's defaults)."""
  if not os.path.isdir(workdir):
    raise CheckpointError(f'workdir {workdir!r} does not exist')
  cfg_path = path(workdir, CONFIG)
  if not os.path.exists(cfg_path):
    raise CheckpointError(f'{cfg_path} is missing: {workdir!r} is not a training workdir')
  config = config_lib.complete(read_json(cfg_path))
  config.mesh.update(data=1, expert=1, model=1)
  return config_lib.resolve(config, device_count=1)


# ----------------------------------------------------------------------------- calibration
def read_calibration(workdir: str) -> Optional[dict]:
  """RUN/calibration.json, or None when the run was never calibrated."""
  return read_json(path(workdir, CALIBRATION))


def write_calibration(workdir: str, result: dict) -> str:
  write_json(path(workdir, CALIBRATION), result)
  return path(workdir, CALIBRATION)


# ----------------------------------------------------------------------------- checkpoints
def checkpointer(workdir: str, read_only: bool = False, **kw: Any
                 ) -> checkpointing.Checkpointer:
  """The run's checkpoint manager (RUN/checkpoints)."""
  return checkpointing.Checkpointer(path(workdir, CHECKPOINTS), read_only=read_only, **kw)


class Loaded(NamedTuple):
  spec: Spec
  variables: dict  # {'params', 'moe_state'}: what model.apply and every library call take
  step: int


def variables_of(state: dict) -> dict:
  """The model variables of a train state (or of anything with params and moe_state)."""
  return {'params': state['params'], 'moe_state': state.get('moe_state', {})}


def load(workdir: str, step: Optional[int] = None) -> Loaded:
  """(spec, variables, step) of a run's checkpoint (the latest unless step), on one device."""
  spec = read_config(workdir)
  ck = checkpointer(workdir, read_only=True)
  step = ck.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f'no complete checkpoint in {workdir}/{CHECKPOINTS}')
  mesh = sharding.make_mesh(shape=(1, 1, 1, 1))
  abstract, _ = state_lib.state_shardings(spec, mesh)
  state = ck.restore(step, abstract)
  return Loaded(spec, variables_of(state), int(step))
