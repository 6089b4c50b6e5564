"""experiments.step_costs: both factors of the speedup, from whole calls differenced."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import step_costs
from jax_spec import decoding
from jax_spec import models


def test_measure_reports_the_loops_own_steps_and_both_storages(tmp_path):
  cfg = models.get_config('tiny', init_std=0.2, num_layers=1, eagle_layers=1)
  model = models.Transformer(cfg, rngs=nnx.Rngs(0))
  prepared = {'fp32': decoding.prepare(model),
              'bf16': decoding.prepare(model, drafter_dtype=jnp.bfloat16),
              'bf16_products': decoding.prepare(model, matmul_dtype=jnp.bfloat16)}
  tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size).astype(jnp.int32)
  prompts = [(tokens[i:i + 1], jnp.array([5], jnp.int32)) for i in range(2)]
  results = step_costs.measure(prepared, prompts, [('medusa', None), ('eagle', 3)],
                               new_tokens=(4, 13), rounds=1)
  rows = results['rows']
  assert [(r['drafter'], r['drafter_dtype']) for r in rows] == [
      (d, s) for d in ('medusa', 'eagle') for s in ('fp32', 'bf16', 'bf16_products')]
  by_dtype = results['plain_us_per_token_by_dtype']   # (values are timings: not a test's)
  # fp32 and bf16 drafters share the trunk, so its plain timing; bf16 products have their own.
  assert by_dtype['fp32'] == by_dtype['bf16'] == results['plain_us_per_token']
  assert np.isfinite(by_dtype['bf16_products']) and by_dtype['bf16_products'] != by_dtype['fp32']
  assert set(results['call_ms']) == {'fp32', 'bf16_products'} | {
      f'{d}:{s}' for d in ('medusa', 'eagle') for s in prepared}
  # tau is the long calls' own: accepted drafts plus one per verify step, over verify steps.
  eagle = rows[3]
  stats = [decoding.summarize(decoding.speculative_generate(
      prepared['fp32'], t, l, drafter='eagle', num_draft=3, max_new_tokens=13).stats)
      for t, l in prompts]
  verify = sum(s['verify_steps'] for s in stats)
  assert eagle['tokens_per_step'] == pytest.approx(
      (sum(s['accepted_tokens'] for s in stats) + verify) / verify)
  for r in rows:
    assert 1.0 <= r['tokens_per_step'] <= 1 + (3 if r['drafter'] == 'eagle' else cfg.medusa_heads)
    assert r['loop_speedup'] == pytest.approx(r['tokens_per_step'] / r['plain_steps_per_step'])
    assert r['plain_steps_per_step'] == pytest.approx(r['us_per_step']
                                                      / by_dtype[r['drafter_dtype']])
  step_costs.plot(results, str(tmp_path / 'step_costs.png'))
  assert (tmp_path / 'step_costs.png').stat().st_size > 0
  with pytest.raises(ValueError, match='0 < short < long'):
    step_costs.measure(prepared, prompts, [('medusa', None)], new_tokens=(8, 8))


def test_parse_drafter():
  assert step_costs.parse_drafter('eagle:6') == ('eagle', 6)
  assert step_costs.parse_drafter('medusa') == ('medusa', None)
  with pytest.raises(ValueError, match="NAME\\[:NUM_DRAFT\\]"):
    step_costs.parse_drafter('eagle:six')
