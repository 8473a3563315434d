"""Errors act_jax raises for bad input: each names the offending field and what is allowed."""


class ConfigError(ValueError):
  """An impossible or unknown config value; raised by validate() before anything compiles."""


class CheckpointError(RuntimeError):
  """A missing or incompatible checkpoint; the files on disk are left untouched."""
