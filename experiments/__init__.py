"""Thin absl binaries over act_jax: flags, then one call into the library."""
from absl import flags, logging


def quiet_logs() -> None:
  """Library INFO chatter (Orbax) off unless the user asked for verbosity with -v."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)


def define_max_layers_flag() -> flags.FlagHolder:
  """--max_layers, shared by the binaries that take an operating point."""
  return flags.DEFINE_integer('max_layers', None, 'Cap: tokens still running exit after this '
                              'layer (an exit layer; default: no cap).')
