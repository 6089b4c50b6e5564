"""The EAGLE and recursive-MTP drafters in `speculative_generate`: greedy output identical to
`generate` (never / always / partly agreeing drafters, ragged prompts, EOS inside an accepted chunk,
max_new_tokens 1 and not a multiple of the depth, chain, static and dynamic trees); rejection
sampling (chain, static and dynamic tree) emits the target's exact law."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models
from jax_spec.decoding import autoregressive as generate_lib
from jax_spec.decoding import speculative as spec
from jax_spec.decoding import dynamic_tree, trees
from jax_spec.models import eagle as eagle_lib

CFG = models.get_config('tiny', num_layers=1, mtp_depth=1, medusa_heads=0, eagle_layers=1,
                        init_std=0.2, tie_embeddings=False)
DEPTH, MAX_NEW = 3, 8


def _agreeing(model):
  """Trunk blocks and EAGLE block zeroed, EAGLE combine = the embedding half: the trunk is a bigram
  model with hidden_{i+1} = final_norm(Emb(t_{i+1})), which is exactly what the EAGLE module and
  MTP module 1 then predict, so every draft is accepted."""
  graphdef, state = nnx.split(model)
  d = CFG.d_model
  flat = dict(nnx.to_flat_state(state))

  def set_(path, value):
    flat[path] = flat[path].replace(value)

  for path, var in list(flat.items()):
    name = '/'.join(map(str, path))
    if name.endswith(('attn/out/kernel', 'mlp/down/kernel')):
      set_(path, jnp.zeros_like(var[...]))
  for prefix in (('eagle',), ('mtp', 0)):
    set_(prefix + ('proj', 'kernel'), jnp.concatenate([jnp.zeros((d, d)), jnp.eye(d)]))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _noisy(model, scale, seed):
  """Drafter parameters perturbed: partial agreement."""
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  key = jax.random.key(seed)
  for i, (path, var) in enumerate(sorted(flat.items())):
    if path[0] in ('eagle', 'mtp') and var[...].ndim > 1:
      x = var[...]
      flat[path] = var.replace(x + scale * jax.random.normal(jax.random.fold_in(key, i), x.shape))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope='module')
def models_():
  random = models.Transformer(CFG, rngs=nnx.Rngs(0))
  agreeing = _agreeing(random)
  return {'never': random, 'always': agreeing, 'partly': _noisy(agreeing, 0.01, 1)}


@pytest.fixture(scope='module')
def prompts():
  lengths = np.array([1, 5, 17], np.int32)
  tokens = np.random.default_rng(0).integers(1, CFG.vocab_size, size=(3, 17)).astype(np.int32)
  tokens[np.arange(17)[None] >= lengths[:, None]] = 0
  return jnp.asarray(tokens), jnp.asarray(lengths)


def _tau(out):
  return spec.summarize(out.stats, out.lengths_B)['mean_accepted_length']


def test_greedy_chain_identical_to_generate(models_, prompts):
  taus = {}
  for name, model in models_.items():
    base = generate_lib.generate(model, *prompts, max_new_tokens=MAX_NEW)
    out = spec.speculative_generate(model, *prompts, drafter='eagle', tree=trees.chain(DEPTH),
                                    max_new_tokens=MAX_NEW)
    np.testing.assert_array_equal(out.tokens_BN, base.tokens_BN, err_msg=name)
    np.testing.assert_array_equal(out.lengths_B, base.lengths_B, err_msg=name)
    taus[name] = _tau(out)
  assert taus['never'] < 1.3 and taus['always'] == DEPTH + 1, taus
  assert 1.3 < taus['partly'] < DEPTH + 1, taus

  # EOS inside an accepted chunk: the 3rd token of row 1 (emitted by the first verify step).
  model = models_['always']
  base = generate_lib.generate(model, *prompts, max_new_tokens=MAX_NEW)
  eos = int(base.tokens_BN[1, 2])
  base = generate_lib.generate(model, *prompts, max_new_tokens=MAX_NEW, eos_id=eos)
  out = spec.speculative_generate(model, *prompts, drafter='eagle', tree=trees.chain(DEPTH),
                                  max_new_tokens=MAX_NEW, eos_id=eos)
  assert int(base.lengths_B[1]) == 3
  np.testing.assert_array_equal(out.tokens_BN, base.tokens_BN)
  np.testing.assert_array_equal(out.lengths_B, base.lengths_B)


@pytest.mark.parametrize('drafter, tree, max_new', [
    ('eagle', [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], MAX_NEW),   # static tree
    ('eagle', 'dynamic:6:2', MAX_NEW),                 # EAGLE-2 dynamic tree, depth 4
    ('mtp_recursive', trees.chain(DEPTH), MAX_NEW),    # MTP module 1 drafting past mtp_depth = 1
    # No verify step at all (the loop's early exit, drafter-agnostic): slow for suite time.
    pytest.param('eagle', trees.chain(DEPTH), 1, marks=pytest.mark.slow),
])
def test_greedy_identical_to_generate(models_, prompts, drafter, tree, max_new):
  for name in ('always', 'partly'):
    model = models_[name]
    base = generate_lib.generate(model, *prompts, max_new_tokens=max_new)
    out = spec.speculative_generate(model, *prompts, drafter=drafter, tree=tree,
                                    max_new_tokens=max_new)
    np.testing.assert_array_equal(out.tokens_BN, base.tokens_BN, err_msg=name)
    np.testing.assert_array_equal(out.lengths_B, base.lengths_B, err_msg=name)
    if name == 'always' and max_new > 1:
      assert _tau(out) > 3.0


@pytest.mark.slow   # suite time: a smoke test (typical acceptance is not lossless)
def test_typical_acceptance_with_a_static_tree(models_, prompts):
  """Typical acceptance (not lossless) runs on the EAGLE tree: every emitted token is a real
  token, rows end at max_new_tokens, and the agreeing drafter's drafts are accepted."""
  out = spec.speculative_generate(models_['always'], *prompts, drafter='eagle',
                                  tree=[[0], [1], [0, 0], [0, 0, 0]], acceptance='typical',
                                  temperature=0.7, max_new_tokens=MAX_NEW, rng=jax.random.key(0))
  np.testing.assert_array_equal(out.lengths_B, MAX_NEW)
  assert np.all((np.asarray(out.tokens_BN) >= 0) & (np.asarray(out.tokens_BN) < CFG.vocab_size))
  assert _tau(out) > 2.0


def test_default_depth_follows_an_explicit_tree(models_):
  cls = spec.drafters_lib.registered()['eagle']
  assert cls.default_depth(models_['never'], None, 'chain') == 4
  assert cls.default_depth(models_['never'], None, [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0],
                                                    [0, 0, 0, 0, 0], [1]]) == 5
  assert cls.default_depth(models_['never'], None, trees.chain(7)) == 7
  assert cls.default_depth(models_['never'], None, dynamic_tree.DynamicTree(4, 2, 6)) == 6


def test_drafter_errors(models_, prompts):
  no_eagle = models.Transformer(CFG.replace(eagle_layers=0, mtp_depth=0), rngs=nnx.Rngs(0))
  for drafter, match in (('eagle', 'eagle_layers'), ('mtp_recursive', 'mtp_depth')):
    with pytest.raises(ValueError, match=match):
      spec.speculative_generate(no_eagle, *prompts, drafter=drafter, max_new_tokens=4)


# ------------------------------------------------------------------------------------------------
# Rejection sampling is lossless: the emitted law of (x0, x1, x2) is the target's, enumerated
# ------------------------------------------------------------------------------------------------

VOCAB, SAMPLES = 5, 6000
SMALL = CFG.replace(vocab_size=VOCAB, init_std=0.5)


@functools.partial(jax.jit, static_argnums=0)
def _probs(graphdef, state, tokens):
  model = nnx.merge(graphdef, state)
  outs = model(tokens)
  q = jax.nn.softmax(eagle_lib.unroll(model, outs.hidden_BTD, tokens, steps=2).logits_JBTV, -1)
  return jax.nn.softmax(outs.logits_BTV, -1), q


def _exact_laws(model, prompt):
  """Target law p(x0, x1, x2 | prompt) and the law of a sampler that accepts every EAGLE draft,
  p(x0) q1(x1 | x0) q2(x2 | x0, x1), both enumerated [V, V, V]."""
  seqs = np.array([list(prompt) + [a, b] for a, b in itertools.product(range(VOCAB), repeat=2)])
  p, q = _probs(*nnx.split(model), jnp.asarray(seqs, jnp.int32))
  p = np.asarray(p, np.float64).reshape(VOCAB, VOCAB, -1, VOCAB)
  q = np.asarray(q, np.float64).reshape(2, VOCAB, VOCAB, -1, VOCAB)
  n = len(prompt)
  p0 = p[0, 0, n - 1]                               # [x0]
  p1 = p[:, 0, n]                                   # [x0, x1]
  p2 = p[:, :, n + 1]                               # [x0, x1, x2]
  target = p0[:, None, None] * p1[:, :, None] * p2
  q1, q2 = q[0, :, 0, n - 1], q[1, :, :, n - 1]     # steps 1 and 2 of the chain started at n - 1
  wrong = p0[:, None, None] * q1[:, :, None] * q2
  return target, wrong


@pytest.fixture(scope='module')
def laws():
  model = models.Transformer(SMALL, rngs=nnx.Rngs(5))
  return model, _exact_laws(model, [1, 3])


@pytest.mark.parametrize('tree', [
    trees.chain(2),
    pytest.param([[0], [1], [0, 0]], marks=pytest.mark.slow),   # suite time: the dynamic tree's
    dynamic_tree.DynamicTree(num_draft_nodes=4, branching=2, depth=2),   # top-k rule is the same
])
def test_rejection_sampling_emits_the_target_law(laws, tree):
  model, (target, wrong) = laws
  prompt = [1, 3]
  prompts = jnp.asarray(np.tile(prompt, (SAMPLES, 1)), jnp.int32)
  out = spec.speculative_generate(model, prompts, jnp.full((SAMPLES,), 2, jnp.int32),
                                  drafter='eagle', tree=tree, acceptance='rejection',
                                  temperature=1.0, max_new_tokens=3, rng=jax.random.key(7))
  x = np.asarray(out.tokens_BN)
  assert np.all(np.asarray(out.lengths_B) == 3)
  emp = np.zeros((VOCAB,) * 3)
  np.add.at(emp, (x[:, 0], x[:, 1], x[:, 2]), 1.0 / SAMPLES)
  # Bound: 2x the expected TV distance of SAMPLES exact draws (about its mean + 6 std devs).
  bound = 2 * 0.5 * np.sum(np.sqrt(2 * target * (1 - target) / (np.pi * SAMPLES)))
  tv = 0.5 * np.abs(emp - target).sum()
  assert tv < bound, (tv, bound)
  assert 0.5 * np.abs(wrong - target).sum() > 2 * bound    # a sampler that ignores p fails
  # Drafts were accepted, so the rule (not only the bonus token) produced the law.
  assert spec.summarize(out.stats)['mean_accepted_length'] > 1.2
