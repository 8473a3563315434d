"""Every foreseeable user error is one line (#27), beyond flag values (tests/test_flags.py):
files a user edits or brings (config.json, calibration.json, quant.json, datastore.json, an
export, a trace), output directories that hold something else, flags that conflict, too
little data, more bytes than the context. Each case, run as the binary runs it: exactly one
stderr line `error: <what it names> ...`, exit 2, and the file tree left as it was."""
import hashlib
import json
import os

import pytest

from act_jax.deploy import export
from experiments import vocabulary as vocab
from tests.conftest import binary_cases

LM = 'experiments/configs/lm.py:runlocal'


def _tree(root: str) -> dict[str, str]:
  out = {}
  for d, dirs, files in os.walk(root):
    out.update({os.path.relpath(os.path.join(d, name), root): 'dir' for name in dirs})
    for name in files:
      with open(os.path.join(d, name), 'rb') as f:
        out[os.path.relpath(os.path.join(d, name), root)] = hashlib.sha1(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def inputs(shared_runs, tmp_path_factory):
  """A tree of good and damaged inputs, built once: copies of the shared 'lm' run with one
  file broken each, a non-empty directory of something else, bad traces, a broken export."""
  root = str(tmp_path_factory.mktemp('inputs'))
  p = lambda *a: os.path.join(root, *a)  # noqa: E731
  good = shared_runs.copy('lm', p('good'))
  for name, file, text in (('bad_config', 'config.json', '{"model": {'),
                           ('bad_cal', 'calibration.json',
                            json.dumps({'chosen_threshold': 7.5, 'max_layers': None})),
                           ('cal_not_json', 'calibration.json', '{chosen')):
    shared_runs.copy('lm', p(name))
    with open(p(name, file), 'w') as f:
      f.write(text)
  os.makedirs(p('stuff'))
  with open(p('stuff', 'notes.txt'), 'w') as f:
    f.write('a user\'s file')
  for name, line in (('surrogate', '{"arrival_s": 0, "prompt": "\\ud800x", "max_new": 4}'),
                     ('arrival', '{"arrival_s": 1e308, "prompt": "def f(", "max_new": 4}'),
                     ('max_new', '{"arrival_s": 0, "prompt": "def f(", "max_new": 1e12}'),
                     ('too_long', '{"arrival_s": 0, "prompt": "def f(", "max_new": 100000}')):
    with open(p(f'{name}.jsonl'), 'w') as f:
      f.write(line + '\n')
  os.makedirs(p('bad_quant'))
  with open(p('bad_quant', 'quant.json'), 'w') as f:
    f.write('nope')
  os.makedirs(p('bad_ds'))
  with open(p('bad_ds', 'datastore.json'), 'w') as f:
    json.dump({'d_model': 'wide'}, f)
  os.makedirs(p('bad_manifest'))
  with open(p('bad_manifest', 'manifest.json'), 'w') as f:
    json.dump({'config': {}}, f)
  export.export_run(good, p('damaged'), log=lambda s: None)
  npz = sorted(f for f in os.listdir(p('damaged')) if f.endswith('.npz'))[0]
  with open(p('damaged', npz), 'r+b') as f:  # a copy cut short
    f.truncate(os.path.getsize(p('damaged', npz)) // 2)
  return root


def _cases(root: str) -> dict[str, list[tuple[list[str], str]]]:
  """binary -> [(args, what its one error line starts with after `error: `)]."""
  p = lambda *a: os.path.join(root, *a)  # noqa: E731
  good, trace = p('good'), '--trace=poisson:rate=2,duration=1s'
  not_json = 'not valid JSON'
  return {
      'calibrate': [
          ([f'--workdir={p("bad_config")}'], f'{p("bad_config", "config.json")}: {not_json}'),
          ([f'--workdir={good}', '--budget_layers=3', '--tolerance=0.05'],
           '--tolerance=0.05: applies to Learn-then-Test'),
          ([f'--workdir={good}', '--num_batches=2', '--tolerance=0.001', '--risk=0.01'],
           'binomial Learn-then-Test at tolerance=0.001'),  # too little data
          ([f'--workdir={good}', f'--from_serving={p("stuff")}'],
           f'--from_serving={p("stuff")}: no shadow.jsonl there'),
          ([f'--workdir={good}', f'--from_serving={p("stuff")}', '--caps=0,2'],
           '--caps: applies to held-out calibration, not --from_serving'),
      ],
      'evaluate': [
          ([f'--workdir={p("bad_cal")}'],
           f'{p("bad_cal", "calibration.json")}: chosen_threshold=7.5: must be a number in '
           '(0, 1]'),
          ([f'--workdir={p("cal_not_json")}'],
           f'{p("cal_not_json", "calibration.json")}: {not_json}'),
          ([f'--workdir={good}', f'--datastore={p("bad_ds")}'],
           f'{p("bad_ds", "datastore.json")}: not written by experiments.datastore'),
      ],
      'generate': [
          ([f'--workdir={good}', '--max_new_tokens=100000'],
           '--max_new_tokens=100000: with the prompt'),
      ],
      'serve': [
          ([f'--workdir={good}', f'--trace={p("surrogate.jsonl")}', '--controller=fixed'],
           f'{p("surrogate.jsonl")}:1: prompt: character 0 is a lone surrogate'),
          ([f'--workdir={good}', f'--trace={p("arrival.jsonl")}', '--controller=fixed'],
           f'{p("arrival.jsonl")}:1: arrival_s=1e+308: must be a number in [0, '),
          ([f'--workdir={good}', f'--trace={p("max_new.jsonl")}', '--controller=fixed'],
           f'{p("max_new.jsonl")}:1: max_new='),
          ([f'--workdir={good}', f'--trace={p("too_long.jsonl")}', '--controller=fixed'],
           f'--trace={p("too_long.jsonl")}: all 1 requests would be refused'),
          # a generated trace that cannot fit the 32-byte context: up front, naming both
          ([f'--workdir={good}', '--trace=poisson:rate=20,duration=5s', '--controller=fixed'],
           '--trace=poisson:rate=20,duration=5s: prompt=16-64 + new=16-48 bytes reach 112, '
           'past the model context 32'),
          ([f'--workdir={good}', trace, '--listen=127.0.0.1:8000', '--controller=fixed'],
           'give --trace=... (replay a trace) or --listen=host:port'),
          ([f'--workdir={good}', '--listen=127.0.0.1:8000', '--classes=fast=100,fast=200'],
           '--classes: fast, fast: each class once'),
          ([f'--workdir={good}', '--listen=localhost', '--controller=fixed'],
           '--listen=localhost: must be host:port'),
          ([f'--workdir={good}', trace, '--controller=fixed', f'--out={p("stuff")}'],
           f'--out={p("stuff")}: a non-empty directory that is not the output of a serve run'),
          ([f'--workdir={p("bad_cal")}', trace, '--controller=fixed'],
           f'{p("bad_cal", "calibration.json")}: chosen_threshold=7.5'),
          ([f'--workdir={good}', trace, '--controller=fixed', '--shadow_fraction=1.5'],
           '--shadow_fraction=1.5'),
          ([f'--workdir={good}', trace, '--controller=fixed', '--mode=exact',
            '--shadow_fraction=0.5'], '--shadow_fraction: exact mode serves full-depth'),
          ([f'--workdir={good}', '--listen=127.0.0.1:8000', '--controller=fixed',
            f'--out={p("new_listen")}'], '--out with --listen holds the drift monitor'),
      ],
      'quantize': [
          ([f'--workdir={good}', f'--out={p("stuff")}'],
           f'--out={p("stuff")}: a non-empty directory that is not a quantized run'),
          ([f'--workdir={good}', f'--out={p("bad_quant")}'],
           f'{p("bad_quant", "quant.json")}: {not_json}'),
      ],
      'transfer': [
          (['--import', f'--src={p("bad_manifest")}', f'--workdir={p("new_a")}'],
           f'{p("bad_manifest", "manifest.json")}: not a manifest export_run wrote'),
          (['--import', f'--src={p("damaged")}', f'--workdir={p("new_b")}'],
           f'{p("damaged")}/weights'),
          (['--export', f'--workdir={good}', f'--out={p("stuff")}'],
           f'--out={p("stuff")}: a non-empty directory that is not an export'),
          (['--import', f'--src={p("damaged")}', f'--workdir={p("new_c")}', '--max_file_mb=1'],
           '--max_file_mb=1.0: applies with --export'),
      ],
      'train': [([f'--config={LM}', f'--workdir={p("stuff")}'],
                 f'--workdir={p("stuff")}: a non-empty directory that is not a training run')],
      'sweep_seeds': [([f'--config={LM}', f'--workdir={p("stuff")}'],
                       f'--workdir={p("stuff")}: a non-empty directory that is not a seed sweep')],
      'report': [([f'--workdir={good}', f'--out={p("stuff")}'],
                  f'--out={p("stuff")}: a non-empty directory that is not a report')],
      'datastore': [([f'--workdir={good}', '--files=setup.py', f'--out={p("stuff")}'],
                     f'--out={p("stuff")}: a non-empty directory that is not a datastore')],
      'compare': [
          ([p('cal_not_json'), p('nowhere'), f'--out={p("cmp")}'],
           f'no metrics file at {p("nowhere", "metrics.jsonl")}'),
          ([p('bad_config'), f'--out={p("cmp")}'], f'{p("bad_config", "config.json")}: '
                                                   f'{not_json}'),
      ],
      'launch_local': [(['--', 'no_such_command_xyz'], 'no_such_command_xyz: no such command')],
      'benchmark_serving': [([f'--workdir={good}', '--trace=poison:rate=1'],
                             "trace 'poison:rate=1'")],
      'loadgen': [(['--url=http://127.0.0.1:9', trace],
                   f'{trace}: generated requests have no prompt text'),
                  (['--url=127.0.0.1:9', trace], '--url=127.0.0.1:9: must be http://host:port')],
  }


# Binaries that read a run (--workdir): the other arguments each needs so that reading the
# run's config.json is the first thing that fails. A binary that takes --workdir must be
# here or in WRITES_RUN: a new one fails test_every_binary_that_reads_a_run_has_a_row.
READS_RUN = {
    'benchmark_inference': [], 'benchmark_quant': ['--out=NEW'], 'benchmark_retrieval': [],
    'benchmark_serving': [], 'calibrate': [], 'datastore': ['--files=setup.py', '--out=NEW'],
    'evaluate': [], 'frontier': [], 'generate': [], 'quantize': ['--out=NEW'], 'report': [],
    'serve': ['--trace=poisson:rate=2,duration=1s', '--controller=fixed'],
    'loadgen': ['--url=http://127.0.0.1:9', '--trace=poisson:rate=2,duration=1s'],
    'transfer': ['--export', '--out=NEW'],
}
WRITES_RUN = {'train', 'sweep_seeds'}  # --workdir is created (or resumed): rows above


def _all_cases(root: str) -> dict[str, list[tuple[list[str], str]]]:
  """_cases plus, for every binary that reads a run, that run's config.json damaged."""
  cases = _cases(root)
  bad = os.path.join(root, 'bad_config')
  for binary, extra in READS_RUN.items():
    args = [a.replace('NEW', os.path.join(root, f'new_{binary}')) for a in extra]
    cases.setdefault(binary, []).append(
        ([f'--workdir={bad}'] + args, f'{bad}/config.json: not valid JSON'))
  return cases


def test_every_binary_that_reads_a_run_has_a_row():
  takes_workdir = {b for b in vocab.binaries() if 'workdir' in vocab.binary_flags(b).defined}
  assert takes_workdir == set(READS_RUN) | WRITES_RUN, (
      'add the binary to READS_RUN (with the arguments it needs) or WRITES_RUN: '
      f'{sorted(takes_workdir ^ (set(READS_RUN) | WRITES_RUN))}')


CASES = _all_cases('ROOT')


@pytest.mark.parametrize('binary', sorted(CASES))
def test_bad_inputs_are_one_line_and_change_nothing(inputs, binary):
  cases = _all_cases(inputs)[binary]
  before = _tree(inputs)
  procs = binary_cases(f'experiments.{binary}', [args for args, _ in cases])
  for (args, start), proc in zip(cases, procs):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (binary, args, proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(f'error: {start}'), (binary, args,
                                                                         proc.stderr[-3000:])
  assert _tree(inputs) == before, f'{binary}: a refused command changed the files'
