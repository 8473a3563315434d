"""Checkpoints: every Orbax call of act_jax lives in this file.

- CheckpointManager with a save interval, keep-last-N and async save. Orbax writes each step
  into a temporary directory and renames it when complete, so a crash or `kill -9` during a
  save leaves the previous complete step as the latest one.
- Restore goes into the *current* mesh's shardings from an abstract target (so a checkpoint
  written on mesh (8,1,1) restores onto (2,4,1) or one device).
- Before restoring, the stored tree is compared with the target: an incompatible
  checkpoint (other structure, shapes or dtypes) raises CheckpointError listing every
  mismatched path, and nothing on disk is touched (no re-init, no overwrite).
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from act_jax.errors import CheckpointError


def path_str(path) -> str:
  """'a/b/0' for a jax tree path (also the names in export manifests)."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                  for k in path)


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(p): v for p, v in leaves}


def list_mismatches(have: dict[str, tuple], want: dict[str, tuple], source: str) -> list[str]:
  """One line per path whose (shape, dtype) differs between stored `have` (from `source`:
  'checkpoint', 'export'; a None dtype is not compared) and the model's `want`."""
  problems = []
  for k in sorted(set(have) | set(want)):
    if k not in want:
      problems.append(f'  {k}: in {source} {have[k][0]}, not in the model')
    elif k not in have:
      problems.append(f'  {k}: in the model {want[k][0]}, missing in {source}')
    else:
      (hs, hd), (ws, wd) = have[k], want[k]
      if hs != ws or (hd is not None and np.dtype(hd) != np.dtype(wd)):
        problems.append(f'  {k}: {source} {hs} {hd} vs model {ws} {wd}')
  return problems


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager for one pytree item (the train state)."""

  def __init__(self, directory: str, save_every: int = 1, keep: int = 2,
               async_save: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f'no checkpoint directory at {self.directory}')
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, max_to_keep=keep,
        enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    return self._mngr.save(step, args=ocp.args.StandardSave(state), force=force)

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises CheckpointError listing paths whose structure/shape/dtype differ."""
    try:
      stored = self._mngr.item_metadata(step)
    except Exception as e:  # unreadable metadata is an incompatible checkpoint too
      raise CheckpointError(f'checkpoint step {step} in {self.directory} is unreadable: {e}')
    stored = getattr(stored, 'tree', stored)
    spec = lambda x: (tuple(getattr(x, 'shape', ())), getattr(x, 'dtype', None))
    problems = list_mismatches({k: spec(v) for k, v in _flat(stored).items()},
                               {k: spec(v) for k, v in _flat(abstract_state).items()},
                               'checkpoint')
    if problems:
      raise CheckpointError(
          f'incompatible checkpoint at {self.directory} (step {step}): it was written by a '
          f'different model/config. Mismatched paths ({len(problems)}):\n' +
          '\n'.join(problems[:50]) +
          '\nUse a new --workdir, or the config that wrote this checkpoint. '
          'Nothing was changed on disk.')

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores into the shardings carried by abstract_state (ShapeDtypeStructs)."""
    self.check_compatible(step, abstract_state)
    return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
