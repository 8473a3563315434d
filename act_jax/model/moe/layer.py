"""MoEFFN: a drop-in replacement for the dense gated FFN of a transformer block.

Dims (legend: act_jax/__init__.py): B batch, L length, G groups, S tokens per group,
E experts, C capacity, K top-k, D d_model, F expert d_ff, P soft slots.

  y = sum_{routed e} w_e(x) * MLP_e(x)  +  sum_{j < shared_experts} MLP_shared_j(x)
(no residual: the block adds it). Tokens are routed in groups of S (one sequence per group by
default, GShard, Lepikhin et al. 2021); capacity, priority and balancing are per group. Shared
always-on experts follow DeepSeekMoE (Dai et al. 2024); n shared experts of hidden F are
implemented as one gated MLP (act_jax.model.layers.mlp.GatedMLP) of hidden n*F, which is exactly
their sum.

Router (float32): logits = jitter(x) W_r (Switch, Fedus et al. 2021); for Soft MoE
logits = x Phi, or with moe.soft_normalize the published a * <x/|x|, phi/|phi|> with a
learned scalar a (Puigcerver et al. 2023; routers.soft_logits). DeepSeek-V3's selection bias lives in the non-param
collection 'moe_state' ('bias', f32 [E]) and is only created when moe.bias_rate > 0 for
routers that learn a bias (top_k, dropless); update it with routers.update_bias(bias,
aux['load'], rate). Which router runs, and which losses apply, is read from its
registered RouterInfo (routers.ROUTERS), never from its name.

aux (float32 unless noted, all unweighted, over running tokens only):
  load [E]       kept (token, choice) assignments per expert (soft: combine mass per expert)
  dropped_frac   dropped (token, choice) / (running tokens * K) (expert_choice: fraction of
                 running tokens no expert took; soft: 0)
  router_entropy mean_t -sum_e p_e log p_e;   max_prob  mean_t max_e p_e
  lb_loss        Switch, per group g (capacity is per group): mean_g E * sum_e f_ge * p_ge,
                 f_ge = share of g's running tokens whose first choice (pre-capacity) is e,
                 p_ge = their mean p_e; mean over groups with a running token; 1 under
                 uniform routing. 0 for expert_choice and soft (balanced by construction) and
                 hash (nothing to learn).
  z_loss         ST-MoE (Zoph et al. 2022): mean_t logsumexp(logits)^2 (soft: over the N slot
                 logits); 0 for hash.
  top1_expert    int32 [B, L] first-choice expert, -1 for halted tokens (and, with
                 moe.fallback, for tokens sent to the generalist).
  fallback       bool [B, L] the token went to the generalist path (act_jax/model/moe/fallback.py:
                 low router confidence or every choice over capacity); fallback_frac its
                 share of running tokens; fallback_score f32 [B, L] the router confidence.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from act_jax.model import quant as quant_lib
from act_jax.data.corpus import PAD
from act_jax.errors import ConfigError
from act_jax.model.layers.mlp import GatedMLP
from act_jax.model.moe import dispatch as dispatch_lib
from act_jax.model.moe import fallback as fallback_lib
from act_jax.model.moe import routers as R
from act_jax.scale.sharding import constrain
from act_jax.spec import MoESpec, QuantSpec

ACT_NAMES = ('batch', 'length', 'embed')
# Switch recommends a 10x smaller router init for stable routing early in training.
ROUTER_INIT = nn.initializers.variance_scaling(0.1, 'fan_in', 'truncated_normal')
AUX_KEYS = ('load', 'dropped_frac', 'router_entropy', 'max_prob', 'lb_loss', 'z_loss',
            'top1_expert', 'fallback', 'fallback_frac', 'fallback_score')


def _expert_init() -> Any:
  return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                          in_axis=-2, out_axis=-1, batch_axis=(0,))


def _dense_ffn(mlp: nn.Module, x_BLD: jax.Array) -> jax.Array:
  """Applies a dense MLP on [B*L, D]: XLA:CPU runs the 3-D form's fwd+bwd slower."""
  b, l, d = x_BLD.shape
  return constrain(mlp(x_BLD.reshape(b * l, d)).reshape(b, l, d), ACT_NAMES)


def _masked_mean(v_GS: jax.Array, run_GS: jax.Array, n: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(run_GS, v_GS, 0.0)) / n


def router_aux(plan: Any, run_GS: jax.Array, router: str, shape_BL: tuple[int, int],
               fallback_GS: jax.Array | None = None, fallback: str = 'none',
               all_run_GS: jax.Array | None = None) -> dict[str, jax.Array]:
  """Losses and telemetry of one layer's routing (module docstring), over the routed
  running tokens run_GS; fallback_frac over all running tokens all_run_GS (default run_GS)."""
  info = R.ROUTERS[router]
  probs_GSE = plan.probs_GSE
  # Soft MoE: z-loss over the per-token slot logits (the softmax it actually takes).
  logits = plan.logits_GSP if isinstance(plan, R.SoftPlan) else plan.logits_GSE
  e_ = probs_GSE.shape[-1]
  run_f_GS = run_GS.astype(jnp.float32)
  n_run = jnp.maximum(jnp.sum(run_f_GS), 1.0)
  logp_GSE = jnp.log(jnp.maximum(probs_GSE, 1e-30))
  entropy = _masked_mean(-jnp.sum(probs_GSE * logp_GSE, -1), run_GS, n_run)
  max_prob = _masked_mean(jnp.max(probs_GSE, -1), run_GS, n_run)
  zero = jnp.zeros((), jnp.float32)
  if isinstance(plan, R.SoftPlan):
    load_E = jnp.sum(probs_GSE * run_f_GS[..., None], axis=(0, 1))
    dropped = zero
    top1_GS = jnp.where(run_GS, jnp.argmax(probs_GSE, -1), -1).astype(jnp.int32)
  elif plan.slot_index_GSK is None:   # expert choice
    taken_GEC = plan.token_for_slot_GEC >= 0
    load_E = jnp.sum(taken_GEC, axis=(0, 2)).astype(jnp.float32)
    g, s = run_GS.shape
    hit_GS = jax.vmap(lambda t: jnp.zeros((s + 1,), bool).at[t].set(True))(
        jnp.where(taken_GEC, plan.token_for_slot_GEC, s).reshape(g, -1))[:, :s]
    dropped = jnp.sum(run_GS & ~hit_GS) / n_run
    top1_GS = plan.first_choice_GS
  else:
    kept_GSK = plan.slot_index_GSK >= 0
    onehot_GSKE = jax.nn.one_hot(plan.expert_index_GSK, e_, dtype=jnp.float32)  # -1 -> 0s
    load_E = jnp.sum(onehot_GSKE * kept_GSK[..., None], axis=(0, 1, 2))
    k_eff = plan.expert_index_GSK.shape[-1]
    dropped = jnp.sum((plan.expert_index_GSK >= 0) & ~kept_GSK) / (n_run * k_eff)
    top1_GS = plan.first_choice_GS
  if info.balance_loss:
    # Per group, as capacity is: pooled f and p let groups that overload opposite experts
    # cancel out (loss 1, no gradient) while half their tokens are dropped.
    n_G = jnp.sum(run_f_GS, axis=1)
    n_G1 = jnp.maximum(n_G, 1.0)[:, None]
    f_GE = jnp.sum(jax.nn.one_hot(plan.first_choice_GS, e_, dtype=jnp.float32), 1) / n_G1
    p_mean_GE = jnp.sum(probs_GSE * run_f_GS[..., None], axis=1) / n_G1
    lb_G = e_ * jnp.sum(f_GE * p_mean_GE, axis=-1)   # 0 for a group with no running token
    lb_loss = jnp.sum(lb_G) / jnp.maximum(jnp.sum(n_G > 0), 1)
  else:
    lb_loss = zero
  if info.z_loss:
    z_loss = _masked_mean(jax.nn.logsumexp(logits, -1) ** 2, run_GS, n_run)
  else:
    z_loss = zero
  fb_GS = jnp.zeros(run_GS.shape, bool) if fallback_GS is None else fallback_GS
  all_GS = run_GS if all_run_GS is None else all_run_GS
  n_all = jnp.maximum(jnp.sum(all_GS.astype(jnp.float32)), 1.0)
  return dict(load=load_E, dropped_frac=dropped.astype(jnp.float32), router_entropy=entropy,
              max_prob=max_prob, lb_loss=lb_loss, z_loss=z_loss,
              top1_expert=top1_GS.reshape(shape_BL), fallback=fb_GS.reshape(shape_BL),
              fallback_frac=_masked_mean(fb_GS.astype(jnp.float32), all_GS, n_all),
              fallback_score=fallback_lib.score(probs_GSE, 'max_prob' if fallback == 'none'
                                                else fallback).reshape(shape_BL))


class MoEFFN(nn.Module):
  """Routed (+ optional shared) experts FFN; see the module docstring for the math.

  d_ff is the expert hidden size (the resolved spec's moe.d_ff) and also the dense FFN's
  hidden size when the router is 'none'."""
  moe_cfg: MoESpec
  d_model: int
  d_ff: int
  causal: bool
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  quant: QuantSpec = quant_lib.NO_QUANT  # expert weights may be stored quantized

  @nn.compact
  def __call__(self, x_BLD: jax.Array, running_BL: jax.Array | None = None,
               token_ids_BL: jax.Array | None = None, train: bool = False,
               count_valid: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """count_valid (decoding/prefill): capacity from each group's non-PAD tokens, so a
    prompt padded to a length bucket routes exactly as it would unpadded."""
    m = self.moe_cfg
    info = R.ROUTERS[m.router]
    e_, f = m.num_experts, self.d_ff
    b, l, d = x_BLD.shape
    x_BLD = constrain(x_BLD, ACT_NAMES)
    run_BL = jnp.ones((b, l), bool) if running_BL is None else running_BL.astype(bool)
    if not info.routed:
      y_BLD = _dense_ffn(GatedMLP(self.d_ff, self.dtype, self.param_dtype, self.quant,
                                  name='dense'), x_BLD)
      return y_BLD, self._empty_aux(run_BL)

    # Groups: one sequence each by default, else contiguous chunks of group_size tokens.
    gs = m.group_size
    if gs == 0:
      g, s = b, l
    elif (b * l) % gs:
      raise ConfigError(f'moe.group_size={gs} must divide batch*length={b * l}')
    else:
      g, s = b * l // gs, gs
    x_GSD = x_BLD.reshape(g, s, d)
    run_GS = run_BL.reshape(g, s)

    valid_GS = None
    if count_valid and token_ids_BL is not None:
      valid_GS = token_ids_BL.reshape(g, s) != PAD
    plan, low_GS = self._route(info, x_GSD, run_GS, token_ids_BL, train, g, s, valid_GS)
    routed_GS = run_GS if low_GS is None else run_GS & ~low_GS
    x_GSD = constrain(x_GSD.astype(self.dtype), ('expert_group', 'length', 'embed'))
    y_GSD = dispatch_lib.moe_forward(x_GSD, plan, self._expert_weights(e_, d, f),
                                     m.dispatch, e_, dropless=info.dropless, quant=self.quant)
    fb_GS = low_GS
    if low_GS is not None and plan.slot_index_GSK is not None:
      # every choice over capacity: the generalist alone serves it (it got no slot anyway)
      fb_GS = low_GS | (routed_GS & jnp.all(plan.slot_index_GSK < 0, -1))
    # Halted and fallback tokens already get no slots; this also zeroes Soft MoE's combine.
    y_GSD = jnp.where(routed_GS[..., None], y_GSD, 0).astype(self.dtype)
    y_BLD = constrain(y_GSD.reshape(b, l, d), ACT_NAMES)
    if m.shared_experts:
      shared = GatedMLP(m.shared_experts * f, self.dtype, self.param_dtype, self.quant,
                        name='shared')
      y_BLD = y_BLD + _dense_ffn(shared, x_BLD).astype(self.dtype)
    return y_BLD, router_aux(plan, routed_GS, m.router, (b, l), fb_GS, m.fallback, run_GS)

  def _route(self, info: R.RouterInfo, x_GSD: jax.Array, run_GS: jax.Array,
             token_ids_BL: jax.Array | None, train: bool, g: int, s: int,
             valid_GS: jax.Array | None = None) -> tuple[Any, jax.Array | None]:
    """(routing plan, fallback mask [G, S] or None when moe.fallback is 'none')."""
    m = self.moe_cfg
    e_, d = m.num_experts, x_GSD.shape[-1]
    if info.scores == 'token_ids':
      if token_ids_BL is None:
        raise ConfigError(f'moe.router={m.router!r} routes by token id: pass token_ids_BL to '
                          f'MoEFFN')
      return info.plan(token_ids_BL.reshape(g, s), m, s, run_GS, None, valid_GS), None
    xr_GSD = x_GSD.astype(jnp.float32)   # router always in float32
    if train and m.jitter > 0:
      xr_GSD = R.jitter_input(xr_GSD, m.jitter, self.make_rng('jitter'))
    if info.scores == 'slots':
      p = e_ * m.num_slots
      phi_DP = self.param('soft_phi', nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ('embed', None)), (d, p), jnp.float32)
      scale = (self.param('soft_scale', nn.initializers.ones, (), jnp.float32)
               if m.soft_normalize else None)
      return info.plan(R.soft_logits(xr_GSD, phi_DP, scale), m, s, run_GS, None,
                       valid_GS), None
    # Router kernel replicated (tiny; avoids an all-gather before softmax/top-k).
    w_DE = self.param('router', nn.with_logical_partitioning(ROUTER_INIT, ('embed', None)),
                      (d, e_), jnp.float32)
    bias_E = None
    if info.learns_bias and m.bias_rate > 0:
      bias_E = self.variable('moe_state', 'bias', jnp.zeros, (e_,), jnp.float32).value
    logits_GSE = xr_GSD @ w_DE
    plan = info.plan(logits_GSE, m, s, run_GS, bias_E, valid_GS)
    if m.fallback == 'none':
      return plan, None
    # low-confidence tokens leave routing before capacity is assigned (fallback.py)
    fb_GS = run_GS & (fallback_lib.score(plan.probs_GSE, m.fallback) < m.fallback_threshold)
    plan = info.plan(logits_GSE, m, s, run_GS & ~fb_GS, bias_E, valid_GS)
    return plan, fb_GS

  def _expert_weights(self, e_: int, d: int, f: int) -> tuple[jax.Array, ...]:
    init = _expert_init()
    p = lambda name, shape, names: quant_lib.cast(self.param(  # noqa: E731
        name, nn.with_logical_partitioning(init, names), shape, self.param_dtype), self.dtype)
    return (p('w_in', (e_, d, f), ('expert', 'embed', 'mlp')),
            p('w_gate', (e_, d, f), ('expert', 'embed', 'mlp')),
            p('w_out', (e_, f, d), ('expert', 'mlp', 'embed')))

  def _empty_aux(self, run_BL: jax.Array) -> dict[str, jax.Array]:
    """Same keys/shapes as a routed layer so nn.scan stacking works for router='none'."""
    e_ = self.moe_cfg.num_experts
    z = jnp.zeros((), jnp.float32)
    return dict(load=jnp.zeros((e_,), jnp.float32), dropped_frac=z, router_entropy=z,
                max_prob=z, lb_loss=z, z_loss=z,
                top1_expert=jnp.full(run_BL.shape, -1, jnp.int32),
                fallback=jnp.zeros(run_BL.shape, bool), fallback_frac=z,
                fallback_score=jnp.zeros(run_BL.shape, jnp.float32))
