"""Exact early exit on a trained run: the `generate --mode=exact` listing and the benchmark of
`benchmark_inference --mode=exact` (act_jax/speculative.py is the mechanism).

Benchmark, side by side in one process (every method timed in turn, `repeats` rounds, so a
noisy neighbour hits each alike), per batch size:
  full (generate)      inference.generate at full depth: the threshold-mode loop
  full (plain)         speculative.generate_plain: the same plain layers exact mode runs
  exact k=.. d=..      speculative.generate_exact at the automatic (or given) draft
  threshold t          inference.generate at the run's operating point (calibrated, if any)
with bytes/s, speedup over full (plain), bytes equal to full-depth greedy and rows identical.
Then acceptance per draft layer and domain (code / prose held-out prompts): teacher-forced
acceptance, drafts accepted and bytes per verify step, acceptance per draft position, and
bytes/s at that layer.

Dims: B batch, L length.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from act_jax import data as data_lib
from act_jax import inference, operating_point
from act_jax import speculative as S
from act_jax.data import PAD as PAD_ID
from act_jax.errors import ConfigError
from act_jax.spec import OperatingPoint, Spec

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


TUNE_FILE = 'exact_draft.json'  # RUN/exact_draft.json: measured draft choices per batch size


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
  secs, outs = _time_round_robin(fns, repeats)
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
  path = os.path.join(workdir, TUNE_FILE) if workdir else None
  saved: dict = {}
  if path and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
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
      with open(path + '.tmp', 'w') as f:
        json.dump(saved, f, indent=1)
      os.replace(path + '.tmp', path)
    except OSError:  # a read-only run: tune again next time
      pass
  log(how)
  return res['draft_layer'], res['draft_len'], how


def generate_listing(workdir: str, prompt: str, max_new: int = 64,
                     draft_layer: Optional[int] = None, draft_len: Optional[int] = None,
                     temperature: float = 0.0, seed: int = 0) -> str:
  """Exact-mode continuation + a per-byte line of where each byte came from
  ('·' an accepted draft, '^' the verifier: a correction or bonus byte, 'p' the prompt pass)."""
  if max_new < 1:
    raise ConfigError(f'--max_new_tokens={max_new}: must be >= 1')
  spec, state = inference.load_run(workdir)
  variables = {'params': state['params'], 'moe_state': state['moe_state']}
  S.check_exact(spec, draft_layer, draft_len, temperature=temperature)
  k, d, how = resolve_draft(spec, variables, draft_layer, draft_len, 1, workdir,
                            int(state['step']), log=lambda s: None)
  ids = np.concatenate([[data_lib.BOS], data_lib.encode(prompt)])[None].astype(np.int32)
  if ids.shape[1] >= spec.model.max_len:
    raise ConfigError(f'--prompt is {ids.shape[1]} tokens (with BOS); the model max length is '
                      f'{spec.model.max_len}: shorten the prompt')
  max_new = min(max_new, spec.model.max_len - ids.shape[1])
  run = lambda: jax.block_until_ready(S.generate_exact(spec, variables, ids, max_new, k, d,
                                                       temperature, seed))
  run()  # compile
  t = time.perf_counter()
  out = run()
  dt = time.perf_counter() - t
  toks = np.asarray(out['tokens'][0])
  acc = np.asarray(out['accepted'])[:, 0]
  source = ['p'] + [c for a in acc[acc >= 0] for c in '·' * int(a) + '^']
  text = [operating_point.byte_char(tok) for tok in toks]
  st = S.acceptance_stats(acc[:, None], d)
  lines = [f'mode=exact draft_layer={k} draft_len={d} temperature={temperature:g} '
           f'({how}; checkpoint step {state["step"]}, {spec.model.num_layers} layers)',
           f'prompt: {prompt!r}']
  source = source[:len(text)]
  for i in range(0, len(text), 64):
    lines.append('text   ' + ''.join(text[i:i + 64]))
    lines.append('source ' + ''.join(source[i:i + 64]))
  per_pos = ' '.join(f'{x:.2f}' for x in st['per_position'])
  lines.append(f'{max_new} bytes in {dt * 1e3:.1f} ms ({max_new / dt:.1f} bytes/s); '
               f'{st["rounds"]} verify steps, {st["tokens_per_round"]:.2f} bytes per verify step '
               f'({st["accepted_per_round"]:.2f} drafts accepted); acceptance per draft '
               f'position {per_pos}  [source: · accepted draft, ^ verifier, p prompt pass]')
  return '\n'.join(lines)


def _time_round_robin(fns: dict[str, Callable[[], dict]], repeats: int
                      ) -> tuple[dict[str, float], dict[str, dict]]:
  outs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}  # compile each
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      outs[name] = jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return {n: float(np.median(v)) for n, v in times.items()}, outs


def benchmark(workdir: str, batch_sizes: Sequence[int] = (1, 8), prompt_len: int = 32,
              new_tokens: int = 64, repeats: int = 3, draft_layer: Optional[int] = None,
              draft_len: Optional[int] = None, threshold: Optional[float] = None,
              layer_table: bool = True, log: Callable[[str], None] = print) -> dict:
  """The tables of the module doc. Returns {'speed': rows, 'layers': rows, 'draft': ...}."""
  for name, v in (('--repeats', repeats), ('--new_tokens', new_tokens),
                  ('--prompt_len', prompt_len)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f'{name}={v!r}: must be an integer >= 1')
  spec, state = inference.load_run(workdir)
  variables = {'params': state['params'], 'moe_state': state['moe_state']}
  S.check_exact(spec, draft_layer, draft_len)
  op, source = operating_point.run_operating_point(workdir, spec, threshold)
  limit = spec.model.max_len
  if prompt_len >= limit:
    raise ConfigError(f'--prompt_len={prompt_len}: must be below the model max length {limit}')
  new_tokens = min(new_tokens, limit - prompt_len)
  prompts = domain_prompts(spec, max(batch_sizes), prompt_len)
  mixed = mixed_prompts(prompts, max(batch_sizes))
  full_vec = OperatingPoint.full_depth().vector(spec)
  speed, choices = [], {}
  for b in batch_sizes:
    k, d, how = resolve_draft(spec, variables, draft_layer, draft_len, b, workdir,
                              int(state['step']), log)
    choices[b] = (k, d, how)
    p = mixed[:b]
    fns = {
        'full (generate)': lambda: inference.generate(spec, variables, p, new_tokens, full_vec),
        'full (plain)': lambda: S.generate_plain(spec, variables, p, new_tokens),
        f'exact k={k} d={d}': lambda: S.generate_exact(spec, variables, p, new_tokens, k, d),
        f'threshold {op.threshold:g}': lambda: inference.generate(spec, variables, p,
                                                                  new_tokens, op),
    }
    log(f'batch {b}: timing {len(fns)} decoders x {repeats} rounds ...')
    secs, outs = _time_round_robin(fns, repeats)
    ref = np.asarray(outs['full (plain)']['tokens'])
    base = secs['full (plain)']
    for name, sec in secs.items():
      toks = np.asarray(outs[name]['tokens'])
      row = {'batch': b, 'method': name, 'bytes_per_sec': b * new_tokens / sec,
             'speedup': base / sec, 'same_bytes': float(np.mean(toks == ref)),
             'rows_identical': float(np.mean(np.all(toks == ref, 1)))}
      if name.startswith('exact'):
        st = S.acceptance_stats(outs[name]['accepted'], d)
        row.update(bytes_per_verify=st['tokens_per_round'], per_position=st['per_position'])
      if name.startswith('threshold'):
        row['mean_layers'] = float(np.mean(outs[name]['layers']))
      speed.append(row)
  layers = []
  if layer_table:
    b = max(batch_sizes)  # rows per domain: acceptance over several prompts
    d = choices[b][1] if draft_len is None else draft_len
    log(f'acceptance per draft layer and domain (batch {b}, draft length {d}) ...')
    long = domain_prompts(spec, 16, spec.data.seq_len)  # teacher forcing: whole windows
    teacher = {dom: S.draft_acceptance(spec, variables, long[dom]) for dom in DOMAINS}
    for dom in DOMAINS:
      p = prompts[dom][:b]
      fns = {'plain': lambda: S.generate_plain(spec, variables, p, new_tokens)}
      for k in S.draft_layers(spec):
        fns[k] = lambda k=k: S.generate_exact(spec, variables, p, new_tokens, k, d)
      secs, outs = _time_round_robin(fns, repeats)
      for k in S.draft_layers(spec):
        st = S.acceptance_stats(outs[k]['accepted'], d)
        layers.append({'domain': dom, 'draft_layer': k, 'draft_len': d,
                       'teacher_forced': teacher[dom][k],
                       'accepted_per_verify': st['accepted_per_round'],
                       'bytes_per_verify': st['tokens_per_round'],
                       'per_position': st['per_position'],
                       'bytes_per_sec': b * new_tokens / secs[k],
                       'speedup': secs['plain'] / secs[k],
                       'identical': bool(np.array_equal(outs[k]['tokens'],
                                                        outs['plain']['tokens']))})
  return {'speed': speed, 'layers': layers, 'draft': choices, 'operating_point': (op, source),
          'layer_batch': max(batch_sizes),
          'layer_draft_len': choices[max(batch_sizes)][1] if draft_len is None else draft_len,
          'prompt_len': prompt_len, 'new_tokens': new_tokens, 'repeats': repeats,
          'num_layers': spec.model.num_layers}


def format_benchmark(res: dict) -> str:
  op, source = res['operating_point']
  lines = [f'exact vs full depth vs threshold mode ({res["num_layers"]} layers; prompts of '
           f'{res["prompt_len"]} held-out bytes, half code half prose; {res["new_tokens"]} new '
           f'bytes; median of {res["repeats"]} interleaved rounds; threshold point from '
           f'{source})']
  for b, (k, d, how) in res['draft'].items():
    lines.append(f'  batch {b}: draft_layer={k} draft_len={d} ({how})')
  head = (f'{"batch":>5}  {"method":<22} {"bytes/s":>9} {"speedup":>8} {"same bytes":>10} '
          f'{"rows same":>9} {"bytes/verify":>12}  acceptance per draft position')
  lines += [head, '-' * len(head)]
  for r in res['speed']:
    bpv = f'{r["bytes_per_verify"]:.2f}' if 'bytes_per_verify' in r else ''
    pos = ' '.join(f'{x:.2f}' for x in r.get('per_position', []))
    name = r['method'] + (f' ({r["mean_layers"]:.1f} L)' if 'mean_layers' in r else '')
    lines.append(f'{r["batch"]:>5}  {name:<22} {r["bytes_per_sec"]:>9.1f} '
                 f'{r["speedup"]:>7.2f}x {100 * r["same_bytes"]:>9.1f}% '
                 f'{100 * r["rows_identical"]:>8.0f}% {bpv:>12}  {pos}')
  if res['layers']:
    lines.append('')
    head = (f'{"domain":<6} {"layer":>5} {"teacher":>8} {"accepted":>9} {"bytes/verify":>12} '
            f'{"bytes/s":>8} {"speedup":>8} {"same":>5}  acceptance per draft position')
    lines += [f'acceptance per draft layer ({res["layer_batch"]} prompts per domain decoded as '
              f'one batch, draft length {res["layer_draft_len"]}; teacher = teacher-forced '
              f'held-out agreement with full depth; speedup vs full (plain))', head,
              '-' * len(head)]
    for r in res['layers']:
      pos = ' '.join(f'{x:.2f}' for x in r['per_position'])
      lines.append(f'{r["domain"]:<6} {r["draft_layer"]:>5} {r["teacher_forced"]:>8.3f} '
                   f'{r["accepted_per_verify"]:>9.2f} {r["bytes_per_verify"]:>12.2f} '
                   f'{r["bytes_per_sec"]:>8.1f} {r["speedup"]:>7.2f}x '
                   f'{"yes" if r["identical"] else "NO":>5}  {pos}')
  return '\n'.join(lines)
