"""Generalist fallback on a trained run: calibrate the threshold, measure in and out of domain.

The mechanism is act_jax/model/moe/fallback.py (moe.fallback, moe.fallback_threshold); this file
turns it on for a trained run with a shared expert:
  * calibrate: the run at its operating point on in-domain held-out batches; the threshold
    is the `rate` quantile of the router confidence over the (valid token, MoE layer) pairs
    that run;
  * evaluate: loss, accuracy, mean layers and the fallback rate (share of (token, MoE layer)
    pairs run that went to the generalist), overall, per domain and per MoE layer.
The in-domain batches are split: even ones calibrate, odd ones measure.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.calibrate import operating_point
from act_jax.errors import ConfigError
from act_jax.infer import inference
from act_jax.model.moe import ROUTERS
from act_jax.model.moe import fallback as fallback_lib
from act_jax.model.transformer import make_model
from act_jax.retrieval import datastore as datastore_lib
from act_jax.run import directory as run_lib
from act_jax.spec import OperatingPoint, Spec
from act_jax.train import training


def with_fallback(spec: Spec, criterion: str, threshold: float) -> Spec:
  """spec with moe.fallback set (validated: ConfigError naming the field)."""
  moe = dataclasses.replace(spec.moe, fallback=criterion, fallback_threshold=float(threshold))
  fallback_lib.validate(moe, ROUTERS[moe.router])
  return dataclasses.replace(spec, moe=moe)


def make_eval_fn(spec: Spec) -> Callable:
  """jit (variables, batch, threshold [N]) -> per-example sums and per-token MoE telemetry."""
  model = make_model(spec)
  per_step = sum(k == 'moe' for k in spec.model.layer_kinds)
  step_of = np.arange(spec.model.num_steps * per_step) // max(per_step, 1)  # MoE layer's step

  def fn(variables, batch, threshold):
    logits, aux = model.apply(variables, batch['inputs'], threshold=threshold,
                              rngs={'halting': jax.random.PRNGKey(0)})
    w = batch['weights']
    ce = training.cross_entropy(logits, batch['targets']) * w
    correct = (jnp.argmax(logits, -1) == batch['targets']) * w
    ran = aux['running'][step_of] & (w > 0)[None]   # [MoE layers, B, L]: valid and ran it
    return {'loss_sum': ce.sum(-1), 'weight_sum': w.sum(-1), 'correct_sum': correct.sum(-1),
            'layers_sum': (aux['layers'] * w).sum(-1),
            'ran': ran, 'fallback': aux['moe']['fallback'] & ran,
            'score': aux['moe']['fallback_score']}

  return jax.jit(fn)


def calibrate(spec: Spec, variables: dict, batches: list, criterion: str, rate: float,
              threshold=None) -> float:
  """The threshold at which `rate` of the in-domain (token, MoE layer) pairs that run at the
  operating point `threshold` (default: full depth) fall back."""
  s = with_fallback(spec, criterion, 0.0)  # threshold 0: scored, nothing falls back
  fn = make_eval_fn(s)
  full = inference.threshold_arg(s, OperatingPoint.full_depth() if threshold is None
                                 else threshold)
  scores = []
  for b in batches:
    out = jax.device_get(fn(variables, {k: jnp.asarray(b[k]) for k in
                                        ('inputs', 'targets', 'weights')}, full))
    scores.append(np.asarray(out['score'])[np.asarray(out['ran'])])
  return fallback_lib.calibrate_threshold(np.concatenate(scores), rate)


def evaluate(spec: Spec, variables: dict, batches: list, domains: Sequence[str],
             threshold=None) -> dict:
  """Quality, compute and fallback rate (overall, per domain, per MoE layer)."""
  fn = make_eval_fn(spec)
  thr = inference.threshold_arg(spec, threshold)
  keys = ('loss_sum', 'weight_sum', 'correct_sum', 'layers_sum')
  rows = {k: [] for k in keys}
  ran, fb, dom = [], [], []
  for b in batches:
    out = jax.device_get(fn(variables, {k: jnp.asarray(b[k]) for k in
                                        ('inputs', 'targets', 'weights')}, thr))
    for k in keys:
      rows[k].append(np.asarray(out[k]))
    ran.append(np.asarray(out['ran']).sum(-1))       # [MoE layers, B]
    fb.append(np.asarray(out['fallback']).sum(-1))
    dom.append(b['domain'])
  r = {k: np.concatenate(v) for k, v in rows.items()}
  ran, fb, dom = np.concatenate(ran, 1), np.concatenate(fb, 1), np.concatenate(dom)

  def summary(sel):
    w = max(r['weight_sum'][sel].sum(), 1e-9)
    return {'loss': r['loss_sum'][sel].sum() / w, 'accuracy': r['correct_sum'][sel].sum() / w,
            'layers_mean': r['layers_sum'][sel].sum() / w,
            'fallback_rate': fb[:, sel].sum() / max(ran[:, sel].sum(), 1)}

  res = summary(np.ones_like(dom, bool))
  res['fallback_per_layer'] = [float(f / max(n, 1)) for f, n in zip(fb.sum(1), ran.sum(1))]
  for i, name in enumerate(domains):
    if np.any(dom == i):
      res.update({f'{name}/{k}': v for k, v in summary(dom == i).items()})
  return res


def evaluate_run(workdir: str, criteria: Sequence[str], rate: float,
                 files: Optional[str] = None, num_batches: Optional[int] = None,
                 threshold: Optional[float] = None,
                 log: Callable[[str], None] = print) -> list[dict]:
  """Without and with fallback per criterion (calibrated at `rate` on the run's in-domain
  held-out data): the in-domain test half and, with `files`, their held-out split."""
  spec, variables, step = run_lib.load(workdir)
  for c in criteria:
    with_fallback(spec, c, 0.0)
  if not 0 < rate < 1:
    raise ConfigError(f'--fallback_rate={rate}: must be in (0, 1)')
  n = num_batches or spec.train.eval_batches
  op, _ = operating_point.run_operating_point(workdir, spec, threshold)
  # spread over the held-out text: 2n batches of distinct windows, the even ones calibrate
  home, home_domains = datastore_lib.eval_batches(spec, None, 2 * n, spread=True)
  sets = [('in-domain', home[1::2], home_domains)]
  if files:
    far, far_domains = datastore_lib.eval_batches(spec, files, n, spread=True)
    sets.append(('shifted', far, far_domains))
  rows = []
  for c in ['none'] + [c for c in criteria if c != 'none']:
    thr = 0.0 if c == 'none' else calibrate(spec, variables, home[0::2], c, rate, op)
    s = spec if c == 'none' else with_fallback(spec, c, thr)
    for name, batches, domains in sets:
      res = evaluate(s, variables, batches, domains, op)
      rows.append({'fallback': c, 'fallback_threshold': thr, 'data': name, **res})
  log(f'{workdir} at threshold {op.threshold:g}; fallback calibrated to {rate:.1%} of in-domain '
      f'(token, MoE layer) pairs')
  doms = sorted({k.split('/')[0] for r in rows for k in r if k.endswith('/fallback_rate')})
  log(f'{"fallback":>9} {"threshold":>9} {"data":>10} {"loss":>7} {"accuracy":>8} '
      f'{"layers":>6} {"fell back":>9} ' + ' '.join(f'{d:>7}' for d in doms) +
      '  per MoE layer')
  for r in rows:
    log(f'{r["fallback"]:>9} {r["fallback_threshold"]:9.4f} {r["data"]:>10} {r["loss"]:7.4f} '
        f'{r["accuracy"]:8.4f} {r["layers_mean"]:6.2f} {r["fallback_rate"]:9.2%} '
        + ' '.join(f'{r[d + "/fallback_rate"]:7.2%}' if d + '/fallback_rate' in r else
                   f'{"-":>7}' for d in doms) + '  '
        + ' '.join(f'{f:.1%}' for f in r['fallback_per_layer']))
  return rows
