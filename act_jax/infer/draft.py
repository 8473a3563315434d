"""The draft choice of exact mode (self-speculative decoding, infer/speculative.py): which
exit layer drafts and how many bytes it drafts per verify step.

Given flags win; what is missing is measured: tune_draft times every candidate
(draft layer, draft length) against full-depth plain decoding on held-out prompts (half
code, half prose), interleaved so a noisy neighbour hits each alike, and picks the fastest.
A full tuning is kept in RUN/exact_draft.json per batch size, checkpoint step and device
kind. The server (serve/) and the exact-mode benchmark (bench/speculative.py) share it.

Dims: B batch, L length.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from act_jax import data as data_lib
from act_jax.data import PAD as PAD_ID
from act_jax.errors import ConfigError
from act_jax.infer import speculative as S
from act_jax.run import directory as run_lib
from act_jax.spec import Spec

DOMAINS = ('code', 'prose')


def domain_prompts(spec: Spec, rows: int, length: int) -> dict[str, np.ndarray]:
  """Held-out windows per domain with at least `length` real bytes: {domain: [rows, length]}
  (rows repeat when the held-out split is short)."""
  ds = data_lib.make_dataset(spec.data, spec.seed)
  if not set(getattr(ds, 'domains', ())) >= set(DOMAINS):
    raise ConfigError(f'data.name={spec.data.name!r} has no code/prose held-out text to time '
                      f'on: pass --draft_layer and --draft_len')
  pools: dict[str, list] = {d: [] for d in DOMAINS}
  for b in ds.eval_batches(max(2, -(-4 * rows // spec.data.batch_size))):
    for x, d in zip(b['inputs'], b['domain']):
      name = ds.domains[int(d)]
      if name in pools and np.sum(x != PAD_ID) >= length:
        pools[name].append(x[:length])
  out = {}
  for name, pool in pools.items():
    if not pool:
      raise ConfigError(f'no held-out {name} window of {length} bytes: lower --prompt_len (or '
                        f'pass --draft_layer and --draft_len)')
    out[name] = np.stack([pool[i % len(pool)] for i in range(rows)]).astype(np.int32)
  return out


TUNE_FILE = run_lib.DRAFT  # RUN/exact_draft.json: measured draft choices per batch size


def mixed_prompts(prompts: dict[str, np.ndarray], rows: int) -> np.ndarray:
  """Rows alternating code / prose from domain_prompts' answer (which has >= rows each)."""
  return np.stack([prompts[DOMAINS[i % 2]][i // 2] for i in range(rows)])


def tune_draft(spec: Spec, variables: dict, batch: int = 1,
               draft_layers: Optional[Sequence[int]] = None,
               draft_lens: Sequence[int] = S.AUTO_DRAFT_LENS, prompt_len: int = 32,
               new_tokens: int = 32, repeats: int = 2) -> dict:
  """Measures exact decoding for every candidate (draft layer, draft length) on held-out
  prompts (half code, half prose) against full (plain) decoding, interleaved: bytes per
  verify step and speedup. Candidates: exit layers up to half the depth (a deeper draft
  costs (d + 1) k >= N layers per round) unless given. One compile per draft length (the
  draft layer is traced). Returns the best and the table."""
  layers = list(draft_layers or [l for l in S.draft_layers(spec)
                                 if l <= max(spec.model.num_layers // 2,
                                             S.draft_layers(spec)[0])])
  prompt_len = min(prompt_len, spec.model.max_len // 2)
  new_tokens = min(new_tokens, spec.model.max_len - prompt_len)
  p = mixed_prompts(domain_prompts(spec, batch, prompt_len), batch)
  fns = {'plain': lambda: S.generate_plain(spec, variables, p, new_tokens)}
  for d in draft_lens:
    for k in layers:
      fns[(k, d)] = lambda k=k, d=d: S.generate_exact(spec, variables, p, new_tokens, k, d)
  secs, outs = time_round_robin(fns, repeats)
  table = []
  for key, sec in secs.items():
    if key == 'plain':
      continue
    k, d = key
    st = S.acceptance_stats(outs[key]['accepted'], d)
    table.append({'draft_layer': k, 'draft_len': d, 'speedup': secs['plain'] / sec,
                  'bytes_per_verify': st['tokens_per_round']})
  best = max(table, key=lambda r: r['speedup'])
  return {'draft_layer': best['draft_layer'], 'draft_len': best['draft_len'],
          'speedup': best['speedup'], 'bytes_per_verify': best['bytes_per_verify'],
          'batch': batch, 'device': jax.devices()[0].device_kind, 'table': table}


def resolve_draft(spec: Spec, variables: dict, draft_layer: Optional[int],
                  draft_len: Optional[int], batch: int = 1, workdir: Optional[str] = None,
                  step: Optional[int] = None, log: Callable[[str], None] = print
                  ) -> tuple[int, int, str]:
  """(draft_layer, draft_len, how chosen): the given flags, else the fastest measured
  candidate (tune_draft) for what is missing. A full tuning (both flags missing) is kept in
  RUN/exact_draft.json per batch size, checkpoint step and device kind, and reused."""
  S.check_exact(spec, draft_layer, draft_len)
  if draft_layer is not None and draft_len is not None:
    return draft_layer, draft_len, 'given'
  device = jax.devices()[0].device_kind
  path = run_lib.path(workdir, TUNE_FILE) if workdir else None
  saved: dict = (run_lib.read_json(path) if path else None) or {}
  key = f'batch={batch}'
  full = draft_layer is None and draft_len is None
  got = saved.get(key)
  if full and got and got.get('step') == step and got.get('device') == device:
    how = (f'tuned earlier ({path}): measured {got["speedup"]:.2f}x, '
           f'{got["bytes_per_verify"]:.2f} bytes per verify step')
    return got['draft_layer'], got['draft_len'], how
  log(f'tuning the draft at batch {batch} (one compile per draft length) ...')
  res = tune_draft(spec, variables, batch,
                   None if draft_layer is None else [draft_layer],
                   S.AUTO_DRAFT_LENS if draft_len is None else [draft_len])
  how = (f'tuned at batch {batch}: measured {res["speedup"]:.2f}x over full depth, '
         f'{res["bytes_per_verify"]:.2f} bytes per verify step, best of '
         f'{len(res["table"])} candidates')
  if full and path:
    saved[key] = dict(res, step=step)
    try:
      run_lib.write_json(path, saved, indent=1)
    except OSError:  # a read-only run: tune again next time
      pass
  log(how)
  return res['draft_layer'], res['draft_len'], how


def time_round_robin(fns: dict[str, Callable[[], dict]], repeats: int
                     ) -> tuple[dict[str, float], dict[str, dict]]:
  """(median seconds, last output) per function: each compiled once, then timed in turn."""
  outs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}  # compile each
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      outs[name] = jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return {n: float(np.median(v)) for n, v in times.items()}, outs
