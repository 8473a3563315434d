"""Mixture-of-experts routers: who goes to which expert, into which buffer slot, with what weight.

Dims (legend: act_jax/__init__.py): G groups, S tokens per group, E experts, C capacity (slots
per expert), K choices per token, M (token, choice) entries = S*K, Y flat slot table = E*C,
P soft-MoE slots = E * num_slots, D d_model.

Every router runs in float32 and returns a STATIC-shape plan (`RoutingPlan`). The one
representation every dispatch path accepts is per slot:
  token_for_slot[g, e, c] = s   (token s of group g sits in slot c of expert e; -1 = empty)
  weight[g, e, c]             (its combine weight; 0 for an empty slot)
so y_s = sum_{(e,c): token_for_slot[e,c]=s} weight[e,c] * expert_e(x_s).  Token-choice routers
also return the same plan seen from the token side (expert_index/slot_index/combine_weight
[G,S,K]) so the gather path can combine by gathering K rows per token instead of scattering.

* top_k (Switch, Fedus et al. 2021, K=1; GShard, Lepikhin et al. 2021, K=2):
  p = softmax(x W_r); each token picks its K largest p_e; expert buffers hold
  C = min(S, ceil(K * S * cf / E)) entries. Buffers fill with all 1st choices before any 2nd
  choice; within a choice rank by position ('position', causal-safe: a token's slot depends
  only on earlier tokens) or by max_e p_e descending ('probability': Batch Prioritized Routing,
  V-MoE, Riquelme et al. 2021; uses the whole group, so not causal-safe). A (token, choice)
  whose expert is full is dropped (weight 0). Weight = p_e, or with renormalize (K > 1 only)
  p_e / sum_{chosen k} p (done over the K choices BEFORE dropping). For K = 1 renormalize is
  ignored and the weight stays p_e (Switch): p_e / p_e = 1 would leave the router no gradient
  from the task loss.
* dropless: top_k with C = S, so no expert can overflow (each token picks an expert at most
  once).
* expert_choice (Zhou et al. 2022): scores p = softmax over experts; every expert takes its
  top-C tokens of the group by p[:, e]; weight = p. We use C = ceil(K * S * cf / E) (the same
  capacity as top_k) so active compute matches top-K routing; a token may get 0..E experts.
  Sees the whole group: encoder only.
* soft (Soft MoE, Puigcerver et al. 2023): logits l = X Phi, Phi in R^{D x N};
  dispatch = softmax over tokens (per slot), combine = softmax over slots (per token);
  slots = dispatch^T X, y = combine . expert(slots). Dense by construction; encoder only.
  With moe.soft_normalize, the paper's normalisation (its sec. 2.3, as vmoe's SoftRouter):
  l[s, n] = a * <x_s / |x_s|, phi_n / |phi_n|>, |v| = sqrt(sum v^2 + 1e-6), a a learned
  scalar (init 1), so logits stay bounded as d_model grows (`soft_logits`).
* hash (Hash layers, Roller et al. 2021): e = ((id * 2654435761) mod 2^32) mod E, K = 1,
  weight 1, same capacity rule as top_k with K = 1.
* bias (DeepSeek-V3, 2024, auxiliary-loss-free balancing): selection uses logits + b_E, the
  combine weight uses the unbiased p; b is updated outside the optimizer by `update_bias`.
* jitter (Switch): router input x * U(1 - eps, 1 + eps) in training.

Losses (computed by the layer from the plan): Switch load-balance loss per routing group,
mean_g E * sum_e f_ge * p_ge (f_ge = fraction of group g's running tokens whose FIRST choice is
e, before capacity; p_ge = mean of p_e over them; groups with no running token are left out of
the mean; exactly 1 under uniform routing). Per group because capacity is per group: pooled
over groups, two groups routing all tokens to opposite experts would score the minimum 1.
Plus the ST-MoE router z-loss mean_t (logsumexp_e l_e)^2 (Zoph et al. 2022).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from act_jax.errors import ConfigError
from act_jax.model.moe import fallback as fallback_lib
from act_jax.spec import MoESpec

DISPATCHES = ('gather', 'ragged', 'einsum')
PRIORITIES = ('position', 'probability')
HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant (~2^32 / golden ratio)


class RoutingPlan(NamedTuple):
  """Static-shape routing decision for one MoE layer (see module docstring)."""
  token_for_slot_GEC: jax.Array        # int32 token index in its group; -1 = empty slot
  weight_GEC: jax.Array                # f32 combine weight of the slot; 0 if empty
  expert_index_GSK: jax.Array | None   # int32 chosen expert; -1 = not routed (halted)
  slot_index_GSK: jax.Array | None     # int32 slot in the expert buffer; -1 = dropped/none
  combine_weight_GSK: jax.Array | None  # f32; 0 if dropped
  first_choice_GS: jax.Array           # int32 first-choice expert before capacity; -1 halted
  probs_GSE: jax.Array                 # f32 router probabilities (losses, telemetry)
  logits_GSE: jax.Array                # f32 router logits


class SoftPlan(NamedTuple):
  """Soft MoE weights: dense by construction (Puigcerver et al. 2023)."""
  dispatch_GSP: jax.Array   # f32, softmax over S per slot n (halted tokens 0)
  combine_GSP: jax.Array    # f32, softmax over N per token (halted tokens 0)
  probs_GSE: jax.Array      # combine mass per expert (sums to 1 per running token)
  logits_GSP: jax.Array     # f32 slot logits x . Phi


def validate_moe(moe_cfg: MoESpec, *, d_model: int, causal: bool, mesh_expert: int = 1) -> None:
  """Raises ConfigError naming the offending moe.<field> before anything is traced."""
  g = lambda name: getattr(moe_cfg, name)  # noqa: E731
  router = g('router')
  if router not in ROUTERS:
    raise ConfigError(f'moe.router={router!r} is unknown; known routers: {sorted(ROUTERS)}')
  if d_model < 1:
    raise ConfigError(f'd_model={d_model}: must be positive')
  if g('dispatch') not in DISPATCHES:
    raise ConfigError(f'moe.dispatch={g("dispatch")!r}: must be one of {DISPATCHES}')
  if g('priority') not in PRIORITIES:
    raise ConfigError(f'moe.priority={g("priority")!r}: must be one of {PRIORITIES}')
  e = int(g('num_experts'))
  if e < 1:
    raise ConfigError(f'moe.num_experts={e}: must be >= 1')
  k = int(g('top_k'))
  if ROUTERS[router].uses_top_k and not 1 <= k <= e:
    raise ConfigError(f'moe.top_k={k}: must be in [1, moe.num_experts={e}]')
  if not float(g('capacity_factor')) > 0:
    raise ConfigError(f'moe.capacity_factor={g("capacity_factor")}: must be > 0')
  if causal and not ROUTERS[router].causal_ok:
    raise ConfigError(
        f'moe.router={router!r} leaks future tokens (each routing decision looks at the whole '
        f'group), so it is for encoder only (causal=False) models; use top_k/dropless/hash')
  if ROUTERS[router].routed and e % int(mesh_expert):
    raise ConfigError(f'moe.num_experts={e} must be divisible by mesh.expert={mesh_expert}')
  for name in ('shared_experts', 'd_ff', 'group_size'):
    if int(g(name)) < 0:
      raise ConfigError(f'moe.{name}={g(name)}: must be >= 0')
  for name in ('jitter', 'bias_rate', 'lb_loss_weight', 'z_loss_weight'):
    if float(g(name)) < 0:
      raise ConfigError(f'moe.{name}={g(name)}: must be >= 0')
  if int(g('num_slots')) < 1:
    raise ConfigError(f'moe.num_slots={g("num_slots")}: must be >= 1')
  if g('soft_normalize') and ROUTERS[router].scores != 'slots':
    raise ConfigError(f'moe.soft_normalize=True is Soft MoE\'s normalisation: it needs '
                      f'moe.router=\'soft\' (got {router!r})')
  if int(g('every')) < 1:
    raise ConfigError(f'moe.every={g("every")}: must be >= 1')
  fallback_lib.validate(moe_cfg, ROUTERS[router])


def capacity(tokens_per_group: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """C = ceil(K * S * cf / E), clipped to [1, S] (an expert never needs more than S slots)."""
  c = math.ceil(k * tokens_per_group * capacity_factor / num_experts)
  return max(1, min(tokens_per_group, c))


def capacity_per_group(tokens_per_group: int, num_experts: int, k: int,
                       capacity_factor: float, valid_GS: jax.Array | None) -> jax.Array | None:
  """capacity() of each group's count of valid (non-PAD) tokens, int32 [G] (None: no mask).

  Decoding pads a prompt to a length bucket; counting only its real tokens keeps the
  capacity, and so every routing decision, equal to the unpadded prompt's. Looked up in a
  table built with capacity() itself, so it equals the static formula bit for bit."""
  if valid_GS is None:
    return None
  table = jnp.asarray([capacity(n, num_experts, k, capacity_factor) if n else 0
                       for n in range(tokens_per_group + 1)], jnp.int32)
  return table[jnp.sum(valid_GS, axis=1)]


def jitter_input(x: jax.Array, eps: float, rng: jax.Array) -> jax.Array:
  """Switch multiplicative jitter: x * U(1 - eps, 1 + eps)."""
  noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
  return x * noise


def update_bias(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
  """DeepSeek-V3 aux-loss-free update: b <- b + rate * sign(mean(load) - load).

  Overloaded experts get a lower selection bias, underloaded ones a higher one. Pure function,
  applied by the training loop outside the optimizer.
  """
  load_E = load_E.astype(jnp.float32)
  return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)


def _positions_in_expert(expert_index_GSK: jax.Array, priority_GS: jax.Array | None,
                         num_experts: int) -> jax.Array:
  """Queue position of each (token, choice) inside its expert's buffer.

  Order: all 1st choices, then all 2nd choices, ...; inside a choice by token position or by
  descending priority. Computed with one sort of the key e*M + order (M = K*S) per group:
  O(M log M), no [G,S,E,C] tensor (a cumsum over a [G,M,E] one-hot lowers to an O(M^2)
  reduce_window on CPU). Halted entries (expert -1) sort last and get garbage positions that
  the caller masks.
  """
  g, s, k = expert_index_GSK.shape
  m = k * s
  if priority_GS is None:
    rank_GS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (g, s))
  else:
    order_GS = jnp.argsort(-priority_GS, axis=1, stable=True)  # ties keep position order
    rank_GS = jnp.argsort(order_GS, axis=1).astype(jnp.int32)  # token -> its priority rank
  e_GKS = expert_index_GSK.transpose(0, 2, 1)
  e_GKS = jnp.where(e_GKS < 0, num_experts, e_GKS)            # halted -> after every expert
  order_GKS = jnp.arange(k, dtype=jnp.int32)[:, None] * s + rank_GS[:, None, :]
  key_GM = (e_GKS * m + order_GKS).reshape(g, m)              # choice-major within expert
  idx_GM = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (g, m))
  sorted_GM, src_GM = jax.lax.sort_key_val(key_GM, idx_GM, dimension=1)
  sorted_e_GM = sorted_GM // m
  # start of each expert's run in the sorted order = number of entries of smaller experts
  counts_GE = jnp.sum(jax.nn.one_hot(sorted_e_GM, num_experts + 1, dtype=jnp.int32), axis=1)
  start_GE = jnp.cumsum(counts_GE, axis=1) - counts_GE
  pos_sorted_GM = idx_GM - jnp.take_along_axis(start_GE, sorted_e_GM, axis=1)
  pos_GM = jax.vmap(lambda p, i: jnp.zeros((m,), jnp.int32).at[i].set(p))(pos_sorted_GM, src_GM)
  return pos_GM.reshape(g, k, s).transpose(0, 2, 1)


def assign_slots(expert_index_GSK: jax.Array, weight_GSK: jax.Array,
                 expert_capacity: int, num_experts: int, priority_GS: jax.Array | None = None,
                 capacity_G: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Capacity-limited slot assignment shared by top_k, dropless and hash.

  capacity_G (optional, <= expert_capacity): a smaller per-group capacity inside the static
  buffer (capacity_per_group).

  Returns (slot_index_GSK, combine_weight_GSK, token_for_slot_GEC, weight_GEC).
  """
  g, s, k = expert_index_GSK.shape
  e_, c_ = num_experts, expert_capacity
  pos_GSK = _positions_in_expert(expert_index_GSK, priority_GS, e_)
  kept_GSK = (expert_index_GSK >= 0) & (pos_GSK < c_)
  if capacity_G is not None:
    kept_GSK = kept_GSK & (pos_GSK < capacity_G[:, None, None])
  slot_index_GSK = jnp.where(kept_GSK, pos_GSK, -1).astype(jnp.int32)
  combine_GSK = jnp.where(kept_GSK, weight_GSK, 0.0)
  # Scatter token ids into the flat [E*C] slot table; dropped entries aim past the end.
  flat_GM = jnp.where(kept_GSK, expert_index_GSK * c_ + pos_GSK, e_ * c_).reshape(g, s * k)
  tok_GM = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k)).reshape(1, s * k)
  tok_GM = jnp.broadcast_to(tok_GM, (g, s * k))
  scatter = jax.vmap(lambda t, i, v: t.at[i].set(v, mode='drop'))
  token_for_slot_GY = scatter(jnp.full((g, e_ * c_), -1, jnp.int32), flat_GM, tok_GM)
  weight_GY = scatter(jnp.zeros((g, e_ * c_), jnp.float32), flat_GM, combine_GSK.reshape(g, -1))
  return (slot_index_GSK, combine_GSK, token_for_slot_GY.reshape(g, e_, c_),
          weight_GY.reshape(g, e_, c_))


def top_k_route(logits_GSE: jax.Array, k: int, expert_capacity: int, *,
                renormalize: bool = True, priority: str = 'position',
                running_GS: jax.Array | None = None, bias_E: jax.Array | None = None,
                capacity_G: jax.Array | None = None) -> RoutingPlan:
  """Switch (K=1) / GShard (K=2) token-choice routing with capacity C (module docstring)."""
  logits_GSE = logits_GSE.astype(jnp.float32)
  g, s, e_ = logits_GSE.shape
  if running_GS is None:
    running_GS = jnp.ones((g, s), bool)
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  select_GSE = logits_GSE if bias_E is None else logits_GSE + bias_E.astype(jnp.float32)
  _, expert_GSK = jax.lax.top_k(select_GSE, k)   # bias only changes WHO is chosen
  weight_GSK = jnp.take_along_axis(probs_GSE, expert_GSK, axis=-1)
  if renormalize and k > 1:   # K = 1: keep p_e (Switch), else every weight is 1, no gradient
    weight_GSK = weight_GSK / jnp.sum(weight_GSK, axis=-1, keepdims=True)
  expert_GSK = jnp.where(running_GS[..., None], expert_GSK, -1).astype(jnp.int32)
  weight_GSK = jnp.where(running_GS[..., None], weight_GSK, 0.0)
  prio_GS = None if priority == 'position' else jnp.max(probs_GSE, axis=-1)
  slot_GSK, combine_GSK, tfs_GEC, w_GEC = assign_slots(expert_GSK, weight_GSK,
                                                      expert_capacity, e_, prio_GS, capacity_G)
  return RoutingPlan(tfs_GEC, w_GEC, expert_GSK, slot_GSK, combine_GSK, expert_GSK[..., 0],
                     probs_GSE, logits_GSE)


def hash_route(token_ids_GS: jax.Array, num_experts: int, expert_capacity: int,
               running_GS: jax.Array | None = None, capacity_G: jax.Array | None = None
               ) -> RoutingPlan:
  """Roller et al. 2021: fixed expert = ((id * 2654435761) mod 2^32) mod E, weight 1."""
  g, s = token_ids_GS.shape
  if running_GS is None:
    running_GS = jnp.ones((g, s), bool)
  # uint32 multiply wraps mod 2^32 by itself.
  h_GS = token_ids_GS.astype(jnp.uint32) * jnp.uint32(HASH_MULTIPLIER)
  expert_GS = (h_GS % jnp.uint32(num_experts)).astype(jnp.int32)
  expert_GSK = jnp.where(running_GS, expert_GS, -1)[..., None]
  weight_GSK = running_GS[..., None].astype(jnp.float32)
  slot_GSK, combine_GSK, tfs_GEC, w_GEC = assign_slots(expert_GSK, weight_GSK, expert_capacity,
                                                      num_experts, capacity_G=capacity_G)
  probs_GSE = jax.nn.one_hot(expert_GS, num_experts, dtype=jnp.float32)  # telemetry only
  return RoutingPlan(tfs_GEC, w_GEC, expert_GSK, slot_GSK, combine_GSK, expert_GSK[..., 0],
                     probs_GSE, jnp.zeros_like(probs_GSE))


def expert_choice_route(logits_GSE: jax.Array, expert_capacity: int,
                        running_GS: jax.Array | None = None) -> RoutingPlan:
  """Zhou et al. 2022: expert e takes the C tokens with the largest p[:, e]; weight = p."""
  logits_GSE = logits_GSE.astype(jnp.float32)
  g, s, e_ = logits_GSE.shape
  if running_GS is None:
    running_GS = jnp.ones((g, s), bool)
  probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
  # Halted tokens score -1 (< any probability) so they are picked only if fewer than C run.
  score_GES = jnp.where(running_GS[..., None], probs_GSE, -1.0).transpose(0, 2, 1)
  weight_GEC, token_GEC = jax.lax.top_k(score_GES, expert_capacity)
  valid_GEC = jnp.take_along_axis(running_GS, token_GEC.reshape(g, -1), axis=1)
  valid_GEC = valid_GEC.reshape(token_GEC.shape)
  token_GEC = jnp.where(valid_GEC, token_GEC, -1).astype(jnp.int32)
  weight_GEC = jnp.where(valid_GEC, weight_GEC, 0.0)
  top1_GS = jnp.where(running_GS, jnp.argmax(probs_GSE, axis=-1), -1).astype(jnp.int32)
  return RoutingPlan(token_GEC, weight_GEC, None, None, None, top1_GS, probs_GSE, logits_GSE)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
  """x / sqrt(sum x^2 + eps) along `axis`."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


def soft_logits(x_GSD: jax.Array, phi_DP: jax.Array, scale: jax.Array | None = None
                ) -> jax.Array:
  """Soft MoE router logits: x Phi, or with a scale, scale * <x/|x|, phi/|phi|> (module
  docstring). float32."""
  x_GSD, phi_DP = x_GSD.astype(jnp.float32), phi_DP.astype(jnp.float32)
  if scale is None:
    return x_GSD @ phi_DP
  return scale * (l2_normalize(x_GSD, -1) @ l2_normalize(phi_DP, 0))


def soft_route(logits_GSP: jax.Array, num_experts: int,
               running_GS: jax.Array | None = None) -> SoftPlan:
  """Puigcerver et al. 2023: dispatch = softmax over tokens, combine = softmax over slots."""
  logits_GSP = logits_GSP.astype(jnp.float32)
  g, s, n = logits_GSP.shape
  if running_GS is None:
    running_GS = jnp.ones((g, s), bool)
  run_GS1 = running_GS[..., None]
  # Finite mask value: an all-halted group gives a uniform softmax that the *run mask zeroes.
  masked_GSP = jnp.where(run_GS1, logits_GSP, -1e30)
  dispatch_GSP = jax.nn.softmax(masked_GSP, axis=1) * run_GS1
  combine_GSP = jax.nn.softmax(logits_GSP, axis=-1) * run_GS1
  probs_GSE = combine_GSP.reshape(g, s, num_experts, n // num_experts).sum(-1)
  return SoftPlan(dispatch_GSP, combine_GSP, probs_GSE, logits_GSP)


# ----------------------------------------------------------------------------- the registry
# Each router as a plan function of one signature: (scores, moe spec, tokens per group S,
# running_GS, DeepSeek-V3 bias or None, valid_GS or None) -> plan. `scores` is what
# RouterInfo.scores names; valid_GS (decoding) limits capacity to capacity_per_group.

def _plan_top_k(logits_GSE, m: MoESpec, s: int, run_GS, bias_E, valid_GS=None):
  return top_k_route(logits_GSE, m.top_k, capacity(s, m.num_experts, m.top_k,
                                                   m.capacity_factor),
                     renormalize=m.renormalize, priority=m.priority, running_GS=run_GS,
                     bias_E=bias_E, capacity_G=capacity_per_group(
                         s, m.num_experts, m.top_k, m.capacity_factor, valid_GS))


def _plan_dropless(logits_GSE, m: MoESpec, s: int, run_GS, bias_E, valid_GS=None):
  del valid_GS  # C = S never binds
  return top_k_route(logits_GSE, m.top_k, s, renormalize=m.renormalize, priority=m.priority,
                     running_GS=run_GS, bias_E=bias_E)


def _plan_expert_choice(logits_GSE, m: MoESpec, s: int, run_GS, bias_E, valid_GS=None):
  del bias_E, valid_GS  # encoder only: never decodes
  return expert_choice_route(logits_GSE, capacity(s, m.num_experts, m.top_k,
                                                  m.capacity_factor), run_GS)


def _plan_soft(logits_GSP, m: MoESpec, s: int, run_GS, bias_E, valid_GS=None):
  del s, bias_E, valid_GS
  return soft_route(logits_GSP, m.num_experts, run_GS)


def _plan_hash(token_ids_GS, m: MoESpec, s: int, run_GS, bias_E, valid_GS=None):
  del bias_E
  return hash_route(token_ids_GS, m.num_experts,
                    capacity(s, m.num_experts, 1, m.capacity_factor), run_GS,
                    capacity_per_group(s, m.num_experts, 1, m.capacity_factor, valid_GS))


class RouterInfo(NamedTuple):
  """A registered router and what it can do (read by the layer, validation and losses)."""
  plan: Optional[Callable[..., Any]]  # None: no routing, the dense FFN
  scores: str = 'experts'   # its input: 'experts' logits x W_r [G,S,E], 'slots' x Φ [G,S,P],
                            # 'token_ids' [G,S] (hash), or 'none'
  causal_ok: bool = True    # False: a token's routing looks at later tokens of its group
  uses_top_k: bool = False  # capacity / selection depends on moe.top_k
  balance_loss: bool = False  # the Switch load-balance loss applies (token choice)
  z_loss: bool = True       # the router z-loss applies (there are learned logits)
  learns_bias: bool = False  # DeepSeek-V3 selection bias applies (moe.bias_rate)
  dropless: bool = False    # never drops: the gather path runs the block-sparse kernel
  can_fall_back: bool = False  # token choice over learned probabilities: moe.fallback applies

  @property
  def routed(self) -> bool:
    return self.plan is not None


ROUTERS: dict[str, RouterInfo] = {
    'none': RouterInfo(None, scores='none', z_loss=False),
    'top_k': RouterInfo(_plan_top_k, uses_top_k=True, balance_loss=True, learns_bias=True,
                        can_fall_back=True),
    'dropless': RouterInfo(_plan_dropless, uses_top_k=True, balance_loss=True,
                           learns_bias=True, dropless=True, can_fall_back=True),
    'expert_choice': RouterInfo(_plan_expert_choice, causal_ok=False, uses_top_k=True),
    'soft': RouterInfo(_plan_soft, scores='slots', causal_ok=False),
    'hash': RouterInfo(_plan_hash, scores='token_ids', z_loss=False),
}
