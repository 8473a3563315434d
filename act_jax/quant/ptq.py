"""Post-training quantization of a run, bits per expert, and what quantizing does to it.

What `experiments.quantize` and `experiments.benchmark_quant` call (the numerics and the
storage are act_jax/model/quant.py):
- `quantize_run`: a trained run -> a quantized run (config.json with quant.stored, an Orbax
  checkpoint of QArrays, quant.json) that every binary reads like any run. Then the run's
  certified operating point is checked on the quantized model -- the drop measured at the
  old threshold, with a warning when it breaks the old tolerance -- and re-certified on it
  (RUN_Q/calibration.json): quantization moves hidden states, so exit confidences move.
- `choose_bits` (--scheme=auto): each unit (one expert of one depth step, or one step's
  attention / dense FFN) starts at 8 bits; Delta_u = held-out loss increase when u alone
  drops to 4 bits. Delta grows with how often the expert is routed to and with how far its
  outputs move, so frequent or sensitive experts keep 8 bits (MoQE, Kim et al. 2023; the
  per-layer sensitivity ordering of HAWQ, Dong et al. 2019). Units are demoted in increasing
  Delta_u per weight until the mean bits per quantized weight meet --budget_bits (a greedy
  knapsack under the additive-loss approximation). Measured on the calibration half of the
  held-out batches, so the test half stays unseen.
- `compare_schemes`: per scheme, side by side on the same held-out batches: model bytes,
  decode speed, accuracy at full depth and per exit layer, the frontier (layers saved at
  <= 1 % drop), tokens whose top-1 expert changed vs float32, load balance, and the certified
  threshold carried over vs re-certified.

Dims (legend: act_jax/__init__.py): N depth steps, E experts, B batch, L length.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from act_jax import config as config_lib
from act_jax import data as data_lib
from act_jax.calibrate import certify, frontier, operating_point
from act_jax.errors import CheckpointError, ConfigError
from act_jax.infer import inference
from act_jax.model import quant
from act_jax.model.transformer import make_model
from act_jax.run import directory as run_lib
from act_jax.spec import OperatingPoint, Spec
from act_jax.train import training

QUANT_JSON = 'quant.json'
COMPARE_JSON = 'quant_compare.json'  # compare_schemes' table, next to OUT/<scheme>/
FLOAT = 'float32'  # the reference row of compare_schemes


# ----------------------------------------------------------------------------- arguments
def check_args(spec: Spec, scheme: str, experts_only: bool, budget_bits: Optional[float],
               tile: int, workdir: str) -> None:
  """ConfigError naming the flag, before anything is loaded or compiled."""
  if spec.quant.stored:
    raise ConfigError(f'--workdir={workdir!r} is already quantized (quant.scheme='
                      f'{spec.quant.scheme!r}); quantize the float run it came from')
  if scheme not in quant.SCHEMES:
    raise ConfigError(f'--scheme={scheme!r}: unknown scheme; known: '
                      f'{", ".join(quant.SCHEMES)}')
  if experts_only and 'moe' not in spec.model.layer_kinds:
    raise ConfigError(f'--experts_only: the run has no experts (moe.router='
                      f'{spec.moe.router!r})')
  top = max(quant.BITS_CHOICES)
  if scheme == 'auto':
    if budget_bits is None:
      raise ConfigError(f'--scheme=auto needs --budget_bits (mean bits per quantized weight, '
                        f'{quant.MIN_BITS}..{top})')
    if budget_bits < quant.MIN_BITS:
      raise ConfigError(f'--budget_bits={budget_bits:g}: below the minimum {quant.MIN_BITS} '
                        f'bits per weight (int{quant.MIN_BITS}); allowed: '
                        f'{quant.MIN_BITS}..{top}')
    if budget_bits > top:
      raise ConfigError(f'--budget_bits={budget_bits:g}: above {top} (every unit at int{top} '
                        f'is --scheme=w{top}); allowed: {quant.MIN_BITS}..{top}')
    if spec.model.share_weights:
      raise ConfigError('--scheme=auto: model.share_weights=True has one set of layer weights '
                        'for every step, so there are no per-layer units; use w8 or w4')
  elif budget_bits is not None:
    raise ConfigError(f'--budget_bits={budget_bits:g}: only with --scheme=auto')
  if isinstance(tile, bool) or tile < 0:
    raise ConfigError(f'--tile={tile}: must be 0 (one scale per channel) or a positive '
                      f'number of contraction entries per scale')


def quantized_spec(spec: Spec, scheme: str, experts_only: bool = False, gates: bool = False,
                   tile: int = 32, bits: str = '') -> Spec:
  """The spec of the quantized run (resolved: a bad combination fails here)."""
  cfg = config_lib.complete(spec.to_dict())
  cfg.quant.update(scheme=scheme, stored=True, experts_only=experts_only, gates=gates,
                   tile=tile, bits=bits)
  return config_lib.resolve(cfg, device_count=1)


def _complete(out: str) -> Optional[dict]:
  """OUT's quant.json when quantize_run finished writing OUT (its last step), else None."""
  path = os.path.join(out, QUANT_JSON)
  info = run_lib.read_json(path)
  if info is not None and not isinstance(info, dict):
    raise ConfigError(f'{path}: must hold a JSON object (what quantize wrote), not '
                      f'{type(info).__name__}')
  return info if info and info.get('complete') else None


def _check_out(workdir: str, out: str) -> None:
  """Refuses to overwrite a finished quantized run; clears what a killed one left."""
  if os.path.abspath(out) == os.path.abspath(workdir):
    raise ConfigError(f'--out={out!r}: must differ from --workdir (the float run is kept)')
  run_lib.check_output_dir(out, '--out', (QUANT_JSON,) + run_lib.RUN_MARKERS,
                           'a quantized run')
  ck = os.path.join(out, 'checkpoints')
  if _complete(out) is not None or (
      os.path.isdir(ck) and not os.path.exists(os.path.join(out, QUANT_JSON))
      and os.listdir(ck)):
    raise CheckpointError(f'--out={out!r} already holds a checkpoint; choose a new --out '
                          f'(nothing was changed)')
  if os.path.isdir(ck):  # a quantize_run killed before it finished: ours to redo
    shutil.rmtree(ck)


# ----------------------------------------------------------------------------- measuring
@functools.lru_cache(maxsize=8)
def _full_depth_fn(spec: Spec) -> Callable:
  """(params, moe_state, batch) -> (ce sum, weight sum, moe load [layers, E] or None) at full
  depth (the masked scan: every token runs every layer)."""
  model = make_model(spec)
  full = OperatingPoint.full_depth().vector(spec)

  @jax.jit
  def f(params, moe_state, inputs, targets, weights):
    logits, aux = model.apply({'params': params, 'moe_state': moe_state}, inputs,
                              threshold=full, rngs={'halting': jax.random.PRNGKey(0)})
    ce = training.cross_entropy(logits, targets) * weights
    load = aux['moe']['load'] if 'moe' in aux else jnp.zeros((0,))
    return jnp.sum(ce), jnp.sum(weights), load

  return f


def heldout_loss(spec: Spec, params, moe_state, batches: Sequence[dict]
                 ) -> tuple[float, np.ndarray]:
  """Mean cross-entropy per scored token at full depth, and the summed expert load."""
  f = _full_depth_fn(spec)
  ce = w = 0.0
  load = 0.0
  for b in batches:
    c, n, ld = f(params, moe_state, b['inputs'], b['targets'], b['weights'])
    ce, w, load = ce + float(c), w + float(n), load + np.asarray(ld)
  return ce / max(w, 1.0), np.asarray(load)


def _moe_slot(spec: Spec, layer: str) -> Optional[int]:
  """Position of layer_j among a step's MoE layers (the order of aux['moe'] rows)."""
  j = int(layer.split('_')[1])
  moe_j = [i for i, k in enumerate(spec.model.layer_kinds) if k == 'moe']
  return moe_j.index(j) if j in moe_j else None


def choose_bits(spec: Spec, params: Any, moe_state: Any, batches: Sequence[dict],
                budget_bits: float, experts_only: bool = False, tile: int = 32,
                log: Callable[[str], None] = print) -> tuple[dict[str, list[int]], list[dict]]:
  """--scheme=auto: bits per unit member (module docstring). Returns the table (unit ->
  bits per member, flattened [N, E] or [N]) and one row per member: unit, member, routing
  frequency (experts), Delta loss at 4 bits, weights, chosen bits."""
  flat = {tuple(p): w for p, w in zip(*quant._paths(params)[:2])}
  tensors: dict[str, list[tuple]] = {}
  for path, w in flat.items():
    u = quant.unit(path)
    if u and not (experts_only and quant.role(path) == 'layer'):
      tensors.setdefault(u, []).append(path)
  if not tensors:
    raise ConfigError('--scheme=auto: the model has no layer or expert weights to quantize')
  members = {u: int(np.prod(quant._member_shape(ps[0], flat[ps[0]].shape)))
             for u, ps in tensors.items()}
  table8 = {u: [8] * n for u, n in members.items()}
  fspec = float_spec(spec)

  def rounded(u: str, bits: list[int], into: dict) -> dict:
    """`into` with unit u's weights quantize-dequantized at `bits` (one per member)."""
    out = dict(into)
    for p in tensors[u]:
      b = np.asarray(bits).reshape(quant._member_shape(p, flat[p].shape))
      out[p] = quant.dequantize(quant.quantize_weight(p, flat[p], b, tile))
    return out

  t0 = time.time()
  base_flat = dict(flat)
  for u in tensors:  # every unit at 8 bits: the baseline each trial moves one member from
    base_flat = rounded(u, table8[u], base_flat)
  base, load = heldout_loss(fspec, _unflatten(params, base_flat), moe_state, batches)
  rows = []
  total = sum(members.values())
  done = 0
  for u, ps in sorted(tensors.items()):
    n = members[u]
    per_member = sum(flat[p].size for p in ps) / n
    slot = _moe_slot(spec, u.split('/')[0]) if u.endswith('/moe') else None
    for m in range(n):
      bits = [8] * n
      bits[m] = quant.MIN_BITS
      trial = rounded(u, bits, base_flat)
      loss, _ = heldout_loss(fspec, _unflatten(params, trial), moe_state, batches)
      freq = None
      if slot is not None and load.size:
        e_ = spec.moe.num_experts
        step, e = divmod(m, e_)
        row_load = load[step * sum(k == 'moe' for k in spec.model.layer_kinds) + slot]
        freq = float(row_load[e] / max(row_load.sum(), 1e-9))
      rows.append({'unit': u, 'member': m, 'frequency': freq, 'delta_loss': loss - base,
                   'weights': per_member, 'bits': 8})
      done += 1
      if done % 8 == 0 or done == total:
        log(f'  sensitivity {done}/{total} units ({time.time() - t0:.0f} s)')
  # Greedy: demote the cheapest loss per weight first until the budget holds.
  weights_total = sum(r['weights'] for r in rows)
  mean_bits = lambda: sum(r['bits'] * r['weights'] for r in rows) / weights_total  # noqa: E731
  for r in sorted(rows, key=lambda r: r['delta_loss'] / r['weights']):
    if mean_bits() <= budget_bits + 1e-9:
      break
    r['bits'] = quant.MIN_BITS
  table = {u: [8] * n for u, n in members.items()}
  for r in rows:
    table[r['unit']][r['member']] = r['bits']
  log(f'auto bits: mean {mean_bits():.2f} bits per quantized weight (budget '
      f'{budget_bits:g}); {sum(r["bits"] == 8 for r in rows)} of {len(rows)} units keep 8 bits; '
      f'held-out loss at all-8 {base:.4f}')
  return table, rows


def float_spec(spec: Spec) -> Spec:
  """The same run with no quantization anywhere (its float reference)."""
  return dataclasses.replace(spec, quant=quant.NO_QUANT)


def _unflatten(like: Any, flat: dict[tuple, Any]) -> Any:
  keys, _, treedef = quant._paths(like)
  return jax.tree_util.tree_unflatten(treedef, [flat[tuple(k)] for k in keys])


# ----------------------------------------------------------------------------- the run
def check_operating_point(src: str, out: str, num_batches: int = 16,
                          log: Callable[[str], None] = print) -> Optional[dict]:
  """The source run's certified point on the quantized run, on the held-out test half: the
  drop at the old threshold vs the FLOAT model's full depth (what the certificate promised),
  and whether it still meets the old tolerance. None when the source has no calibration."""
  cal = run_lib.read_calibration(src)
  if cal is None or cal.get('chosen_threshold') is None:
    return None
  spec_f, state_f = run_lib.load(src)[:2]
  spec_q, state_q = run_lib.load(out)[:2]
  op = OperatingPoint(float(cal['chosen_threshold']), cal.get('max_layers'))
  test = data_lib.make_dataset(spec_f.data, spec_f.seed).eval_batches(num_batches)[1::2]
  sw = {}
  for name, spec, state in (('float', spec_f, state_f), ('quantized', spec_q, state_q)):
    variables = {'params': state['params'], 'moe_state': state['moe_state']}
    sw[name] = operating_point.sweep(spec, variables, test, [op.threshold],
                                     max_layers=op.max_layers)
  f_full = sw['float']['full_accuracy']
  q = sw['quantized']
  tol, measure = float(cal['tolerance']), cal.get('measure', 'consistency')
  drop = (f_full - q['accuracy'][0]) / f_full
  quant_drop = (f_full - q['full_accuracy']) / f_full
  # consistency as certified: the served predictions vs the FLOAT model's full depth
  agree = _agreement(spec_f, state_f, spec_q, state_q, test, op)
  holds = drop <= tol if measure == 'accuracy' else agree >= 1 - tol
  res = {'threshold': op.threshold, 'max_layers': op.max_layers, 'measure': measure,
         'tolerance': tol, 'float_full_accuracy': f_full,
         'float_accuracy_at_threshold': sw['float']['accuracy'][0],
         'quantized_full_accuracy': q['full_accuracy'],
         'quantized_accuracy_at_threshold': q['accuracy'][0],
         'quantized_layers_at_threshold': q['mean_layers'][0],
         'quantized_consistency_at_threshold': q['consistency'][0],
         'consistency_vs_float_full': agree,
         'drop_at_threshold': drop, 'drop_full_depth': quant_drop, 'holds': bool(holds),
         'n_test_tokens': q['n'],
         # re-certification tries the same candidates (a fixed sequence stops at its first
         # failure, so a longer list is a different test)
         'thresholds': (cal.get('frontier') or {}).get('thresholds'),
         # and the same test: risk, p-value method, cap(s), or a layers budget
         'calibration': {k: cal.get(k) for k in ('risk', 'method', 'mode', 'max_layers', 'caps',
                                                 'budget_layers')}}
  log(f'certified point of {src} (threshold {op.threshold:g}, <= {tol:.1%} {measure}) on the '
      f'quantized run: accuracy {q["accuracy"][0]:.4f} vs float full depth {f_full:.4f} '
      f'({-drop:+.2%}; quantization alone {-quant_drop:+.2%}), {q["mean_layers"][0]:.2f} layers')
  if not holds:
    what = (f'drop {drop:.2%} > tolerance {tol:.1%}' if measure == 'accuracy' else
            f'consistency with float full depth {agree:.4f} < {1 - tol:.4f}')
    log(f'WARNING: the calibration of {src} no longer holds on the quantized model ({what}); '
        f'use the re-certified point (experiments.calibrate --workdir={out})')
  return res


def _agreement(spec_f: Spec, state_f: dict, spec_q: Spec, state_q: dict,
               batches: Sequence[dict], op: OperatingPoint) -> float:
  """Fraction of scored tokens whose prediction at `op` on the quantized run equals the float
  run's at full depth."""
  fwd_f, fwd_q = (operating_point._jitted_forward(s) for s in (spec_f, spec_q))
  full, at = OperatingPoint.full_depth().vector(spec_f), op.vector(spec_q)
  var = lambda st: {'params': st['params'], 'moe_state': st['moe_state']}  # noqa: E731
  same = n = 0.0
  for b in batches:
    m = np.asarray(b['weights']) > 0
    pf = np.asarray(jnp.argmax(fwd_f(var(state_f), jnp.asarray(b['inputs']), full)[0], -1))
    pq = np.asarray(jnp.argmax(fwd_q(var(state_q), jnp.asarray(b['inputs']), at)[0], -1))
    same, n = same + float(((pf == pq) & m).sum()), n + float(m.sum())
  return same / max(n, 1.0)


def quantize_run(workdir: str, out: str, scheme: Optional[str] = None,
                 experts_only: bool = False, gates: bool = False, tile: int = 32,
                 budget_bits: Optional[float] = None, recalibrate: bool = True,
                 num_batches: int = 16, log: Callable[[str], None] = print) -> dict:
  """Writes the quantized run OUT of WORKDIR's latest checkpoint (PTQ; a QAT run's float
  master weights quantize to exactly what its training forward saw when the scheme, tile,
  experts_only and gates match its own: scheme=None takes the QAT run's scheme, else w8).
  OUT/quant.json is written last with 'complete': a killed run is redone, never reused.
  Returns quant.json."""
  spec = run_lib.read_config(workdir)
  qat = spec.quant if spec.quant.scheme != 'none' and not spec.quant.stored else None
  scheme = scheme or (qat.scheme if qat else 'w8')
  check_args(spec, scheme, experts_only, budget_bits, tile, workdir)
  _check_out(workdir, out)
  quantized_spec(spec, scheme, experts_only, gates, tile,
                 'layer_0/attn=8' if scheme == 'auto' else '')  # bad combinations fail now
  if qat and (qat.scheme, qat.tile, qat.experts_only, qat.gates) != (scheme, tile,
                                                                      experts_only, gates):
    log(f'WARNING: {workdir} was trained quantization-aware with scheme={qat.scheme}, '
        f'tile={qat.tile}, experts_only={qat.experts_only}, gates={qat.gates}; quantizing '
        f'with scheme={scheme}, tile={tile}, experts_only={experts_only}, gates={gates} '
        f'stores other values than training saw')
  t0 = time.time()
  spec, variables, step = run_lib.load(workdir)
  rows: list[dict] = []
  bits = ''
  if scheme == 'auto':
    calib = data_lib.make_dataset(spec.data, spec.seed).eval_batches(num_batches)[0::2]
    log(f'auto bits: sensitivity of every unit at {quant.MIN_BITS} bits on '
        f'{len(calib)} held-out batches (the calibration half)')
    table, rows = choose_bits(spec, variables['params'], variables['moe_state'], calib, budget_bits,
                              experts_only, tile, log)
    bits = quant.format_bits(table)
  qspec = quantized_spec(spec, scheme, experts_only, gates, tile, bits)
  qparams = quant.quantize_params(variables['params'], qspec.quant)
  os.makedirs(out, exist_ok=True)
  fb = quant.model_bytes(variables['params'])
  qb = quant.model_bytes(qparams, qspec.quant)
  info = {'source': os.path.abspath(workdir), 'step': step, 'scheme': scheme,
          'experts_only': experts_only, 'gates': gates, 'tile': tile,
          'budget_bits': budget_bits, 'float_bytes': fb, 'bytes': qb, 'auto': rows,
          'complete': False}
  run_lib.write_json(os.path.join(out, QUANT_JSON), info)  # marks OUT as ours while it is written
  run_lib.write_json(os.path.join(out, 'config.json'), qspec.to_dict())
  step = info['step']
  ck = run_lib.checkpointer(out, async_save=False)
  ck.save(step, {'step': jnp.asarray(step, jnp.int32), 'params': qparams,
                 'moe_state': variables['moe_state']}, force=True)
  ck.close()
  if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    shutil.copy(os.path.join(workdir, 'metrics.jsonl'), os.path.join(out, 'metrics.jsonl'))
  log(f'quantized {workdir} (step {step}) with {scheme} -> {out}: model {fb["total"] / 2**20:.2f}'
      f' -> {qb["total"] / 2**20:.2f} MiB ({fb["total"] / qb["total"]:.2f}x smaller); experts '
      f'{_ratio(fb["expert"], qb["expert"])}, layers {_ratio(fb["layer"], qb["layer"])}'
      + (f'; at the assigned bits {qb["assigned"] / 2**20:.2f} MiB' if scheme == 'auto' else '')
      + f' ({time.time() - t0:.0f} s)')
  info['operating_point'] = check_operating_point(workdir, out, num_batches, log)
  if recalibrate and spec.policy.can_exit:
    info['recertified'] = _recertify(spec, out, info['operating_point'], num_batches, log)
  info['complete'] = True
  run_lib.write_json(os.path.join(out, QUANT_JSON), info)
  return info


def _recertify(spec: Spec, out: str, old: Optional[dict], num_batches: int,
               log: Callable[[str], None]) -> Optional[dict]:
  """Certifies the quantized run with the source's test (tolerance, measure, candidates,
  risk, method, cap(s) or layers budget), or -- a QAT run, which deferred it -- at
  train.certify_tolerance. None when there is nothing to certify or too little data."""
  if old is not None:
    kw = {'tolerance': old['tolerance'], 'measure': old['measure']}
    c = old['calibration']
    for k in ('risk', 'method', 'max_layers', 'caps'):
      if c.get(k) is not None:
        kw[k] = c[k]
    if c.get('mode') == 'budget':
      kw['budget_layers'] = c['budget_layers']
    kw['thresholds'] = old.get('thresholds') or certify.CERTIFY_THRESHOLDS
  elif spec.train.certify_tolerance > 0:
    kw = {'tolerance': spec.train.certify_tolerance, 'measure': 'accuracy',
          'thresholds': certify.CERTIFY_THRESHOLDS}
  else:
    return None
  if kw.get('caps') is not None:
    kw.pop('max_layers', None)  # the chosen cap is one of the caps
  log(f'{"re-" if old else ""}certifying on the quantized run ({kw["measure"]}, tolerance '
      f'{kw["tolerance"]:.1%}) ...')
  try:
    cal = certify.calibrate_run(out, num_batches=num_batches, log=lambda m: None, **kw)
  except ConfigError as e:  # e.g. too few held-out tokens for this tolerance
    log(f'certification skipped: {e}')
    return None
  # vs the float model's full depth when the source was certified, else the quantized one's
  ref = old['float_full_accuracy'] if old else cal['full_depth']['accuracy']
  rec = {'threshold': cal['chosen_threshold'], 'mean_layers': cal['test']['mean_layers'],
         'accuracy': cal['test']['accuracy'], 'drop': (ref - cal['test']['accuracy']) / ref,
         'reference': 'float full depth' if old else 'quantized full depth'}
  thr = 'none (full depth)' if rec['threshold'] is None else f'{rec["threshold"]:g}'
  log(f'certified threshold {thr}: {rec["mean_layers"]:.2f} layers, accuracy '
      f'{rec["accuracy"]:.4f} ({-rec["drop"]:+.2%} vs {rec["reference"]}); wrote '
      f'{out}/calibration.json')
  return rec


def _ratio(a: float, b: float) -> str:
  return f'{a / b:.2f}x smaller' if b else 'none'


# ----------------------------------------------------------------------------- comparison
def _full_depth_routing(spec: Spec, state: dict, batches: Sequence[dict]
                        ) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
  """Full-depth top-1 experts [layers, B, L] per batch, summed load [layers, E], and the
  scored-token masks."""
  step = jax.jit(training.make_eval_step(spec))
  full = OperatingPoint.full_depth().vector(spec)
  top1, load, masks = [], 0.0, []
  for b in batches:
    o = step(state, b, full)
    masks.append(np.asarray(b['weights']) > 0)
    if 'top1_expert' in o:
      top1.append(np.asarray(o['top1_expert']))
      load = load + np.asarray(o['moe_load'])
  return top1, np.asarray(load), masks


def _decode_ms(runs: dict[str, tuple[Spec, dict]], prompt: np.ndarray, new_tokens: int,
               repeats: int) -> dict[str, float]:
  """Median ms per token of full-depth greedy decoding (batch of the prompt), every run
  compiled first, then timed round-robin so a noisy neighbour hits every run alike."""
  fns = {}
  for name, (spec, variables) in runs.items():
    full = OperatingPoint.full_depth()
    fns[name] = functools.partial(inference.generate, spec, variables, prompt, new_tokens, full)
    jax.block_until_ready(fns[name]())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return {k: 1e3 * float(np.median(v)) / (new_tokens * prompt.shape[0])
          for k, v in times.items()}


def compare_schemes(workdir: str, out_root: str, schemes: Sequence[str] = ('w8', 'w4', 'w8a8'),
                    budget_bits: float = 5.0, experts_only: bool = False, tile: int = 32,
                    num_batches: int = 16, decode_tokens: int = 32, repeats: int = 5,
                    tolerance: float = 0.01, log: Callable[[str], None] = print) -> list[dict]:
  """Quantizes WORKDIR with each scheme into OUT_ROOT/<scheme> (kept when already there) and
  measures every run side by side on the same held-out batches (module docstring)."""
  spec = run_lib.read_config(workdir)
  for s in schemes:
    check_args(spec, s, experts_only, budget_bits if s == 'auto' else None, tile, workdir)
  run_lib.check_output_dir(out_root, '--out', (COMPARE_JSON,) + tuple(quant.SCHEMES),
                           'a benchmark_quant output')
  runs = {FLOAT: workdir}
  for s in schemes:
    out = os.path.join(out_root, s)
    done = _complete(out)
    want = {'scheme': s, 'experts_only': experts_only, 'gates': False, 'tile': tile,
            'budget_bits': budget_bits if s == 'auto' else None}
    if done is not None and any(done.get(k) != v for k, v in want.items()):
      raise CheckpointError(f'{out} was quantized with other settings '
                            f'({ {k: done.get(k) for k in want} }); use a new --out')
    if done is None:
      log(f'== quantizing with {s} ==')
      quantize_run(workdir, out, s, experts_only, False, tile, want['budget_bits'], True,
                   num_batches, log)
    runs[s] = out
  test = data_lib.make_dataset(spec.data, spec.seed).eval_batches(num_batches)[1::2]
  loaded = {name: run_lib.load(d)[:2] for name, d in runs.items()}
  rows = []
  ref_top1 = None
  quiet = lambda m: None  # noqa: E731
  for name, d in runs.items():
    log(f'== measuring {name} ==')
    spec_r, state = loaded[name]
    row: dict[str, Any] = {'name': name, 'workdir': d}
    b = quant.model_bytes(state['params'], spec_r.quant)
    row['bytes'], row['expert_bytes'], row['assigned_bytes'] = (
        b['total'], b['expert'], b['assigned'])
    row['assigned_expert_bytes'] = b['assigned_expert']
    if spec_r.policy.can_exit:
      fr = frontier.accuracy_frontier(d, certify.CERTIFY_THRESHOLDS, (None,),
                                      tolerance, num_batches, log=quiet)
      row['full_accuracy'] = fr['full_accuracy']
      row['exit_accuracy'] = dict(zip(fr['static']['layers'], fr['static']['accuracy']))
      r0 = fr['rows'][0]
      row['frontier_threshold'] = r0['threshold']
      row['frontier_fewer'] = r0.get('fewer_layers', 1.0)
    top1, load, masks = _full_depth_routing(spec_r, state, test)
    if top1:
      if ref_top1 is None:
        ref_top1 = top1
      changed = sum(((a != r) & m[None]).sum() for a, r, m in zip(top1, ref_top1, masks))
      row['top1_changed'] = float(changed) / float(sum(m.sum() * a.shape[0]
                                                       for m, a in zip(masks, top1)))
      row['load_imbalance'] = float(np.mean(load.max(-1) / np.maximum(load.mean(-1), 1e-9)))
    info = run_lib.read_json(os.path.join(d, QUANT_JSON))
    if info is not None:
      row['carried'] = info.get('operating_point')
      row['recertified'] = info.get('recertified')
    rows.append(row)
  full = rows[0].get('full_accuracy')
  for row in rows:
    if full and 'full_accuracy' in row:
      row['drop'] = (full - row['full_accuracy']) / full
  prompt = operating_point.eval_prompts(spec, 1, min(16, spec.model.max_len - decode_tokens))
  log(f'== timing full-depth decoding, batch 1, {decode_tokens} tokens, {repeats} rounds ==')
  ms = _decode_ms({n: (loaded[n][0], {'params': loaded[n][1]['params'],
                                       'moe_state': loaded[n][1]['moe_state']})
                   for n in runs}, prompt, decode_tokens, repeats)
  for row in rows:
    row['decode_ms'] = ms[row['name']]
    # batch 1 at full depth reads every weight once per token
    row['decode_gbps'] = row['bytes'] / (row['decode_ms'] / 1e3) / 1e9
  os.makedirs(out_root, exist_ok=True)
  run_lib.write_json(os.path.join(out_root, COMPARE_JSON), rows)
  return rows


def format_compare(rows: Sequence[dict]) -> str:
  """The side-by-side table of compare_schemes (one row per scheme, float32 first)."""
  ref = rows[0]
  head = (f'{"scheme":>8} {"MiB":>6} {"experts":>8} {"acc full":>8} {"change":>7} '
          f'{"frontier":>9} {"top1 chg":>8} {"load":>5} {"ms/tok":>7} {"x f32":>6} '
          f'{"GB/s":>5}')
  lines = [head]
  for r in rows:
    fewer = r.get('frontier_fewer')
    lines.append(
        f'{r["name"]:>8} {r["bytes"] / 2**20:6.2f} '
        f'{ref["expert_bytes"] / max(r["expert_bytes"], 1):7.2f}x '
        f'{r.get("full_accuracy", float("nan")):8.4f} {0.0 - r.get("drop", 0.0) + 0.0:+7.2%} '
        f'{"" if fewer is None else f"{fewer:.2f}x":>9} '
        f'{r.get("top1_changed", 0.0):8.2%} {r.get("load_imbalance", float("nan")):5.2f} '
        f'{r["decode_ms"]:7.2f} {ref["decode_ms"] / r["decode_ms"]:5.2f}x '
        f'{r["decode_gbps"]:5.2f}')
  lines.append('experts: expert weights x smaller than float32; change: relative accuracy '
               'change vs float32 at full depth; '
               'frontier: x fewer layers at <= 1% drop (threshold on the calibration half, '
               'reported on the test half); top1 chg: scored tokens x MoE layers whose first '
               'expert differs from float32; load: max/mean expert load; ms/tok: full-depth '
               'greedy decoding, batch 1 (x f32: speed vs float32, same run, round-robin); '
               'GB/s: model bytes / time per token (a batch-1 step at full depth reads every '
               'weight: the batched expert matmul runs every expert\'s buffer)')
  for r in rows:
    if r['assigned_bytes'] < r['bytes'] - 1:
      lines.append(f'{r["name"]}: a tensor whose members mix 8 and 4 bits is stored int8: '
                   f'{r["bytes"] / 2**20:.2f} MiB as stored, {r["assigned_bytes"] / 2**20:.2f}'
                   f' MiB at the assigned bits (experts '
                   f'{ref["expert_bytes"] / max(r["assigned_expert_bytes"], 1):.2f}x smaller)')
  exits = [r for r in rows if r.get('exit_accuracy')]
  if exits:
    layers = list(exits[0]['exit_accuracy'])
    lines.append('')
    lines.append('accuracy per exit layer (every token leaves there): ' +
                 ' '.join(f'{"L" + str(k):>7}' for k in layers))
    for r in exits:
      lines.append(f'{r["name"]:>51} ' + ' '.join(f'{r["exit_accuracy"][k]:7.4f}'
                                                   for k in layers))
  cal = [r for r in rows if r.get('carried')]
  if cal:
    c0 = cal[0]['carried']
    lines.append('')
    lines.append(f'certified point of the float run (threshold {c0["threshold"]:g}, <= '
                 f'{c0["tolerance"]:.1%} {c0["measure"]} drop), carried over vs re-certified '
                 f'on each quantized run (test half; accuracy change vs float32 full depth):')
    for r in cal:
      c, rc = r['carried'], r.get('recertified') or {}
      rthr = rc.get('threshold')
      lines.append(
          f'{r["name"]:>8}: carried {c["quantized_layers_at_threshold"]:.2f} layers, accuracy '
          f'{-c["drop_at_threshold"]:+.2%} ({"holds" if c["holds"] else "BROKEN"}); '
          + ('re-certified ' + ('none' if rthr is None else f'{rthr:g}')
             + f' {rc["mean_layers"]:.2f} layers, accuracy {-rc["drop"]:+.2%}'
             if rc else 'not re-certified'))
  return '\n'.join(lines)
