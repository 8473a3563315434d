"""Training and evaluation: train state, jitted steps over the mesh, the loss sum, the loop.

`train_and_evaluate(config, workdir)` is what `experiments/train.py` and the notebooks call; it
resolves the config once (config.resolve) and everything below takes the Spec.
The loss is assembled in ONE place, `total_loss`:
    task cross-entropy (or the halting policy's replacement, e.g. PonderNet's Σ_n p_n L_n)
  + halting terms (ponder cost, KL, exit-classifier BCE, exit distillation, MoD predictor BCE)
  + MoE terms (Switch load balance · w_lb + router z-loss · w_z, summed over MoE layers).
The batch of step s is a pure function of (seed, s) and the dropout-free model is
deterministic, so a resumed run reproduces the uninterrupted one exactly.

Dims (legend: act_jax/__init__.py): B batch, L length, V vocab, N depth steps, E experts.
"""
from __future__ import annotations

import os
import signal
import time
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from act_jax.run import directory as run_lib
from act_jax.run import state as state_lib
from act_jax import config as config_lib
from act_jax import data as data_lib
from act_jax.model import halting as halting_lib
from act_jax.model import moe as moe_lib
from act_jax.scale import multihost
from act_jax.model import quant as quant_lib
from act_jax.scale import sharding as sharding_lib
from act_jax import telemetry
from act_jax.model.layers.head import token_stats
from act_jax.model.transformer import make_model
from act_jax.spec import NEVER_EXIT, OperatingPoint, Spec

State = state_lib.State


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BLV.astype(jnp.float32), targets_BL)


def cost_warmup_scale(warmup_steps: int, step) -> jax.Array:
  """min(1, step / warmup_steps): the weight of the compute cost at `step` (1 when off).
  Training starts cost-free so the halting units learn what depth buys before paying for
  it; a full-strength cost from step 0 can push every token to one step before depth has
  shown its value, a known failure of Universal Transformer + ACT runs (the synthetic
  config's ACT recipe pairs it with a deep-start halting bias; tests/test_halting_model.py)."""
  if warmup_steps <= 0 or step is None:
    return jnp.float32(1.0)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(warmup_steps))


def final_ce(spec: Spec, logits_BLV, aux, targets_BL, argmax: bool = False) -> dict:
  """{'ce': [B,L], 'argmax': [B,L] when asked} of the final head: from the logits, or (the
  training forward with model.loss_tiles > 1, logits None) from aux['h_out'] by tiles."""
  if logits_BLV is not None:
    out = {'ce': cross_entropy(logits_BLV, targets_BL)}
    if argmax:
      out['argmax'] = jnp.argmax(logits_BLV, -1)
    return out
  s = token_stats(aux['head'], aux['h_out'][None], targets_BL, spec.model.loss_tiles,
                  argmax=argmax)
  return {k: v[0] for k, v in s.items()}


def total_loss(config: Any, logits_BLV, aux, batch, step=None,
               final: dict | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The single place where task, halting and MoE losses are summed. `step` (training)
  ramps the policy's compute-cost terms in over halting.cost_warmup steps. logits_BLV None:
  the training forward by tiles (model.loss_tiles > 1), the final head read from aux.
  final: final_ce's output when the caller already has it (the train step)."""
  spec = config_lib.as_spec(config)
  targets, w_BL = batch['targets'], batch['weights']
  denom = jnp.maximum(jnp.sum(w_BL), 1.0)
  ce_BL = (final or final_ce(spec, logits_BLV, aux, targets))['ce']
  terms = {'ce': jnp.sum(ce_BL * w_BL) / denom}
  if 'step_h' in aux:  # the training forward: exits' logits by model.loss_tiles length tiles
    aux = dict(aux, exit_heads=halting_lib.ExitHeads(aux, spec.model.loss_tiles))
  task, extra = spec.policy.loss_terms(aux, targets, w_BL)
  terms['task'] = terms['ce'] if task is None else task
  scale = cost_warmup_scale(spec.halting.cost_warmup, step)
  extra = {k: v * scale if k in spec.policy.cost_terms else v for k, v in extra.items()}
  terms.update(extra)
  if 'moe' in aux:
    m = spec.moe
    terms['lb_loss'] = m.lb_loss_weight * jnp.sum(aux['moe']['lb_loss'])
    terms['z_loss'] = m.z_loss_weight * jnp.sum(aux['moe']['z_loss'])
  loss = terms['task'] + sum(v for k, v in terms.items() if k not in ('ce', 'task'))
  return loss, terms


def step_metrics(pred_BL, aux, batch) -> dict[str, jax.Array]:
  """Scalar telemetry of one batch (all from aux: telemetry is an output); pred_BL: the final
  head's argmax (final_ce)."""
  w_BL = batch['weights']
  denom = jnp.maximum(jnp.sum(w_BL), 1.0)
  acc = jnp.sum((pred_BL == batch['targets']) * w_BL) / denom
  out = {'accuracy': acc, 'layers_mean': jnp.sum(aux['layers'] * w_BL) / denom}
  if 'moe' in aux:
    a = aux['moe']
    out['moe/dropped_frac'] = jnp.mean(a['dropped_frac'])
    out['moe/router_entropy'] = jnp.mean(a['router_entropy'])
    out['moe/max_prob'] = jnp.mean(a['max_prob'])
    out['moe/fallback_frac'] = jnp.mean(a['fallback_frac'])  # 0 unless moe.fallback is set
    load = a['load']  # [layers, E]
    out['moe/load_imbalance'] = jnp.mean(
        jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9))
  return out


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- state
def _bias_update(spec: Spec, moe_state, aux):
  """DeepSeek-V3 aux-loss-free balancing: outside the optimiser, from this step's load."""
  rate = spec.moe.bias_rate
  if rate <= 0 or not moe_state or 'moe' not in aux:
    return moe_state
  kinds = spec.model.layer_kinds
  moe_j = [j for j, k in enumerate(kinds) if k == 'moe']
  n = spec.model.num_steps
  load = aux['moe']['load'].reshape(n, len(moe_j), -1)
  new = jax.tree.map(lambda x: x, moe_state)  # fresh containers, same leaves
  for k, j in enumerate(moe_j):
    layer = new['stack'][f'layer_{j}']['moe']
    if spec.model.share_weights:  # one bias shared by every step: use the summed load
      layer['bias'] = moe_lib.update_bias(layer['bias'], jnp.sum(load[:, k], 0), rate)
    else:
      layer['bias'] = jax.vmap(moe_lib.update_bias, in_axes=(0, 0, None))(
          layer['bias'], load[:, k], rate)
  return new


def make_train_step(config: Any) -> Callable:
  spec = config_lib.as_spec(config)
  model = make_model(spec, train=True)
  tx = state_lib.make_optimizer(spec.train)
  skip_nonfinite = spec.train.nonfinite == 'skip'

  def train_step(state: State, batch: dict, rng: jax.Array):
    def loss_fn(params):
      params = quant_lib.fake_quant(params, spec.quant)  # QAT (quant.scheme); else as is
      logits, aux = model.apply({'params': params, 'moe_state': state['moe_state']},
                                batch['inputs'], rngs={'jitter': rng, 'halting': rng},
                                targets_BL=batch['targets'])  # exits' losses in the scan
      # the final head once (by tiles when model.loss_tiles > 1): loss and accuracy
      final = final_ce(spec, logits, aux, batch['targets'], argmax=True)
      loss, terms = total_loss(spec, logits, aux, batch, step=state['step'], final=final)
      return loss, (terms, jax.lax.stop_gradient(final['argmax']), aux)

    (loss, (terms, pred, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    grad_norm = _global_norm(grads)
    # The updated params too: a finite loss can still step into inf/nan (e.g. huge lr).
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(_global_norm(params)))
    moe_state = _bias_update(spec, state['moe_state'], aux)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      params, opt_state = keep(params, state['params']), keep(opt_state, state['opt_state'])
      moe_state = keep(moe_state, state['moe_state'])
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite, **terms,
               **step_metrics(pred, aux, batch)}
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
            'moe_state': moe_state}, metrics

  return train_step


def continuous_steps(model, variables: dict, inputs: jax.Array, aux: dict) -> jax.Array | None:
  """f32 [B,L]: a halting policy's continuous step count, or None when it has none.
  PonderNet: the expected number of steps Σ_n n·p_n under its halting distribution, which
  needs λ_n at every step, so it is read from a full-depth forward (threshold NEVER_EXIT;
  the thresholded forward fills p only up to the exit step). ACT: its ponder cost ρ = N + R.
  Unlike the integer halting step it has no ties, so its Spearman with difficulty is not
  capped by them."""
  if 'expected_steps' in aux:
    _, full = model.apply(variables, inputs, threshold=NEVER_EXIT,
                          rngs={'halting': jax.random.PRNGKey(0)})
    return full['expected_steps']
  return aux.get('ponder')


def make_eval_step(config: Any) -> Callable:
  """Per-example sums so the host can aggregate by domain and difficulty."""
  spec = config_lib.as_spec(config)
  model = make_model(spec, train=False)
  by_difficulty = spec.data.name in data_lib.DIFFICULTY_FIELD

  def eval_step(state: State, batch: dict, threshold=None):
    params = quant_lib.fake_quant(state['params'], spec.quant)  # QAT: what training sees
    logits, aux = model.apply({'params': params, 'moe_state': state['moe_state']},
                              batch['inputs'], threshold=threshold,
                              rngs={'halting': jax.random.PRNGKey(0)})  # halting.sample
    w = batch['weights']
    ce = cross_entropy(logits, batch['targets']) * w
    correct = (jnp.argmax(logits, -1) == batch['targets']) * w
    out = {'loss_sum': ce.sum(-1), 'weight_sum': w.sum(-1), 'correct_sum': correct.sum(-1),
           'layers_sum': (aux['layers'] * w).sum(-1), 'layers': aux['layers']}
    if by_difficulty:  # synthetic tasks: the continuous step count too (Spearman without ties)
      cont = continuous_steps(model, {'params': params, 'moe_state': state['moe_state']},
                              batch['inputs'], aux)
      if cont is not None:
        out['expected_steps_sum'] = (cont * w).sum(-1)
    if 'moe' in aux:
      out['moe_load'] = aux['moe']['load']                # [layers, E]
      out['moe_dropped'] = aux['moe']['dropped_frac']     # [layers]
      out['moe_fallback'] = aux['moe']['fallback_frac']   # [layers]
      out['top1_expert'] = aux['moe']['top1_expert']      # [layers, B, L]
    return out

  return eval_step


def _fetch(tree):
  """Device -> host: the global value on every process (multi-host: gathers the rows the
  other processes hold; a replicated leaf is read from a local copy, no collective)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)

  return jax.tree.map(get, tree)


def _agree(flag: bool) -> bool:
  """True on every process if it is True on any. A stop decided by one process alone (its
  own SIGTERM, its own clock) would leave the others waiting in the next step's collectives
  and saving a checkpoint that process never joins."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.bool_))))


def evaluate(config: Any, state, eval_step, batches, domains, threshold=None,
             histograms: dict | None = None, put: Callable | None = None) -> dict[str, float]:
  """Held-out quality *and* compute: per domain and per difficulty.

  If `histograms` is a dict, it is filled with per-token arrays for TensorBoard."""
  spec = config_lib.as_spec(config)
  rows = {k: [] for k in ('loss_sum', 'weight_sum', 'correct_sum', 'layers_sum',
                          'expected_steps_sum')}
  dom, diff, load, dropped, tok_layers, tok_w, top1 = [], [], [], [], [], [], []
  fallback = []
  for b in batches:
    dev = put(b) if put is not None else {k: jnp.asarray(v) for k, v in b.items()}
    out = _fetch(eval_step(state, dev, threshold))
    for k in rows:
      if k in out:
        rows[k].append(np.asarray(out[k]))
    tok_layers.append(np.asarray(out['layers']).ravel())
    tok_w.append(np.asarray(b['weights']).ravel())
    dom.append(b['domain'])
    diff.append(b['difficulty'])
    if 'moe_load' in out:
      load.append(out['moe_load'])
      dropped.append(out['moe_dropped'])
      fallback.append(out['moe_fallback'])
      top1.append(np.asarray(out['top1_expert']).reshape(out['top1_expert'].shape[0], -1))
  r = {k: np.concatenate(v) for k, v in rows.items() if v}
  top1_all = np.concatenate(top1, axis=1) if top1 else None  # [layers, tokens]
  dom, diff = np.concatenate(dom), np.concatenate(diff)
  w = np.maximum(r['weight_sum'].sum(), 1.0)
  res = {'loss': r['loss_sum'].sum() / w, 'accuracy': r['correct_sum'].sum() / w,
         'layers_mean': r['layers_sum'].sum() / w,
         'layers_full': float(spec.model.num_layers)}
  # Exit-depth histogram: fraction of scored tokens that ran k layers.
  tl, tw = np.concatenate(tok_layers), np.concatenate(tok_w)
  if histograms is not None:
    histograms['eval/layers_executed'] = tl[tw > 0]
    if load:
      histograms.update(telemetry.aux_histograms(
          {'layers': tl[None], 'moe': {'top1_expert': top1_all, 'load': np.sum(np.stack(load), 0)}},
          weights=tw[None], prefix='eval/'))
  for k in range(spec.model.num_layers + 1):
    frac = tw[np.round(tl) == k].sum() / max(tw.sum(), 1e-9)
    if frac > 0:
      res[f'layers_hist/{k}'] = frac
  for i, name in enumerate(domains):
    sel = dom == i
    ws = r['weight_sum'][sel].sum()
    if ws > 0:
      res[f'{name}/loss'] = r['loss_sum'][sel].sum() / ws
      res[f'{name}/accuracy'] = r['correct_sum'][sel].sum() / ws
      res[f'{name}/layers_mean'] = r['layers_sum'][sel].sum() / ws
  if np.any(diff > 0):
    per_ex_layers = r['layers_sum'] / np.maximum(r['weight_sum'], 1.0)
    for d, v in sorted(telemetry.mean_by_bucket(per_ex_layers, diff).items()):
      res[f'difficulty_{int(d)}/layers_mean'] = v
    for d, v in sorted(telemetry.mean_by_bucket(
        r['correct_sum'] / np.maximum(r['weight_sum'], 1.0), diff).items()):
      res[f'difficulty_{int(d)}/accuracy'] = v
    res['spearman_layers_difficulty'] = telemetry.spearman(per_ex_layers, diff)
    # the continuous count (PonderNet Σ n·p_n, ACT N + R): ranks without ties
    expected = r.get('expected_steps_sum')
    per_ex_expected = None if expected is None else expected / np.maximum(r['weight_sum'], 1.0)
    if per_ex_expected is not None:
      res['expected_steps_mean'] = expected.sum() / w
      res['spearman_expected_steps_difficulty'] = telemetry.spearman(per_ex_expected, diff)
    scored = r['weight_sum'] > 0
    # an example is right when every scored token is (addition: every answer digit and EOS)
    seq_ok = scored & (r['correct_sum'] >= r['weight_sum'] - 1e-6)
    res['sequence_accuracy'] = seq_ok.sum() / max(scored.sum(), 1)
    for name, (lo, hi) in data_lib.difficulty_ranges(spec.data).items():
      sel = scored & (diff >= lo) & (diff <= hi)
      ws = max(r['weight_sum'][sel].sum(), 1.0)
      res[f'range_{name}/accuracy'] = r['correct_sum'][sel].sum() / ws
      res[f'range_{name}/sequence_accuracy'] = seq_ok[sel].sum() / max(sel.sum(), 1)
      res[f'range_{name}/layers_mean'] = r['layers_sum'][sel].sum() / ws
      res[f'range_{name}/spearman'] = telemetry.spearman(per_ex_layers[sel], diff[sel])
      if per_ex_expected is not None:
        res[f'range_{name}/expected_steps'] = r['expected_steps_sum'][sel].sum() / ws
        res[f'range_{name}/spearman_expected'] = telemetry.spearman(per_ex_expected[sel],
                                                                    diff[sel])
  if load:
    load_arr = np.sum(np.stack(load), 0)  # [layers, E]
    res['moe/dropped_frac'] = float(np.mean(np.stack(dropped)))
    res['moe/load_imbalance'] = float(np.mean(load_arr.max(-1) / np.maximum(load_arr.mean(-1), 1e-9)))
    res['moe/unused_experts'] = float(np.sum(load_arr == 0))
    if spec.moe.fallback != 'none':
      res['moe/fallback_frac'] = float(np.mean(np.stack(fallback)))
  return {k: float(v) for k, v in res.items()}


# ----------------------------------------------------------------------------- the loop
class _Preemption:
  """SIGTERM -> finish the current step, save it, exit cleanly."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. some notebook runners)
      self._old = None
    return self

  def _handler(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _host_batch(batch: dict, mesh) -> dict:
  """The global batch (numpy, the same on every process) as global arrays sharded over the
  batch axes; each process places only the rows its own devices hold. The rows come from
  the sharding, not from process_index: with a 'model' axis spanning processes, or devices
  not ordered by process, a process holds other rows than its 1/process_count slice."""
  out = {}
  for k, v in batch.items():
    out[k] = jax.make_array_from_callback(
        v.shape, sharding_lib.data_sharding(mesh, v.ndim), lambda idx, v=v: v[idx])
  return out


def train_and_evaluate(config: Any, workdir: str, log: Callable[[str], None] = print,
                       cluster: multihost.Cluster | None = None) -> dict[str, float]:
  """Trains (resuming from workdir if it holds a checkpoint), evaluates, returns eval metrics.

  config: a ConfigDict (resolved here, once) or a Spec. With train.multihost=True every
  process of the job runs this same call (see act_jax/scale/multihost.py); `cluster` names the
  coordinator and this process (None: auto-detected, e.g. on a TPU pod)."""
  if not isinstance(config, Spec):
    config = config_lib.complete(config)  # fields checked by resolve, below
  # Before resolve: the device count is global after this.
  multihost.maybe_initialize(bool(config.train.multihost), cluster)
  spec = config_lib.as_spec(config)
  config_lib.check_training(spec)
  run_lib.check_output_dir(workdir, '--workdir', run_lib.RUN_MARKERS, 'a training run')
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding_lib.make_mesh(spec.mesh.shape)
  dataset = data_lib.make_dataset(spec.data, spec.seed)
  tcfg = spec.train
  ckpt = run_lib.checkpointer(workdir, save_every=tcfg.checkpoint_every,
                              keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing)
  abstract, shardings = state_lib.state_shardings(spec, mesh)
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, abstract)  # raises CheckpointError if incompatible
    log(f'resumed from step {latest} in {workdir}')
  else:
    state = state_lib.init_state(spec, mesh, shardings)
  if is_main:
    run_lib.write_config(workdir, spec)
  start = int(_fetch(state['step']))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract['params']))
  log(f'model: {n_params:,} params, {spec.model.num_layers} layers, halting='
      f'{spec.halting.name}, router={spec.moe.router}; mesh {dict(mesh.shape)}; '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s)')
  if note := config_lib.where_supported_note(spec):
    log(f'halting {note}')
  writer = telemetry.MetricsWriter(workdir, enabled=is_main)
  batch_sh = {k: sharding_lib.data_sharding(mesh, 2 if k in ('inputs', 'targets', 'weights')
                                            else 1)
              for k in ('inputs', 'targets', 'weights', 'domain', 'difficulty')}
  repl = sharding_lib.replicated(mesh)
  donate = (0,) if jax.default_backend() != 'cpu' else ()
  with sharding_lib.mesh_context(mesh):
    train_step = jax.jit(make_train_step(spec), in_shardings=(shardings, batch_sh, repl),
                         out_shardings=(shardings, repl), donate_argnums=donate)
    eval_step = jax.jit(make_eval_step(spec))
  eval_batches = dataset.eval_batches(tcfg.eval_batches)
  tokens_per_step = spec.data.batch_size * spec.data.seq_len
  progress = telemetry.Progress(tcfg.steps, start=start)
  t_start = time.time()
  t_log, steps_since = time.time(), 0
  eval_res: dict[str, float] = {}

  def run_eval(step):
    nonlocal eval_res
    hists: dict = {}
    with sharding_lib.mesh_context(mesh):
      eval_res = evaluate(spec, state, eval_step, eval_batches, dataset.domains,
                          histograms=hists, put=lambda b: _host_batch(b, mesh))
    writer.write_scalars(step, eval_res, split='eval')
    writer.write_histograms(step, hists)
    hist = ' '.join(f'{k}:{v:.0%}' for k, v in depth_hist(eval_res).items())
    log(f'eval step {step}: loss {eval_res["loss"]:.4f} acc {eval_res["accuracy"]:.4f} '
        f'layers {eval_res["layers_mean"]:.2f}/{spec.model.num_layers} [exit depth {hist}]')

  step = start
  with _Preemption() as pre:
    while step < tcfg.steps:
      batch = _host_batch(dataset.train_batch(step), mesh)
      rng = jax.random.fold_in(jax.random.PRNGKey(spec.seed), step)
      with sharding_lib.mesh_context(mesh):
        new_state, metrics = train_step(state, batch, rng)
      metrics = _fetch(metrics)
      if not metrics['finite'] and tcfg.nonfinite == 'abort':
        ckpt.wait()
        raise FloatingPointError(
            f'non-finite loss/gradient at step {step} (loss={metrics["loss"]}); aborting '
            f'without checkpointing this state (set train.nonfinite=skip to skip such '
            f'updates). Last good checkpoint: step {ckpt.latest_step()}')
      state = new_state
      step += 1
      steps_since += 1
      if step % tcfg.log_every == 0 or step == tcfg.steps:
        dt = time.time() - t_log
        scal = {k: float(v) for k, v in metrics.items()}
        scal['tokens_per_sec'] = steps_since * tokens_per_step / max(dt, 1e-9)
        scal['step_time'] = dt / max(steps_since, 1)
        writer.write_scalars(step, scal, split='train')
        log(f'{progress.update(step)} loss {scal["loss"]:.4f} '
            f'{scal["tokens_per_sec"]:,.0f} tok/s layers {scal["layers_mean"]:.2f}')
        t_log, steps_since = time.time(), 0
      stop = _agree(bool(pre.requested or (
          tcfg.max_seconds and time.time() - t_start > tcfg.max_seconds)))
      ckpt.save(step, state, force=bool(stop) or step == tcfg.steps)
      if step % tcfg.eval_every == 0 and step != tcfg.steps:
        run_eval(step)
        t_log = time.time()  # keep eval time out of tokens/s
      if stop:
        why = 'SIGTERM' if pre.requested else 'time budget, or another process stopped'
        log(f'stopping at step {step} ({why}); checkpoint saved')
        break
  ckpt.wait()
  run_eval(step)
  writer.flush()
  writer.close()
  ckpt.close()
  eval_res['step'] = float(step)
  eval_res['train_seconds'] = time.time() - t_start
  log(summary(spec, eval_res, dataset.domains, workdir))
  return eval_res


def summary(spec: Spec, res: dict[str, float], domains, workdir: str) -> str:
  """The end-of-run block: quality, compute vs full depth, MoE balance, where to look."""
  lines = [f'== summary ({int(res["step"])} steps, {res["train_seconds"] / 60:.1f} min) ==']
  lines += result_lines(spec, res, domains)
  lines.append(f'metrics: {workdir}/metrics.jsonl, TensorBoard: {workdir}/tb; plots: '
               f'python -m experiments.report --workdir={workdir}')
  return '\n'.join(lines)


def evaluation_summary(spec: Spec, res: dict[str, float], domains, workdir: str, step: int,
                       op: OperatingPoint, source: str, num_batches: int) -> str:
  """experiments.evaluate's block: which checkpoint, at which operating point, on what."""
  cap = '' if op.max_layers is None else f', max_layers {op.max_layers}'
  lines = [f'== evaluation of {workdir} (checkpoint step {step}) ==',
           f'operating point: threshold {op.threshold:g}{cap} ({source}); '
           f'{num_batches} held-out batches of {spec.data.batch_size}x{spec.data.seq_len}']
  return '\n'.join(lines + result_lines(spec, res, domains))


def result_lines(spec: Spec, res: dict[str, float], domains) -> list[str]:
  """Quality, compute vs full depth, per domain / difficulty, MoE balance (shared lines)."""
  full = spec.model.num_layers
  lines = [f'held-out loss {res["loss"]:.4f} nats/token, accuracy {res["accuracy"]:.4f}',
           f'mean layers executed {res["layers_mean"]:.2f} of {full} '
           f'({full / max(res["layers_mean"], 1e-9):.2f}x fewer than full depth)']
  for d in domains:
    if f'{d}/loss' in res:
      lines.append(f'  {d:>8}: loss {res[f"{d}/loss"]:.4f} acc {res[f"{d}/accuracy"]:.4f} '
                   f'layers {res[f"{d}/layers_mean"]:.2f}/{full}')
  if 'spearman_layers_difficulty' in res:
    lines += difficulty_lines(res, full)
  if 'moe/load_imbalance' in res:
    lines.append(f'experts: load max/mean {res["moe/load_imbalance"]:.2f}, dropped '
                 f'{res["moe/dropped_frac"]:.2%}, unused {int(res["moe/unused_experts"])}'
                 + (f', fell back to the generalist {res["moe/fallback_frac"]:.2%}'
                    if 'moe/fallback_frac' in res else ''))
  return lines


def by_difficulty(res: dict[str, float], metric: str) -> dict[int, float]:
  """{difficulty: value} of evaluate's 'difficulty_<d>/<metric>' entries, sorted."""
  out = {int(k.split('/')[0].split('_')[1]): v for k, v in res.items()
         if k.startswith('difficulty_') and k.endswith(f'/{metric}')}
  return dict(sorted(out.items()))


def depth_hist(res: dict[str, float]) -> dict[int, float]:
  """{layers run: fraction of scored tokens} from evaluate's 'layers_hist/<k>' entries."""
  return {int(k.split('/')[1]): v for k, v in res.items() if k.startswith('layers_hist/')}


def difficulty_lines(res: dict[str, float], full: int, max_buckets: int = 12) -> list[str]:
  """Synthetic tasks: mean layers and accuracy per difficulty (grouped into at most
  max_buckets equal-width buckets, each the mean of its difficulties' values), Spearman,
  the in-distribution / extrapolation ranges, and whether the depth distribution collapsed."""
  layers_d, acc_d = by_difficulty(res, 'layers_mean'), by_difficulty(res, 'accuracy')
  diffs = list(layers_d)
  width = max(1, math.ceil(len(diffs) / max_buckets)) if diffs else 1
  cells = []
  for i in range(0, len(diffs), width):
    group = diffs[i:i + width]
    layers = np.mean([layers_d[d] for d in group])
    acc = np.mean([acc_d[d] for d in group])
    name = f'{group[0]}' if len(group) == 1 else f'{group[0]}-{group[-1]}'
    cells.append(f'{name}:{layers:.2f}({acc:.2f})')
  lines = ['difficulty -> mean layers (accuracy): ' + ' '.join(cells),
           f'Spearman(layers, difficulty) = {res["spearman_layers_difficulty"]:.3f}; '
           f'sequence accuracy {res["sequence_accuracy"]:.4f}']
  if 'spearman_expected_steps_difficulty' in res:
    lines.append(f'expected steps (PonderNet Σ n·p_n, ACT N + R) {res["expected_steps_mean"]:.2f}, '
                 f'Spearman(expected steps, difficulty) = '
                 f'{res["spearman_expected_steps_difficulty"]:.3f}')
  for k in list(res):  # evaluate's order: in-distribution, then extrapolation
    if k.startswith('range_') and k.endswith('/accuracy'):
      name = k[len('range_'):-len('/accuracy')]
      lines.append(f'  {name:>16}: accuracy {res[k]:.4f} (sequences '
                   f'{res[f"range_{name}/sequence_accuracy"]:.4f}), layers '
                   f'{res[f"range_{name}/layers_mean"]:.2f}/{full}, Spearman '
                   f'{res[f"range_{name}/spearman"]:.3f}'
                   + (f' (expected steps {res[f"range_{name}/expected_steps"]:.2f}, Spearman '
                      f'{res[f"range_{name}/spearman_expected"]:.3f})'
                      if f'range_{name}/spearman_expected' in res else ''))
  verdict = telemetry.collapse(depth_hist(res), full)
  if verdict:
    lines.append(f'depth collapsed: {verdict}')
  return lines
