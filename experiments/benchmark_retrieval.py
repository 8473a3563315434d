r"""Retrieval arm and generalist fallback under domain shift, side by side in one run.

  python -m experiments.benchmark_retrieval --workdir=runs/lm_default --datastore=runs/ds_flax \
      --fallback_workdir=runs/lm_shared
Train on the stdlib (the lm config), then evaluate on the held-out split of another installed
package's source (default: flax) with a datastore built from its other files
(experiments.datastore). Tables:
  1. retrieve never / always / gate at the run's operating point, on the shifted package and
     on the stdlib held-out split (retrieval rate, accuracy, mean layers);
  2. layers at <= 1 % accuracy drop vs full depth without retrieval, with and without the arm
     (a threshold sweep on the shifted data);
  3. generalist fallback (a run with a shared expert, --fallback_workdir) calibrated to
     --fallback_rate of in-domain tokens: in-domain and shifted;
  4. cost: one retrieval (exact / approx_max_k) per token vs one layer, at 10^5 and 10^6 keys.
Measured tables: docs/results.md.
"""
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np

from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.calibrate import operating_point
from act_jax.model.retrieval import arm, knn
from act_jax.model.transformer import make_model
from act_jax.retrieval import datastore, fallback_run
from act_jax.run import directory as run_lib
from act_jax.spec import OperatingPoint

_WORKDIR = vocab.define('workdir', 'runs/lm_default', 'Trained run (confidence exits).')
_DATASTORE = vocab.define('datastore', 'runs/ds_flax', 'Its datastore over --files.')
_FILES = vocab.define('files', os.path.join(os.path.dirname(flax.__file__), '**/*.py'),
                      'The shifted domain (held-out split evaluated).')
_BATCHES = vocab.define('num_batches', 8, 'Held-out batches per evaluation.')
_SWEEP = vocab.define('thresholds', ['0.3', '0.4', '0.5', '0.6', '0.8'],
                      'Thresholds of the layers-at-equal-accuracy sweep.')
_TOL = vocab.define('tolerance', help='Relative accuracy drop of table 2.')
_FB_WORKDIR = vocab.define('fallback_workdir', 'runs/lm_shared', 'A run with '
                           'moe.shared_experts >= 1 for table 3 (empty: skip).')
_FB_RATE = vocab.define('fallback_rate')
_KEYS = vocab.define('keys', help='Datastore sizes of table 4.')
_SKIP = vocab.define('skip')


def _evaluate(spec, variables, ds, batches, domains, mode, op):
  return datastore.evaluate(spec, variables, batches, domains, ds, mode, op)


def _timeit(fn, *args, reps=5):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def cost_table(spec, variables, sizes) -> list[str]:
  """Search time per query token vs one layer (model forward / layers) on the same tokens."""
  d = spec.model.d_model
  rng = np.random.default_rng(0)
  model = make_model(spec)
  full = OperatingPoint.full_depth().vector(spec)
  fwd = jax.jit(lambda v, t: model.apply(v, t, threshold=full)[0])
  lines = [f'{"keys":>9} {"queries":>7} {"search":>7} {"ms":>8} {"us/token":>9} '
           f'{"layer us/token":>14} {"retrieval/layer":>15}']
  for z, shape in ((16, (16, 1)), (2048, (16, 128))):
    tokens = jnp.asarray(rng.integers(0, 256, shape), jnp.int32)
    layer = _timeit(fwd, variables, tokens) / spec.model.num_layers
    for n in sizes:
      keys = jnp.asarray(rng.normal(size=(n, d)), jnp.float16)
      q = jnp.asarray(rng.normal(size=(z, d)), jnp.float32)
      for approx in (False, True):
        f = jax.jit(lambda q, k, a=approx: knn.search(q, k, 16, approx=a))
        t = _timeit(f, q, keys, reps=3)
        lines.append(f'{n:>9,} {z:>7} {"approx" if approx else "exact":>7} {t * 1e3:8.2f} '
                     f'{t / z * 1e6:9.2f} {layer / z * 1e6:14.2f} {t / layer:14.1f}x')
      del keys
  return lines


def main(argv):
  del argv
  quiet_logs()
  skip = set(_SKIP.value)  # every flag was checked when parsed: nothing loads before that
  sizes, sweep = _KEYS.value, _SWEEP.value
  spec, variables, step = run_lib.load(_WORKDIR.value)
  op, source = operating_point.run_operating_point(_WORKDIR.value, spec)
  ds = None
  if not {'1', '2'} <= skip:
    arm.check_model(spec)
    ds = datastore.load(_DATASTORE.value, spec, params=variables['params'])
  # windows spread over the held-out text: files' first windows (licence headers) would
  # otherwise be most of the shifted set, and those repeat verbatim across files
  far, far_dom = datastore.eval_batches(spec, _FILES.value, _BATCHES.value, spread=True)
  home, home_dom = datastore.eval_batches(spec, None, _BATCHES.value, spread=True)
  print(f'run {_WORKDIR.value} step {step}, operating point {op.threshold:g} '
        f'({source}); shifted domain: held-out split of {_FILES.value}')
  if ds is not None:
    t = ds.meta.get('tuned', {})
    print(f'datastore {_DATASTORE.value}: {ds.meta["entries"]:,} entries x '
          f'{len(ds.meta["steps"])} steps; lam {t.get("lam")}, tau {t.get("temperature", 0):.3g}, '
          f'gate threshold {t.get("gate_threshold")}')
  if '1' not in skip:
    rows = []
    for name, batches, doms in (('shifted', far, far_dom), ('stdlib', home, home_dom)):
      for mode in ('never', 'always', 'gate'):
        t0 = time.time()
        r = _evaluate(spec, variables, ds, batches, doms, mode, op)
        rows.append((name, mode, r, time.time() - t0))
    print(f'\n== 1. retrieval at the operating point ({int(rows[0][2]["tokens"]):,} shifted / '
          f'{int(rows[3][2]["tokens"]):,} stdlib tokens) ==')
    print(f'{"data":>8} {"retrieve":>8} {"accuracy":>8} {"vs never":>8} {"loss":>7} '
          f'{"layers":>6} {"retrieved":>9} {"per tok":>7} {"eval s":>6}')
    base = {}
    for name, mode, r, sec in rows:
      base.setdefault(name, r['accuracy'])
      print(f'{name:>8} {mode:>8} {r["accuracy"]:8.4f} {r["accuracy"] - base[name]:+8.4f} '
            f'{r["loss"]:7.4f} {r["layers_mean"]:6.2f} {r["retrieval_rate"]:9.1%} '
            f'{r["retrievals_per_token"]:7.2f} {sec:6.0f}')
    acc = {(n, m): r['accuracy'] for n, m, r, _ in rows}
    gain = acc[('shifted', 'always')] - acc[('shifted', 'never')]
    kept = (acc[('shifted', 'gate')] - acc[('shifted', 'never')]) / gain if gain > 0 else 0.0
    print(f'gate keeps {kept:.0%} of always-retrieve\'s shifted-domain gain ({gain:+.4f})')
  if '2' not in skip:
    full = OperatingPoint.full_depth()
    ref = _evaluate(spec, variables, ds, far, far_dom, 'never', full)['accuracy']
    target = ref * (1 - _TOL.value)
    print(f'\n== 2. layers at <= {_TOL.value:.0%} accuracy drop vs full depth without retrieval '
          f'(shifted; reference {ref:.4f}, target >= {target:.4f}) ==')
    print(f'{"retrieve":>8} {"threshold":>9} {"accuracy":>8} {"layers":>6} {"retrieved":>9}')
    best = {}
    for mode in ('never', 'gate'):
      for t in sweep + [None]:
        p = full if t is None else OperatingPoint(t)
        r = _evaluate(spec, variables, ds, far, far_dom, mode, p)
        ok = r['accuracy'] >= target
        print(f'{mode:>8} {"full" if t is None else t:>9} {r["accuracy"]:8.4f} '
              f'{r["layers_mean"]:6.2f} {r["retrieval_rate"]:9.1%}' + ('  ok' if ok else ''))
        if ok and r['layers_mean'] < best.get(mode, (np.inf,))[0]:
          best[mode] = (r['layers_mean'], t)
    n = spec.model.num_layers
    for mode, (layers, t) in best.items():
      print(f'{mode}: {layers:.2f} of {n} layers ({n / layers:.2f}x fewer) at threshold {t}')
  if '3' not in skip and _FB_WORKDIR.value:
    print(f'\n== 3. generalist fallback ({_FB_WORKDIR.value}) ==')
    fallback_run.evaluate_run(_FB_WORKDIR.value, ['max_prob', 'entropy'], _FB_RATE.value,
                              _FILES.value, _BATCHES.value)
  if '4' not in skip:
    print(f'\n== 4. cost: one search (16 neighbours, D={spec.model.d_model}, float16 keys) vs one '
          f'layer (full forward / {spec.model.num_layers}) on the same tokens ==')
    print('\n'.join(cost_table(spec, variables, sizes)))


if __name__ == '__main__':
  run(main)
