"""Byte-level vocabulary, the embedded text corpus, and the language-modelling dataset.

Vocabulary: token ids 0..255 are raw bytes, then four specials (PAD, BOS, EOS, SEP), so any
text encodes without a learned tokenizer and every model shares VOCAB_SIZE=260.

Corpus: nothing is downloaded. The 'code' domain is the .py source of the running
interpreter's standard library; the 'prose' domain is the English documentation shipped
with it (pydoc_data.topics, one document per topic), falling back to stdlib docstrings on
builds that strip pydoc_data. A user glob ('files') can replace both.

Design:
  * Each domain is split train/held-out BY DOCUMENT with a stable hash of its name
    (zlib.crc32), so the split is the same on every run and no held-out text leaks into
    training. Both splits are forced non-empty (a lone document is split by bytes).
  * Documents are stored as one flat int16 array per split (BOS + bytes + EOS, concatenated)
    plus start/length arrays: cheap to hold and to slice windows from.
  * train_batch(step) is a pure function of (seed, step): it seeds a fresh
    np.random.default_rng([seed, 0, step]), never carries RNG state between calls.
  * Eval windows are fixed: consecutive L-token windows of every held-out document,
    interleaved round-robin over documents and alternated over domains, so every eval
    batch mixes domains and eval_batches(n) is a prefix of eval_batches(n + 1).
"""
from __future__ import annotations

import ast
import dataclasses
import glob
import os
import sysconfig
import zlib
from typing import Sequence

import numpy as np

PAD, BOS, EOS, SEP = 256, 257, 258, 259
VOCAB_SIZE = 260

# Directories skipped when harvesting stdlib code: third-party code, big test suites, and
# pydoc_data itself (it is the prose domain; as code it would be one 700 KB dict literal).
_SKIP_DIRS = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idlelib',
                        'pydoc_data', '__pycache__'})


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of text as int32 token ids (no specials added)."""
  return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)


def decode(ids: Sequence[int] | np.ndarray) -> str:
  """Inverse of encode: special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
  ids = np.asarray(ids).reshape(-1)
  return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode('utf-8', errors='replace')


class Dataset:
  """What every dataset offers the trainer (see make_dataset). Batches are numpy dicts:
  inputs/targets int32 [B,L], weights float32 [B,L], domain/difficulty int32 [B]."""
  name: str
  vocab_size: int = VOCAB_SIZE
  domains: tuple[str, ...]
  causal_only: bool

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def eval_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
    raise NotImplementedError


def pack_batch(windows: Sequence[np.ndarray], seq_len: int, domain: Sequence[int],
               difficulty: Sequence[int] | None = None,
               answer_start: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Turns B token sequences (<= seq_len + 1 long) into a next-token batch.

  Sequences are right-padded with PAD; weights are 1 where the target is a real token, and
  additionally only on targets at index >= answer_start[b] when given (masked tasks)."""
  b = len(windows)
  w = np.full((b, seq_len + 1), PAD, dtype=np.int32)
  for i, seq in enumerate(windows):
    w[i, :len(seq)] = seq
  inputs, targets = w[:, :-1], w[:, 1:]
  weights = targets != PAD
  if answer_start is not None:
    weights &= np.arange(seq_len)[None, :] >= np.asarray(answer_start)[:, None]
  return {
      'inputs': np.ascontiguousarray(inputs),
      'targets': np.ascontiguousarray(targets),
      'weights': weights.astype(np.float32),
      'domain': np.asarray(domain, dtype=np.int32),
      'difficulty': np.zeros(b, np.int32) if difficulty is None
                    else np.asarray(difficulty, dtype=np.int32),
  }


@dataclasses.dataclass(frozen=True)
class Split:
  """Documents of one domain and split; document i is tokens[starts[i]:starts[i]+lengths[i]]."""
  names: tuple[str, ...]
  tokens: np.ndarray   # int16 (ids < 260 fit), every document as BOS + bytes + EOS
  starts: np.ndarray   # int64 [num_docs]
  lengths: np.ndarray  # int64 [num_docs]

  @classmethod
  def from_docs(cls, docs: Sequence[tuple[str, bytes]]) -> Split:
    parts = [np.concatenate([[BOS], np.frombuffer(d, np.uint8), [EOS]]).astype(np.int16)
             for _, d in docs]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return cls(tuple(n for n, _ in docs), np.concatenate(parts), starts, lengths)

  def window(self, doc: int, offset: int, seq_len: int) -> np.ndarray:
    """Up to seq_len + 1 tokens of document doc from offset (shorter at the document end)."""
    start, n = int(self.starts[doc]), int(self.lengths[doc])
    return self.tokens[start + offset:start + min(offset + seq_len + 1, n)]


def _hash(name: str, salt: str = '') -> int:
  return zlib.crc32((salt + name).encode('utf-8'))


def _take(docs: Sequence[tuple[str, bytes]], max_bytes: int) -> list[tuple[str, bytes]]:
  """Documents in the given order until max_bytes; the last one is truncated to fit."""
  out, total = [], 0
  for name, data in docs:
    if total >= max_bytes:
      break
    if data:
      out.append((name, data[:max_bytes - total]))
      total += len(out[-1][1])
  return out


def split_docs(docs: Sequence[tuple[str, bytes]], heldout_fraction: float
               ) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
  """(train, heldout) by a stable hash of each document's name; both are non-empty."""
  if len(docs) == 1:  # a lone document: hold out its tail
    name, data = docs[0]
    cut = min(max(1, round(len(data) * (1 - heldout_fraction))), len(data))
    return [(name + '[train]', data[:cut])], [(name + '[heldout]', data[cut:])]
  held = [_hash(n) % 1000 < heldout_fraction * 1000 for n, _ in docs]
  if all(held) or not any(held):  # force one document across, chosen by the hash too
    flip = min(range(len(docs)), key=lambda i: (_hash(docs[i][0]) % 1000, docs[i][0]))
    held = [not h if i == flip else h for i, h in enumerate(held)]
  return ([d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h])


def _stdlib_paths() -> list[tuple[str, str]]:
  """(relative name, path) of stdlib .py files, in a stable hash order so that a max_bytes
  prefix samples the whole library rather than only modules starting with 'a'."""
  root = sysconfig.get_paths()['stdlib']
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for f in filenames:
      if f.endswith('.py'):
        path = os.path.join(dirpath, f)
        found.append((os.path.relpath(path, root).replace(os.sep, '/'), path))
  return sorted(found, key=lambda rp: (_hash(rp[0], 'order:'), rp[0]))


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def code_documents(max_bytes: int) -> list[tuple[str, bytes]]:
  return _take([(rel, _read(path)) for rel, path in _stdlib_paths()], max_bytes)


def docstring_documents(max_bytes: int) -> list[tuple[str, bytes]]:
  """Fallback prose: all docstrings of each stdlib module, one document per module."""
  docs, total = [], 0
  for rel, path in _stdlib_paths():
    if total >= max_bytes:
      break
    try:
      tree = ast.parse(_read(path))
    except (SyntaxError, ValueError):
      continue
    nodes = [n for n in ast.walk(tree) if isinstance(
        n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    text = '\n\n'.join(d for d in (ast.get_docstring(n) for n in nodes) if d)
    if text:
      docs.append(('docstrings/' + rel, text.encode('utf-8')))
      total += len(docs[-1][1])
  return _take(docs, max_bytes)


def prose_documents(max_bytes: int) -> list[tuple[str, bytes]]:
  """The interpreter's documentation topics, or module docstrings if pydoc_data is absent."""
  try:
    from pydoc_data import topics as pydoc_topics
    topics = dict(pydoc_topics.topics)
  except (ImportError, AttributeError):
    topics = {}
  if not topics:
    return docstring_documents(max_bytes)
  docs = [('topics/' + k, str(v).encode('utf-8')) for k, v in topics.items()]
  return _take(sorted(docs, key=lambda d: (_hash(d[0], 'order:'), d[0])), max_bytes)


def file_documents(pattern: str, max_bytes: int) -> dict[str, list[tuple[str, bytes]]]:
  """Files matching the glob, by domain: '.py' is code, anything else prose (empty skipped)."""
  paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
  by_domain: dict[str, list[tuple[str, bytes]]] = {'code': [], 'prose': []}
  for p in paths:
    by_domain['code' if p.endswith('.py') else 'prose'].append((p, _read(p)))
  capped = {k: _take(v, max_bytes) for k, v in by_domain.items()}
  return {k: v for k, v in capped.items() if v}


# (max_bytes, heldout_fraction) -> {domain: (train, heldout)}; the stdlib never changes
# while we run, so every Dataset (and test) built with the same sizes shares one load.
_STDLIB_CACHE: dict[tuple[int, float], dict[str, tuple[Split, Split]]] = {}


def build_splits(docs_by_domain: dict[str, list[tuple[str, bytes]]],
                 heldout_fraction: float) -> dict[str, tuple[Split, Split]]:
  out = {}
  for domain, docs in docs_by_domain.items():
    train, held = split_docs(docs, heldout_fraction)
    out[domain] = (Split.from_docs(train), Split.from_docs(held))
  return out


def stdlib_corpus(max_bytes: int, heldout_fraction: float) -> dict[str, tuple[Split, Split]]:
  key = (int(max_bytes), float(heldout_fraction))
  if key not in _STDLIB_CACHE:
    _STDLIB_CACHE[key] = build_splits(
        {'code': code_documents(max_bytes), 'prose': prose_documents(max_bytes)},
        heldout_fraction)
  return _STDLIB_CACHE[key]


class TextDataset(Dataset):
  """Causal LM over byte windows of a {domain: (train Split, heldout Split)} corpus."""
  causal_only = True

  def __init__(self, name: str, splits: dict[str, tuple[Split, Split]], seq_len: int,
               batch_size: int, code_fraction: float, seed: int):
    self.name = name
    self.domains = tuple(d for d in ('code', 'prose') if d in splits)
    self._splits = [splits[d] for d in self.domains]
    self._seq_len, self._batch_size = seq_len, batch_size
    self._code_fraction, self._seed = code_fraction, seed
    self._eval_windows: list[list[tuple[int, int]]] | None = None

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, 0, int(step)])
    if len(self.domains) == 2:  # domain 0 is code
      domains = (rng.random(self._batch_size) >= self._code_fraction).astype(np.int64)
    else:
      domains = np.zeros(self._batch_size, np.int64)
    windows = []
    for dom in domains:
      split = self._splits[dom][0]
      # A document with probability proportional to its length, then a uniform offset:
      # every token of the domain is about equally likely to be trained on.
      cum = np.cumsum(split.lengths)
      doc = int(np.searchsorted(cum, rng.integers(cum[-1]), side='right'))
      offset = int(rng.integers(max(int(split.lengths[doc]) - self._seq_len, 1)))
      windows.append(split.window(doc, offset, self._seq_len))
    return pack_batch(windows, self._seq_len, domains)

  def _windows(self) -> list[list[tuple[int, int]]]:
    """Per domain: (doc, offset) of all held-out windows, round-robin over documents."""
    if self._eval_windows is None:
      self._eval_windows = []
      for _, held in self._splits:
        per_doc = [list(range(0, max(int(n) - 1, 1), self._seq_len)) for n in held.lengths]
        rounds = max(len(o) for o in per_doc)
        self._eval_windows.append([(d, o[r]) for r in range(rounds)
                                   for d, o in enumerate(per_doc) if r < len(o)])
    return self._eval_windows

  def heldout_texts(self) -> list[tuple[str, bytes]]:
    """(name, bytes) of every held-out document (without BOS/EOS)."""
    out = []
    for _, held in self._splits:
      for name, start, n in zip(held.names, held.starts, held.lengths):
        out.append((name, held.tokens[start + 1:start + n - 1].astype(np.uint8).tobytes()))
    return out

  def spread_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
    """Held-out batches whose windows are evenly spaced over ALL held-out windows of each
    domain (in document order), instead of every document's beginning first as in
    eval_batches: boilerplate at the top of files (licence headers, imports) then weighs no
    more than it does in the text. Domains alternate as in eval_batches."""
    nd, b = len(self.domains), self._batch_size
    per = [[(d, o) for d, n in enumerate(held.lengths)
            for o in range(0, max(int(n) - 1, 1), self._seq_len)] for _, held in self._splits]
    want = [len(range(dom, num_batches * b, nd)) for dom in range(nd)]
    picks = [[w[i] for i in np.linspace(0, len(w) - 1, k).astype(int)] for w, k in zip(per, want)]
    batches = []
    for i in range(num_batches):
      windows, domains = [], []
      for g in range(i * b, (i + 1) * b):
        dom, k = g % nd, g // nd
        doc, offset = picks[dom][k]
        windows.append(self._splits[dom][1].window(doc, offset, self._seq_len))
        domains.append(dom)
      batches.append(pack_batch(windows, self._seq_len, domains))
    return batches

  def eval_batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
    wins, nd, b = self._windows(), len(self.domains), self._batch_size
    batches = []
    for i in range(num_batches):
      windows, domains = [], []
      for g in range(i * b, (i + 1) * b):  # global example index: domains alternate
        dom, k = g % nd, g // nd
        doc, offset = wins[dom][k % len(wins[dom])]  # cycles if more are asked than exist
        windows.append(self._splits[dom][1].window(doc, offset, self._seq_len))
        domains.append(dom)
      batches.append(pack_batch(windows, self._seq_len, domains))
    return batches
