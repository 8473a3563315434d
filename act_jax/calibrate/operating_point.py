"""A run's operating point and what a threshold gives and costs.

- `run_operating_point`: the point a run serves at (an explicit threshold / cap, else the
  certified one of RUN/calibration.json, else the policy's default), validated against the
  model (`require_exits`: only policies with exits have one).
- `sweep`: for each candidate threshold, the held-out mean layers executed, accuracy, and the
  consistency with the full-depth model (fraction of tokens whose prediction is unchanged),
  run with inference.forward_while -- the loop that really stops.
- `time_decode`: wall-clock decoding per threshold vs full depth, round-robin in one process.
- `evaluate_run` (the `evaluate` binary): held-out quality and compute at operating points.
Certifying a point is certify.py; the accuracy frontier frontier.py; the decode benchmark
act_jax/bench/decode.py.

Dims: B batch, L length.
"""
from __future__ import annotations

import functools
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax import config as config_lib
from act_jax import data as data_lib
from act_jax.errors import ConfigError
from act_jax.infer import inference
from act_jax.model.halting import POLICIES
from act_jax.run import directory as run_lib
from act_jax.spec import NEVER_EXIT, OperatingPoint, Spec
from act_jax.train import training

# Conservative -> aggressive (a token exits when its score >= threshold).
DEFAULT_THRESHOLDS = (1.0, 0.995, 0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6,
                      0.5, 0.4, 0.3, 0.2, 0.1)


def require_exits(spec: Spec) -> None:
  """ConfigError unless the run's policy has an inference-time exit (policy.can_exit)."""
  if not spec.policy.can_exit:
    able = [n for n, c in sorted(POLICIES.items()) if c.can_exit]
    raise ConfigError(
        f'halting.name={spec.halting.name!r} has no inference-time exit to calibrate; '
        f'calibration needs a policy that can exit: {", ".join(able)}')


def run_operating_point(workdir: str, spec: Spec, threshold: Optional[float] = None,
                        max_layers: Optional[int] = None) -> tuple[OperatingPoint, str]:
  """THE default operating point of a run, what every binary uses: (point, where from).

  The user's --threshold / --max_layers when given; else the threshold (and cap) certified
  in RUN/calibration.json; else the policy's default (spec.default_operating_point: ACT
  1 − ε, the others halting.threshold). A --max_layers alone caps the calibrated (or
  default) threshold; a --threshold alone runs uncapped (the calibrated cap was certified
  with the calibrated threshold, not the user's)."""
  source = 'the policy default'
  op = spec.default_operating_point
  names = ('threshold', 'max_layers')  # how an error names them: where they came from
  saved = run_lib.read_calibration(workdir) if threshold is None else None
  if saved and saved.get('chosen_threshold') is not None:
    op = OperatingPoint(float(saved['chosen_threshold']), saved.get('max_layers'))
    source = run_lib.path(workdir, run_lib.CALIBRATION)
    names = (f'{source}: chosen_threshold', f'{source}: max_layers')
  if threshold is not None:
    inference.check_threshold(threshold, '--threshold')
    op, source, names = OperatingPoint(float(threshold)), '--threshold', ('--threshold',
                                                                          names[1])
  if max_layers is not None:
    op = OperatingPoint(op.threshold, max_layers)
    source += ', --max_layers'
    names = (names[0], '--max_layers')
  return op.validate(spec, *names), source


@functools.lru_cache(maxsize=8)
def _jitted_forward(spec: Spec):
  """One compiled while-loop forward per spec, shared by every sweep (frontier, calibrate)."""
  return jax.jit(lambda v, t, th: inference.forward_while(spec, v, t, th))


def sweep(spec, variables: dict, batches: Sequence[dict], thresholds: Sequence[float],
          log: Callable[[str], None] = lambda s: None,
          max_layers: Optional[int] = None) -> dict:
  """Per threshold (capped at max_layers when given): mean layers, accuracy, errors vs full
  depth over scored tokens, plus the static-truncation baseline."""
  spec = config_lib.as_spec(spec)
  fwd = _jitted_forward(spec)
  full_arg = OperatingPoint.full_depth().vector(spec)
  full, static_correct = [], 0.0
  w = [np.asarray(b['weights']) > 0 for b in batches]
  for b, m in zip(batches, w):
    logits, aux = fwd(variables, jnp.asarray(b['inputs']), full_arg)
    full.append(np.asarray(jnp.argmax(logits, -1)))
    if 'step_logits' in aux:  # every exit head ran: what a static shallower model would give
      pred_NBL = np.asarray(jnp.argmax(aux['step_logits'], -1))
      static_correct = static_correct + ((pred_NBL == b['targets']) & m).sum((1, 2))
  n = int(sum(x.sum() for x in w))
  full_acc = sum(((f == b['targets']) & m).sum() for f, b, m in zip(full, batches, w)) / max(n, 1)
  out = {k: [] for k in ('mean_layers', 'accuracy', 'num_errors', 'consistency', 'broken',
                         'fixed')}
  t0 = time.time()
  for k, thr in enumerate(thresholds):
    layers = correct = errors = broken = fixed = 0.0
    thr_arg = OperatingPoint(thr, max_layers).vector(spec)
    for b, f, m in zip(batches, full, w):
      logits, aux = fwd(variables, jnp.asarray(b['inputs']), thr_arg)
      pred = np.asarray(jnp.argmax(logits, -1))
      layers += float((np.asarray(aux['layers']) * m).sum())
      correct += float(((pred == b['targets']) & m).sum())
      errors += float(((pred != f) & m).sum())
      full_ok, ok = f == b['targets'], pred == b['targets']
      broken += float((full_ok & ~ok & m).sum())  # d = +1: the exit loses a right answer
      fixed += float((~full_ok & ok & m).sum())   # d = -1: the exit finds one
    out['mean_layers'].append(layers / n)
    out['accuracy'].append(correct / n)
    out['num_errors'].append(int(errors))
    out['consistency'].append(1.0 - errors / n)
    out['broken'].append(int(broken))
    out['fixed'].append(int(fixed))
    done = k + 1
    eta = (time.time() - t0) / done * (len(thresholds) - done)
    log(f'  threshold {thr:<6g} layers {layers / n:5.2f} acc {correct / n:.4f} '
        f'consistency {1 - errors / n:.4f}  [{done}/{len(thresholds)}, ETA {eta:.0f}s]')
  out.update(thresholds=[float(t) for t in thresholds], n=n, full_accuracy=float(full_acc),
             full_layers=float(spec.model.num_layers))
  if np.ndim(static_correct):
    # Static truncation baseline: every token leaves at the same exit (1-based layers).
    per_step = spec.model.num_layers // len(static_correct)
    out['static'] = {'layers': [per_step * (i + 1) for i in range(len(static_correct))],
                     'accuracy': [float(c) / n for c in static_correct]}
  return out


def time_decode(spec, variables: dict, prompt_BL: np.ndarray, thresholds: Sequence[float],
                new_tokens: int, repeats: int = 3, compact: bool = False,
                kv_fill: str = 'project', max_layers: Optional[int] = None) -> dict:
  """Median ms per generated token and mean layers, per threshold (one compile; the points
  are timed in turn, `repeats` rounds).

  With max_layers every point but NEVER_EXIT (the full-depth reference) is capped; every
  point is its OperatingPoint's per-step vector, so all share one compiled function."""
  ms, layers = [], []
  spec = config_lib.as_spec(spec)

  def arg(thr):
    if thr >= NEVER_EXIT:
      return OperatingPoint.full_depth().vector(spec)
    return OperatingPoint(thr, max_layers).vector(spec)

  run = lambda thr: inference.generate(spec, variables, prompt_BL, new_tokens, arg(thr),
                                       kv_fill=kv_fill, compact=compact)
  jax.block_until_ready(run(float(thresholds[0])))  # compile once: the vectors are traced
  times: list[list[float]] = [[] for _ in thresholds]
  outs: list = [None] * len(thresholds)
  for _ in range(repeats):  # round-robin: a noisy neighbour hits every point alike
    for k, thr in enumerate(thresholds):
      t = time.perf_counter()
      outs[k] = jax.block_until_ready(run(float(thr)))
      times[k].append(time.perf_counter() - t)
  for k in range(len(thresholds)):
    ms.append(1e3 * float(np.median(times[k])) / (new_tokens * prompt_BL.shape[0]))
    layers.append(float(np.mean(outs[k]['layers'])))
  return {'thresholds': [float(t) for t in thresholds], 'ms_per_token': ms,
          'mean_layers': layers}


def eval_prompts(spec, batch: int, length: int) -> np.ndarray:
  """Held-out prompts (alternating code / prose rows) for timing."""
  ds = data_lib.make_dataset(spec.data, spec.seed)
  rows = np.concatenate([b['inputs'] for b in ds.eval_batches(max(1, -(-batch // spec.data.batch_size)))])
  return rows[:batch, :length]


def evaluate_run(workdir: str, thresholds: Sequence[Optional[float]] = (None,),
                 num_batches: Optional[int] = None,
                 log: Callable[[str], None] = print,
                 max_layers: Optional[int] = None) -> list[dict]:
  """Held-out quality and compute of a trained run at one or more thresholds (None = the
  run's operating point, run_operating_point): per domain, per difficulty bucket, and
  Spearman(layers, difficulty). Logs an evaluation summary per point."""
  spec, variables, step = run_lib.load(workdir)
  points = [run_operating_point(workdir, spec, thr, max_layers) for thr in thresholds]
  n = num_batches or spec.train.eval_batches
  ds = data_lib.make_dataset(spec.data, spec.seed)
  batches = ds.eval_batches(n)
  eval_step = jax.jit(training.make_eval_step(spec))
  rows = []
  for op, source in points:
    res = training.evaluate(spec, variables, eval_step, batches, ds.domains,
                            threshold=op.vector(spec))
    log(training.evaluation_summary(spec, res, ds.domains, workdir, step, op,
                                    source, n))
    rows.append({'threshold': op.threshold, 'max_layers': op.max_layers, **res})
  return rows
