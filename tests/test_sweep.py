"""Seed sweeps (act_jax/train/sweep.py, experiments/sweep_seeds.py) and their report plot."""
import json
import os

import pytest

from act_jax.train import sweep
from act_jax.viz import report
from experiments.configs import synthetic
from tests.conftest import binary_cases


def test_sweep_rows_table_and_plot(tmp_path):
  """Trains parity / ACT for 2 steps on each of two seeds, then resumes the sweep."""
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


BAD_FLAGS = [
    (['--num_seeds=0'], '--num_seeds=0: must be an integer >= 1'),
    (['--first_seed=-2'], '--first_seed=-2: must be an integer >= 0'),
    (['--config.data.train_max_difficulty=16'], 'data.train_max_difficulty=16'),
]


@pytest.fixture(scope='module')
def refusals(tmp_path_factory):
  """Every BAD_FLAGS case run by the binary, all in one interpreter (conftest.binary_cases)."""
  workdir = tmp_path_factory.mktemp('sweep_bad')
  cases = [['--config=experiments/configs/synthetic.py:task=parity,runlocal',
            f'--workdir={workdir}'] + args for args, _ in BAD_FLAGS]
  return workdir, binary_cases('experiments.sweep_seeds', cases)


@pytest.mark.parametrize('case', range(len(BAD_FLAGS)), ids=[a[0] for a, _ in BAD_FLAGS])
def test_bad_sweep_flags_fail_in_one_line(refusals, case):
  workdir, results = refusals
  p, needle = results[case], BAD_FLAGS[case][1]
  lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith('WARNING')]
  assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), p.stderr
  assert needle in lines[0] and 'Traceback' not in p.stderr
  assert not os.path.exists(workdir / 'seed_0')  # refused before any training
