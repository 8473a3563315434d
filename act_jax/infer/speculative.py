"""Exact early exit: self-speculative decoding. A shallow exit drafts, the full stack verifies.

LayerSkip (Elhoushi et al. 2024), Draft & Verify (Zhang et al. 2023): the first k layers and
the shared exit head (model.head_logits: the head every exit and the last layer use) draft d
tokens one at a time; then layers k+1..N run ONCE over the window x_0, d_1, ..., d_d
(A = d + 1 positions; x_0 is the last emitted token) and give the full model's prediction p_w
after each window position w. Per row:

  greedy    a = number of leading w < d with d_{w+1} = argmax p_w;
            emit d_1..d_a, then argmax p_a (the correction, or a bonus token when a = d).
  sampling  (Leviathan et al. 2023; Chen et al. 2023) q_w = the draft's distribution at w,
            accept d_{w+1} while u_w < p_w(d_{w+1}) / q_w(d_{w+1}), u_w ~ U(0, 1); a = first
            rejection; emit d_1..d_a, then a sample of norm(max(0, p_a - q_a)) when a < d, of
            p_d when a = d. Emitted tokens are distributed exactly as the full model's samples.

A round emits a + 1 in [1, d + 1] tokens; greedy output equals full-depth greedy decoding by
construction, in exact arithmetic. In floats the verify pass runs the deep layers over A
positions at once, so its sums round differently from one-position decoding (in
float32): an argmax near-tie can flip and the continuations split. Tests pin identical bytes
on random and briefly trained weights; benchmark_inference reports the identical rows it
measured. Cost of a round, in one-token layer passes: (d + 1) * k for the draft (its last
pass only gives d_d its first k layers) plus (N - k) * v(A), v(A) = the cost of one layer
over A positions relative to one: about 1 on an accelerator, where a decode layer is bound by
reading its weights; above 1 on XLA:CPU, which runs one row as a matrix-vector product and
several as a small matrix product (measured: docs/results.md, exact early exit).
With i.i.d. acceptance alpha the expected tokens per round are (1 - alpha^(d+1)) / (1 - alpha).
Per-round overheads (the draft loop, the accept step) are not in this count, and the real
acceptance is that of the model's own continuations, so the draft is chosen by measuring
both (draft.tune_draft), not from this formula.

Shared cache (LayerSkip): the draft writes layers 1..k of each window position into the one KV
cache and keeps its layer-k states; the verify pass starts from those states and writes layers
k+1..N, so an accepted token never recomputes its first k layers. After a round the rejected
window positions are zeroed at every layer: the cache equals plain full-depth decoding's of
the accepted tokens (tests pin it).

Batched: each row keeps its own position (cache_index [B], as in continuous batching) and
advances by its own accepted length; a row with its max_new tokens stops advancing.
MoE: each token of the verify window routes alone (routing groups of one token), exactly as
single-token decoding routes it, so capacity never drops a window token that decoding keeps.
Thresholds and depth caps do not apply: the output is full depth by construction (a cap is
refused, `check_exact`). The layers run as plain pre-norm blocks: no halting signals.

Dims (legend: act_jax/__init__.py): B batch, L prompt length, T cache length, D d_model,
V vocab, A positions of a draft/verify window (draft length + 1), N depth steps.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from act_jax import config as config_lib
from act_jax.model import halting as halting_lib
from act_jax.data import PAD as PAD_ID
from act_jax.errors import ConfigError
from act_jax.infer.inference import (check_lengths, index_steps, step_variables, top_variables,
                               write_position)
from act_jax.model.transformer import (Layer, dtype_of, head_logits, head_params, init_cache, make_model)
from act_jax.spec import OperatingPoint, Spec

MAX_DRAFT_LEN = 16   # longer windows only add rejected work at any acceptance seen so far
AUTO_DRAFT_LENS = (1, 2, 3, 4, 6)  # tried by draft.tune_draft (a compile each)


# ----------------------------------------------------------------------------- checks
def drafting_policies() -> tuple[str, ...]:
  return tuple(sorted(k for k, v in halting_lib.POLICIES.items() if v.can_draft))


def draft_layers(spec: Spec) -> list[int]:
  """The exit layers a draft can stop at (below the full depth)."""
  return [l for l in spec.exit_layers if l < spec.model.num_layers]


def check_exact(spec: Spec, draft_layer: Optional[int] = None, draft_len: Optional[int] = None,
                max_layers: Optional[int] = None, temperature: float = 0.0) -> None:
  """ConfigError naming the flag for what exact mode cannot run (before any compile)."""
  if not spec.policy.can_draft:
    raise ConfigError(f'--mode=exact drafts with the shared exit head at an exit layer: '
                      f'halting.name={spec.halting.name!r} has no exit heads; train with one '
                      f'of {", ".join(drafting_policies())}')
  layers = draft_layers(spec)
  if not layers:
    raise ConfigError(f'--mode=exact: the model has no exit layer below its depth '
                      f'{spec.model.num_layers} (halting.exit_every={spec.halting.exit_every})')
  if draft_layer is not None and (isinstance(draft_layer, bool) or draft_layer not in layers):
    raise ConfigError(f'--draft_layer={draft_layer}: must be an exit layer below the depth '
                      f'{spec.model.num_layers}, one of {layers}')
  if draft_len is not None and (isinstance(draft_len, bool) or not isinstance(
      draft_len, (int, np.integer)) or not 1 <= draft_len <= MAX_DRAFT_LEN):
    raise ConfigError(f'--draft_len={draft_len}: must be an integer in [1, {MAX_DRAFT_LEN}]')
  if max_layers is not None:
    raise ConfigError(f'--max_layers={max_layers}: exact mode decodes at full depth by '
                      f'construction; a depth cap applies to --mode=threshold')
  if not float(temperature) >= 0:
    raise ConfigError(f'--temperature={temperature}: must be >= 0 (0 = greedy)')


def window_spec(spec: Spec) -> Spec:
  """The spec the window passes run with: MoE tokens route one per group (see module doc)."""
  if spec.moe.group_size == 1:  # also harmless for a dense model: no router reads it
    return spec
  return dataclasses.replace(spec, moe=dataclasses.replace(spec.moe, group_size=1))


# ----------------------------------------------------------------------------- layers
def apply_steps(spec: Spec, variables: dict, h_BAD: jax.Array, tokens_BA: jax.Array,
                cache: list, index_B: jax.Array, start, stop) -> tuple[jax.Array, list]:
  """Depth steps [start, stop) as plain layers over a window of A positions per row starting
  at index_B (positions index_B .. index_B + A - 1); writes their K/V into the stacked cache
  at those positions. start/stop may be traced."""
  spec = window_spec(spec)
  width = h_BAD.shape[1]
  positions_BA = index_B[:, None] + jnp.arange(width, dtype=jnp.int32)
  # one row: its position as a scalar, so the cache writes are in-place slice updates
  # instead of scatters (full-depth decoding 20-30 % faster at batch 1 on XLA:CPU)
  index = index_B[0] if index_B.shape[0] == 1 else index_B
  running_BA = jnp.ones(tokens_BA.shape, bool)
  layers = [Layer(spec, kind) for kind in spec.model.layer_kinds]

  def body(i, st):
    h, cache = st
    v = step_variables(spec, variables, i)
    new_cache = []
    for j, layer in enumerate(layers):
      name = f'layer_{j}'
      lv = {'params': v['params'][name]}
      if name in v['moe_state']:
        lv['moe_state'] = v['moe_state'][name]
      h, kv, _ = layer.apply(lv, h, positions_BA, running_BA, tokens_BA, None,
                             index_steps(cache[j], i), index)
      new_cache.append(jax.tree.map(
          lambda full, new: write_position(full, new, i, index, width, None), cache[j], kv))
    return h, new_cache

  return jax.lax.fori_loop(start, stop, body, (h_BAD, cache))


def _embed(spec: Spec, variables: dict, tokens_BA: jax.Array) -> jax.Array:
  emb = variables['params']['embedding']
  return jnp.take(emb, tokens_BA, axis=0).astype(dtype_of(spec.model.dtype))


def _pick(logits_BV: jax.Array, temperature: float, key) -> tuple[jax.Array, jax.Array]:
  """(token [B], log-probabilities [B, V] at this temperature; None when greedy)."""
  if temperature == 0:
    return jnp.argmax(logits_BV, -1).astype(jnp.int32), None
  logp_BV = jax.nn.log_softmax(logits_BV / temperature, -1)
  return jax.random.categorical(key, logp_BV, -1).astype(jnp.int32), logp_BV


# ----------------------------------------------------------------------------- one round
def speculative_round(spec: Spec, variables: dict, cache: list, tok_B: jax.Array,
                      index_B: jax.Array, done_B: jax.Array, draft_steps, draft_len: int,
                      temperature: float = 0.0, key=None) -> dict:
  """Draft draft_len tokens with the first draft_steps depth steps, verify them with the rest.

  tok_B: the last emitted token of each row (not yet in the cache), to be written at index_B.
  Returns {'cache', 'emitted' [B, A] (the first accepted + 1 are this round's tokens),
  'accepted' [B] (drafts accepted, 0..d), 'next' [B] (the new last token), 'index' [B]}.
  Rows with done_B emit nothing and keep their position (their window is zeroed)."""
  n = spec.model.num_steps
  b, d = tok_B.shape[0], draft_len
  width = d + 1
  head = head_params(spec, top_variables(variables))
  key = jax.random.PRNGKey(0) if key is None else key
  draft_key, accept_key, resid_key = jax.random.split(key, 3)
  sampling = temperature > 0
  m = spec.model

  def draft(t, st):
    cache, x_B, h_BAD, drafts_BA, logq_BAV = st
    h_B1D, cache = apply_steps(spec, variables, _embed(spec, variables, x_B[:, None]),
                               x_B[:, None], cache, index_B + t, 0, draft_steps)
    nxt_B, logq_BV = _pick(head_logits(head, h_B1D)[:, 0], temperature,
                           jax.random.fold_in(draft_key, t))
    h_BAD = jax.lax.dynamic_update_slice_in_dim(h_BAD, h_B1D, t, axis=1)
    drafts_BA = jax.lax.dynamic_update_slice_in_dim(drafts_BA, nxt_B[:, None], t, axis=1)
    if sampling:
      logq_BAV = jax.lax.dynamic_update_slice_in_dim(logq_BAV, logq_BV[:, None], t, axis=1)
    return cache, nxt_B, h_BAD, drafts_BA, logq_BAV

  h0 = jnp.zeros((b, width, m.d_model), dtype_of(m.dtype))
  q0 = jnp.zeros((b, width, m.vocab_size) if sampling else (b, 0, 0), jnp.float32)
  cache, _, h_BAD, drafts_BA, logq_BAV = jax.lax.fori_loop(
      0, width, draft, (cache, tok_B, h0, jnp.zeros((b, width), jnp.int32), q0))
  inputs_BA = jnp.concatenate([tok_B[:, None], drafts_BA[:, :d]], 1)
  h_BAD, cache = apply_steps(spec, variables, h_BAD, inputs_BA, cache, index_B, draft_steps, n)
  logits_BAV = head_logits(head, h_BAD)
  w_A = jnp.arange(width)
  if not sampling:
    target_BA = jnp.argmax(logits_BAV, -1).astype(jnp.int32)
    ok_Bd = drafts_BA[:, :d] == target_BA[:, :d]
    accepted_B = jnp.sum(jnp.cumprod(ok_Bd, axis=1), axis=1).astype(jnp.int32)
    emitted_BA = target_BA  # the accepted drafts equal the targets; then the correction
  else:
    logp_BAV = jax.nn.log_softmax(logits_BAV / temperature, -1)
    drafted_Bd1 = drafts_BA[:, :d, None]
    lp_Bd = jnp.take_along_axis(logp_BAV[:, :d], drafted_Bd1, -1)[..., 0]
    lq_Bd = jnp.take_along_axis(logq_BAV[:, :d], drafted_Bd1, -1)[..., 0]
    u_Bd = jax.random.uniform(accept_key, (b, d), minval=1e-12)
    ok_Bd = jnp.log(u_Bd) < lp_Bd - lq_Bd
    accepted_B = jnp.sum(jnp.cumprod(ok_Bd, axis=1), axis=1).astype(jnp.int32)
    at_B11 = accepted_B[:, None, None]
    p_BV = jnp.exp(jnp.take_along_axis(logp_BAV, at_B11, 1)[:, 0])
    q_BV = jnp.exp(jnp.take_along_axis(logq_BAV, at_B11, 1)[:, 0])
    q_BV = jnp.where((accepted_B < d)[:, None], q_BV, 0.0)  # all accepted: sample p_d itself
    resid_BV = jnp.maximum(p_BV - q_BV, 0.0)
    resid_BV = jnp.where(jnp.sum(resid_BV, -1, keepdims=True) > 0, resid_BV, p_BV)
    nxt_B = jax.random.categorical(resid_key, jnp.log(resid_BV), -1).astype(jnp.int32)
    emitted_BA = jnp.where(w_A < accepted_B[:, None], drafts_BA, nxt_B[:, None])
  nxt_B = jnp.take_along_axis(emitted_BA, accepted_B[:, None], 1)[:, 0]
  keep_BA = (w_A <= accepted_B[:, None]) & ~done_B[:, None]
  cache = _zero_rejected(cache, index_B, keep_BA)
  return {'cache': cache, 'emitted': emitted_BA, 'accepted': accepted_B,
          'next': jnp.where(done_B, tok_B, nxt_B),
          'index': jnp.where(done_B, index_B, index_B + accepted_B + 1)}


def _zero_rejected(cache: list, index_B: jax.Array, keep_BA: jax.Array) -> list:
  """Zeroes every layer's K/V at the window positions index_B + w where not keep_BA."""
  rows_B1 = jnp.arange(keep_BA.shape[0])[:, None]
  pos_BA = index_B[:, None] + jnp.arange(keep_BA.shape[1])
  keep = keep_BA[None, :, :, None, None]

  def clean(full_NBTHJ):
    if keep_BA.shape[0] == 1:  # one row: an in-place slice update, as in apply_steps
      at = (0, 0, index_B[0], 0, 0)
      window = jax.lax.dynamic_slice(full_NBTHJ, at, full_NBTHJ.shape[:2] + keep_BA.shape[1:]
                                     + full_NBTHJ.shape[3:])
      return jax.lax.dynamic_update_slice(full_NBTHJ, jnp.where(keep, window, 0), at)
    window = full_NBTHJ[:, rows_B1, pos_BA]               # [N, B, A, H, J]
    return full_NBTHJ.at[:, rows_B1, pos_BA].set(jnp.where(keep, window, 0))

  return jax.tree.map(clean, cache)


# ----------------------------------------------------------------------------- generation
def _prefill(spec: Spec, variables: dict, prompt_BL: jax.Array, cache_len: int):
  """The prompt at full depth as the masked scan (as inference.generate): logits, cache."""
  cache = init_cache(spec, prompt_BL.shape[0], cache_len)
  logits, aux = make_model(spec).apply(variables, prompt_BL,
                                       threshold=OperatingPoint.full_depth().vector(spec),
                                       cache=cache, cache_index=0)
  return logits[:, -1], aux['cache']


def cache_length(prompt_len: int, max_new: int, draft_len: int) -> int:
  """Cache positions exact decoding needs: finished rows still draft a window past the end."""
  return prompt_len + max_new + 2 * (draft_len + 1)


@functools.partial(jax.jit, static_argnames=('spec', 'max_new', 'draft_len', 'temperature'))
def _generate_exact(spec: Spec, variables: dict, prompt_BL, max_new: int, draft_steps,
                    draft_len: int, temperature: float, key):
  b, p = prompt_BL.shape
  width = draft_len + 1
  last_BV, cache = _prefill(spec, variables, prompt_BL, cache_length(p, max_new, draft_len))
  key, first_key = jax.random.split(key)
  first_B, _ = _pick(last_BV, temperature, first_key)
  rows_B1 = jnp.arange(b)[:, None]
  out0 = jnp.full((b, max_new + 2 * width), PAD_ID, jnp.int32).at[:, 0].set(first_B)
  log0 = jnp.full((max_new, b), -1, jnp.int32)

  def cond(st):
    return (st['round'] < max_new) & jnp.any(st['count'] < max_new)

  def body(st):
    done_B = st['count'] >= max_new
    r = speculative_round(spec, variables, st['cache'], st['tok'], st['index'], done_B,
                          draft_steps, draft_len, temperature,
                          jax.random.fold_in(key, st['round']))
    pos_BA = st['count'][:, None] + jnp.arange(width)
    keep_BA = (jnp.arange(width) <= r['accepted'][:, None]) & ~done_B[:, None]
    out = st['out'].at[rows_B1, pos_BA].set(
        jnp.where(keep_BA, r['emitted'], st['out'][rows_B1, pos_BA]))
    return {'cache': r['cache'], 'tok': r['next'], 'index': r['index'], 'out': out,
            'count': st['count'] + jnp.where(done_B, 0, r['accepted'] + 1),
            'accepted': st['accepted'].at[st['round']].set(
                jnp.where(done_B, -1, r['accepted'])),
            'round': st['round'] + 1}

  st = jax.lax.while_loop(cond, body, {
      'cache': cache, 'tok': first_B, 'index': jnp.full((b,), p, jnp.int32), 'out': out0,
      'count': jnp.ones((b,), jnp.int32), 'accepted': log0, 'round': jnp.zeros((), jnp.int32)})
  return {'tokens': st['out'][:, :max_new], 'accepted': st['accepted'], 'rounds': st['round'],
          'cache': st['cache'], 'index': st['index']}


@functools.partial(jax.jit, static_argnames=('spec', 'max_new', 'temperature'))
def _generate_plain(spec: Spec, variables: dict, prompt_BL, max_new: int, temperature: float,
                    key):
  b, p = prompt_BL.shape
  n = spec.model.num_steps
  head = head_params(spec, top_variables(variables))
  last_BV, cache = _prefill(spec, variables, prompt_BL, p + max_new)
  key, first_key = jax.random.split(key)
  first_B, _ = _pick(last_BV, temperature, first_key)

  def body(c, t):
    cache, tok_B = c
    h_B1D, cache = apply_steps(spec, variables, _embed(spec, variables, tok_B[:, None]),
                               tok_B[:, None], cache, jnp.full((b,), p + t, jnp.int32), 0, n)
    nxt_B, _ = _pick(head_logits(head, h_B1D)[:, 0], temperature, jax.random.fold_in(key, t))
    return (cache, nxt_B), nxt_B

  (cache, _), toks = jax.lax.scan(body, (cache, first_B), jnp.arange(max_new - 1))
  return {'tokens': jnp.concatenate([first_B[:, None], toks.T], 1), 'cache': cache}


def generate_exact(config: Any, variables: dict, prompt_BL, max_new: int, draft_layer: int,
                   draft_len: int, temperature: float = 0.0, seed: int = 0) -> dict:
  """Self-speculative decoding (module doc): tokens [B, max_new] equal to full-depth decoding
  (greedy), or distributed as its samples (temperature > 0).

  Also returns 'accepted' [max_new, B] (drafts accepted per round and row; -1 after the
  row finished or the last round), 'rounds', and the final 'cache' / 'index'."""
  spec = config_lib.as_spec(config)
  check_exact(spec, draft_layer, draft_len, temperature=temperature)
  prompt_BL = jnp.asarray(prompt_BL, jnp.int32)
  check_lengths(spec, prompt_BL.shape[1], max_new)
  return _generate_exact(spec, variables, prompt_BL, int(max_new),
                         jnp.int32(draft_layer // spec.model.group_size), int(draft_len),
                         float(temperature), jax.random.PRNGKey(seed))


def generate_plain(config: Any, variables: dict, prompt_BL, max_new: int,
                   temperature: float = 0.0, seed: int = 0) -> dict:
  """Full-depth decoding with the same plain layers exact mode runs (no halting signals, no
  exit heads): the baseline exact mode is timed against."""
  spec = config_lib.as_spec(config)
  prompt_BL = jnp.asarray(prompt_BL, jnp.int32)
  check_lengths(spec, prompt_BL.shape[1], max_new)
  return _generate_plain(spec, variables, prompt_BL, int(max_new), float(temperature),
                         jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- statistics
def acceptance_stats(accepted: np.ndarray, draft_len: int) -> dict:
  """From generate_exact's 'accepted' [rounds, B]: rounds, drafts accepted and tokens emitted
  per verify step (means over rows' rounds), and acceptance per draft position w
  (P(draft w + 1 accepted | drafts 1..w accepted))."""
  a = np.asarray(accepted)
  a = a[a >= 0]
  if a.size == 0:
    return {'rounds': 0, 'accepted_per_round': 0.0, 'tokens_per_round': 0.0,
            'per_position': [float('nan')] * draft_len}
  per_pos = []
  for w in range(draft_len):
    reached = np.sum(a >= w)
    per_pos.append(float(np.sum(a > w) / reached) if reached else float('nan'))
  return {'rounds': int(a.size), 'accepted_per_round': float(a.mean()),
          'tokens_per_round': float(a.mean() + 1), 'per_position': per_pos}


def draft_acceptance(config: Any, variables: dict, tokens_BL) -> dict[int, float]:
  """Teacher-forced greedy acceptance per draft layer: the fraction of real positions of
  tokens_BL where the exit head's argmax at that layer equals the full model's (one
  full-depth masked-scan forward)."""
  spec = config_lib.as_spec(config)
  tokens_BL = jnp.asarray(tokens_BL, jnp.int32)
  _, aux = jax.jit(lambda v, t: make_model(spec).apply(
      v, t, threshold=OperatingPoint.full_depth().vector(spec)))(variables, tokens_BL)
  top_NBL = np.asarray(jnp.argmax(aux['step_logits'], -1))
  valid = np.asarray(tokens_BL != PAD_ID)
  g = spec.model.group_size
  return {layer: float(np.mean((top_NBL[layer // g - 1] == top_NBL[-1])[valid]))
          for layer in draft_layers(spec)}
