r"""Picks an early-exit operating point on held-out data (Learn-then-Test) or by budget.

  python -m experiments.calibrate --workdir=RUN --tolerance=0.01 --risk=0.05
  python -m experiments.calibrate --workdir=RUN --budget_layers=4
  python -m experiments.calibrate --workdir=RUN --max_layers=7   # thresholds under a depth cap
  python -m experiments.calibrate --workdir=RUN --measure=accuracy --tolerance=0.01 --max_layers=8
  python -m experiments.calibrate --workdir=RUN --caps=0,4,2   # certified points for serving
Writes RUN/calibration.json (the frontier + the chosen threshold) and RUN/calibration.png.
"""
import json

from absl import flags

from experiments import define_max_layers_flag, quiet_logs, run

from act_jax.calibrate import operating_point
from act_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (config.json + checkpoints).')
_TOL = flags.DEFINE_float('tolerance', 0.01, 'consistency: max fraction of tokens whose '
                          'prediction may differ from full depth; accuracy: max relative '
                          'accuracy drop.')
_MEASURE = flags.DEFINE_enum('measure', 'consistency', ['consistency', 'accuracy'],
                             'What the tolerance bounds (accuracy: empirical-Bernstein LTT).')
_RISK = flags.DEFINE_float('risk', 0.05, 'Probability that the guarantee fails (delta).')
_BUDGET = flags.DEFINE_float('budget_layers', None, 'Instead: meet this mean-layers budget.')
_METHOD = flags.DEFINE_enum('method', 'binomial', ['binomial', 'hoeffding'], 'p-value.')
_BATCHES = flags.DEFINE_integer('num_batches', 16, 'Held-out batches (half calibrate, half test).')
_THR = flags.DEFINE_list('thresholds', None, 'Candidate thresholds, conservative first '
                         '(default: operating_point.DEFAULT_THRESHOLDS).')
_MAX_LAYERS = define_max_layers_flag()
_CAPS = flags.DEFINE_list('caps', None, 'Certify under each of these depth caps (0 = none), '
                          'the risk split over them (Bonferroni); calibration.json then lists '
                          'every certified point for experiments.serve.')
flags.mark_flag_as_required('workdir')


def _caps(values):
  if values is None:
    return None
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ConfigError(f'--caps={",".join(values)}: give integers (exit layers; 0 = uncapped)')


def main(argv):
  del argv
  quiet_logs()
  r = operating_point.calibrate_run(_WORKDIR.value, _TOL.value, _RISK.value, _BUDGET.value,
                                    num_batches=_BATCHES.value, method=_METHOD.value,
                                    max_layers=_MAX_LAYERS.value, measure=_MEASURE.value,
                                    caps=_caps(_CAPS.value),
                                    thresholds=[float(t) for t in _THR.value] if _THR.value
                                    else operating_point.DEFAULT_THRESHOLDS)
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
