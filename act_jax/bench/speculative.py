"""Exact early exit on a trained run: the `generate --mode=exact` listing and the benchmark of
`benchmark_inference --mode=exact` (act_jax/infer/speculative.py is the mechanism).

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

from typing import Callable, Optional, Sequence

import numpy as np

from act_jax.infer import inference
from act_jax.calibrate import operating_point
from act_jax.infer import draft as draft_lib
from act_jax.infer import speculative as S
from act_jax.errors import ConfigError
from act_jax.spec import OperatingPoint
from act_jax.run import directory as run_lib

def benchmark(workdir: str, batch_sizes: Sequence[int] = (1, 8), prompt_len: int = 32,
              new_tokens: int = 64, repeats: int = 3, draft_layer: Optional[int] = None,
              draft_len: Optional[int] = None, threshold: Optional[float] = None,
              layer_table: bool = True, log: Callable[[str], None] = print) -> dict:
  """The tables of the module doc. Returns {'speed': rows, 'layers': rows, 'draft': ...}."""
  for name, v in (('--repeats', repeats), ('--max_new_tokens', new_tokens),
                  ('--prompt_len', prompt_len)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ConfigError(f'{name}={v!r}: must be an integer >= 1')
  spec, variables, step = run_lib.load(workdir)
  S.check_exact(spec, draft_layer, draft_len)
  op, source = operating_point.run_operating_point(workdir, spec, threshold)
  limit = spec.model.max_len
  if prompt_len >= limit:
    raise ConfigError(f'--prompt_len={prompt_len}: must be below the model max length {limit}')
  new_tokens = min(new_tokens, limit - prompt_len)
  prompts = draft_lib.domain_prompts(spec, max(batch_sizes), prompt_len)
  mixed = draft_lib.mixed_prompts(prompts, max(batch_sizes))
  full_vec = OperatingPoint.full_depth().vector(spec)
  speed, choices = [], {}
  for b in batch_sizes:
    k, d, how = draft_lib.resolve_draft(spec, variables, draft_layer, draft_len, b, workdir,
                              step, log)
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
    secs, outs = draft_lib.time_round_robin(fns, repeats)
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
    long = draft_lib.domain_prompts(spec, 16, spec.data.seq_len)  # teacher forcing: whole windows
    teacher = {dom: S.draft_acceptance(spec, variables, long[dom]) for dom in draft_lib.DOMAINS}
    for dom in draft_lib.DOMAINS:
      p = prompts[dom][:b]
      fns = {'plain': lambda: S.generate_plain(spec, variables, p, new_tokens)}
      for k in S.draft_layers(spec):
        fns[k] = lambda k=k: S.generate_exact(spec, variables, p, new_tokens, k, d)
      secs, outs = draft_lib.time_round_robin(fns, repeats)
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
