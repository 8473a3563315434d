"""Tests for act_jax.data: purity, shapes, splits, the synthetic tasks' labels, config errors."""
from __future__ import annotations

import sys

import ml_collections
import numpy as np
import pytest

from act_jax import config as config_lib
from act_jax.data import BOS, EOS, PAD, VOCAB_SIZE, decode, encode, make_dataset
from act_jax import data as data_lib
from act_jax.data import corpus
from act_jax.errors import ConfigError

SMALL = 300_000  # bytes per domain: keeps corpus loading well under a second


def cfg(**overrides) -> ml_collections.ConfigDict:
  # built in one go so a wrongly typed value reaches validate() rather than ConfigDict's checks
  return ml_collections.ConfigDict(
      {**config_lib.default_config().data.to_dict(), 'seq_len': 64, 'batch_size': 8, 'max_bytes': SMALL,
       **overrides})


@pytest.fixture(scope='module')
def stdlib():
  return make_dataset(cfg(), seed=0)


def assert_batch(b, batch_size, seq_len):
  assert set(b) == {'inputs', 'targets', 'weights', 'domain', 'difficulty'}
  for k in ('inputs', 'targets'):
    assert b[k].shape == (batch_size, seq_len) and b[k].dtype == np.int32
    assert b[k].min() >= 0 and b[k].max() < VOCAB_SIZE
  assert b['weights'].shape == (batch_size, seq_len) and b['weights'].dtype == np.float32
  for k in ('domain', 'difficulty'):
    assert b[k].shape == (batch_size,) and b[k].dtype == np.int32


def assert_lm(b):
  # next-token targets: targets[t] == inputs[t + 1]; weight 0 exactly on PAD targets
  np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
  np.testing.assert_array_equal(b['weights'], (b['targets'] != PAD).astype(np.float32))


def test_encode_decode_round_trip():
  text = 'héllo, wörld — ∑ 🙂\n\tdef f(x): return x'
  ids = encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert decode(ids) == text
  assert decode(np.concatenate([[BOS], ids, [EOS, PAD, PAD]])) == text
  assert decode([0xff]) == '\ufffd'


def test_stdlib_batches(stdlib):
  assert stdlib.name == 'stdlib' and stdlib.vocab_size == 260
  assert stdlib.domains == ('code', 'prose') and stdlib.causal_only
  b = stdlib.train_batch(0)
  assert_batch(b, 8, 64)
  assert_lm(b)
  assert (b['difficulty'] == 0).all()
  assert b['weights'].sum() > 0


def test_train_batch_is_pure(stdlib):
  a, again = stdlib.train_batch(7), stdlib.train_batch(7)
  for k in a:
    np.testing.assert_array_equal(a[k], again[k])
  # a fresh Dataset with the same seed reproduces it; another step or seed does not
  fresh = make_dataset(cfg(), seed=0).train_batch(7)
  for k in a:
    np.testing.assert_array_equal(a[k], fresh[k])
  assert not np.array_equal(a['inputs'], stdlib.train_batch(8)['inputs'])
  assert not np.array_equal(a['inputs'], make_dataset(cfg(), seed=1).train_batch(7)['inputs'])


def test_code_fraction_extremes():
  only_code = make_dataset(cfg(code_fraction=1.0), seed=0).train_batch(0)
  only_prose = make_dataset(cfg(code_fraction=0.0), seed=0).train_batch(0)
  assert (only_code['domain'] == 0).all() and (only_prose['domain'] == 1).all()


def test_eval_batches_fixed_and_mixed(stdlib):
  evals = stdlib.eval_batches(3)
  assert len(evals) == 3
  for b in evals:
    assert_batch(b, 8, 64)
    assert_lm(b)
    assert (b['domain'] == 0).sum() == 4 and (b['domain'] == 1).sum() == 4
  again = make_dataset(cfg(), seed=5).eval_batches(3)  # held-out set ignores the seed
  for b, c in zip(evals, again):
    for k in b:
      np.testing.assert_array_equal(b[k], c[k])
  # windows come from many held-out documents, not one
  assert len({decode(x[:20]) for b in evals for x in b['inputs']}) > 12


def test_heldout_disjoint_and_nonempty():
  splits = corpus.stdlib_corpus(SMALL, 0.1)
  assert set(splits) == {'code', 'prose'}
  for train, held in splits.values():
    assert len(train.names) > 0 and len(held.names) > 0
    assert not set(train.names) & set(held.names)
    assert train.tokens.dtype == np.int16 and held.lengths.sum() == held.tokens.size


def test_split_is_stable_and_forced_nonempty():
  docs = [(f'doc{i}', b'x' * 10) for i in range(50)]
  tr, he = corpus.split_docs(docs, 0.2)
  tr2, he2 = corpus.split_docs(docs[::-1], 0.2)  # membership depends on the name only
  assert {n for n, _ in he} == {n for n, _ in he2}
  assert len(tr) + len(he) == 50 and 0 < len(he) < 50
  tr, he = corpus.split_docs(docs[:2], 0.001)  # hash would hold out nothing
  assert len(tr) == 1 and len(he) == 1
  tr, he = corpus.split_docs([('only', b'0123456789')], 0.3)  # lone doc: split by bytes
  assert tr[0][1] + he[0][1] == b'0123456789' and he[0][1]


def test_docstring_fallback():
  docs = corpus.docstring_documents(20_000)
  assert docs and sum(len(d) for _, d in docs) <= 20_000
  assert all(name.startswith('docstrings/') for name, _ in docs)


def test_prose_without_pydoc_data(monkeypatch):
  # some Python builds strip pydoc_data; prose then comes from stdlib docstrings
  monkeypatch.setitem(sys.modules, 'pydoc_data', None)
  monkeypatch.setitem(sys.modules, 'pydoc_data.topics', None)
  docs = corpus.prose_documents(20_000)
  assert docs and all(name.startswith('docstrings/') for name, _ in docs)


def test_files_dataset(tmp_path):
  (tmp_path / 'a.py').write_text('def f(x):\n  return x + 1\n' * 20)
  (tmp_path / 'b.py').write_text('import os\nprint(os.getcwd())\n' * 20)
  (tmp_path / 'notes.txt').write_text('The quick brown fox jumps over the lazy dog. ' * 30)
  (tmp_path / 'empty.md').write_text('')
  ds = make_dataset(cfg(name='files', files=str(tmp_path / '*')), seed=0)
  assert ds.name == 'files' and ds.domains == ('code', 'prose')
  for b in [ds.train_batch(0)] + ds.eval_batches(2):
    assert_batch(b, 8, 64)
    assert_lm(b)
  assert set(ds.eval_batches(1)[0]['domain'].tolist()) == {0, 1}
  only_code = make_dataset(cfg(name='files', files=str(tmp_path / '*.py')), seed=0)
  assert only_code.domains == ('code',)
  assert (only_code.train_batch(0)['domain'] == 0).all()


def test_files_glob_matching_nothing(tmp_path):
  with pytest.raises(ConfigError, match='data.files'):
    make_dataset(cfg(name='files', files=str(tmp_path / 'nothing*.txt')), seed=0)


def test_parity_labels():
  ds = make_dataset(cfg(name='parity', num_bits=12, seq_len=16, batch_size=64), seed=3)
  assert ds.domains == ('parity',) and not ds.causal_only
  for b in [ds.train_batch(0), ds.train_batch(1)] + ds.eval_batches(2):
    assert_batch(b, 64, 16)
    for inp, tgt, w, d in zip(b['inputs'], b['targets'], b['weights'], b['difficulty']):
      text = decode(inp)
      assert len(text) == 13 and text[-1] == '=' and inp[0] == BOS
      bits = text[:12]
      assert set(bits) <= set('01.')
      assert d == sum(c in '01' for c in bits) and 1 <= d <= 12
      pos = np.flatnonzero(w)
      assert pos.tolist() == [13] and inp[13] == ord('=')
      assert chr(tgt[13]) == str(bits.count('1') % 2)
      assert (tgt[w == 0] == PAD).all()
  diffs = np.concatenate([ds.train_batch(s)['difficulty'] for s in range(10)])
  assert diffs.min() == 1 and diffs.max() == 12  # the whole difficulty range is sampled


def test_parity_extrapolation_split_is_exact():
  # PonderNet's protocol scaled to 24 entries: train on 1..12 non-zeros, evaluate on 1..24
  ds = make_dataset(cfg(name='parity', num_bits=24, seq_len=26, batch_size=128,
                        train_max_difficulty=12), seed=1)
  train = [ds.train_batch(s) for s in range(20)]
  held = ds.eval_batches(20)
  for b, top in [(b, 12) for b in train] + [(b, 24) for b in held]:
    for inp, tgt, d in zip(b['inputs'], b['targets'], b['difficulty']):
      bits = decode(inp)[:24]
      assert d == sum(c in '01' for c in bits) and 1 <= d <= top  # no training row > 12
      assert chr(tgt[25]) == str(bits.count('1') % 2)
  train_d = np.concatenate([b['difficulty'] for b in train])
  held_d = np.concatenate([b['difficulty'] for b in held])
  assert train_d.min() == 1 and train_d.max() == 12
  assert held_d.min() == 1 and held_d.max() == 24
  assert 0.4 < np.mean(held_d > 12) < 0.6  # half the held-out rows extrapolate
  spec = config_lib.data_spec(name='parity', num_bits=24, seq_len=26, train_max_difficulty=12)
  assert data_lib.difficulty_ranges(spec) == {'in-distribution': (1, 12),
                                              'extrapolation': (13, 24)}
  assert data_lib.difficulty_ranges(config_lib.data_spec(name='parity', num_bits=24,
                                                         seq_len=26)) == {}
  # the held-out set does not depend on the training range (same stream, same rows)
  full = make_dataset(cfg(name='parity', num_bits=24, seq_len=26, batch_size=128), seed=1)
  np.testing.assert_array_equal(full.eval_batches(1)[0]['inputs'], held[0]['inputs'])


@pytest.mark.parametrize('name,field', [('addition', 'max_digits'), ('hops', 'max_hops')])
def test_train_max_difficulty_caps_other_tasks(name, field):
  over = {'name': name, field: 4, 'train_max_difficulty': 2}
  if name == 'addition':
    over['seq_len'] = 20
  ds = make_dataset(cfg(**over), seed=0)
  assert max(ds.train_batch(s)['difficulty'].max() for s in range(10)) == 2
  assert max(b['difficulty'].max() for b in ds.eval_batches(10)) == 4


def test_addition_labels():
  ds = make_dataset(cfg(name='addition', max_digits=5, seq_len=20, batch_size=64), seed=3)
  assert ds.domains == ('addition',) and ds.causal_only
  for b in [ds.train_batch(0)] + ds.eval_batches(2):
    assert_batch(b, 64, 20)
    np.testing.assert_array_equal(b['targets'][:, :-1], b['inputs'][:, 1:])
    for inp, tgt, w, d in zip(b['inputs'], b['targets'], b['weights'], b['difficulty']):
      prompt = decode(inp).split('=')[0]
      a, c = prompt.split('+')
      assert len(a) == len(c) == d and 1 <= d <= 5
      scored = tgt[w == 1]
      assert scored[-1] == EOS
      assert int(decode(scored[:-1])[::-1]) == int(a) + int(c)
      first = np.flatnonzero(w)[0]
      assert inp[first] == ord('=')  # scoring starts at the prediction after '='
  # eval is a separate stream (only tiny 1-3 digit sums could coincide by chance)
  def hard(b):
    return {tuple(r) for r, d in zip(b['inputs'], b['difficulty']) if d >= 4}
  assert hard(ds.eval_batches(1)[0]) and not hard(ds.train_batch(0)) & hard(ds.eval_batches(1)[0])


BAD = [
    ('name', 'wikipedia', 'data.name'),
    ('seq_len', 0, 'data.seq_len'),
    ('seq_len', 12.5, 'data.seq_len'),
    ('batch_size', -1, 'data.batch_size'),
    ('batch_size', True, 'data.batch_size'),
    ('max_bytes', 0, 'data.max_bytes'),
    ('heldout_fraction', 0.0, 'data.heldout_fraction'),
    ('heldout_fraction', 1.0, 'data.heldout_fraction'),
    ('code_fraction', 1.5, 'data.code_fraction'),
    ('code_fraction', -0.1, 'data.code_fraction'),
    ('num_bits', 0, 'data.num_bits'),
    ('max_digits', 0, 'data.max_digits'),
]


@pytest.mark.parametrize('field,value,needle', BAD)
def test_bad_config(field, value, needle):
  with pytest.raises(ConfigError, match=needle):
    make_dataset(cfg(**{field: value}), seed=0)


@pytest.mark.parametrize('overrides,needle', [
    (dict(name='parity', num_bits=16, seq_len=17), 'data.seq_len'),
    (dict(name='addition', max_digits=6, seq_len=21), 'data.seq_len'),
    (dict(name='addition', max_digits=19, seq_len=128), 'data.max_digits'),
    (dict(name='files', files=''), 'data.files'),
    (dict(name='parity', num_bits=16, seq_len=18, train_max_difficulty=16),
     'train_max_difficulty=16: must be below data.num_bits=16'),
    (dict(name='hops', train_max_difficulty=-1), 'train_max_difficulty=-1'),
    (dict(name='stdlib', train_max_difficulty=3), 'only the synthetic tasks'),
])
def test_bad_task_config(overrides, needle):
  with pytest.raises(ConfigError, match=needle):
    make_dataset(cfg(**overrides), seed=0)


def test_negative_seed():
  with pytest.raises(ConfigError, match='seed'):
    make_dataset(cfg(name='parity'), seed=-1)


def test_unknown_name_lists_known():
  with pytest.raises(ConfigError, match='stdlib.*files.*parity.*addition'):
    make_dataset(cfg(name='nope'), seed=0)


def test_boundary_seq_lens_work():
  make_dataset(cfg(name='parity', num_bits=16, seq_len=18), seed=0).train_batch(0)
  b = make_dataset(cfg(name='addition', max_digits=6, seq_len=22, batch_size=256),
                   seed=0).train_batch(0)
  assert (b['targets'] == EOS).sum(axis=1).tolist() == [1] * 256  # no answer cut off


def test_hops_target_follows_the_listed_edges_k_times():
  from act_jax.data import make_dataset, decode
  ds = make_dataset(config_lib.data_spec(name='hops', seq_len=20, batch_size=64, num_nodes=8,
                                         max_hops=6), seed=3)
  b = ds.train_batch(7)
  for row, tgt, k in zip(b['inputs'], b['targets'], b['difficulty']):
    text = decode(row)
    edges = dict(text[i:i + 2] for i in range(0, 16, 2))
    assert sorted(edges) == sorted(edges.values()) == list('abcdefgh')  # a permutation
    node = text[16]
    assert int(text[17]) == k and text[18] == '='
    for _ in range(k):
      node = edges[node]
    assert decode([tgt[ds.answer_pos]]) == node
    assert b['weights'][0].sum() == 1
  assert set(b['difficulty']) <= set(range(1, 7)) and len(set(b['difficulty'])) > 3
