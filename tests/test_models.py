"""Config validation, parameter counts, packed-sequence semantics, MTP/Medusa heads, losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models as M
from jax_spec.models.layers import positions_from_segments

CFG = M.get_config('tiny', num_layers=1, d_model=32, d_ff=64, vocab_size=31, mtp_depth=2,
                   medusa_heads=2)


@pytest.fixture(scope='module')
def model_fn():
  model = M.Transformer(CFG, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, tokens, segment_ids):
    return nnx.merge(graphdef, state)(tokens, segment_ids_BT=segment_ids)

  return model, state, forward


def _num_params(cfg):
  abstract = nnx.eval_shape(lambda: M.Transformer(cfg, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_param_count_matches_formula():
  # tiny by hand: V=259, d=64, 2 layers, 4 heads of 16, 2 KV heads, d_ff=192.
  block = 64 * 16 * (4 + 4 + 2 + 2) + 3 * 64 * 192 + 2 * 64
  trunk = 259 * 64 + 2 * block + 64
  mtp = 2 * (2 * 64 + 2 * 64 * 64 + block)
  medusa = 2 * (64 * 64 + 64)
  tiny = M.get_config('tiny')
  assert M.param_count(tiny) == {'trunk': trunk, 'mtp': mtp, 'medusa': medusa, 'eagle': 0,
                                 'total': trunk + mtp + medusa}
  for cfg in (tiny, CFG, tiny.replace(tie_embeddings=False, medusa_shared_head=False,
                                      medusa_num_layers=2, mtp_depth=0),
              M.get_config('small'), M.get_config('base')):
    assert _num_params(cfg) == M.param_count(cfg)['total'], cfg
  assert 90e6 < M.param_count(M.get_config('base'))['total'] < 140e6


@pytest.mark.parametrize('overrides, match', [
    (dict(num_heads=4, num_kv_heads=3), 'num_kv_heads'),
    (dict(d_model=66, num_heads=4), 'num_heads'),
    (dict(d_model=36, num_heads=4, num_kv_heads=1), 'head_dim'),
    (dict(num_layers=0), 'num_layers'),
    (dict(mtp_depth=-1), 'mtp_depth'),
    (dict(vocab_size=2.5), 'vocab_size'),
    (dict(attention_impl='cuda'), 'attention_impl'),
    (dict(no_such_field=1), 'no_such_field'),
])
def test_bad_configs_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    M.get_config('tiny', **overrides)


def test_unknown_preset_raises():
  with pytest.raises(ValueError, match='config name'):
    M.get_config('huge')
  with pytest.raises(ValueError, match='num_heads'):
    M.TransformerConfig(d_model=64, num_heads=5, num_kv_heads=1)
  assert M.get_config('small', vocab_size=1000).vocab_size == 1000


def test_positions_from_segments():
  seg = jnp.array([[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(positions_from_segments(seg),
                                [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]])


def test_packed_documents_are_independent(model_fn):
  """A packed row equals each document run alone (trunk, MTP where inputs stay inside, Medusa)."""
  _, state, forward = model_fn
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, CFG.vocab_size)
  seg = jnp.array([[1] * 7 + [2] * 5, [1] * 12])
  packed = forward(state, tokens, seg)
  doc1 = forward(state, tokens.at[1].set(tokens[0]), jnp.ones_like(seg))   # row 1 = doc 1 alone
  doc2 = jnp.concatenate([tokens[0, 7:], tokens[0, :7]])                    # doc 2 first
  alone2 = forward(state, jnp.stack([doc2, doc2]), jnp.ones_like(seg))
  tol = dict(atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(packed.logits_BTV[0, :7], doc1.logits_BTV[1, :7], **tol)
  np.testing.assert_allclose(packed.logits_BTV[0, 7:], alone2.logits_BTV[0, :5], **tol)
  np.testing.assert_allclose(packed.medusa_logits_JBTV[:, 0, 7:], alone2.medusa_logits_JBTV[:, 0, :5],
                             **tol)
  for k in (1, 2):  # module k at i reads t_{i+k}: compare where that stays inside the document
    np.testing.assert_allclose(packed.mtp_logits_JBTV[k - 1, 0, :7 - k],
                               doc1.mtp_logits_JBTV[k - 1, 1, :7 - k], **tol)
    np.testing.assert_allclose(packed.mtp_logits_JBTV[k - 1, 0, 7:12 - k],
                               alone2.mtp_logits_JBTV[k - 1, 0, :5 - k], **tol)


def test_mtp_and_trunk_are_causal(model_fn):
  _, state, forward = model_fn
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)
  seg = jnp.ones_like(tokens)
  p = 6
  base = forward(state, tokens, seg)
  changed = forward(state, tokens.at[:, p].set((tokens[:, p] + 1) % CFG.vocab_size), seg)
  np.testing.assert_allclose(base.logits_BTV[:, :p], changed.logits_BTV[:, :p], atol=1e-6)
  assert not np.allclose(base.logits_BTV[:, p], changed.logits_BTV[:, p], atol=1e-4)
  for k in (1, 2):
    np.testing.assert_allclose(base.mtp_logits_JBTV[k - 1, :, :p - k],
                               changed.mtp_logits_JBTV[k - 1, :, :p - k], atol=1e-6)
    # Position p - k reads t_p itself.
    assert not np.allclose(base.mtp_logits_JBTV[k - 1, :, p - k],
                           changed.mtp_logits_JBTV[k - 1, :, p - k], atol=1e-4)


@pytest.mark.parametrize('shared', [True, False])
def test_medusa_heads_start_as_the_trunk_head(shared):
  cfg = CFG.replace(medusa_shared_head=shared, mtp_depth=0, tie_embeddings=shared)
  model = M.Transformer(cfg, rngs=nnx.Rngs(0))
  hidden = jax.random.normal(jax.random.key(0), (1, 3, cfg.d_model))
  # Zero-initialised W: head(x) = x + SiLU(0) = x, and an own head starts as a copy of the trunk's.
  np.testing.assert_allclose(M.medusa_logits(model, hidden)[1], model.logits(hidden), atol=1e-6)


def test_medusa1_frozen_trunk_blocks_gradients():
  cfg = CFG.replace(mtp_depth=0, medusa_frozen_trunk=True)
  graphdef, params, rest = nnx.split(M.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(2), (1, 8), 0, cfg.vocab_size)

  @jax.jit
  def grads(params):
    def medusa_only(params):
      model = nnx.merge(graphdef, params, rest)
      _, metrics = M.compute_losses(model(tokens), tokens, None, cfg)
      return metrics['medusa_loss_1'] + metrics['medusa_loss_2']
    return jax.grad(medusa_only)(params)

  def total(tree):
    return sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(tree))

  g = grads(params)
  assert total(g['medusa']) > 0
  assert total(g['layers']) == 0 and total(g['embed']) == 0  # Medusa-1: the trunk gets nothing
  # Medusa-2 (joint): the head losses do reach the trunk's hidden state.
  for frozen in (True, False):
    model = M.Transformer(cfg.replace(medusa_frozen_trunk=frozen), rngs=nnx.Rngs(0))
    hidden = jax.random.normal(jax.random.key(0), (1, 2, cfg.d_model))
    dh = jax.grad(lambda h: jnp.sum(M.medusa_logits(model, h) ** 2))(hidden)
    assert (float(jnp.abs(dh).sum()) == 0) == frozen


def test_losses_match_hand_computation():
  cfg = CFG.replace(mtp_depth=1, medusa_heads=2)
  rng = np.random.default_rng(0)
  b, t, v = 2, 6, 5
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  mtp = rng.normal(size=(1, b, t, v)).astype(np.float32)
  medusa = rng.normal(size=(2, b, t, v)).astype(np.float32)
  tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
  tokens[0, 1] = logits[0, 0].argmax()  # make at least one prediction right
  seg = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]], np.int32)
  outputs = M.ModelOutputs(jnp.asarray(logits), jnp.zeros((b, t, 4)), jnp.asarray(mtp),
                           jnp.asarray(medusa))
  loss, metrics = M.compute_losses(outputs, jnp.asarray(tokens), jnp.asarray(seg), cfg,
                                   mtp_lambda=0.5, medusa_weight=0.7)

  def hand(lg, offset):
    nll, correct, count = 0.0, 0, 0
    for r in range(b):
      for i in range(t - offset):
        if seg[r, i] == 0 or seg[r, i + offset] != seg[r, i]:
          continue
        x = lg[r, i].astype(np.float64)
        logp = x - np.log(np.exp(x - x.max()).sum()) - x.max()
        nll -= logp[tokens[r, i + offset]]
        correct += int(x.argmax() == tokens[r, i + offset])
        count += 1
    return nll / count, correct / count

  main, main_acc = hand(logits, 1)
  mtp1, mtp1_acc = hand(mtp[0], 2)
  med1, med1_acc = hand(medusa[0], 2)
  med2, med2_acc = hand(medusa[1], 3)
  expected = {'main_loss': main, 'main_acc': main_acc, 'mtp_loss_1': mtp1, 'mtp_acc_1': mtp1_acc,
              'medusa_loss_1': med1, 'medusa_acc_1': med1_acc, 'medusa_loss_2': med2,
              'medusa_acc_2': med2_acc,
              'loss': main + 0.5 * mtp1 + 0.7 * med1 + 0.49 * med2}
  assert set(metrics) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, err_msg=name)
  assert main_acc > 0
  np.testing.assert_allclose(float(loss), expected['loss'], rtol=1e-5)
