"""AdaptiveTransformer: embed -> one masked scan over depth -> shared LM head.

The layer stack is a single `nn.scan` over *steps*; a step is a group of layers (e.g.
[dense, moe] for MoE every other layer) so that the scanned body is identical at every
step. Parameters are stacked on a leading 'layers' axis (`share_weights=True` broadcasts one
step's parameters instead: a Universal Transformer, Dehghani 2019). `inject_input=True` on
top makes it a looped transformer (Fan et al. 2024, "Looped Transformers for Length
Generalization"): step n reads h^{n-1} + e, e the input embedding, h^0 = 0.

Dynamic depth is a *masked* scan: the halting policy (act_jax/model/halting) keeps a `running`
mask in the carry; tokens that stopped keep their state (`where`), still cost compute in
this training form (inference.py skips it for real), take no MoE capacity and are not
counted as executed layers. Per step:
    h_new = group(h_prev, running);  h_new = where(running, h_new, h_prev)
    state, running' = policy.step(state, h_prev, h_new, signals(h_new), i, threshold)
The forward returns (logits, aux); aux carries telemetry and loss inputs (never side effects).
Exit heads: evaluation returns every step's exit logits aux['step_logits'] [N,B,L,V]. The
training forward never builds them (act_jax/model/layers/head.py): given the targets
(targets_BL, what training passes) each step computes its exit's cross-entropy and argmax by
length tiles, aux['step_ce'] / aux['step_argmax'] [N,B,L]; with self-distillation (which needs
the last exit at every exit) or without targets it returns the steps' states aux['step_h']
[N,B,L,D] and the head aux['head'], and the losses compute each exit by tiles.
model.loss_tiles > 1 does the same for the final head (logits None, aux['h_out']).
With a datastore attached (spec.retrieval, act_jax/model/retrieval/arm.py) each step may also
retrieve between the exit head and the exit decision; aux['retrievals'] counts the searches.
Every module takes the resolved Spec (act_jax.spec); `make_model` also accepts a config and
resolves it once. What a halting policy needs or does is read from its capability flags.

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, N depth steps,
H heads, J head dim.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from act_jax.model import halting as halting_lib
from act_jax.data import PAD as PAD_ID
from act_jax.errors import ConfigError
from act_jax.model.layers import Attention, GatedMLP, RMSNorm
from act_jax.model.layers.head import head_logits, tiled_rows, token_stats
from act_jax.model.moe import MoEFFN
from act_jax.model.retrieval import arm as retrieval_arm
from act_jax.model import step_cell
from act_jax.scale.sharding import constrain
from act_jax.spec import Spec, threshold_at, threshold_per_step

_REMAT = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def dtype_of(name: str) -> jnp.dtype:
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


class Layer(nn.Module):
  """Pre-norm transformer layer: attention then a dense or MoE FFN (optionally MoD-gated)."""
  config: Spec
  kind: str  # 'dense' | 'moe'
  train: bool = False

  @nn.compact
  def __call__(self, h_BLD, positions_BL, running_BL, token_ids_BL, key_mask_BT, cache,
               cache_index, kv_h_BLD=None):
    m, policy = self.config.model, self.config.policy
    dtype, pdtype = dtype_of(m.dtype), dtype_of(m.param_dtype)
    aux: dict[str, Any] = {}
    mod = policy.gates_blocks
    active_BL = running_BL
    if mod:
      # Mixture-of-Depths (Raposo 2024): only the top-capacity tokens run this layer.
      r_BL = nn.Dense(1, dtype=jnp.float32, param_dtype=pdtype, name='mod_router',
                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               ('embed', None)))(
                          h_BLD.astype(jnp.float32))[..., 0]
      pred_BL = nn.Dense(1, dtype=jnp.float32, param_dtype=pdtype, name='mod_predictor',
                         kernel_init=nn.with_logical_partitioning(
                             nn.initializers.lecun_normal(), ('embed', None)))(
                                 jax.lax.stop_gradient(h_BLD.astype(jnp.float32)))[..., 0]
      if cache is None:
        selected_BL, gate_BL = halting_lib.mod_route(r_BL, policy.capacity, running_BL)
      else:
        # Decoding: top-k over the sequence would read the future; the causal predictor
        # (trained to imitate the top-k choice) decides per token instead.
        selected_BL = halting_lib.mod_decode_select(pred_BL, running_BL)
        gate_BL = jax.nn.sigmoid(r_BL)
      aux['mod'] = {'selected': selected_BL, 'predictor_logit': pred_BL}
      active_BL = selected_BL
      # Training: unselected tokens are invisible as keys (they skipped the block). Decoding
      # keeps every cached position visible: the cache holds no per-layer selection history.
      km = selected_BL if cache is None else None
      key_mask_BT = km if key_mask_BT is None or km is None else key_mask_BT & km
    attn_norm = RMSNorm(param_dtype=pdtype, name='attn_norm')
    x = attn_norm(h_BLD)
    x_kv = None if kv_h_BLD is None else attn_norm(kv_h_BLD)
    attn_BLD, cache = Attention(m.num_heads, m.head_dim, m.d_model, causal=m.causal,
                                rope_base=m.rope_base, dtype=dtype, param_dtype=pdtype,
                                quant=self.config.quant, name='attn')(
                                    x, positions_BL, cache, cache_index, key_mask_BT, x_kv)
    h1_BLD = h_BLD + attn_BLD.astype(h_BLD.dtype)
    x = RMSNorm(param_dtype=pdtype, name='ffn_norm')(h1_BLD)
    if self.kind == 'moe':
      moe = self.config.moe
      ffn_BLD, aux['moe'] = MoEFFN(moe, d_model=m.d_model, d_ff=moe.d_ff, causal=m.causal,
                                   dtype=dtype, param_dtype=pdtype, quant=self.config.quant,
                                   name='moe')(x, active_BL, token_ids_BL, self.train,
                                                count_valid=cache is not None)
    else:
      ffn_BLD = GatedMLP(m.d_ff, dtype=dtype, param_dtype=pdtype, quant=self.config.quant,
                         name='mlp')(x)
    out_BLD = h1_BLD + ffn_BLD.astype(h_BLD.dtype)
    if mod:
      delta_BLD = (out_BLD - h_BLD) * gate_BL[..., None].astype(h_BLD.dtype)
      out_BLD = jnp.where(selected_BL[..., None], h_BLD + delta_BLD, h_BLD)
    out_BLD = constrain(out_BLD, ('batch', 'length', 'embed'))
    return out_BLD, cache, aux


class DepthStep(nn.Module):
  """One scan step: a group of layers, then the halting policy's step (and, with a
  datastore, the retrieval arm between the exit head and the exit decision)."""
  config: Spec
  train: bool = False
  keep_states: bool = False  # ys['h']: the state after the step (datastore keys)

  @nn.compact
  def __call__(self, carry, xs, bcast):
    kinds, policy = self.config.model.layer_kinds, self.config.policy
    h_prev, running_BL = carry['h'], carry['running']
    # Exit-aware training (see AdaptiveTransformer): tokens whose criterion was met at an
    # earlier step show later tokens the K/V of their exit state, as decoding will.
    exited_BL = carry['state']['met'] if 'h_exit' in carry else None
    h = h_prev
    if 'inject' in bcast:
      # Looped transformer (Fan et al. 2024, "Looped Transformers for Length
      # Generalization", input injection): every iteration of the shared block reads its
      # state plus the input embedding e, h_in^n = h^{n-1} + e with h^0 = 0. The carry starts
      # at h^0 := e, so step 1 reads e and steps n >= 2 add it. Only running tokens: a halted
      # token's keys/values stay those of its frozen state, as inference.py's fill computes.
      add_BL1 = (running_BL & (carry['i'] > 0))[..., None]
      h = h_prev + jnp.where(add_BL1, bcast['inject'], 0).astype(h_prev.dtype)
    caches, layer_aux = [], []
    for j, kind in enumerate(kinds):
      cache_j = None if xs is None else xs[j]
      kv_h = None if exited_BL is None else jnp.where(exited_BL[..., None], carry['h_exit'], h)
      h, cache_j, aux_j = Layer(self.config, kind, self.train, name=f'layer_{j}')(
          h, bcast['positions'], running_BL, bcast['tokens'], bcast['key_mask'], cache_j,
          bcast['cache_index'], kv_h)
      # Halted tokens stay frozen at every layer, so each layer's K/V of a halted token is
      # the projection of its exit state (CALM's KV propagation, same as inference.py).
      h = jnp.where(running_BL[..., None], h, h_prev)
      caches.append(cache_j)
      layer_aux.append(aux_j)
    h_new = h
    m = self.config.model
    if self.train and m.layer_dropout > 0:
      # LayerSkip (Elhoushi 2024): each row skips this step w.p. p_max * (2^(i/(N-1)) - 1),
      # 0 at the first step rising to p_max at the last, so the shallow exits learn to
      # predict without the deep layers and the deep layers tolerate missing inputs.
      n = m.num_steps
      rate = m.layer_dropout * (2.0 ** (carry['i'].astype(jnp.float32) / max(n - 1, 1)) - 1.0)
      drop_B = jax.random.uniform(self.make_rng('halting'), (h_prev.shape[0],)) < rate
      h_new = jnp.where(drop_B[:, None, None], h_prev, h_new)
    signals = {}
    pdtype = dtype_of(self.config.model.param_dtype)
    if policy.needs_halt_unit:
      signals['halt_logit'] = nn.Dense(
          1, dtype=jnp.float32, param_dtype=pdtype, name='halt_unit',
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   ('embed', None)),
          bias_init=nn.with_logical_partitioning(
              nn.initializers.constant(self.config.halting.bias_init), (None,)))(
                  h_new.astype(jnp.float32))[..., 0]
    knn_BLV = carry.get('knn')
    # Training (no retrieval arm): no exit's whole [B,L,V]. The decision step() reads is
    # computed by length tiles (a stop_gradient decision: nothing kept for the backward);
    # the losses recompute the logits from the states (ys['exit_h'], layers/head.py).
    tiled = self.train and knn_BLV is None
    if policy.needs_exit_logits and not tiled:
      signals['exit_logits'] = head_logits(bcast['head'], h_new)
    elif policy.needs_exit_logits and policy.step_reads_exit_logits:
      signals['exit_score'] = jax.lax.stop_gradient(tiled_rows(
          lambda h: policy.exit_score(head_logits(bcast['head'], h)), h_new, m.loss_tiles))
    if policy.needs_exit_classifier:
      x = jax.lax.stop_gradient(h_new.astype(jnp.float32))  # never trains the backbone
      x = nn.gelu(nn.Dense(32, param_dtype=pdtype, name='exit_clf_hidden',
                           kernel_init=nn.with_logical_partitioning(
                               nn.initializers.lecun_normal(), ('embed', None)))(x))
      signals['exit_classifier_logit'] = nn.Dense(
          1, param_dtype=pdtype, name='exit_clf_out',
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   (None, None)))(x)[..., 0]
    if policy.needs_uniform and not self.train:
      signals['uniform'] = jax.random.uniform(self.make_rng('halting'), running_BL.shape)
    if knn_BLV is not None:
      # Retrieval arm (act_jax/model/retrieval/arm.py): retrieve here or not, then the exit
      # decision below sees the interpolated distribution (and so does the output).
      signals['exit_logits'], knn_BLV, retrieved_BL = retrieval_arm.step(
          self.config, bcast['retrieval'], bcast['head']['norm_scale'], h_new,
          signals['exit_logits'], knn_BLV, carry['i'], running_BL)
    state, running_next, step_out = policy.step(
        carry['state'], h_prev, h_new, signals, carry['i'],
        threshold_at(bcast['threshold'], carry['i']), running_BL, self.train)
    new_carry = {'h': h_new, 'running': running_next & running_BL, 'state': state,
                 'i': carry['i'] + 1}
    if exited_BL is not None:  # freeze each token's state at its first met criterion
      new_carry['h_exit'] = jnp.where((state['met'] & ~exited_BL)[..., None], h_new,
                                      carry['h_exit'])
    ys = {'step': step_out, 'running': running_BL,
          'layers': _layers_executed(layer_aux, running_BL),
          'layer_aux': layer_aux}
    if knn_BLV is not None:
      new_carry['knn'] = knn_BLV
      ys['retrieved'] = retrieved_BL
    if self.keep_states:
      ys['h'] = h_new
    if policy.needs_exit_logits:
      if tiled and 'targets' in bcast:
        # Each exit's loss statistics here, from this step's state, by length tiles: no
        # stacked states (or their gradient) leave the scan, and the backward recomputes
        # the head inside each step (layers/head.py)
        # (the argmax only where the exit classifier's labels need it: learned exit)
        s = token_stats(bcast['head'], h_new[None], bcast['targets'], m.loss_tiles,
                        argmax=policy.needs_exit_classifier)
        ys['exit_ce'] = s['ce'][0]
        if 'argmax' in s:
          ys['exit_argmax'] = s['argmax'][0]
      elif tiled:  # the losses recompute each exit's logits from its state
        ys['exit_h'] = h_new
      else:
        ys['exit_logits'] = signals['exit_logits']
    if xs is not None:
      ys['cache'] = caches
    return new_carry, ys


def _layers_executed(layer_aux: list[dict], running_BL: jax.Array) -> jax.Array:
  """Layers this step really ran per token (MoD counts only selected layers)."""
  total = jnp.zeros(running_BL.shape, jnp.float32)
  for a in layer_aux:
    ran = a['mod']['selected'] if 'mod' in a else running_BL
    total = total + (ran & running_BL).astype(jnp.float32)
  return total


class AdaptiveTransformer(nn.Module):
  """Causal LM or bidirectional encoder with a halting policy over a scanned depth.

  threshold: the operating point in any form spec.threshold_per_step accepts (scalar,
  OperatingPoint.vector [N], per-row [B, 1]); default: the policy's default threshold.
  retrieval: the datastore's arrays (retrieval.datastore.Datastore.arrays) when
  config.retrieval is set. keep_states: aux['step_states'] [N, B, L, D]."""
  config: Spec
  train: bool = False
  keep_states: bool = False

  @nn.compact
  def __call__(self, tokens_BL: jax.Array, threshold: Optional[jax.Array] = None,
               positions_BL: Optional[jax.Array] = None, cache: Any = None,
               cache_index: Optional[jax.Array] = None,
               retrieval: Optional[dict] = None, targets_BL: Optional[jax.Array] = None
               ) -> tuple[jax.Array, dict]:
    cfg, m = self.config, self.config.model
    n_steps = m.num_steps
    pdtype = dtype_of(m.param_dtype)
    top = {'embedding': self.param('embedding', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ('vocab', 'embed')), (m.vocab_size, m.d_model), pdtype),
           'final_norm_scale': self.param('final_norm_scale', nn.with_logical_partitioning(
               nn.initializers.ones, ('embed',)), (m.d_model,), pdtype)}
    if not m.tie_embeddings:
      top['unembed'] = self.param('unembed', nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ('embed', 'vocab')), (m.d_model, m.vocab_size), pdtype)
    exit_aware = self.train and cfg.halting.exit_aware > 0 and cache is None
    if exit_aware:
      # Exit-aware training: every token still runs every step (each exit's loss needs it),
      # but a token whose criterion is met -- at a threshold drawn per row from
      # U(exit_aware, 1) unless given -- exposes its exit state's K/V to later tokens at the
      # deeper layers, exactly what early-exit inference will show them. Without this the
      # deeper layers never see such K/V in training, and real exits cost far more accuracy
      # than the per-exit heads promise.
      if threshold is None:
        threshold = jax.random.uniform(self.make_rng('halting'), (tokens_BL.shape[0], 1),
                                       minval=cfg.halting.exit_aware, maxval=1.0)
    carry, bcast = prepare_inputs(cfg, top, tokens_BL, threshold, positions_BL, cache_index,
                                  decoding=cache is not None, retrieval=retrieval)
    if (targets_BL is not None and self.train and cfg.policy.needs_exit_logits
        and not (cfg.policy.supports_distill and cfg.halting.distill > 0)):
      # Training with the targets at hand: each exit's loss statistics inside the depth
      # scan. Self-distillation needs the last exit's distribution at every exit, which the
      # scan has not reached yet: it keeps the exits' states for the loss instead.
      bcast['targets'] = targets_BL
    if exit_aware:
      carry['h_exit'] = carry['h']  # read only where a criterion was met
    step_cls = DepthStep
    if m.remat != 'none':
      step_cls = nn.remat(DepthStep, policy=_REMAT[m.remat], prevent_cse=False)
    if m.share_weights:
      scan = nn.scan(step_cls, variable_broadcast=['params', 'moe_state'],
                     split_rngs={'params': False, 'jitter': True, 'halting': True},
                     in_axes=(0, nn.broadcast), length=n_steps, unroll=m.scan_unroll)
    else:
      scan = nn.scan(step_cls, variable_axes={'params': 0, 'moe_state': 0},
                     split_rngs={'params': True, 'jitter': True, 'halting': True},
                     in_axes=(0, nn.broadcast), length=n_steps, unroll=m.scan_unroll,
                     metadata_params={nn.PARTITION_NAME: 'layers'})
    carry, ys = scan(cfg, self.train, self.keep_states, name='stack')(carry, cache, bcast)
    # Training with model.loss_tiles > 1: no [B,L,V] final logits either; the loss reads the
    # output states aux['h_out'] and computes the head by length tiles (layers/head.py).
    tiled_head = self.train and m.loss_tiles > 1 and cache is None and retrieval is None
    return finish_outputs(cfg, carry, ys, bcast['head'], tokens_BL, logits_out=not tiled_head)


def finish_outputs(spec: Spec, carry: dict, ys: dict, head: dict, tokens_BL,
                   logits_out: bool = True) -> tuple[Optional[jax.Array], dict]:
  """Policy finalize, the LM head and aux assembly from the depth loop's outputs (ys stacked
  on a leading N axis). Shared by the masked scan and inference.py's while loops.
  logits_out=False (training by tiles): logits None, aux['h_out'] and aux['head'] instead."""
  policy = spec.policy
  h_out_BLD, aux = policy.finalize(carry['state'], carry['h'], ys['step'])
  if not logits_out:
    logits_BLV = None
  elif policy.output_is_exit_head and 'exit_logits' in ys:
    # An exited token's output IS its exit head's logits (same shared head, same frozen
    # state): gather them instead of running the head again (one head less per token).
    logits_BLV = jnp.take_along_axis(ys['exit_logits'], aux['exit_step'][None, ..., None],
                                     0)[0]
  else:
    logits_BLV = head_logits(head, h_out_BLD)
  aux = dict(aux)
  if logits_BLV is None:
    aux['h_out'], aux['head'] = h_out_BLD, head           # [B,L,D], the shared head
  aux['running'] = ys['running']                          # [N,B,L]
  aux['layers'] = jnp.sum(ys['layers'], axis=0)           # [B,L] layers executed
  aux['valid'] = tokens_BL != PAD_ID
  if 'exit_logits' in ys:
    aux['step_logits'] = ys['exit_logits']                # [N,B,L,V]
  if 'exit_h' in ys:  # training: the exits' logits are the losses' to compute, by tiles
    aux['step_h'], aux['head'] = ys['exit_h'], head       # [N,B,L,D], the shared head
  if 'exit_ce' in ys:  # training with targets: each exit's statistics, from the scan
    aux['step_ce'] = ys['exit_ce']                        # [N,B,L]
  if 'exit_argmax' in ys:
    aux['step_argmax'] = ys['exit_argmax']                # [N,B,L]
  stack_layers = lambda *xs: jnp.stack(xs, 1).reshape((-1,) + xs[0].shape[1:])
  moe_aux = [a['moe'] for a in ys['layer_aux'] if 'moe' in a]
  if moe_aux:  # [N, moe layers per step, ...] -> [moe layers, ...] in depth order
    aux['moe'] = jax.tree.map(stack_layers, *moe_aux)
  mod_aux = [a['mod'] for a in ys['layer_aux'] if 'mod' in a]
  if mod_aux:  # the MoD policy's loss reads these names
    mod = jax.tree.map(stack_layers, *mod_aux)
    aux['mod_selected'], aux['mod_pred_logit'] = mod['selected'], mod['predictor_logit']
  if 'cache' in ys:
    aux['cache'] = ys['cache']
  if 'retrieved' in ys:
    aux['retrieved'] = ys['retrieved']                    # [N,B,L] retrieved at step n
    aux['retrievals'] = jnp.sum(ys['retrieved'], axis=0)  # [B,L]
  if 'h' in ys:
    aux['step_states'] = ys['h']                          # [N,B,L,D]
  return logits_BLV, aux


def head_params(spec: Spec, top_params: dict) -> dict:
  """The shared output head's arrays from the model's top-level params."""
  m = spec.model
  if m.tie_embeddings:
    emb_VD = top_params['embedding']
    unembed_DV = emb_VD.T / jnp.sqrt(jnp.asarray(m.d_model, emb_VD.dtype))
  else:
    unembed_DV = top_params['unembed']
  return {'norm_scale': top_params['final_norm_scale'], 'unembed_DV': unembed_DV}


def prepare_inputs(spec: Spec, top_params: dict, tokens_BL, threshold=None, positions_BL=None,
                   cache_index=None, decoding: bool = False, retrieval: Optional[dict] = None
                   ) -> tuple[dict, dict]:
  """Embedding, initial carry and the scan's broadcast inputs (shared with inference.py).

  The threshold enters the loop in its one internal form, per step ([N] or [B, N]). With
  an active retrieval arm (spec.retrieval, mode != 'never') the datastore's arrays ride in
  the broadcast inputs and each token's latest kNN distribution in the carry."""
  m, policy = spec.model, spec.policy
  b, l = tokens_BL.shape
  if positions_BL is None:
    start = jnp.zeros((), jnp.int32) if cache_index is None else jnp.asarray(cache_index)
    if start.ndim == 1:  # one position per row (continuous batching)
      start = start[:, None]
    positions_BL = jnp.broadcast_to(start + jnp.arange(l, dtype=jnp.int32), (b, l))
  if threshold is None:
    threshold = policy.default_threshold()
  h_BLD = jnp.take(top_params['embedding'], tokens_BL, axis=0).astype(dtype_of(m.dtype))
  h_BLD = constrain(h_BLD, ('batch', 'length', 'embed'))
  valid_BL = tokens_BL != PAD_ID
  # Padding never runs (no capacity, no layer count); encoders also never attend to it.
  key_mask = None if (m.causal or decoding) else valid_BL
  bcast = {'positions': positions_BL, 'tokens': tokens_BL, 'key_mask': key_mask,
           'cache_index': cache_index, 'head': head_params(spec, top_params),
           'threshold': threshold_per_step(threshold, m.num_steps)}
  carry = {'h': h_BLD, 'running': valid_BL, 'state': policy.init(h_BLD),
           'i': jnp.zeros((), jnp.int32)}
  if m.inject_input:  # the looped transformer re-reads the embedding every step (DepthStep)
    bcast['inject'] = h_BLD
  if retrieval_arm.active(spec):
    retrieval_arm.check_model(spec)
    if retrieval is None:
      raise ConfigError(f'spec.retrieval.mode={spec.retrieval.mode!r} needs the datastore\'s '
                        f'arrays (retrieval=Datastore.arrays)')
    bcast['retrieval'] = retrieval
    carry['knn'] = jnp.zeros((b, l, m.vocab_size), jnp.float32)  # all zero: none retrieved
  return carry, bcast


def _require_spec(spec: Any, fn: str) -> Spec:
  # The model sits below config (config.resolve needs the policy and router registries
  # defined here), so it takes the resolved Spec the boundary made, never a raw config.
  if not isinstance(spec, Spec):
    raise ConfigError(f'{fn} takes a resolved Spec, got {type(spec).__name__}: '
                      f'pass act_jax.config.resolve(config)')
  return spec


def make_model(spec: Spec, train: bool = False, keep_states: bool = False
               ) -> AdaptiveTransformer | step_cell.StepCellModel:
  """The model of a resolved Spec: the transformer, or the step cell of the vector tasks
  (model.kind in step_cell.STEP_CELLS; same call and (logits, aux) outputs)."""
  if step_cell.is_step_cell(_require_spec(spec, 'make_model')):
    return step_cell.StepCellModel(spec, train=train)
  return AdaptiveTransformer(_require_spec(spec, 'make_model'), train=train,
                             keep_states=keep_states)


def init_cache(spec: Spec, batch: int, max_len: int) -> list:
  """Stacked KV cache for decoding: one {'k','v'} per layer of the group, leading N axis."""
  m = _require_spec(spec, 'init_cache').model
  z = jnp.zeros((m.num_steps, batch, max_len, m.num_heads, m.head_dim), dtype_of(m.dtype))
  return [{'k': z, 'v': z} for _ in m.layer_kinds]
