r"""Training steps/s: 2 CPU processes x 2 devices vs 1 process x 4 devices, in one run.

  python -m experiments.benchmark_multiprocess
  python -m experiments.benchmark_multiprocess --steps=60 -- --config.model.num_layers=4

Same config, mesh, global batch and program in both layouts, run one after the other, so the
ratio is the cost of crossing processes (gloo collectives, per-step host syncs). Default
config: the tiny MoE (top_k of 4 experts) + ACT model of tests/test_multiprocess.py. Extra
--config.* overrides go after `--`. The logic lives in act_jax.scale.multihost.benchmark.
"""
from experiments import run
from experiments import vocabulary as vocab

from act_jax.scale import multihost

_CONFIG = vocab.define('config', 'experiments/configs/lm.py:router=top_k,halting=act,runlocal',
                       'Config file (path[:arg]) of experiments.train.', as_path=True)
_STEPS = vocab.define('steps', help='Training steps per layout.')
_WARMUP = vocab.define('warmup')
_NUM = vocab.define('num_processes', 2, 'Processes of the multi-process layout.')
_DEVICES = vocab.define('devices_per_process')
_TIMEOUT = vocab.define('timeout', 900.0, 'Seconds allowed per layout.')
DEFAULT_OVERRIDES = ['--config.model.num_layers=2', '--config.data.batch_size=8']


def main(argv: list[str]) -> None:
  rows = multihost.benchmark(_CONFIG.value, argv[1:] or DEFAULT_OVERRIDES, steps=_STEPS.value,
                             num_processes=_NUM.value, devices_per_process=_DEVICES.value,
                             warmup=_WARMUP.value, timeout=_TIMEOUT.value)
  print(multihost.format_table(rows))


if __name__ == '__main__':
  run(main)
