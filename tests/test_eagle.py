"""EAGLE-style feature drafter (and MTP module 1 reused recursively): config, cache vs offline."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import models as M
from jax_spec.decoding.trees import Tree
from jax_spec.models import eagle

CFG = M.get_config('tiny', num_layers=1, d_model=32, d_ff=64, vocab_size=31, mtp_depth=1,
                   medusa_heads=0, eagle_layers=2, init_std=0.1)


SEQ_LEN = 16   # offline sequences are right-padded to this (causal: padding changes nothing)


@pytest.fixture(scope='module')
def model():
  return M.Transformer(CFG, rngs=nnx.Rngs(3))


def _jit(model, fn, **static):
  """`fn(model, *args, **static)` jitted (eager dispatch of every op is slow)."""
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda st, *args: fn(nnx.merge(graphdef, st), *args, **static))
  return lambda *args: jitted(state, *args)


def _offline(model, tokens, positions, segment_ids, *, steps, kind):
  hidden = model(tokens, positions_BT=positions, segment_ids_BT=segment_ids).hidden_BTD
  return eagle.unroll(model, hidden, tokens, steps=steps, kind=kind, positions_BT=positions,
                      segment_ids_BT=segment_ids).logits_JBTV


@pytest.fixture(scope='module')
def fns(model):
  return dict(prefill=_jit(model, M.prefill), hidden=_jit(model, lambda m, t: m(t).hidden_BTD),
              **{f'offline_{k}': _jit(model, _offline, steps=4, kind=k) for k in ('eagle', 'mtp')},
              **{f'draft_{k}': _jit(model, eagle.feature_draft, depth=4, kind=k)
                 for k in ('eagle', 'mtp')})


def _num_params(cfg):
  abstract = nnx.eval_shape(lambda: M.Transformer(cfg, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_config_and_param_count():
  for layers in (1, 2):
    cfg = CFG.replace(eagle_layers=layers)
    counts = M.param_count(cfg)
    assert _num_params(cfg) == counts['total']
    assert counts['eagle'] == M.param_count(cfg.replace(mtp_depth=1, eagle_layers=0))['mtp'] + (
        layers - 1) * (counts['mtp'] - 2 * 32 - 2 * 32 * 32)
  assert M.param_count(M.get_config('tiny'))['eagle'] == 0
  # A narrower EAGLE MLP: the closed form follows, and only the EAGLE blocks shrink.
  narrow = CFG.replace(eagle_layers=2, eagle_d_ff=16)
  assert _num_params(narrow) == M.param_count(narrow)['total']
  assert (M.param_count(CFG.replace(eagle_layers=2))['eagle'] - M.param_count(narrow)['eagle']
          == 2 * 3 * 32 * (CFG.d_ff - 16))
  assert M.param_count(narrow)['trunk'] == M.param_count(CFG)['trunk']
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match='eagle_d_ff'):
      CFG.replace(eagle_d_ff=bad)
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match='eagle_layers'):
      CFG.replace(eagle_layers=bad)
  no_eagle = M.Transformer(CFG.replace(eagle_layers=0), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='eagle_layers'):
    eagle.init_feature_cache(no_eagle, 1, 8)
  with pytest.raises(ValueError, match='kind'):
    eagle.drafter_module(no_eagle, 'medusa')
  with pytest.raises(ValueError, match='steps'):
    eagle.unroll(no_eagle, jnp.zeros((1, 4, 32)), jnp.zeros((1, 4), jnp.int32), steps=0,
                 kind='mtp')


def _offline_logits(fns, kind, seq, start):
  """Unrolled full-sequence forward on one row `seq`: logits of steps 1..4 at chain `start`."""
  tokens = jnp.asarray([list(seq) + [0] * (SEQ_LEN - len(seq))], jnp.int32)
  positions = jnp.arange(SEQ_LEN, dtype=jnp.int32)[None]
  return np.asarray(fns[f'offline_{kind}'](tokens, positions, jnp.ones_like(tokens))[:, 0, start])


@pytest.mark.parametrize('kind', ['eagle', 'mtp'])
def test_cached_chain_draft_equals_offline_unroll(model, fns, kind):
  """Prefill (ragged), draft a chain, accept a few tokens, draft again: every draft's logits are
  those of the offline unrolled forward on the same tokens (the drafts themselves past the root)."""
  depth, lengths, draft_fn = 4, [3, 7], fns[f'draft_{kind}']
  rng = np.random.default_rng(0)
  seqs = rng.integers(1, CFG.vocab_size, size=(2, 16))
  prompts = jnp.asarray(seqs[:, :max(lengths)], jnp.int32)
  cache = M.init_cache(model, 2, 32)
  outs, cache = fns['prefill'](prompts, jnp.asarray(lengths), cache)
  fcache = eagle.init_feature_cache(model, 2, 32, kind=kind)
  roots = jnp.asarray(seqs[np.arange(2), lengths], jnp.int32)
  draft, fcache = draft_fn(fcache, outs.hidden_BTD, prompts, jnp.asarray(lengths), roots)
  np.testing.assert_array_equal(fcache.lengths, lengths)
  for b, n in enumerate(lengths):
    seq = list(seqs[b, :n + 1]) + list(np.asarray(draft.tokens_BJ[b, :-1]))
    want = _offline_logits(fns, kind, seq, n - 1)
    np.testing.assert_allclose(draft.logits_BJV[b], want, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(draft.tokens_BJ[b], want.argmax(-1))

  # A verify step accepted (root + 2) and (root + 0) tokens of the data sequence.
  accepted = [3, 1]
  hidden = fns['hidden'](jnp.asarray(seqs, jnp.int32))
  # Padded to the prompt width: one compile of `feature_draft`.
  idx = np.minimum(np.asarray(lengths)[:, None] + np.arange(max(lengths)), seqs.shape[1] - 1)
  new_hidden = jnp.take_along_axis(hidden, jnp.asarray(idx)[:, :, None], axis=1)
  new_tokens = jnp.asarray(np.take_along_axis(seqs, idx, axis=1), jnp.int32)
  nxt = jnp.asarray(seqs[np.arange(2), np.add(lengths, accepted)], jnp.int32)
  draft, fcache = draft_fn(fcache, new_hidden, new_tokens, jnp.asarray(accepted), nxt)
  for b, n in enumerate(np.add(lengths, accepted)):
    seq = list(seqs[b, :n + 1]) + list(np.asarray(draft.tokens_BJ[b, :-1]))
    np.testing.assert_allclose(draft.logits_BJV[b], _offline_logits(fns, kind, seq, n - 1),
                               atol=2e-5, rtol=1e-5)


def test_cached_tree_draft_equals_offline_unroll(model, fns):
  tree = Tree.from_choices([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [1, 0, 0]])
  seq = list(np.random.default_rng(1).integers(1, CFG.vocab_size, size=6))
  n = 5
  prompts = jnp.asarray([seq[:n]], jnp.int32)
  cache = M.init_cache(model, 1, 32)
  outs, _ = fns['prefill'](prompts, jnp.asarray([n]), cache)

  def draft_tree(m, fcache, *args):
    root_logits, fcache = eagle.feature_update(m, fcache, *args)
    return eagle.feature_tree_draft(m, fcache, root_logits, tree)

  tokens, logits = _jit(model, draft_tree)(eagle.init_feature_cache(model, 1, 32),
                                              outs.hidden_BTD, prompts, jnp.asarray([n]),
                                              jnp.asarray([seq[n]]))
  tokens, logits = np.asarray(tokens[0]), np.asarray(logits[0])
  assert len(set(tokens[[1, 2]])) == 2   # ranks 0 and 1 of the root's distribution
  for t in range(tree.num_nodes):
    path, s = [], t
    while s > 0:
      path.insert(0, tokens[s])
      s = tree.parent_T[s]
    d = tree.depth_T[t]
    if d < tree.max_depth:   # leaves have no children to draft: their logits are left 0
      want = _offline_logits(fns, 'eagle', seq + path, n - 1)
      np.testing.assert_allclose(logits[t], want[d], atol=2e-5, rtol=1e-5)
    if t:
      parent = logits[tree.parent_T[t]]
      assert tokens[t] == np.argsort(-parent, kind='stable')[tree.rank_T[t]]


def test_unroll_respects_documents(fns):
  """Packed rows: a chain's steps see only its own document."""
  rng = np.random.default_rng(2)
  a, b = rng.integers(1, CFG.vocab_size, size=7), rng.integers(1, CFG.vocab_size, size=9)
  packed = jnp.asarray([np.concatenate([a, b])], jnp.int32)
  seg = jnp.asarray([[1] * 7 + [2] * 9])
  pos = jnp.asarray([list(range(7)) + list(range(9))])
  out = fns['offline_eagle'](packed, pos, seg)
  # Chain starts of document b whose 4 steps read only b's tokens (i + 4 < len(b)).
  alone = _offline_logits(fns, 'eagle', b, slice(0, 5))
  np.testing.assert_allclose(out[:, 0, 7:12], alone, atol=2e-5)
