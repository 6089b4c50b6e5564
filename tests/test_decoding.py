"""Logits processors, sampling, and the autoregressive baseline `generate`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models
from jax_spec import runtime
from jax_spec.decoding import autoregressive as generate_lib
from jax_spec.decoding import sampling


def test_greedy_probs_are_one_hot_argmax():
  logits = jnp.array([[0.1, 2.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0]])
  p = sampling.target_probs(logits, temperature=0.0)
  np.testing.assert_array_equal(p, [[0, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(sampling.sample_logits(None, logits), [1, 0])


def test_temperature_top_k_top_p_against_float64():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 11)) * 2
  for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.3, 4, 1.0), (1.0, 0, 0.6), (0.5, 5, 0.8)]:
    p = np.asarray(sampling.target_probs(jnp.asarray(logits, jnp.float32), temperature=temperature,
                                         top_k=top_k, top_p=top_p), np.float64)
    z = logits / temperature
    if top_k:
      z = np.where(z >= np.sort(z, axis=-1)[:, -top_k][:, None], z, -np.inf)
    ref = np.exp(z - z.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    if top_p < 1:
      for row in ref:
        order = np.argsort(-row)
        before = np.cumsum(row[order]) - row[order]
        drop = order[before >= top_p]
        row[drop] = 0
        row /= row.sum()
    np.testing.assert_allclose(p, ref, rtol=2e-5, atol=1e-7)
    assert np.all((p > 0).sum(-1) >= 1)


def test_sample_probs_matches_distribution_and_skips_zeros():
  probs = jnp.array([0.5, 0.0, 0.3, 0.2])
  draws = jax.jit(lambda k: sampling.sample_probs(k, jnp.broadcast_to(probs, (20000, 4))))(
      jax.random.key(0))
  freq = np.bincount(np.asarray(draws), minlength=4) / 20000
  assert freq[1] == 0
  np.testing.assert_allclose(freq, probs, atol=0.015)


@pytest.mark.parametrize('kwargs, match', [
    (dict(temperature=-1.0), 'temperature'), (dict(top_k=-2), 'top_k'), (dict(top_p=0.0), 'top_p'),
    (dict(top_k=1.5), 'top_k')])
def test_bad_sampling_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.target_probs(jnp.zeros((2, 3)), **kwargs)


# --- generate ----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def model():
  # init_std 0.2 gives peaked logits, so greedy near-ties (fp rounding flips) are unlikely.
  return models.Transformer(models.get_config('tiny', init_std=0.2), rngs=nnx.Rngs(0))


def _prompts():
  prompts = jax.random.randint(jax.random.key(1), (2, 7), 0, 259).astype(jnp.int32)
  return prompts, jnp.array([7, 4], jnp.int32)


def reference_greedy(model, prompts_BT, lengths_B, max_new):
  """Greedy decoding by re-running the full causal forward (one jitted, fixed-shape program)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda st, toks: nnx.merge(graphdef, st)(toks).logits_BTV)
  lengths = np.asarray(lengths_B)
  seq = np.zeros((prompts_BT.shape[0], prompts_BT.shape[1] + max_new), np.int32)
  seq[:, :prompts_BT.shape[1]] = np.asarray(prompts_BT)
  out = np.zeros((prompts_BT.shape[0], max_new), np.int32)
  rows = np.arange(len(lengths))
  for i in range(max_new):
    logits = np.asarray(forward(state, jnp.asarray(seq)))   # causal: padding after does not matter
    out[:, i] = np.argmax(logits[rows, lengths + i - 1], axis=-1)
    seq[rows, lengths + i] = out[:, i]
  return out


def test_generate_greedy_matches_full_forward(model):
  prompts, lengths = _prompts()
  out = generate_lib.generate(model, prompts, lengths, max_new_tokens=9)
  np.testing.assert_array_equal(out.lengths_B, [9, 9])
  np.testing.assert_array_equal(out.tokens_BN, reference_greedy(model, prompts, lengths, 9))
  # Batch 1 gives the same tokens as the batch.
  out1 = generate_lib.generate(model, prompts[1:, :4], lengths[1:], max_new_tokens=9)
  np.testing.assert_array_equal(out1.tokens_BN[0], out.tokens_BN[1])


def test_generate_eos_and_no_retrace(model):
  prompts, lengths = _prompts()
  full = generate_lib.generate(model, prompts, lengths, max_new_tokens=9)
  eos = int(full.tokens_BN[0, 3])
  out = generate_lib.generate(model, prompts, lengths, max_new_tokens=9, eos_id=eos, pad_id=1)
  first0 = list(np.asarray(full.tokens_BN[0])).index(eos)
  assert int(out.lengths_B[0]) == first0 + 1
  np.testing.assert_array_equal(out.tokens_BN[0, :first0 + 1], full.tokens_BN[0, :first0 + 1])
  assert np.all(np.asarray(out.tokens_BN[0, first0 + 1:]) == 1)
  row1 = list(np.asarray(full.tokens_BN[1]))
  len1 = row1.index(eos) + 1 if eos in row1 else 9
  assert int(out.lengths_B[1]) == len1
  np.testing.assert_array_equal(out.tokens_BN[1, :len1], full.tokens_BN[1, :len1])
  # New prompts and a new EOS reuse the compiled loop: nothing compiles.
  new_prompts, new_lengths = prompts[::-1], lengths[::-1]
  with runtime.count_compiles() as compiles:
    generate_lib.generate(model, new_prompts, new_lengths, max_new_tokens=9, eos_id=3, pad_id=1)
  assert compiles[0] == 0


def test_generate_sampling(model):
  prompts, lengths = _prompts()
  greedy = generate_lib.generate(model, prompts, lengths, max_new_tokens=6)
  # top_k=1 at any temperature is greedy.
  top1 = generate_lib.generate(model, prompts, lengths, max_new_tokens=6, temperature=1.5, top_k=1,
                               rng=jax.random.key(3))
  np.testing.assert_array_equal(top1.tokens_BN, greedy.tokens_BN)
  with pytest.raises(ValueError, match='rng'):
    generate_lib.generate(model, prompts, lengths, max_new_tokens=6, temperature=1.0)


def test_generate_sampled_longer_call_repeats_the_shorter(model):
  """Step i's key depends on the rng and i only (`sampling.step_keys`), not on max_new_tokens."""
  prompts, lengths = _prompts()
  kw = dict(temperature=1.0, rng=jax.random.key(5))
  short = generate_lib.generate(model, prompts, lengths, max_new_tokens=4, **kw)
  long = generate_lib.generate(model, prompts, lengths, max_new_tokens=11, **kw)
  np.testing.assert_array_equal(short.tokens_BN, long.tokens_BN[:, :4])
  other = generate_lib.generate(model, prompts, lengths, max_new_tokens=11, temperature=1.0,
                                rng=jax.random.key(6))
  assert np.any(np.asarray(other.tokens_BN) != np.asarray(long.tokens_BN))   # the keys matter


def test_generate_bad_inputs(model):
  prompts, lengths = _prompts()
  with pytest.raises(ValueError, match='cache_len'):
    generate_lib.generate(model, prompts, lengths, max_new_tokens=9, cache_len=10)
  with pytest.raises(ValueError, match='prompt_lengths_B'):
    generate_lib.generate(model, prompts, jnp.array([8, 4]), max_new_tokens=2)
  with pytest.raises(ValueError, match='max_new_tokens'):
    generate_lib.generate(model, prompts, lengths, max_new_tokens=0)
  with pytest.raises(ValueError, match='eos_id'):
    generate_lib.generate(model, prompts, lengths, max_new_tokens=2, eos_id=10_000)


@pytest.mark.parametrize('policy, expected', [('fp32', 'highest'), ('bf16', None)])
def test_decoders_trace_fp32_models_with_full_precision_matmuls(monkeypatch, policy, expected):
  """fp32 decoding must not use TF32 on GPUs (greedy identity; autoregressive.matmul_precision)."""
  from jax_spec.decoding import speculative as spec_lib  # pylint: disable=g-import-not-at-top
  model = models.Transformer(models.get_config('tiny', num_layers=1), policy=policy,
                             rngs=nnx.Rngs(0))
  seen = []
  record = lambda *a, **k: seen.append(jax.config.jax_default_matmul_precision)
  monkeypatch.setattr(generate_lib, '_generate', record)
  monkeypatch.setattr(spec_lib, '_speculative', record)
  prompts = jnp.ones((1, 4), jnp.int32)
  generate_lib.generate(model, prompts, jnp.array([4]), max_new_tokens=2)
  spec_lib.speculative_generate(model, prompts, jnp.array([4]), drafter='medusa',
                                max_new_tokens=2)
  assert seen == [expected, expected]
  assert jax.config.jax_default_matmul_precision is None   # restored after the call


def test_default_caches_are_the_request_rounded_up_to_16(monkeypatch):
  """Both samplers size their default cache to the request (not max_seq_len), in 16s."""
  from jax_spec.decoding import speculative as spec_lib  # pylint: disable=g-import-not-at-top
  assert [generate_lib.check_cache_len(None, n, 'x') for n in (1, 16, 17, 225)] == [16, 16, 32, 240]
  assert generate_lib.check_cache_len(40, 17, 'x') == 40
  model = models.Transformer(models.get_config('tiny', num_layers=1), rngs=nnx.Rngs(0))
  seen = []
  monkeypatch.setattr(generate_lib, '_generate', lambda *a, **k: seen.append(k['cache_len']))
  monkeypatch.setattr(spec_lib, '_speculative',
                      lambda *a, **k: seen.append(k['settings'].drafter.cache_len))
  prompts = jnp.ones((1, 5), jnp.int32)
  generate_lib.generate(model, prompts, jnp.array([5]), max_new_tokens=13)   # needs 18
  spec_lib.speculative_generate(model, prompts, jnp.array([5]), drafter='medusa', tree='chain',
                                max_new_tokens=13)   # 5 + 13 + (depth 2 - 1) + 3 nodes = 22
  assert seen == [32, 32]


def test_exponential_race_is_the_gumbel_max_trick():
  """argmax(p / e) with e = -log u draws what argmax(log p + g), g = -log(-log u), draws."""
  p_NV = jax.nn.softmax(2 * jax.random.normal(jax.random.key(0), (4000, 37)))
  p_NV = jnp.where(jax.random.uniform(jax.random.key(1), p_NV.shape) < 0.3, 0.0, p_NV)
  p_NV = p_NV.at[:, 0].set(jnp.where(p_NV.sum(-1) > 0, p_NV[:, 0], 1.0))
  u_NV = jax.random.uniform(jax.random.key(2), p_NV.shape, minval=jnp.finfo(jnp.float32).tiny)
  gumbel_max_N = jnp.argmax(jnp.where(p_NV > 0, jnp.log(p_NV), -jnp.inf) - jnp.log(-jnp.log(u_NV)),
                            axis=-1)
  race_N = sampling.sample_probs_exponential(p_NV, -jnp.log(u_NV))
  assert np.mean(np.asarray(race_N) == np.asarray(gumbel_max_N)) > 0.999   # fp32 near-ties only
  assert np.all(np.take_along_axis(np.asarray(p_NV), np.asarray(race_N)[:, None], 1) > 0)

