"""Ahead-of-time compilation for TPU slices you do not have (MaxText's AOT check, our model).

`compile_report(config, topology)` compiles the REAL train step (and the decode step) for a
named TPU topology on any machine with libtpu installed (`pip install -e '.[tpu]'`): the
devices come from `jax.experimental.topologies.get_topology_desc`, the state is abstract
(ShapeDtypeStructs with the rule table's shardings), nothing is allocated. From the
compiled executable it reads, per chip:

* memory: `memory_analysis()` (arguments = parameters + optimizer state + batch, outputs
  aliased by donation, XLA temporaries) against the chip's HBM; the argument split is
  computed from the shardings (shard shape x itemsize).
* collectives: every all-gather / reduce-scatter / all-reduce / (ragged-)all-to-all /
  collective-permute in the optimized HLO, counted with the trip count of each enclosing
  while loop (the depth scan runs its body num_steps times), bytes = the largest array the
  instruction moves per chip.
* FLOPs. XLA's `cost_analysis()` counts a loop body once (not once per iteration), so for
  a depth-N scan its FLOPs come out ~N times too low. With --probes we compile two unrolled
  probes of the same model with 2 and 3 scan steps (same mesh, same everything else) and
  extrapolate linearly: X(N) = X(2) + (N - 2) (X(3) - X(2)) for XLA's flops and bytes
  accessed. The model FLOPs are
    6 N_active T + 12 L D S T   (PaLM's count: N_active matmul params incl. the LM head and
                                 every exit head that runs; L layers, D d_model, S seq
                                 length, T tokens per step)
  and the hardware FLOPs max(XLA's, model FLOPs x 4/3 under full remat).
* MFU, one method: MFU = model FLOPs / (t x peak) with
    t = hardware FLOPs / peak + collective bytes / ICI bandwidth
  (compute and communication not overlapped). Every term is counted from the compiled
  program, and the model FLOPs are checked against XLA's probe FLOPs. Two bounds are printed
  beside it: the ceiling without communication (t = hardware FLOPs / peak), and, with
  --probes, the floor where every byte XLA's cost analysis counts also crosses HBM
  (t = max(compute, bytes accessed / HBM bandwidth) + communication) -- an overcount, since
  those bytes are each op's operands and outputs, most of which stay on chip between fused
  ops, and most of all a gather's. XLA's own `optimal_seconds` is shown, not used: on these
  programs it is often negative, and it counts loop bodies once.

Dims (legend: act_jax/__init__.py): B batch, L length, D d_model, N depth steps, E experts.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import topologies

from act_jax import config as config_lib
from act_jax.infer import inference
from act_jax.model import moe as moe_lib
from act_jax.model import quant as quant_lib
from act_jax.model import transformer as model_lib
from act_jax.scale import sharding as sharding_lib
from act_jax.run import state as run_state
from act_jax.train import training
from act_jax.errors import ConfigError
from act_jax.spec import Spec

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures (bytes, FLOP/s, bytes/s)."""
  name: str
  hbm_bytes: float
  peak_bf16: float        # dense bf16 FLOP/s
  hbm_bw: float           # bytes/s
  ici_bw: float           # bidirectional inter-chip bytes/s per chip


CHIPS: dict[str, Chip] = {
    # cloud.google.com/tpu/docs/v4: 32 GiB HBM2 at 1200 GB/s, 275 TFLOP/s bf16,
    # ICI 2400 Gbps per chip.
    'v4': Chip('TPU v4', 32 * GiB, 275e12, 1200e9, 300e9),
    # cloud.google.com/tpu/docs/v5e: 16 GB HBM2 at 819 GB/s, 197 TFLOP/s bf16,
    # bidirectional ICI 400 GB/s per chip.
    'v5e': Chip('TPU v5e', 16 * GiB, 197e12, 819e9, 400e9),
    # cloud.google.com/tpu/docs/v5p: 95 GB HBM2e at 2765 GB/s, 459 TFLOP/s bf16,
    # bidirectional ICI 1200 GB/s per chip.
    'v5p': Chip('TPU v5p', 95 * GiB, 459e12, 2765e9, 1200e9),
    # cloud.google.com/tpu/docs/v6e: 32 GB HBM at 1638 GB/s, 918 TFLOP/s bf16,
    # bidirectional ICI 800 GB/s per chip.
    'v6e': Chip('TPU v6e', 32 * GiB, 918e12, 1638e9, 800e9),
}
TOPOLOGY_EXAMPLES = ('v5e:2x2', 'v5e:4x4', 'v5e:16x16', 'v5p:2x2x2', 'v5p:4x4x4', 'v6e:2x2',
                     'v6e:16x16', 'v4:2x2x2')
# ragged-all-to-all's bytes are its whole buffer: an upper bound (it moves the filled rows).
COLLECTIVES = ('all-to-all', 'ragged-all-to-all', 'all-gather', 'reduce-scatter',
               'all-reduce', 'collective-permute')
INSTALL = "pip install -e '.[tpu]'   (brings libtpu: TPU compiles from any machine)"


# ----------------------------------------------------------------------------- devices
def parse_topology(name: str) -> Chip:
  """The chip of 'v5p:4x4x4'; a ConfigError naming --topology otherwise."""
  m = re.fullmatch(r'(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?', name or '')
  if not m:
    raise ConfigError(f'--topology={name!r}: expected <chip>:<shape> with chip one of '
                      f'v4, v5e, v5p, v6e; examples: {", ".join(TOPOLOGY_EXAMPLES)}')
  if min(int(g) for g in m.groups()[1:] if g) < 1:  # libtpu would crash the process on a 0
    raise ConfigError(f'--topology={name!r}: every dimension must be >= 1; examples: '
                      f'{", ".join(TOPOLOGY_EXAMPLES)}')
  return CHIPS[m.group(1)]


def topology_devices(name: str) -> list[Any]:
  """The devices of a named TPU slice, from libtpu's topology description (no TPU needed)."""
  parse_topology(name)
  if importlib.util.find_spec('libtpu') is None:
    raise ConfigError(f'--topology={name}: TPU compiles need libtpu; install it with {INSTALL}')
  # Describing a topology does not own a TPU: let several compiles (or a test and a
  # compile) load libtpu at once instead of failing on its single-user lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    desc = topologies.get_topology_desc(platform='tpu', topology_name=name)
  except Exception as e:  # libtpu's own words on an impossible slice
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f'--topology={name!r} is not a slice libtpu can describe ({first}); '
                      f'examples: {", ".join(TOPOLOGY_EXAMPLES)}') from None
  return list(desc.devices)


# ----------------------------------------------------------------------------- model FLOPs
def active_matmul_params(spec: Spec) -> dict[str, float]:
  """Matmul parameters one token multiplies by in a training step (per forward)."""
  m, moe = spec.model, spec.moe
  d = m.d_model
  attn = 4 * d * m.num_heads * m.head_dim
  kinds = m.layer_kinds * m.num_steps
  dense_ffn = 3 * d * m.d_ff
  info = moe_lib.ROUTERS[moe.router]
  moe_ffn = dense_ffn if not info.routed else (
      d * moe.num_experts + (moe.top_k if info.uses_top_k else 1) * 3 * d * moe.d_ff
      + moe.shared_experts * 3 * d * moe.d_ff)
  heads = m.num_steps if spec.policy.needs_exit_logits else 1
  return {'attention': attn * len(kinds),
          'ffn': sum(moe_ffn if k == 'moe' else dense_ffn for k in kinds),
          'heads': heads * d * m.vocab_size}


def model_flops(spec: Spec, batch: int, seq: int, train: bool = True) -> float:
  """6 N_active T + 12 L D S T (training) or 2 N_active T + 4 L D S T (forward)."""
  n = sum(active_matmul_params(spec).values())
  t = batch * seq
  k = 3 if train else 1
  return k * (2 * n * t + 4 * spec.model.num_layers * spec.model.d_model * seq * t)


def param_counts(spec: Spec, abstract_params: Any) -> tuple[int, int]:
  """(total parameters, active matmul parameters per token)."""
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
  return total, int(sum(active_matmul_params(spec).values()))


# ----------------------------------------------------------------------------- HLO reading
_COMP = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_WHILE = re.compile(r'\bwhile\(.*?condition=%?([\w.\-]+).*?body=%?([\w.\-]+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r'(?:calls|to_apply|branch_computations|called_computations)=\{?'
                    r'(%?[\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?')
_SHAPE = re.compile(r'\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64|c64)\[([\d,]*)\]')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2, 's32': 4,
          'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8}


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  comps: dict[str, list[str]] = {}
  entry, cur = '', None
  for line in hlo.splitlines():
    if cur is None:
      m = _COMP.match(line)
      if m and not line.startswith(' '):
        cur = m.group(1)
        comps[cur] = []
        if line.startswith('ENTRY'):
          entry = cur
    elif line.startswith('}'):
      cur = None
    else:
      comps[cur].append(line)
  return comps, entry


def _trip_count(while_line: str, cond: list[str]) -> int:
  """XLA's known_trip_count, else the bound of the condition's `i < constant` (the form
  jax's scan/fori lower to, counter from 0), else 1."""
  t = _TRIP.search(while_line)
  if t:
    return int(t.group(1))
  if any('direction=LT' in line for line in cond):
    bounds = [int(b) for line in cond for b in re.findall(r's32\[\][^ ]* constant\((\d+)\)', line)]
    if bounds:
      return max(bounds)
  return 1


def collectives(hlo: str) -> dict[str, dict[str, float]]:
  """{kind: {'count', 'bytes'}} executed per step per chip, loop trip counts applied."""
  comps, entry = _computations(hlo)
  edges: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
  for c, lines in comps.items():
    for line in lines:
      w = _WHILE.search(line)
      if w:
        n = _trip_count(line, comps.get(w.group(1), []))
        edges[c] += [(w.group(1), n + 1), (w.group(2), n)]
        continue
      for group in _CALLS.findall(line):
        edges[c] += [(g.strip().lstrip('%'), 1) for g in group.split(',')]
  mult = {entry: 1.0}
  order = [entry]
  for c in order:  # call graphs are DAGs; a callee's multiplier sums over its callers
    for callee, n in edges.get(c, []):
      if callee in comps:
        if callee not in mult:
          order.append(callee)
        mult[callee] = mult.get(callee, 0.0) + mult[c] * n
  out = {k: {'count': 0.0, 'bytes': 0.0} for k in COLLECTIVES}
  for c, lines in comps.items():
    for line in lines:
      if '=' not in line:
        continue
      rhs = line.split('=', 1)[1]
      for kind in COLLECTIVES:
        if re.search(rf'\s{kind}(?:-start)?\(', rhs):
          nbytes = max((_BYTES[dt] * math.prod(int(x) for x in dims.split(',') if x)
                        for dt, dims in _SHAPE.findall(line)), default=0)
          out[kind]['count'] += mult.get(c, 0.0)
          out[kind]['bytes'] += mult.get(c, 0.0) * nbytes
          break
  return out


def dumped_hlo(module: str) -> str | None:
  """The newest optimized HLO text XLA dumped for `module` (XLA_FLAGS --xla_dump_to=DIR
  --xla_dump_hlo_as_text, which experiments.compile sets), else None."""
  m = re.search(r'--xla_dump_to=(\S+)', os.environ.get('XLA_FLAGS', ''))
  if not m:
    return None
  files = glob.glob(os.path.join(m.group(1), f'*.{module}.*after_optimizations.txt'))
  if not files:
    return None
  with open(max(files, key=os.path.getmtime)) as f:
    return f.read()


def optimized_collectives(compiled: Any, module: str) -> dict[str, dict[str, float]]:
  """collectives() of an executable's optimized HLO. For large TPU programs `as_text()` can
  fail (a RET_CHECK on async-update ops); XLA's own dump of the module is read instead, and
  without one the counts are zero with an 'error' entry."""
  try:
    return collectives(compiled.as_text())
  except jax.errors.JaxRuntimeError as e:
    text = dumped_hlo(module)
    if text is not None:
      return collectives(text)
    out = {k: {'count': 0.0, 'bytes': 0.0} for k in COLLECTIVES}
    out['error'] = {'message': str(e).strip().splitlines()[0]}  # type: ignore[dict-item]
    return out


# ----------------------------------------------------------------------------- compiling
def _batch_abstract(spec: Spec, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  shape = (spec.data.batch_size, spec.data.seq_len)
  sh = sharding_lib.data_sharding(mesh, 2)
  return {'inputs': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
          'targets': jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh),
          'weights': jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)}


def _shard_bytes(tree: Any) -> int:
  """Bytes per chip; int4 (quantized weights) packed two per byte, as the TPU stores it."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * _itembits(x.dtype) // 8
                 for x in jax.tree.leaves(tree)))


def _itembits(dtype: Any) -> int:
  return 4 if dtype == jnp.int4 else 8 * np.dtype(dtype).itemsize


def layout(spec: Spec, devices: list[Any]) -> dict[str, Any]:
  """{'mesh', 'abstract' (sharded ShapeDtypeStruct state), 'shardings'} for `devices`."""
  mesh = sharding_lib.make_mesh(spec.mesh.shape, devices)
  abstract, shardings = run_state.state_shardings(spec, mesh)
  return {'mesh': mesh, 'abstract': abstract, 'shardings': shardings}


def _state_bytes(abstract: Any) -> tuple[int, int]:
  """(parameter bytes, optimizer + MoE-bias state bytes) per chip."""
  return (_shard_bytes(abstract['params']),
          _shard_bytes(abstract['opt_state']) + _shard_bytes(abstract['moe_state']))


def compile_train_step(spec: Spec, devices: list[Any], lay: dict[str, Any] | None = None,
                       options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
  """(compiled train step, its layout) for `devices`, nothing allocated; `options` are XLA
  compiler options (e.g. xla_dump_to: the optimized HLO where as_text() fails)."""
  lay = lay or layout(spec, devices)
  mesh, abstract, shardings = lay['mesh'], lay['abstract'], lay['shardings']
  batch = _batch_abstract(spec, mesh)
  repl = sharding_lib.replicated(mesh)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl)
  with sharding_lib.mesh_context(mesh):
    fn = jax.jit(training.make_train_step(spec),
                 in_shardings=(shardings, {k: v.sharding for k, v in batch.items()}, repl),
                 out_shardings=(shardings, repl), donate_argnums=(0,))
    compiled = fn.lower(abstract, batch, rng).compile(options)
  return compiled, lay


def decode_cache(spec: Spec, mesh: Any) -> list[dict[str, jax.ShapeDtypeStruct]]:
  """The abstract KV cache of a decode batch (data.batch_size rows of model.max_len),
  rows split like the batch."""
  m = spec.model
  cache_sh = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, sharding_lib.BATCH_AXES, None, None, None))
  kv = jax.ShapeDtypeStruct((m.num_steps, spec.data.batch_size, m.max_len, m.num_heads,
                             m.head_dim), model_lib.dtype_of(m.dtype), sharding=cache_sh)
  return [{'k': kv, 'v': kv} for _ in m.layer_kinds]


def compile_decode_step(spec: Spec, devices: list[Any], lay: dict[str, Any] | None = None
                        ) -> tuple[Any, dict[str, Any]]:
  """The early-exit decode step (one token per row, KV cache of model.max_len) for a batch
  of data.batch_size rows. Parameters keep the training layout."""
  lay = lay or layout(spec, devices)
  mesh, abstract = lay['mesh'], lay['abstract']
  b = spec.data.batch_size
  cache = decode_cache(spec, mesh)
  tok_sh = sharding_lib.data_sharding(mesh, 2)
  token = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=tok_sh)
  index = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding_lib.replicated(mesh))
  variables = {'params': abstract['params'], 'moe_state': abstract['moe_state']}
  op = spec.default_operating_point.threshold

  def step(variables, cache, token, index):
    logits, aux = inference.decode_step(spec, variables, cache, token, index, op)
    return logits, aux['cache']

  with sharding_lib.mesh_context(mesh):
    compiled = jax.jit(step, donate_argnums=(1,)).lower(variables, cache, token, index).compile()
  return compiled, {'params': _shard_bytes(abstract['params']), 'cache': _shard_bytes(cache),
                    'abstract_cache': cache}


def decode_exit_costs(spec: Spec, params: Any, cache: Any, chip: Chip) -> list[dict[str, Any]]:
  """What an early exit saves in one decode step, per chip, when every row exits after
  step n (n = 1..N; only N for a policy that cannot exit). A decode step is HBM-bound: it
  reads, once each,
    n * (weights of one step + its layers' KV cache)      the steps that run
    + h * head                 the exit heads evaluated: h = n where the policy reads each
                               exit's logits (confidence by softmax), else 1
    + (N - n) * (W_K, W_V of one step)     kv_fill='project' fills the skipped layers
  from the sharded shapes (MoE layers: every expert, as a batch of rows touches most of
  them; the embedding row and the norms are negligible). Time = bytes / HBM bandwidth;
  collectives (FSDP weight gathers) are not in it: the report lists them for full depth."""
  n_steps, g = spec.model.num_steps, spec.model.group_size
  stack = params['stack']
  step_b = _shard_bytes(stack) / n_steps
  kv_b = sum(_shard_bytes(sub['attn'][w]) for sub in stack.values() if 'attn' in sub
             for w in ('wk', 'wv')) / n_steps
  head_b = _shard_bytes(params['unembed'] if 'unembed' in params else params['embedding'])
  cache_b = _shard_bytes(cache) / n_steps
  reads_heads = spec.policy.step_reads_exit_logits
  rows = []
  for n in (range(1, n_steps + 1) if spec.policy.can_exit else [n_steps]):
    b = n * (step_b + cache_b) + (n if reads_heads else 1) * head_b + (n_steps - n) * kv_b
    rows.append({'exit_step': n, 'layers': n * g, 'bytes': b,
                 'ms_per_token': 1e3 * b / chip.hbm_bw})
  full = rows[-1]['bytes']
  for r in rows:
    r['fraction'] = r['bytes'] / full
  return rows


def _with(config: ml_collections.ConfigDict, **model: Any) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.model.update(model)
  return c


def _cost(compiled: Any) -> dict[str, float]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return {'flops': float(ca.get('flops', 0.0)), 'bytes': float(ca.get('bytes accessed', 0.0)),
          'seconds': float(ca.get('optimal_seconds', 0.0))}


def probe_costs(config: ml_collections.ConfigDict, spec: Spec, devices: list[Any]
                ) -> dict[str, float]:
  """XLA's per-chip flops / bytes / seconds for the full depth, from two unrolled probes."""
  g = spec.model.group_size
  costs = []
  for steps in (2, 3):
    probe = config_lib.resolve(_with(config, num_layers=steps * g, scan_unroll=steps),
                               device_count=len(devices))
    costs.append(_cost(compile_train_step(probe, devices)[0]))
  n = spec.model.num_steps
  return {k: costs[0][k] + (n - 2) * (costs[1][k] - costs[0][k]) for k in costs[0]}


def compile_report(config: ml_collections.ConfigDict, topology: str, probes: bool = True,
                   decode: bool = True) -> dict[str, Any]:
  """Everything `experiments.compile` prints, as numbers (see the module docstring)."""
  chip = parse_topology(topology)
  devices = topology_devices(topology)
  config = config_lib.complete(config)
  spec = config_lib.validate(config, device_count=len(devices))
  lay = layout(spec, devices)  # built once: train step, decode step and the OOM report
  t0 = time.time()
  try:
    compiled, info = compile_train_step(spec, devices, lay)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e) and 'Oom' not in str(e):
      raise
    return _oom_report(spec, lay, chip, topology, len(devices), str(e))
  compile_s = time.time() - t0
  abstract = info['abstract']
  mem = compiled.memory_analysis()
  params_b, opt_b = _state_bytes(abstract)
  batch_b = _shard_bytes(_batch_abstract(spec, info['mesh']))
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  chips = len(devices)
  tokens = spec.data.batch_size * spec.data.seq_len
  total_params, active = param_counts(spec, abstract['params'])
  mf = model_flops(spec, spec.data.batch_size, spec.data.seq_len)
  coll = optimized_collectives(compiled, 'jit_train_step')
  coll_bytes = sum(coll[k]['bytes'] for k in COLLECTIVES)
  raw = _cost(compiled)
  est = probe_costs(config, spec, devices) if probes else dict(raw)
  # Hardware FLOPs: full remat reruns each forward once more in the backward (8NT, not 6NT).
  hw_flops = max(est['flops'], mf / chips * (4 / 3 if spec.model.remat == 'full' else 1.0))
  t_compute = hw_flops / chip.peak_bf16
  t_ici = coll_bytes / chip.ici_bw
  step_s = t_compute + t_ici              # the MFU method (module docstring)
  per_chip = mf / chips
  mfu = lambda t: per_chip / (t * chip.peak_bf16) if t > 0 else 0.0  # noqa: E731
  # XLA's bytes accessed are per loop body without probes: a bound only with them.
  t_hbm = est['bytes'] / chip.hbm_bw if probes else None
  report = {
      'topology': topology, 'chip': chip.name, 'chips': chips, 'mesh': dict(info['mesh'].shape),
      'hbm_bytes': chip.hbm_bytes, 'peak_bf16': chip.peak_bf16,
      'params_total': total_params, 'params_active': active,
      'bytes': {'params': params_b, 'optimizer': opt_b, 'batch': batch_b,
                'arguments': mem.argument_size_in_bytes, 'outputs': mem.output_size_in_bytes,
                'aliased': mem.alias_size_in_bytes, 'temp': mem.temp_size_in_bytes,
                'peak': peak},
      'fits': peak <= chip.hbm_bytes,
      'model_flops_per_chip': per_chip, 'xla_flops_raw': raw['flops'],
      'xla_flops': est['flops'], 'xla_bytes': est['bytes'], 'xla_seconds': est['seconds'],
      'hardware_flops_per_chip': hw_flops, 'probes': probes,
      'compute_seconds': t_compute, 'collective_seconds': t_ici, 'hbm_seconds': t_hbm,
      'step_seconds': step_s, 'roofline_seconds': step_s,
      'tokens_per_step': tokens,
      'tokens_per_s_per_chip': tokens / chips / step_s if step_s > 0 else 0.0,
      'mfu': mfu(step_s),
      'mfu_ceiling': mfu(t_compute),                       # no communication at all
      'mfu_floor': mfu(max(t_compute, t_hbm) + t_ici) if probes else None,
      'collectives': coll, 'compile_seconds': compile_s,
  }
  if decode:
    dec, dec_bytes = compile_decode_step(spec, devices, lay)
    dmem = dec.memory_analysis()
    report['decode'] = {
        'params': dec_bytes['params'], 'cache': dec_bytes['cache'],
        'peak': (dmem.argument_size_in_bytes + dmem.output_size_in_bytes
                 - dmem.alias_size_in_bytes + dmem.temp_size_in_bytes),
        # A decode step reads every weight and the whole KV cache once: HBM-bound.
        'exits': decode_exit_costs(spec, abstract['params'], dec_bytes['abstract_cache'], chip),
        'collectives': optimized_collectives(dec, 'jit_step')}
    # full depth: the last row (every weight of the stack, the heads the policy reads)
    report['decode']['seconds_per_token'] = report['decode']['exits'][-1]['ms_per_token'] / 1e3
  report['advice'] = advice(report, spec)
  return report


def quant_decode_report(config: ml_collections.ConfigDict, topology: str,
                        schemes: tuple[str, ...] = ('w8', 'w4')) -> list[dict[str, Any]]:
  """The decode step compiled for `topology` with float32 weights and with each weight
  scheme stored (act_jax/model/quant.py): per chip, the parameter bytes (int4 packed), XLA's
  argument bytes and bytes accessed, and the HBM-bound time per token ((parameters + KV
  cache) / HBM bandwidth: a decode step reads each once). XLA's cost analysis counts the
  depth loop's body once, so its bytes are per loop iteration -- compare them across schemes,
  not with the HBM-bound figure."""
  fixed = [k for k, v in quant_lib.SCHEMES.items() if v.weight_bits]  # auto needs a table
  bad = [s for s in schemes if s not in fixed]
  if bad:
    raise ConfigError(f'--schemes={",".join(schemes)}: {", ".join(bad)} not allowed; '
                      f'allowed: {", ".join(fixed)}')
  chip = parse_topology(topology)
  devices = topology_devices(topology)
  config = config_lib.complete(config)
  rows = []
  for scheme in ('none',) + tuple(schemes):
    c = ml_collections.ConfigDict(config.to_dict())
    if scheme != 'none':
      c.quant.update(scheme=scheme, stored=True)
    spec = config_lib.resolve(c, device_count=len(devices))
    t0 = time.time()
    compiled, b = compile_decode_step(spec, devices)
    mem, cost = compiled.memory_analysis(), _cost(compiled)
    rows.append({'scheme': 'float32' if scheme == 'none' else scheme, 'params': b['params'],
                 'cache': b['cache'], 'arguments': mem.argument_size_in_bytes,
                 'xla_bytes': cost['bytes'], 'xla_seconds': cost['seconds'],
                 'hbm_ms_per_token': 1e3 * (b['params'] + b['cache']) / chip.hbm_bw,
                 'compile_seconds': time.time() - t0})
  return rows


def format_quant_decode(rows: list[dict[str, Any]], topology: str) -> str:
  ref = rows[0]
  lines = [f'decode step with quantized weights on {topology} (per chip):',
           f'{"scheme":>8} {"params MiB":>10} {"args MiB":>9} {"XLA MB/iter":>11} '
           f'{"HBM ms/tok":>10} {"x f32":>6}']
  for r in rows:
    lines.append(f'{r["scheme"]:>8} {r["params"] / 2**20:10.1f} {r["arguments"] / 2**20:9.1f} '
                 f'{r["xla_bytes"] / 1e6:11.1f} {r["hbm_ms_per_token"]:10.3f} '
                 f'{ref["hbm_ms_per_token"] / r["hbm_ms_per_token"]:5.2f}x')
  return '\n'.join(lines)


def _oom_report(spec: Spec, lay: dict[str, Any], chip: Chip, topology: str, chips: int,
                error: str) -> dict[str, Any]:
  """The TPU compiler refused the layout as out of HBM: report what we know without an
  executable (state bytes from the shardings, the compiler's figure). The figure its message
  calls "HLO temporaries" is its whole heap, parameters and optimizer state included: for a
  layout that fits, the same heap report totals exactly the peak that memory_analysis gives
  (temporaries + state). So it is the peak here, and the temporaries are what it leaves."""
  mesh, abstract = lay['mesh'], lay['abstract']
  params_b, opt_b = _state_bytes(abstract)
  m = re.search(r'temporaries \(([\d.]+)G\)', error)
  heap = float(m.group(1)) * GiB if m else 0.0
  temp = max(heap - params_b - opt_b, 0.0)
  total, active = param_counts(spec, abstract['params'])
  report = {'topology': topology, 'chip': chip.name, 'chips': chips,
            'mesh': dict(mesh.shape), 'hbm_bytes': chip.hbm_bytes, 'fits': False,
            'params_total': total, 'params_active': active,
            'bytes': {'params': params_b, 'optimizer': opt_b, 'temp': temp,
                      'peak': max(heap, params_b + opt_b)},
            'compiler_error': error.strip().splitlines()[0]}
  report['advice'] = advice(report, spec)
  return report


def advice(report: dict[str, Any], spec: Spec) -> str:
  """Why it does not fit and which knobs help, biggest first (empty when it fits)."""
  b, hbm = report['bytes'], report['hbm_bytes']
  if report['fits']:
    return ''
  m, chips = spec.mesh, report['chips']
  state = b['params'] + b['optimizer']
  tips = []
  if m.fsdp < chips // (m.expert * m.model):
    k = min(chips // (m.expert * m.model), 2 * m.fsdp)
    tips.append(f'raise mesh.fsdp (parameters + optimizer state take {state / GiB:.1f} GiB '
                f'per chip; fsdp={k} makes them ~{state * m.fsdp / k / GiB:.1f} GiB, and '
                f'splits the gradients too)')
  tokens = spec.data.batch_size * spec.data.seq_len / (m.data * m.fsdp * m.expert)
  if spec.model.loss_tiles == 1:
    tips.append(f'model.loss_tiles=8 (the heads\' cross-entropy by length tiles: a whole '
                f'[B,L,V] f32 is {tokens * spec.model.vocab_size * 4 / GiB:.1f} GiB per chip)')
  if spec.policy.needs_exit_logits:
    n, d = spec.model.num_steps, spec.model.d_model
    tips.append(f'halting.name={spec.halting.name!r} keeps every exit\'s state for its loss: '
                f'{n} exits x d_model {d} = {tokens * n * d * 2 / GiB:.1f} GiB per chip in '
                f'bf16, and as much again for its gradient')
  if spec.model.remat != 'full':
    tips.append('model.remat=full (activations: XLA temporaries take '
                f'{b["temp"] / GiB:.1f} GiB)')
  tips.append('a smaller data.batch_size or data.seq_len')
  return (f'needs {b["peak"] / GiB:.1f} GiB per chip, {report["chip"]} has {hbm / GiB:.0f} '
          f'GiB: ' + '; '.join(tips))


def format_report(r: dict[str, Any]) -> str:
  """The table experiments.compile prints."""
  g = lambda x: (f'{x / GiB:8.2f} GiB' if x >= 0.1 * GiB  # noqa: E731
                 else f'{x / 2**20:8.2f} MiB')
  b = r['bytes']
  if 'compiler_error' in r:
    return '\n'.join([
        f'== {r["topology"]}: {r["chips"]} x {r["chip"]}, mesh {r["mesh"]} ==',
        f'parameters: {r["params_total"] / 1e9:.3f} B total',
        f'memory per chip: parameters {g(b["params"]).strip()}, optimizer state '
        f'{g(b["optimizer"]).strip()}, XLA temporaries {g(b["temp"]).strip()}',
        f'the TPU compiler refused it: {r["compiler_error"]}',
        'refused: ' + r['advice']])
  lines = [f'== {r["topology"]}: {r["chips"]} x {r["chip"]}, mesh {r["mesh"]} ==',
           f'parameters: {r["params_total"] / 1e9:.3f} B total, {r["params_active"] / 1e9:.3f} B '
           f'active matmul per token; compiled in {r["compile_seconds"]:.0f} s',
           'memory per chip:',
           f'  parameters      {g(b["params"])}',
           f'  optimizer state {g(b["optimizer"])}',
           f'  batch           {g(b["batch"])}',
           f'  XLA temporaries {g(b["temp"])}',
           f'  peak            {g(b["peak"])}  of {r["hbm_bytes"] / GiB:.0f} GiB HBM '
           f'({b["peak"] / r["hbm_bytes"]:.0%}) -> {"fits" if r["fits"] else "DOES NOT FIT"}',
           'compute per chip per step:',
           f'  model FLOPs (6 N T + attention)  {r["model_flops_per_chip"]:.3e}',
           '  XLA FLOPs, ' + ('probe-extrapolated ' if r['probes'] else 'raw (no probes)    ')
           + f'{r["xla_flops"]:.3e}  (raw cost_analysis counts a loop body once: '
           f'{r["xla_flops_raw"]:.3e})',
           f'  hardware FLOPs {r["hardware_flops_per_chip"]:.3e} (max of XLA\'s and 4/3 x model '
           'under full remat)',
           f'  step time = compute {r["compute_seconds"] * 1e3:.1f} ms + collectives '
           f'{r["collective_seconds"] * 1e3:.1f} ms = {r["step_seconds"] * 1e3:.1f} ms '
           f'(not overlapped)',
           f'  MFU {r["mfu"]:.1%} = model FLOPs / (step time x peak); ceiling without '
           f'communication {r["mfu_ceiling"]:.1%}' + (
               f'; floor if every byte XLA counts crossed HBM {r["mfu_floor"]:.1%}'
               if r['mfu_floor'] is not None else ''),
           f'  {r["tokens_per_s_per_chip"]:,.0f} tokens/s/chip; XLA\'s own estimate '
           f'{r["xla_seconds"] * 1e3:.1f} ms (shown, not used: it counts loop bodies once and '
           f'can be negative)',
           'collectives per chip per step (loop trip counts applied):']
  if 'error' in r['collectives']:
    lines.append(f'  not available: XLA could not print the optimized HLO '
                 f'({r["collectives"]["error"]["message"]}); the roofline omits them')
  for k in COLLECTIVES:
    v = r['collectives'][k]
    if v['count']:
      lines.append(f'  {k:<19}{v["count"]:7.0f} x   {v["bytes"] / GiB:9.3f} GiB')
  if 'decode' in r:
    d = r['decode']
    lines.append(f'decode step (batch rows x 1 token): params {g(d["params"])}, KV cache '
                 f'{g(d["cache"])}, peak {g(d["peak"])}; HBM-bound '
                 f'{d["seconds_per_token"] * 1e3:.2f} ms/token')
    lines += ['  per exit (every row exits after step n; HBM reads of the steps run, the exit '
              'heads read, the skipped layers\' K/V projections):',
              f'  {"exit step":>9} {"layers":>6} {"HBM GiB":>8} {"ms/token":>8} {"x full":>7}']
    for e in d['exits']:
      lines.append(f'  {e["exit_step"]:9d} {e["layers"]:6d} {e["bytes"] / GiB:8.2f} '
                   f'{e["ms_per_token"]:8.2f} {e["fraction"]:7.2f}')
  if r['advice']:
    lines.append('refused: ' + r['advice'])
  return '\n'.join(lines)


__all__ = ['CHIPS', 'Chip', 'TOPOLOGY_EXAMPLES', 'active_matmul_params', 'collectives',
           'compile_decode_step', 'compile_report', 'compile_train_step', 'decode_cache',
           'decode_exit_costs',
           'format_quant_decode',
           'format_report', 'model_flops', 'parse_topology', 'probe_costs',
           'quant_decode_report', 'topology_devices']
