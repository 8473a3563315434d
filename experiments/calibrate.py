r"""Picks an early-exit operating point on held-out data (Learn-then-Test) or by budget.

  python -m experiments.calibrate --workdir=RUN --tolerance=0.01 --risk=0.05
  python -m experiments.calibrate --workdir=RUN --budget_layers=4
  python -m experiments.calibrate --workdir=RUN --max_layers=7   # thresholds under a depth cap
  python -m experiments.calibrate --workdir=RUN --measure=accuracy --tolerance=0.01 --max_layers=8
  python -m experiments.calibrate --workdir=RUN --caps=0,4,2   # certified points for serving
  python -m experiments.calibrate --workdir=RUN --from_serving=SERVE_OUT  # from live traffic
Writes RUN/calibration.json (the frontier + the chosen threshold) and RUN/calibration.png
(--from_serving: the JSON only, certified on the shadow tokens of SERVE_OUT/shadow.jsonl that
`serve --shadow_fraction` wrote).
"""
import json

from experiments import quiet_logs, run
from experiments import vocabulary as vocab

from act_jax.calibrate import certify, operating_point
from act_jax.errors import ConfigError

_WORKDIR = vocab.define('workdir', required=True)
_TOL = vocab.define('tolerance', help='consistency: max fraction of tokens whose prediction may '
                    'differ from full depth; accuracy: max relative accuracy drop.')
_MEASURE = vocab.define('measure')
_RISK = vocab.define('risk')
_BUDGET = vocab.define('budget_layers')
_METHOD = vocab.define('method')
_BATCHES = vocab.define('num_batches', 16, 'Held-out batches (half calibrate, half test).')
_THR = vocab.define('thresholds', help='Candidate thresholds in (0, 1], conservative first '
                    '(default: operating_point.DEFAULT_THRESHOLDS).')
_MAX_LAYERS = vocab.define('max_layers', help='Pick thresholds under this depth cap (an exit '
                           'layer).')
_CAPS = vocab.define('caps', help='Certify under each of these depth caps (0 = none), the risk '
                     'split over them (Bonferroni); calibration.json then lists every certified '
                     'point for experiments.serve.')
_FROM = vocab.define('from_serving')


def main(argv):
  del argv
  quiet_logs()
  if _FROM.present:  # live shadow tokens instead of held-out data: no sweep, no timing
    for holder in (_BUDGET, _METHOD, _BATCHES, _THR, _MAX_LAYERS, _CAPS):
      if holder.present:
        raise ConfigError(f'--{holder.name}: applies to held-out calibration, not '
                          f'--from_serving (which re-tests the points the server scored)')
    certify.certify_from_serving(_WORKDIR.value, _FROM.value,
                                 _TOL.value if _TOL.present else None,
                                 _RISK.value if _RISK.present else None,
                                 _MEASURE.value if _MEASURE.present else None)
    print(f'wrote {_WORKDIR.value}/calibration.json')
    return
  if _BUDGET.present:  # a layer budget picks without a test: these would be ignored
    for holder in (_TOL, _RISK, _MEASURE, _METHOD):
      if holder.present:
        raise ConfigError(f'--{holder.name}={holder.value}: applies to Learn-then-Test, not '
                          f'--budget_layers={_BUDGET.value} (which picks by mean layers, '
                          'without a guarantee)')
  r = certify.calibrate_run(_WORKDIR.value, _TOL.value, _RISK.value, _BUDGET.value,
                            num_batches=_BATCHES.value, method=_METHOD.value,
                            max_layers=_MAX_LAYERS.value, measure=_MEASURE.value,
                            caps=_CAPS.value,
                            thresholds=_THR.value or operating_point.DEFAULT_THRESHOLDS)
  print(json.dumps({k: r[k] for k in ('policy', 'mode', 'measure', 'chosen_threshold',
                                      'max_layers',
                                      'full_depth',
                                      'test', 'n_calib_tokens', 'n_test_tokens')}, indent=2))
  if r.get('static'):  # the baseline an adaptive model must beat: a shallower static model
    full = r['full_depth']['accuracy']
    print('static truncation (every token exits at layer k), test split: ' + ', '.join(
        f'{k}: acc {a:.4f} ({(full - a) / full:+.2%})'
        for k, a in zip(r['static']['layers'], r['static']['accuracy'])))
  print(f'wrote {_WORKDIR.value}/calibration.json and calibration.png')


if __name__ == '__main__':
  run(main)
