"""The step model of ACT and PonderNet's vector tasks: a recurrent cell that reads the whole
input vector at every step, with a halting unit and an output head on its state.

Graves 2016 (sec. 3.1, parity) and Banino et al. 2021 (PonderNet, sec. 3.1-3.2) ponder over
ONE input: the vector x (±1 / 0 entries) is fed to the same cell at every step n, and the
cell's weights, the halting unit and the output head are shared across steps:
    h^0 = 0
    h^n = cell(h^{n-1}, x)                     'gru' (Cho 2014) or 'elman' (tanh RNN)
    halt_logit^n = w_h · h^n + b_h             halting unit (b_h = halting.bias_init)
    y^n = W_o h^n + b_o                        output head: 2 class logits (parity 0 / 1)
The signals are the ones a transformer DepthStep hands a HaltingPolicy (halt_logit,
exit_logits [B,1,2], exit_classifier_logit), so every policy's step / finalize /
loss_terms runs unchanged: ACT's output Σ_n w^n h^n through the linear head equals Graves's
Σ_n w^n y^n (Σ_n w^n = 1); PonderNet's loss is Σ_n p_n L(y, y^n) + β KL(p ‖ p_G).
One example is one "token" (L = 1), so [B,L] halting shapes are [B,1].

Two drivers, as for the transformer: `StepCellModel` runs the N steps as a masked nn.scan
(rows that stopped keep their state with `where`; training and evaluation), and
`forward_while` applies the same CellStep to the same parameters in a lax.while_loop that
stops when every row has halted (tests pin equal outputs and halting steps).

Sizes and optimiser of the paper's parity runs: experiments/configs/parity_cell.py.
Mixture-of-Depths routes tokens of a sequence per block; a cell has neither, so it is
refused here (config.resolve), as are MoE routers and the transformer-only options.

Dims (legend: act_jax/__init__.py): B batch, L predictions per example (1), D cell state,
V output classes (2), N steps. The input vector x has data.num_bits entries.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from act_jax.errors import ConfigError
from act_jax.spec import Spec, threshold_at, threshold_per_step

NUM_CLASSES = 2  # the head's classes: parity 0 / 1 (targets are class indices)


def _gru(d: int) -> nn.Module:
  return nn.GRUCell(features=d, name='cell')


class ElmanCell(nn.Module):
  """h' = tanh(W_x x + W_h h + b): Graves's parity network (a simple tanh RNN)."""
  features: int

  @nn.compact
  def __call__(self, h_BLD: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    pre_BLD = (nn.Dense(self.features, name='input')(x)
               + nn.Dense(self.features, use_bias=False, name='recurrent')(h_BLD))
    h_BLD = jnp.tanh(pre_BLD)
    return h_BLD, h_BLD


def _elman(d: int) -> nn.Module:
  return ElmanCell(d, name='cell')


# The registry of step cells: model.kind -> cell factory (d_model -> module with
# (h, x) -> (h', h')). model.kind='transformer' is the byte-token transformer instead.
STEP_CELLS: dict[str, Callable[[int], nn.Module]] = {'gru': _gru, 'elman': _elman}


def is_step_cell(spec: Spec) -> bool:
  """True when spec's model is a step cell (model.kind in STEP_CELLS)."""
  return spec.model.kind in STEP_CELLS


class CellStep(nn.Module):
  """One step: the cell on (h, x), the signals the policy asks for, then policy.step.
  carry {'h' [B,1,D], 'running' [B,1], 'state', 'i'}; bcast {'x' [B,1,num_bits],
  'head' {'w_DV', 'b_V'}, 'threshold' [N] or [B,N]}."""
  config: Spec
  train: bool = False

  @nn.compact
  def __call__(self, carry: dict, bcast: dict) -> tuple[dict, dict]:
    m, policy = self.config.model, self.config.policy
    h_prev, running_BL = carry['h'], carry['running']
    h_new, _ = STEP_CELLS[m.kind](m.d_model)(h_prev, bcast['x'])
    h_new = jnp.where(running_BL[..., None], h_new, h_prev)  # stopped rows keep their state
    signals = {}
    if policy.needs_halt_unit:
      signals['halt_logit'] = nn.Dense(
          1, name='halt_unit',
          bias_init=nn.initializers.constant(self.config.halting.bias_init))(h_new)[..., 0]
    logits_BLV = head_logits(bcast['head'], h_new)
    if policy.needs_exit_logits:
      signals['exit_logits'] = logits_BLV
    if policy.needs_exit_classifier:
      x = jax.lax.stop_gradient(h_new)  # never trains the cell
      x = nn.gelu(nn.Dense(32, name='exit_clf_hidden')(x))
      signals['exit_classifier_logit'] = nn.Dense(1, name='exit_clf_out')(x)[..., 0]
    if policy.needs_uniform and not self.train:
      signals['uniform'] = jax.random.uniform(self.make_rng('halting'), running_BL.shape)
    state, running_next, step_out = policy.step(
        carry['state'], h_prev, h_new, signals, carry['i'],
        threshold_at(bcast['threshold'], carry['i']), running_BL, self.train)
    new_carry = {'h': h_new, 'running': running_BL & running_next, 'state': state,
                 'i': carry['i'] + 1}
    ys = {'step': step_out, 'running': running_BL}
    if policy.needs_exit_logits:
      ys['exit_logits'] = logits_BLV
    return new_carry, ys


def head_logits(head: dict, h_BLD: jax.Array) -> jax.Array:
  """The output head y = W_o h + b_o, f32 [B,L,V]."""
  return (h_BLD.astype(jnp.float32) @ head['w_DV'] + head['b_V']).astype(jnp.float32)


def prepare(spec: Spec, params: dict, inputs: jax.Array, threshold: Any = None
            ) -> tuple[dict, dict]:
  """Initial carry and the loop's broadcast inputs (shared by the scan and the while loop).
  inputs: [B, num_bits], the ±1 / 0 vector (any numeric dtype)."""
  m, policy = spec.model, spec.policy
  if inputs.ndim != 2:
    raise ConfigError(f'model.kind={m.kind!r} takes [batch, entries] vectors; got inputs of '
                      f'shape {inputs.shape}')
  b = inputs.shape[0]
  if threshold is None:
    threshold = policy.default_threshold()
  h0_BLD = jnp.zeros((b, 1, m.d_model), jnp.float32)
  carry = {'h': h0_BLD, 'running': jnp.ones((b, 1), bool), 'state': policy.init(h0_BLD),
           'i': jnp.zeros((), jnp.int32)}
  bcast = {'x': inputs.astype(jnp.float32)[:, None, :],
           'head': {'w_DV': params['head_kernel'], 'b_V': params['head_bias']},
           'threshold': threshold_per_step(threshold, m.num_steps)}
  return carry, bcast


def finish(spec: Spec, carry: dict, ys: dict, head: dict) -> tuple[jax.Array, dict]:
  """Policy finalize and the head (shared by both drivers; ys stacked on a leading N)."""
  policy = spec.policy
  h_out_BLD, aux = policy.finalize(carry['state'], carry['h'], ys['step'])
  if policy.output_is_exit_head:  # the exit step's own head (same frozen state)
    logits_BLV = jnp.take_along_axis(ys['exit_logits'], aux['exit_step'][None, ..., None],
                                     0)[0]
  else:
    logits_BLV = head_logits(head, h_out_BLD)
  aux = dict(aux)
  aux['running'] = ys['running']                                     # [N,B,1]
  aux['layers'] = jnp.sum(ys['running'].astype(jnp.float32), axis=0)  # [B,1] steps run
  aux['valid'] = jnp.ones(aux['layers'].shape, bool)
  if 'exit_logits' in ys:
    aux['step_logits'] = ys['exit_logits']                           # [N,B,1,V]
  return logits_BLV, aux


class StepCellModel(nn.Module):
  """The masked-scan driver: N steps of CellStep with shared weights (training, eval).
  Called like the transformer by the train and eval steps; targets_BL is not needed (every
  step's 2-class logits are cheap, aux['step_logits'])."""
  config: Spec
  train: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, threshold: Optional[jax.Array] = None,
               targets_BL: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    del targets_BL
    m = self.config.model
    params = {
        'head_kernel': self.param('head_kernel', nn.initializers.lecun_normal(),
                                  (m.d_model, NUM_CLASSES)),
        'head_bias': self.param('head_bias', nn.initializers.zeros, (NUM_CLASSES,))}
    carry, bcast = prepare(self.config, params, inputs, threshold)
    scan = nn.scan(CellStep, variable_broadcast='params',
                   split_rngs={'params': False, 'halting': True},
                   in_axes=nn.broadcast, length=m.num_steps)
    carry, ys = scan(self.config, self.train, name='stack')(carry, bcast)
    return finish(self.config, carry, ys, bcast['head'])


def forward_while(spec: Spec, variables: dict, inputs: jax.Array, threshold: Any = None
                  ) -> tuple[jax.Array, dict]:
  """The while-loop driver: the same CellStep and parameters, stopped once every row has
  halted (steps after that are never run; their ys stay 0)."""
  params = variables['params']
  carry, bcast = prepare(spec, params, inputs, threshold)
  step = CellStep(spec, train=False)
  n = spec.model.num_steps

  def apply(c):
    return step.apply({'params': params['stack']}, c, bcast,
                      rngs={'halting': jax.random.fold_in(jax.random.PRNGKey(0), c['i'])})

  ys_shape = jax.eval_shape(lambda c: apply(c)[1], carry)
  bufs = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape, s.dtype), ys_shape)

  def body(st):
    c, b = st
    new_c, ys = apply(c)
    b = jax.tree.map(lambda full, new: jax.lax.dynamic_update_index_in_dim(full, new, c['i'], 0),
                     b, ys)
    return new_c, b

  carry, ys = jax.lax.while_loop(lambda st: (st[0]['i'] < n) & jnp.any(st[0]['running']),
                                 body, (carry, bufs))
  return finish(spec, carry, ys, bcast['head'])
