"""The colab/ notebooks run headless end to end (tiny sizes via ACT_JAX_NOTEBOOK_TINY=1).

Each notebook is executed with nbclient in a fresh kernel, cwd = a temp dir, and must finish
without a cell error. The stored notebooks must carry no outputs. Executing them (35-85 s each
on 2 busy cores, each a chain of library calls that the default tier tests directly) is the
slow tier, which CI runs too; the default tier checks that each is stored clean and valid.
"""
import os

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, 'colab')
NOTEBOOKS = ('01_quickstart.ipynb', '02_compare_variants.ipynb',
             '03_calibrate_and_decode.ipynb')


def _execute(name: str, tmp_path) -> nbformat.NotebookNode:
  from nbclient import NotebookClient
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  old = os.environ.get('ACT_JAX_NOTEBOOK_TINY')
  os.environ['ACT_JAX_NOTEBOOK_TINY'] = '1'  # the kernel inherits this process's env
  try:
    NotebookClient(nb, timeout=300, kernel_name='python3',
                   resources={'metadata': {'path': str(tmp_path)}}).execute()
  finally:
    if old is None:
      os.environ.pop('ACT_JAX_NOTEBOOK_TINY')
    else:
      os.environ['ACT_JAX_NOTEBOOK_TINY'] = old
  return nb


def _outputs_text(nb) -> str:
  parts = []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      parts.append(out.get('text', ''))
      parts.extend(str(v) for k, v in out.get('data', {}).items() if k.startswith('text/'))
  return '\n'.join(parts)


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_is_stored_clean(name):
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4 and nb.metadata['kernelspec']['name'] == 'python3'
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code)
  assert "'google.colab' in sys.modules" in code[0].source and 'REPO_URL' in code[0].source
  assert 'ACT_JAX_NOTEBOOK_TINY' in code[1].source


@pytest.mark.slow  # ~35 s: trains, evaluates, plots; its calls: test_training, test_report
def test_quickstart_runs(tmp_path):
  nb = _execute('01_quickstart.ipynb', tmp_path)
  text = _outputs_text(nb)
  assert 'mean layers executed' in text
  assert 'layers executed' in text and '<span' in text  # the coloured-token HTML
  assert any(o.get('data', {}).get('image/png') for c in nb.cells for o in c.get('outputs', []))


@pytest.mark.slow  # ~70 s on 2 busy cores: trains four variants; their code: test_moe_model
def test_compare_variants_runs(tmp_path):
  text = _outputs_text(_execute('02_compare_variants.ipynb', tmp_path))
  assert 'topk_confidence' in text and 'hash_act' in text and 'layers/full' in text


@pytest.mark.slow  # ~85 s: calibrate, decode, serve; their code: test_operating_point, test_serving
def test_calibrate_and_decode_runs(tmp_path):
  text = _outputs_text(_execute('03_calibrate_and_decode.ipynb', tmp_path))
  assert 'operating point OperatingPoint(threshold=' in text
  assert 'mean layers over generated tokens' in text
  assert 'latency ms' in text and 'bytes identical to full-depth greedy' in text  # serving
