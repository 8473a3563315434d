"""The resolved spec: every fact the library derives from a config, computed once.

A config (`ml_collections.ConfigDict`, built by `experiments/configs/*.py` on top of
`config.default_config()`, the one table of defaults) is the command-line and config.json
form. `config.resolve(config)` validates it and returns a `Spec`: frozen, hashable
dataclasses (usable as jit static arguments and cache keys) with the section names of the
config, the derived facts filled in (head dim, max length, layers per scan step, expert
hidden size, mesh shape) and the built halting policy. Modules, policies, inference,
calibration and the binaries take a Spec; nothing below the boundary reads a raw config.

An operating point is a value too (`OperatingPoint`: threshold + optional depth cap). The
model takes its threshold in one internal form, a per-step vector [N] (or [B, N] per row,
exit-aware training), made by `threshold_per_step`; a policy sees `threshold_at(thr, i)`.
Both live here, so the form is encoded and decoded in one file.

Dims: B batch, N depth steps (scan steps).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from act_jax.errors import ConfigError

NEVER_EXIT = 2.0  # above any probability: runs every layer through the same code path

_DERIVED = {'derived': True}  # metadata: computed by resolve, not a config field


def _derived(**kw):
  return dataclasses.field(metadata=_DERIVED, **kw)


def _raw_dict(section: Any) -> dict[str, Any]:
  return {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
          if not f.metadata.get('derived')}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """config.model with head_dim, max_len and group_size resolved (never 0 here)."""
  vocab_size: int
  d_model: int
  num_heads: int
  head_dim: int          # model.head_dim, else d_model // num_heads
  d_ff: int
  num_layers: int
  causal: bool
  share_weights: bool
  tie_embeddings: bool
  max_len: int           # model.max_len, else data.seq_len
  rope_base: float
  dtype: str
  param_dtype: str
  remat: str
  group_size: int        # layers per scan step (model.group_size, else moe.every or 1)
  scan_unroll: int       # depth-scan steps per loop iteration (XLA scheduling; 1 = rolled)
  layer_dropout: float   # LayerSkip: training drops step i per row w.p. p·(2^(i/(N-1)) - 1)
  loss_tiles: int        # length tiles of each head's training CE: one tile's logits at a time
  # 'transformer' (byte tokens) or a step cell of model/step_cell.py ('gru' | 'elman') that
  # reads a whole ±1/0 vector every step (the vector tasks, data.name='parity_vector')
  kind: str
  # looped transformer (Fan et al. 2024): step n >= 2 reads h_{n-1} + the input embedding
  inject_input: bool
  layer_kinds: tuple[str, ...] = _derived()  # 'dense' | 'moe' for the layers of one step
  num_steps: int = _derived()                 # scan steps (= halting steps) over depth


@dataclasses.dataclass(frozen=True)
class HaltingSpec:
  """config.halting, typed; the policy built from it is Spec.policy."""
  name: str
  threshold: float
  eps: float
  bias_init: float
  ponder_cost: float
  beta: float
  lambda_p: float
  exit_every: int
  exit_weights: str
  criterion: str
  per_sequence: bool
  mod_capacity: float
  classifier_loss_weight: float
  sample: bool
  exit_aware: float
  distill: float
  cost_warmup: int  # steps over which the compute cost (ACT ponder, PonderNet KL) ramps 0 -> 1
  # comma-separated fields above whose value holds only for policies that support them
  # (config.WHERE_SUPPORTED); resolve sets them to 0 for the others
  where_supported: str = ''


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """config.moe with d_ff resolved (moe.d_ff, else model.d_ff)."""
  router: str
  num_experts: int
  top_k: int
  capacity_factor: float
  every: int
  shared_experts: int
  d_ff: int
  dispatch: str
  renormalize: bool
  priority: str
  group_size: int
  jitter: float
  lb_loss_weight: float
  z_loss_weight: float
  bias_rate: float
  num_slots: int
  fallback: str               # 'none' | 'max_prob' | 'entropy' (act_jax/model/moe/fallback.py)
  fallback_threshold: float   # fall back when the router confidence is below it
  soft_normalize: bool = False  # Soft MoE: l2-normalised inputs and slot params, learned scale


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """config.data (see act_jax.data for the datasets)."""
  name: str
  files: str
  seq_len: int
  batch_size: int
  heldout_fraction: float
  max_bytes: int
  code_fraction: float
  num_bits: int
  max_digits: int
  num_nodes: int
  max_hops: int
  # synthetic tasks: train on difficulty 1..train_max_difficulty (0: the whole range);
  # evaluation always spans the whole range, so the rest is the extrapolation split
  train_max_difficulty: int


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """config.train."""
  steps: int
  lr: float
  min_lr_ratio: float
  warmup_steps: int
  weight_decay: float
  b1: float
  b2: float
  clip_norm: float
  log_every: int
  eval_every: int
  eval_batches: int
  checkpoint_every: int
  keep_checkpoints: int
  async_checkpointing: bool
  nonfinite: str
  multihost: bool
  max_seconds: float
  # > 0: after training, certify the early-exit threshold whose held-out accuracy drops at
  # most this much (relative) vs full depth (calibrate/certify.py, train_and_certify)
  certify_tolerance: float


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """config.mesh with data=-1 resolved against the device count."""
  data: int
  fsdp: int
  expert: int
  model: int

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """In act_jax.scale.sharding.MESH_AXES order."""
    return (self.data, self.fsdp, self.expert, self.model)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """config.quant (act_jax/model/quant.py). scheme 'none' = float32. With stored=False a weight
  scheme (w8, w4) trains with quantization-aware training (the checkpoint keeps float master
  weights); stored=True (written by experiments.quantize) = the params hold qwix QArrays."""
  scheme: str         # 'none' | 'w8' | 'w4' | 'w8a8' | 'auto'
  stored: bool        # weights stored quantized (a PTQ run); False: float (QAT when scheme set)
  experts_only: bool  # quantize only expert weights (routed + shared), not attention/dense MLP
  gates: bool         # also quantize routers, halting units, exit classifiers, unembedding
  tile: int           # 4-bit weights: one scale per `tile` contraction entries (0: per channel)
  # scheme 'auto' (written by experiments.quantize): bits per unit, 'unit=b,b,..;unit=..'
  # with units 'layer_j/moe' (one entry per (step, routed expert)) and 'layer_j/shared',
  # 'layer_j/attn', 'layer_j/mlp' (one per step)
  bits: str


@dataclasses.dataclass(frozen=True)
class RetrievalSpec:
  """The retrieval arm at inference (act_jax/retrieval; not a config section: a datastore is
  attached to a trained run with --datastore). Static facts only: the datastore's arrays, the
  interpolation weight, kNN temperature and gate threshold are traced values, so moving
  them never recompiles."""
  mode: str                  # 'never' | 'always' | 'gate' (retrieval.MODES)
  steps: tuple[int, ...]     # depth steps that may retrieve (the datastore's key steps)
  neighbours: int            # O nearest neighbours per retrieval
  approx: bool               # jax.lax.approx_max_k per block instead of exact top_k
  recall_target: float       # approx_max_k's recall target
  block: int = 8192          # datastore entries scored per search block
  mesh: Any = None           # a Mesh whose 'data' axis splits the entries (knn.sharded_search)


SECTIONS = {'model': ModelSpec, 'halting': HaltingSpec, 'moe': MoESpec, 'data': DataSpec,
            'train': TrainSpec, 'mesh': MeshSpec, 'quant': QuantSpec}


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
  """Where a trained early-exit model runs: exit threshold and an optional depth cap.

  threshold: a token exits when its policy's score reaches it (NEVER_EXIT: full depth).
  max_layers: tokens still running exit after this layer (an exit layer; None: no cap).
  `vector(spec)` is its one encoded form, the model's per-step threshold [N]: the threshold
  at every step and -inf at the cap step. Values are traced, so moving the operating point
  never recompiles."""
  threshold: float
  max_layers: Optional[int] = None

  @classmethod
  def full_depth(cls) -> 'OperatingPoint':
    return cls(NEVER_EXIT)

  @property
  def label(self) -> str:
    """How tables and logs name it: 'full depth', '0.6', '0.4 cap 4'."""
    if self.threshold >= NEVER_EXIT and self.max_layers is None:
      return 'full depth'
    return f'{self.threshold:g}' + ('' if self.max_layers is None else f' cap {self.max_layers}')

  def validate(self, spec: 'Spec', name: str = 'threshold',
               cap_name: str = 'max_layers') -> 'OperatingPoint':
    """Raises ConfigError for a threshold outside (0, 1] or a cap that is not an exit layer
    of a policy that can be capped, naming them as the user gave them; returns self."""
    t = self.threshold
    if isinstance(t, bool) or not isinstance(t, (int, float, np.number)) or \
        not (0.0 < float(t) <= 1.0 or float(t) == NEVER_EXIT):
      raise ConfigError(f'{name}={t!r}: must be in (0, 1]')
    cap = self.max_layers
    if cap is None or cap == spec.model.num_layers:
      return self
    if not spec.policy.can_cap_depth:
      raise ConfigError(f'{cap_name}={cap}: a layer cap needs an early-exit policy that '
                        f'accepts one ({", ".join(spec.capped_policies)}); '
                        f'halting.name={spec.halting.name!r}')
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or \
        cap not in spec.exit_layers:
      raise ConfigError(f'{cap_name}={cap!r}: must be an exit layer of this model, one of '
                        f'{list(spec.exit_layers)} (depth {spec.model.num_layers}, '
                        f'{spec.model.group_size} layer(s) per step)')
    return self

  def vector(self, spec: 'Spec') -> jax.Array:
    """f32 [N]: the threshold per step, -inf at the cap step (validated first)."""
    self.validate(spec)
    vec = np.full((spec.model.num_steps,), float(self.threshold), np.float32)
    if self.max_layers is not None and self.max_layers != spec.model.num_layers:
      vec[self.max_layers // spec.model.group_size - 1] = -np.inf
    return jnp.asarray(vec)


def threshold_per_step(threshold: Any, num_steps: int) -> jax.Array:
  """The model's threshold argument in its internal form: f32 [N], or [B, N] per row.

  Accepts a scalar (every step), a per-step vector [N] (OperatingPoint.vector), or a per-row
  [B, 1] / [B, N] array (exit-aware training draws one threshold per row)."""
  t = jnp.asarray(threshold, jnp.float32)
  if t.ndim == 0:
    return jnp.full((num_steps,), t)
  if t.ndim == 1:
    if t.shape[0] != num_steps:
      raise ConfigError(f'threshold vector of length {t.shape[0]}: must have one entry per '
                        f'depth step ({num_steps})')
    return t
  if t.ndim == 2 and t.shape[1] in (1, num_steps):
    return jnp.broadcast_to(t, (t.shape[0], num_steps))
  raise ConfigError(f'threshold of shape {t.shape}: must be a scalar, [N], [B, 1] or [B, N] '
                    f'(N = {num_steps} depth steps)')


def threshold_at(threshold_N: jax.Array, i: jax.Array) -> jax.Array:
  """Step i's threshold from the per-step form: a scalar, or [B, 1] per row."""
  if threshold_N.ndim == 1:
    return threshold_N[i]
  return jax.lax.dynamic_index_in_dim(threshold_N, i, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Spec:
  """One run, resolved. Section names follow the config; derived facts are attributes."""
  seed: int
  model: ModelSpec
  halting: HaltingSpec
  moe: MoESpec
  data: DataSpec
  train: TrainSpec
  mesh: MeshSpec
  quant: QuantSpec
  policy: Any                      # the built halting policy (hashable, see HaltingPolicy)
  exit_layers: tuple[int, ...]     # 1-based layer after which each exit step's tokens leave
  capped_policies: tuple[str, ...]  # registered policies that accept a depth cap (messages)
  retrieval: Optional[RetrievalSpec] = None  # inference with a datastore (act_jax.retrieval)

  @property
  def default_operating_point(self) -> OperatingPoint:
    """The policy's own default (ACT: 1 − ε; others: halting.threshold), no cap. A run's
    calibrated point, when it has one, is operating_point.run_operating_point's answer."""
    return OperatingPoint(float(self.policy.default_threshold()))

  def to_dict(self) -> dict[str, Any]:
    """The config.json form: every config field (derived values resolved, mesh as used)."""
    out: dict[str, Any] = {'seed': self.seed}
    for name in SECTIONS:
      out[name] = _raw_dict(getattr(self, name))
    return out


__all__ = ['DataSpec', 'HaltingSpec', 'MeshSpec', 'MoESpec', 'ModelSpec', 'NEVER_EXIT',
           'OperatingPoint', 'QuantSpec', 'RetrievalSpec', 'SECTIONS', 'Spec', 'TrainSpec', 'threshold_at',
           'threshold_per_step']
