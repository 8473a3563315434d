"""Inference that really skips compute: while-loops over the stacked layer parameters.

Training runs the depth loop as a masked `nn.scan` (static shapes; halted tokens are frozen
but still computed). Here the same DepthStep module is applied to the parameters of step i,
picked with a dynamic index from the scan-stacked pytree, inside a `lax.while_loop` that
stops as soon as no token is running — layers after that are never executed.

* `forward_while`: a whole batch; same math as the masked scan (tests pin outputs and exit
  steps). `forward_compact` additionally does not wait for the slowest rows: when at most
  half of the rows still run, they are gathered into a bucket of half the size and the loop
  continues on that (B, B/2, B/4, ... static buckets).
* `decode_step` / `generate`: early-exit decoding with a KV cache (CALM, Schuster 2022).
  A token that exits after step e has no keys/values at deeper layers, yet later tokens
  attend there. kv_fill='project' computes them from the EXIT state:
  K_j = RoPE(W_K^j · norm_j(h^{e})), V_j = W_V^j · norm_j(h^{e}) for every layer j past e
  (the public t5x code propagates the first segment's state instead — a known bug);
  kv_fill='copy' copies the exit layer's own K/V into the deeper layers.
  kv_fill='lazy' computes the same K/V as 'project', but only when a later token first runs
  that layer: each row keeps its tokens' exit states h_exit [B, T, D] and, per depth step,
  how far its cache is filled (`filled` [B, N]). The positions still pending at step j are
  always one contiguous range [filled[b, j], index_b), because a token that runs step j
  fills everything before it; they are projected in chunks of LAZY_CHUNK positions (one
  batched matmul per layer instead of one weight read per exited token and skipped layer),
  and layers that no later token reaches are never filled at all.
The threshold is a traced argument of every jitted function: changing the operating point
never recompiles. An operating point (spec.OperatingPoint: threshold + optional depth cap)
enters as its per-step vector [N] (OperatingPoint.vector: -inf at the cap step); every entry
point here accepts an OperatingPoint, that vector, or a scalar threshold.

Dims (legend: act_jax/__init__.py): B batch, L length, T cache length, D d_model, V vocab,
N depth steps, H heads, J head dim.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp



from act_jax import config as config_lib
from act_jax.errors import ConfigError
from act_jax.model.layers import project_kv, rms_norm
from act_jax.model import step_cell
from act_jax.model.transformer import (DepthStep, dtype_of, finish_outputs, init_cache, make_model,
                           prepare_inputs)
from act_jax.spec import NEVER_EXIT, OperatingPoint, Spec, threshold_per_step  # noqa: F401

KV_FILL = ('project', 'copy', 'lazy')
LAZY_CHUNK = 8  # positions projected per batched lazy fill (more pending: several chunks)


def check_threshold(threshold: float, name: str = 'threshold') -> None:
  """ConfigError unless threshold is in (0, 1] (a user-given operating point)."""
  if isinstance(threshold, bool) or not 0.0 < float(threshold) <= 1.0:
    raise ConfigError(f'{name}={threshold}: must be in (0, 1]')


def exit_threshold(config: Any, threshold: float, max_layers: Optional[int] = None
                   ) -> jax.Array:
  """OperatingPoint(threshold, max_layers).vector(spec): f32 [N], -inf at the cap step."""
  return OperatingPoint(threshold, max_layers).vector(config_lib.as_spec(config))


def threshold_arg(spec: Spec, threshold: Any, per_row: bool = False) -> jax.Array:
  """Any accepted threshold (OperatingPoint, scalar, [N]; None: the spec's default operating
  point) as the f32 [N] the jitted loops take: one shape for every operating point, so none
  of them recompiles. per_row=True also takes one point per row, [B, N] (decode_step
  without compaction: a serving batch whose rows run at their own points)."""
  if threshold is None:
    threshold = spec.default_operating_point
  if isinstance(threshold, OperatingPoint):
    return threshold.vector(spec)
  if jnp.ndim(threshold) > 1 and not per_row:  # compacted rows keep no per-row thresholds
    raise ConfigError(f'threshold of shape {jnp.shape(threshold)}: this call takes one '
                      f'operating point (an OperatingPoint, a scalar or [N]); per-row '
                      f'points [B, N] need decode_step without compaction')
  return threshold_per_step(threshold, spec.model.num_steps)


# ----------------------------------------------------------------------------- depth loop
def index_steps(tree, i):
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False), tree)


def step_variables(spec: Spec, variables: dict, i) -> dict:
  """Variables of scan step i: a dynamic slice of the stacked 'stack' subtree."""
  stack_p = variables['params']['stack']
  stack_m = (variables.get('moe_state') or {}).get('stack', {})
  if spec.model.share_weights:
    return {'params': stack_p, 'moe_state': stack_m}
  return {'params': index_steps(stack_p, i), 'moe_state': index_steps(stack_m, i)}


def top_variables(variables: dict) -> dict:
  return {k: v for k, v in variables['params'].items() if k != 'stack'}


def _depth_while(spec: Spec, variables, carry, bcast, cache=None, keep_layer_aux=True,
                 row_bucket: Optional[int] = None, bufs=None, rows=None, lazy=None):
  """Runs DepthStep i = carry['i'] .. while any token runs (and, with row_bucket, while
  more than row_bucket rows run). Returns (carry, ys stacked [N, ...], cache).

  cache (decoding): the FULL-batch stacked cache; `rows` says which of its rows this
  (possibly compacted) batch holds. Only position cache_index is written back."""
  n = spec.model.num_steps
  step = DepthStep(spec, train=False)

  def apply(c, i, cache_i):
    new_c, ys = step.apply(step_variables(spec, variables, i), c, cache_i, bcast,
                           rngs={'halting': jax.random.fold_in(jax.random.PRNGKey(0), i)})
    if not keep_layer_aux:
      ys = {k: v for k, v in ys.items() if k != 'layer_aux'}
    return new_c, ys

  def cache_rows(kv, i):
    kv_i = index_steps(kv, i)
    return kv_i if rows is None else jax.tree.map(lambda x: x[rows], kv_i)

  cache0 = None if cache is None else cache_rows(cache, 0)
  ys_shape = jax.eval_shape(lambda c: apply(c, jnp.int32(0), cache0)[1], carry)
  ys_shape = {k: v for k, v in ys_shape.items() if k != 'cache'}
  if bufs is None:
    bufs = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape, s.dtype), ys_shape)

  def cond(st):
    c = st[0]
    go = (c['i'] < n) & jnp.any(c['running'])
    if row_bucket is not None:
      go = go & (jnp.sum(jnp.any(c['running'], axis=-1)) > row_bucket)
    return go

  def body(st):
    c, b, kv = st
    i = c['i']
    new_c, ys = apply(c, i, None if kv is None else cache_rows(kv, i))
    if kv is not None:
      kv = jax.tree.map(lambda full, new: write_position(full, new, i, bcast['cache_index'],
                                                          new_c['h'].shape[1], rows),
                        kv, ys.pop('cache'))
    b = jax.tree.map(lambda full, new: jax.lax.dynamic_update_index_in_dim(full, new, i, 0),
                     b, ys)
    return new_c, b, kv

  def lazy_body(st):
    c, b, kv, lz = st
    i = c['i']
    r = _rows(rows, c['h'].shape[0])
    index_B = jnp.broadcast_to(bcast['cache_index'], r.shape)
    # the fill loop only when something is pending: entering it costs a copy of its carry
    kv = jax.lax.cond(jnp.any(lz['filled'][r, i] < index_B),
                      lambda kv: _fill_pending(spec, variables, kv, lz, i, bcast['cache_index'],
                                               c['h'].shape[0], rows)[0],
                      lambda kv: kv, kv)
    c, b, kv = body((c, b, kv))
    return c, b, kv, dict(lz, filled=lz['filled'].at[r, i].set(index_B + 1))

  if lazy is None:
    return jax.lax.while_loop(cond, body, (carry, bufs, cache))
  carry, bufs, cache, lazy = jax.lax.while_loop(lambda st: cond(st[:3]), lazy_body,
                                                (carry, bufs, cache, lazy))
  return carry, bufs, (cache, lazy)


def _rows(rows, size: int):
  return jnp.arange(size) if rows is None else rows


def _kv_params(spec: Spec, variables) -> list[dict]:
  """Per layer of a step: the attention norm and K/V projections (stacked over steps).
  Filling K/V reads only these: slicing a whole step's parameters would copy its MLP or
  experts for nothing."""
  stack = variables['params']['stack']
  return [{'scale': stack[f'layer_{g}']['attn_norm']['scale'],
           'wk': stack[f'layer_{g}']['attn']['wk'], 'wv': stack[f'layer_{g}']['attn']['wv']}
          for g in range(len(spec.model.layer_kinds))]


def init_lazy(spec: Spec, batch: int, max_len: int, filled: int = 0) -> dict:
  """kv_fill='lazy' state: exit states [B, T, D] and the filled prefix per row and step
  (`filled` positions of every step already hold K/V, e.g. a prefilled prompt)."""
  m = spec.model
  return {'h_exit': jnp.zeros((batch, max_len, m.d_model), dtype_of(m.dtype)),
          'filled': jnp.full((batch, m.num_steps), filled, jnp.int32)}


def _fill_pending(spec: Spec, variables, cache, lazy, j, index, batch: int, rows):
  """Projects the K/V at step j of the positions [filled[r, j], index_r) of this batch's
  rows from their exit states, LAZY_CHUNK positions per iteration."""
  m = spec.model
  r = _rows(rows, batch)
  index_B = jnp.broadcast_to(index, r.shape)
  t = lazy['h_exit'].shape[1]

  def body(st):
    kv, start_B = st
    # sliced here, not outside the loop: a step with nothing pending reads no weights
    params = [p if m.share_weights else index_steps(p, j) for p in _kv_params(spec, variables)]
    pos_BW = start_B[:, None] + jnp.arange(LAZY_CHUNK, dtype=jnp.int32)
    ok_BW = pos_BW < index_B[:, None]
    pos_BW = jnp.minimum(pos_BW, t - 1)
    h_BWD = lazy['h_exit'][r[:, None], pos_BW]
    new = []
    for g, p in enumerate(params):
      k, v = project_kv(rms_norm(h_BWD, p['scale']), p['wk'], p['wv'], pos_BW, m.rope_base,
                        dtype_of(m.dtype), spec.quant)
      entry = {}
      for name, val in (('k', k), ('v', v)):
        full = kv[g][name]                                    # [N,B,T,H,J]
        old = full[j, r[:, None], pos_BW]
        val = jnp.where(ok_BW[..., None, None], val.astype(full.dtype), old)
        entry[name] = full.at[j, r[:, None], pos_BW].set(val)
      new.append(entry)
    return new, jnp.minimum(start_B + LAZY_CHUNK, jnp.maximum(index_B, start_B))

  cache, _ = jax.lax.while_loop(lambda st: jnp.any(st[1] < index_B), body,
                                (cache, lazy['filled'][r, j]))
  return cache, lazy


def write_position(full_NBTHJ, new_BTHJ, i, index, length, rows):
  """full[i, rows, index:index+length] = new[:, index:index+length] (index: one position,
  or one per row [B] of this batch)."""
  if jnp.ndim(index) == 0:
    chunk = jax.lax.dynamic_slice_in_dim(new_BTHJ, index, length, axis=1)
    if rows is None:  # 5-D in-place update: no per-layer copy of the cache
      return jax.lax.dynamic_update_slice(full_NBTHJ, chunk[None], (i, 0, index, 0, 0))
    pos = index + jnp.arange(length)
    return full_NBTHJ.at[i, rows[:, None], pos[None, :]].set(chunk)
  pos_BL = index[:, None] + jnp.arange(length)
  chunk = jnp.take_along_axis(new_BTHJ, pos_BL[:, :, None, None], axis=1)
  rows = jnp.arange(new_BTHJ.shape[0]) if rows is None else rows
  return full_NBTHJ.at[i, rows[:, None], pos_BL].set(chunk)


def forward_while(config: Any, variables: dict, tokens_BL: jax.Array,
                  threshold: Any = None, retrieval: Optional[dict] = None
                  ) -> tuple[jax.Array, dict]:
  """Batch forward that stops the depth loop once every token has exited (threshold: an
  OperatingPoint, [N] or scalar, or [B, N] one point per row (the shadow scorer of
  act_jax/serve/monitor.py); default: the spec's default operating point). retrieval:
  the datastore's arrays when spec.retrieval is set (act_jax/retrieval)."""
  spec = config_lib.as_spec(config)
  if step_cell.is_step_cell(spec):  # the vector tasks' cell: tokens_BL are the vectors
    return step_cell.forward_while(spec, variables, tokens_BL, threshold_arg(spec, threshold))
  carry, bcast = prepare_inputs(spec, top_variables(variables), tokens_BL,
                                threshold_arg(spec, threshold, per_row=True),
                                retrieval=retrieval)
  carry, ys, _ = _depth_while(spec, variables, carry, bcast)
  return finish_outputs(spec, carry, ys, bcast['head'], tokens_BL)


def _run_compacted(spec: Spec, variables, carry, bcast, cache=None, min_rows: int = 1,
                   lazy=None):
  """Depth loop over buckets B, B/2, ...: when at most half of a bucket's rows still run,
  those rows are gathered into the next bucket (exited rows stop costing compute).
  With lazy (kv_fill='lazy') the third result is (cache, lazy), as for _depth_while.
  carry['executed_B']: the steps each row's bucket ran (a row gathered out at step i has no
  K/V written at steps >= i: decode_step's fill writes them, as for an exited row)."""
  b = carry['h'].shape[0]
  sizes = [b]
  while sizes[-1] // 2 >= max(min_rows, 1) and sizes[-1] % 2 == 0:
    sizes.append(sizes[-1] // 2)
  rows = jnp.arange(b)
  executed_B = jnp.zeros((b,), jnp.int32)
  full_carry, full_ys, ys = None, None, None
  row_keys = ('positions', 'tokens', 'key_mask')
  if jnp.ndim(bcast['cache_index']) == 1:  # continuous batching: a position per row
    row_keys += ('cache_index',)
  for s, size in enumerate(sizes):
    nxt = sizes[s + 1] if s + 1 < len(sizes) else None
    carry, ys, cache = _depth_while(spec, variables, carry, bcast, cache,
                                    keep_layer_aux=False, row_bucket=nxt, bufs=ys,
                                    rows=None if s == 0 else rows, lazy=lazy)
    if lazy is not None:
      cache, lazy = cache
    executed_B = executed_B.at[rows].set(carry['i'])  # a later bucket overwrites its rows
    if full_carry is None:
      full_carry, full_ys = carry, ys
    else:  # scatter this bucket's rows back into the full-size results
      full_carry = {k: (v if k == 'i' else jax.tree.map(lambda f, x: f.at[rows].set(x), v,
                                                        carry[k]))
                    for k, v in full_carry.items()}
      full_ys = jax.tree.map(lambda f, x: f.at[:, rows].set(x), full_ys, ys)
    if nxt is None:
      break
    keep = jnp.argsort(~jnp.any(carry['running'], axis=-1), stable=True)[:nxt]  # running first
    rows = rows[keep]
    carry = {k: (v if k == 'i' else jax.tree.map(lambda x: x[keep], v)) for k, v in carry.items()}
    bcast = {k: (jax.tree.map(lambda x: x[keep], v) if k in row_keys and v is not None else v)
             for k, v in bcast.items()}
    ys = jax.tree.map(lambda x: x[:, keep], ys)  # the bucket carries its earlier steps
  full_carry['i'] = carry['i']
  full_carry['executed_B'] = executed_B
  full_ys = dict(full_ys)
  full_ys['layer_aux'] = []  # per-layer MoE telemetry is not tracked across buckets
  return full_carry, full_ys, (cache if lazy is None else (cache, lazy))


def forward_compact(config: Any, variables: dict, tokens_BL: jax.Array,
                    threshold: Any = None, min_rows: int = 1) -> tuple[jax.Array, dict]:
  """forward_while that does not wait for the slowest rows (see _run_compacted).

  A row (sequence) runs while any of its tokens runs. Returns (logits, aux) with
  aux['layers'] and aux['exit_step'] equal to the masked scan's (MoE telemetry dropped).
  """
  spec = config_lib.as_spec(config)
  carry, bcast = prepare_inputs(spec, top_variables(variables), tokens_BL,
                                threshold_arg(spec, threshold))
  carry, ys, _ = _run_compacted(spec, variables, carry, bcast, None, min_rows)
  return finish_outputs(spec, carry, ys, bcast['head'], tokens_BL)


# ----------------------------------------------------------------------------- decoding
def _fill_skipped_kv(spec: Spec, variables, cache, h_BLD, exit_step_BL, executed, index,
                     positions_BL, kv_fill: str):
  """Writes K/V at `index` for every layer past each token's exit step (see module doc).
  executed: the steps the loop ran, for the batch or per row [B] (compaction); a step a
  row ran already holds the K/V of its frozen exit state."""
  m = spec.model
  n, kinds = m.num_steps, m.layer_kinds
  kv_params = _kv_params(spec, variables)
  e_B = exit_step_BL[:, -1]
  per_row = jnp.ndim(index) == 1  # continuous batching: each row at its own position
  rows_B = jnp.arange(e_B.shape[0])
  executed_B = jnp.broadcast_to(executed, e_B.shape)
  if kv_fill == 'project':
    start = jnp.min(executed_B)  # steps a row ran with its frozen exit state: projected
  else:
    start = jnp.min(e_B) + 1
    last = len(kinds) - 1  # the exit layer: last layer of the exit step
    k_exit = jnp.take_along_axis(cache[last]['k'], e_B[None, :, None, None, None], 0)[0]
    v_exit = jnp.take_along_axis(cache[last]['v'], e_B[None, :, None, None, None], 0)[0]
    if per_row:
      k_exit, v_exit = k_exit[rows_B, index][:, None], v_exit[rows_B, index][:, None]
    else:
      k_exit = jax.lax.dynamic_slice_in_dim(k_exit, index, 1, axis=1)
      v_exit = jax.lax.dynamic_slice_in_dim(v_exit, index, 1, axis=1)

  def body(j, kv):
    skipped_B = (j > e_B) & ((j >= executed_B) | (kv_fill != 'project'))
    new = []
    for g in range(len(kinds)):
      if kv_fill == 'project':
        p = kv_params[g] if m.share_weights else index_steps(kv_params[g], j)
        k, v = project_kv(rms_norm(h_BLD, p['scale']), p['wk'], p['wv'], positions_BL,
                          m.rope_base, dtype_of(m.dtype), spec.quant)
      else:
        k, v = k_exit, v_exit
      entry = {}
      for name, val in (('k', k), ('v', v)):
        full = kv[g][name]                                    # [N,B,T,H,J]
        if per_row:
          old_BHJ = full[j, rows_B, index]
          val_BHJ = jnp.where(skipped_B[:, None, None], val[:, 0].astype(full.dtype), old_BHJ)
          entry[name] = full.at[j, rows_B, index].set(val_BHJ)
          continue
        _, b, _, h, hk = full.shape
        at = (j, 0, index, 0, 0)  # 5-D in-place update: no per-layer copy of the cache
        old = jax.lax.dynamic_slice(full, at, (1, b, 1, h, hk))[0]
        val = jnp.where(skipped_B[:, None, None, None], val.astype(full.dtype), old)
        entry[name] = jax.lax.dynamic_update_slice(full, val[None], at)
      new.append(entry)
    return new

  return jax.lax.fori_loop(start, n, body, cache)


def decode_step(config: Any, variables: dict, cache: list, token_B1: jax.Array,
                index: jax.Array, threshold: Any, kv_fill: str = 'project',
                compact: bool = False, lazy: Optional[dict] = None,
                retrieval: Optional[dict] = None) -> tuple[jax.Array, dict]:
  """One early-exit decoding step for a batch of single tokens at position `index` (one
  position, or one per row [B]: continuous batching, see act_jax/serve/engine.py).

  compact=True: rows that exited stop costing compute (buckets B, B/2, ...), instead of the
  batch waiting for its slowest row. kv_fill='lazy' needs `lazy` (init_lazy) and returns
  the updated one in aux['lazy']."""
  spec = config_lib.as_spec(config)
  if (kv_fill == 'lazy') != (lazy is not None):
    raise ConfigError("kv_fill='lazy' and the lazy state (inference.init_lazy) go together")
  carry, bcast = prepare_inputs(spec, top_variables(variables), token_B1,
                                threshold_arg(spec, threshold, per_row=not compact),
                                cache_index=index, decoding=True, retrieval=retrieval)
  if compact:
    carry, ys, cache = _run_compacted(spec, variables, carry, bcast, cache, lazy=lazy)
  else:
    carry, ys, cache = _depth_while(spec, variables, carry, bcast, cache, lazy=lazy)
  logits, aux = finish_outputs(spec, carry, ys, bcast['head'], token_B1)
  if lazy is not None:
    cache, lazy = cache
    b = token_B1.shape[0]
    index_B = jnp.broadcast_to(jnp.asarray(index, jnp.int32), (b,))
    # every row's exit state (a full-depth row's is never read: it filled every step)
    h_B1D = carry['h'][:, -1:].astype(lazy['h_exit'].dtype)
    if jnp.ndim(index) == 0:  # in place, like the cache
      h_exit = jax.lax.dynamic_update_slice(lazy['h_exit'], h_B1D, (0, index, 0))
    else:
      h_exit = lazy['h_exit'].at[jnp.arange(b), index_B].set(h_B1D[:, 0])
    aux['lazy'] = dict(lazy, h_exit=h_exit)
    aux['cache'] = cache
    return logits, aux
  aux['cache'] = _fill_skipped_kv(spec, variables, cache, carry['h'], aux['exit_step'],
                                  carry.get('executed_B', carry['i']), index,
                                  bcast['positions'], kv_fill)
  return logits, aux


@functools.partial(jax.jit, static_argnums=(0, 3, 5, 6))
def _generate(spec: Spec, variables, prompt_BL, max_new: int, threshold_N, kv_fill: str,
              compact: bool, retrieval=None):
  b, p = prompt_BL.shape
  cache = init_cache(spec, b, p + max_new)
  model = make_model(spec)
  logits, aux = model.apply(variables, prompt_BL, threshold=threshold_N, cache=cache,
                            cache_index=0, retrieval=retrieval)
  first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
  # the prompt ran as a masked scan: every layer of every prompt position is filled
  lazy0 = init_lazy(spec, b, p + max_new, p) if kv_fill == 'lazy' else None

  def body(c, t):
    cache, lazy, tok = c
    lg, a = decode_step(spec, variables, cache, tok[:, None], p + t, threshold_N, kv_fill,
                        compact, lazy, retrieval)
    nxt = jnp.argmax(lg[:, -1], -1).astype(jnp.int32)
    got = a.get('retrievals', jnp.zeros_like(a['layers']))[:, -1]
    return (a['cache'], a.get('lazy'), nxt), (tok, a['layers'][:, -1], got)

  (_, _, last), (toks, layers, got) = jax.lax.scan(body, (aux['cache'], lazy0, first),
                                                   jnp.arange(max_new - 1, dtype=jnp.int32))
  tokens = jnp.concatenate([toks.T, last[:, None]], 1)
  # layers of generated token t are those of the step that consumed it (t < max_new - 1)
  return {'tokens': tokens, 'layers': layers.T, 'prompt_layers': aux['layers'],
          'retrievals': got.T}


def check_lengths(spec: Spec, prompt_len: int, max_new: int) -> None:
  """ConfigError unless a prompt of prompt_len plus max_new >= 1 new tokens fits the model."""
  limit = spec.model.max_len
  if prompt_len + max_new > limit:
    raise ConfigError(
        f'prompt length {prompt_len} + max_new {max_new} exceeds the model max length '
        f'{limit} (model.max_len, else data.seq_len); shorten the prompt or generate fewer')
  if max_new < 1:
    raise ConfigError(f'max_new={max_new}: must be >= 1')


def generate(config: Any, variables: dict, prompt_BL, max_new: int, threshold: Any,
             kv_fill: str = 'project', compact: bool = False,
             retrieval: Optional[dict] = None) -> dict:
  """Greedy early-exit decoding at an operating point (OperatingPoint, [N] or scalar);
  returns tokens [B, max_new] and the layers each consumed token ran ([B, max_new-1]: the
  last generated token is never fed back), and how often each retrieved (retrieval: the
  datastore's arrays when spec.retrieval is set)."""
  spec = config_lib.as_spec(config)
  if kv_fill not in KV_FILL:
    raise ConfigError(f'kv_fill={kv_fill!r}: allowed: {", ".join(KV_FILL)}')
  check_lengths(spec, prompt_BL.shape[1], max_new)
  return _generate(spec, variables, jnp.asarray(prompt_BL, jnp.int32), max_new,
                   threshold_arg(spec, threshold), kv_fill, bool(compact), retrieval)
