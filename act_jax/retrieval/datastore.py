"""The kNN datastore of a trained run: build (restartable), load, tune, evaluate.

A datastore maps each token position of a corpus to (key, value) (kNN-LM, Khandelwal et al.
2020): value = the next byte; keys = final_norm(h_n), the exit head's input, at each exit
step n of the run's model (the steps the retrieval arm may retrieve at; one key set per
step). Keys come from the full-depth masked scan (every step's state exists).

Layout of DS/ (tensorstore zarr arrays: chunked, written in place):
  keys/        float16 [X, I, D]   values/  int32 [I]
  progress.json   the build's arguments and the window chunks already written
  datastore.json  written last (the datastore is complete only when it exists): the source
                  model's fingerprint, key dimension and steps, entry count, and the tuned
                  interpolation weight, temperature, gate and gate threshold.
A killed build resumes at the first unwritten chunk: windows are fixed by the files and
arguments, and each chunk's keys are a deterministic function of them, so a resumed build
is identical to an uninterrupted one (tests pin it).

Corpus split: the files' documents are split train/held-out exactly as the 'files' dataset
splits them (data.heldout_fraction, by name), so `evaluate --files=GLOB` scores text
the datastore never saw. The datastore stores the train documents; a hashed `tune_fraction`
of them is kept out to tune lam, tau and the gate (act_jax/model/retrieval/gate.py).

Dims (legend: act_jax/__init__.py): X exit steps, I datastore entries, D d_model, B batch,
L length, V vocabulary, Z flattened tokens, O neighbours.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
import zlib
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec as P

from act_jax import data as data_lib
from act_jax.calibrate import operating_point
from act_jax.data import corpus
from act_jax.errors import CheckpointError, ConfigError
from act_jax.infer import inference
from act_jax.model.retrieval import arm as arm_lib
from act_jax.model.retrieval import gate as gate_lib
from act_jax.model.retrieval import knn as knn_lib
from act_jax.model.transformer import make_model
from act_jax.run import directory as run_lib
from act_jax.scale import sharding as sharding_lib
from act_jax.spec import OperatingPoint, RetrievalSpec, Spec
from act_jax.train import training

FORMAT = 1
META, PROGRESS = 'datastore.json', 'progress.json'
LAMBDAS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)
TEMPERATURE_SCALES = (0.125, 0.25, 0.5, 1.0, 2.0)  # x the median neighbour distance


# ----------------------------------------------------------------------------- helpers
def fingerprint(spec: Spec, params: dict) -> str:
  """Identity of the model whose states are the keys: its model section and a digest of
  the weights the keys depend on first and last (embedding, final norm)."""
  h = hashlib.sha256(json.dumps(spec.to_dict()['model'], sort_keys=True).encode())
  for name in ('embedding', 'final_norm_scale'):
    h.update(np.asarray(params[name], np.float32).tobytes())
  return h.hexdigest()[:16]


def doc_hash(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()[:16]


def documents(pattern: str, data: Any, tune_fraction: float, max_bytes: int
              ) -> tuple[list, list]:
  """(stored, tuning) documents: the train split of the files exactly as the 'files' dataset
  of the run's data spec makes it (same byte cap, same split), the tuning share chosen by a
  salted hash of each name; stored capped at max_bytes. With tune_fraction > 0 and two or more
  train documents, at least one tunes and one is stored (as split_docs keeps both splits
  non-empty): on a few files the hash alone could pick none, and the gate would go
  untrained."""
  heldout_fraction = data.heldout_fraction
  by_domain = corpus.file_documents(pattern, data.max_bytes)
  if not by_domain:
    raise ConfigError(f'--files={pattern!r}: the glob matches no non-empty files')
  store, tune = [], []
  score = lambda name: zlib.crc32(('tune:' + name).encode()) % 1000  # noqa: E731
  for docs in by_domain.values():
    train, _ = corpus.split_docs(docs, heldout_fraction)
    for name, data in train:
      (tune if score(name) < tune_fraction * 1000 else store).append((name, data))
  if tune_fraction > 0 and len(store) + len(tune) >= 2 and (not tune or not store):
    src, dst, sign = (store, tune, 1) if not tune else (tune, store, -1)
    # the document the hash ranks nearest the other side
    i = min(range(len(src)), key=lambda k: (sign * score(src[k][0]), src[k][0]))
    dst.append(src.pop(i))
  return corpus._take(store, max_bytes), tune  # noqa: SLF001 -- the corpus's own cap


def windows(docs: Sequence[tuple[str, bytes]], seq_len: int) -> list[np.ndarray]:
  """Consecutive windows of seq_len + 1 tokens (BOS + bytes + EOS per document)."""
  if not docs:
    return []
  split = corpus.Split.from_docs(docs)
  out = []
  for d, n in enumerate(split.lengths):
    out.extend(split.window(d, o, seq_len) for o in range(0, max(int(n) - 1, 1), seq_len))
  return out


def _states_fn(spec: Spec) -> Callable:
  """jit (variables, inputs [B, L]) -> (queries f32 [X, B, L, D] at the exit steps,
  exit logits [X, B, L, V]) at full depth."""
  model = make_model(spec, keep_states=True)
  steps = np.asarray(spec.policy.exit_steps())
  full = OperatingPoint.full_depth().vector(spec)

  def fn(variables, inputs_BL):
    _, aux = model.apply(variables, inputs_BL, threshold=full,
                         rngs={'halting': jax.random.PRNGKey(0)})
    norm = variables['params']['final_norm_scale']
    return arm_lib.query(aux['step_states'][steps], norm), aux['step_logits'][steps]

  return jax.jit(fn)


# ----------------------------------------------------------------------------- build
def build(workdir: str, files: str, out: str, max_bytes: int = 300_000,
          tune_fraction: float = 0.1, chunk_windows: int = 64, batch: int = 16,
          tune_windows: int = 128, neighbours: int = 16,
          log: Callable[[str], None] = print, stop_after: Optional[int] = None) -> dict:
  """Builds (or resumes) the datastore of run `workdir` over the train split of `files`
  at `out`, then tunes it; returns the written datastore.json. stop_after=k stops (as a
  kill would) after writing k chunks in this call (tests)."""
  run_lib.check_output_dir(out, '--out', (PROGRESS, META), 'a datastore')
  spec, variables, step = run_lib.load(workdir)
  arm_lib.check_model(spec)
  if not 0 <= tune_fraction < 1:
    raise ConfigError(f'--tune_fraction={tune_fraction}: must be in [0, 1)')
  for name, v in (('max_bytes', max_bytes), ('chunk_windows', chunk_windows),
                  ('neighbours', neighbours), ('batch', batch)):
    if v < 1:
      raise ConfigError(f'--{name}={v}: must be a positive integer')
  store_docs, tune_docs = documents(files, spec.data, tune_fraction, max_bytes)
  if not store_docs:
    raise ConfigError(f'--files={files!r}: no train documents left to store')
  seq_len = spec.data.seq_len
  wins = windows(store_docs, seq_len)
  counts = np.asarray([len(w) - 1 for w in wins], np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  n_entries = int(counts.sum())
  steps = [int(s) for s in spec.policy.exit_steps()]
  d = spec.model.d_model
  args = {'format': FORMAT, 'workdir': os.path.abspath(workdir), 'step': step,
          'fingerprint': fingerprint(spec, variables['params']), 'files': files,
          'max_bytes': int(max_bytes), 'tune_fraction': float(tune_fraction),
          'chunk_windows': int(chunk_windows), 'batch': int(batch), 'seq_len': int(seq_len),
          'entries': n_entries, 'steps': steps, 'd_model': int(d),
          'documents': len(store_docs), 'tune_documents': len(tune_docs)}
  prog_path = os.path.join(out, PROGRESS)
  done: list[int] = []
  prog = run_lib.read_json(prog_path)
  if os.path.exists(os.path.join(out, META)) and (prog is None or prog['args'] != args):
    # a finished datastore is never deleted by a build of other arguments
    raise ConfigError(f'--out={out!r} holds a complete datastore built with other arguments '
                      f'or from another model; choose another directory or delete it')
  if prog is not None:
    if prog['args'] == args:
      done = prog['done']  # resume (a finished build: re-tunes only)
    else:
      log(f'{out}: an unfinished build of other arguments; starting over')
      shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)
  if not done:
    for name in ('keys', 'values'):
      shutil.rmtree(os.path.join(out, name), ignore_errors=True)
  create = not done
  keys = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file',
                                                 'path': os.path.join(out, 'keys')}},
                 create=create, open=not create, dtype=ts.float16,
                 shape=[len(steps), n_entries, d],
                 chunk_layout=ts.ChunkLayout(read_chunk_shape=[1, 16384, d])).result()
  values = ts.open({'driver': 'zarr', 'kvstore': {'driver': 'file',
                                                   'path': os.path.join(out, 'values')}},
                   create=create, open=not create, dtype=ts.int32, shape=[n_entries],
                   chunk_layout=ts.ChunkLayout(read_chunk_shape=[65536])).result()
  run_lib.write_json(prog_path, {'args': args, 'done': done})
  states = _states_fn(spec)
  n_chunks = -(-len(wins) // chunk_windows)
  log(f'datastore {out}: {n_entries:,} entries ({len(store_docs)} documents, '
      f'{len(wins)} windows) x {len(steps)} key sets of dim {d}; '
      f'{len(done)}/{n_chunks} chunks already written')
  t0, written, n_written = time.time(), 0, 0
  for c in range(n_chunks):
    if c in done:
      continue
    lo, hi = c * chunk_windows, min((c + 1) * chunk_windows, len(wins))
    e0, e1 = int(starts[lo]), int(starts[hi - 1] + counts[hi - 1])
    k_XID = np.zeros((len(steps), e1 - e0, d), np.float16)
    v_I = np.zeros((e1 - e0,), np.int32)
    for b0 in range(lo, hi, batch):
      ws = wins[b0:min(b0 + batch, hi)]
      packed = corpus.pack_batch(ws + [ws[-1]] * (batch - len(ws)), seq_len, [0] * batch)
      q_XBLD = np.asarray(states(variables, jnp.asarray(packed['inputs']))[0])
      for j, w in enumerate(ws):
        n, s = len(w) - 1, int(starts[b0 + j]) - e0
        k_XID[:, s:s + n] = q_XBLD[:, j, :n]
        v_I[s:s + n] = packed['targets'][j, :n]
    # one write per chunk; tensorstore replaces each storage chunk file atomically
    keys[:, e0:e1].write(k_XID).result()
    values[e0:e1].write(v_I).result()
    done.append(c)
    run_lib.write_json(prog_path, {'args': args, 'done': done})  # after the chunk's data landed
    written += 1
    n_written += e1 - e0
    el, left = time.time() - t0, n_chunks - len(done)
    log(f'chunk {len(done)}/{n_chunks}: entries up to {e1:,} of {n_entries:,}, {el:.0f} s, '
        f'{n_written / max(el, 1e-9):,.0f} entries/s, ETA {el / written * left:.0f} s')
    if stop_after is not None and written >= stop_after and left:
      return {'complete': False, 'done': len(done), 'chunks': n_chunks}
  meta = dict(args, key='final_norm(h) at each exit step', complete=True,
              document_hashes=sorted({doc_hash(text) for _, text in store_docs + tune_docs}))
  ds = load(out, spec, params=variables['params'], meta=meta)
  meta['tuned'] = tune(spec, variables, ds, tune_docs, tune_windows, neighbours, log)
  run_lib.write_json(os.path.join(out, META), meta)
  log(f'wrote {os.path.join(out, META)} ({time.time() - t0:.0f} s)')
  return meta


# ----------------------------------------------------------------------------- load
@dataclasses.dataclass(frozen=True)
class Datastore:
  """A loaded datastore: arrays on device and its metadata."""
  path: str
  meta: dict
  keys_XID: jax.Array     # float16
  values_I: jax.Array     # int32
  valid_I: jax.Array      # bool (False: padding added to split evenly over devices)
  mesh: Any = None        # entries split over this mesh's 'data' axis (None: one device)

  def retrieval_spec(self, mode: str, neighbours: Optional[int] = None,
                     approx: bool = False, recall_target: float = 0.95) -> RetrievalSpec:
    if mode not in arm_lib.MODES:
      raise ConfigError(f'--retrieve={mode!r}: allowed: {", ".join(arm_lib.MODES)}')
    tuned = self.meta.get('tuned') or {}
    if mode == 'gate' and 'gate' not in tuned:
      raise ConfigError(f'--retrieve=gate: datastore {self.path} has no trained gate (built '
                        f'with --tune_fraction=0)')
    k = int(tuned.get('neighbours', 16) if neighbours is None else neighbours)
    if k < 1:
      raise ConfigError(f'--neighbours={k}: must be >= 1')
    return RetrievalSpec(mode=mode, steps=tuple(self.meta['steps']), neighbours=k,
                         approx=bool(approx), recall_target=float(recall_target),
                         mesh=self.mesh)

  def arrays(self, lam: Optional[float] = None, temperature: Optional[float] = None,
             gate_threshold: Optional[float] = None, max_distance: Optional[float] = None
             ) -> dict:
    """The arm's traced inputs (defaults: the tuned values)."""
    tuned = self.meta.get('tuned') or {}
    gate = tuned.get('gate') or {'w': [0.0] * (gate_lib.SCALARS + self.keys_XID.shape[-1]),
                                 'b': 0.0}
    pick = lambda v, key, default: float(tuned.get(key, default) if v is None else v)  # noqa
    return {'keys_XID': self.keys_XID, 'values_I': self.values_I, 'valid_I': self.valid_I,
            'gate': {'w': jnp.asarray(gate['w'], jnp.float32),
                     'b': jnp.asarray(gate['b'], jnp.float32)},
            'lam': jnp.float32(pick(lam, 'lam', 0.25)),
            'temperature': jnp.float32(pick(temperature, 'temperature', 1.0)),
            'gate_threshold': jnp.float32(pick(gate_threshold, 'gate_threshold', 0.5)),
            'max_distance': jnp.float32(pick(max_distance, 'max_distance', np.inf))}


def load(path: str, spec: Spec, params: Optional[dict] = None, meta: Optional[dict] = None,
         mesh: Any = None) -> Datastore:
  """Loads DS for the model of `spec` (params: to check the fingerprint). Refuses a datastore
  that is incomplete or from another model (key dimension, steps, weights) with a
  ConfigError naming the mismatch. mesh: split the entries over its 'data' axis (padded to
  a multiple with invalid entries); the model's variables must then live on that mesh."""
  if meta is None:
    mpath = os.path.join(path, META)
    if not os.path.exists(mpath):
      what = 'an unfinished build (rerun experiments.datastore to finish it)' if \
          os.path.exists(os.path.join(path, PROGRESS)) else 'not a datastore'
      raise CheckpointError(f'--datastore={path!r}: {what}')
    meta = run_lib.read_json(mpath)
  try:  # a datastore.json an edit damaged: name the file
    d_model, meta_steps = int(meta['d_model']), [int(s) for s in meta['steps']]
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f'{mpath}: not written by experiments.datastore ({type(e).__name__}: '
                      f'{e}); build the datastore again') from None
  steps = [int(s) for s in spec.policy.exit_steps()]
  if d_model != spec.model.d_model:
    raise ConfigError(f'--datastore={path!r}: keys of dimension {meta["d_model"]}, this model '
                      f'has d_model={spec.model.d_model} (a datastore of another model)')
  if meta_steps != steps:
    raise ConfigError(f'--datastore={path!r}: keys at depth steps {meta["steps"]}, this '
                      f'model exits at steps {steps} (a datastore of another model)')
  if params is not None and meta['fingerprint'] != fingerprint(spec, params):
    raise ConfigError(f'--datastore={path!r}: built from another model (fingerprint '
                      f'{meta["fingerprint"]}, this run {fingerprint(spec, params)}; source '
                      f'{meta["workdir"]} step {meta["step"]}): rebuild it for this run')
  kv = lambda name: ts.open({'driver': 'zarr', 'kvstore': {  # noqa: E731
      'driver': 'file', 'path': os.path.join(path, name)}}, open=True).result().read().result()
  keys, values = np.asarray(kv('keys')), np.asarray(kv('values'))
  n = values.shape[0]
  pad = 0 if mesh is None else (-n) % mesh.shape['data']
  valid = np.arange(n + pad) < n
  if pad:
    keys = np.pad(keys, ((0, 0), (0, pad), (0, 0)))
    values = np.pad(values, (0, pad), constant_values=-1)
  if mesh is None:
    return Datastore(path, meta, jnp.asarray(keys), jnp.asarray(values), jnp.asarray(valid))
  on = lambda x, *axes: jax.device_put(x, NamedSharding(mesh, P(*axes)))  # noqa: E731
  return Datastore(path, meta, on(keys, None, 'data', None), on(values, 'data'),
                   on(valid, 'data'), mesh)


# ----------------------------------------------------------------------------- tune
def _neighbours(spec: Spec, ds: Datastore, q_XZD: np.ndarray, num: int):
  """Exact (d, values) [X, Z, O] for every exit step's queries, in query blocks."""
  fn = jax.jit(lambda q, k: knn_lib.search(q, k, num, valid_I=ds.valid_I))
  d_out, v_out = [], []
  for x in range(q_XZD.shape[0]):
    ds_, vs_ = [], []
    for z0 in range(0, q_XZD.shape[1], 1024):
      d, i = fn(jnp.asarray(q_XZD[x, z0:z0 + 1024]), ds.keys_XID[x])
      ds_.append(np.asarray(d))
      vs_.append(np.asarray(knn_lib.lookup(ds.values_I, i)))
    d_out.append(np.concatenate(ds_))
    v_out.append(np.concatenate(vs_))
  return np.stack(d_out), np.stack(v_out)


def _collect(spec: Spec, variables: dict, ds: Datastore, batches_inputs, neighbours: int):
  """Per exit step: queries, exit logits, neighbours (d, values) and targets of the scored
  tokens of these (inputs, targets, weights) batches."""
  states = _states_fn(spec)
  q, lg, tg = [], [], []
  for inputs, targets, weights in batches_inputs:
    q_XBLD, lg_XBLV = states(variables, jnp.asarray(inputs))
    ok = weights.reshape(-1) > 0
    x_, v_ = q_XBLD.shape[0], lg_XBLV.shape[-1]
    q.append(np.asarray(q_XBLD).reshape(x_, -1, q_XBLD.shape[-1])[:, ok])
    lg.append(np.asarray(lg_XBLV).reshape(x_, -1, v_)[:, ok])
    tg.append(targets.reshape(-1)[ok])
  q_XZD, lg_XZV, t_Z = np.concatenate(q, 1), np.concatenate(lg, 1), np.concatenate(tg)
  d_XZO, v_XZO = _neighbours(spec, ds, q_XZD, neighbours)
  return {'q': q_XZD, 'logits': lg_XZV, 'targets': t_Z, 'd': d_XZO, 'v': v_XZO,
          'p_lm': np.asarray(jax.nn.softmax(jnp.asarray(lg_XZV), -1))}


def tune(spec: Spec, variables: dict, ds: Datastore, docs, max_windows: int,
         neighbours: int, log: Callable[[str], None] = print) -> dict:
  """lam, tau, the distance cut, the gate and its threshold, on tokens the datastore does not
  hold: its own domain (the tuning documents) and the run's own corpus (train windows; the
  'contrast': text the datastore does not cover, which retrieval must not hurt).
    * lam, tau: the best full-depth log-likelihood on the datastore's domain (kNN-LM);
    * max_distance: p_kNN is used only when the nearest key is within it (a neighbour that
      far is another domain's); with the contrast set, lam is re-chosen with the cut: the
      pair with the best mean of the two domains' full-depth accuracy;
    * the gate (gate.py) on the first half of each set's tokens, its threshold on the second
      halves: keep 90 % of always-retrieve's accuracy gain there.
  {} when there are no tuning documents."""
  wins = windows(docs, spec.data.seq_len)
  # spread over the documents: their first windows alone would be licence headers
  wins = [wins[i] for i in sorted(set(np.linspace(0, len(wins) - 1, max_windows).astype(int)))
          ] if wins else []
  if not wins:
    log('no tuning documents: lam/tau take defaults and --retrieve=gate is unavailable')
    return {}
  seq_len = spec.data.seq_len
  own = []
  for b0 in range(0, len(wins), 16):
    packed = corpus.pack_batch(wins[b0:b0 + 16], seq_len, [0] * len(wins[b0:b0 + 16]))
    own.append((packed['inputs'], packed['targets'], packed['weights']))
  run_data = data_lib.make_dataset(spec.data, spec.seed)
  contrast = []
  if run_data.causal_only:  # text: windows of the run's train split (seeded, never eval)
    for i in range(-(-max_windows // 2 // spec.data.batch_size)):
      b = run_data.train_batch(10 ** 9 + i)
      contrast.append((b['inputs'], b['targets'], b['weights']))
  sets = [_collect(spec, variables, ds, own, neighbours)]
  if contrast:
    sets.append(_collect(spec, variables, ds, contrast, neighbours))
  a = sets[0]
  n_steps, steps, vocab = spec.model.num_steps, list(ds.meta['steps']), a['logits'].shape[-1]
  # temperature scale: the typical neighbour distance (exact duplicates sit at 0)
  d_fin = a['d'][-1][np.isfinite(a['d'][-1]) & (a['d'][-1] > 0)]
  base = float(np.median(d_fin)) if d_fin.size else 1.0

  knn_cache: dict = {}

  def mixed(st, x, lam, tau, cut=np.inf):  # interpolated distribution at exit step x
    key = (id(st), x, tau)  # p_kNN depends on neither lam nor the cut: computed once
    if key not in knn_cache:
      knn_cache[key] = np.asarray(knn_lib.knn_probs(
          jnp.asarray(st['d'][x]), jnp.asarray(st['v'][x]), vocab, tau))
    p_knn = knn_cache[key]
    use = (st['d'][x][:, :1] <= cut)
    return np.where(use, lam * p_knn + (1 - lam) * st['p_lm'][x], st['p_lm'][x])

  def loglik(p, t):
    return float(np.mean(np.log(np.maximum(p[np.arange(len(t)), t], 1e-30))))

  best = None
  for tau in (base * s for s in TEMPERATURE_SCALES):
    for lam in LAMBDAS:
      ll = loglik(mixed(a, -1, lam, tau), a['targets'])
      if best is None or ll > best[0]:
        best = (ll, lam, tau)
  ll, lam, tau = best
  acc = lambda p, st: float(np.mean(p.argmax(-1) == st['targets']))  # noqa: E731
  cut = float('inf')
  if len(sets) > 1:
    # lam and the cut together: the best mean accuracy of the two domains at full depth (a
    # lam tuned on the datastore's domain alone would be too bold for the run's own text)
    d1 = np.concatenate([st['d'][-1][:, 0] for st in sets])
    cands = sorted(set(np.quantile(d1[np.isfinite(d1)], np.linspace(0.02, 1, 50)).tolist()))
    score = lambda l, c: np.mean([acc(mixed(st, -1, l, tau, c), st) for st in sets])  # noqa
    _, lam, cut = max((score(l, c), l, c) for l in LAMBDAS for c in cands + [float('inf')])
    ll = loglik(mixed(a, -1, lam, tau, cut), a['targets'])
  feats, labels, halves = [], [], []
  for st in sets:
    h = len(st['targets']) // 2
    for x, s_ in enumerate(steps):
      f = np.asarray(gate_lib.features(jnp.asarray(st['logits'][x]), jnp.asarray(st['q'][x]),
                                       s_, n_steps))
      # retrieval is worth its search where it turns a wrong prediction right
      y = (mixed(st, x, lam, tau, cut).argmax(-1) == st['targets']) & \
          (st['p_lm'][x].argmax(-1) != st['targets'])
      feats.append(f[:h])
      labels.append(y[:h])
      if x == len(steps) - 1:
        halves.append((f[h:], st, h))
  gate = gate_lib.fit(np.concatenate(feats), np.concatenate(labels))
  g = {k: jnp.asarray(v) for k, v in gate.items()}
  p_gate = np.concatenate([np.asarray(gate_lib.prob(g, jnp.asarray(f))) for f, _, _ in halves])
  ok_lm = np.concatenate([st['p_lm'][-1].argmax(-1)[h:] == st['targets'][h:]
                          for _, st, h in halves])
  ok_knn = np.concatenate([mixed(st, -1, lam, tau, cut).argmax(-1)[h:] == st['targets'][h:]
                           for _, st, h in halves])
  thr = gate_lib.choose_threshold(p_gate, ok_lm, ok_knn)
  ll_lm = loglik(a['p_lm'][-1], a['targets'])
  out = {'lam': lam, 'temperature': tau, 'max_distance': cut, 'neighbours': int(neighbours),
         'gate': {'w': [float(w) for w in gate['w']], 'b': float(gate['b'])},
         'gate_threshold': thr, 'gate_features': list(gate_lib.FEATURES),
         'tune_tokens': int(len(a['targets'])), 'loglik_lm': ll_lm, 'loglik_knn': ll,
         'accuracy_lm': acc(a['p_lm'][-1], a), 'accuracy_knn': acc(mixed(a, -1, lam, tau, cut), a),
         'gate_rate': float(np.mean(p_gate >= thr))}
  if len(sets) > 1:
    c = sets[1]
    out.update(contrast_tokens=int(len(c['targets'])), contrast_accuracy_lm=acc(c['p_lm'][-1], c),
               contrast_accuracy_knn=acc(mixed(c, -1, lam, tau, cut), c),
               contrast_accuracy_knn_uncut=acc(mixed(c, -1, lam, tau), c))
  log(f'tuned on {len(a["targets"]):,} tokens kept out of the datastore'
      + (f' and {out["contrast_tokens"]:,} of the run\'s own corpus' if len(sets) > 1 else '')
      + f': lam {lam}, tau {tau:.4g}, max distance {cut:.4g}; full-depth log-lik {ll_lm:.4f} '
      f'-> {ll:.4f}, accuracy {out["accuracy_lm"]:.4f} -> {out["accuracy_knn"]:.4f}'
      + (f' (own corpus {out["contrast_accuracy_lm"]:.4f} -> {out["contrast_accuracy_knn"]:.4f},'
         f' {out["contrast_accuracy_knn_uncut"]:.4f} without the cut)' if len(sets) > 1 else '')
      + f'; gate threshold {thr:.2f} retrieves {out["gate_rate"]:.1%} of the second halves\' '
      f'tokens at full depth')
  return out


# ----------------------------------------------------------------------------- evaluate
def with_retrieval(spec: Spec, rspec: Optional[RetrievalSpec]) -> Spec:
  return dataclasses.replace(spec, retrieval=rspec)


@functools.lru_cache(maxsize=16)
def make_eval_fn(spec: Spec) -> Callable:
  """jit (variables, batch, threshold [N], arrays) -> per-example sums, like
  training.make_eval_step, plus retrievals (tokens that retrieved, retrieval count)."""
  model = make_model(spec)
  active = arm_lib.active(spec)

  def fn(variables, batch, threshold, arrays):
    logits, aux = model.apply(variables, batch['inputs'], threshold=threshold,
                              retrieval=arrays if active else None,
                              rngs={'halting': jax.random.PRNGKey(0)})
    w = batch['weights']
    ce = training.cross_entropy(logits, batch['targets']) * w
    correct = (jnp.argmax(logits, -1) == batch['targets']) * w
    r = aux.get('retrievals', jnp.zeros_like(w))
    return {'loss_sum': ce.sum(-1), 'weight_sum': w.sum(-1), 'correct_sum': correct.sum(-1),
            'layers_sum': (aux['layers'] * w).sum(-1),
            'retrieved_sum': ((r > 0) * w).sum(-1), 'retrievals_sum': (r * w).sum(-1)}

  return jax.jit(fn)


def evaluate(spec: Spec, variables: dict, batches: list, domains: Sequence[str],
             ds: Optional[Datastore], mode: str, threshold: Any = None,
             eval_fn: Optional[Callable] = None, **arm_kw) -> dict:
  """Held-out loss, accuracy, mean layers and retrieval rate (share of tokens that retrieved
  at least once; retrievals per token), overall and per domain, with retrieval `mode`."""
  rspec = None if ds is None else ds.retrieval_spec(mode, arm_kw.pop('neighbours', None),
                                                    arm_kw.pop('approx', False))
  s = with_retrieval(spec, rspec)
  fn = eval_fn or make_eval_fn(s)
  arrays = ds.arrays(**arm_kw) if ds is not None and arm_lib.active(s) else None
  thr = inference.threshold_arg(s, threshold)
  keys = ('loss_sum', 'weight_sum', 'correct_sum', 'layers_sum', 'retrieved_sum',
          'retrievals_sum')
  rows = {k: [] for k in keys}
  dom = []
  for b in batches:
    out = jax.device_get(fn(variables, {k: jnp.asarray(b[k]) for k in
                                        ('inputs', 'targets', 'weights')}, thr, arrays))
    for k in keys:
      rows[k].append(np.asarray(out[k]))
    dom.append(b['domain'])
  r = {k: np.concatenate(v) for k, v in rows.items()}
  dom = np.concatenate(dom)

  def summary(sel):
    w = max(r['weight_sum'][sel].sum(), 1e-9)
    return {'loss': r['loss_sum'][sel].sum() / w, 'accuracy': r['correct_sum'][sel].sum() / w,
            'layers_mean': r['layers_sum'][sel].sum() / w,
            'retrieval_rate': r['retrieved_sum'][sel].sum() / w,
            'retrievals_per_token': r['retrievals_sum'][sel].sum() / w,
            'tokens': float(r['weight_sum'][sel].sum())}

  res = summary(np.ones_like(dom, bool))
  for i, name in enumerate(domains):
    if np.any(dom == i):
      res.update({f'{name}/{k}': v for k, v in summary(dom == i).items()})
  return res


def check_disjoint(ds: Datastore, spec: Spec, files: Optional[str]) -> None:
  """ConfigError when held-out evaluation documents (the run's own, or the held-out split of
  `files`) are in the datastore or its tuning set: by content, so another spelling of the
  same glob, or a datastore over the training corpus, cannot leak answers."""
  data = spec.data if not files else dataclasses.replace(spec.data, name='files', files=files)
  dataset = data_lib.make_dataset(data, spec.seed)
  if not hasattr(dataset, 'heldout_texts'):
    raise ConfigError(f'retrieval evaluates next-byte prediction on text; data.name='
                      f'{data.name!r} is not text (pass --files)')
  stored = set(ds.meta.get('document_hashes', ()))
  shared = [n for n, t in dataset.heldout_texts() if doc_hash(t) in stored]
  if shared:
    raise ConfigError(f'{len(shared)} held-out evaluation document(s) are in datastore '
                      f'{ds.path} (e.g. {shared[0]!r}): its scores would read the answers; '
                      f'build the datastore from other files')


def eval_batches(spec: Spec, files: Optional[str], num_batches: int, spread: bool = False
                 ) -> tuple[list, tuple]:
  """Held-out batches of the run's own data, or of the 'files' dataset over `files`.
  spread: windows evenly spaced over the held-out text (TextDataset.spread_batches), not
  the documents' beginnings first (licence headers repeat across files: kNN's easy case)."""
  data = spec.data if not files else dataclasses.replace(spec.data, name='files', files=files)
  ds = data_lib.make_dataset(data, spec.seed)
  if spread:
    if not hasattr(ds, 'spread_batches'):
      raise ConfigError(f'--spread applies to text data; data.name={data.name!r}')
    return ds.spread_batches(num_batches), ds.domains
  return ds.eval_batches(num_batches), ds.domains


def format_rows(rows: list[dict], domains: Sequence[str]) -> str:
  """A table: one row per (mode, threshold), per domain accuracy and retrieval rate."""
  head = (f'{"retrieve":>8} {"threshold":>9} {"loss":>7} {"accuracy":>8} {"layers":>6} '
          f'{"retrieved":>9} {"per tok":>7}' +
          ''.join(f' {d + " acc":>9} {d + " ret":>9}' for d in domains))
  lines = [head]
  for r in rows:
    lines.append(f'{r["retrieve"]:>8} {r["threshold"]:>9.3g} {r["loss"]:7.4f} '
                 f'{r["accuracy"]:8.4f} {r["layers_mean"]:6.2f} {r["retrieval_rate"]:9.1%} '
                 f'{r["retrievals_per_token"]:7.2f}' +
                 ''.join(f' {r.get(d + "/accuracy", float("nan")):9.4f} '
                         f'{r.get(d + "/retrieval_rate", float("nan")):9.1%}'
                         for d in domains))
  return '\n'.join(lines)


def evaluate_run(workdir: str, path: Optional[str], modes: Sequence[str],
                 files: Optional[str] = None, thresholds: Sequence[Optional[float]] = (None,),
                 num_batches: Optional[int] = None, max_layers: Optional[int] = None,
                 neighbours: Optional[int] = None, approx: bool = False,
                 gate_threshold: Optional[float] = None, spread: bool = False,
                 devices: int = 1, log: Callable[[str], None] = print) -> list[dict]:
  """Held-out quality, compute and retrieval rate of run `workdir` with datastore `path`,
  per retrieval mode and operating point (None: the run's own, run_operating_point), on the
  run's held-out data or on the held-out split of `files`. devices > 1: the datastore is
  split over that many devices (the model replicated). Everything is checked (modes,
  datastore, model) before anything compiles."""
  if not modes:
    raise ConfigError(f'--retrieve_modes is empty: allowed: {", ".join(arm_lib.MODES)}')
  for m in modes:
    if m not in arm_lib.MODES:
      raise ConfigError(f'--retrieve_modes={m!r}: allowed: {", ".join(arm_lib.MODES)}')
  if gate_threshold is not None and not 0 <= gate_threshold <= 1:
    raise ConfigError(f'--retrieve_threshold={gate_threshold}: must be in [0, 1]')
  spec, variables, step = run_lib.load(workdir)
  if not 1 <= devices <= jax.device_count():
    raise ConfigError(f'--datastore_devices={devices}: must be in [1, {jax.device_count()}] '
                      f'(the devices this host sees)')
  mesh = None if devices == 1 else sharding_lib.make_mesh((devices, 1, 1, 1))
  ds = None
  if path:
    arm_lib.check_model(spec)
    ds = load(path, spec, params=variables['params'], mesh=mesh)
    for m in modes:
      ds.retrieval_spec(m, neighbours, approx)
    check_disjoint(ds, spec, files)
  elif any(m != 'never' for m in modes):
    raise ConfigError(f'--retrieve_modes={",".join(modes)} needs --datastore')
  points = [operating_point.run_operating_point(workdir, spec, t, max_layers)
            for t in thresholds]
  batches, domains = eval_batches(spec, files, num_batches or spec.train.eval_batches, spread)
  if mesh is not None:  # the model on every device of the datastore's mesh
    variables = jax.device_put(variables, NamedSharding(mesh, P()))
  rows = []
  for m in modes:
    s = with_retrieval(spec, None if ds is None else ds.retrieval_spec(m, neighbours, approx))
    fn = make_eval_fn(s)
    for op, _ in points:
      res = evaluate(spec, variables, batches, domains, ds, m, op, eval_fn=fn,
                     neighbours=neighbours, approx=approx, gate_threshold=gate_threshold)
      rows.append({'retrieve': m, 'threshold': op.threshold, 'max_layers': op.max_layers,
                   **res})
  where = files or f'the run\'s held-out {spec.data.name} split'
  log(f'{workdir} step {step} on {where} ({int(rows[0]["tokens"]):,} tokens)'
      + (f', datastore {path} ({ds.meta["entries"]:,} entries)' if ds else ''))
  log(format_rows(rows, domains))
  return rows
