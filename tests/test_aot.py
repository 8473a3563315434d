"""AOT compilation for TPU topologies (act_jax/deploy/aot.py): real compiles where libtpu is
installed (CI installs the 'tpu' extra), and the HLO / FLOP accounting by known answers."""
import importlib.util

import jax
import numpy as np
import pytest

from act_jax.deploy import aot
from act_jax.model.moe import expert_parallel
from act_jax import config as config_lib
from act_jax.scale import sharding
from act_jax.errors import ConfigError
from experiments.configs import lm, pod

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason=f'libtpu is not installed; {aot.INSTALL}')

# A while loop (scan over 3 steps, counter from 0) whose body holds one all-gather of
# bf16[4,8] (64 bytes) and one all-reduce of f32[16] (64 bytes); the entry has one
# all-to-all of s32[2,2] (16 bytes). The condition has no known_trip_count, as TPU HLO.
HLO = """HloModule m

%cond (p: (s32[], bf16[4,8])) -> pred[] {
  %c = s32[]{:T(128)} constant(3)
  %p = (s32[], bf16[4,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]) parameter(0)
  %x = bf16[2,8] get-tuple-element(%p), index=1
  %ag = bf16[4,8]{1,0} all-gather(bf16[2,8]{1,0} %x), dimensions={0}
  %ar = f32[16]{0} all-reduce(f32[16]{0} %y), to_apply=%add
  ROOT %t = (s32[], bf16[4,8]) tuple(%i, %ag)
}

ENTRY %main (a: s32[2,2]) -> s32[2,2] {
  %a = s32[2,2] parameter(0)
  %w = (s32[], bf16[4,8]) while(%t0), condition=%cond, body=%body
  ROOT %aa = s32[2,2]{1,0} all-to-all(s32[2,2]{1,0} %a), dimensions={0}
}
"""


def test_collectives_apply_loop_trip_counts():
  c = aot.collectives(HLO)
  assert c['all-gather'] == {'count': 3.0, 'bytes': 3 * 64.0}
  assert c['all-reduce'] == {'count': 3.0, 'bytes': 3 * 64.0}
  assert c['all-to-all'] == {'count': 1.0, 'bytes': 16.0}
  assert c['reduce-scatter']['count'] == 0
  known = HLO.replace('body=%body', 'body=%body, backend_config={"known_trip_count":{"n":"7"}}')
  assert aot.collectives(known)['all-gather']['count'] == 7.0


def test_model_flops_known_answer():
  # Dense: 2 layers, d 8, 2 heads of 4, d_ff 16, vocab 300, untied; per token per layer
  # attention 4*8*8 = 256 and FFN 3*8*16 = 384 params, head 8*300 = 2400:
  # N = 2*(256+384) + 2400 = 3680; T = 2*16 = 32 tokens, S = 16:
  # 6*N*T + 12*L*D*S*T = 6*3680*32 + 12*2*8*16*32 = 706560 + 98304 = 804864.
  c = lm.get_config('halting=none,router=none')
  c.model.update(num_layers=2, d_model=8, num_heads=2, d_ff=16, vocab_size=300,
                 tie_embeddings=False)
  c.data.update(seq_len=16, batch_size=2)
  spec = config_lib.resolve(c, device_count=1)
  assert aot.model_flops(spec, 2, 16) == 804864
  # MoE every 2nd layer, top-2 of 4 experts of hidden 4, one shared; confidence exits add
  # one head per step: the MoE layer's FFN is 8*4 (router) + (2+1)*3*8*4 = 320.
  c.halting.name = 'confidence'
  c.moe.update(router='top_k', num_experts=4, top_k=2, d_ff=4, shared_experts=1, every=2)
  spec = config_lib.resolve(c, device_count=1)
  n = aot.active_matmul_params(spec)
  assert n == {'attention': 512, 'ffn': 384 + 320, 'heads': 1 * 2400}  # 1 step of 2 layers


def test_decode_exit_costs_known_answer():
  """Per-exit HBM bytes of a decode step, by hand. 4 steps of 1 layer, d 8, 2 heads of 4,
  d_ff 16, vocab 300, f32, 2 rows x 16 positions, one device. Per step: attention 4 x 8*8*4 B
  = 1024, norms 2 x 8*4 = 64, FFN 3 x 8*16*4 = 1536 -> 2624; KV cache k + v 2 x 2*16*2*4*4 =
  2048; W_K + W_V 512. Head 8*300*4 = 9600, read at every step by confidence (softmax)."""
  c = lm.get_config('halting=confidence,router=none')
  c.model.update(num_layers=4, d_model=8, num_heads=2, d_ff=16, vocab_size=300,
                 tie_embeddings=False, max_len=16)
  c.data.update(seq_len=16, batch_size=2)
  c.mesh.update(data=1)

  def rows(**halting):
    c.halting.update(halting)
    spec = config_lib.resolve(c, device_count=1)
    lay = aot.layout(spec, jax.devices()[:1])
    return aot.decode_exit_costs(spec, lay['abstract']['params'],
                                 aot.decode_cache(spec, lay['mesh']), aot.CHIPS['v5e'])

  conf = rows(name='confidence')
  want = [n * (2624 + 2048) + n * 9600 + (4 - n) * 512 for n in (1, 2, 3, 4)]
  assert [r['bytes'] for r in conf] == want == [15808, 29568, 43328, 57088]
  assert [r['exit_step'] for r in conf] == [1, 2, 3, 4] and conf[-1]['fraction'] == 1.0
  assert conf[0]['ms_per_token'] == 1e3 * 15808 / aot.CHIPS['v5e'].hbm_bw
  # ACT's halting unit (8 weights + 1 bias, 36 B a step) reads the state: one head, at the end
  act = rows(name='act')
  assert [r['bytes'] for r in act] == [n * (4672 + 36) + 9600 + (4 - n) * 512
                                       for n in (1, 2, 3, 4)]
  assert [r['exit_step'] for r in rows(name='none')] == [4]   # no exits: full depth only


def test_bad_topologies_are_one_line_errors():
  for bad in ('v5x:2x2', 'v5e', 'v5e:2x2x2x2', ''):
    with pytest.raises(ConfigError, match='--topology') as e:
      aot.topology_devices(bad)
    assert 'v5p:4x4x4' in str(e.value)  # lists examples


def test_pod_configs_resolve():
  for size in pod.SIZES:
    for kind in ('', ',dense', ',kind=moe'):
      spec = config_lib.validate(pod.get_config(f'size={size}{kind}'), device_count=64)
      assert spec.mesh.fsdp * spec.mesh.expert == 64
  with pytest.raises(ConfigError, match='size'):
    pod.get_config('size=3b')
  with pytest.raises(ConfigError, match='kind'):
    pod.get_config('kind=sparse')


@needs_libtpu
def test_unknown_slice_is_refused_before_compiling():
  with pytest.raises(ConfigError, match='not a slice libtpu can describe'):
    aot.topology_devices('v5e:3x7')


def _tiny(fsdp: int, expert: int, data: int = 1):
  c = pod.get_config('size=125m,runlocal')   # MoE + confidence exits, tiny
  c.model.update(d_model=256, num_heads=4, d_ff=512)  # a dim worth splitting
  c.moe.update(d_ff=128)
  c.data.update(batch_size=8, seq_len=64)
  c.mesh.update(data=data, fsdp=fsdp, expert=expert)
  # One head tile: XLA's cost analysis counts a loop body once and the probes unroll only
  # the depth loop, so the heads' tile loops (pod.py's loss_tiles=8) would be counted once,
  # not 8 times -- at vocab 32k and this tiny width, most of the FLOPs.
  c.model.loss_tiles = 1
  return c


@needs_libtpu
@pytest.mark.slow  # ~130 s: train step, two FLOP probes and the decode step for v5e:2x2
def test_compile_report_v5e_fsdp_and_experts():
  r = aot.compile_report(_tiny(fsdp=2, expert=2), 'v5e:2x2', probes=True, decode=True)
  assert r['chips'] == 4 and r['fits'] and r['mesh'] == {'data': 1, 'fsdp': 2, 'expert': 2,
                                                         'model': 1}
  c = r['collectives']
  assert c['all-to-all']['count'] > 0          # experts split: tokens move by all-to-all
  assert c['all-gather']['count'] > 0          # fsdp: weights gathered per layer
  # fsdp gradients: reduce-scatter, or its SPMD ring form (collective-permutes) on TPU
  assert c['reduce-scatter']['count'] + c['collective-permute']['count'] > 0
  # The probes fix XLA's once-per-loop-body count: within 2x of 6NT + attention (+remat).
  assert 0.5 < r['xla_flops'] / r['model_flops_per_chip'] < 2.5, r
  assert r['xla_flops'] > 1.5 * r['xla_flops_raw']
  assert r['decode']['params'] > 0 and r['decode']['seconds_per_token'] > 0
  exits = r['decode']['exits']     # confidence exits after every step: cheaper when earlier
  assert len(exits) == r['decode']['exits'][-1]['exit_step'] > 1
  assert all(a['bytes'] < b['bytes'] for a, b in zip(exits, exits[1:]))
  # one MFU method, with its bounds: floor (probes: XLA's bytes as HBM) <= MFU <= ceiling
  assert r['step_seconds'] == r['compute_seconds'] + r['collective_seconds']
  assert r['mfu_floor'] <= r['mfu'] <= r['mfu_ceiling'] <= 1.0
  assert 'fits' in aot.format_report(r)


@needs_libtpu
def test_multi_host_slice_layout_is_the_rule_table():
  """v5p:2x2x2 = 8 chips on 2 hosts: compiles; every parameter is laid out as the rule table
  says (checked on the compiled executable's input shardings)."""
  devices = aot.topology_devices('v5p:2x2x2')
  assert len({d.process_index for d in devices}) == 2
  spec = config_lib.validate(_tiny(fsdp=4, expert=2), device_count=8)
  compiled, info = aot.compile_train_step(spec, devices)
  want = info['abstract']['params']
  got = compiled.input_shardings[0][0]['params']
  flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
  flat_got = jax.tree.leaves(got)
  assert len(flat_want) == len(flat_got)
  mesh = info['mesh']
  for (path, w), g in zip(flat_want, flat_got):
    assert g.is_equivalent_to(w.sharding, len(w.shape)), (path, g, w.sharding)
  w_in = want['stack']['layer_1']['moe']['w_in']
  assert w_in.sharding.spec == jax.sharding.PartitionSpec(None, 'expert', 'fsdp', 'model')
  assert mesh.shape['fsdp'] == 4
  per_chip = np.prod(w_in.sharding.shard_shape(w_in.shape))
  assert per_chip * 8 == np.prod(w_in.shape)
  assert sharding.BATCH_AXES == ('data', 'fsdp', 'expert')


@needs_libtpu
@pytest.mark.parametrize('topology,fsdp,expert', [('v5e:2x2', 2, 2), ('v5p:2x2x2', 2, 4)])
def test_expert_parallel_ragged_dispatch_compiles_for_tpu(topology, fsdp, expert, tmp_path):
  """moe.dispatch=ragged on a TPU slice: the train step's HLO exchanges tokens with
  ragged-all-to-all (XLA:CPU cannot run it; tests/test_moe_sharding.py runs the same
  program with the padded transport), and the per-chip send/receive buffers are the
  static bound cf * M rows of expert_parallel.send_rows, not the worst case."""
  c = _tiny(fsdp=fsdp, expert=expert)
  c.moe.dispatch = 'ragged'
  devices = aot.topology_devices(topology)
  spec = config_lib.validate(c, device_count=len(devices))
  # XLA's own dump: as_text() fails on some TPU programs (a RET_CHECK on async updates)
  aot.compile_train_step(spec, devices, options={'xla_dump_to': str(tmp_path),
                                                 'xla_dump_hlo_as_text': True})
  dumps = list(tmp_path.glob('*jit_train_step*after_optimizations.txt'))
  text = dumps[0].read_text()
  assert 'ragged-all-to-all' in text
  coll = aot.collectives(text)
  assert coll['ragged-all-to-all']['count'] > 0 and coll['all-to-all']['count'] > 0
  m = spec.moe
  tokens = spec.data.batch_size // len(devices)           # groups (sequences) per chip
  cap = -(-m.top_k * spec.data.seq_len * m.capacity_factor // m.num_experts)
  rows = expert_parallel.send_rows(tokens, spec.data.seq_len, m.top_k, m.num_experts,
                                   expert, int(cap))
  assert rows * expert < tokens * spec.data.seq_len * m.top_k * expert   # < worst case
  assert f'[{rows * expert},' in text.replace(' ', '')


def test_collectives_fall_back_to_xla_dump(tmp_path, monkeypatch):
  """Compiled.as_text() fails for some large TPU programs: read XLA's own dump instead."""
  (tmp_path / 'module_0003.jit_train_step.cl_7.after_optimizations.txt').write_text(HLO)
  (tmp_path / 'module_0003.jit_train_step.cl_7.after_codegen.txt').write_text('junk')

  class Broken:
    def as_text(self):
      raise jax.errors.JaxRuntimeError('INTERNAL: RET_CHECK failure')

  monkeypatch.setenv('XLA_FLAGS', f'--xla_dump_to={tmp_path} --xla_dump_hlo_as_text')
  assert aot.optimized_collectives(Broken(), 'jit_train_step')['all-gather']['count'] == 3.0
  monkeypatch.setenv('XLA_FLAGS', '')
  out = aot.optimized_collectives(Broken(), 'jit_train_step')
  assert out['all-gather']['count'] == 0 and 'RET_CHECK' in out['error']['message']


@needs_libtpu
def test_quantized_decode_compiles_for_tpu_with_fewer_bytes():
  """experiments.compile --schemes: the decode step compiles for a TPU slice with the
  weights stored int8 / int4 (QArrays sharded like the weights); per chip the parameters
  shrink toward 1/4 and 1/8 (the f32 embedding, norms, routers and scales stay)."""
  c = lm.get_config('runlocal')
  c.mesh.update(data=2, expert=2)
  with pytest.raises(ConfigError, match='--schemes=w8,auto: auto not allowed'):
    aot.quant_decode_report(c, 'v5e:2x2', ('w8', 'auto'))
  rows = aot.quant_decode_report(c, 'v5e:2x2', ('w8', 'w4'))
  f32, w8, w4 = (r['params'] for r in rows)
  assert [r['scheme'] for r in rows] == ['float32', 'w8', 'w4']
  assert f32 / 4.5 < w8 < f32 / 2 and w4 < w8 * 0.8  # int4 packed; the f32 embedding stays
  assert rows[1]['hbm_ms_per_token'] < rows[0]['hbm_ms_per_token']
  assert 'w8' in aot.format_quant_decode(rows, 'v5e:2x2')
