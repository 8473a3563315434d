"""Data for act_jax: a byte-level vocabulary, an embedded text corpus, and synthetic tasks.

make_dataset(data_spec, seed) validates the data spec (spec.data, or a mapping with every
config.data field; ConfigError naming the field), then returns a Dataset whose
train_batch(step) is a pure function of (seed, step) and whose eval_batches(n) is a fixed
held-out set. Datasets:
  stdlib    causal LM on the running interpreter's stdlib source ('code') and docs ('prose')
  files     causal LM on files matching data.files ('.py' -> code, others -> prose)
  parity    ACT parity task, difficulty = number of bits (works for bidirectional models)
  parity_vector  the same task as ±1/0 float vectors [B, num_bits] with one class target per
            example, for the step cells (model.kind gru | elman); seq_len = num_bits
  addition  multi-digit addition with reversed answers, difficulty = number of digits
  hops      pointer chasing through a random permutation, difficulty = number of hops
Everything is numpy; device placement and sharding happen in the trainer.
"""
from __future__ import annotations

import math
import dataclasses
from typing import Any, Mapping

import numpy as np

from act_jax.data.corpus import (BOS, EOS, PAD, SEP, VOCAB_SIZE, Dataset, TextDataset,
                                 build_splits, decode, encode, file_documents, stdlib_corpus)
from act_jax.data.synthetic import (AdditionDataset, HopsDataset, ParityDataset,
                                   ParityVectorDataset, parity_of)
from act_jax.errors import ConfigError
from act_jax.spec import DataSpec

__all__ = ['BOS', 'EOS', 'PAD', 'SEP', 'VOCAB_SIZE', 'Dataset', 'DataSpec', 'decode', 'encode',
           'make_dataset', 'validate', 'difficulty_ranges', 'KNOWN_NAMES', 'CAUSAL_ONLY',
           'VECTOR_TASKS', 'parity_of']

KNOWN_NAMES = ('stdlib', 'files', 'parity', 'addition', 'hops', 'parity_vector')
# Tasks whose inputs are float vectors [B, seq_len] with one target per example: a step
# cell's (model.kind != 'transformer') data, and only theirs.
VECTOR_TASKS = ('parity_vector',)
# Tasks whose targets are only valid for a causal model (teacher forcing / next token).
CAUSAL_ONLY = ('stdlib', 'files', 'addition')
# Synthetic tasks: the config field that sets the largest difficulty (non-zero entries,
# digits per operand, hops).
DIFFICULTY_FIELD = {'parity': 'num_bits', 'addition': 'max_digits', 'hops': 'max_hops',
                    'parity_vector': 'num_bits'}

def as_data_spec(data_cfg: DataSpec | Mapping[str, Any]) -> DataSpec:
  """A DataSpec as it is; a complete mapping of the config.data fields (e.g. a config's
  data section) as a DataSpec. A missing or unknown field is a ConfigError naming it."""
  if isinstance(data_cfg, DataSpec):
    return data_cfg
  values = dict(data_cfg.items())
  names = [f.name for f in dataclasses.fields(DataSpec)]
  unknown = sorted(set(values) - set(names))
  missing = [n for n in names if n not in values]
  if unknown or missing:
    raise ConfigError(f'data: unknown field(s) {unknown}, missing field(s) {missing}; the fields '
                      f'are {", ".join(names)} (config.default_config().data has them all)')
  return DataSpec(**values)


def _is_int(v: Any) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
  return (isinstance(v, (int, float, np.integer, np.floating))
          and not isinstance(v, (bool, np.bool_)) and math.isfinite(v))


def validate(data_cfg: DataSpec | Mapping[str, Any]) -> None:
  """Raises ConfigError naming the first bad field of data_cfg; returns None when valid."""
  data_cfg = as_data_spec(data_cfg)
  name = data_cfg.name
  if name not in KNOWN_NAMES:
    raise ConfigError(f'data.name={name!r}: unknown; known: {", ".join(KNOWN_NAMES)}')
  for key in ('seq_len', 'batch_size', 'max_bytes', 'num_bits', 'max_digits', 'num_nodes',
              'max_hops'):
    v = getattr(data_cfg, key)
    if not _is_int(v) or v < 1:
      raise ConfigError(f'data.{key}={v!r}: must be a positive integer')
  v = data_cfg.heldout_fraction
  if not _is_real(v) or not 0 < v < 1:
    raise ConfigError(f'data.heldout_fraction={v!r}: must be a number in (0, 1)')
  v = data_cfg.code_fraction
  if not _is_real(v) or not 0 <= v <= 1:
    raise ConfigError(f'data.code_fraction={v!r}: must be a number in [0, 1]')
  v = data_cfg.train_max_difficulty
  if not _is_int(v) or v < 0:
    raise ConfigError(f'data.train_max_difficulty={v!r}: must be a non-negative integer '
                      f'(0: train on the whole difficulty range)')
  if v and name not in DIFFICULTY_FIELD:
    raise ConfigError(f'data.train_max_difficulty={v}: only the synthetic tasks '
                      f'({", ".join(DIFFICULTY_FIELD)}) have a difficulty; set it to 0 for '
                      f'data.name={name}')
  if v and v >= getattr(data_cfg, DIFFICULTY_FIELD[name]):
    field = DIFFICULTY_FIELD[name]
    raise ConfigError(f'data.train_max_difficulty={v}: must be below data.{field}='
                      f'{getattr(data_cfg, field)} so an extrapolation range is left '
                      f'(0: train on the whole range)')
  seq_len = data_cfg.seq_len
  if name == 'files':
    v = data_cfg.files
    if not isinstance(v, str) or not v:
      raise ConfigError(f'data.files={v!r}: must be a non-empty glob when data.name=files')
  elif name == 'parity':
    bits = data_cfg.num_bits
    if seq_len < bits + 2:  # BOS + bits + '='
      raise ConfigError(f'data.seq_len={seq_len}: parity with data.num_bits={bits} needs '
                        f'seq_len >= num_bits + 2 = {bits + 2}')
  elif name == 'parity_vector':
    bits = data_cfg.num_bits
    if seq_len != bits:
      raise ConfigError(f'data.seq_len={seq_len}: parity_vector inputs are the vector itself; '
                        f'set seq_len = data.num_bits = {bits}')
  elif name == 'hops':
    nodes, hops = data_cfg.num_nodes, data_cfg.max_hops
    if nodes > 26:
      raise ConfigError(f'data.num_nodes={nodes}: must be at most 26 (letters a-z)')
    if hops > 9:
      raise ConfigError(f'data.max_hops={hops}: must be at most 9 (one digit)')
    if seq_len < 2 * nodes + 4:
      raise ConfigError(f'data.seq_len={seq_len}: hops with data.num_nodes={nodes} needs '
                        f'seq_len >= 2 * num_nodes + 4 = {2 * nodes + 4}')
  elif name == 'addition':
    digits = data_cfg.max_digits
    if digits > 18:  # operands are drawn as int64
      raise ConfigError(f'data.max_digits={digits}: must be at most 18')
    if seq_len < 3 * digits + 4:  # BOS a + b = (digits+1) EOS, minus the shift
      raise ConfigError(f'data.seq_len={seq_len}: addition with data.max_digits={digits} '
                        f'needs seq_len >= 3 * max_digits + 4 = {3 * digits + 4}')


def difficulty_ranges(data_cfg: DataSpec | Mapping[str, Any]) -> dict[str, tuple[int, int]]:
  """{'in-distribution': (1, m), 'extrapolation': (m + 1, max)} (inclusive) for a synthetic
  task trained on difficulty <= m = data.train_max_difficulty; {} when it trains on the whole
  range or has no difficulty (text)."""
  data_cfg = as_data_spec(data_cfg)
  m = int(data_cfg.train_max_difficulty)
  if not m or data_cfg.name not in DIFFICULTY_FIELD:
    return {}
  return {'in-distribution': (1, m),
          'extrapolation': (m + 1, int(getattr(data_cfg, DIFFICULTY_FIELD[data_cfg.name])))}


def make_dataset(data_cfg: DataSpec | Mapping[str, Any], seed: int) -> Dataset:
  """Validates data_cfg (spec.data, or a mapping with every config.data field) and builds
  the Dataset."""
  data_cfg = as_data_spec(data_cfg)
  validate(data_cfg)
  name = data_cfg.name
  seq_len, batch_size = int(data_cfg.seq_len), int(data_cfg.batch_size)
  if not _is_int(seed) or seed < 0:  # numpy's SeedSequence rejects negative entropy
    raise ConfigError(f'seed={seed!r}: must be a non-negative integer')
  seed = int(seed)
  train_max = int(data_cfg.train_max_difficulty)
  if name == 'parity':
    return ParityDataset(int(data_cfg.num_bits), seq_len, batch_size, seed, train_max)
  if name == 'parity_vector':
    return ParityVectorDataset(int(data_cfg.num_bits), batch_size, seed, train_max)
  if name == 'hops':
    return HopsDataset(int(data_cfg.num_nodes), int(data_cfg.max_hops),
                       seq_len, batch_size, seed, train_max)
  if name == 'addition':
    return AdditionDataset(int(data_cfg.max_digits), seq_len, batch_size, seed, train_max)
  max_bytes = int(data_cfg.max_bytes)
  heldout = float(data_cfg.heldout_fraction)
  if name == 'stdlib':
    splits = stdlib_corpus(max_bytes, heldout)
  else:
    pattern = data_cfg.files
    docs = file_documents(pattern, max_bytes)
    if not docs:
      raise ConfigError(f'data.files={pattern!r}: the glob matches no non-empty files')
    splits = build_splits(docs, heldout)
  return TextDataset(name, splits, seq_len, batch_size,
                     float(data_cfg.code_fraction), seed)
