"""Moving a trained model between machines as plain .npz files (no Orbax, no tensorstore).

A run trained on an accelerator host is brought to a laptop (or CI) for calibration and
decoding benchmarks. Orbax checkpoints there hold the optimiser state and many small files;
this writes only what inference needs:

  OUT/manifest.json     config, step, and for every array its file, shape and dtype
  OUT/weights-NN.npz    params and moe_state, packed into files of at most max_file_mb
  OUT/metrics.jsonl     the training log, when the run has one

`import_run` turns that back into a training workdir (config.json + an Orbax checkpoint at
the same step) that every binary reads. The optimiser state there is freshly initialised:
evaluation, calibration and decoding are exact; resuming training restarts Adam's moments.
"""
from __future__ import annotations

import os
import shutil
import zipfile
from typing import Callable

import jax
import numpy as np

from act_jax import config as config_lib
from act_jax.errors import CheckpointError, ConfigError
from act_jax.run import checkpointing
from act_jax.run import directory as run_lib
from act_jax.run import state as run_state
from act_jax.run.checkpointing import path_str
from act_jax.scale import sharding

MANIFEST = 'manifest.json'
_GROUPS = ('params', 'moe_state')
_WIDENED = ('int4',)  # stored as int8 in the .npz files


def _leaves(state: dict):
  """('params/stack/layer_0/attn/wq', leaf), ... over the groups inference needs."""
  for g in _GROUPS:
    for p, v in jax.tree_util.tree_flatten_with_path(state.get(g) or {})[0]:
      yield f'{g}/{path_str(p)}', v


def export_run(workdir: str, out_dir: str, max_file_mb: float = 15.0,
               log: Callable[[str], None] = print) -> dict:
  """Writes the latest checkpoint of `workdir` as manifest.json + weights-NN.npz files."""
  run_lib.check_output_dir(out_dir, '--out', (MANIFEST,), 'an export')
  spec, variables, step = run_lib.load(workdir)
  arrays = {k: np.asarray(jax.device_get(v)) for k, v in _leaves(variables)}
  # .npz keeps only NumPy's own dtypes: int4 (a quantized run) travels as int8 and the
  # manifest keeps the real dtype
  dtypes = {k: str(v.dtype) for k, v in arrays.items()}
  arrays = {k: v.astype(np.int8) if dtypes[k] in _WIDENED else v for k, v in arrays.items()}
  os.makedirs(out_dir, exist_ok=True)
  limit = int(max_file_mb * 2**20)
  files: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k in sorted(arrays, key=lambda k: -arrays[k].nbytes):  # big first: fewer files
    if files[-1] and size + arrays[k].nbytes > limit:
      files.append({})
      size = 0
    files[-1][k] = arrays[k]
    size += arrays[k].nbytes
  entries = {}
  for i, group in enumerate(files):
    name = f'weights-{i:02d}.npz'
    # npz member names cannot hold '/' portably: index them, the manifest keeps the paths
    np.savez(os.path.join(out_dir, name), **{f'a{j}': v for j, v in enumerate(group.values())})
    for j, (k, v) in enumerate(group.items()):
      entries[k] = {'file': name, 'member': f'a{j}', 'shape': list(v.shape),
                    'dtype': dtypes[k]}
  manifest = {'step': step, 'config': spec.to_dict(),
              'arrays': entries}
  run_lib.write_json(os.path.join(out_dir, MANIFEST), manifest, indent=1)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics):
    shutil.copy(metrics, os.path.join(out_dir, 'metrics.jsonl'))
  total = sum(v.nbytes for v in arrays.values())
  log(f'exported step {manifest["step"]} of {workdir}: {len(arrays)} arrays, '
      f'{total / 2**20:.1f} MiB in {len(files)} file(s) -> {out_dir}')
  return manifest


def import_run(src_dir: str, workdir: str, log: Callable[[str], None] = print) -> int:
  """Builds a training workdir from an export; refuses to touch an existing checkpoint."""
  path = os.path.join(src_dir, MANIFEST)
  if not os.path.exists(path):
    raise CheckpointError(f'{path} is missing: {src_dir!r} is not an export_run directory')
  if os.path.isdir(os.path.join(workdir, 'checkpoints')) and \
      os.listdir(os.path.join(workdir, 'checkpoints')):
    raise CheckpointError(f'{workdir}/checkpoints already holds a checkpoint; import into a '
                          f'new --workdir (nothing was changed)')
  run_lib.check_output_dir(workdir, '--workdir', run_lib.RUN_MARKERS, 'a training run')
  manifest = run_lib.read_json(path)
  try:  # a manifest an edit or a broken copy damaged: name the file
    config = config_lib.complete(manifest['config'])
    config.mesh.update(data=1, expert=1, model=1)
    spec = config_lib.resolve(config, device_count=1)
    have = manifest['arrays']
    step = int(manifest['step'])
    shapes = {k: (tuple(e['shape']), e['dtype']) for k, e in have.items()}
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise ConfigError(f'{path}: not a manifest export_run wrote ({type(e).__name__}: {e}); '
                      'export the run again') from None
  mesh = sharding.make_mesh(shape=(1, 1, 1, 1))
  abstract, shardings = run_state.state_shardings(spec, mesh)
  want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in _leaves(abstract)}
  problems = checkpointing.list_mismatches(shapes, want, 'the export')
  if problems:
    raise CheckpointError(f'export {src_dir} does not match its own config '
                          f'({len(problems)} paths):\n' + '\n'.join(problems[:50]))
  opened = {}

  def load(k):
    e = have[k]
    file = os.path.join(src_dir, e['file'])
    try:  # read everything before writing anything: a damaged archive leaves no workdir
      if e['file'] not in opened:
        opened[e['file']] = np.load(file)
      return opened[e['file']][e['member']].astype(np.dtype(e['dtype']))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
      raise CheckpointError(f'{file}: cannot read {e["member"]} ({type(err).__name__}: '
                            f'{err}); the export is damaged: export the run again') from None

  # fresh optimiser state (a quantized run has none: its abstract state is the target)
  state = (dict(abstract) if spec.quant.stored else
           run_state.init_state(spec, mesh, shardings))
  for g in _GROUPS:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state.get(g) or {})
    new = [jax.device_put(load(f'{g}/{path_str(p)}'), v.sharding) for p, v in leaves]
    state[g] = jax.tree_util.tree_unflatten(treedef, new)
  state['step'] = jax.numpy.asarray(step, jax.numpy.int32)
  os.makedirs(workdir, exist_ok=True)
  ck = run_lib.checkpointer(workdir, async_save=False)
  ck.save(step, state, force=True)
  ck.close()
  run_lib.write_config(workdir, spec)
  if os.path.exists(os.path.join(src_dir, 'metrics.jsonl')):
    shutil.copy(os.path.join(src_dir, 'metrics.jsonl'), os.path.join(workdir, 'metrics.jsonl'))
  log(f'imported step {step} ({len(have)} arrays) into {workdir}')
  return step

