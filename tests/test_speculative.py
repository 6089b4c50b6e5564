"""speculative_generate: greedy identical to generate for every drafter, chain and tree; stats;
partial acceptance and cache commit; EOS; rejection sampling end to end; no retracing."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models
from jax_spec import runtime
from jax_spec.decoding import autoregressive as generate_lib
from jax_spec.decoding import speculative as spec
from jax_spec.decoding import dynamic_tree, trees

MAX_NEW = 9


@pytest.fixture(scope='module')
def model():
  # The `tiny` preset (2 MTP modules, 2 Medusa heads) with one trunk layer (compile time);
  # init_std 0.2 gives peaked logits, so fp rounding differences between a 1-token and a T-token
  # forward never flip a greedy argmax.
  return models.Transformer(models.get_config('tiny', init_std=0.2, num_layers=1),
                            rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def prompts():
  return (jax.random.randint(jax.random.key(1), (2, 7), 0, 259).astype(jnp.int32),
          jnp.array([7, 4], jnp.int32))


@pytest.fixture(scope='module')
def baseline(model, prompts):
  return generate_lib.generate(model, *prompts, max_new_tokens=MAX_NEW)


def _noisy_copy(model, scale, seed):
  """A draft model that agrees with the target often but not always (partial acceptances)."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + scale * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype) if x.ndim > 1 else x
            for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def _check_stats(out, tree):
  s = spec.summarize(out.stats, out.lengths_B)
  steps = np.asarray(out.stats.verify_steps_B)
  hist = np.asarray(out.stats.accepted_hist_I)
  assert len(hist) == tree.max_depth + 1 and hist.sum() == steps.sum()
  assert (hist * np.arange(len(hist))).sum() == np.asarray(out.stats.accepted_B).sum()
  assert 1.0 <= s['mean_accepted_length'] <= tree.max_depth + 1
  # Every row emits at least one token per verify step, at most max_depth + 1 (+1 from prefill).
  lengths = np.asarray(out.lengths_B)
  assert np.all(steps + 1 >= np.minimum(lengths, 2)) and np.all(lengths <= steps * (tree.max_depth + 1) + 1)
  return s


@pytest.mark.parametrize('drafter, tree', [
    ('medusa', 'default'),                            # sparse tree, 9 nodes, depth 2
    ('mtp', [[0], [1], [2], [0, 0], [0, 1]]),         # chain with branches off it
])
def test_greedy_heads_identical_to_generate(model, prompts, baseline, drafter, tree):
  out = spec.speculative_generate(model, *prompts, drafter=drafter, tree=tree,
                                  max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(out.tokens_BN, baseline.tokens_BN)
  np.testing.assert_array_equal(out.lengths_B, baseline.lengths_B)
  _check_stats(out, trees.get_tree(tree, 2))


def test_greedy_draft_model_partial_and_full_acceptance(model, prompts, baseline):
  tree = trees.chain(3)
  # A noisy copy drafts: some steps accept part of the chain (the cache commit of a partial path
  # is exercised), outputs must still equal generate's.
  noisy = spec.speculative_generate(model, *prompts, drafter='model',
                                    draft_model=_noisy_copy(model, 0.1, 0), tree=tree,
                                    max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(noisy.tokens_BN, baseline.tokens_BN)
  hist = np.asarray(noisy.stats.accepted_hist_I)
  assert hist[1:3].sum() > 0, hist               # partial acceptances happened
  _check_stats(noisy, tree)
  # The model drafting for itself: every draft is accepted, tau = gamma + 1. Same program.
  with runtime.count_compiles() as compiles:
    self_out = spec.speculative_generate(model, *prompts, drafter='model', draft_model=model,
                                         tree=tree, max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(self_out.tokens_BN, baseline.tokens_BN)
  s = _check_stats(self_out, tree)
  assert s['mean_accepted_length'] == 4.0 and s['acceptance_rate_per_depth'] == [1.0] * 3
  # ceil((MAX_NEW - 1) / 4) = 2 steps per row: max_new_tokens is respected exactly.
  np.testing.assert_array_equal(self_out.stats.verify_steps_B, [2, 2])
  assert compiles[0] == 0

  # EOS: rows stop at their first EOS, like generate; still no recompile.
  eos = int(baseline.tokens_BN[0, 5])
  ref = generate_lib.generate(model, *prompts, max_new_tokens=MAX_NEW, eos_id=eos)
  with runtime.count_compiles() as compiles:
    out = spec.speculative_generate(model, *prompts, drafter='model', draft_model=model, tree=tree,
                                    max_new_tokens=MAX_NEW, eos_id=eos)
  np.testing.assert_array_equal(out.tokens_BN, ref.tokens_BN)
  np.testing.assert_array_equal(out.lengths_B, ref.lengths_B)
  assert int(out.lengths_B[0]) <= 6
  assert compiles[0] == 0

  # gamma is set by the chain, beyond the default of 4.
  long_out = spec.speculative_generate(model, *prompts, drafter='model', draft_model=model,
                                       tree=trees.chain(6), max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(long_out.tokens_BN, baseline.tokens_BN)
  assert _check_stats(long_out, trees.chain(6))['mean_accepted_length'] == 7.0


def test_batch_one_and_no_retrace(model, prompts, baseline):
  tokens, lengths = prompts
  out = spec.speculative_generate(model, tokens[1:, :4], lengths[1:], drafter='medusa',
                                  tree='chain', max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(out.tokens_BN[0], baseline.tokens_BN[1])
  other, other_lengths = jnp.array([[5, 6, 7, 8]], jnp.int32), jnp.array([3], jnp.int32)
  # New prompts of the same shape reuse the compiled loop, however many steps it ran.
  with runtime.count_compiles() as compiles:
    out2 = spec.speculative_generate(model, other, other_lengths, drafter='medusa', tree='chain',
                                     max_new_tokens=MAX_NEW)
  assert compiles[0] == 0
  ref2 = generate_lib.generate(model, other, other_lengths, max_new_tokens=MAX_NEW)
  np.testing.assert_array_equal(out2.tokens_BN, ref2.tokens_BN)
  assert int(out.stats.loop_steps) > 1


def test_rejection_sampling_self_draft_accepts_everything(model, prompts):
  """With q = p (the model drafts for itself, drafts sampled), min(1, p/q) = 1: all accepted.

  This fails if the draft distributions are paired with the wrong tree nodes or processors.
  """
  out = spec.speculative_generate(model, *prompts, drafter='model', draft_model=model,
                                  tree=trees.chain(3), acceptance='rejection', temperature=1.0,
                                  top_k=20, max_new_tokens=MAX_NEW, rng=jax.random.key(0))
  s = spec.summarize(out.stats)
  assert s['mean_accepted_length'] == pytest.approx(4.0, abs=1e-6), s
  np.testing.assert_array_equal(out.lengths_B, [MAX_NEW, MAX_NEW])
  assert np.all((np.asarray(out.tokens_BN) >= 0) & (np.asarray(out.tokens_BN) < 259))


@pytest.mark.parametrize('drafter', ['medusa', 'mtp'])
def test_rejection_sampling_longer_call_repeats_the_shorter(model, prompts, drafter):
  """A verify step's keys depend on the rng and the step only, not on max_new_tokens."""
  kw = dict(drafter=drafter, tree=trees.chain(2), temperature=1.0, cache_len=48)
  short = spec.speculative_generate(model, *prompts, max_new_tokens=4, rng=jax.random.key(2), **kw)
  long = spec.speculative_generate(model, *prompts, max_new_tokens=MAX_NEW, rng=jax.random.key(2),
                                   **kw)
  np.testing.assert_array_equal(short.tokens_BN, long.tokens_BN[:, :4])
  other = spec.speculative_generate(model, *prompts, max_new_tokens=MAX_NEW, rng=jax.random.key(3),
                                    **kw)
  assert np.any(np.asarray(other.tokens_BN) != np.asarray(long.tokens_BN))   # the keys matter


def test_typical_acceptance_runs_with_medusa_tree(model, prompts):
  out = spec.speculative_generate(model, *prompts, drafter='medusa', tree='default',
                                  acceptance='typical', temperature=0.7, max_new_tokens=MAX_NEW,
                                  rng=jax.random.key(1))
  _check_stats(out, trees.default_tree(2))
  np.testing.assert_array_equal(out.lengths_B, [MAX_NEW, MAX_NEW])


def test_bad_arguments(model, prompts):
  bare = models.Transformer(models.get_config('tiny', num_layers=1, mtp_depth=0, medusa_heads=0),
                            rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='Medusa heads'):
    spec.speculative_generate(bare, *prompts, drafter='medusa', max_new_tokens=4)
  with pytest.raises(ValueError, match='MTP modules'):
    spec.speculative_generate(bare, *prompts, drafter='mtp', max_new_tokens=4)
  with pytest.raises(ValueError, match='draft_model'):
    spec.speculative_generate(model, *prompts, drafter='model', max_new_tokens=4)
  with pytest.raises(ValueError, match='branch off'):
    spec.speculative_generate(model, *prompts, drafter='mtp', tree=[[0], [1], [1, 0]],
                              max_new_tokens=4)
  with pytest.raises(ValueError, match='depth 3'):
    spec.speculative_generate(model, *prompts, drafter='medusa', tree=trees.chain(3),
                              max_new_tokens=4)
  with pytest.raises(ValueError, match='cache_len'):
    spec.speculative_generate(model, *prompts, drafter='medusa', max_new_tokens=4, cache_len=12)
  with pytest.raises(ValueError, match='drafter'):
    spec.speculative_generate(model, *prompts, drafter='nope', max_new_tokens=4)
  with pytest.raises(ValueError, match='acceptance'):
    spec.speculative_generate(model, *prompts, acceptance='maybe', max_new_tokens=4)
  other_vocab = models.Transformer(models.get_config('tiny', num_layers=1, vocab_size=100),
                                   rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='vocab_size'):
    spec.speculative_generate(model, *prompts, drafter='model', draft_model=other_vocab,
                              tree='chain2', max_new_tokens=4)


# --- Sampling arguments: exact by default, no silent greedy mix, tau without a verify step --------

def _exact_law(model, prompt_T, num_tokens, temperature, top_k):
  """{(x_1..x_n): P} of the target's first n sampled tokens after `prompt_T`, by enumeration:
  level by level, one full forward (one compiled shape) of every prefix in the support."""
  from jax_spec.decoding import sampling   # pylint: disable=g-import-not-at-top
  width, rows = len(prompt_T) + num_tokens - 1, top_k ** (num_tokens - 1)
  probs_fn = jax.jit(lambda t: sampling.target_probs(model(t).logits_BTV, temperature=temperature,
                                                     top_k=top_k))
  law = {(): 1.0}
  for level in range(num_tokens):
    prefixes = list(law)
    tokens = np.zeros((rows, width), np.int32)       # causal: the padding after a prefix is unseen
    for i, p in enumerate(prefixes):
      tokens[i, :len(prompt_T) + level] = list(prompt_T) + list(p)
    probs = np.asarray(probs_fn(jnp.asarray(tokens))[:, len(prompt_T) + level - 1], np.float64)
    law = {p + (int(x),): law[p] * probs[i, x] for i, p in enumerate(prefixes)
           for x in np.flatnonzero(probs[i])}
  return law


def _greedy_after_first_law(law):
  """The law of 'sample the first token, then decode greedily' (the old temperature > 0 default)."""
  wrong = {}
  for first in {seq[0] for seq in law}:
    path = (first,)
    while len(path) < len(next(iter(law))):
      marginal = collections.Counter()
      for seq, prob in law.items():
        if seq[:len(path)] == path:
          marginal[seq[len(path)]] += prob
      path += (max(marginal, key=marginal.get),)
    wrong[path] = sum(prob for seq, prob in law.items() if seq[0] == first)
  return wrong


def _tv_to(law, samples_NK):
  counts = collections.Counter(map(tuple, np.asarray(samples_NK).tolist()))
  keys = set(law) | set(counts)
  return 0.5 * sum(abs(law.get(k, 0.0) - counts.get(k, 0) / len(samples_NK)) for k in keys)


LAW_SAMPLES = 2000
LAW_TV_BOUND = 0.1      # expected TV of 2000 samples over the 27 cells here is ~0.04


def _check_law(model, generate_fn, *, temperature=1.0, top_k=3, num_tokens=3):
  """The first `num_tokens` sampled tokens of `generate_fn(prompts, lengths)` (2000 rows, one
  prompt) follow the target's exact law; the bound is one that the old greedy-after-the-first-
  token mix fails by far."""
  prompt = [5, 17, 200, 3]
  law = _exact_law(model, prompt, num_tokens, temperature, top_k)
  wrong = _greedy_after_first_law(law)
  keys = set(law) | set(wrong)
  assert 0.5 * sum(abs(law.get(k, 0) - wrong.get(k, 0)) for k in keys) > 3 * LAW_TV_BOUND
  out = generate_fn(jnp.tile(jnp.asarray(prompt, jnp.int32), (LAW_SAMPLES, 1)),
                    jnp.full((LAW_SAMPLES,), len(prompt), jnp.int32))
  assert _tv_to(law, out.tokens_BN[:, :num_tokens]) < LAW_TV_BOUND
  return out


def test_temperature_defaults_to_exact_rejection_sampling(model):
  """No `acceptance` at temperature > 0: distributed as the target (a noisy draft model, so drafts
  are both accepted and rejected)."""
  out = _check_law(model, lambda p, n: spec.speculative_generate(
      model, p, n, drafter='model', draft_model=_noisy_copy(model, 0.1, 0), tree=trees.chain(2),
      temperature=1.0, top_k=3, max_new_tokens=3, rng=jax.random.key(0)))
  assert 1.2 < spec.summarize(out.stats)['mean_accepted_length'] < 2.9


def test_greedy_acceptance_with_temperature_is_an_error(model, prompts):
  with pytest.raises(ValueError, match=r"acceptance='greedy' needs temperature=0.*temperature=0\.7"):
    spec.speculative_generate(model, *prompts, drafter='medusa', acceptance='greedy',
                              temperature=0.7, rng=jax.random.key(0), max_new_tokens=4)


def test_tau_without_a_verify_step(model, prompts, baseline):
  one = spec.speculative_generate(model, *prompts, drafter='medusa', max_new_tokens=1)
  np.testing.assert_array_equal(one.tokens_BN, baseline.tokens_BN[:, :1])
  s = spec.summarize(one.stats)
  assert s['verify_steps'] == 0 and s['mean_accepted_length'] == 1.0, s
  # EOS as the first token (same shapes as test_batch_one_and_no_retrace: no new compile).
  tokens, lengths = prompts
  first = int(baseline.tokens_BN[1, 0])
  out = spec.speculative_generate(model, tokens[1:, :4], lengths[1:], drafter='medusa',
                                  tree='chain', max_new_tokens=MAX_NEW, eos_id=first)
  np.testing.assert_array_equal(out.lengths_B, [1])
  s = spec.summarize(out.stats)
  assert s['verify_steps'] == 0 and s['mean_accepted_length'] == 1.0, s


# --- Dynamic trees (EAGLE-2) -------------------------------------------------------------------------

def _contrary_copy(model):
  """A draft model whose logits are exactly minus the target's (final-norm scale negated): its
  top-k never holds the target's argmax, so nothing is ever accepted."""
  graphdef, state = nnx.split(model)
  contrary = nnx.merge(graphdef, jax.tree.map(jnp.array, state))    # new arrays, not shared
  contrary.final_norm.scale[...] = -model.final_norm.scale[...]
  return contrary


@pytest.fixture(scope='module')
def ragged():
  """Prompt lengths 1 / 5 / 17 and their greedy continuations (11 = not a multiple of depth 3)."""
  return (jax.random.randint(jax.random.key(2), (3, 17), 0, 259).astype(jnp.int32),
          jnp.array([1, 5, 17], jnp.int32))


DYNAMIC_NEW = 11


@pytest.mark.parametrize('drafter, tree', [
    ('medusa', 'dynamic:5:3'),
    pytest.param('mtp', 'dynamic:4:2', marks=pytest.mark.slow),   # suite time; same loop as medusa
])
def test_dynamic_tree_heads_greedy_identical_to_generate(model, ragged, drafter, tree):
  ref = generate_lib.generate(model, *ragged, max_new_tokens=DYNAMIC_NEW)
  out = spec.speculative_generate(model, *ragged, drafter=drafter, tree=tree,
                                  max_new_tokens=DYNAMIC_NEW)
  np.testing.assert_array_equal(out.tokens_BN, ref.tokens_BN)
  np.testing.assert_array_equal(out.lengths_B, ref.lengths_B)
  _check_stats(out, trees.chain(2))


def test_dynamic_tree_draft_model_greedy_identical_to_generate(model, ragged):
  # Depth 2 keeping all 2 + 4 candidates: the argmax path is always in the tree.
  tree = dynamic_tree.DynamicTree(num_draft_nodes=6, branching=2, depth=2)
  ref = generate_lib.generate(model, *ragged, max_new_tokens=DYNAMIC_NEW)
  noisy = spec.speculative_generate(model, *ragged, drafter='model',
                                    draft_model=_noisy_copy(model, 0.1, 0), tree=tree,
                                    max_new_tokens=DYNAMIC_NEW)
  np.testing.assert_array_equal(noisy.tokens_BN, ref.tokens_BN)
  np.testing.assert_array_equal(noisy.lengths_B, ref.lengths_B)
  hist = np.asarray(noisy.stats.accepted_hist_I)
  assert hist[0] > 0 and hist[1] > 0 and hist[2] > 0, hist        # partial and full acceptances
  _check_stats(noisy, trees.chain(2))
  contrary, eos = _contrary_copy(model), int(ref.tokens_BN[2, 5])
  with runtime.count_compiles() as compiles:     # one program for every draft model of this shape
    # Always agreeing (the model drafts for itself): its argmax path is accepted whole.
    agree = spec.speculative_generate(model, *ragged, drafter='model', draft_model=model,
                                      tree=tree, max_new_tokens=DYNAMIC_NEW)
    # Never agreeing (minus the target's logits): nothing accepted, tau = 1, output still exact.
    never = spec.speculative_generate(model, *ragged, drafter='model', draft_model=contrary,
                                      tree=tree, max_new_tokens=DYNAMIC_NEW)
    # EOS inside an accepted chunk: rows stop at their first EOS, like generate.
    eos_out = spec.speculative_generate(model, *ragged, drafter='model', draft_model=model,
                                        tree=tree, max_new_tokens=DYNAMIC_NEW, eos_id=eos)
  assert compiles[0] == 0
  for out in (agree, never):
    np.testing.assert_array_equal(out.tokens_BN, ref.tokens_BN)
  assert spec.summarize(never.stats)['mean_accepted_length'] == 1.0
  assert spec.summarize(agree.stats)['mean_accepted_length'] == 3.0
  np.testing.assert_array_equal(agree.stats.verify_steps_B, [4, 4, 4])   # ceil(10 / 3)
  ref_eos = generate_lib.generate(model, *ragged, max_new_tokens=DYNAMIC_NEW, eos_id=eos)
  np.testing.assert_array_equal(eos_out.tokens_BN, ref_eos.tokens_BN)
  np.testing.assert_array_equal(eos_out.lengths_B, ref_eos.lengths_B)
  assert int(eos_out.lengths_B[2]) <= 6
  one = spec.speculative_generate(model, *ragged, drafter='model', draft_model=model, tree=tree,
                                  max_new_tokens=1)
  np.testing.assert_array_equal(one.tokens_BN, ref.tokens_BN[:, :1])


def test_dynamic_tree_rejection_sampling_is_exact(model):
  """Deterministic top-k proposals of a dynamic tree, q one-hot (SpecInfer's multi-draft rule)."""
  out = _check_law(model, lambda p, n: spec.speculative_generate(
      model, p, n, drafter='model', draft_model=_noisy_copy(model, 0.1, 0),
      tree=dynamic_tree.DynamicTree(4, 2, 2), temperature=1.0, top_k=3, max_new_tokens=3,
      rng=jax.random.key(1)))
  assert spec.summarize(out.stats)['mean_accepted_length'] > 1.2
