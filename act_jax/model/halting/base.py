"""The halting-policy interface, shared helpers and a reference driver of the model's depth loop.

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, V vocab, N depth steps,
X exit steps (a subset of N).

A halting policy is a set of PURE functions: the model owns every parameter (the halting unit,
the shared LM head, the exit classifier) and hands the policy the resulting signals each step.
The model's loop, which `drive` below reproduces for tests, is

    state = policy.init(h0)
    for i in range(N):                                   # a lax.scan in the model
      h_new = block(h_prev)
      h_new = where(running, h_new, h_prev)              # frozen tokens keep their state
      state, running_next, out_i = policy.step(state, h_prev, h_new, signals(h_new), i,
                                               threshold, running, train)
      running = running & running_next
    h_out, aux = policy.finalize(state, h_last, stack(out_0..out_{N-1}))
    task_loss, extra = policy.loss_terms(aux (+ the exits' heads), targets, weights)

The exits' heads reach the losses as ExitHeads (below): from stacked logits
aux['step_logits'] [N,B,L,V] (evaluation, this driver, tests), or -- the training forward,
which never holds [N,B,L,V] -- from each exit's CE and argmax computed inside the depth scan
(aux['step_ce'], aux['step_argmax']), or from the exits' hidden states aux['step_h']
[N,B,L,D] and the head aux['head'], one tile of logits at a time
(act_jax/model/layers/head.py).

Contract: a policy never changes its state for tokens whose `running_BL` is False; at the last
step (i == N-1) every token stops; `i` and `threshold` are traced (no recompiles when the
threshold changes); `train` is static. `threshold` is step i's value, a scalar or [B,1] per
row (spec.threshold_at of the model's per-step form).
"""
from __future__ import annotations

from typing import Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from act_jax.model.layers.head import head_logits, token_stats
from act_jax.spec import HaltingSpec, threshold_at, threshold_per_step

State = dict[str, jax.Array]
StepOut = dict[str, jax.Array]
Aux = dict[str, jax.Array]

POLICIES: dict[str, type['HaltingPolicy']] = {}  # the registry: name -> policy class


def register(cls: type['HaltingPolicy']) -> type['HaltingPolicy']:
  """Class decorator: adds a policy to POLICIES under cls.name (the registry line)."""
  if not isinstance(cls, type) or not issubclass(cls, HaltingPolicy) or not cls.name:
    raise TypeError(f'{cls!r}: must be a HaltingPolicy subclass with a non-empty name')
  POLICIES[cls.name] = cls
  return cls

class HaltingPolicy:
  """Base class: one subclass per policy file, registered by `name` in halting.POLICIES.

  What a policy can do is said by its class attributes (capabilities), never by its name:
  the model computes only the signals it asks for, and inference, calibration and the
  binaries check these flags."""

  name: ClassVar[str] = ''
  # signals the model computes each step
  needs_halt_unit: ClassVar[bool] = False  # signals['halt_logit'] f32 [B,L]
  needs_exit_logits: ClassVar[bool] = False  # signals['exit_logits'] [B,L,V]; aux['step_logits']
  # step() reads the exit head (exit_score below); a training forward then gives it
  # signals['exit_score'] computed by length tiles instead of signals['exit_logits']
  step_reads_exit_logits: ClassVar[bool] = False
  needs_exit_classifier: ClassVar[bool] = False  # signals['exit_classifier_logit'] f32 [B,L]
  # what it does with them
  can_exit: ClassVar[bool] = False  # tokens stop at a threshold-dependent step in inference
  can_cap_depth: ClassVar[bool] = False  # accepts a max-layers cap (-inf threshold at a step)
  output_is_exit_head: ClassVar[bool] = False  # logits = the exit head's at the exit step
  can_draft: ClassVar[bool] = False  # exits read the shared LM head: self-speculative drafts
  supports_exit_aware: ClassVar[bool] = False  # halting.exit_aware applies (state['met'])
  supports_distill: ClassVar[bool] = False  # halting.distill applies (exits imitate full depth)
  # loss_terms keys that price compute; halting.cost_warmup ramps them in from 0
  cost_terms: ClassVar[tuple[str, ...]] = ()
  gates_blocks: ClassVar[bool] = False  # the model routes tokens per block (MoD; has .capacity)

  def __init__(self, cfg: HaltingSpec, num_steps: int):
    self.cfg = cfg
    self.num_steps = int(num_steps)
    self.per_sequence = bool(cfg.per_sequence)

  # Equal (and hashing alike) when built from the same spec: a policy is part of the
  # hashable Spec, a jit static argument.
  def __eq__(self, other: object) -> bool:
    return type(self) is type(other) and (self.cfg, self.num_steps) == (other.cfg,
                                                                      other.num_steps)

  def __hash__(self) -> int:
    return hash((type(self).__name__, self.cfg, self.num_steps))

  def __repr__(self) -> str:
    return f'{type(self).__name__}(num_steps={self.num_steps})'

  @property
  def needs_uniform(self) -> bool:
    """signals['uniform'] ~ U[0, 1) [B,L] in inference (sampled halting)."""
    return False

  def exit_score(self, logits_BLV: jax.Array) -> jax.Array:
    """f32 [B,L]: the per-token decision step() reads from the exit head's logits (policies
    with step_reads_exit_logits)."""
    raise NotImplementedError

  # ---- static description ----
  def default_threshold(self) -> float:
    return float(self.cfg.threshold)

  def exit_steps(self) -> tuple[int, ...]:
    return tuple(range(self.num_steps))

  # ---- the loop ----
  def init(self, h_BLD: jax.Array) -> State:
    B, L = h_BLD.shape[:2]
    return {'exit_step': jnp.zeros((B, L), jnp.int32)}

  def step(self, state: State, h_prev_BLD: jax.Array, h_new_BLD: jax.Array,
           signals: Mapping[str, jax.Array], i: jax.Array, threshold: jax.Array,
           running_BL: jax.Array, train: bool) -> tuple[State, jax.Array, StepOut]:
    raise NotImplementedError

  def finalize(self, state: State, h_last_BLD: jax.Array,
               step_outs: Mapping[str, jax.Array]) -> tuple[jax.Array, Aux]:
    return h_last_BLD, {'exit_step': state['exit_step']}

  def loss_terms(self, aux: Mapping[str, jax.Array], targets_BL: jax.Array,
                 weights_BL: jax.Array) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    return None, {}

  # ---- helpers for subclasses ----
  def is_last(self, i: jax.Array) -> jax.Array:
    return i >= self.num_steps - 1

  def exit_mask_N(self) -> jax.Array:
    """bool [N]: True at exit steps; indexed with the traced step counter."""
    mask = np.zeros((self.num_steps,), bool)
    mask[list(self.exit_steps())] = True
    return jnp.asarray(mask)


# ---------------------------------------------------------------- shared pure helpers

def record_exit(exit_step_BL: jax.Array, running_BL: jax.Array, running_next_BL: jax.Array,
                i: jax.Array) -> jax.Array:
  """exit_step := i for tokens that ran this step and stop now; others unchanged."""
  stops_BL = running_BL & ~running_next_BL
  return jnp.where(stops_BL, jnp.asarray(i, jnp.int32), exit_step_BL)


def pool_mean_over_row(x_BL: jax.Array, running_BL: jax.Array) -> jax.Array:
  """Mean of x over a row's running tokens, broadcast back to [B,L] (per-sequence halting)."""
  m_BL = running_BL.astype(x_BL.dtype)
  mean_B1 = (x_BL * m_BL).sum(-1, keepdims=True) / jnp.maximum(m_BL.sum(-1, keepdims=True), 1.0)
  return jnp.broadcast_to(mean_B1, x_BL.shape)


def pool_min_over_row(x_BL: jax.Array, running_BL: jax.Array) -> jax.Array:
  """Min of x over a row's running tokens, broadcast to [B,L]: a row exits when ALL are sure."""
  big = jnp.asarray(jnp.finfo(x_BL.dtype).max, x_BL.dtype)
  min_B1 = jnp.where(running_BL, x_BL, big).min(-1, keepdims=True)
  return jnp.broadcast_to(min_B1, x_BL.shape)


def masked_mean(x_BL: jax.Array, weights_BL: jax.Array) -> jax.Array:
  """Token mean weighted by weights_BL (0 for padding); 0 when all weights are 0."""
  w_BL = weights_BL.astype(jnp.float32)
  return (x_BL.astype(jnp.float32) * w_BL).sum() / jnp.maximum(w_BL.sum(), 1e-8)


def per_step_ce(step_logits_NBLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """Cross-entropy of every step's logits, f32 [N,B,L]."""
  logits = step_logits_NBLV.astype(jnp.float32)
  targets_NBL = jnp.broadcast_to(targets_BL, logits.shape[:-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets_NBL)


def exit_loss_weights(exit_steps: tuple[int, ...], kind: str) -> np.ndarray:
  """Normalised weights ω over the exit steps: ω_l ∝ l (1-based, 'linear') or 1 ('uniform')."""
  if kind == 'linear':
    w = np.asarray([s + 1 for s in exit_steps], np.float64)  # 1-based so step 0 keeps weight
  elif kind == 'uniform':
    w = np.ones((len(exit_steps),), np.float64)
  else:
    raise ValueError(f'exit_weights={kind!r}')
  return (w / w.sum()).astype(np.float32)


def weighted_exit_ce(ce_XBL: jax.Array, weights_BL: jax.Array, exit_steps: tuple[int, ...],
                     kind: str) -> jax.Array:
  """CALM loss Σ_l ω_l L_l / Σ_l ω_l over the exit steps l (L_l: weighted token-mean CE of
  ce_XBL, the exits' per-token CE in exit_steps order)."""
  w_BL = weights_BL.astype(jnp.float32)
  ce_N = (ce_XBL * w_BL).sum((1, 2)) / jnp.maximum(w_BL.sum(), 1e-8)
  return (jnp.asarray(exit_loss_weights(exit_steps, kind)) * ce_N).sum()


def exit_distill_kl(step_logits_NBLV: jax.Array, weights_BL: jax.Array,
                    steps: tuple[int, ...]) -> jax.Array:
  """Self-distillation of the exits: mean over l in `steps` of the token-mean
  KL(p_{N−1} ‖ p_l), the last step's distribution held fixed (stop_gradient), so exit heads
  learn to predict what full depth would (their confidence then tracks agreement with it)."""
  return _mean_distill(ExitHeads({'step_logits': step_logits_NBLV}), weights_BL, steps)


def _mean_distill(heads: 'ExitHeads', weights_BL: jax.Array, steps: tuple[int, ...]
                  ) -> jax.Array:
  if not steps:
    return jnp.zeros((), jnp.float32)
  kl_XBL = heads.distill_kl(steps)
  return jnp.mean(jnp.stack([masked_mean(k, weights_BL) for k in kl_XBL]))


class ExitHeads:
  """Every exit's head, as the losses read it, whichever form the forward gave it in:
  aux['step_logits'] [N,B,L,V] (evaluation, `drive`, tests); aux['step_ce'] and
  aux['step_argmax'] [N,B,L] (the training forward given the targets: computed in the depth
  scan); or aux['step_h'] [N,B,L,D] with the shared head aux['head'] (training with
  self-distillation; tiles = model.loss_tiles length tiles per exit,
  act_jax/model/layers/head.py). All give the same numbers."""

  def __init__(self, aux: Mapping[str, jax.Array], tiles: int = 1):
    self.logits_NBLV = aux.get('step_logits')
    self.h_NBLD, self.head = aux.get('step_h'), aux.get('head')
    # the training forward given the targets: each exit's CE and argmax, from the scan
    self.ce_NBL, self.argmax_NBL = aux.get('step_ce'), aux.get('step_argmax')
    if self.logits_NBLV is None and self.ce_NBL is None and (self.h_NBLD is None
                                                            or self.head is None):
      raise KeyError('the exits\' heads: aux needs step_logits, step_ce, or step_h and head')
    self.tiles = int(tiles)

  @classmethod
  def of(cls, aux: Mapping[str, jax.Array]) -> 'ExitHeads':
    """aux['exit_heads'] when the caller built one (training: with model.loss_tiles)."""
    heads = aux.get('exit_heads')
    return heads if isinstance(heads, ExitHeads) else cls(aux)

  def _stats(self, steps, targets_BL=None, distill: bool = False,
             argmax: bool = False) -> dict:
    h = self.h_NBLD[np.asarray(steps)]
    tgt = jnp.zeros(h.shape[1:3], jnp.int32) if targets_BL is None else targets_BL
    return token_stats(self.head, h, tgt, self.tiles,
                       ref_BLD=self.h_NBLD[-1] if distill else None, argmax=argmax)

  def ce(self, targets_BL: jax.Array, steps) -> jax.Array:
    """f32 [X,B,L]: cross-entropy of each of `steps`' heads."""
    if self.logits_NBLV is not None:
      return per_step_ce(self.logits_NBLV[np.asarray(steps)], targets_BL)
    if self.ce_NBL is not None:  # computed in the depth scan against these same targets
      return self.ce_NBL[np.asarray(steps)]
    return self._stats(steps, targets_BL)['ce']

  def distill_kl(self, steps) -> jax.Array:
    """f32 [X,B,L]: KL(p_{N-1} || p_x) per token, the last step's distribution held fixed."""
    if self.h_NBLD is None and self.logits_NBLV is None:
      raise ValueError('self-distillation needs the exits\' states (the model keeps them '
                       'when halting.distill > 0)')
    if self.logits_NBLV is not None:
      logits = self.logits_NBLV.astype(jnp.float32)
      logp_last = jax.lax.stop_gradient(jax.nn.log_softmax(logits[-1], -1))
      logp_XBLV = jax.nn.log_softmax(logits[np.asarray(steps)], -1)
      return (jnp.exp(logp_last) * (logp_last - logp_XBLV)).sum(-1)
    return self._stats(steps, distill=True)['kl']

  def argmax(self, steps) -> jax.Array:
    """int [X,B,L]: each of `steps`' predicted token (no gradient)."""
    if self.logits_NBLV is not None:
      return jnp.argmax(jax.lax.stop_gradient(self.logits_NBLV[np.asarray(steps)]), axis=-1)
    if self.argmax_NBL is not None:
      return self.argmax_NBL[np.asarray(steps)]
    return self._stats(steps, argmax=True)['argmax']


def step_logits(aux: Mapping[str, jax.Array]) -> jax.Array:
  """[N,B,L,V] every step's exit logits, materialised (analysis and tests only: training
  never builds them)."""
  if 'step_logits' in aux:
    return aux['step_logits']
  return jax.vmap(lambda h: head_logits(aux['head'], h))(aux['step_h'])


# ---------------------------------------------------------------- reference driver

BlockFn = Callable[[jax.Array, jax.Array], jax.Array]  # (h_BLD, i) -> h_BLD
SignalFn = Callable[[jax.Array, jax.Array], dict]  # (h_new_BLD, i) -> signals


def drive(policy: HaltingPolicy, h0_BLD: jax.Array, block_fn: BlockFn, signal_fn: SignalFn,
          threshold: float | jax.Array | None = None, train: bool = False,
          running_BL: jax.Array | None = None) -> tuple[jax.Array, Aux]:
  """The model's depth loop as a lax.scan (reference for tests; the model has its own).

  block_fn(h_BLD, i) -> h_BLD is the shared block; signal_fn(h_new_BLD, i) -> dict supplies
  what the policy needs ('halt_logit', 'exit_logits', 'exit_classifier_logit', 'uniform').
  running_BL: initial running mask (False for padding), default all True.
  Returns (h_out_BLD, aux) with the policy's aux plus 'num_layers' int32 [B,L] (steps a token
  ran) and, when the policy needs exit logits, 'step_logits' [N,B,L,V].
  """
  B, L = h0_BLD.shape[:2]
  thr = policy.default_threshold() if threshold is None else threshold
  thr_N = threshold_per_step(thr, policy.num_steps)
  run0_BL = jnp.ones((B, L), bool) if running_BL is None else jnp.asarray(running_BL, bool)

  def body(carry, i):
    state, h_prev, running, layers = carry
    h_new = block_fn(h_prev, i)
    h_new = jnp.where(running[..., None], h_new, h_prev)  # freeze stopped tokens
    signals = signal_fn(h_new, i)
    state, run_next, out = policy.step(state, h_prev, h_new, signals, i,
                                       threshold_at(thr_N, i), running, train)
    layers = layers + running.astype(jnp.int32)
    logits = signals.get('exit_logits') if policy.needs_exit_logits else None
    return (state, h_new, running & run_next, layers), (out, logits)

  carry0 = (policy.init(h0_BLD), h0_BLD, run0_BL, jnp.zeros((B, L), jnp.int32))
  steps = jnp.arange(policy.num_steps, dtype=jnp.int32)
  (state, h_last, _, layers), (outs, logits) = jax.lax.scan(body, carry0, steps)
  h_out, aux = policy.finalize(state, h_last, outs)
  aux = dict(aux)
  aux['num_layers'] = layers
  if logits is not None:
    aux['step_logits'] = logits
  return h_out, aux


# ---------------------------------------------------------------- early-exit family

class EarlyExitPolicy(HaltingPolicy):
  """Shared logic of confidence (CALM) and learned_exit: exit at the first exit step whose
  per-token score ≥ threshold; training runs all steps and uses the weighted per-exit CE.

  Subclasses define `score_key` and `score(...) -> (score_BL f32, extra step outputs)`.
  halting.distill > 0 adds distill · exit_distill_kl (exits imitate full depth).
  Step i's threshold is a scalar or [B,1] per row (exit-aware training); a max-layers cap is
  -inf at the cap step (spec.OperatingPoint.vector).
  aux: 'exit_step', 'criterion_step' (first exit step meeting the criterion, else N−1; in
  training, where every step runs, this is the depth the token WOULD have used), score_key [N,B,L].
  """

  needs_exit_logits = True  # the weighted per-exit CE needs every step's logits
  can_exit = True
  can_cap_depth = True
  output_is_exit_head = True
  can_draft = True
  supports_exit_aware = True
  supports_distill = True
  score_key: ClassVar[str] = 'score'

  def __init__(self, cfg: HaltingSpec, num_steps: int):
    super().__init__(cfg, num_steps)
    self.exit_every = int(cfg.exit_every)
    self.exit_weights = str(cfg.exit_weights)
    self.distill = float(cfg.distill)

  def exit_steps(self) -> tuple[int, ...]:
    """0-based steps i with (i+1) % exit_every == 0, plus the last step (always an exit)."""
    k = max(self.exit_every, 1)
    steps = {i for i in range(self.num_steps) if (i + 1) % k == 0}
    steps.add(self.num_steps - 1)
    return tuple(sorted(steps))

  def score(self, h_prev_BLD: jax.Array, h_new_BLD: jax.Array,
            signals: Mapping[str, jax.Array]) -> tuple[jax.Array, StepOut]:
    raise NotImplementedError

  def init(self, h_BLD: jax.Array) -> State:
    B, L = h_BLD.shape[:2]
    return {
        'exit_step': jnp.zeros((B, L), jnp.int32),
        'criterion_step': jnp.full((B, L), self.num_steps - 1, jnp.int32),
        'met': jnp.zeros((B, L), bool),
    }

  def step(self, state: State, h_prev_BLD: jax.Array, h_new_BLD: jax.Array,
           signals: Mapping[str, jax.Array], i: jax.Array, threshold: jax.Array,
           running_BL: jax.Array, train: bool) -> tuple[State, jax.Array, StepOut]:
    score_BL, extra = self.score(h_prev_BLD, h_new_BLD, signals)
    score_BL = jax.lax.stop_gradient(score_BL.astype(jnp.float32))  # a decision, not a loss
    if self.per_sequence:
      score_BL = pool_min_over_row(score_BL, running_BL)
    threshold = jnp.asarray(threshold, jnp.float32)
    crit_BL = self.exit_mask_N()[i] & (score_BL >= threshold)
    last = self.is_last(i)
    if train:
      halt_BL = running_BL & last  # every exit's loss is needed
    else:
      halt_BL = running_BL & (crit_BL | last)
    running_next_BL = running_BL & ~halt_BL
    first_BL = running_BL & crit_BL & ~state['met']
    new_state = {
        'exit_step': record_exit(state['exit_step'], running_BL, running_next_BL, i),
        'criterion_step': jnp.where(first_BL, jnp.asarray(i, jnp.int32), state['criterion_step']),
        'met': state['met'] | (running_BL & crit_BL),
    }
    out = {self.score_key: jnp.where(running_BL, score_BL, 0.0)}
    out.update({k: jnp.where(running_BL, v, 0.0) for k, v in extra.items()})
    return new_state, running_next_BL, out

  def finalize(self, state: State, h_last_BLD: jax.Array,
               step_outs: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
    aux = {'exit_step': state['exit_step'], 'criterion_step': state['criterion_step']}
    aux.update(step_outs)
    return h_last_BLD, aux

  def loss_terms(self, aux: Mapping[str, jax.Array], targets_BL: jax.Array,
                 weights_BL: jax.Array) -> tuple[jax.Array | None, dict[str, jax.Array]]:
    heads = ExitHeads.of(aux)
    task = weighted_exit_ce(heads.ce(targets_BL, self.exit_steps()), weights_BL,
                            self.exit_steps(), self.exit_weights)
    if self.distill <= 0:
      return task, {}
    early = tuple(s for s in self.exit_steps() if s != self.num_steps - 1)
    return task, {'exit_distill': self.distill * _mean_distill(heads, weights_BL, early)}
