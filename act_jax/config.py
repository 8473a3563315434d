"""The one table of defaults, and the boundary: validate(config), resolve(config) -> Spec.

Configs are ml_collections.ConfigDicts built by `experiments/configs/*.py:get_config(arg)`
on top of `default_config()` — the only defaults table of the library. A config (or a
config.json read back, whose missing fields take these defaults) goes through `resolve`
once: it checks every field before anything is traced or compiled (ConfigError naming the
field, the value and what is allowed), derives every fact (act_jax.spec) and builds the
halting policy. Everything past this file takes the Spec.

Variants are chosen by registered name: `config.halting.name` (act_jax.model.halting.POLICIES),
`config.moe.router` (act_jax.model.moe.ROUTERS), `config.data.name` (act_jax.data.KNOWN_NAMES).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np

from act_jax import data as data_lib
from act_jax.model import halting as halting_lib
from act_jax.model import moe as moe_lib
from act_jax.model.moe import fallback as moe_fallback
from act_jax.model import quant as quant_lib
from act_jax.model import step_cell as step_cell_lib
from act_jax.errors import ConfigError
from act_jax.spec import (DataSpec, HaltingSpec, MeshSpec, MoESpec, ModelSpec, Spec,
                          TrainSpec)

DTYPES = ('float32', 'bfloat16')
# model.kind: the byte-token transformer, or a registered step cell (model/step_cell.py)
MODEL_KINDS = ('transformer',) + tuple(step_cell_lib.STEP_CELLS)
REMAT_POLICIES = ('none', 'full', 'dots')
NONFINITE_ACTIONS = ('abort', 'skip')


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name='stdlib', files='', seq_len=128, batch_size=16, heldout_fraction=0.1,
      max_bytes=4_000_000, code_fraction=0.5, num_bits=16, max_digits=6, num_nodes=8,
      max_hops=6, train_max_difficulty=0))
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=260, d_model=128, num_heads=4, head_dim=0, d_ff=384, num_layers=6,
      causal=True, share_weights=False, tie_embeddings=True, max_len=0, rope_base=10000.0,
      dtype='float32', param_dtype='float32', remat='none', group_size=0, scan_unroll=1,
      layer_dropout=0.0, loss_tiles=1, kind='transformer', inject_input=False))
  # bias_init negative: with b >= 0 ACT halts every token after ~2 steps at init
  c.halting = ml_collections.ConfigDict(dict(
      name='none', threshold=0.9, eps=0.01, bias_init=-2.0, ponder_cost=0.01, beta=0.01,
      lambda_p=0.2, exit_every=1, exit_weights='linear', criterion='softmax',
      per_sequence=False, mod_capacity=0.5, classifier_loss_weight=1.0, sample=False,
      exit_aware=0.0, distill=0.0, cost_warmup=0, where_supported=''))
  # moe.renormalize: top_k weight p_e / sum of the K chosen p; ignored for top_k=1, whose
  # weight stays p_e (Switch: p_e / p_e = 1 gives the router no task-loss gradient).
  # moe.fallback (none | max_prob | entropy): tokens whose router confidence is below
  # moe.fallback_threshold go to the shared expert alone (act_jax/model/moe/fallback.py).
  # moe.soft_normalize (router=soft): Soft MoE's published logits, scale * <x/|x|, phi/|phi|>
  # with a learned scalar scale (Puigcerver et al. 2023, sec. 2.3); False = x phi.
  c.moe = ml_collections.ConfigDict(dict(
      router='none', num_experts=8, top_k=2, capacity_factor=1.25, every=2, shared_experts=0,
      d_ff=0, dispatch='gather', renormalize=True, priority='position', group_size=0,
      jitter=0.0, lb_loss_weight=0.01, z_loss_weight=0.001, bias_rate=0.0, num_slots=1,
      fallback='none', fallback_threshold=0.0, soft_normalize=False))
  # Mesh axes (act_jax/scale/sharding.py): data parallel, FSDP (batch + every weight's d_model
  # split), expert parallel, tensor parallel. data * fsdp * expert * model = device count;
  # one axis may be -1: it takes the devices the others leave.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, model=1))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, lr=3e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.01, b1=0.9,
      b2=0.95, clip_norm=1.0, log_every=25, eval_every=250, eval_batches=8,
      checkpoint_every=250, keep_checkpoints=2, async_checkpointing=True,
      nonfinite='abort', multihost=False, max_seconds=0.0, certify_tolerance=0.0))
  # Quantization (act_jax/model/quant.py): a weight scheme here trains with QAT; experiments.quantize
  # writes stored=True runs. Routers, halting units, exit heads and norms stay float32 unless
  # gates=True.
  c.quant = ml_collections.ConfigDict(dict(
      scheme='none', stored=False, experts_only=False, gates=False, tile=32, bits=''))
  return c


def parse_arg(arg: str | None) -> dict[str, Any]:
  """'halting=act,router=top_k,runlocal' -> {'halting': 'act', 'router': 'top_k', 'runlocal': True}."""
  out: dict[str, Any] = {}
  for part in (arg or '').split(','):
    part = part.strip()
    if not part:
      continue
    if '=' in part:
      k, v = part.split('=', 1)
      out[k.strip()] = v.strip()
    else:
      out[part] = True
  return out


def _require(cond: bool, field: str, value: Any, allowed: str) -> None:
  if not cond:
    raise ConfigError(f'{field}={value!r}: {allowed}')


def _pos_int(c, field: str) -> None:
  v = _get(c, field)
  _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, field, v,
           'must be a positive integer')


def _get(c, field: str) -> Any:
  node = c
  for part in field.split('.'):
    node = node[part]
  return node


def _layer_kinds(config) -> tuple[str, ...]:
  """Kinds of the layers in one scan step ('dense' | 'moe'); the stack repeats this group."""
  m = config.model
  if not moe_lib.ROUTERS[config.moe.router].routed:
    return ('dense',) * (m.group_size or 1)
  every = config.moe.every
  size = m.group_size or every
  return tuple('moe' if (i + 1) % every == 0 else 'dense' for i in range(size))


def complete(config: Any) -> ml_collections.ConfigDict:
  """default_config() updated with config's fields (a ConfigDict or a dict, e.g. a
  config.json of an older version that lacks newer fields); unknown fields are refused."""
  raw = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  merged = default_config().to_dict()
  for key, val in raw.items():
    if key not in merged:
      raise ConfigError(f'{key}={val!r}: unknown config field; known: {", ".join(merged)}')
    if isinstance(merged[key], dict):
      if not isinstance(val, Mapping):
        raise ConfigError(f'{key}={val!r}: must be a section with fields '
                          f'{", ".join(merged[key])}')
      for f, v in val.items():
        if f not in merged[key]:
          raise ConfigError(f'{key}.{f}={v!r}: unknown field; known: '
                            f'{", ".join(merged[key])}')
        merged[key][f] = v
    else:
      merged[key] = val
  return ml_collections.ConfigDict(merged)


def _section(cls: type, values: Mapping[str, Any], **derived: Any) -> Any:
  """cls(**values) with ints given to float fields made floats (1 and 1.0 resolve alike)."""
  kw = dict(values)
  for f in dataclasses.fields(cls):
    v = kw.get(f.name)
    if f.type == 'float' and isinstance(v, (int, np.integer)) and not isinstance(v, bool):
      kw[f.name] = float(v)
  kw.update(derived)
  return cls(**kw)


# Recipe options only some policies support: halting field -> the policy capability it needs.
# A config may list them in halting.where_supported (lm.py does, for exit_aware and distill):
# they then apply where the chosen policy supports them and are off elsewhere, so every
# policy stays one flag away (--config.halting.name=act). Set explicitly on the command line
# (honour_explicit), an unsupported combination is refused by name as before.
WHERE_SUPPORTED = {'exit_aware': 'supports_exit_aware', 'distill': 'supports_distill'}


def _where_supported_names(halting: Any) -> list[str]:
  raw = halting.where_supported if hasattr(halting, 'where_supported') else ''
  if not isinstance(raw, str):
    raise ConfigError(f'halting.where_supported={raw!r}: must be a comma-separated string of '
                      f'{", ".join(WHERE_SUPPORTED)}')
  names = [n.strip() for n in raw.split(',') if n.strip()]
  for n in names:
    if n not in WHERE_SUPPORTED:
      raise ConfigError(f'halting.where_supported={raw!r}: {n!r} is not a policy-dependent '
                        f'option; known: {", ".join(WHERE_SUPPORTED)}')
  return names


def where_supported_values(halting: Any) -> dict[str, Any]:
  """config.halting as a dict, with each where_supported field set to 0 when the named
  policy lacks its capability (an unknown policy name is left for make_policy to refuse)."""
  values = halting.to_dict()
  policy = halting_lib.POLICIES.get(values['name'])
  for n in _where_supported_names(halting):
    if policy is not None and not getattr(policy, WHERE_SUPPORTED[n]):
      values[n] = type(values[n])(0)
  return values


def where_supported_note(spec: Spec) -> str:
  """One line for a run's header: which policy-dependent options apply to this policy."""
  names = _where_supported_names(spec.halting)
  if not names:
    return ''
  policy = halting_lib.POLICIES[spec.halting.name]
  parts = [f'{n}={getattr(spec.halting, n):g}' if getattr(policy, WHERE_SUPPORTED[n]) else
           f'{n} off ({spec.halting.name} does not support it)' for n in names]
  return 'where supported: ' + ', '.join(parts)


def honour_explicit(config: Any, argv: Sequence[str]) -> Any:
  """config with every halting field the user set on the command line
  (--config.halting.FIELD=...) taken out of halting.where_supported: what a user asks for
  by name is applied or refused, never silently dropped."""
  given = {a.split('=', 1)[0][len('--config.halting.'):] for a in argv
           if a.startswith('--config.halting.')}
  names = _where_supported_names(config.halting)
  keep = [n for n in names if n not in given]
  if keep != names:
    config.halting.where_supported = ','.join(keep)
  return config


def resolve(config: Any, device_count: Optional[int] = None) -> Spec:
  """Validates `config` (see validate) and returns its Spec: every derived fact computed
  here, once, and the halting policy built. device_count resolves mesh.data=-1 (default:
  jax.device_count())."""
  c = complete(config)
  _check(c)
  n = device_count if device_count is not None else jax.device_count()
  mesh = mesh_shape(c.mesh, n)
  kinds = _layer_kinds(c)
  m = c.model
  model = _section(ModelSpec, {**m.to_dict(), 'head_dim': m.head_dim or m.d_model // m.num_heads,
                               'max_len': m.max_len or c.data.seq_len,
                               'group_size': len(kinds)},
                   layer_kinds=kinds, num_steps=m.num_layers // len(kinds))
  _require(model.head_dim % 2 == 0 or model.kind in step_cell_lib.STEP_CELLS,
           'model.head_dim', model.head_dim, 'must be even (RoPE rotates feature pairs)')
  moe_values = {**c.moe.to_dict(), 'd_ff': c.moe.d_ff or m.d_ff}
  moe = _section(MoESpec, moe_values)
  if moe_lib.ROUTERS[moe.router].routed:
    moe_lib.validate_moe(moe, d_model=m.d_model, causal=m.causal, mesh_expert=mesh[2])
    _require(not (m.causal and moe.priority == 'probability'), 'moe.priority', moe.priority,
             "'probability' ranks tokens by the whole group's router scores, which leaks "
             "future tokens in a causal model; use 'position'")
  else:  # a dense model has no router to be unsure: moe.fallback must stay 'none'
    moe_fallback.validate(moe, moe_lib.ROUTERS[moe.router])
  _check_layout(model, moe, mesh)
  halting = _section(HaltingSpec, where_supported_values(c.halting))
  policy = halting_lib.make_policy(halting, model.num_steps)  # validates config.halting
  return Spec(seed=int(c.seed), model=model, halting=halting, moe=moe,
              data=_section(DataSpec, c.data.to_dict()),
              train=_section(TrainSpec, c.train.to_dict()),
              mesh=MeshSpec(*mesh), quant=quant_lib.resolve(c.quant, model, moe),
              policy=policy,
              exit_layers=tuple((s + 1) * model.group_size for s in policy.exit_steps()),
              capped_policies=tuple(sorted(k for k, v in halting_lib.POLICIES.items()
                                           if v.can_cap_depth)))


def check_training(spec: Spec) -> None:
  """What a training run needs beyond a valid model: a task the model can learn (a causal LM
  task needs a causal model) and a batch that splits over the mesh."""
  if spec.data.name in data_lib.CAUSAL_ONLY:
    _require(spec.model.causal, 'model.causal', spec.model.causal,
             f'data.name={spec.data.name!r} is a causal LM task; needs model.causal=True')
  _require(not spec.quant.stored, 'quant.stored', spec.quant.stored,
           'this run holds quantized weights (experiments.quantize wrote it) and cannot be '
           'trained; train the float run, with quant.scheme=w8|w4 for quantization-aware '
           'training')
  split = spec.mesh.data * spec.mesh.fsdp * spec.mesh.expert
  _require(spec.data.batch_size % split == 0, 'data.batch_size', spec.data.batch_size,
           f'must be divisible by mesh.data*mesh.fsdp*mesh.expert ({split}): the batch is '
           f'split over all three')


def validate(config: Any, device_count: Optional[int] = None) -> Spec:
  """Rejects impossible configs with a ConfigError naming the field, before any compile:
  resolve (every field, the model, the policy, the mesh) plus check_training. Returns the
  spec. Model-only uses (a model in a notebook, inference) need only resolve."""
  spec = resolve(config, device_count)
  check_training(spec)
  return spec


def as_spec(config_or_spec: Any, device_count: Optional[int] = None) -> Spec:
  """A Spec as it is; a config resolved (for library entry points that accept either)."""
  if isinstance(config_or_spec, Spec):
    return config_or_spec
  return resolve(config_or_spec, device_count)


def halting_spec(**overrides: Any) -> HaltingSpec:
  """The default config.halting with overrides, as a HaltingSpec (not validated: tests and
  notebooks build policies from it with halting.make_policy, which validates)."""
  return HaltingSpec(**{**default_config().halting.to_dict(), **overrides})


def moe_spec(**overrides: Any) -> MoESpec:
  """The default config.moe with overrides, as a MoESpec (validate with moe.validate_moe)."""
  return MoESpec(**{**default_config().moe.to_dict(), **overrides})


def data_spec(**overrides: Any) -> DataSpec:
  """The default config.data with overrides, as a DataSpec (make_dataset validates it)."""
  return DataSpec(**{**default_config().data.to_dict(), **overrides})


def _check(config: ml_collections.ConfigDict) -> None:
  """Field checks of a complete config (resolve runs them; each names its field)."""
  m, t = config.model, config.train
  for f in ('model.d_model', 'model.num_heads', 'model.d_ff', 'model.num_layers',
            'model.vocab_size', 'train.steps', 'train.log_every', 'train.eval_every',
            'train.eval_batches', 'train.checkpoint_every', 'train.keep_checkpoints'):
    _pos_int(config, f)
  _require(isinstance(m.head_dim, int) and m.head_dim >= 0, 'model.head_dim', m.head_dim,
           'must be 0 (= d_model/num_heads) or a positive integer')
  if m.head_dim == 0 and m.kind not in step_cell_lib.STEP_CELLS:  # attention heads only
    _require(m.d_model % m.num_heads == 0, 'model.num_heads', m.num_heads,
             f'must divide model.d_model={m.d_model} (or set model.head_dim)')
  _require(m.dtype in DTYPES, 'model.dtype', m.dtype, f'allowed: {", ".join(DTYPES)}')
  _require(m.param_dtype in DTYPES, 'model.param_dtype', m.param_dtype,
           f'allowed: {", ".join(DTYPES)}')
  _require(m.remat in REMAT_POLICIES, 'model.remat', m.remat,
           f'allowed: {", ".join(REMAT_POLICIES)}')
  _require(isinstance(m.max_len, int) and m.max_len >= 0, 'model.max_len', m.max_len,
           'must be 0 (= data.seq_len) or a positive integer')
  _require(m.max_len == 0 or m.max_len >= config.data.seq_len, 'model.max_len', m.max_len,
           f'must be >= data.seq_len={config.data.seq_len}')
  _require(m.rope_base > 0, 'model.rope_base', m.rope_base, 'must be > 0')
  # A looped transformer (Fan et al. 2024) re-reads its input with ONE shared block; with a
  # stack of distinct layers re-injection is a different model nobody reported.
  _require(not m.inject_input or (m.share_weights and m.kind == 'transformer'),
           'model.inject_input', m.inject_input,
           'needs model.share_weights=True and model.kind=\'transformer\' (a looped transformer)')
  _require(isinstance(m.scan_unroll, int) and m.scan_unroll >= 1, 'model.scan_unroll',
           m.scan_unroll, 'must be a positive integer (scan steps per loop iteration)')
  _require(isinstance(m.loss_tiles, int) and not isinstance(m.loss_tiles, bool)
           and m.loss_tiles >= 1, 'model.loss_tiles', m.loss_tiles,
           'must be a positive integer (length tiles of every head\'s cross-entropy in training; '
           '1: all positions at once)')
  _require(isinstance(m.group_size, int) and m.group_size >= 0, 'model.group_size',
           m.group_size, 'must be 0 (automatic) or a positive integer')
  _require(0 <= m.layer_dropout < 1, 'model.layer_dropout', m.layer_dropout,
           'must be in [0, 1) (the deepest step\'s drop rate; 0 = off)')
  _require(t.lr > 0, 'train.lr', t.lr, 'must be > 0')
  _require(0 <= t.min_lr_ratio <= 1, 'train.min_lr_ratio', t.min_lr_ratio, 'must be in [0, 1]')
  _require(isinstance(t.warmup_steps, int) and 0 <= t.warmup_steps <= t.steps,
           'train.warmup_steps', t.warmup_steps, f'must be in [0, train.steps={t.steps}]')
  _require(t.weight_decay >= 0, 'train.weight_decay', t.weight_decay, 'must be >= 0')
  _require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, 'train.b1/b2', (t.b1, t.b2), 'must be in [0, 1)')
  _require(t.clip_norm > 0, 'train.clip_norm', t.clip_norm, 'must be > 0')
  _require(t.nonfinite in NONFINITE_ACTIONS, 'train.nonfinite', t.nonfinite,
           f'allowed: {", ".join(NONFINITE_ACTIONS)}')
  _require(t.max_seconds >= 0, 'train.max_seconds', t.max_seconds, 'must be >= 0 (0 = no limit)')
  _require(0 <= t.certify_tolerance < 1, 'train.certify_tolerance', t.certify_tolerance,
           'must be in [0, 1) (a relative accuracy drop; 0 = no certification after training)')
  # Components by registered name.
  _require(config.moe.router in moe_lib.ROUTERS, 'moe.router', config.moe.router,
           f'unknown router; known: {", ".join(sorted(moe_lib.ROUTERS))}')
  _require(config.halting.name in halting_lib.POLICIES, 'halting.name', config.halting.name,
           f'unknown policy; known: {", ".join(sorted(halting_lib.POLICIES))}')
  _require(isinstance(config.seed, (int, np.integer)) and not isinstance(config.seed, bool)
           and config.seed >= 0, 'seed', config.seed, 'must be a non-negative integer')
  data_lib.validate(_section(DataSpec, config.data.to_dict()))
  ds_vocab = data_lib.VOCAB_SIZE
  _require(m.vocab_size >= ds_vocab, 'model.vocab_size', m.vocab_size,
           f'must be >= the data vocabulary ({ds_vocab})')
  if moe_lib.ROUTERS[config.moe.router].routed:
    _pos_int(config, 'moe.every')
    _require(m.group_size == 0 or m.group_size % config.moe.every == 0, 'model.group_size',
             m.group_size, f'must be a multiple of moe.every={config.moe.every}')
  _check_model_kind(config)
  kinds = _layer_kinds(config)
  _require(m.num_layers % len(kinds) == 0, 'model.num_layers', m.num_layers,
           f'must be a multiple of the scan group size {len(kinds)} '
           f'(moe.every / model.group_size)')


def _check_model_kind(config: ml_collections.ConfigDict) -> None:
  """model.kind is known; step cells run the vector tasks and only them, with a halting
  policy over steps and none of the transformer-only options."""
  m, kind = config.model, config.model.kind
  _require(kind in MODEL_KINDS, 'model.kind', kind, f'allowed: {", ".join(MODEL_KINDS)}')
  cell = kind in step_cell_lib.STEP_CELLS
  vector = config.data.name in data_lib.VECTOR_TASKS
  if vector and not cell:
    raise ConfigError(f'data.name={config.data.name!r} feeds float vectors to a step cell; '
                      f'set model.kind to one of {", ".join(step_cell_lib.STEP_CELLS)}')
  if not cell:
    return
  _require(vector, 'data.name', config.data.name,
           f'model.kind={kind!r} reads a ±1/0 vector; allowed: {", ".join(data_lib.VECTOR_TASKS)}')
  _require(not halting_lib.POLICIES[config.halting.name].gates_blocks, 'halting.name',
           config.halting.name, f'routes tokens of a sequence through blocks; model.kind='
           f'{kind!r} has one cell and one prediction per example')
  _require(not moe_lib.ROUTERS[config.moe.router].routed, 'moe.router', config.moe.router,
           f'model.kind={kind!r} has no FFN to route; allowed: none')
  _require(m.layer_dropout == 0, 'model.layer_dropout', m.layer_dropout,
           f'must be 0 with model.kind={kind!r} (a transformer option)')
  exit_aware = config.halting.exit_aware
  if 'exit_aware' in _where_supported_names(config.halting):
    exit_aware = where_supported_values(config.halting)['exit_aware']
  _require(exit_aware == 0, 'halting.exit_aware', exit_aware,
           f'must be 0 with model.kind={kind!r} (it shows exited tokens\' keys and values to '
           f'later tokens; a cell has no attention)')


def mesh_shape(mesh_cfg, n: int) -> tuple[int, int, int, int]:
  """(data, fsdp, expert, model) for n devices; one axis may be -1: it takes the devices the
  others leave (default: mesh.data)."""
  names = ('data', 'fsdp', 'expert', 'model')
  sizes = {k: mesh_cfg[k] for k in names}
  fill = [k for k, v in sizes.items() if v == -1]
  _require(len(fill) <= 1, 'mesh', sizes, 'at most one axis may be -1 (all remaining devices)')
  for k, v in sizes.items():
    if k not in fill:
      _require(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f'mesh.{k}', v,
               'must be a positive integer or -1 (all remaining devices)')
  rest = math.prod(v for k, v in sizes.items() if k not in fill)
  if fill:
    others = '*'.join(f'mesh.{k}' for k in names if k not in fill)
    _require(n % rest == 0, others, rest, f'must divide the device count {n}')
    sizes[fill[0]] = n // rest
  total = math.prod(sizes.values())
  _require(total == n, 'mesh', sizes,
           f'data*fsdp*expert*model={total} must equal the device count {n}')
  return tuple(sizes[k] for k in names)


def _check_layout(model: ModelSpec, moe: MoESpec, mesh: tuple[int, int, int, int]) -> None:
  """The dimensions the rule table (act_jax/scale/sharding.py) splits must divide by their axis."""
  _, fsdp, _, tp = mesh
  _require(model.d_model % fsdp == 0, 'mesh.fsdp', fsdp,
           f'must divide model.d_model={model.d_model} (FSDP splits every weight\'s d_model '
           f'dimension)')
  if tp > 1:
    sizes = {'model.num_heads': model.num_heads, 'model.d_ff': model.d_ff,
             'model.vocab_size': model.vocab_size, 'moe.d_ff': moe.d_ff}
    for field, v in sizes.items():
      _require(v % tp == 0, 'mesh.model', tp,
               f'must divide {field}={v} (tensor parallelism splits heads, FFN hidden units '
               f'and the vocabulary)')


def apply_common_args(config, args: dict[str, Any]) -> ml_collections.ConfigDict:
  """Shared ':arg' variants of every experiment config (halting=, router=, runlocal)."""
  if 'halting' in args:
    config.halting.name = args.pop('halting')
  if 'router' in args:
    config.moe.router = args.pop('router')
  if args.pop('runlocal', False):
    config.model.update(d_model=32, num_heads=2, d_ff=64, num_layers=4)
    config.data.update(seq_len=32, batch_size=4, max_bytes=200_000)
    config.train.update(steps=20, warmup_steps=2, log_every=5, eval_every=10, eval_batches=2,
                        checkpoint_every=10)
    config.moe.update(num_experts=4, d_ff=32 if config.moe.d_ff else 0)
  if args:
    raise ConfigError(f'unknown config arg(s) {sorted(args)}; known: halting=, router=, runlocal')
  return config
