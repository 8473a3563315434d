"""One flag vocabulary (experiments/vocabulary.py): every binary's flags come from it, every
bad value of every flag is refused in one line before any work, renamed flags still work,
docs/binaries.md is current, and every command the README and docs show parses."""
import glob
import os
import re
import shlex

import pytest
from absl import flags

from experiments import flag_error_line
from experiments import vocabulary as vocab
from tests.conftest import REPO, binary_cases

A_FILE = 'setup.py'  # an existing file, given where a directory belongs


# ----------------------------------------------------------------------------- the parsers
def test_number_parsers_say_what_is_allowed():
  slots = vocab.CONCEPTS['slots'].parser
  assert slots.parse('3') == 3 and slots.parse(3) == 3
  for bad in ('abc', '0', '-1', '2.5', ''):
    with pytest.raises(ValueError, match=r'^must be an integer >= 1$'):
      slots.parse(bad)
  thr = vocab.CONCEPTS['threshold'].parser
  assert thr.parse('1') == 1.0 and thr.parse('0.25') == 0.25
  for bad in ('0', '1.01', 'nan', 'inf', '-inf', 'x'):
    with pytest.raises(ValueError, match=r'^must be a finite number in \(0, 1\]$'):
      thr.parse(bad)
  assert vocab.CONCEPTS['tolerance'].parser.describe() == 'a finite number in (0, 1)'
  assert vocab.CONCEPTS['budget_bits'].parser.describe() == 'a finite number in [4, 8]'


def test_list_parsers_check_every_element_and_refuse_empty():
  caps = vocab.CONCEPTS['caps'].parser
  assert caps.parse('0, 4,2') == [0, 4, 2]
  assert caps.parse(['3', '4']) == [3, 4]  # a binary's default, given as strings
  with pytest.raises(ValueError, match=r"^'x' must be an integer >= 0$"):
    caps.parse('0,x')
  with pytest.raises(ValueError, match='^must not be empty'):
    caps.parse('')
  with pytest.raises(ValueError, match='has an empty element'):
    caps.parse('1,,2')
  schemes = vocab.CONCEPTS['schemes'].parser
  assert schemes.parse('w8,auto') == ['w8', 'auto']
  with pytest.raises(ValueError, match=r"^'int3' must be one of w8, w4, w8a8, auto$"):
    schemes.parse('w8,int3')
  points = vocab.CONCEPTS['efficiency_points'].parser
  assert points.parse('0.9,0.8@4') == ['0.9', '0.8@4']
  with pytest.raises(ValueError, match='THRESHOLD@CAP'):
    points.parse('0.9@0')


def test_choices_come_from_the_library():
  """--kv_fill, --scheme, --retrieve: the library's tuple, not a copy that can drift."""
  from act_jax.infer import inference
  from act_jax.model import quant
  from act_jax.model.retrieval import arm
  assert vocab.CONCEPTS['kv_fill'].parser.choices == inference.KV_FILL
  assert vocab.CONCEPTS['scheme'].parser.choices == tuple(quant.SCHEMES)
  assert vocab.CONCEPTS['retrieve'].parser.choices == arm.MODES


def test_a_file_where_a_directory_belongs_is_refused(tmp_path):
  out = vocab.CONCEPTS['out'].parser
  (tmp_path / 'f').write_text('x')
  with pytest.raises(ValueError, match='is a file; give a directory'):
    out.parse(str(tmp_path / 'f'))
  assert out.parse(str(tmp_path / 'new')) == str(tmp_path / 'new')  # created later
  with pytest.raises(ValueError, match='must not be empty'):
    out.parse('')


def test_renamed_flags_are_rewritten_with_one_warning(monkeypatch):
  monkeypatch.setattr(vocab, 'RENAMED', {'seeds': 'num_seeds', 'json_out': 'out'})
  monkeypatch.setattr(vocab, 'RETIRED', {'json': 'write --out=DIR'})
  warnings = []
  argv = ['prog', '--seeds=3', '--workdir', 'w', '--json_out', 'd', '--', '--seeds=9']
  assert vocab.rewrite_argv(argv, warnings.append) == [
      'prog', '--num_seeds=3', '--workdir', 'w', '--out', 'd', '--', '--seeds=9']
  assert warnings == ['warning: --seeds is now --num_seeds; the old name will be removed',
                      'warning: --json_out is now --out; the old name will be removed']
  with pytest.raises(ValueError, match='^--json: write --out=DIR$'):
    vocab.rewrite_argv(['prog', '--json=x.json'], warnings.append)
  monkeypatch.setattr(vocab, 'RENAMED', {'layer_table': 'tables'})
  assert vocab.rewrite_argv(['prog', '--nolayer_table'], warnings.append) == ['prog',
                                                                               '--notables']


def test_defined_flags_parse_as_the_vocabulary_says():
  fv = flags.FlagValues()
  quality = vocab.define('quality', flag_values=fv)  # a boolean: bare --name / --noname
  caps = vocab.define('caps', ['3', '4'], flag_values=fv)
  slots = vocab.define('slots', flag_values=fv)
  vocab.define('workdir', required=True, flag_values=fv)
  fv(['p', '--noquality', '--workdir=w'])
  assert (quality.value, caps.value, slots.value) == (False, [3, 4], 8)
  fv.unparse_flags()
  fv(['p', '--quality', '--caps=0,8', '--slots', '5', '--workdir=w'])
  assert (quality.value, caps.value, slots.value) == (True, [0, 8], 5)
  for argv, match in ((['p', '--slots=0', '--workdir=w'], '--slots=0: must be an integer >= 1'),
                      (['p'], '--workdir must have a value')):
    fv.unparse_flags()
    with pytest.raises(flags.IllegalFlagValueError, match=match):
      fv(argv)
  assert 'an integer >= 1' in fv.module_help(__name__)  # --helpshort shows what is allowed
  with pytest.raises(KeyError, match='not in the flag vocabulary'):
    vocab.define('no_such_concept', flag_values=fv)


def test_absl_parse_errors_become_one_line():
  fv = flags.FlagValues()
  flags.DEFINE_integer('slots', 8, 'x', flag_values=fv)
  flags.DEFINE_string('workdir', None, 'x', flag_values=fv)
  flags.mark_flag_as_required('workdir', flag_values=fv)
  lines = []
  for argv in (['p', '--slotz=1', '--workdir=w'], ['p'], ['p', '--slots=x', '--workdir=w']):
    fv.unparse_flags()
    with pytest.raises(flags.Error) as e:
      fv(argv)
    lines.append(flag_error_line(e.value))
  assert lines[0].startswith('--slotz: unknown flag (did you mean --slots?)')
  assert lines[1] == '--workdir is required'
  assert lines[2].startswith('--slots=x: ')


# ----------------------------------------------------------------------------- the binaries
BINARIES = vocab.binaries()


def test_binaries_define_flags_only_through_the_vocabulary():
  used = set()
  for b in BINARIES:
    found = vocab.binary_flags(b)
    assert not found.direct, f'experiments/{b}.py defines {found.direct} without vocab.define'
    assert found.defined, f'experiments/{b}.py defines no flag through the vocabulary'
    unknown = set(found.defined) - set(vocab.CONCEPTS)
    assert not unknown, f'experiments/{b}.py: {unknown} not in experiments/vocabulary.py'
    assert len(found.defined) == len(set(found.defined)), b
    for old, new in found.renamed.items():
      assert new in found.defined and old not in found.defined, (b, old, new)
    used |= set(found.defined)
  assert set(vocab.CONCEPTS) == used, f'unused: {set(vocab.CONCEPTS) - used}'
  assert len(BINARIES) == 22, BINARIES


def test_docs_binaries_page_is_current():
  with open(os.path.join(REPO, 'docs', 'binaries.md')) as f:
    assert f.read() == vocab.markdown(), ('docs/binaries.md is stale: run python -m '
                                          'experiments.vocabulary > docs/binaries.md')


def _bad_values(name: str) -> list[str]:
  """Bad values of --name's kind: wrong type, out of bounds, not finite, not a choice, an
  empty list, a bad element, a file where a directory belongs."""
  parser = vocab.CONCEPTS[name].parser
  if parser is None:  # a config file
    return ['no/such/config.py', 'experiments/configs/lm.py:no_such_arg']
  if isinstance(parser, vocab._Bool):
    return ['maybe']
  if isinstance(parser, vocab._List):
    return ([] if parser.allow_empty else ['']) + [','.join(_bad_values_of(parser.element)[:1]
                                                            * 2)]
  return _bad_values_of(parser)


def _bad_values_of(parser) -> list[str]:
  if isinstance(parser, vocab._Number):
    out = ['abc']
    if parser.lower is not None:
      out.append(str(parser.lower - 1))
    if parser.upper is not None:
      out.append(str(parser.upper * 2 + 1))
    if parser.kind is float:
      out += ['nan', 'inf']
    return out
  if isinstance(parser, vocab._Choice):
    return ['bogus']
  if isinstance(parser, vocab._Text):
    out = [A_FILE] if parser.check is vocab._directory else []
    if parser.check in (vocab._host_port, vocab._topology, vocab._point, vocab._moe_case):
      out.append('x:0x')
    return out + ([''] if parser.nonempty else [])
  raise AssertionError(parser)


@pytest.mark.parametrize('binary', BINARIES)
def test_every_bad_flag_value_is_one_line_and_exit_2(binary, tmp_path):
  """For each flag of the binary, each bad value of its kind: exactly one stderr line naming
  the flag, exit 2, nothing written. Also: an unknown flag, a renamed flag given a bad value
  (warning + the error under the new name), a retired flag, and no arguments where a flag is
  required. A new flag gets its rows here without anyone writing them."""
  found = vocab.binary_flags(binary)
  cases, expect = [], []
  for name in found.defined:
    for bad in _bad_values(name):
      cases.append([f'--{name}={bad}'])
      expect.append(([], f'error: --{name}' + ('=' if name != 'config' else '')))
  cases.append(['--no_such_flag=1'])
  expect.append(([], 'error: --no_such_flag: unknown flag'))
  for old, new in found.renamed.items():
    bad = _bad_values(new)[0]
    cases.append([f'--{old}={bad}'])
    expect.append(([f'warning: --{old} is now --{new}; the old name will be removed'],
                   f'error: --{new}='))
  for old in found.retired:
    cases.append([f'--{old}=x'])
    expect.append(([], f'error: --{old}: '))
  source = open(os.path.join(vocab.EXPERIMENTS, f'{binary}.py')).read()
  if 'required=True' in source:
    cases.append([])
    expect.append(([], 'error: --'))
  before = sorted(os.listdir(REPO))
  procs = binary_cases(f'experiments.{binary}', cases)
  for args, (warnings, start), p in zip(cases, expect, procs):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (binary, args, p.returncode, p.stderr[-2000:])
    assert lines[:-1] == warnings and lines[-1].startswith(start), (binary, args, p.stderr)
    assert p.stdout == '', (binary, args, p.stdout[-500:])
  assert sorted(os.listdir(REPO)) == before


# ----------------------------------------------------------------------------- the docs
def _documented_commands() -> list[tuple[str, str, list[str]]]:
  """(where, binary, args) of every `python -m experiments.X ...` in the README, docs/,
  the binaries' and configs' docstrings and the Colab notebooks."""
  files = ([os.path.join(REPO, 'README.md')] + sorted(glob.glob(os.path.join(REPO, 'docs',
                                                                            '*.md'))) +
           sorted(glob.glob(os.path.join(REPO, 'experiments', '**', '*.py'), recursive=True)))
  out = []
  for path in files:
    text = open(path).read().replace('\\\n', ' ')
    for m in re.finditer(r'python -m experiments\.(\w+)([^\n`|]*)', text):
      where = f'{os.path.relpath(path, REPO)}: {m.group(0)[:90]}'
      rest = m.group(2).split('#')[0].split(' && ')[0]
      try:
        args = shlex.split(rest)
      except ValueError:
        args = rest.split()
      out.append((where, m.group(1), args))
  return out


def test_documented_commands_use_flags_the_binary_takes():
  """Every command the README and docs show parses: its binary exists, each flag is one the
  binary defines (under its current name), and each concrete value is one its flag
  accepts. Placeholders (RUN, DIR, ...) stand for a value and are not parsed."""
  commands = _documented_commands()
  assert len(commands) > 80, len(commands)
  builtins = {'verbose', 'helpshort', 'helpfull', 'help'}
  problems = []
  for where, binary, args in commands:
    if binary in ('vocabulary', 'NAME'):
      continue
    if binary not in BINARIES:
      problems.append(f'{where}: no binary experiments.{binary}')
      continue
    defined = set(vocab.binary_flags(binary).defined)
    for arg in args:
      if arg == '--':
        break  # the rest belongs to another command (launch_local) or to overrides
      if not arg.startswith('--') or arg.startswith('--config.'):
        continue
      name, _, value = arg[2:].partition('=')
      base = name[2:] if name.startswith('no') and name[2:] in defined else name
      if base in builtins:
        continue
      if base not in defined:
        problems.append(f'{where}: --{base} is not a flag of {binary}')
        continue
      parser = vocab.CONCEPTS[base].parser
      if not value or parser is None or re.search(r'[A-Z]{3}|\.\.\.|\$|<', value):
        continue
      try:
        parser.parse(value)
      except ValueError as e:
        problems.append(f'{where}: --{base}={value}: {e}')
  assert not problems, '\n'.join(problems)
