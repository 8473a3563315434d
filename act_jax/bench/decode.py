"""Decode speed per exit threshold vs full depth, timed side by side in one process.

`benchmark_rows` (the `benchmark_inference` binary, threshold mode): for each batch size, the
run's held-out prompts decoded at full depth and at each threshold, round-robin
(operating_point.time_decode); speedup, the ideal speedup (L / mean layers) and the
efficiency (speedup / ideal).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from act_jax.calibrate.operating_point import eval_prompts, time_decode
from act_jax.run import directory as run_lib
from act_jax.spec import NEVER_EXIT, OperatingPoint


def benchmark_rows(workdir: str, thresholds: Sequence[float], batch_sizes: Sequence[int] = (1, 8),
                   prompt_len: int = 16, new_tokens: int = 64, repeats: int = 3,
                   log: Callable[[str], None] = print, kv_fill: str = 'project',
                   max_layers: Optional[int] = None) -> list[dict]:
  """Decode speed per threshold against full depth, side by side in one process."""
  spec, variables, step = run_lib.load(workdir)
  OperatingPoint(0.5, max_layers).validate(spec)  # a bad cap fails before any timing
  limit = spec.model.max_len
  new_tokens = min(new_tokens, limit - prompt_len)
  rows = []
  full_layers = spec.model.num_layers
  for b in batch_sizes:
    prompt = eval_prompts(spec, b, prompt_len)
    for compact in ((False, True) if b > 1 else (False,)):
      log(f'batch {b} compact={compact}: timing {len(thresholds) + 1} operating points ...')
      t = time_decode(spec, variables, prompt, [NEVER_EXIT] + list(thresholds),
                      new_tokens, repeats, compact, kv_fill, max_layers)
      full_ms = t['ms_per_token'][0]
      for thr, ms, layers in zip(t['thresholds'][1:], t['ms_per_token'][1:], t['mean_layers'][1:]):
        ideal = full_layers / max(layers, 1e-9)
        rows.append({'batch': b, 'compact': compact, 'threshold': thr, 'mean_layers': layers,
                     'ms_per_token': ms, 'tokens_per_sec': 1e3 / ms, 'full_ms': full_ms,
                     'speedup': full_ms / ms, 'ideal': ideal,
                     'efficiency': (full_ms / ms) / ideal})
  return rows


def format_table(rows: list[dict]) -> str:
  head = (f'{"batch":>5} {"compact":>7} {"thresh":>7} {"layers":>7} {"tok/s":>9} '
          f'{"ms/tok":>8} {"full ms":>8} {"speedup":>8} {"L/mean":>7} {"eff":>5}')
  lines = [head, '-' * len(head)]
  for r in rows:
    lines.append(f'{r["batch"]:>5} {str(r["compact"]):>7} {r["threshold"]:>7g} '
                 f'{r["mean_layers"]:>7.2f} {r["tokens_per_sec"]:>9.1f} {r["ms_per_token"]:>8.3f} '
                 f'{r["full_ms"]:>8.3f} {r["speedup"]:>7.2f}x {r["ideal"]:>6.2f}x '
                 f'{r["efficiency"]:>5.2f}')
  return '\n'.join(lines)
