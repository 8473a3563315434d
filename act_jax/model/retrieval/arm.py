"""Retrieval as an arm of the per-token depth decision.

At every depth step in spec.retrieval.steps (the steps the datastore holds keys for) a
running token chooses among *exit here*, *go deeper* and *retrieve here*:
  1. the exit head gives p_LM (the shared head on the step's state);
  2. mode 'always': retrieve; 'gate': retrieve when the gate's P(helps) >= its threshold
     (act_jax/model/retrieval/gate.py; features of p_LM and of the query, no search needed);
     'never': the arm is absent;
  3. retrieving: query q = final_norm(h) (the exit head's own input, as the keys were
     stored), the O nearest keys of this step's key set (knn.search), p_kNN from their
     distances and next tokens -- used only when the nearest key is within max_distance
     (tuned so that text the datastore does not cover keeps p_LM: the retrieval distance
     decides after the search, the gate before it); the token keeps its latest p_kNN;
  4. every token that has retrieved at this or an earlier step sees the interpolation
     log(lam p_kNN + (1 - lam) p_LM) in place of its exit logits, so the exit decision is
     taken again on the interpolated distribution (it may now exit) and, since the model's
     output is the exit head's at the exit step, that distribution is also the output.
The search runs only when some token of the batch retrieves (lax.cond), in the masked scan
as in the loops that really stop (act_jax/infer/inference.py). With spec.retrieval.mesh the
entries are split over its 'data' axis and every device searches its own shard
(knn.sharded_search): a datastore larger than one device's memory.

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocabulary, X exit steps,
I datastore entries, Z flattened tokens, O neighbours.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from act_jax.errors import ConfigError
from act_jax.model.layers import rms_norm
from act_jax.model.retrieval import gate as gate_lib
from act_jax.model.retrieval import knn as knn_lib

MODES = ('never', 'always', 'gate')


def active(spec) -> bool:
  """True when the spec's model retrieves (a datastore attached, mode not 'never')."""
  r = getattr(spec, 'retrieval', None)
  return r is not None and r.mode != 'never'


def check_model(spec) -> None:
  """ConfigError unless the run's model can carry the arm: its output must be its exit head
  (the arm interpolates the exit head, then the exit is decided again), and causal."""
  p = spec.policy
  if not (p.needs_exit_logits and p.output_is_exit_head):
    raise ConfigError(f'retrieval needs a policy whose output is its exit head (it '
                      f'interpolates the exit head and decides again); halting.name='
                      f'{spec.halting.name!r} is not one')
  if not spec.model.causal:
    raise ConfigError('retrieval predicts the next token: model.causal must be true')


def query(h_BLD: jax.Array, norm_scale: jax.Array) -> jax.Array:
  """The datastore key / query of a state: the exit head's normalised input, f32."""
  return rms_norm(h_BLD.astype(jnp.float32), norm_scale)


def step(spec, ret: dict, norm_scale: jax.Array, h_BLD: jax.Array, logits_BLV: jax.Array,
         knn_BLV: jax.Array, i: jax.Array, running_BL: jax.Array
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One step of the arm: (exit logits as the exit decision should see them, each token's
  latest p_kNN [B, L, V] (all zero: never retrieved), retrieved here [B, L])."""
  r = spec.retrieval
  at_X = jnp.asarray(r.steps, jnp.int32) == i
  here = running_BL & jnp.any(at_X)
  q_BLD = query(h_BLD, norm_scale)
  if r.mode == 'gate':
    f = gate_lib.features(logits_BLV, q_BLD, i, spec.model.num_steps)
    here = here & (gate_lib.prob(ret['gate'], f) >= ret['gate_threshold'])
  b, l, d = h_BLD.shape
  v = logits_BLV.shape[-1]

  def fetch(knn):
    q_ZD = q_BLD.reshape(b * l, d)
    keys_ID = jax.lax.dynamic_index_in_dim(ret['keys_XID'], jnp.argmax(at_X), 0,
                                           keepdims=False)
    if r.mesh is None:
      d_ZO, idx_ZO = knn_lib.search(q_ZD, keys_ID, r.neighbours, r.approx, r.recall_target,
                                    r.block, ret['valid_I'])
      val_ZO = knn_lib.lookup(ret['values_I'], idx_ZO)
    else:  # entries split over the mesh's data axis: each device searches its shard
      d_ZO, _, val_ZO = knn_lib.sharded_search(q_ZD, keys_ID, ret['values_I'], r.neighbours,
                                               r.mesh, 'data', r.approx, r.recall_target,
                                               r.block)
    p_ZV = knn_lib.knn_probs(d_ZO, val_ZO, v, ret['temperature'])
    # stage 2, after the search: a nearest key farther than max_distance is another domain's
    # (the datastore does not cover this input): the token keeps p_LM
    p_ZV = jnp.where(d_ZO[:, :1] <= ret['max_distance'], p_ZV, 0.0)
    return jnp.where(here[..., None], p_ZV.reshape(b, l, v), knn)

  knn_BLV = jax.lax.cond(jnp.any(here), fetch, lambda k: k, knn_BLV)
  has_BL = jnp.sum(knn_BLV, -1) > 0
  mixed = knn_lib.interpolate(logits_BLV, knn_BLV, ret['lam'])
  return jnp.where(has_BL[..., None], mixed, logits_BLV), knn_BLV, here
