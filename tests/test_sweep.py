"""Seed sweeps (act_jax/sweep.py, experiments/sweep_seeds.py) and their report plot."""
import json
import os
import subprocess
import sys

import pytest

from act_jax import report, sweep
from experiments.configs import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sweep_rows_table_and_plot(tmp_path):
  config = synthetic.get_config('task=parity,halting=act,runlocal')  # 16 entries, train 1-8
  config.train.update(steps=2, eval_every=1000, eval_batches=2)
  lines = []
  out = sweep.sweep_seeds(config, str(tmp_path), [3, 5], log=lines.append)
  assert [r['seed'] for r in out['seeds']] == [3, 5]
  assert any(l.startswith('[seed 5] == summary') for l in lines)  # each run's own summary
  saved = json.load(open(tmp_path / 'sweep.json'))
  assert [r['accuracy'] for r in saved['seeds']] == [r['accuracy'] for r in out['seeds']]
  assert saved['ranges'] == {'in-distribution': [1, 8], 'extrapolation': [9, 16]}
  assert out['collapse_rate'] == sum(bool(r['collapse']) for r in out['seeds']) / 2
  for r in out['seeds']:
    assert os.path.isdir(tmp_path / f'seed_{r["seed"]}' / 'checkpoints')
    assert set(r['ranges']) == {'in-distribution', 'extrapolation'}
    steps = list(r['steps_by_difficulty'].values())
    assert all(1.0 <= s <= 4.0 for s in steps) and 1.0 <= r['steps'] <= 4.0
  table = sweep.format_sweep(out)
  assert table.splitlines()[0] == '== parity / act: 2 seed(s) =='
  assert 'collapse rate' in table.splitlines()[-1]
  # a sweep directory's report: steps vs difficulty, one line per seed
  paths = report.make_report(str(tmp_path), log=lambda s: None)
  plot = str(tmp_path / 'report' / 'steps_vs_difficulty.png')
  assert plot in paths and open(plot, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  # re-running resumes: nothing left to train, same rows
  again = sweep.sweep_seeds(config, str(tmp_path), [3, 5], log=lambda s: None)
  assert [r['accuracy'] for r in again['seeds']] == [r['accuracy'] for r in out['seeds']]


@pytest.mark.parametrize('args,needle', [
    (['--seeds=0'], '--seeds=0: must be at least 1'),
    (['--first_seed=-2'], '--first_seed=-2: must be non-negative'),
    (['--config.data.train_max_difficulty=16'], 'data.train_max_difficulty=16'),
])
def test_bad_sweep_flags_fail_in_one_line(tmp_path, args, needle):
  cmd = [sys.executable, '-m', 'experiments.sweep_seeds',
         '--config=experiments/configs/synthetic.py:task=parity,runlocal',
         f'--workdir={tmp_path}'] + args
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS='cpu'))
  lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith('WARNING')]
  assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), p.stderr
  assert needle in lines[0] and 'Traceback' not in p.stderr
  assert not os.path.exists(tmp_path / 'seed_0')  # refused before any training
