"""Exact early exit (self-speculative decoding): output, cache and sampling distribution."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from act_jax import config as config_lib
from act_jax.infer import inference
from act_jax.infer import speculative as S
from act_jax.infer import draft as SB
from act_jax.errors import ConfigError
from act_jax.model.transformer import make_model
from act_jax.spec import OperatingPoint


def make_spec(moe=False, layers=4, vocab=260, policy='confidence', **halting):
  c = config_lib.default_config()
  c.model.update(d_model=32, num_heads=4, d_ff=64, num_layers=layers)
  c.data.update(seq_len=48, batch_size=2)
  c.halting.update(name=policy, **halting)
  if moe:  # capacity 1.0 with top-2 of 4: a window routed as one group would drop tokens
    c.moe.update(router='top_k', num_experts=4, top_k=2, every=2, d_ff=32, capacity_factor=1.0)
  spec = config_lib.resolve(c)
  if vocab != spec.model.vocab_size:  # a toy vocabulary (the byte corpus needs 260)
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, vocab_size=vocab))
  return spec


def setup(moe=False, layers=4, vocab=260, policy='confidence', **halting):
  spec = make_spec(moe, layers, vocab, policy, **halting)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, min(vocab, 256))
  v = nn.unbox(make_model(spec).init(jax.random.PRNGKey(0), tokens))
  return spec, {'params': v['params'], 'moe_state': v.get('moe_state', {})}


def _prompts(n, length, seed, vocab=256):
  return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (n, length), 0, vocab))


def deepen(v, factor=3.0):
  """Scales every weight of the steps after the first: the deep layers then change the
  prediction, so a layer-1 draft is often rejected (random weights accept nearly all)."""
  stack = jax.tree.map(lambda x: x.at[1:].multiply(factor), v['params']['stack'])
  return {'params': dict(v['params'], stack=stack), 'moe_state': v['moe_state']}


@pytest.mark.parametrize('moe', [False, pytest.param(True, marks=pytest.mark.slow)])  # ~35 s;
# MoE in the default tier: test_serving's exact-mode serving == full-depth decoding alone
def test_greedy_exact_equals_full_depth_decoding(moe):
  spec, v = setup(moe=moe)
  new = 14
  prompts = _prompts(6, 5, seed=3)
  ref = np.asarray(inference.generate(spec, v, prompts, new, OperatingPoint.full_depth())['tokens'])
  np.testing.assert_array_equal(S.generate_plain(spec, v, prompts, new)['tokens'], ref)
  varied = False
  for layer in S.draft_layers(spec):  # the draft layer is traced: one compile for all
    out = S.generate_exact(spec, v, prompts, new, layer, 2)  # batch 6
    np.testing.assert_array_equal(np.asarray(out['tokens']), ref, err_msg=f'k={layer}')
    acc = np.asarray(out['accepted'])
    live = acc[(acc >= 0).all(1)]
    varied |= bool(np.any(live.min(1) != live.max(1)))  # rows accept different lengths
  assert varied
  if not moe:  # batch 1, another draft length
    for row in range(2):
      out = S.generate_exact(spec, v, prompts[row:row + 1], new, 1, 3)
      np.testing.assert_array_equal(np.asarray(out['tokens'])[0], ref[row])


def test_cache_after_exact_decoding_is_full_depth_decodings():
  spec, v = setup()
  v = deepen(v)
  p, new, d = 5, 12, 2
  prompts = _prompts(4, p, seed=7)
  plain = S.generate_plain(spec, v, prompts, new)
  out = S.generate_exact(spec, v, prompts, new, 1, d)
  np.testing.assert_array_equal(out['tokens'], plain['tokens'])
  acc = np.asarray(out['accepted'])
  assert np.any((acc >= 0) & (acc < d))  # some drafts were rejected
  index = np.asarray(out['index'])
  assert (index >= p + new - 1).all()
  for g, (ce, cp) in enumerate(zip(out['cache'], plain['cache'])):
    for name in ('k', 'v'):
      e, f = np.asarray(ce[name]), np.asarray(cp[name])          # [N, B, T, H, J]
      for b in range(4):
        upto = p + new - 1  # positions plain decoding filled (the last token is never fed)
        np.testing.assert_allclose(e[:, b, :upto], f[:, b, :upto], atol=1e-4, rtol=1e-4)
        # rejected drafts leave nothing: past the row's position every layer is zero
        assert not np.any(e[:, b, index[b]:]), (g, name, b)
  one = S.generate_exact(spec, v, prompts[:1], new, 1, d)  # one row: slice updates
  np.testing.assert_array_equal(one['tokens'], plain['tokens'][:1])
  i1 = int(one['index'][0])
  for ce, cp in zip(one['cache'], plain['cache']):
    e, f = np.asarray(ce['k']), np.asarray(cp['k'])
    np.testing.assert_allclose(e[:, 0, :p + new - 1], f[:, 0, :p + new - 1], atol=1e-4,
                               rtol=1e-4)
    assert not np.any(e[:, 0, i1:])


def _joint(spec, v, prompt, vocab, draft_step=None):
  """Probabilities of the first three sampled tokens, [V, V, V]: all three from the full
  model, or (draft_step) the first from the full model (the prefill) and the next two from
  the exit head at that step (what accepting every draft would sample)."""
  seqs = np.array([list(prompt) + [a, b] for a in range(vocab) for b in range(vocab)])
  logits, aux = make_model(spec).apply(v, jnp.asarray(seqs),
                                       threshold=OperatingPoint.full_depth().vector(spec))
  p = np.asarray(jax.nn.softmax(logits[:, -3:], -1), np.float64)       # [V*V, 3, V]
  if draft_step is not None:
    q = np.asarray(jax.nn.softmax(aux['step_logits'][draft_step, :, -3:], -1), np.float64)
    p = np.concatenate([p[:, :1], q[:, 1:]], 1)
  p0 = p[0, 0]
  p1 = p[::vocab, 1]                                                  # [V(a), V]
  p2 = p[:, 2].reshape(vocab, vocab, vocab)                           # [a, b, c]
  return p0[:, None, None] * p1[:, :, None] * p2


def test_speculative_sampling_keeps_the_full_models_distribution():
  """4000 rows (one seed set: PRNGKey(0)) sample 3 tokens with exact mode from one prompt;
  the joint of the 4^3 outcomes must pass a chi-square test against the full model's
  (p = 0.001, 63 degrees of freedom) and fail against the draft head's own joint (the draft
  differs enough that 'accept every draft' would be caught)."""
  vocab, rows = 4, 4000
  spec, v = setup(vocab=vocab)
  v = deepen(v)  # the draft (layer 1) and the full model then disagree
  prompt = [1, 3, 0, 2]
  out = S.generate_exact(spec, v, np.tile(prompt, (rows, 1)), 3, 1, 2, temperature=1.0)
  toks = np.asarray(out['tokens'])
  observed = np.zeros((vocab,) * 3)
  np.add.at(observed, (toks[:, 0], toks[:, 1], toks[:, 2]), 1)
  expected = _joint(spec, v, prompt, vocab) * rows
  stat = np.sum((observed - expected) ** 2 / expected)
  critical = scipy.stats.chi2.ppf(0.999, vocab ** 3 - 1)
  assert stat < critical, (stat, critical)
  q = _joint(spec, v, prompt, vocab, draft_step=0) * rows  # the layer-1 draft's joint
  stat_q = np.sum((observed - q) ** 2 / q)
  assert stat_q > 5 * critical, stat_q
  # seeded: the same seed gives the same samples, another seed others (no recompile)
  again = S.generate_exact(spec, v, np.tile(prompt, (rows, 1)), 3, 1, 2, temperature=1.0)
  np.testing.assert_array_equal(again['tokens'], toks)
  other = S.generate_exact(spec, v, np.tile(prompt, (rows, 1)), 3, 1, 2, temperature=1.0,
                           seed=1)
  assert np.mean(np.asarray(other['tokens']) != toks) > 0.2


def test_acceptance_statistics_by_hand():
  acc = np.array([[2, 0, -1], [1, 2, -1], [-1, -1, -1]])   # rounds x rows, -1 = no round
  st = S.acceptance_stats(acc, 2)
  assert st['rounds'] == 4 and st['accepted_per_round'] == pytest.approx(5 / 4)
  assert st['tokens_per_round'] == pytest.approx(9 / 4)
  # position 0: 3 of 4 accepted; position 1: reached by 3 (a >= 1), accepted by 2 (a > 1)
  assert st['per_position'] == pytest.approx([3 / 4, 2 / 3])


def test_teacher_forced_acceptance_and_measured_tuning():
  spec, v = setup()
  tokens = _prompts(2, 24, seed=2)
  alpha = S.draft_acceptance(spec, v, tokens)
  _, aux = make_model(spec).apply(v, jnp.asarray(tokens),
                                  threshold=OperatingPoint.full_depth().vector(spec))
  top = np.asarray(jnp.argmax(aux['step_logits'], -1))
  assert alpha == {k: pytest.approx(float(np.mean(top[k - 1] == top[-1]))) for k in (1, 2, 3)}
  # measured tuning over the draft layers at one draft length; kept in the run's folder
  res = SB.tune_draft(spec, v, batch=2, draft_lens=(2,), prompt_len=8, new_tokens=6,
                      repeats=1)
  assert {(r['draft_layer'], r['draft_len']) for r in res['table']} == {(1, 2), (2, 2)}
  best = max(res['table'], key=lambda r: r['speedup'])
  assert (res['draft_layer'], res['draft_len']) == (best['draft_layer'], 2)
  assert all(1.0 <= r['bytes_per_verify'] <= 3.0 for r in res['table'])
  k, d, how = SB.resolve_draft(spec, v, 3, 2)
  assert (k, d, how) == (3, 2, 'given')


@pytest.mark.parametrize('policy', ['act', 'pondernet', 'mod', 'none'])
def test_policies_without_exit_heads_are_refused(policy):
  spec = make_spec(policy=policy)
  with pytest.raises(ConfigError, match='--mode=exact.*halting.name'):
    S.check_exact(spec)


def test_bad_draft_flags():
  spec, v = setup(layers=4, exit_every=2)   # exit layers 2, 4 (a model: lengths are checked)
  assert S.draft_layers(spec) == [2]
  for bad in (1, 3, 4, 5, 0):
    with pytest.raises(ConfigError, match=f'--draft_layer={bad}: .*one of \\[2\\]'):
      S.check_exact(spec, draft_layer=bad)
  for bad in (0, -1, 17):
    with pytest.raises(ConfigError, match=f'--draft_len={bad}'):
      S.generate_exact(spec, v, _prompts(1, 3, 0), 4, 2, bad)
  with pytest.raises(ConfigError, match='--max_layers=2: exact mode'):
    S.check_exact(spec, max_layers=2)
  with pytest.raises(ConfigError, match='--temperature=-1'):
    S.check_exact(spec, temperature=-1)
  with pytest.raises(ConfigError, match='exceeds the model max length'):
    S.generate_exact(spec, v, _prompts(1, 40, 0), 20, 2, 2)
