"""The resolved spec: one boundary, every derived fact computed once (and the defects it removed).

Each test named after a defect failed on the code before the spec (commit 15b760f) and
passes now; the v1 fixtures in tests/data were written by that code.
"""
import ast
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from act_jax.viz import listing as listing_lib
from act_jax import config as config_lib
from act_jax.model import halting as halting_lib
from act_jax.infer import inference
from act_jax.calibrate import operating_point
from act_jax.run import state as run_state
from act_jax.train import training
from act_jax.errors import ConfigError
from act_jax.model.halting.base import HaltingPolicy, record_exit
from act_jax.model.transformer import make_model
from act_jax.run import directory as run_lib
from act_jax.spec import (NEVER_EXIT, OperatingPoint, Spec, threshold_at,
                          threshold_per_step)
from experiments.configs import lm
from tests.conftest import binary_cases

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V1 = os.path.join(REPO, 'tests', 'data', 'v1_runs')


def tiny(policy='confidence', router='none', layers=4, **halting):
  c = lm.get_config(f'halting={policy},router={router},runlocal')
  c.model.num_layers = layers
  c.halting.update(**halting)
  return c


# ----------------------------------------------------------------------------- the spec

def test_resolve_derives_every_fact_once():
  c = lm.get_config('runlocal')             # confidence + top_k MoE every 2 layers
  c.model.update(num_layers=6, head_dim=0, max_len=0)
  c.moe.d_ff = 0
  spec = config_lib.resolve(c, device_count=1)
  m = spec.model
  assert (m.head_dim, m.max_len, m.group_size, m.num_steps) == (32 // 2, 32, 2, 3)
  assert m.layer_kinds == ('dense', 'moe')
  assert spec.moe.d_ff == c.model.d_ff       # moe.d_ff 0 -> the dense d_ff
  assert spec.exit_layers == (2, 4, 6)
  assert isinstance(spec.policy, halting_lib.ConfidenceExit)
  assert spec.policy.num_steps == 3
  assert spec.mesh.shape == (1, 1, 1, 1)
  assert spec.default_operating_point == OperatingPoint(c.halting.threshold)


def test_spec_is_hashable_frozen_and_a_jit_static_argument():
  c = tiny()
  a, b = config_lib.resolve(c), config_lib.resolve(c)
  assert a == b and hash(a) == hash(b) and a is not b
  with pytest.raises(dataclasses.FrozenInstanceError):
    a.model.d_model = 7
  traces = []
  g = jax.jit(lambda spec, x: (traces.append(1), x * spec.model.num_layers)[1],
              static_argnums=0)
  assert float(g(a, 1.0)) == float(g(b, 2.0)) / 2 == 4.0
  assert len(traces) == 1  # equal specs share one compiled function
  c.halting.threshold = 0.5
  assert config_lib.resolve(c) != a


def test_to_dict_round_trips_and_ints_equal_floats():
  c = tiny('act')
  spec = config_lib.resolve(c)
  again = config_lib.resolve(json.loads(json.dumps(spec.to_dict())))
  assert again == spec
  c.halting.threshold = 1  # an int where the table has a float resolves the same
  c2 = tiny('act')
  c2.halting.threshold = 1.0
  assert config_lib.resolve(c) == config_lib.resolve(c2)


def test_the_one_defaults_table():
  """Defect: four tables of defaults (default_config, HALTING_DEFAULTS, MOE_DEFAULTS, data
  DEFAULTS) had drifted (MOE_DEFAULTS.router='top_k' vs 'none'), read by three getters."""
  from act_jax import data as data_lib
  from act_jax.model import moe as moe_lib
  from act_jax.model.halting import base
  assert not hasattr(moe_lib, 'MOE_DEFAULTS') and not hasattr(moe_lib.routers, 'cfg_get')
  assert not hasattr(halting_lib, 'HALTING_DEFAULTS') and not hasattr(base, 'cfg_get')
  assert not hasattr(data_lib, 'DEFAULTS')
  d = config_lib.default_config()
  # A config.json of an older version, missing fields, takes the one table's values.
  spec = config_lib.resolve({'moe': {'num_experts': 4}, 'halting': {'name': 'act'}})
  assert spec.moe.router == d.moe.router == 'none'
  assert spec.halting.eps == d.halting.eps and spec.halting.exit_aware == d.halting.exit_aware
  assert config_lib.resolve({}) == config_lib.resolve(d)
  assert config_lib.moe_spec().router == config_lib.halting_spec().name == 'none'
  with pytest.raises(ConfigError,
                     match=r'halting\.exit_awre=0\.5: unknown field; known: beta, bias_init, '):
    config_lib.resolve({'halting': {'exit_awre': 0.5}})
  with pytest.raises(ConfigError, match=r'modle=.*unknown config field'):
    config_lib.resolve({'modle': {}})


def test_the_policy_is_built_once(monkeypatch):
  """Defect: the halting policy was rebuilt (and revalidated) from the raw config in five
  places per forward/loss/decode."""
  built = []
  orig = halting_lib.ACT.__init__

  def counting_init(self, *a, **k):
    built.append(1)
    orig(self, *a, **k)

  monkeypatch.setattr(halting_lib.ACT, '__init__', counting_init)
  spec = config_lib.resolve(tiny('act'))
  assert len(built) == 1
  tokens = jnp.ones((2, 8), jnp.int32)
  v = nn.unbox(make_model(spec).init(jax.random.PRNGKey(0), tokens))
  logits, aux = make_model(spec).apply(v, tokens)
  batch = {'targets': tokens, 'weights': jnp.ones((2, 8))}
  training.total_loss(spec, logits, aux, batch)
  inference.forward_while(spec, v, tokens)
  inference.generate(spec, v, tokens[:, :3], 2, 0.5)
  assert len(built) == 1


# ----------------------------------------------------------------------------- operating point

def test_operating_point_vector_known_answers():
  spec = config_lib.resolve(tiny('confidence', router='top_k'))  # 4 layers, 2 steps of 2
  assert spec.exit_layers == (2, 4)
  np.testing.assert_array_equal(OperatingPoint(0.7).vector(spec), np.float32([0.7, 0.7]))
  np.testing.assert_array_equal(OperatingPoint(0.7, 2).vector(spec), np.float32([-np.inf, 0.7]))
  np.testing.assert_array_equal(OperatingPoint(0.7, 4).vector(spec), np.float32([0.7, 0.7]))
  np.testing.assert_array_equal(OperatingPoint.full_depth().vector(spec), [NEVER_EXIT] * 2)
  assert [p.label for p in (OperatingPoint.full_depth(), OperatingPoint(0.6),
                            OperatingPoint(0.4, 4))] == ['full depth', '0.6', '0.4 cap 4']
  for bad, msg in ((OperatingPoint(0.7, 3), r'one of \[2, 4\]'),
                   (OperatingPoint(0.0), r'threshold=0\.0: must be in \(0, 1\]'),
                   (OperatingPoint(1.5), 'threshold'), (OperatingPoint(True), 'threshold')):
    with pytest.raises(ConfigError, match=msg):
      bad.vector(spec)
  with pytest.raises(ConfigError, match='this call takes one operating point'):
    inference.threshold_arg(spec, jnp.full((2, 1), 0.5))  # per-row: training, serving rows
  np.testing.assert_array_equal(  # a serving batch: one point per row
      inference.threshold_arg(spec, jnp.asarray([[0.5], [0.7]]), per_row=True),
      np.float32([[0.5, 0.5], [0.7, 0.7]]))
  np.testing.assert_array_equal(inference.threshold_arg(spec, OperatingPoint(0.7, 2)),
                                OperatingPoint(0.7, 2).vector(spec))
  act = config_lib.resolve(tiny('act'))
  with pytest.raises(ConfigError, match=r"early-exit policy.*confidence, learned_exit.*'act'"):
    OperatingPoint(0.7, 2).vector(act)


def test_threshold_forms_are_encoded_and_decoded_in_one_place():
  n = 3
  np.testing.assert_array_equal(threshold_per_step(0.4, n), np.float32([0.4] * 3))
  vec = jnp.asarray([0.1, 0.2, 0.3])
  np.testing.assert_array_equal(threshold_per_step(vec, n), vec)
  rows = threshold_per_step(jnp.asarray([[0.5], [0.7]]), n)
  assert rows.shape == (2, 3)
  assert float(threshold_at(vec, jnp.int32(1))) == pytest.approx(0.2)
  np.testing.assert_array_equal(threshold_at(rows, jnp.int32(2)), np.float32([[0.5], [0.7]]))
  with pytest.raises(ConfigError, match='one entry per depth step'):
    threshold_per_step(jnp.ones((4,)), n)


def test_default_operating_point_is_one_answer_for_every_entry_point(tmp_path):
  """Defect: with no calibration.json, an ACT run decoded (generate) at halting.threshold
  0.9 while the model, evaluate and the training eval used 1 - eps = 0.99."""
  run = os.path.join(V1, 'act_dense')
  spec, state, _ = run_lib.load(run)
  want = 1.0 - spec.halting.eps
  assert spec.halting.threshold != want  # the two candidate defaults differ for ACT
  op, source = operating_point.run_operating_point(run, spec)
  assert op == spec.default_operating_point == OperatingPoint(want)
  assert source == 'the policy default'
  listing = listing_lib.generate_listing(run, 'def f(x):', max_new=3)
  assert listing.startswith(f'policy=act threshold={want:g} kv_fill')
  logs = []
  rows = operating_point.evaluate_run(run, num_batches=1, log=logs.append)
  assert rows[0]['threshold'] == pytest.approx(want)
  # ... and that point is what the model runs when given no threshold (the training eval)
  eval_step = jax.jit(training.make_eval_step(spec))
  from act_jax import data as data_lib
  ds = data_lib.make_dataset(spec.data, spec.seed)
  res = training.evaluate(spec, state, eval_step, ds.eval_batches(1), ds.domains)
  assert rows[0]['layers_mean'] == pytest.approx(res['layers_mean'])
  assert rows[0]['loss'] == pytest.approx(res['loss'])


def test_a_calibrated_point_is_the_default_and_flags_override_it(tmp_path):
  run = str(tmp_path / 'run')
  shutil.copytree(os.path.join(V1, 'learned_exit_moe'), run)
  spec = run_lib.read_config(run)
  with open(os.path.join(run, 'calibration.json'), 'w') as f:
    json.dump({'chosen_threshold': 0.6, 'max_layers': 2}, f)
  cal = os.path.join(run, 'calibration.json')
  assert operating_point.run_operating_point(run, spec) == (OperatingPoint(0.6, 2), cal)
  # a user's threshold is the user's point: the cap certified with 0.6 does not carry over
  assert operating_point.run_operating_point(run, spec, threshold=0.8)[0] == \
      OperatingPoint(0.8)
  assert operating_point.run_operating_point(run, spec, max_layers=4)[0] == \
      OperatingPoint(0.6, 4)
  with pytest.raises(ConfigError, match=r'--threshold=1\.5'):
    operating_point.run_operating_point(run, spec, threshold=1.5)
  listing = listing_lib.generate_listing(run, 'x = ', max_new=2)
  assert listing.startswith('policy=learned_exit threshold=0.6 max_layers=2 ')


# ----------------------------------------------------------------------------- capabilities

class DepthFraction(HaltingPolicy):
  """Toy policy: every token stops after the first step i with (i + 1) / N >= threshold."""
  name = 'depth_fraction'
  can_exit = True

  def step(self, state, h_prev_BLD, h_new_BLD, signals, i, threshold, running_BL, train):
    frac = (i + 1).astype(jnp.float32) / self.num_steps
    halt_BL = running_BL & ((frac >= threshold) | self.is_last(i))
    running_next_BL = running_BL & ~halt_BL
    return ({'exit_step': record_exit(state['exit_step'], running_BL, running_next_BL, i)},
            running_next_BL, {})


def test_a_new_policy_is_its_file_plus_one_registry_line(monkeypatch, tmp_path):
  """Defect: which policies can exit was a name list in one file and an isinstance in
  another; MoD was a name test inside Layer. Now capabilities are class attributes."""
  monkeypatch.setitem(halting_lib.POLICIES, DepthFraction.name, None)  # removed afterwards
  halting_lib.register(DepthFraction)    # the registry line (in a file: @register + import)
  c = tiny('none', layers=4)
  c.halting.name = 'depth_fraction'
  spec = config_lib.validate(c)
  assert isinstance(spec.policy, DepthFraction)
  tokens = jnp.ones((2, 8), jnp.int32)
  v = nn.unbox(make_model(spec).init(jax.random.PRNGKey(0), tokens))
  for thr, layers in ((0.25, 1), (0.5, 2), (0.6, 3), (1.0, 4)):
    _, aux = inference.forward_while(spec, v, tokens, thr)
    assert np.all(np.asarray(aux['layers']) == layers)
    _, aux = make_model(spec).apply(v, tokens, threshold=thr)  # masked scan agrees
    assert np.all(np.asarray(aux['layers']) == layers)
  operating_point.require_exits(spec)                       # can_exit: calibratable
  with pytest.raises(ConfigError, match='early-exit policy'):  # no can_cap_depth
    OperatingPoint(0.5, 2).vector(spec)
  state = nn.unbox(run_state.init_state_boxed(spec, jax.random.PRNGKey(0)))
  step = jax.jit(training.make_train_step(spec))
  batch = {'inputs': tokens, 'targets': tokens, 'weights': jnp.ones((2, 8)),
           'domain': jnp.zeros((2,), jnp.int32), 'difficulty': jnp.zeros((2,), jnp.int32)}
  _, metrics = step(state, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(metrics['loss']))


def test_no_name_tests_outside_the_registries():
  """Halting policies and routers are never tested by name outside their registries."""
  pattern = re.compile(r"(halting\.name|\.router|router|policy\.name)\s*(==|!=|in|not in)\s*"
                       r"[\('\"]")
  allowed = {'act_jax/config.py'}  # checks a user's name against the registries
  hits = []
  for path in glob.glob(os.path.join(REPO, 'act_jax', '**', '*.py'), recursive=True):
    rel = os.path.relpath(path, REPO)
    if rel in allowed:
      continue
    for no, line in enumerate(open(path), 1):
      if pattern.search(line):
        hits.append(f'{rel}:{no}: {line.strip()}')
  assert not hits, hits


def test_no_package_imports_inside_functions():
  """Defect: an import cycle (config -> moe -> sharding -> config) hidden by imports inside
  functions. None are left (each would need a comment naming the cycle it breaks)."""
  hits = []
  for path in glob.glob(os.path.join(REPO, 'act_jax', '**', '*.py'), recursive=True):
    tree = ast.parse(open(path).read())
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        mods = ([node.module or ''] if isinstance(node, ast.ImportFrom) else
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        if any(m == 'act_jax' or m.startswith('act_jax.') for m in mods):
          hits.append(f'{os.path.relpath(path, REPO)}:{node.lineno}')
  assert not hits, hits
  out = subprocess.run([sys.executable, '-c', 'import sys, act_jax.scale.sharding; '
                        'print(sorted(m for m in sys.modules if m.startswith("act_jax")))'],
                       cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert 'act_jax.config' not in out and 'act_jax.scale.sharding' in out


def _act_jax_imports() -> dict[str, set[str]]:
  """{module: act_jax modules it imports} for every file of the package (ast, not runtime)."""
  out = {}
  for path in glob.glob(os.path.join(REPO, 'act_jax', '**', '*.py'), recursive=True):
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
    mod = rel[:-len('.__init__')] if rel.endswith('.__init__') else rel
    pkg = mod if rel.endswith('__init__') else mod.rsplit('.', 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # relative: resolve against this package
          base = '.'.join(pkg.split('.')[:len(pkg.split('.')) - node.level + 1] + ([base] if base else []))
        for a in node.names:  # `from pkg import module` depends on the module, not pkg
          sub = f'{base}.{a.name}'
          is_module = (os.path.exists(os.path.join(REPO, *sub.split('.'))) or
                       os.path.exists(os.path.join(REPO, *sub.split('.')) + '.py'))
          dep = sub if is_module else base
          if dep.split('.')[0] in ('act_jax', 'experiments'):
            deps.add(dep)
      elif isinstance(node, ast.Import):
        deps |= {a.name for a in node.names if a.name.split('.')[0] in ('act_jax', 'experiments')}
    out[mod] = deps
  return out


def _unit(module: str) -> str | None:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else None


def test_imports_go_down_the_declared_layers():
  """act_jax.LAYERS is the order of the subsystems: a module imports its own unit or units
  below it, never one above, never experiments, and the modules have no import cycle."""
  import act_jax
  rank = {u: i for i, u in enumerate(act_jax.LAYERS)}
  graph = _act_jax_imports()
  units = {_unit(m) for m in graph} - {None}
  assert units == set(rank), f'undeclared or missing units: {units ^ set(rank)}'
  upward = []
  for mod, deps in sorted(graph.items()):
    for dep in sorted(deps):
      if dep.startswith('experiments'):
        upward.append(f'{mod} imports {dep}')
        continue
      u, d = _unit(mod), _unit(dep)
      if u is None or d is None or d not in rank:
        continue  # act_jax/__init__ and `from act_jax import x` resolved through names
      if rank[d] > rank[u]:
        upward.append(f'{mod} ({u}) imports {dep} ({d}), which sits above it')
  assert not upward, '\n'.join(upward)
  # no cycle between modules (a cycle inside one unit is still a tangle)
  known = set(graph)
  edges = {m: {d for d in deps if d in known and d != m} for m, deps in graph.items()}
  state: dict[str, int] = {}
  def visit(m, path):
    state[m] = 1
    for d in edges[m]:
      if state.get(d) == 1:
        raise AssertionError('import cycle: ' + ' -> '.join(path + [m, d]))
      if d not in state:
        visit(d, path + [m])
    state[m] = 2
  for m in sorted(edges):
    if m not in state:
      visit(m, [])


def test_the_layering_test_catches_an_upward_import(tmp_path, monkeypatch):
  """The checker itself: a model file that imports serve fails it."""
  graph = _act_jax_imports()
  graph['act_jax.model.bad'] = {'act_jax.serve.serving'}
  monkeypatch.setattr(sys.modules[__name__], '_act_jax_imports', lambda: graph)
  with pytest.raises(AssertionError, match='act_jax.model.bad'):
    test_imports_go_down_the_declared_layers()


def test_shape_suffix_letters_are_in_the_legend():
  import act_jax
  text = act_jax.__doc__.split('Shape suffixes')[1]
  legend = set(re.findall(r'(?<![A-Za-z])([A-Z]) (?=[A-Za-z(])', text))
  assert {'B', 'L', 'T', 'D', 'N', 'X', 'K', 'J', 'P', 'Y'} <= legend
  used = set()
  for path in glob.glob(os.path.join(REPO, 'act_jax', '**', '*.py'), recursive=True):
    for suffix in re.findall(r'\b[a-z][a-z0-9_]*_([A-Z]{1,6})\b', open(path).read()):
      used.update(suffix)
  assert used <= legend, sorted(used - legend)


# ----------------------------------------------------------------------------- old runs

@pytest.mark.parametrize('name', ['learned_exit_moe', 'act_dense'])
def test_checkpoints_written_before_the_spec_still_load_and_compute_the_same(name):
  run = os.path.join(V1, name)
  spec, state, step = run_lib.load(run)
  assert isinstance(spec, Spec) and step == 2
  ref = np.load(os.path.join(run, 'reference.npz'))
  v = {'params': state['params'], 'moe_state': state['moe_state']}
  fwd = jax.jit(lambda v, t, th: inference.forward_while(spec, v, t, th))
  for thr in (0.3, 0.9, 2.0):
    logits, aux = fwd(v, jnp.asarray(ref['tokens']), thr)
    np.testing.assert_allclose(np.asarray(logits), ref[f'logits_{thr}'], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux['layers']), ref[f'layers_{thr}'])
  out = inference.generate(spec, v, ref['tokens'][:, :4], 6, 0.5)
  np.testing.assert_array_equal(np.asarray(out['tokens']), ref['gen_tokens'])
  np.testing.assert_array_equal(np.asarray(out['layers']), ref['gen_layers'])


# ----------------------------------------------------------------------------- binaries

def _binary(args, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k != 'ACT_JAX_TRACEBACK'}
  env.update(JAX_PLATFORMS='cpu', **(env_extra or {}))
  return subprocess.run([sys.executable, '-m'] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_bad_config_or_flag_prints_one_line_without_traceback(tmp_path):
  """Defect: the right message under 19 lines of traceback."""
  cases = [
      (['experiments.train', '--config=experiments/configs/lm.py:runlocall',
        f'--workdir={tmp_path}/a'],
       r"^error: --config=experiments/configs/lm\.py:runlocall: unknown config arg\(s\)"),
      (['experiments.train', '--config=experiments/configs/lm.py:runlocal',
        '--config.model.num_heads=5', f'--workdir={tmp_path}/b'],
       r'^error: model\.num_heads=5: must divide model\.d_model=32'),
      (['experiments.evaluate', f'--workdir={tmp_path}/none'],
       r'^error: workdir .* does not exist'),
      (['experiments.generate', f'--workdir={os.path.join(V1, "act_dense")}',
        '--threshold=1.5'], r'^error: --threshold=1\.5: must be a finite number in \(0, 1\]'),
  ]
  # one interpreter per binary (conftest.binary_cases): train's two refusals share one
  procs = binary_cases('experiments.train', [a[1:] for a, _ in cases[:2]]) + \
      [_binary(a) for a, _ in cases[2:]]
  for (args, pattern), p in zip(cases, procs):
    assert p.returncode == 2, (args, p.stdout, p.stderr)
    lines = [l for l in p.stderr.splitlines() if l.strip() and not l.startswith('WARNING')]
    assert len(lines) == 1 and re.search(pattern, lines[0]), (args, p.stderr)
    assert 'Traceback' not in p.stderr
  assert not os.path.exists(tmp_path / 'b' / 'checkpoints')  # nothing written
  p = _binary(cases[1][0], {'ACT_JAX_TRACEBACK': '1'})
  assert p.returncode != 0 and 'Traceback' in p.stderr and 'ConfigError' in p.stderr


def test_evaluate_prints_an_evaluation_summary_of_its_own():
  """Defect: evaluate printed the training summary ('700 steps, 0.0 min', and a pointer to
  metrics files it did not write)."""
  run = os.path.join(V1, 'act_dense')
  logs = []
  operating_point.evaluate_run(run, [0.5, None], num_batches=1, log=logs.append)
  assert len(logs) == 2
  first = logs[0].splitlines()
  assert first[0] == f'== evaluation of {run} (checkpoint step 2) =='
  assert first[1].startswith('operating point: threshold 0.5 (--threshold); 1 held-out '
                             'batches of 4x32')
  assert 'threshold 0.99 (the policy default)' in logs[1]
  for text in logs:
    assert 'held-out loss' in text and 'mean layers executed' in text
    assert 'min) ==' not in text and 'metrics.jsonl' not in text


def test_a_first_run_without_a_tpu_prints_no_libtpu_noise():
  """With the tpu extra installed, importing the binaries' package on a machine without TPU
  chips picks the other platforms before JAX probes libtpu: no libtpu warning or error."""
  from act_jax import platforms
  env = {}
  got = platforms.quiet_tpu_probe(env)
  if importlib.util.find_spec('libtpu') is None or platforms.tpu_present():
    assert got is None and not env
    pytest.skip('libtpu not installed, or this host has a TPU: nothing to quiet')
  assert got == env['JAX_PLATFORMS'] and got.endswith('cpu')
  assert platforms.quiet_tpu_probe({'JAX_PLATFORMS': 'tpu'}) is None  # explicit wins
  assert platforms.quiet_tpu_probe({'TPU_NAME': 'v5e'}) is None  # a TPU VM
  child_env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  out = subprocess.run([sys.executable, '-c', 'import experiments, jax; print(jax.devices())'],
                       cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  noise = [l for l in out.stderr.splitlines() if 'TPU' in l or 'libtpu' in l or 'E0000' in l]
  assert not noise, noise
