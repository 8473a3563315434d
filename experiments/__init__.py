"""Thin absl binaries over act_jax: flags, then one call into the library."""
from absl import flags, logging


def quiet_logs() -> None:
  """Library INFO chatter (Orbax) off unless the user asked for verbosity with -v."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.ERROR)
