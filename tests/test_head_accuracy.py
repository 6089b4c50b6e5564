"""Draft-head accuracies (jax_spec.evaluation.head_accuracy) against a direct count."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models
from jax_spec.evaluation import head_accuracy


@pytest.fixture(scope='module')
def model():
  config = models.get_config('tiny', num_layers=1, mtp_depth=2, medusa_heads=3, vocab_size=37)
  return models.Transformer(config, rngs=nnx.Rngs(1))


@pytest.mark.parametrize('drafter, heads', [('mtp', 2), ('medusa', 3)])
def test_head_targets_are_the_tokens_k_plus_1_ahead_within_a_document(model, drafter, heads):
  rng = np.random.default_rng(0)
  batch, seq_len = 2, 11
  tokens = rng.integers(0, 37, (batch, seq_len)).astype(np.int32)
  segments = np.ones_like(tokens)
  segments[0, 6:] = 2   # a second document in row 0
  segments[1, 9:] = 0   # padding at the end of row 1
  graphdef, state = nnx.split(model)
  # Jitted: an eager forward dispatches (and compiles) op by op, several times slower here.
  fn = jax.jit(lambda st, t, s: head_accuracy.head_logits_and_targets(
      nnx.merge(graphdef, st), t, s, drafter))
  logits, targets, valid = fn(state, jnp.asarray(tokens), jnp.asarray(segments))
  chex.assert_shape(logits, (heads, batch * seq_len, 37))
  targets, valid = np.asarray(targets), np.asarray(valid)
  chex.assert_shape((targets, valid), (heads, batch * seq_len))
  for k in range(1, heads + 1):   # head k at position i predicts t_{i+k+1}
    for b in range(batch):
      for i in range(seq_len):
        n = b * seq_len + i
        j = i + k + 1
        ok = j < seq_len and segments[b, i] != 0 and segments[b, j] == segments[b, i]
        assert bool(valid[k - 1, n]) == ok, (k, b, i)
        if ok:
          assert int(targets[k - 1, n]) == tokens[b, j]
  with pytest.raises(ValueError, match='drafter must be one of'):
    head_accuracy.head_logits_and_targets(model, jnp.asarray(tokens), jnp.asarray(segments),
                                          'model')
