"""Quantization adapted to the gated architecture: int8 / int4 weights (qwix), float gates.

Numbers (symmetric absmax, qwix's convention; Jacob et al. 2018, "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference"). For b bits the grid is
the integers [-2^(b-1), 2^(b-1) - 1] and the bound is B = 2^(b-1) - 1/2 (qwix widens the top
bucket by half a step). One scale per output channel -- every axis that is not contracted,
including the stacked step axis N and the expert axis E -- and, for 4-bit weights, per
`quant.tile` entries of the contraction axis (subchannel):
    s = max |W| over the scale's entries / B,    q = clip(round(W / s)),    W^ = s q,
so |W - W^| <= s / 2 for every entry (the known answer in tests/test_quant.py).
w8a8 also quantizes the matmul's activation x per token (dynamic range, int8) and multiplies
int8 x int8 with int32 accumulation (LLM.int8 without the outlier split, Dettmers et al.
2022): y = s_x s_w (q_x q_w).

Which weights (ROLES, by parameter path): 'expert' (routed experts, shared experts), 'layer'
(attention q/k/v/o, dense FFNs) and 'gate' (MoE routers, the Soft-MoE slot projection,
halting units, exit classifiers, MoD routers and the unembedding -- the exit head of
confidence exits). Gates stay float32 unless quant.gates: quantizing them moves exit
confidences (a certified threshold stops holding) and flips router choices; they are a
small share of the bytes. With quant.gates they are stored quantize-dequantized in float32 (the
ablation measures their accuracy effect; their bytes stay float). Norms, biases and the
embedding (a lookup) are never quantized.

Schemes (SCHEMES, registered by name): w8, w4, w8a8, and auto -- 8 or 4 bits per unit (one
expert of one depth step, or one step's attention / dense FFN) under a bits budget,
chosen from held-out measurements (act_jax/quant/ptq.py: frequent or sensitive experts keep 8 bits,
after MoQE, Kim et al. 2023). A tensor whose members mix bits is stored int8; its 4-bit
members' values lie on their own 4-bit grid with their own scales (`model_bytes` reports the
bytes as stored and at the assigned bits).

Storage: a quantized parameter is a qwix QArray (qvalue int8 / int4 of the weight's shape,
float32 scale with 1 -- or the tile count -- on the contraction axes). The step and expert
axes are channelwise, so nn.scan, the inference while-loops (a dynamic index per step) and
expert gathers slice it like an array. The modules call `einsum` / `ragged_dot` / `take`
here, which run qwix's ops on a QArray and jnp's on a float array. Why not qwix's
`quantize_model` (it intercepts dot_general in the model's __call__ and traces the operand
back to the calling module's params): measured with an all-modules int8 rule, the dropless
experts (gathered per block before their matmul) stayed float32 without a word, and the
inference loops apply DepthStep to per-step slices outside the model's __call__.
tests/test_quant.py pins the stored path on every dispatch and in the while-loop.

QAT (quant.scheme = w8 | w4 at training): fake quantization with the straight-through
estimator, W + stop_gradient(W^ - W) (Bengio et al. 2013; Jacob et al. 2018), applied to the
param tree in the train and eval steps; the checkpoint keeps float master weights and
`experiments.quantize` stores them quantized.

Dims (legend: act_jax/__init__.py): N depth steps, E experts, D d_model, F FFN hidden,
H heads, J head dim.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from act_jax.errors import ConfigError
from act_jax.spec import ModelSpec, MoESpec, QuantSpec


@dataclasses.dataclass(frozen=True)
class Scheme:
  """A registered quantization scheme; its capabilities are attributes."""
  weight_bits: int   # bits of every quantized weight (0: per unit, from quant.bits)
  act_bits: int      # > 0: matmul activations quantized per token at run time
  trainable: bool    # QAT: training fake-quantizes the weights at this scheme
  summary: str


SCHEMES: dict[str, Scheme] = {
    'w8': Scheme(8, 0, True, 'int8 weights, one scale per output channel'),
    'w4': Scheme(4, 0, True, 'int4 weights, one scale per output channel and tile'),
    'w8a8': Scheme(8, 8, False, 'int8 weights and per-token int8 activations, int8 matmuls'),
    'auto': Scheme(0, 0, False, '8 or 4 bits per expert / layer under --budget_bits'),
}
BITS_CHOICES = (8, 4)   # auto: what a unit may take, most precise first
MIN_BITS = min(BITS_CHOICES)
NO_QUANT = QuantSpec(scheme='none', stored=False, experts_only=False, gates=False, tile=0,
                     bits='')

_QTYPES = {8: jnp.int8, 4: jnp.int4}
_EXPERT_MLP = ('w_in', 'w_gate', 'w_out')
_GATE_MODULES = ('halt_unit', 'exit_clf_hidden', 'exit_clf_out', 'mod_router', 'mod_predictor')


# ----------------------------------------------------------------------------- spec
def resolve(cfg: Mapping[str, Any], model: ModelSpec, moe: MoESpec) -> QuantSpec:
  """config.quant checked (ConfigError naming the field) and typed."""
  q = dict(cfg)
  scheme = q['scheme']
  if scheme != 'none' and scheme not in SCHEMES:
    raise ConfigError(f'quant.scheme={scheme!r}: unknown scheme; known: none, '
                      f'{", ".join(SCHEMES)}')
  for f in ('stored', 'experts_only', 'gates'):
    if not isinstance(q[f], (bool, np.bool_)):
      raise ConfigError(f'quant.{f}={q[f]!r}: must be True or False')
  if scheme == 'none' and (q['stored'] or q['experts_only'] or q['gates'] or q['bits']):
    raise ConfigError("quant.scheme='none': quant.stored, experts_only, gates and bits need "
                      f'a scheme ({", ".join(SCHEMES)})')
  if scheme != 'none' and not q['stored'] and not SCHEMES[scheme].trainable:
    able = [k for k, v in SCHEMES.items() if v.trainable]
    raise ConfigError(
        f'quant.scheme={scheme!r} cannot be trained with quantization-aware training (QAT '
        f'schemes: {", ".join(able)}); train float or with one of those, then run '
        f'experiments.quantize --scheme={scheme}')
  tile = q['tile']
  if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 0:
    raise ConfigError(f'quant.tile={tile!r}: must be 0 (one scale per output channel) or a '
                      f'positive number of contraction entries per scale')
  if (scheme == 'auto') != bool(q['bits']):
    raise ConfigError(f'quant.bits={q["bits"]!r}: set exactly when quant.scheme=auto '
                      f'(experiments.quantize --scheme=auto writes it)')
  spec = QuantSpec(scheme=scheme, stored=bool(q['stored']),
                   experts_only=bool(q['experts_only']), gates=bool(q['gates']),
                   tile=int(tile), bits=str(q['bits']))
  if spec.bits:
    parse_bits(spec.bits)  # raises on a malformed table
  if spec.experts_only and 'moe' not in model.layer_kinds:
    raise ConfigError(f'quant.experts_only=True: the model has no experts '
                      f'(moe.router={moe.router!r})')
  return spec


def parse_bits(text: str) -> dict[str, tuple[int, ...]]:
  """'layer_1/moe=8,4;layer_0/attn=8' -> {'layer_1/moe': (8, 4), 'layer_0/attn': (8,)}."""
  out: dict[str, tuple[int, ...]] = {}
  for part in filter(None, text.split(';')):
    unit, sep, vals = part.partition('=')
    try:
      bits = tuple(int(v) for v in vals.split(','))
    except ValueError:
      bits = ()
    if not sep or not re.fullmatch(r'layer_\d+/(moe|shared|attn|mlp)', unit) or not bits or \
        any(b not in BITS_CHOICES for b in bits):
      raise ConfigError(f'quant.bits: bad entry {part!r}; want unit=b,b,... with units '
                        f'layer_<j>/moe|shared|attn|mlp and bits in {BITS_CHOICES}')
    out[unit] = bits
  return out


def format_bits(table: Mapping[str, Any]) -> str:
  return ';'.join(f'{u}={",".join(str(int(b)) for b in np.ravel(v))}'
                  for u, v in sorted(table.items()))


# ----------------------------------------------------------------------------- which weights
def role(path: tuple[str, ...]) -> Optional[str]:
  """'expert' | 'layer' | 'gate' for a parameter path ('stack', 'layer_1', 'moe', 'w_in'),
  None for what is never quantized (norms, biases, the embedding)."""
  name, parent = path[-1], (path[-2] if len(path) > 1 else '')
  if name in ('wq', 'wk', 'wv', 'wo') and parent == 'attn':
    return 'layer'
  if name in _EXPERT_MLP and parent in ('moe', 'shared'):
    return 'expert'
  if name in _EXPERT_MLP and parent in ('mlp', 'dense'):
    return 'layer'
  if name in ('router', 'soft_phi') and parent == 'moe':
    return 'gate'
  if name == 'kernel' and parent in _GATE_MODULES:
    return 'gate'
  if path == ('unembed',):
    return 'gate'
  return None


def unit(path: tuple[str, ...]) -> Optional[str]:
  """The auto scheme's unit of a layer / expert weight: 'layer_j/moe' (per step and routed
  expert), 'layer_j/shared' (the shared experts), 'layer_j/attn' or 'layer_j/mlp' (per step)."""
  r = role(path)
  if r not in ('expert', 'layer') or len(path) < 3 or path[0] != 'stack':
    return None
  layer = path[1]
  if path[-2] == 'attn':
    return f'{layer}/attn'
  if path[-2] == 'shared':
    return f'{layer}/shared'
  if r == 'expert':
    return f'{layer}/moe'
  return f'{layer}/mlp'


def contraction_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
  """Axes the weight's matmul sums over: D of wq/wk/wv [.., D, H, J]; H, J of wo [.., H, J, D];
  the second-to-last of every [.., in, out] matrix."""
  name = path[-1]
  if name in ('wq', 'wk', 'wv'):
    return (ndim - 3,)
  if name == 'wo':
    return (ndim - 3, ndim - 2)
  return (ndim - 2,)


def weight_bits(spec: QuantSpec, path: tuple[str, ...]) -> int:
  """Bits of this parameter under the scheme (0: float32). 'auto': the unit's largest."""
  r = role(path)
  if spec.scheme == 'none' or r is None:
    return 0
  if r == 'gate':  # float unless quant.gates; under auto, 8 bits
    return (SCHEMES[spec.scheme].weight_bits or 8) if spec.gates else 0
  if r == 'layer' and spec.experts_only:
    return 0
  if spec.scheme == 'auto':
    return max(parse_bits(spec.bits).get(unit(path), (8,)))
  return SCHEMES[spec.scheme].weight_bits


def _how(path: tuple[str, ...], shape: tuple[int, ...], bits: int, tile: int) -> dict:
  """qwix.quantize keyword arguments: channelwise on every non-contraction axis, tiles of
  `tile` on the last contraction axis for 4-bit weights (when the axis splits evenly)."""
  red = contraction_axes(path, len(shape))
  kw: dict[str, Any] = {'channelwise_axes': tuple(a for a in range(len(shape)) if a not in red)}
  last = red[-1]
  if bits < 8 and tile and shape[last] > tile and shape[last] % tile == 0:
    kw['tiled_axes'] = {last: tile}
  return kw


def _member_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Leading axes one auto unit entry covers: [N, E] for stacked experts, [N] per layer."""
  r = role(path)
  lead = 2 if (r == 'expert' and path[-2] == 'moe') else 1
  return tuple(shape[:lead])


def quantize_weight(path: tuple[str, ...], w: jax.Array, bits: Any, tile: int) -> qwix.QArray:
  """The stored form of one weight. bits: an int, or (auto) an int array over the weight's
  leading member axes ([N, E] or [N]): a member at 4 bits keeps its own 4-bit grid and scale
  inside the int8 container when any other member has 8. Under auto every weight uses the
  4-bit (tiled) scale layout, so a member's values do not depend on its neighbours' bits."""
  b = np.asarray(bits)
  if b.ndim == 0:
    return qwix.quantize(w, _QTYPES[int(b)], **_how(path, w.shape, int(b), tile))
  kw = _how(path, w.shape, MIN_BITS, tile)
  if (b == MIN_BITS).all():
    return qwix.quantize(w, _QTYPES[MIN_BITS], **kw)
  q8 = qwix.quantize(w, jnp.int8, **kw)
  if (b == 8).all():
    return q8
  q4 = qwix.quantize(w, jnp.int4, **kw)
  low = jnp.asarray(b == MIN_BITS)
  pick = lambda lo, hi: jnp.where(low.reshape(low.shape + (1,) * (hi.ndim - low.ndim)),  # noqa: E731
                                  lo.astype(hi.dtype), hi)
  return dataclasses.replace(q8, qvalue=pick(q4.qvalue, q8.qvalue), scale=pick(q4.scale, q8.scale))


def _unit_bits(spec: QuantSpec, path: tuple[str, ...], shape: tuple[int, ...]) -> Any:
  """Per-member bits array of an auto tensor (or the scheme's int)."""
  if spec.scheme != 'auto' or role(path) == 'gate' or weight_bits(spec, path) == 0:
    return weight_bits(spec, path)
  u = unit(path)
  table = parse_bits(spec.bits)
  if u not in table:  # a unit auto left alone
    return weight_bits(spec, path)
  lead = _member_shape(path, shape)
  bits = np.asarray(table[u], np.int32)
  if bits.size != int(np.prod(lead)):
    raise ConfigError(f'quant.bits: {u} has {bits.size} entries; the model needs '
                      f'{int(np.prod(lead))} ({" x ".join(map(str, lead))})')
  return bits.reshape(lead)


def _paths(tree: Any):
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)
  keys = [tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in p) for p, _ in flat]
  return keys, [v for _, v in flat], treedef


def _map_quantized(params: Any, spec: QuantSpec, fn) -> Any:
  """fn(path, w, bits) on every leaf the scheme quantizes; the others as they are."""
  keys, leaves, treedef = _paths(params)
  out = []
  for path, w in zip(keys, leaves):
    bits = _unit_bits(spec, path, w.shape)
    out.append(w if np.max(bits) == 0 else fn(path, w, bits))
  return jax.tree_util.tree_unflatten(treedef, out)


def quantize_params(params: Any, spec: QuantSpec) -> Any:
  """PTQ: float params -> the stored tree (QArrays where weight_bits > 0; gates, when
  quantized, as float32 round trips)."""
  def store(path, w, bits):
    q = quantize_weight(path, w, bits, spec.tile)
    return qwix.dequantize(q).astype(w.dtype) if role(path) == 'gate' else q
  return _map_quantized(params, spec, store)


def fake_quant(params: Any, spec: QuantSpec) -> Any:
  """QAT: every weight the scheme quantizes replaced by W + stop_gradient(W^ - W): the forward
  sees the quantized values, the gradient reaches the float master weight unchanged."""
  if spec.scheme == 'none' or spec.stored:
    return params

  def ste(path, w, bits):
    wq = qwix.dequantize(quantize_weight(path, jax.lax.stop_gradient(w), bits, spec.tile))
    return w + jax.lax.stop_gradient(wq.astype(w.dtype) - w)
  return _map_quantized(params, spec, ste)


def abstract_params(abstract: Any, spec: QuantSpec) -> Any:
  """The stored tree's ShapeDtypeStructs from the float model's (restore target): a QArray
  where quantized, the scale sharded like the weight except on its reduced axes."""
  if not spec.stored:
    return abstract
  keys, leaves, treedef = _paths(abstract)
  out = []
  for path, a in zip(keys, leaves):
    bits = _unit_bits(spec, path, a.shape)
    if np.max(bits) == 0 or role(path) == 'gate':
      out.append(a)
      continue
    q = jax.eval_shape(lambda w, p=path, b=bits: quantize_weight(p, w, b, spec.tile),
                       jax.ShapeDtypeStruct(a.shape, a.dtype))
    sh = getattr(a, 'sharding', None)
    q_sh = s_sh = None
    if sh is not None:
      q_sh = sh
      pspec = tuple(sh.spec) + (None,) * (len(a.shape) - len(sh.spec))
      # A reduced (size 1) scale axis cannot be split: replicate it there.
      s_spec = [p if q.scale.shape[i] == a.shape[i] else None for i, p in enumerate(pspec)]
      s_sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*s_spec))
    out.append(dataclasses.replace(
        q, qvalue=jax.ShapeDtypeStruct(q.qvalue.shape, q.qvalue.dtype, sharding=q_sh),
        scale=jax.ShapeDtypeStruct(q.scale.shape, q.scale.dtype, sharding=s_sh)))
  return jax.tree_util.tree_unflatten(treedef, out)


def is_quantized(x: Any) -> bool:
  return isinstance(x, qwix.QArray)


def dequantize(params: Any) -> Any:
  """Every QArray of a tree back to float32 (what the quantized model computes with)."""
  return jax.tree.map(lambda x: qwix.dequantize(x) if is_quantized(x) else x, params,
                      is_leaf=is_quantized)


# ----------------------------------------------------------------------------- the matmuls
def cast(w: Any, dtype) -> Any:
  """A weight in the compute dtype (a QArray: its scale, so its matmul dequantizes to it)."""
  return w.astype(dtype)


def _act(x: jax.Array, lhs: str, contracted: str, spec: QuantSpec) -> Any:
  """w8a8: x quantized per token (one scale per non-contracted position)."""
  if spec.scheme == 'none' or not SCHEMES[spec.scheme].act_bits:
    return x
  axes = tuple(i for i, c in enumerate(lhs) if c not in contracted)
  return qwix.quantize(x, _QTYPES[SCHEMES[spec.scheme].act_bits], channelwise_axes=axes)


def einsum(eq: str, x: jax.Array, w: Any, spec: QuantSpec = NO_QUANT) -> jax.Array:
  """jnp.einsum(eq, x, w) for a float w; qwix.einsum for a stored QArray (x quantized first
  under w8a8). The result has x's dtype."""
  if not is_quantized(w):
    return jnp.einsum(eq, x, w)
  lhs, rest = eq.split(',')
  rhs, out = rest.split('->')
  contracted = ''.join(c for c in lhs if c in rhs and c not in out)
  return qwix.einsum(eq, _act(x, lhs, contracted, spec), w).astype(x.dtype)


def ragged_dot(x_MD: jax.Array, w_EDF: Any, sizes_E: jax.Array,
               spec: QuantSpec = NO_QUANT) -> jax.Array:
  """jax.lax.ragged_dot, or qwix's for a stored QArray (rows quantized first under w8a8)."""
  if not is_quantized(w_EDF):
    return jax.lax.ragged_dot(x_MD, w_EDF, sizes_E)
  return qwix.ragged_dot(_act(x_MD, 'md', 'd', spec), w_EDF, sizes_E).astype(x_MD.dtype)


def take(w: Any, idx: jax.Array, axis: int = 0) -> Any:
  """jnp.take on a weight or on every array of a QArray (its scale has the same leading
  axes)."""
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=axis), w)


# ----------------------------------------------------------------------------- accounting
def array_bytes(x: Any) -> float:
  """Bytes of a leaf as a packed format stores it (int4: half a byte per entry)."""
  if is_quantized(x):
    bits = 4 if x.qvalue.dtype == jnp.int4 else 8 * x.qvalue.dtype.itemsize
    return x.qvalue.size * bits / 8 + array_bytes(x.scale)
  return float(x.size * jnp.dtype(x.dtype).itemsize)


def model_bytes(params: Any, spec: QuantSpec = NO_QUANT) -> dict[str, float]:
  """Bytes by role ('expert', 'layer', 'gate', 'other') as stored, plus 'total', and
  'assigned' / 'assigned_expert': every auto member at its own bits (what a per-expert
  format would store; equal to the stored bytes for the other schemes)."""
  keys, leaves, _ = _paths(params)
  out = {'expert': 0.0, 'layer': 0.0, 'gate': 0.0, 'other': 0.0, 'assigned': 0.0,
         'assigned_expert': 0.0}
  for path, x in zip(keys, leaves):
    b = array_bytes(x)
    out[role(path) or 'other'] += b
    if is_quantized(x) and spec.scheme == 'auto' and spec.stored:
      bits = np.asarray(_unit_bits(spec, path, x.shape), np.float64)
      b = float(np.sum(bits) * x.qvalue.size / bits.size / 8) + array_bytes(x.scale)
    out['assigned'] += b
    if role(path) == 'expert':
      out['assigned_expert'] += b
  out['total'] = out['expert'] + out['layer'] + out['gate'] + out['other']
  return out


__all__ = ['BITS_CHOICES', 'MIN_BITS', 'NO_QUANT', 'SCHEMES', 'Scheme', 'abstract_params',
           'array_bytes', 'cast', 'contraction_axes', 'dequantize', 'einsum', 'fake_quant',
           'format_bits', 'is_quantized', 'model_bytes', 'parse_bits', 'quantize_params',
           'quantize_weight', 'ragged_dot', 'resolve', 'role', 'take', 'unit', 'weight_bits']
