"""Multi-process training on one CPU machine: 2 processes x 2 devices joined over localhost.

The main test trains a tiny MoE + ACT model as one 4-device job of two processes, SIGKILLs
process 0 (the coordinator and primary checkpoint writer) once a checkpoint exists, checks
that the launcher reaped both, relaunches both, and compares the resumed result with one
process x 4 devices; then restores the multi-process checkpoint onto 1 process x 4
devices and onto 1 device. The launcher's own contracts (kill the rest on a failure, on a
timeout) and the one-line flag errors are checked in seconds, without training.
"""
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from act_jax.scale import multihost
from act_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
TIMEOUT = 300  # seconds for any one launch (compiling takes most of it on a busy machine)
CONFIG = 'experiments/configs/lm.py:router=top_k,halting=act,runlocal'
OVERRIDES = [  # MoE (top_k of 4 experts) in layer 2, ACT halting; a checkpoint every step
    '--config.model.num_layers=2', '--config.data.batch_size=8', f'--config.train.steps={STEPS}',
    '--config.train.checkpoint_every=1', '--config.train.log_every=1',
    '--config.train.eval_every=1000', '--config.train.eval_batches=1']


def _train_cmd(workdir):
  return [sys.executable, '-m', 'experiments.train', f'--config={CONFIG}',
          f'--workdir={workdir}', *OVERRIDES]


def _launch_cmd(workdir):
  return [sys.executable, '-m', 'experiments.launch_local', '--num_processes=2',
          '--devices_per_process=2', f'--timeout={TIMEOUT}', '--', *_train_cmd(workdir),
          '--config.train.multihost=True']


class _Proc:
  """Popen in its own session, output collected by a thread; `stop` kills the session."""

  def __init__(self, cmd, env=None):
    self.lines = []
    self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    self._t = threading.Thread(target=self._read, daemon=True)
    self._t.start()

  def _read(self):
    for line in self.p.stdout:
      self.lines.append(line)

  @property
  def output(self):
    return ''.join(self.lines)

  def wait(self, timeout=TIMEOUT + 30):
    self.p.wait(timeout=timeout)
    self._t.join(10)
    return self.p.returncode

  def stop(self):
    try:  # the launcher and whatever of its session is left, even after it exited
      os.killpg(self.p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.p.wait()
    self._t.join(10)
    self.p.stdout.close()


def _complete_steps(ckdir):
  # Orbax renames a step's temporary directory to '<step>' only once every process wrote it.
  return sorted(int(n) for n in os.listdir(ckdir) if n.isdigit()) if os.path.isdir(ckdir) else []


def _alive(pid):
  try:
    os.kill(pid, 0)
    return True
  except ProcessLookupError:
    return False


@pytest.mark.slow  # ~110 s: 2 processes trained, killed and resumed, then 1 process
def test_two_processes_kill_resume_match_one_process(multidevice, tmp_path):
  ref_dir, mp_dir = str(tmp_path / 'ref'), str(tmp_path / 'mp')
  ckdir = os.path.join(mp_dir, 'checkpoints')
  # The relaunch reuses what the first launch compiled (half of a run's time here).
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  procs = []
  try:
    # The 1-process x 4-device reference runs alongside the first launch.
    ref = _Proc(_train_cmd(ref_dir), env=multihost.local_env(4, env))
    first = _Proc(_launch_cmd(mp_dir), env=env)
    procs += [ref, first]
    deadline = time.time() + TIMEOUT
    while not _complete_steps(ckdir) and first.p.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert first.p.poll() is None, f'the run ended before it could be killed:\n{first.output}'
    assert _complete_steps(ckdir), f'no checkpoint after {TIMEOUT}s:\n{first.output}'
    pids = [int(p) for p in re.findall(r'\[launch_local\] process \d: pid (\d+)', first.output)]
    assert len(pids) == 2, first.output
    os.kill(pids[0], signal.SIGKILL)
    assert first.wait(timeout=120) == 1, first.output
    assert 'process 0 exited with -9: killing the others' in first.output, first.output
    assert re.search(r'exit codes \[-9, -?\d+\]', first.output), first.output  # both waited
    assert not any(_alive(p) for p in pids)
    killed_at = _complete_steps(ckdir)[-1]
    assert killed_at < STEPS, killed_at

    second = _Proc(_launch_cmd(mp_dir), env=env)
    procs.append(second)
    assert second.wait() == 0, second.output
    for i in (0, 1):
      assert re.search(rf'\[{i}\] resumed from step \d+', second.output), second.output
    assert ref.wait() == 0, ref.output
  finally:
    for p in procs:
      p.stop()

  out = multidevice(f'''
    import json, os, jax, numpy as np
    from act_jax.run import checkpointing
    from act_jax.scale import sharding
    from act_jax import telemetry
    from act_jax.run import state as run_state
    from act_jax.train import training
    from experiments.configs import lm
    c = lm.get_config({CONFIG.split(':')[1]!r})
    c.model.num_layers, c.data.batch_size = 2, 8

    def restore(workdir, n_devices):
      shape = (n_devices,) + (1,) * (len(sharding.MESH_AXES) - 1)
      abstract, _ = run_state.state_shardings(c, sharding.make_mesh(shape=shape))
      ck = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
      assert ck.latest_step() == {STEPS}, ck.latest_step()
      return jax.device_get(ck.restore({STEPS}, abstract))

    ref, mp4, mp1 = restore({ref_dir!r}, 4), restore({mp_dir!r}, 4), restore({mp_dir!r}, 1)
    # Not bitwise: XLA's in-process all-reduce adds the 4 devices' partial sums in another
    # order than 2 local sums joined by gloo (a resumed run equals an uninterrupted one of the
    # same layout bit for bit; the per-step losses below check that where steps repeat).
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), mp4, ref)
    jax.tree.map(np.testing.assert_array_equal, mp4, mp1)  # a reshard moves bits, no math
    loss = lambda w: {{r['step']: r['loss'] for r in telemetry.read_metrics(w, split='train')}}
    lr, lm_ = loss({ref_dir!r}), loss({mp_dir!r})  # resumed steps: the rerun's value is last
    assert sorted(lr) == sorted(lm_) == list(range(1, {STEPS + 1})), (lr, lm_)
    np.testing.assert_allclose([lm_[s] for s in lr], list(lr.values()), rtol=0, atol=1e-5)
    # A step logged before the kill and again after the resume: same layout, same bits.
    seen = {{}}
    for line in open(os.path.join({mp_dir!r}, 'metrics.jsonl')):
      try:
        r = json.loads(line)
      except ValueError:  # the line process 0 was writing when it was killed
        continue
      if r.get('split') == 'train':
        seen.setdefault(r['step'], []).append(r['loss'])
    assert all(len(set(v)) == 1 for v in seen.values()), seen
    print('OK max|multi - single|', max(float(np.max(np.abs(a - b))) for a, b in
          zip(jax.tree.leaves(mp4), jax.tree.leaves(ref))), 'steps logged twice',
          sum(len(v) > 1 for v in seen.values()))
  ''', devices=4)
  assert 'OK' in out, out
  print(out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- no JAX
def _sleeper(code_if_first):
  """A command whose process 0 exits with code_if_first at once; the others sleep."""
  return [sys.executable, '-c', 'import sys, time\n'
          f'if sys.argv[-1] == "--process_id=0": sys.exit({code_if_first})\n'
          'time.sleep(120)']


def test_launcher_kills_the_others_when_one_fails():
  t = time.time()
  log = io.StringIO()
  codes = multihost.launch_local(_sleeper(3), 3, 1, timeout=60, out=log)
  assert codes == [3, -9, -9] and time.time() - t < 30, log.getvalue()
  assert 'process 0 exited with 3: killing the others' in log.getvalue()


def test_launcher_timeout_kills_every_process():
  t = time.time()
  with pytest.raises(TimeoutError, match='killed all 2 processes'):
    multihost.launch_local(_sleeper(0), 2, 1, timeout=2, out=io.StringIO())
  assert time.time() - t < 30


def test_bad_process_flags_are_one_line_config_errors():
  with pytest.raises(ConfigError, match=r'--process_id=2: must be in \[0, 1\]'):
    multihost.initialize('127.0.0.1:1234', 2, 2)
  with pytest.raises(ConfigError, match='--num_processes is required'):
    multihost.initialize('127.0.0.1:1234', None, 0)
  with pytest.raises(ConfigError, match='--coordinator_address=.*host:port'):
    multihost.initialize('localhost', 2, 0)
  with pytest.raises(ConfigError, match=r'--process_id: only used by multi-process runs'):
    multihost.maybe_initialize(False, multihost.Cluster(process_id=0))


def test_train_binary_refuses_process_flags_without_multihost(tmp_path):
  proc = subprocess.run(_train_cmd(str(tmp_path)) + ['--num_processes=2'], cwd=REPO,
                        env=multihost.local_env(1), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      'error: --num_processes: only used by multi-process runs; add '
      '--config.train.multihost=True (or drop them)'], proc.stderr
