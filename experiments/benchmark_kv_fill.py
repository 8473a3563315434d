r"""Eager vs lazy KV fill of skipped layers: batch-1 decode efficiency at depth caps.

  python -m experiments.benchmark_kv_fill --config=experiments/configs/lm_exit12.py \
      --config.moe.router=none --caps=3,4,6
Random weights (nothing to train: a cap with threshold 1.0 makes every token exit exactly
there), greedy decoding of 64 bytes after a 16-byte prompt; each fill is timed against full
depth in the same round-robin. Efficiency = speedup / (L / layers run). docs/results.md has
the measured table.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax import config as config_lib
from act_jax.bench import serving as serving_bench
from act_jax.errors import ConfigError
from act_jax.model.transformer import make_model

_CONFIG = vocab.define('config', required=True, help='Model config file, path[:arg].')
_CAPS = vocab.define('caps', ['3', '4', '6'], 'Depth caps (exit layers).')
_REPEATS = vocab.define('repeats', help='Round-robin rounds (median).')


def main(argv):
  del argv
  quiet_logs()
  spec = config_lib.resolve(_CONFIG.value, device_count=1)
  caps = _CAPS.value
  for c in caps:  # a bad cap fails before anything compiles
    if c not in spec.exit_layers or c == spec.model.num_layers:
      raise ConfigError(f'--caps: {c} is not an exit layer below the full depth of this model; '
                        f'allowed: {[x for x in spec.exit_layers if x < spec.model.num_layers]}')
  v = make_model(spec).init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 8), jnp.int32))
  v = nn.meta.unbox({'params': v['params'], 'moe_state': v.get('moe_state', {})})
  rows = serving_bench.kv_fill_efficiency(spec, v, caps, repeats=_REPEATS.value)
  print(serving_bench.format_kv_fill(rows))


if __name__ == '__main__':
  run(main)
