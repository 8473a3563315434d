r"""Multi-process JAX: joining one job, and launching one on a single machine.

Launch model. A multi-process (multi-host) run is N copies of the SAME command, one per
process. Each process owns its local devices; `jax.distributed.initialize` joins them into
one job whose `jax.devices()` are all N * local devices, and every process then runs the
same program on global arrays (SPMD): the same batches (a pure function of (seed, step)),
the same steps, the same checkpoint calls. JAX moves data between processes with
collectives; Orbax has every process write its own shards of one checkpoint, so --workdir
must be a directory that every process sees (a shared filesystem, or gs://).

- TPU pod (also SLURM, and the other clusters JAX detects): run the same command on every
  host and pass no coordinator flags; `initialize()` finds the coordinator, the process
  count and this host's index itself:
      gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd REPO && \
        python -m experiments.train --config=experiments/configs/lm.py \
        --workdir=gs://BUCKET/runs/lm --config.train.multihost=True"
- One machine, CPU (tests, debugging the multi-process paths without a pod): `launch_local`
  (or experiments/launch_local.py) starts N local processes with D CPU devices each and
  appends --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i to each;
  `initialize(address, N, i)` then joins them over gloo, JAX's CPU cross-process collectives.
      python -m experiments.launch_local --num_processes=2 --devices_per_process=2 -- \
        python -m experiments.train --config=experiments/configs/lm.py:runlocal \
        --workdir=/tmp/mp --config.train.multihost=True

The launcher always reaps every child: when one process fails the others would wait for it
forever inside a collective, so they are killed; so are all of them on a timeout or Ctrl-C.
SIGTERM to the launcher is forwarded (training then saves a checkpoint and stops, all
processes at the same step). `benchmark` times one config as N local processes against one
process with as many devices (experiments/benchmark_multiprocess.py).
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional, Sequence, TextIO

import jax
import numpy as np

from act_jax import telemetry
from act_jax.errors import ConfigError

# Seconds children get after a forwarded SIGTERM (to save a checkpoint) / Ctrl-C to exit.
GRACE_SECONDS = 60.0
INTERRUPT_GRACE_SECONDS = 10.0
_FLAGS = ('coordinator_address', 'num_processes', 'process_id')
_joined: Optional[tuple] = None  # the arguments this process joined its job with


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process sits in a multi-process job; all None = auto-detect (TPU pod)."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in dataclasses.astuple(self))


def _check(coordinator_address: Optional[str], num_processes: Optional[int],
           process_id: Optional[int]) -> None:
  given = dict(zip(_FLAGS, (coordinator_address, num_processes, process_id)))
  missing = [k for k, v in given.items() if v is None]
  if missing:
    have = ', '.join(f'--{k}' for k, v in given.items() if v is not None)
    raise ConfigError(f'--{missing[0]} is required with {have}: pass all of '
                      f'--coordinator_address, --num_processes, --process_id (none on a TPU pod)')
  m = re.fullmatch(r'(.+):(\d+)', str(coordinator_address))
  if not m or not 0 < int(m.group(2)) < 65536:
    raise ConfigError(f'--coordinator_address={coordinator_address!r}: must be host:port of '
                      f'process 0, e.g. 127.0.0.1:12355')
  if not isinstance(num_processes, int) or isinstance(num_processes, bool) or num_processes < 1:
    raise ConfigError(f'--num_processes={num_processes!r}: must be a positive integer')
  if (not isinstance(process_id, int) or isinstance(process_id, bool)
      or not 0 <= process_id < num_processes):
    raise ConfigError(f'--process_id={process_id!r}: must be in [0, {num_processes - 1}] '
                      f'(--num_processes={num_processes})')


def _use_gloo() -> None:
  # CPU processes exchange data only through a cross-process collectives library (gloo ships
  # with jaxlib; without one, cross-process CPU collectives fail). The option configures the
  # CPU client only, so it is harmless on GPU/TPU; an explicit user choice (mpi) is kept.
  current = getattr(jax.config, 'jax_cpu_collectives_implementation', 'absent')
  if current in (None, 'none', ''):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Joins this process to its multi-process job; call before JAX touches any device.

  No arguments: auto-detect (TPU pod, SLURM, ...). With arguments (all three): join the
  coordinator at host:port as process `process_id` of `num_processes`, on CPU over gloo.
  Calling it again with the same arguments, or after the caller already ran
  jax.distributed.initialize itself, does nothing. Bad arguments raise ConfigError naming
  the flag."""
  global _joined
  args = (coordinator_address, num_processes, process_id)
  explicit = any(a is not None for a in args)
  if explicit:
    _check(*args)
  if _joined is not None:
    if _joined != args:
      raise ConfigError(f'this process already joined a multi-process job with '
                        f'{dict(zip(_FLAGS, _joined))}; it cannot join another')
    return
  is_initialized = getattr(jax.distributed, 'is_initialized', lambda: False)  # not in all jax
  if is_initialized():  # the caller joined it (e.g. a notebook)
    _joined = args
    return
  if explicit:
    _use_gloo()
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  _joined = args


def maybe_initialize(multihost: bool, cluster: Optional[Cluster] = None) -> None:
  """train.multihost=True: initialize(cluster); coordinator flags without it are refused
  (they would be silently ignored and N processes would train N separate models)."""
  cluster = cluster or Cluster()
  if multihost:
    initialize(*dataclasses.astuple(cluster))
  elif cluster.explicit:
    given = ' '.join(f'--{k}' for k, v in zip(_FLAGS, dataclasses.astuple(cluster))
                     if v is not None)
    raise ConfigError(f'{given}: only used by multi-process runs; add '
                      f'--config.train.multihost=True (or drop them)')


# ----------------------------------------------------------------------------- launching
def free_port() -> int:
  """A TCP port free on localhost now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def local_env(devices_per_process: int, base: Optional[dict] = None) -> dict[str, str]:
  """Environment of a local CPU process with `devices_per_process` devices."""
  env = dict(os.environ if base is None else base)
  flags = re.sub(r'--xla_force_host_platform_device_count=\S*', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = f'{flags.strip()} --xla_force_host_platform_device_count=' \
                     f'{devices_per_process}'.strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONUNBUFFERED'] = '1'  # lines reach the launcher as they are printed
  return env


def _libc() -> Any:
  try:
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith('linux') else None
  except OSError:
    return None


_LIBC = _libc()


def _die_with_parent() -> None:
  # Runs in the child between fork and exec: a SIGKILLed launcher takes its children along
  # (Linux PR_SET_PDEATHSIG = 1) instead of leaving them blocked in collectives.
  if _LIBC is not None:
    _LIBC.prctl(1, int(signal.SIGKILL))


def _pump(stream: TextIO, prefix: str, out: TextIO, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ''):
    with lock:
      out.write(prefix + line)
      out.flush()


def _reap(procs: Sequence[subprocess.Popen], grace: float) -> None:
  """SIGTERM (if grace > 0), up to `grace` seconds, then SIGKILL; waits for every child."""
  live = [p for p in procs if p.poll() is None]
  if grace > 0:
    for p in live:
      p.terminate()
    end = time.monotonic() + grace
    while time.monotonic() < end and any(p.poll() is None for p in live):
      time.sleep(0.05)
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait()


def launch_local(argv: list[str], num_processes: int, devices_per_process: int,
                 port: Optional[int] = None, timeout: Optional[float] = None,
                 out: Optional[TextIO] = None) -> list[int]:
  """Runs `num_processes` copies of `argv` as one multi-process job of local CPU processes.

  Each copy gets `devices_per_process` CPU devices (XLA_FLAGS), JAX_PLATFORMS=cpu and
  --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i appended (PORT: a
  free one unless given). Output lines are prefixed '[i] ' and written to `out` (stdout).
  When a process exits non-zero the others are killed (they would wait for it forever);
  on `timeout` seconds all are killed and TimeoutError is raised. SIGTERM to the launcher
  is forwarded (SIGKILL after GRACE_SECONDS); Ctrl-C stops them all (SIGTERM, then
  SIGKILL after INTERRUPT_GRACE_SECONDS) and re-raises. Every child is reaped before this
  returns or raises. Returns the exit codes (-9: killed)."""
  _check_counts(num_processes, devices_per_process)
  if not argv:
    raise ConfigError('no command to launch: put it after --, e.g. -- python -m '
                      'experiments.train ...')
  if shutil.which(argv[0]) is None:
    raise ConfigError(f'{argv[0]}: no such command (not an executable on PATH); put the '
                      'command after --, e.g. -- python -m experiments.train ...')
  out = out or sys.stdout
  port = port or free_port()
  env = local_env(devices_per_process)
  lock = threading.Lock()

  def say(msg: str) -> None:
    with lock:
      out.write(f'[launch_local] {msg}\n')
      out.flush()

  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  terminated = []  # SIGTERM to the launcher: forwarded once, then a grace period
  in_main = threading.current_thread() is threading.main_thread()
  if in_main:  # signal handlers can only be set from the main thread
    old_handler = signal.signal(signal.SIGTERM, lambda *_: terminated.append(time.monotonic()))
  deadline = None if timeout is None else time.monotonic() + timeout
  try:
    for i in range(num_processes):
      cmd = list(argv) + [f'--coordinator_address=127.0.0.1:{port}',
                          f'--num_processes={num_processes}', f'--process_id={i}']
      procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1,
                                    preexec_fn=_die_with_parent))
    # Output threads start after the last fork (forking next to running threads is fragile).
    for i, p in enumerate(procs):
      say(f'process {i}: pid {p.pid}')
      pumps.append(threading.Thread(target=_pump, args=(p.stdout, f'[{i}] ', out, lock),
                                    daemon=True))
      pumps[-1].start()
    forwarded = False
    while any(p.poll() is None for p in procs):
      failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
      if failed:
        say(f'process {failed[0][0]} exited with {failed[0][1]}: killing the others')
        break
      if terminated and not forwarded:
        say('SIGTERM: forwarding it to every process')
        for p in procs:
          if p.poll() is None:
            p.terminate()
        forwarded = True
      if terminated and time.monotonic() - terminated[0] > GRACE_SECONDS:
        say(f'processes still running {GRACE_SECONDS:.0f}s after SIGTERM: killing them')
        break
      if deadline is not None and time.monotonic() > deadline:
        _reap(procs, grace=0)
        raise TimeoutError(f'launch_local: killed all {num_processes} processes after '
                           f'{timeout:g}s: {argv}')
      time.sleep(0.05)
    _reap(procs, grace=0)  # survivors of a failure cannot progress: no grace
  except KeyboardInterrupt:
    say('interrupted: stopping every process')
    _reap(procs, grace=INTERRUPT_GRACE_SECONDS)
    raise
  finally:
    _reap(procs, grace=0)
    for t in pumps:
      t.join(timeout=5)
    for p in procs:
      if p.stdout is not None:
        p.stdout.close()
    if in_main:
      signal.signal(signal.SIGTERM, signal.SIG_DFL if old_handler is None else old_handler)
  codes = [p.returncode for p in procs]
  say(f'exit codes {codes}')
  return codes


# ----------------------------------------------------------------------------- benchmark
def _check_counts(num_processes: int, devices_per_process: int) -> None:
  if not isinstance(num_processes, int) or num_processes < 1:
    raise ConfigError(f'--num_processes={num_processes!r}: must be a positive integer')
  if not isinstance(devices_per_process, int) or devices_per_process < 1:
    raise ConfigError(f'--devices_per_process={devices_per_process!r}: must be a positive '
                      f'integer')
  # local processes share this machine's cores: past this many, a launch only thrashes
  limit = 4 * (os.cpu_count() or 1)
  if num_processes > limit:
    raise ConfigError(f'--num_processes={num_processes}: at most {limit} local processes '
                      f'(4 per CPU core of this machine); a pod runs one process per host')


def benchmark(config: str, overrides: Sequence[str] = (), steps: int = 30,
              num_processes: int = 2, devices_per_process: int = 2, warmup: int = 5,
              timeout: Optional[float] = None, workdir: Optional[str] = None) -> list[dict]:
  """Training steps/s of one config as `num_processes` x `devices_per_process` CPU processes
  and as 1 process x the same device count, run one after the other (never side by side).

  Both runs have the same global mesh, batch and program, so the ratio is what crossing
  processes costs: gloo collectives instead of in-process ones, plus the per-step host
  syncs (metrics, the stop agreement). Each run is `python -m experiments.train` with
  log_every=1 and no checkpoint or evaluation until the end; the rate is 1 / the median
  step time of the steps after `warmup` (compilation), read from metrics.jsonl."""
  _check_counts(num_processes, devices_per_process)  # before the 1-process run, not after
  if steps <= warmup:
    raise ConfigError(f'--steps={steps}: must exceed the {warmup} warm-up steps')
  total = num_processes * devices_per_process
  root = workdir or tempfile.mkdtemp(prefix='act_jax_bench_')
  rows = [_timed_run(config, overrides, steps, procs, per, warmup, timeout, root)
          for procs, per in ((1, total), (num_processes, devices_per_process))]
  if workdir is None:  # kept when a run fails: its launch.log is named in the error
    shutil.rmtree(root, ignore_errors=True)
  return rows


def _timed_run(config: str, overrides: Sequence[str], steps: int, procs: int, per: int,
               warmup: int, timeout: Optional[float], root: str) -> dict:
  wd = os.path.join(root, f'{procs}x{per}')
  cmd = [sys.executable, '-m', 'experiments.train', f'--config={config}', f'--workdir={wd}',
         *overrides, f'--config.train.steps={steps}', '--config.train.log_every=1',
         f'--config.train.eval_every={steps + 1}', f'--config.train.checkpoint_every={steps}',
         '--config.train.eval_batches=1']
  os.makedirs(wd, exist_ok=True)
  log_path = os.path.join(wd, 'launch.log')
  t = time.time()
  with open(log_path, 'w') as log:
    if procs == 1:  # the baseline: a plain single-process run, no distributed runtime
      codes = [subprocess.run(cmd, env=local_env(per), stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout).returncode]
    else:
      codes = launch_local(cmd + ['--config.train.multihost=True'], procs, per,
                           timeout=timeout, out=log)
  if any(codes):
    with open(log_path) as f:
      tail = ''.join(f.readlines()[-30:])
    raise RuntimeError(f'benchmark run {procs}x{per} failed ({codes}); {log_path} ends:\n'
                       f'{tail}')
  times = [r['step_time'] for r in telemetry.read_metrics(wd, split='train')
           if r['step'] > warmup and 'step_time' in r]
  return dict(layout=f'{procs} process{"es" if procs > 1 else ""} x {per} devices',
              processes=procs, devices_per_process=per,
              steps_per_sec=1.0 / float(np.median(times)), timed_steps=len(times),
              wall_s=time.time() - t)


def format_table(rows: Sequence[dict]) -> str:
  """The benchmark rows, and the multi-process rate as a fraction of the single-process one."""
  lines = [f'{"layout":<28} {"steps/s":>8} {"ms/step":>8} {"timed steps":>11} {"wall s":>7}']
  for r in rows:
    lines.append(f'{r["layout"]:<28} {r["steps_per_sec"]:>8.2f} '
                 f'{1000 / r["steps_per_sec"]:>8.1f} {r["timed_steps"]:>11d} {r["wall_s"]:>7.0f}')
  base, multi = rows[0], rows[-1]
  lines.append(f'ratio {multi["layout"]} / {base["layout"]}: '
               f'{multi["steps_per_sec"] / base["steps_per_sec"]:.2f}x steps/s')
  return '\n'.join(lines)
