"""Errors act_jax raises for bad input: each names the offending field, file or flag and what
is allowed.

Everything a user can cause -- a config value, a flag, a file they edited or brought, an
output directory, too little data, a request -- raises a UserError, and the binaries'
one `run()` wrapper (experiments/__init__.py) prints it as one line `error: ...` with exit
status 2. Any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
  """Bad input from the user; the message alone says what to change."""


class ConfigError(UserError, ValueError):
  """An impossible or unknown value (config, flag, file field); raised before anything
  compiles or is written."""


class CheckpointError(UserError, RuntimeError):
  """A missing or incompatible checkpoint; the files on disk are left untouched."""
