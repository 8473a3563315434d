"""Moving a run between machines: export -> import is exact; bad exports are refused.

Reads the suite's shared trained run 'lm' (tests/conftest.py: trained once per suite run)."""
import json
import os

import jax
import numpy as np
import pytest

from act_jax.deploy import export
from act_jax.errors import CheckpointError
from act_jax.run import directory as run_lib


@pytest.fixture
def run(shared_runs):
  # confidence + top-k MoE: params and a non-trivial moe_state (moe.bias_rate) that must
  # travel too; 10 steps, checkpoints at 5 and 10
  return shared_runs.path('lm')


def test_export_import_round_trip_is_exact(run, tmp_path):
  out = str(tmp_path / 'export')
  manifest = export.export_run(run, out, max_file_mb=0.05, log=lambda s: None)
  files = sorted(f for f in os.listdir(out) if f.endswith('.npz'))
  assert len(files) > 1  # packed under the size limit
  assert all(os.path.getsize(os.path.join(out, f)) < 0.05 * 2**20 + 4096 or
             len(np.load(os.path.join(out, f)).files) == 1 for f in files)
  assert os.path.exists(os.path.join(out, 'metrics.jsonl'))
  new = str(tmp_path / 'imported')
  assert export.import_run(out, new, log=lambda s: None) == manifest['step'] == 10
  c1, s1, _ = run_lib.load(run)
  c2, s2, step2 = run_lib.load(new)
  assert c1.to_dict() == c2.to_dict() and step2 == 10
  for a, b in zip(jax.tree.leaves((s1['params'], s1['moe_state'])),
                  jax.tree.leaves((s2['params'], s2['moe_state']))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.leaves(s2['moe_state'])  # the MoE bias state came along
  with pytest.raises(CheckpointError, match='already holds a checkpoint'):
    export.import_run(out, new, log=lambda s: None)


def test_bad_exports_are_refused(run, tmp_path):
  with pytest.raises(CheckpointError, match='manifest.json is missing'):
    export.import_run(str(tmp_path), str(tmp_path / 'x'))
  out = str(tmp_path / 'export')
  export.export_run(run, out, log=lambda s: None)
  path = os.path.join(out, 'manifest.json')
  m = json.load(open(path))
  key = next(k for k in m['arrays'] if k.endswith('embedding'))
  m['arrays'][key]['shape'][0] += 1
  del m['arrays'][next(k for k in m['arrays'] if k.endswith('final_norm_scale'))]
  json.dump(m, open(path, 'w'))
  with pytest.raises(CheckpointError, match=r'(?s)embedding.*final_norm_scale.*missing'):
    export.import_run(out, str(tmp_path / 'y'))
  assert not os.path.exists(str(tmp_path / 'y' / 'checkpoints'))  # nothing written
