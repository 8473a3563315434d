r"""Trains an adaptive-computation transformer; resumes when --workdir holds a checkpoint.

  python -m experiments.train --config=experiments/configs/lm.py --workdir=runs/lm
  python -m experiments.train --config=experiments/configs/lm.py:halting=act,runlocal \
      --workdir=/tmp/lm --config.model.num_layers=4
"""
from absl import flags

from experiments import quiet_logs, run
from ml_collections import config_flags

from act_jax import training

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl, TensorBoard.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  quiet_logs()
  training.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  run(main)
