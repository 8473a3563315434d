r"""One flag vocabulary: every flag any binary takes is defined here once.

A concept (`--workdir`, `--thresholds`, `--max_new_tokens`, ...) has one name, one type, one
set of allowed values and one meaning across all binaries. A binary picks the concepts it
takes with `define(name)`, and may give its own default and help text; the type, the bounds
and the choices always come from here. So:

- a value is checked when the flags are parsed, before any work: wrong type, out of bounds,
  not finite, not one of the choices, an empty list, a file where a directory belongs. The
  error is one line naming the flag (`error: --slots=0: must be an integer >= 1`, exit 2;
  experiments/__init__.py turns absl's parse errors into that line);
- singular names hold one value, plural names a comma-separated list of the same values
  (`--threshold` / `--thresholds`, `--scheme` / `--schemes`; `--max_layers` one depth cap,
  `--caps` several);
- `--out` is always a directory: a binary writes its files into it;
- a flag that was renamed keeps working under its old name for a while, with a one-line
  warning (`renamed`); one whose meaning changed is refused with a line that says what to
  write now (`retired`).

docs/binaries.md is generated from this table and the binaries' `define` calls
(`python -m experiments.vocabulary > docs/binaries.md`); tests/test_flags.py checks that it
is current, that binaries define flags only through here, and that every command in the
README and docs parses.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Sequence

from absl import flags

_UNSET = object()


# ----------------------------------------------------------------------------- parsers
class _Described(flags.ArgumentParser):
  """A parser whose allowed values show in --helpshort and in docs/binaries.md."""

  def describe(self) -> str:
    raise NotImplementedError

  @property
  def syntactic_help(self) -> str:
    return self.describe()


class _Number(_Described):
  """An int or a finite float within bounds; the error says what is allowed."""

  def __init__(self, kind: type, lower: float | None = None, upper: float | None = None,
               open_lower: bool = False, open_upper: bool = False):
    super().__init__()
    self.kind, self.lower, self.upper = kind, lower, upper
    self.open_lower, self.open_upper = open_lower, open_upper

  def describe(self) -> str:
    what = 'an integer' if self.kind is int else 'a finite number'
    lo, hi = self.lower, self.upper
    if lo is not None and hi is not None:
      return (f'{what} in {"(" if self.open_lower else "["}{lo:g}, {hi:g}'
              f'{")" if self.open_upper else "]"}')
    if lo is not None:
      return f'{what} {">" if self.open_lower else ">="} {lo:g}'
    if hi is not None:
      return f'{what} {"<" if self.open_upper else "<="} {hi:g}'
    return what

  def parse(self, argument: Any) -> Any:
    if isinstance(argument, bool):
      raise ValueError(f'must be {self.describe()}')
    if isinstance(argument, str):
      try:
        value = self.kind(argument.strip())
      except ValueError:
        raise ValueError(f'must be {self.describe()}') from None
    else:
      value = argument
    if self.kind is float and not math.isfinite(value):
      raise ValueError(f'must be {self.describe()}')
    lo, hi = self.lower, self.upper
    if ((lo is not None and (value < lo or (self.open_lower and value == lo))) or
        (hi is not None and (value > hi or (self.open_upper and value == hi)))):
      raise ValueError(f'must be {self.describe()}')
    return value

  def flag_type(self) -> str:
    return 'int' if self.kind is int else 'float'


class _Choice(_Described):
  """One of a fixed set of names (given, or read from the library when first defined)."""

  def __init__(self, choices: Sequence[str] | str):
    super().__init__()
    self._choices = choices

  @property
  def choices(self) -> tuple[str, ...]:
    if isinstance(self._choices, str):  # 'module:ATTR': the library owns the list
      module, attr = self._choices.split(':')
      self._choices = tuple(getattr(importlib.import_module(module), attr))
    return tuple(self._choices)

  def describe(self) -> str:
    return 'one of ' + ', '.join(self.choices)

  def parse(self, argument: Any) -> str:
    value = str(argument).strip()
    if value not in self.choices:
      raise ValueError(f'must be {self.describe()}')
    return value

  def flag_type(self) -> str:
    return 'enum'


class _Text(_Described):
  """Free text, optionally checked by a function that raises ValueError with the reason."""

  def __init__(self, what: str = 'text', check: Callable[[str], None] | None = None,
               nonempty: bool = False):
    super().__init__()
    self.what, self.check, self.nonempty = what, check, nonempty

  def describe(self) -> str:
    return self.what

  def parse(self, argument: Any) -> str:
    value = str(argument)
    if self.nonempty and not value.strip():
      raise ValueError(f'must not be empty: give {self.what}')
    if self.check is not None:
      self.check(value)
    return value

  def flag_type(self) -> str:
    return 'string'


class _List(_Described):
  """A comma-separated list; every element parsed (and checked) by `element`."""

  def __init__(self, element: flags.ArgumentParser, allow_empty: bool = False):
    super().__init__()
    self.element, self.allow_empty = element, allow_empty

  def describe(self) -> str:
    return f'a comma-separated list, each {self.element.describe()}'

  def parse(self, argument: Any) -> list[Any]:
    if isinstance(argument, (list, tuple)):  # a binary's default: may be empty
      return [self.element.parse(item) for item in argument]
    text = str(argument).strip()
    items = [s.strip() for s in text.split(',')] if text else []
    if not items and not self.allow_empty:
      raise ValueError(f'must not be empty: give {self.describe()}')
    out = []
    for item in items:
      try:
        out.append(self.element.parse(item))
      except ValueError as e:
        raise ValueError(f'{item!r} {e}' if str(item) else f'has an empty element; {e}'
                         ) from None
    return out

  def flag_type(self) -> str:
    return 'list'


class _Bool(flags.BooleanParser):
  def describe(self) -> str:
    return 'true or false (--name / --noname)'


# ----------------------------------------------------------------------------- checks
def _directory(value: str) -> None:
  """A path where a directory is or will be: never an existing file."""
  if value and os.path.exists(value) and not os.path.isdir(value):
    raise ValueError('is a file; give a directory')


def _config_file(value: str) -> None:
  if not os.path.isfile(value.partition(':')[0]):
    raise ValueError('no such config file; give path[:arg], e.g. experiments/configs/lm.py')


def _config_path(value: str) -> None:
  """A config handed on to other processes: loaded here once, so its errors show now."""
  _config_file(value)
  from act_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  path, sep, arg = value.partition(':')
  spec = importlib.util.spec_from_file_location('_checked_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    module.get_config(*([arg] if sep else []))
  except ConfigError as e:
    raise ValueError(str(e)) from None


def _host_port(value: str) -> None:
  host, sep, port = value.rpartition(':')
  if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
    raise ValueError('must be host:port, e.g. 10.0.0.2:8476')


def _latency_class(value: str) -> None:
  name, sep, ms = value.partition('=')
  try:
    ok = bool(sep and name.isidentifier() and math.isfinite(float(ms)) and float(ms) > 0)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError('must be NAME=P95_MS, NAME an identifier, P95_MS > 0')


def _url(value: str) -> None:
  scheme, sep, rest = value.partition('://')
  if scheme not in ('http', 'https') or not sep:
    raise ValueError('must be http://host:port')
  _host_port(rest.rstrip('/'))


def _topology(value: str) -> None:
  from act_jax.deploy import aot  # pylint: disable=import-outside-toplevel
  from act_jax.errors import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    aot.parse_topology(value)
  except ConfigError as e:
    raise ValueError(str(e).split(': ', 1)[-1]) from None


def _point(value: str) -> None:
  thr, _, cap = value.partition('@')
  try:
    ok = 0 < float(thr) <= 1 and (not cap or int(cap) >= 1)
  except ValueError:
    ok = False
  if not ok:
    raise ValueError('must be THRESHOLD or THRESHOLD@CAP, THRESHOLD in (0, 1], CAP >= 1')


def _moe_case(value: str) -> None:
  from act_jax.model.moe.routers import ROUTERS  # pylint: disable=import-outside-toplevel
  router, sep, dispatch = value.partition(':')
  if not sep or router not in ROUTERS or dispatch not in ('gather', 'einsum'):
    raise ValueError(f'must be ROUTER:DISPATCH, ROUTER one of {", ".join(ROUTERS)}, '
                     'DISPATCH gather or einsum')


# ----------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Concept:
  name: str
  parser: flags.ArgumentParser | None  # None: an ml_collections config file
  default: Any
  help: str


def _int(lo: int | None = None, hi: int | None = None) -> _Number:
  return _Number(int, lo, hi)


def _float(lo: float | None = None, hi: float | None = None, open_lower: bool = False,
           open_upper: bool = False) -> _Number:
  return _Number(float, lo, hi, open_lower, open_upper)


_UNIT = dict(lo=0.0, hi=1.0, open_lower=True)          # (0, 1]
_FRACTION = dict(lo=0.0, hi=1.0, open_lower=True, open_upper=True)  # (0, 1)
_KV_FILL = 'act_jax.infer.inference:KV_FILL'
_SCHEMES = 'act_jax.model.quant:SCHEMES'
_RETRIEVE = 'act_jax.model.retrieval.arm:MODES'

_CONCEPTS = [
    # --- runs and files
    Concept('config', None, None, 'Config file, path[:arg] (experiments/configs/*.py), then '
            '--config.FIELD=VALUE overrides.'),
    Concept('workdir', _Text('a directory', _directory, nonempty=True), None,
            'A run directory (config.json, checkpoints/, metrics.jsonl).'),
    Concept('out', _Text('a directory', _directory, nonempty=True), None,
            'Output directory: the binary writes its files into it.'),
    Concept('src', _Text('a directory', _directory, nonempty=True), None,
            'An export directory to read (experiments.transfer --export wrote it).'),
    Concept('datastore', _Text('a directory', _directory, nonempty=True), None,
            'A kNN datastore of the run (experiments.datastore).'),
    Concept('fallback_workdir', _Text('a directory', _directory), None,
            'A run with moe.shared_experts >= 1 (the generalist fallback).'),
    Concept('files', _Text('a glob', nonempty=True), None,
            'Glob of text / code files (recursive **).'),
    Concept('trace', _Text('poisson:..., bursty:... or a .jsonl file', nonempty=True), None,
            'Request trace: poisson:rate=R,duration=D, bursty:base=B,peak=P,duration=D or a '
            '.jsonl file.'),
    Concept('prompt', _Text(), 'def fib(n):', 'Prompt text.'),
    # --- the operating point
    Concept('mode', _Choice(('threshold', 'exact')), 'threshold',
            'threshold: approximate early exit at an operating point; exact: self-speculative '
            'decoding, output identical to full depth.'),
    Concept('threshold', _float(**_UNIT), None,
            'Exit threshold in (0, 1] (default: the run\'s operating point).'),
    Concept('thresholds', _List(_float(**_UNIT)), None, 'Exit thresholds in (0, 1].'),
    Concept('max_layers', _int(1), None, 'Depth cap: tokens still running exit after this exit '
            'layer (default: the run\'s operating point).'),
    Concept('caps', _List(_int(0)), None, 'Depth caps, exit layers (0 = no cap).'),
    Concept('tolerance', _float(**_FRACTION), 0.01, 'Allowed relative accuracy drop (or, '
            'calibrate --measure=consistency, fraction of tokens differing from full depth).'),
    Concept('risk', _float(**_FRACTION), 0.05, 'Probability that the guarantee fails (delta).'),
    Concept('measure', _Choice(('consistency', 'accuracy')), 'consistency',
            'What the tolerance bounds (accuracy: empirical-Bernstein LTT).'),
    Concept('method', _Choice(('binomial', 'hoeffding')), 'binomial', 'LTT p-value.'),
    Concept('budget_layers', _float(0.0, open_lower=True), None,
            'Instead of a tolerance: meet this mean-layers budget.'),
    Concept('num_batches', _int(1), None, 'Held-out batches (default: config.train.eval_batches).'),
    # --- decoding
    Concept('max_new_tokens', _int(1, 1_000_000), 64, 'Bytes generated per prompt.'),
    Concept('prompt_len', _int(1), 32, 'Held-out prompt bytes.'),
    Concept('kv_fill', _Choice(_KV_FILL), 'project', 'K/V of skipped layers: project (at once), '
            'lazy (the same values, filled when a later token first needs them) or copy.'),
    Concept('draft_layer', _int(1), None, 'Exact mode: the drafting exit layer (default: the '
            'fastest measured on held-out prompts).'),
    Concept('draft_len', _int(1), None, 'Exact mode: bytes drafted per verify step (default: '
            'the fastest measured on held-out prompts).'),
    Concept('temperature', _float(0.0), 0.0, 'Exact mode: 0 = greedy, > 0 = sampling.'),
    Concept('seed', _int(0), 0, 'Sampling seed.'),
    Concept('batch_sizes', _List(_int(1)), ['1', '8'], 'Decode batch sizes.'),
    Concept('repeats', _int(1), 5, 'Timed rounds per point (median).'),
    Concept('layer_table', _Bool(), True, 'Exact mode: also time every draft layer on code and '
            'prose prompts.'),
    # --- retrieval
    Concept('retrieve', _Choice(_RETRIEVE), 'gate', 'With --datastore: when a token retrieves.'),
    Concept('retrieve_modes', _List(_Choice(_RETRIEVE)), ['never', 'always', 'gate'],
            'With --datastore: the retrieval modes to compare.'),
    Concept('retrieve_threshold', _float(0.0, 1.0), None,
            'Retrieval gate threshold (default: the datastore\'s tuned one).'),
    Concept('neighbours', _int(1), None, 'Neighbours per retrieval (default: the datastore\'s).'),
    Concept('approx', _Bool(), False, 'Search with jax.lax.approx_max_k (TPU).'),
    Concept('spread', _Bool(), False, 'Held-out windows evenly spaced over the text instead of '
            'every document\'s beginning first.'),
    Concept('datastore_devices', _int(1), 1, 'Split the datastore over this many devices (its '
            'entries on the data axis; the model replicated).'),
    Concept('max_bytes', _int(1), 300_000, 'Bytes of the files to store (one entry per byte).'),
    Concept('tune_fraction', _float(0.0, 1.0, open_upper=True), 0.1, 'Share of the train '
            'documents kept out of the datastore to tune lam / tau and train the gate '
            '(0: no gate).'),
    Concept('chunk_windows', _int(1), 64, 'Windows per written (resumable) chunk.'),
    Concept('fallback_rate', _float(**_FRACTION), 0.02, 'In-domain fallback rate calibrated.'),
    Concept('keys', _List(_int(16)), ['100000', '1000000'], 'Datastore sizes (>= 16, the '
            'neighbours searched).'),
    Concept('skip', _List(_Choice(('1', '2', '3', '4')), allow_empty=True), [],
            'Tables to skip.'),
    # --- quantization
    Concept('scheme', _Choice(_SCHEMES), None, 'Weight quantization scheme.'),
    Concept('schemes', _List(_Choice(_SCHEMES)), None, 'Weight quantization schemes.'),
    Concept('budget_bits', _float(4.0, 8.0), None, '--scheme=auto: mean bits per quantized '
            'weight, 4..8.'),
    Concept('experts_only', _Bool(), False, 'Quantize only expert weights (routed and shared), '
            'not attention or dense FFNs.'),
    Concept('quantize_gates', _Bool(), False, 'Also quantize routers, halting units, exit '
            'classifiers and the unembedding (ablation; stored quantize-dequantized).'),
    Concept('tile', _int(0), 32, '4-bit weights: contraction entries per scale (0: one scale '
            'per output channel).'),
    Concept('recalibrate', _Bool(), True, 'Re-certify the run\'s operating point on the '
            'quantized model (OUT/calibration.json) when the run has one.'),
    # --- serving
    Concept('slo_p95_ms', _float(0.0, open_lower=True), None, 'p95 request latency budget (ms).'),
    Concept('controller', _Choice(('slo', 'fixed')), 'slo', 'slo: move along the certified '
            'points of calibration.json to meet the budget; fixed: one point.'),
    Concept('slots', _int(1), 8, 'Rows of the running batch.'),
    Concept('listen', _Text('host:port', _host_port), None, 'Serve HTTP on host:port instead of '
            'replaying a trace: POST /v1/completions, GET /metrics, GET /healthz.'),
    Concept('classes', _List(_Text('NAME=P95_MS', _latency_class)), [], 'Latency classes, '
            'tightest first: name=p95 budget in ms (e.g. interactive=500,batch=5000); a '
            'request names its class, each class has its own controller and point.'),
    Concept('prefill_chunk', _int(0), 64, 'Prompt tokens per prefill call (0: whole prompts); '
            'a decode step waits for at most one chunk.'),
    Concept('shadow_fraction', _float(0.0, 1.0), 0.0, 'Fraction of finished requests whose '
            'prompt is scored at every operating point in idle rounds (drift monitoring, '
            'act_jax/serve/monitor.py; 0: off).'),
    Concept('monitor_window', _int(1), 4096, 'Shadow tokens in the drift monitor\'s sliding '
            'window (the live Learn-then-Test).'),
    Concept('from_serving', _Text('a directory', _directory, nonempty=True), None,
            'A serving output folder with shadow.jsonl (serve --shadow_fraction): certify from '
            'its live shadow tokens instead of held-out data.'),
    Concept('url', _Text('http://host:port', _url), None, 'The server to send requests to.'),
    Concept('concurrency', _int(1), 64, 'Connections the load generator keeps open at most.'),
    Concept('allow_uncertified', _Bool(), False, 'Let the controller use points that failed '
            'the Learn-then-Test certification.'),
    Concept('compact', _Bool(), False, 'Rows that exited stop costing compute (buckets B, B/2, '
            '...) instead of waiting for the slowest row.'),
    Concept('steps_per_call', _int(1), 4, 'Decode steps per device call (admission and the '
            'controller act between calls).'),
    Concept('quality', _Bool(), True, 'After the replay, decode every request at full depth '
            'and report the bytes identical to it.'),
    Concept('static_batches', _Bool(), False, 'Baseline: wait for a full batch and run it to '
            'its longest request (no continuous batching).'),
    Concept('duration_s', _float(0.0, open_lower=True), 60.0, 'Length of the generated traces '
            '(s).'),
    Concept('peak_over_capacity', _float(0.0, open_lower=True), 1.25,
            'Burst rate / full-depth capacity.'),
    Concept('efficiency_points', _List(_Text('THRESHOLD or THRESHOLD@CAP', _point)), None,
            'Operating points besides full depth (default: up to 3 usable points of '
            'calibration.json).'),
    Concept('parts', _List(_Choice('act_jax.bench.serving:PARTS')), None,
            'Which benchmarks to run.'),
    # --- compiling, moving, scaling
    Concept('topology', _Text('<chip>:<shape>, e.g. v5e:4x4', _topology, nonempty=True), None,
            'TPU slice, e.g. v5e:4x4, v5p:4x4x4.'),
    Concept('probes', _Bool(), True, 'Compile 2- and 3-step probes to correct XLA\'s '
            'per-loop-body FLOP count (2 extra compiles).'),
    Concept('decode', _Bool(), True, 'Also compile the early-exit decode step.'),
    Concept('export', _Bool(), False, 'Write the run\'s latest checkpoint to --out.'),
    Concept('import', _Bool(), False, 'Build --workdir from the export at --src.'),
    Concept('max_file_mb', _float(0.0, open_lower=True), 15.0, 'Largest .npz file written (MB).'),
    Concept('coordinator_address', _Text('host:port', _host_port), None, 'host:port of process '
            '0 of a multi-process run (unset on a TPU pod: auto-detected).'),
    Concept('num_processes', _int(1), None, 'Processes of the multi-process job.'),
    Concept('process_id', _int(0), None, 'This process, in [0, num_processes).'),
    Concept('devices_per_process', _int(1, 64), 2, 'CPU devices of each local process.'),
    Concept('port', _int(1, 65535), None, 'Coordinator port on 127.0.0.1 (default: a free one).'),
    Concept('timeout', _float(0.0, open_lower=True), None, 'Seconds before every process is '
            'killed.'),
    Concept('steps', _int(1), 30, 'Training steps.'),
    Concept('warmup', _int(0), 5, 'First steps left out of the timing (compiling).'),
    Concept('num_seeds', _int(1), 5, 'How many seeds: first_seed, first_seed + 1, ...'),
    Concept('first_seed', _int(0), 0, 'The first seed.'),
    # --- one MoE layer (benchmark_moe)
    Concept('num_experts', _List(_int(1)), ['8', '32', '128'], 'Expert counts E.'),
    Concept('tokens', _int(1), 4096, 'Tokens per step (batch * seq_len).'),
    Concept('seq_len', _int(1), 512, 'Sequence length = routing group size.'),
    Concept('d_model', _int(1), 256, 'Model width D.'),
    Concept('d_ff', _int(1), 512, 'Expert hidden size F.'),
    Concept('top_k', _int(1), 2, 'Experts per token K.'),
    Concept('capacity_factor', _float(0.0, open_lower=True), 1.25, 'Capacity factor.'),
    Concept('cases', _List(_Text('ROUTER:DISPATCH', _moe_case)), None,
            'router:dispatch pairs, e.g. top_k:gather,top_k:einsum.'),
]
CONCEPTS: dict[str, Concept] = {c.name: c for c in _CONCEPTS}

# Old name -> new name (same values), and old name -> what to write now (meaning changed);
# filled by the binary that is running (a process runs one binary).
RENAMED: dict[str, str] = {}
RETIRED: dict[str, str] = {}
CONFIG_FILES: set[str] = set()  # config-file flags: the file is checked before absl parses


def define(name: str, default: Any = _UNSET, help: str | None = None,  # noqa: A002
           required: bool = False, as_path: bool = False,
           flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """Defines --name from the vocabulary in the calling binary.

  `default` and `help` may be the binary's own; the type, bounds and choices may not.
  `as_path` (only for --config): keep the config file as a path[:arg] string to hand on to
  another process instead of loading it. `flag_values`: tests define into their own.
  """
  if name not in CONCEPTS:
    raise KeyError(f'--{name} is not in the flag vocabulary (experiments/vocabulary.py): add '
                   'it there, once, with its type and bounds')
  concept = CONCEPTS[name]
  default = concept.default if default is _UNSET else default
  help_text = help or concept.help
  # --helpshort lists the flags of the module that defined them: name the binary, not us
  module = sys._getframe(1).f_globals.get('__name__')  # pylint: disable=protected-access
  if module == '__main__':
    module = sys.argv[0]
  if concept.parser is None:
    if as_path:
      holder = flags.DEFINE(_Text('path[:arg] of a config file', _config_path, nonempty=True),
                            name, default, help_text, flag_values, module_name=module)
    else:
      from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
      holder = config_flags.DEFINE_config_file(name, default, help_text, flag_values,
                                               lock_config=True)
      CONFIG_FILES.add(name)
  elif isinstance(concept.parser, _Bool):  # a boolean flag: bare --name and --noname work
    holder = flags.DEFINE_boolean(name, default, help_text, flag_values, module_name=module)
  else:
    serializer = (flags.CsvListSerializer(',') if isinstance(concept.parser, _List) else None)
    holder = flags.DEFINE(concept.parser, name, default, help_text, flag_values,
                          serializer=serializer, module_name=module)
  flag_values.register_key_flag_for_module(module, flag_values[name])
  if required:
    flags.mark_flag_as_required(name, flag_values)
  return holder


def renamed(old: str, new: str) -> None:
  """--old still works in this binary for now, as --new, with a one-line warning."""
  RENAMED[old] = new


def retired(old: str, instead: str) -> None:
  """--old is refused in this binary with one line saying what to write instead."""
  RETIRED[old] = instead


def _flag_name(arg: str) -> tuple[str, str | None]:
  """('name', '=value' or None) of '--name=value' / '--name' / '-name'."""
  body = arg.lstrip('-')
  name, eq, value = body.partition('=')
  return name, (eq + value) if eq else None


def rewrite_argv(argv: list[str], warn: Callable[[str], None]) -> list[str]:
  """argv with renamed flags under their new names (a warning for each); a retired flag, or
  a config file that does not exist, raises ValueError with what to write instead (absl would
  first complain about a missing required flag, ml_collections only when the config is
  read). Arguments after `--` are left alone."""
  out: list[str] = []
  for i, arg in enumerate(argv):
    if arg == '--':
      return out + argv[i:]
    if i == 0 or not arg.startswith('-') or arg in ('-', '--'):
      out.append(arg)
      continue
    name, value = _flag_name(arg)
    negated = name.startswith('no') and name[2:] in RENAMED | RETIRED
    base = name[2:] if negated else name
    if base in RETIRED:
      raise ValueError(f'--{base}: {RETIRED[base]}')
    if base in CONFIG_FILES and value:
      try:
        _config_file(value[1:])
      except ValueError as e:
        raise ValueError(f'--{base}{value}: {e}') from None
    if base in RENAMED:
      new = RENAMED[base]
      warn(f'warning: --{base} is now --{new}; the old name will be removed')
      arg = f'--{"no" if negated else ""}{new}{value or ""}'
    out.append(arg)
  return out


# ----------------------------------------------------------------------------- docs
EXPERIMENTS = os.path.dirname(os.path.abspath(__file__))


def binaries() -> list[str]:
  """The binaries: experiments/*.py with a `main` (every module but this package's own)."""
  names = []
  for f in sorted(os.listdir(EXPERIMENTS)):
    if f.endswith('.py') and f not in ('__init__.py', 'vocabulary.py'):
      names.append(f[:-3])
  return names


@dataclasses.dataclass
class BinaryFlags:
  defined: list[str]                                   # via define(), in source order
  renamed: dict[str, str] = dataclasses.field(default_factory=dict)
  retired: dict[str, str] = dataclasses.field(default_factory=dict)
  direct: list[str] = dataclasses.field(default_factory=list)  # flags.DEFINE_* bypassing us


def binary_flags(binary: str) -> BinaryFlags:
  """What experiments/<binary>.py defines, read from its source (nothing imported)."""
  with open(os.path.join(EXPERIMENTS, f'{binary}.py')) as f:
    tree = ast.parse(f.read())
  found = BinaryFlags([])
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
      continue
    attr = node.func.attr
    args = [a.value for a in node.args if isinstance(a, ast.Constant)]
    if attr == 'define' and args:
      found.defined.append(args[0])
    elif attr == 'renamed' and len(args) == 2:
      found.renamed[args[0]] = args[1]
    elif attr == 'retired' and len(args) == 2:
      found.retired[args[0]] = args[1]
    elif attr.startswith('DEFINE') and args:
      found.direct.append(str(args[0]))
  return found


def _allowed(concept: Concept) -> str:
  if concept.parser is None:
    return 'path[:arg] of a config file'
  return concept.parser.describe()


def markdown() -> str:
  """docs/binaries.md: the vocabulary, then which binary takes which flag."""
  per_binary = {b: binary_flags(b) for b in binaries()}
  lines = [
      '# Binaries and their flags',
      '',
      'Generated by `python -m experiments.vocabulary > docs/binaries.md` from',
      '`experiments/vocabulary.py` (one definition per flag) and the binaries\' `define` calls;',
      '`tests/test_flags.py` fails when this page is stale. Every binary also takes `--verbose`',
      '(the traceback of a user error) and absl\'s `--helpshort` / `--helpfull`.',
      '',
      'Rules: one name per concept in every binary; a singular name takes one value, a plural '
      'name',
      'a comma-separated list of the same values; `--out` is always a directory. A bad value '
      'is',
      'refused when the flags are parsed, in one line `error: --flag=value: ...`, exit status 2.',
      '',
      'The same one line and exit status 2, before any work, for what the library checks:',
      'a file a user edits or brings that is not valid JSON or holds a field out of range',
      '(`config.json`, `calibration.json`, `quant.json`, `datastore.json`, an export\'s',
      '`manifest.json` or a damaged `.npz`, a trace line), named by the file and field, never by',
      'a flag the user did not give; an output directory that already holds something else (a',
      'binary writes into a new or empty directory, or one of its own kind that it resumes);',
      'flags that do not apply together; too little held-out data to certify; more bytes than',
      'the model\'s context. A refused command leaves the files as they were. `--verbose` shows',
      'the traceback. `tests/test_flags.py` and `tests/test_inputs.py` run every case.',
      '',
      '## Which binary takes which flag',
      '',
      '| binary | flags |',
      '|---|---|',
  ]
  for b, found in per_binary.items():
    lines.append(f'| `{b}` | ' + ' '.join(f'`--{n}`' for n in found.defined) + ' |')
  lines += ['', '## The vocabulary', '', '| flag | values | default | meaning | binaries |',
            '|---|---|---|---|---|']
  for c in _CONCEPTS:
    users = [b for b, found in per_binary.items() if c.name in found.defined]
    default = ('' if c.default is None else
               ','.join(map(str, c.default)) if isinstance(c.default, list) else str(c.default))
    lines.append(f'| `--{c.name}` | {_allowed(c)} | {default and f"`{default}`"} | '
                 f'{c.help.replace("|", "/")} | {", ".join(users)} |')
  lines += ['', 'Defaults shown are the vocabulary\'s; a binary may set its own (its '
            '`--helpshort` shows it).', '', '## Renamed and retired flags', '',
            '| binary | old | now |', '|---|---|---|']
  for b, found in per_binary.items():
    for old, new in found.renamed.items():
      lines.append(f'| `{b}` | `--{old}` | `--{new}` (the old name still works, with a '
                   'warning) |')
    for old, instead in found.retired.items():
      lines.append(f'| `{b}` | `--{old}` | refused: {instead} |')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  sys.stdout.write(markdown())
