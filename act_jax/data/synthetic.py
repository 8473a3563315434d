"""Synthetic tasks whose per-example difficulty is known, for studying adaptive computation.

parity   (ACT, Graves 2016): BOS, then num_bits positions of which d (uniform in
         [1, num_bits], at random places) hold a random bit written '0'/'1' and the rest '.',
         then '='. The only scored target is at the '=' position: the parity byte of the
         number of '1's. The answer never appears in the inputs, so causal and bidirectional
         models can both be trained on it (causal_only=False). difficulty = d.
addition BOS "a+b=" then the digits of a+b REVERSED (least significant first, so each digit
         depends only on already-seen carries) then EOS, as next-token prediction scored only
         on the answer digits and EOS. a and b both have d digits, d uniform in
         [1, max_digits]; difficulty = d. Next-token targets are in the inputs, so
         causal_only=True.

parity_vector  the same task as Graves and PonderNet state it (Graves 2016 sec. 3.1;
         Banino et al. 2021 sec. 3.1): inputs are float32 [B, num_bits] vectors whose d
         non-zero entries (d uniform in [1, num_bits], at random places) are +1 or -1 with
         probability 1/2 each, the rest 0; the target, one per example ([B, 1], class 0 / 1),
         is 1 when the number of +1 entries is odd. It is recomputed from the vector itself
         (parity_of). For the step cells of act_jax/model/step_cell.py, which read the
         whole vector at every step. difficulty = d.

hops     pointer chasing: BOS, the edges of a random permutation f of num_nodes letters written
         as 'xy' pairs (x -> y) in random order, then a start letter s, the hop count k as a
         digit, then '='. The scored target at '=' is f^k(s). Every hop is one more lookup,
         so depth really is needed in proportion to k; difficulty = k (uniform in
         [1, max_hops]). causal_only=False.

All are pure functions of (seed, stream, index): training uses
np.random.default_rng([seed, 0, step]) and evaluation a separate stream
default_rng([seed, 1, i]), so eval batches are fixed and drawn independently of training.

Extrapolation (PonderNet, Banino et al. 2021, sec. 3.2: parity on 96-element vectors, trained
on 1-48 non-zero entries, tested on 49-96): with train_max_difficulty = m > 0 training draws
d uniform in [1, m] while evaluation still draws from the whole range [1, max], so held-out
examples with d > m are the extrapolation split (`difficulty_ranges` names both).
"""
from __future__ import annotations

import numpy as np

from act_jax.data.corpus import BOS, EOS, PAD, Dataset, encode, pack_batch

_TRAIN_STREAM, _EVAL_STREAM = 0, 1


class _SyntheticDataset(Dataset):
  """Shared plumbing: subclasses implement _batch(rng) for one global batch."""

  max_difficulty: int  # difficulty is uniform in [1, max_difficulty] on the held-out set

  def __init__(self, seq_len: int, batch_size: int, seed: int, train_max_difficulty: int = 0):
    self._seq_len, self._batch_size, self._seed = seq_len, batch_size, seed
    self.train_max_difficulty = train_max_difficulty or self.max_difficulty

  def _batch(self, rng: np.random.Generator, max_d: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    return self._batch(np.random.default_rng([self._seed, _TRAIN_STREAM, int(step)]),
                       self.train_max_difficulty)

  def eval_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
    return [self._batch(np.random.default_rng([self._seed, _EVAL_STREAM, i]),
                        self.max_difficulty) for i in range(num_batches)]


class ParityDataset(_SyntheticDataset):
  name = 'parity'
  domains = ('parity',)
  causal_only = False

  def __init__(self, num_bits: int, seq_len: int, batch_size: int, seed: int,
               train_max_difficulty: int = 0):
    self.num_bits = self.max_difficulty = num_bits
    self.answer_pos = num_bits + 1  # index of '=' in inputs (after BOS and the bits)
    super().__init__(seq_len, batch_size, seed, train_max_difficulty)

  def _batch(self, rng: np.random.Generator, max_d: int) -> dict[str, np.ndarray]:
    b, n, pos = self._batch_size, self.num_bits, self.answer_pos
    d = rng.integers(1, max_d + 1, size=b)
    # The d positions with the smallest random keys hold bits: d random places per row.
    rank = np.argsort(np.argsort(rng.random((b, n)), axis=1), axis=1)
    used = rank < d[:, None]
    bits = rng.integers(0, 2, size=(b, n))
    chars = np.where(used, np.where(bits == 1, ord('1'), ord('0')), ord('.'))
    inputs = np.full((b, self._seq_len), PAD, dtype=np.int32)
    inputs[:, 0] = BOS
    inputs[:, 1:n + 1] = chars
    inputs[:, pos] = ord('=')
    targets = np.full((b, self._seq_len), PAD, dtype=np.int32)
    targets[:, pos] = ord('0') + (bits * used).sum(axis=1) % 2
    weights = np.zeros((b, self._seq_len), dtype=np.float32)
    weights[:, pos] = 1.0
    return {'inputs': inputs, 'targets': targets, 'weights': weights,
            'domain': np.zeros(b, np.int32), 'difficulty': d.astype(np.int32)}


def parity_of(vectors: np.ndarray) -> np.ndarray:
  """int32 [B]: 1 when a ±1/0 vector has an odd number of +1 entries, else 0."""
  return ((np.asarray(vectors) > 0).sum(axis=-1) % 2).astype(np.int32)


class ParityVectorDataset(_SyntheticDataset):
  name = 'parity_vector'
  domains = ('parity',)
  causal_only = False

  def __init__(self, num_bits: int, batch_size: int, seed: int, train_max_difficulty: int = 0):
    self.num_bits = self.max_difficulty = num_bits
    super().__init__(num_bits, batch_size, seed, train_max_difficulty)

  def _batch(self, rng: np.random.Generator, max_d: int) -> dict[str, np.ndarray]:
    b, n = self._batch_size, self.num_bits
    d = rng.integers(1, max_d + 1, size=b)
    rank = np.argsort(np.argsort(rng.random((b, n)), axis=1), axis=1)
    signs = np.where(rng.integers(0, 2, size=(b, n)) == 1, 1.0, -1.0)
    vectors = np.where(rank < d[:, None], signs, 0.0).astype(np.float32)
    return {'inputs': vectors, 'targets': parity_of(vectors)[:, None],
            'weights': np.ones((b, 1), np.float32), 'domain': np.zeros(b, np.int32),
            'difficulty': d.astype(np.int32)}


class AdditionDataset(_SyntheticDataset):
  name = 'addition'
  domains = ('addition',)
  causal_only = True

  def __init__(self, max_digits: int, seq_len: int, batch_size: int, seed: int,
               train_max_difficulty: int = 0):
    self.max_digits = self.max_difficulty = max_digits
    super().__init__(seq_len, batch_size, seed, train_max_difficulty)

  def _batch(self, rng: np.random.Generator, max_d: int) -> dict[str, np.ndarray]:
    seqs, answer_start, difficulty = [], [], []
    for _ in range(self._batch_size):
      d = int(rng.integers(1, max_d + 1))
      lo = 0 if d == 1 else 10 ** (d - 1)  # exactly d digits (0..9 for d=1)
      a, b = (int(x) for x in rng.integers(lo, 10 ** d, size=2))
      prompt = f'{a}+{b}='
      seqs.append(np.concatenate([[BOS], encode(prompt), encode(str(a + b)[::-1]), [EOS]]))
      # targets[t] = seq[t + 1]; the first answer digit is seq[1 + len(prompt)].
      answer_start.append(len(prompt))
      difficulty.append(d)
    return pack_batch(seqs, self._seq_len, np.zeros(self._batch_size, np.int32),
                      difficulty, answer_start)


class HopsDataset(_SyntheticDataset):
  name = 'hops'
  domains = ('hops',)
  causal_only = False

  def __init__(self, num_nodes: int, max_hops: int, seq_len: int, batch_size: int, seed: int,
               train_max_difficulty: int = 0):
    self.num_nodes, self.max_hops = num_nodes, max_hops
    self.max_difficulty = max_hops
    self.answer_pos = 2 * num_nodes + 3  # BOS, edges, start, k, then '='
    super().__init__(seq_len, batch_size, seed, train_max_difficulty)

  def _batch(self, rng: np.random.Generator, max_d: int) -> dict[str, np.ndarray]:
    b, n = self._batch_size, self.num_nodes
    f = np.argsort(rng.random((b, n)), axis=1)        # a random permutation per row
    order = np.argsort(rng.random((b, n)), axis=1)    # the order edges are listed in
    start = rng.integers(0, n, size=b)
    k = rng.integers(1, max_d + 1, size=b)
    node = start.copy()
    for hop in range(self.max_hops):                  # node <- f(node) while hop < k
      node = np.where(hop < k, f[np.arange(b), node], node)
    letters = ord('a') + np.arange(n)
    src, dst = letters[order], letters[np.take_along_axis(f, order, axis=1)]
    inputs = np.full((b, self._seq_len), PAD, dtype=np.int32)
    inputs[:, 0] = BOS
    inputs[:, 1:2 * n + 1:2], inputs[:, 2:2 * n + 2:2] = src, dst
    inputs[:, 2 * n + 1] = letters[start]
    inputs[:, 2 * n + 2] = ord('0') + k
    inputs[:, self.answer_pos] = ord('=')
    targets = np.full((b, self._seq_len), PAD, dtype=np.int32)
    targets[:, self.answer_pos] = letters[node]
    weights = np.zeros((b, self._seq_len), dtype=np.float32)
    weights[:, self.answer_pos] = 1.0
    return {'inputs': inputs, 'targets': targets, 'weights': weights,
            'domain': np.zeros(b, np.int32), 'difficulty': k.astype(np.int32)}
