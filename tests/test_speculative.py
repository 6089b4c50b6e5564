"""speculative_generate: greedy identical to generate for every drafter, chain and tree; stats;
partial acceptance and cache commit; EOS; rejection sampling end to end; no retracing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models
from jax_spec import runtime
from jax_spec.decoding import autoregressive as generate_lib
from jax_spec.decoding import speculative as spec
from jax_spec.decoding import trees

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
  hist = np.asarray(out.stats.accepted_hist_A)
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
  hist = np.asarray(noisy.stats.accepted_hist_A)
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
    spec.speculative_generate(model, *prompts, drafter='eagle', max_new_tokens=4)
  with pytest.raises(ValueError, match='acceptance'):
    spec.speculative_generate(model, *prompts, acceptance='maybe', max_new_tokens=4)
  other_vocab = models.Transformer(models.get_config('tiny', num_layers=1, vocab_size=100),
                                   rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='vocab_size'):
    spec.speculative_generate(model, *prompts, drafter='model', draft_model=other_vocab,
                              tree='chain2', max_new_tokens=4)


# --- experiments.speculative ----------------------------------------------------------------------

def test_experiment_rejects_missing_runs(tmp_path):
  from experiments import speculative as experiment
  with pytest.raises(ValueError, match='not a directory'):
    experiment.load_run(str(tmp_path / 'nope'), 'workdir')
  with pytest.raises(ValueError, match='train_config.json'):
    experiment.load_run(str(tmp_path), 'workdir')


@pytest.mark.slow
def test_experiment_end_to_end(tmp_path):
  """Trains a tiny run for a few steps, then runs the experiment on it (minutes on a CPU)."""
  import json
  import subprocess
  import sys
  run = tmp_path / 'run'
  subprocess.run([sys.executable, '-m', 'experiments.train', f'--workdir={run}', '--config=tiny',
                  '--steps=4', '--batch_size=4', '--seq_len=64', '--eval_every=4',
                  '--checkpoint_every=4', '--progress=false'], check=True)
  out = tmp_path / 'out'
  for draft, tree in (('mtp', 'derived'), ('medusa', 'default')):
    subprocess.run([sys.executable, '-m', 'experiments.speculative', f'--workdir={run}',
                    f'--draft={draft}', f'--tree={tree}', '--tree_nodes=4', '--derive_batches=1',
                    '--num_prompts=2', '--prompt_len=8', '--max_new_tokens=12', f'--output={out}'],
                   check=True)
    results = json.loads((out / 'results.json').read_text())
    assert results['outputs_identical'] is True
    assert results['speculative']['mean_accepted_length'] >= 1
    assert (out / 'accepted_length_hist.png').exists() and (out / 'acceptance_per_depth.png').exists()
  bad = subprocess.run([sys.executable, '-m', 'experiments.speculative', f'--workdir={run}',
                        '--draft=model', '--num_prompts=1'], capture_output=True, text=True)
  assert bad.returncode != 0 and 'draft_workdir' in bad.stderr
