"""Thin absl binaries over act_jax: flags, then one call into the library.

Each binary defines its flags from the one vocabulary (experiments/vocabulary.py) and ends
with `experiments.run(main)`. A user error prints one line `error: ...` on stderr and exits with
status 2, without a Python traceback: absl's own parse errors (an unknown flag, a bad value, a
missing required flag), a retired flag, and any act_jax.errors.UserError raised by the library
(including a config file's errors while flags are parsed). `--verbose` or ACT_JAX_TRACEBACK=1
shows the traceback instead.
"""
import ast
import os
import sys
from typing import Callable

from act_jax import platforms

platforms.quiet_tpu_probe()  # before anything imports jax: no libtpu noise off TPU

from absl import app, flags, logging

from act_jax.errors import ConfigError, UserError

USER_ERRORS = (UserError,)
_VERBOSE = flags.DEFINE_bool('verbose', False, 'On a config / flag / workdir error, show the '
                             'Python traceback (also: ACT_JAX_TRACEBACK=1).')


def quiet_logs() -> None:
  """Library INFO chatter (Orbax) off unless the user asked for verbosity with -v."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)


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
  """The innermost UserError behind e, else None (a config file's error reaches us re-raised
  by ml_collections and wrapped by absl's flag parser)."""
  found, seen = None, 0
  while e is not None and seen < 16:
    if isinstance(e, USER_ERRORS):
      found = e
    e = e.__cause__ or e.__context__
    seen += 1
  return found


def _report(err: BaseException | str) -> None:
  print(f'error: {err}', file=sys.stderr)
  sys.exit(2)


def flag_error_line(e: flags.Error) -> str:
  """absl's parse error as the one line a user acts on (without the `error: ` prefix)."""
  if isinstance(e, flags.UnrecognizedFlagError):
    text = str(e)
    hint = text.partition('Did you mean:')[2].strip(' ?.')
    hint = f' (did you mean --{hint.split(",")[0].strip()}?)' if hint else ''
    return (f'--{e.flagname}: unknown flag{hint}; --helpshort lists this binary\'s flags')
  line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
  line = line[len('flag '):] if line.startswith('flag --') else line
  name, _, rest = line.partition(': ')
  if 'must have a value other than None' in rest:
    return f'{name.partition("=")[0]} is required'
  return line


def _config_error_line(e: BaseException, argv: list[str]) -> str | None:
  """One line for an error ml_collections raised loading --config or applying a
  --config.FIELD override (a missing file, an unknown field, a value of the wrong type), or
  None when the error did not come from there."""
  tb, from_config = e.__traceback__, False
  while tb is not None:
    from_config |= 'config_flags' in tb.tb_frame.f_code.co_filename
    tb = tb.tb_next
  if not from_config:
    return None
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  while len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':  # KeyError(repr(...))
    try:
      text = str(ast.literal_eval(text))
    except (ValueError, SyntaxError):
      break
  lines = [l.strip() for l in text.strip().splitlines() if l.strip()] or [type(e).__name__]
  overrides = [a for a in argv if a.startswith('--config.')]
  if isinstance(e, (KeyError, AttributeError)):  # an override names a field that is not there
    key = lines[0].strip('\'"')
    arg = next((a for a in overrides if key in a.partition('=')[0][2:].split('.')),
               ' '.join(overrides) or '--config')
    hint = next((l for l in lines[1:] if l.startswith('Did you mean')), '')
    return f'{arg}: the config has no field {key!r}' + (f' ({hint})' if hint else '')
  if isinstance(e, OSError):  # the config file itself
    arg = next((a for a in argv if a.startswith('--config=')), '--config')
    return f'{arg}: cannot load the config file ({lines[-1]})'
  arg = ' '.join(overrides) or next((a for a in argv if a.startswith('--config=')), '--config')
  return f'{arg}: {lines[0]}'


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parse_flags_with_usage, except that every user error is one line and exit 2."""
  from experiments import vocabulary  # pylint: disable=import-outside-toplevel
  try:
    argv = vocabulary.rewrite_argv(argv, warn=lambda m: print(m, file=sys.stderr))
  except ValueError as e:  # a retired flag, a config file that is not there
    _report(e)
  try:
    rest = flags.FLAGS(argv)
    for name in flags.FLAGS:  # a config file loads lazily: make its errors parse errors
      flag = flags.FLAGS[name]
      if flag.present and type(flag).__name__ == '_ConfigFlag':  # not the overrides
        _ = flag.value.to_dict  # raises the load error of a config that failed to load
    return rest
  except flags.Error as e:
    if _show_traceback():
      raise
    err = _user_error(e)
    if err is None:
      _report(flag_error_line(e))
    # the config file's own ConfigError: name the flag that loaded it
    given = str(e).partition(': ')[0]
    _report(f'{given[len("flag "):]}: {err}' if given.startswith('flag --') else err)
  except Exception as e:  # pylint: disable=broad-except
    line = _config_error_line(e, argv)
    if line is None or _show_traceback():
      raise
    _report(line)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main), with bad user input reported as one line (see the module docstring)."""
  try:
    app.run(main, flags_parser=_parse_flags)
  except Exception as e:  # pylint: disable=broad-except
    err = _user_error(e)
    if err is None or _show_traceback():
      raise
    _report(err)
