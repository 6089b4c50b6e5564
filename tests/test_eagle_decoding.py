"""The EAGLE and recursive-MTP drafters in `speculative_generate`: greedy output identical to
`generate` (never / always / partly agreeing drafters, ragged prompts, EOS inside an accepted chunk,
max_new_tokens 1 and not a multiple of the depth, chain and static tree); rejection sampling
emits the target's exact law."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models
from jax_spec.decoding import autoregressive as generate_lib
from jax_spec.decoding import speculative as spec
from jax_spec.decoding import trees
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
    ('mtp_recursive', trees.chain(DEPTH), MAX_NEW),    # MTP module 1 drafting past mtp_depth = 1
    ('eagle', trees.chain(DEPTH), 1),
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


def test_drafter_errors(models_, prompts):
  no_eagle = models.Transformer(CFG.replace(eagle_layers=0, mtp_depth=0), rngs=nnx.Rngs(0))
  for drafter, match in (('eagle', 'eagle_layers'), ('mtp_recursive', 'mtp_depth')):
    with pytest.raises(ValueError, match=match):
      spec.speculative_generate(no_eagle, *prompts, drafter=drafter, max_new_tokens=4)
