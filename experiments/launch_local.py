r"""Runs one command as a multi-process JAX job of local CPU processes (tests, debugging).

  python -m experiments.launch_local --num_processes=2 --devices_per_process=2 -- \
      python -m experiments.train --config=experiments/configs/lm.py:runlocal \
      --workdir=/tmp/mp --config.train.multihost=True

starts 2 processes with 2 CPU devices each (one 4-device job over gloo), appending
--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i to the command; their
output is prefixed [0] / [1]. If one fails the others are killed (they would wait for it
inside a collective), and all are killed after --timeout seconds or on Ctrl-C; SIGTERM is
forwarded (training saves a checkpoint and stops). Exit status: 0 if every process succeeded.

On a TPU pod nothing is launched locally: run the same train command on every host, without
coordinator flags (the job is auto-detected), e.g.
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd REPO && \
      python -m experiments.train --config=experiments/configs/lm.py \
      --workdir=gs://BUCKET/runs/lm --config.train.multihost=True"
"""
import sys

from experiments import run
from experiments import vocabulary as vocab

from act_jax.scale import multihost

_NUM = vocab.define('num_processes', 2, 'Processes to start.')
_DEVICES = vocab.define('devices_per_process')
_PORT = vocab.define('port')
_TIMEOUT = vocab.define('timeout')


def main(argv: list[str]) -> None:
  try:
    codes = multihost.launch_local(argv[1:], _NUM.value, _DEVICES.value, port=_PORT.value,
                                   timeout=_TIMEOUT.value)
  except TimeoutError as e:  # every process is already reaped: one line, no traceback
    sys.exit(f'error: {e}')
  sys.exit(0 if all(c == 0 for c in codes) else 1)


if __name__ == '__main__':
  run(main)
