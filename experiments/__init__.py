"""Thin absl binaries over act_jax: flags, then one call into the library.

Each binary ends with `experiments.run(main)`: a bad config, flag or workdir (ConfigError,
CheckpointError, and the config file's own errors while flags are parsed) prints one line
`error: ...` on stderr and exits with status 2, without a Python traceback. `--verbose` or
ACT_JAX_TRACEBACK=1 shows the traceback instead.
"""
import os
import sys
from typing import Callable

from act_jax import platforms

platforms.quiet_tpu_probe()  # before anything imports jax: no libtpu noise off TPU

from absl import app, flags, logging

from act_jax.errors import CheckpointError, ConfigError

USER_ERRORS = (ConfigError, CheckpointError)
_VERBOSE = flags.DEFINE_bool('verbose', False, 'On a config / flag / workdir error, show the '
                             'Python traceback (also: ACT_JAX_TRACEBACK=1).')


def quiet_logs() -> None:
  """Library INFO chatter (Orbax) off unless the user asked for verbosity with -v."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)


def define_max_layers_flag() -> flags.FlagHolder:
  """--max_layers, shared by the binaries that take an operating point."""
  return flags.DEFINE_integer('max_layers', None, 'Cap: tokens still running exit after this '
                              'layer (an exit layer; default: the run\'s operating point).')


def refuse_flags(mode: str, names: tuple[str, ...]) -> None:
  """ConfigError naming the first of these flags the user gave: it does not apply in `mode`
  (e.g. --threshold with --mode=exact, which decodes every byte at full depth)."""
  other = 'threshold' if mode == 'exact' else 'exact'
  for name in names:
    if flags.FLAGS[name].present:
      raise ConfigError(f'--{name}={flags.FLAGS[name].value}: applies to --mode={other}, not '
                        f'--mode={mode}')


def _show_traceback() -> bool:
  if os.environ.get('ACT_JAX_TRACEBACK', '') not in ('', '0'):
    return True
  if flags.FLAGS.is_parsed():
    return _VERBOSE.value
  return any(a in ('--verbose', '--verbose=true', '--verbose=True') for a in sys.argv)


def _user_error(e: BaseException | None) -> BaseException | None:
  """The innermost ConfigError / CheckpointError behind e, else None (a config file's error
  reaches us re-raised by ml_collections and wrapped by absl's flag parser)."""
  found, seen = None, 0
  while e is not None and seen < 16:
    if isinstance(e, USER_ERRORS):
      found = e
    e = e.__cause__ or e.__context__
    seen += 1
  return found


def _report(err: BaseException) -> None:
  print(f'error: {err}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse_flags_with_usage, except that a config file's ConfigError is one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    err = _user_error(e)
    if err is None or _show_traceback():
      print(f'FATAL Flags parsing error: {e}', file=sys.stderr)
      print('Pass --helpshort or --helpfull to see help on flags.', file=sys.stderr)
      sys.exit(1)
    _report(err)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main), with bad user input reported as one line (see the module docstring)."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except Exception as e:  # pylint: disable=broad-except
    err = _user_error(e)
    if err is None or _show_traceback():
      raise
    _report(err)
