r"""Trains an adaptive-computation transformer; resumes when --workdir holds a checkpoint.

  python -m experiments.train --config=experiments/configs/lm.py --workdir=runs/lm
  python -m experiments.train --config=experiments/configs/lm.py:halting=act,runlocal \
      --workdir=/tmp/lm --config.model.num_layers=4

Multi-process (act_jax/scale/multihost.py): every process runs this same command with
--config.train.multihost=True. On a TPU pod pass nothing else (the job is auto-detected);
elsewhere add --coordinator_address, --num_processes and --process_id, which
experiments/launch_local.py does for N local CPU processes:
  python -m experiments.launch_local --num_processes=2 --devices_per_process=2 -- \
      python -m experiments.train --config=experiments/configs/lm.py:runlocal \
      --workdir=/tmp/mp --config.train.multihost=True
"""
import sys

from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax import config as config_lib
from act_jax.calibrate import certify
from act_jax.scale import multihost

_CONFIG = vocab.define('config', required=True)
_WORKDIR = vocab.define('workdir', required=True, help='The run directory: checkpoints, '
                        'metrics.jsonl, TensorBoard (resumed when it holds a checkpoint).')
_COORDINATOR = vocab.define('coordinator_address', help='host:port of process 0 of a '
                            'multi-process run (only with --config.train.multihost=True; unset '
                            'on a TPU pod: auto-detected).')
_NUM_PROCESSES = vocab.define('num_processes', help='Processes in the multi-process run (with '
                              '--coordinator_address).')
_PROCESS_ID = vocab.define('process_id', help='This process, in [0, num_processes) (with '
                           '--coordinator_address).')


def main(argv):
  del argv
  quiet_logs()
  # train, then certify the early-exit point when config.train.certify_tolerance > 0
  # a halting option set by name on the command line is applied or refused, never dropped
  config = config_lib.honour_explicit(_CONFIG.value, sys.argv)
  certify.train_and_certify(config, _WORKDIR.value, cluster=multihost.Cluster(
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))


if __name__ == '__main__':
  run(main)
