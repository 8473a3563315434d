"""The drift benchmark: a trace that switches domain part-way, served at the fixed certified
point with and without the drift monitor (act_jax/serve/monitor.py), side by side.

- The run is copied, and the copy is calibrated for consistency at `tolerance`, with
  uncapped thresholds; the user's run is untouched. The chosen point is the one served.
- The trace: Poisson arrivals at `rate` for `duration_s`, in three equal phases. 'before'
  and 'back' prompts are held-out windows of the run's own corpus. The middle phase,
  'drift', uses windows of the installed packages' READMEs: the METADATA files of every
  *.dist-info folder in this interpreter's site-packages (Markdown/reStructuredText prose
  the run never trained on; any virtualenv has them; nothing downloaded).
- Both runs serve the same requests in real time, one after the other. Afterwards every
  request's prompt is scored (untimed) at every point of the chain. Each request's agreement
  with full depth is then read at the point it was served at: measured on ALL prompt tokens,
  not only the shadow sample.
- Reported per run: agreement in each phase against the certified level 1 - tolerance,
  alarms before the switch (false alarms), the delay of the first alarm after it (seconds
  and requests), the delay of the recertification after the traffic returns, the shadow's
  scoring time as a share of the replay, and the p95 latency of both runs.
"""
from __future__ import annotations

import glob
import os
import shutil
import sysconfig
import tempfile
import time
from typing import Callable

import numpy as np

from act_jax.calibrate import certify
from act_jax.data import corpus
from act_jax.run import directory as run_lib
from act_jax.serve import monitor as monitor_lib
from act_jax.serve import scheduler, serving
from act_jax.serve import trace as trace_lib


def drift_corpus_prompts(n: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
  """n prompts of the given byte lengths from the installed packages' METADATA files."""
  paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()['purelib'], '*.dist-info',
                                        'METADATA')))
  data = b'\n'.join(open(p, 'rb').read() for p in paths)
  if len(data) < 4096:
    raise RuntimeError(f'too little drift text: {len(paths)} METADATA files, {len(data)} '
                       f'bytes')
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    start = int(rng.integers(0, len(data) - lengths[i]))
    out.append(corpus.encode(data[start:start + lengths[i]].decode('utf-8', 'replace'))
               [:lengths[i]].tolist())
  return out


def _served_index(rec: scheduler.Record, home: int) -> int:
  return max(rec.points, key=rec.points.get) if rec.points else home


def drift_part(workdir: str, rate: float = 6.0, duration_s: float = 90.0,
               tolerance: float = 0.17, fraction: float = 0.25, window: int = 2048,
               slots: int = 8, steps_per_call: int = 4,
               log: Callable[[str], None] = print) -> dict:
  """Runs the benchmark of the module docstring; returns its table rows and settings."""
  run_lib.read_config(workdir)  # a bad run fails naming its own files, not the copy's
  tmp = tempfile.mkdtemp(prefix='act_jax_drift_')
  try:
    run = os.path.join(tmp, 'run')
    shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('serve-*', 'calibration*',
                                                                'report*', 'tb'))
    log(f'  calibrating a copy for consistency, tolerance {tolerance:g} ...')
    cal = certify.calibrate_run(run, tolerance=tolerance, risk=0.05, measure='consistency',
                                caps=[0], log=lambda s: None)
    if cal['chosen_threshold'] is None:
      raise RuntimeError(f'nothing certified at consistency tolerance {tolerance}: raise it')
    gen = trace_lib.generate('poisson', rate=rate, duration=duration_s, seed=5,
                             prompt='64-112', new='8-16')
    t_switch, t_back = duration_s / 3, 2 * duration_s / 3
    phase = lambda t: ('before' if t.arrival_s < t_switch else  # noqa: E731
                       'drift' if t.arrival_s < t_back else 'back')
    after = [t for t in gen if phase(t) == 'drift']
    base = serving.ServeOptions(controller='fixed', slots=slots, steps_per_call=steps_per_call,
                                quality=False)
    st = serving.prepare(run, base, log=lambda s: None)
    held = iter(serving.heldout_prompts(st.spec, [t for t in gen if phase(t) != 'drift']))
    drift = iter(drift_corpus_prompts(len(after), [t.prompt_len for t in after]))
    reqs = []
    for t in gen:
      if phase(t) == 'drift':
        reqs.append(scheduler.Request(t.id, t.arrival_s, next(drift), t.max_new, 'readme'))
      else:
        reqs.append(next(held))
      reqs[-1].phase = phase(t)
    log(f'  {len(reqs)} requests: held-out until {t_switch:g}s, READMEs until {t_back:g}s, '
        f'held-out again; point {cal["chosen_threshold"]:g}, shadow {fraction:.0%}, window '
        f'{window} tokens')
    runs = {}
    for name, frac in (('fixed certified point', 0.0), ('monitored', fraction)):
      o = serving.ServeOptions(controller='fixed', slots=slots, steps_per_call=steps_per_call,
                               quality=False, shadow_fraction=frac, monitor_window=window)
      st = serving.prepare(run, o, log=lambda s: None)
      st.engine.warmup(st.ops[0])
      if st.shadow is not None:
        serving.warm_shadow(st.shadow, st.spec, log=lambda s: None)
      ctl = next(iter(st.classes.values()))
      home = ctl.index
      t0 = time.perf_counter()
      res = scheduler.replay(st.engine, [scheduler.Request(**vars(r)) for r in reqs], st.ops,
                             ctl, shadow=st.shadow)
      wall = time.perf_counter() - t0
      runs[name] = (st, res, wall, home)
    # untimed: every prompt scored at every point of the monitored run's chain
    st_m = runs['monitored'][0]
    scorer = monitor_lib.ShadowScorer(st_m.spec, st_m.variables, st_m.ops)
    counts = {r.id: scorer.score(r.prompt) for r in reqs}
    rows = []
    for name, (st, res, wall, home) in runs.items():
      served = {r.id: st_m.ops.index(st.ops[_served_index(r, home)]) for r in res['records']}

      def agreement(ids: list[int]) -> float:  # each request at the point it was served at
        err = sum(int(counts[i].errors[served[i]]) for i in ids)
        return 1.0 - err / max(sum(counts[i].n for i in ids), 1)

      agree = {ph: agreement([r.id for r in reqs if r.phase == ph])
               for ph in ('before', 'drift', 'back')}
      p95 = lambda recs: 1e3 * float(np.percentile(  # noqa: E731
          [r.latency_s for r in recs if r.latency_s is not None], 95))
      layers = [x for r in res['records'] for x in r.layers]
      row = {'run': name, 'agreement_before': agree['before'],
             'agreement_drift': agree['drift'], 'agreement_back': agree['back'],
             'certified_level': 1.0 - tolerance,
             'p95_ms': p95(res['records']),
             # before the switch both runs serve the same point: the gap is the shadow's cost
             'p95_before_ms': p95([r for r in res['records'] if r.phase == 'before']),
             'mean_layers': float(np.mean(layers)), 'wall_s': wall}
      sh = st.shadow
      if sh is not None:
        alarms = [e for e in sh.events if e['event'] == 'alarm']
        late = [e for e in alarms if e['t'] >= t_switch]
        own = st.points[home].label  # the fixed point the monitor moved away from
        back = [e for e in sh.events if e['event'] == 'recertified' and e['t'] >= t_back
                and own in e['points']]
        if back:
          row['recertified_after_s'] = back[0]['t'] - t_back
        row.update(false_alarms=len(alarms) - len(late), shadowed=len(sh.rows),
                   shadow_share=sh.busy_s / wall,
                   events=[(round(e['t'], 2), e['event'], e['points']) for e in sh.events])
        if late:
          row['alarm_delay_s'] = late[0]['t'] - t_switch
          row['alarm_delay_requests'] = sum(1 for t in after if t.arrival_s <= late[0]['t'])
          row['agreement_after_alarm'] = agreement(
              [r.id for r in res['records'] if r.phase == 'drift'
               and r.admitted_s is not None and r.admitted_s > late[0]['t']])
      rows.append(row)
      log(format_row(row))
    return {'rows': rows, 'rate': rate, 'duration_s': duration_s, 'switch_s': t_switch,
            'back_s': t_back,
            'tolerance': tolerance, 'point': cal['chosen_threshold'], 'fraction': fraction,
            'window': window, 'requests': len(reqs),
            'drift_corpus': 'site-packages/*.dist-info/METADATA'}
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def format_row(r: dict) -> str:
  s = (f'  {r["run"]:<22} agreement before {r["agreement_before"]:.4f}, drift '
       f'{r["agreement_drift"]:.4f}, back {r["agreement_back"]:.4f} (certified >= '
       f'{r["certified_level"]:.2f}); p95 '
       f'{r["p95_ms"]:.0f} ms ({r["p95_before_ms"]:.0f} before the switch); '
       f'{r["mean_layers"]:.2f} layers')
  if 'shadowed' in r:
    s += (f'; {r["shadowed"]} shadowed, {r["shadow_share"]:.1%} of the replay scoring; false '
          f'alarms {r["false_alarms"]}; first alarm after the switch: '
          + (f'{r["alarm_delay_s"]:.1f}s ({r["alarm_delay_requests"]} requests), agreement '
             f'after it {r["agreement_after_alarm"]:.4f}' if 'alarm_delay_s' in r else 'none')
          + '; back at its point ' + (f'{r["recertified_after_s"]:.1f}s after the traffic '
                                      f'returned' if 'recertified_after_s' in r else 'never'))
  return s
