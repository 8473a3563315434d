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
never half of either. Readers go through read_json (None when the file is absent); a file a
user edited or brought that is not valid JSON, or whose fields are out of range
(read_config, read_calibration), is a ConfigError naming the file and the field.

load(workdir) is the one way from a directory to what library functions take: the resolved
Spec (for one device) and the variables {'params', 'moe_state'} a model applies, plus the
checkpoint step. Library functions take (spec, variables); only binaries, the training loop
and this module take a workdir path.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
from typing import Any, NamedTuple, Optional

from act_jax import config as config_lib
from act_jax.errors import CheckpointError, ConfigError
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
  """The parsed file, or None when it does not exist; ConfigError naming the file when it is
  not UTF-8 JSON."""
  if not os.path.isfile(file):
    return None
  try:
    with open(file, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f'{file}: not valid JSON ({e.msg} at line {e.lineno}, column '
                      f'{e.colno})') from None
  except UnicodeDecodeError as e:
    raise ConfigError(f'{file}: not UTF-8 text ({e.reason} at byte {e.start})') from None


def check_output_dir(out: str, flag: str, markers: tuple[str, ...], what: str) -> None:
  """Before any work: `out` may be new, empty, or a directory this binary writes (it holds
  an entry matching one of `markers`, fnmatch patterns: resuming or adding to it). A file, or
  a non-empty directory of something else, is refused, so nothing is mixed into a user's
  directory."""
  if not os.path.exists(out):
    return
  if not os.path.isdir(out):
    raise ConfigError(f'{flag}={out}: is a file; give a directory')
  entries = sorted(os.listdir(out))
  if entries and not any(fnmatch.fnmatch(e, m) for e in entries for m in markers):
    shown = ', '.join(entries[:3]) + (', ...' if len(entries) > 3 else '')
    raise ConfigError(f'{flag}={out}: a non-empty directory that is not {what} (it holds '
                      f'{shown}); give a new or empty directory')


RUN_MARKERS = (CONFIG, CHECKPOINTS, METRICS)


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
  raw = read_json(cfg_path)
  if not isinstance(raw, dict):
    raise ConfigError(f'{cfg_path}: must hold a JSON object (the run\'s config), not '
                      f'{type(raw).__name__}')
  try:  # a field an edit broke: name the file, then the field
    config = config_lib.complete(raw)
    config.mesh.update(data=1, expert=1, model=1)
    return config_lib.resolve(config, device_count=1)
  except ConfigError as e:
    raise ConfigError(f'{cfg_path}: {e}') from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f'{cfg_path}: {type(e).__name__}: {e}') from None


# ----------------------------------------------------------------------------- calibration
def read_calibration(workdir: str) -> Optional[dict]:
  """RUN/calibration.json, or None when the run was never calibrated. Its operating points are
  checked here (a ConfigError names the file and the field), so no reader blames a flag the
  user never gave; whether a cap is an exit layer of this model is the reader's check."""
  file = path(workdir, CALIBRATION)
  saved = read_json(file)
  if saved is not None:
    check_calibration(file, saved)
  return saved


def check_calibration(file: str, saved: Any) -> None:
  """The fields of calibration.json that decide where a run serves, in range."""
  def bad(field: str, value: Any, allowed: str) -> None:
    raise ConfigError(f'{file}: {field}={value!r}: {allowed} (experiments.calibrate writes this '
                      'file; run it again)')

  def threshold(field: str, v: Any, optional: bool) -> None:
    if v is None and optional:
      return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
      bad(field, v, 'must be a number in (0, 1]' + (' or null' if optional else ''))

  def cap(field: str, v: Any) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
      bad(field, v, 'must be null or an exit layer (an integer >= 1)')

  if not isinstance(saved, dict):
    bad('the file', type(saved).__name__, 'must hold a JSON object')
  threshold('chosen_threshold', saved.get('chosen_threshold'), True)
  cap('max_layers', saved.get('max_layers'))
  points = saved.get('points')
  if points is None:
    return
  if not isinstance(points, list):
    bad('points', points, 'must be a list')
  for i, p in enumerate(points):
    if not isinstance(p, dict):
      bad(f'points[{i}]', p, 'must be an object')
    threshold(f'points[{i}].threshold', p.get('threshold'), False)
    cap(f'points[{i}].max_layers', p.get('max_layers'))
    layers = p.get('calib_mean_layers')
    if isinstance(layers, bool) or not isinstance(layers, (int, float)) or \
        not (math.isfinite(layers) and layers > 0):
      bad(f'points[{i}].calib_mean_layers', layers, 'must be a positive number')
    if not isinstance(p.get('certified'), bool):
      bad(f'points[{i}].certified', p.get('certified'), 'must be true or false')


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
