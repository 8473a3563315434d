"""Shared pytest setup for the act_jax suite (docs/testing.md: the tiers, what they cost).

- JAX runs on the CPU; f32 matmuls there are exact enough for the 1e-5 equivalence tests.
- **One compilation cache per suite run.** JAX's persistent cache lives in a temporary folder
  (or in $JAX_COMPILATION_CACHE_DIR if the caller set one, to keep it between runs). The
  environment carries it into every process the suite starts -- binaries, multi-device
  children, notebook kernels -- so a program compiled by one test is loaded, not compiled,
  by the next one that builds the same program (same HLO, devices and flags).
- **Shared trained runs.** `shared_runs.path(name)` trains the tiny run `name` of RUNS once
  per suite run, on first use, and hands out its folder to read; a test that writes into a
  run (calibration.json, report/, ...) takes `shared_runs.copy(name, dst)`. At the end of
  the session every shared run must be unchanged: a test that wrote into one fails the run.
- **XLA at optimisation level 0** for every process of the suite (the models are tiny:
  compiling is most of a test's time); ACT_JAX_TEST_XLA_OPT=1 keeps XLA's default.
- **Grouped subprocesses.** `binary_cases(module, cases)` runs several command lines of one
  binary in one interpreter (each parsed and run as `python -m module ARGS` would be, with
  its exit status and stderr captured), so a binary's refusals cost one start-up;
  `run_multidevice` starts a fresh interpreter with N fake CPU devices, and
  `run_multidevice_group` runs a file's multi-device checks in one such interpreter.
- **Order and the budget.** The longest files run first (pytest-xdist hands out files in
  that order); the summary lists every default-tier test that took over 30 s.
"""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Callable

import pytest

# With the 'tpu' extra installed on a CPU machine, jax would probe for a TPU at start-up;
# the tests run on the CPU (AOT tests reach libtpu through jax.experimental.topologies).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# The compile cache: set before anything imports jax (conftest is imported first), and in
# os.environ so that every subprocess inherits it. Every program is cached, however small or
# fast to compile: the suite builds the same small programs in many processes.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='act_jax_jit_cache_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# A size limit turns on jax's file lock around every cache read and write (lru_cache.py):
# without it an entry is written in place, and a process reading it while another writes
# it (two workers, or the processes of a multi-process test, compiling the same program)
# can load half an executable and crash (seen once: a segfault in get_executable_and_time).
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(64 * 2**30))
# XLA:CPU without LLVM's optimisation passes: the suite's models are tiny, so compiling is
# most of every test's time and this halves it (measured in docs/testing.md); both sides of
# every equivalence test are compiled alike. ACT_JAX_TEST_XLA_OPT=1 keeps XLA's default.
if os.environ.get('ACT_JAX_TEST_XLA_OPT', '') in ('', '0') and \
    '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()
# The shared runs' folder, made by the first process (the xdist controller, if any).
_OWN_RUNS = 'ACT_JAX_SHARED_RUNS' not in os.environ
if _OWN_RUNS:
  os.environ['ACT_JAX_SHARED_RUNS'] = tempfile.mkdtemp(prefix='act_jax_shared_runs_')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW_LINE_S = 30.0  # default-tier tests above this are listed at the end of every run


# ----------------------------------------------------------------------------- subprocesses
def _device_env(devices: int) -> dict[str, str]:
  """This process's environment (the compile cache, XLA flags) with `devices` CPU devices."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                      f' --xla_force_host_platform_device_count={devices}').strip()
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def run_multidevice(code: str, devices: int = 8, timeout: int = 600) -> str:
  """Runs `code` in a fresh interpreter that sees `devices` fake CPU devices.

  XLA_FLAGS must be set before jax is imported, hence a subprocess (it inherits the compile
  cache). A file's several checks can share one child: `run_multidevice_group`."""
  proc = subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
                        env=_device_env(devices),
                        capture_output=True, text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
  return proc.stdout


@pytest.fixture
def multidevice():
  return run_multidevice


_GROUP_CHILD = r'''
import contextlib, io, json, sys, textwrap, traceback
with open(sys.argv[1]) as f:
  codes = json.load(f)
results = {}
for name, code in codes.items():
  out, ok = io.StringIO(), True
  with contextlib.redirect_stdout(out):
    try:  # each check in a namespace of its own; the interpreter (jax, its caches) is shared
      exec(compile(textwrap.dedent(code), f'<{name}>', 'exec'), {'__name__': '__main__'})
    except BaseException:
      ok = False
      traceback.print_exc(file=out)
  results[name] = {'ok': ok, 'out': out.getvalue()}
with open(sys.argv[2], 'w') as f:
  json.dump(results, f)
'''


class MultideviceGroup:
  """The outputs of several multi-device checks run in one child (`run_multidevice_group`);
  `output(name)` fails only the test that owns a failed check, with its traceback."""

  def __init__(self, results: dict[str, dict[str, Any]]):
    self.results = results

  def output(self, name: str) -> str:
    r = self.results[name]
    if not r['ok']:
      raise AssertionError(f'multi-device check {name!r} failed:\n{r["out"]}')
    return r['out']


def run_multidevice_group(codes: dict[str, str], devices: int = 8,
                          timeout: int = 900) -> MultideviceGroup:
  """Runs each of `codes` (name -> code) as `run_multidevice` would, all in one child
  interpreter with `devices` fake CPU devices: a file's multi-device checks pay for one
  start-up and share what the child compiled."""
  with tempfile.TemporaryDirectory() as tmp:
    src, dst = os.path.join(tmp, 'codes.json'), os.path.join(tmp, 'results.json')
    with open(src, 'w') as f:
      json.dump(codes, f)
    proc = subprocess.run([sys.executable, '-c', _GROUP_CHILD, src, dst], cwd=REPO,
                          env=_device_env(devices), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(dst):
      raise AssertionError(f'multi-device group failed ({proc.returncode}):\n{proc.stdout}\n'
                           f'{proc.stderr[-3000:]}')
    with open(dst) as f:
      return MultideviceGroup(json.load(f))


_CASES_CHILD = r'''
import contextlib, importlib, io, json, sys
from absl import flags
import experiments
module_name, cases, out_path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
module = importlib.import_module(module_name)
results = []
for argv in cases:
  flags.FLAGS.unparse_flags()
  out, err = io.StringIO(), io.StringIO()
  code = 0
  sys.argv = [module_name] + argv
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      experiments.run(module.main)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # a traceback: what the binary would print, status 1
      import traceback
      traceback.print_exc()
      code = 1
  results.append({'returncode': code, 'stdout': out.getvalue(), 'stderr': err.getvalue()})
with open(out_path, 'w') as f:
  json.dump(results, f)
'''


def binary_cases(module: str, cases: list[list[str]], env: dict[str, str] | None = None,
                 timeout: int = 600) -> list[subprocess.CompletedProcess]:
  """Each of `cases` (argument lists) run as `python -m module ARGS` would run it, all in one
  fresh interpreter: flags are parsed anew and `experiments.run(main)` reports errors as the
  binary does. Returns one CompletedProcess (returncode, stdout, stderr) per case."""
  full_env = {k: v for k, v in os.environ.items() if k != 'ACT_JAX_TRACEBACK'}
  full_env.update(env or {})
  with tempfile.TemporaryDirectory() as tmp:
    dst = os.path.join(tmp, 'results.json')
    proc = subprocess.run([sys.executable, '-c', _CASES_CHILD, module, json.dumps(cases), dst],
                          cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not os.path.exists(dst):
      raise AssertionError(f'{module} cases: the child failed ({proc.returncode}):\n'
                           f'{proc.stderr[-3000:]}')
    with open(dst) as f:
      results = json.load(f)
  return [subprocess.CompletedProcess([module] + a, r['returncode'], r['stdout'], r['stderr'])
          for a, r in zip(cases, results)]


# ----------------------------------------------------------------------------- shared runs
def _lm(**train: Any) -> Any:
  from experiments.configs import lm
  c = lm.get_config('runlocal')  # confidence exits + top-2 MoE (4 experts), 4 layers
  c.train.update(**train)
  return c


def _run_lm() -> Any:
  c = _lm(steps=10, log_every=5, eval_every=5, checkpoint_every=5, keep_checkpoints=2,
          eval_batches=1)
  c.moe.bias_rate = 0.01  # a non-trivial moe_state that every reader must carry
  return c


def _run_lm_qat_w8() -> Any:
  c = _lm(steps=3, eval_every=1000)
  c.quant.scheme = 'w8'  # quantization-aware: float master weights, w8 in the forward
  return c


def _run_lm_shared_expert() -> Any:
  c = _lm(steps=3, eval_every=1000)
  c.moe.shared_experts = 1  # the generalist of moe.fallback
  return c


def _run_policy(policy: str) -> Callable[[], Any]:
  def make():
    from experiments.configs import lm
    c = lm.get_config(f'halting={policy},runlocal')
    c.train.update(steps=4, eval_every=1000, log_every=2)
    return c
  return make


# name -> (config maker, what it is). Each trained once per suite run, on first use.
RUNS: dict[str, tuple[Callable[[], Any], str]] = {
    'lm': (_run_lm, 'runlocal LM (confidence exits + top-k MoE with a bias state), 10 '
                    'steps, checkpoints at 5 and 10, eval every 5'),
    'lm_qat_w8': (_run_lm_qat_w8, 'runlocal LM trained quantization-aware at w8, 3 steps'),
    'lm_shared_expert': (_run_lm_shared_expert, 'runlocal LM with one shared expert, 3 steps'),
    **{f'policy_{p}': (_run_policy(p), f'runlocal LM with halting={p}, 4 steps')
       for p in ('act', 'pondernet', 'learned_exit', 'mod')},  # confidence: 'lm'
}


def _fingerprint(path: str) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, path)] = hashlib.sha1(f.read()).hexdigest()
  return out


class SharedRuns:
  """The RUNS, trained on first use into one folder for the whole suite run (see the module
  docstring). With pytest-xdist the workers share the folder: the first worker to need a run
  trains it under a file lock, the others wait and read it."""

  def __init__(self, root: str):
    self.root = root

  def _ready(self, name: str) -> str:
    if name not in RUNS:
      raise KeyError(f'no shared run {name!r}; known: {sorted(RUNS)}')
    path = os.path.join(self.root, name)
    done = path + '.done.json'
    with open(path + '.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
      if not os.path.exists(done):
        from act_jax.train import training
        shutil.rmtree(path, ignore_errors=True)  # a worker that died mid-training
        lines: list[str] = []
        t = time.time()
        res = training.train_and_evaluate(RUNS[name][0](), path, log=lines.append)
        lines.append(f'(shared run {name}: trained in {time.time() - t:.1f} s)')
        tmp = done + '.tmp'
        with open(tmp, 'w') as f:
          json.dump({'results': res, 'log': lines, 'files': _fingerprint(path)}, f,
                    default=float)  # numpy scalars
        os.replace(tmp, done)
    return done

  def path(self, name: str) -> str:
    """The trained run's folder: read it, never write into it (take a copy for that)."""
    self._ready(name)
    return os.path.join(self.root, name)

  def results(self, name: str) -> dict[str, float]:
    """What train_and_evaluate returned for `name` (its final evaluation)."""
    with open(self._ready(name)) as f:
      return json.load(f)['results']

  def log(self, name: str) -> list[str]:
    """The lines train_and_evaluate logged while training `name`."""
    with open(self._ready(name)) as f:
      return json.load(f)['log']

  def copy(self, name: str, dst: str) -> str:
    """A private copy of the run at `dst` (which must not exist), to write into."""
    shutil.copytree(self.path(name), dst)
    return dst

  def changed(self) -> list[str]:
    """Shared runs whose files differ from what training left: a test wrote into them."""
    bad = []
    for name in RUNS:
      done = os.path.join(self.root, name + '.done.json')
      if not os.path.exists(done):
        continue
      with open(done) as f:
        before = json.load(f)['files']
      after = _fingerprint(os.path.join(self.root, name))
      diff = sorted(set(before) ^ set(after) | {k for k in before.keys() & after.keys()
                                                 if before[k] != after[k]})
      if diff:
        bad.append(f'{name}: {diff[:5]}')
    return bad


@pytest.fixture(scope='session')
def shared_runs() -> SharedRuns:
  runs = SharedRuns(os.environ['ACT_JAX_SHARED_RUNS'])
  yield runs
  bad = runs.changed()
  assert not bad, f'tests wrote into shared runs (use shared_runs.copy): {bad}'


# ----------------------------------------------------------------------------- the order
# The files that take longest run first: pytest-xdist (`-n 2 --dist loadfile`, pytest.ini)
# hands out whole files in this order, so the short ones fill in at the end instead of one
# long file running alone. Tests never depend on their order (each file also runs alone).
LONGEST_FIRST = ('test_training', 'test_retrieval', 'test_serving', 'test_quant',
                 'test_halting_model', 'test_inference', 'test_speculative', 'test_notebooks',
                 'test_moe_sharding', 'test_model', 'test_spec', 'test_operating_point',
                 'test_aot', 'test_moe_model', 'test_moe')


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  key = lambda item: rank.get(item.path.stem, len(rank))  # noqa: E731
  items[:] = sorted(items, key=key)  # stable: a file's tests keep their order


# ----------------------------------------------------------------------------- the budget
_SECONDS: dict[str, float] = {}  # nodeid -> set-up + call + tear-down
_SLOW_TIER: set[str] = set()


def pytest_runtest_logreport(report):
  _SECONDS[report.nodeid] = _SECONDS.get(report.nodeid, 0.0) + report.duration
  if 'slow' in report.keywords:
    _SLOW_TIER.add(report.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  over = sorted(((s, n) for n, s in _SECONDS.items()
                 if s > SLOW_LINE_S and n not in _SLOW_TIER), reverse=True)
  terminalreporter.section(f'default-tier tests over {SLOW_LINE_S:.0f} s, set-up included '
                           '(the budget: docs/testing.md)')
  if not over:
    terminalreporter.write_line('none')
  for seconds, nodeid in over:
    terminalreporter.write_line(f'{seconds:7.1f} s  {nodeid}')


def pytest_sessionfinish(session, exitstatus):
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  if _OWN_RUNS:
    shutil.rmtree(os.environ['ACT_JAX_SHARED_RUNS'], ignore_errors=True)
