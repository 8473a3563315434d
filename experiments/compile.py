r"""Compiles the real train and decode steps for a TPU topology you do not have; prints the
per-chip memory, FLOPs, estimated step time / MFU and collectives (act_jax/deploy/aot.py).

  pip install -e '.[tpu]'          # libtpu: TPU compiles on any machine, no TPU needed
  python -m experiments.compile --config=experiments/configs/pod.py:size=1b,kind=moe \
      --topology=v5e:4x4
  python -m experiments.compile --config=experiments/configs/pod.py:size=8b,kind=moe \
      --topology=v5p:4x4x4 --config.mesh.expert=8
--out=DIR also writes the report to DIR/compile.json. Exits with status 1 (and says why, with
a suggestion) when the layout does not fit the chip's HBM; status 2 on a bad flag or config.
"""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the host compiles; libtpu only describes
if '--xla_dump_to' not in os.environ.get('XLA_FLAGS', ''):
  # XLA's own text dump of the optimized train / decode step: for large TPU programs
  # Compiled.as_text() can fail, and the collectives table reads this instead.
  _DUMP = tempfile.mkdtemp(prefix='act_jax_hlo_')
  atexit.register(shutil.rmtree, _DUMP, ignore_errors=True)
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={_DUMP} '
                             '--xla_dump_hlo_as_text --xla_dump_hlo_module_re=jit_(train_)?step')

from act_jax.deploy import aot  # noqa: E402
from act_jax.run import directory as run_lib  # noqa: E402
from experiments import quiet_logs, run  # noqa: E402
from experiments import vocabulary as vocab  # noqa: E402

_CONFIG = vocab.define('config', required=True)
_TOPOLOGY = vocab.define('topology', required=True)
_PROBES = vocab.define('probes')
_DECODE = vocab.define('decode')
_OUT = vocab.define('out', help='Also write the report to OUT/compile.json.')
vocab.retired('json', 'write --out=DIR instead (the report goes to DIR/compile.json)')
_SCHEMES = vocab.define('schemes', [], 'Instead of the training report: compile the decode step '
                        'with float32 and with each of these weight schemes (w8, w4, w8a8) '
                        'stored, and compare bytes per chip.')
vocab.renamed('quant_schemes', 'schemes')
RESULT = 'compile.json'


def main(argv):
  del argv
  quiet_logs()
  if _SCHEMES.value:
    rows = aot.quant_decode_report(_CONFIG.value, _TOPOLOGY.value, tuple(_SCHEMES.value))
    print(aot.format_quant_decode(rows, _TOPOLOGY.value))
    return
  report = aot.compile_report(_CONFIG.value, _TOPOLOGY.value, probes=_PROBES.value,
                              decode=_DECODE.value)
  print(aot.format_report(report))
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    run_lib.write_json(os.path.join(_OUT.value, RESULT), report)
  if not report['fits']:
    sys.exit(1)


if __name__ == '__main__':
  run(main)
