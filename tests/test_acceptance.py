"""Acceptance rules: exact arithmetic on hand-made p/q, and the emitted distribution equals p."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_spec.decoding import acceptance, trees


_greedy = jax.jit(acceptance.accept_greedy, static_argnums=0)
_typical = jax.jit(acceptance.accept_typical, static_argnums=0, static_argnames=('eps', 'delta'))
_rejection = jax.jit(acceptance.accept_rejection, static_argnums=0)
_walk = jax.jit(acceptance.rejection_walk, static_argnums=0)


def _onehot_rows(tokens, vocab):
  return np.eye(vocab, dtype=np.float32)[tokens]


def test_greedy_picks_longest_matching_path():
  tree = trees.Tree.from_choices([[0], [1], [0, 0], [1, 0], [0, 0, 0]])
  # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [1,0], 5 [0,0,0]
  vocab = 6
  argmax_T = np.array([2, 3, 4, 5, 1, 0])            # target argmax after each node
  logits = _onehot_rows(argmax_T, vocab)[None] * 5.0
  tokens = np.array([[9 % vocab, 1, 2, 5, 4, 0]])    # node 2 = argmax(root): accepted; node 4 = argmax(node 2)
  acc = _greedy(tree, jnp.asarray(tokens), jnp.asarray(logits))
  assert int(acc.num_accepted_B[0]) == 2
  np.testing.assert_array_equal(acc.path_BP[0], [0, 2, 4, -1])
  assert int(acc.next_token_B[0]) == 1
  # Nothing matches -> 0 accepted, next = argmax at root.
  tokens = np.array([[0, 0, 0, 0, 0, 0]])
  acc = _greedy(tree, jnp.asarray(tokens), jnp.asarray(logits))
  assert int(acc.num_accepted_B[0]) == 0 and int(acc.next_token_B[0]) == 2
  np.testing.assert_array_equal(acc.path_BP[0], [0, -1, -1, -1])
  # Full chain through node 5 -> bonus from node 5.
  tokens = np.array([[0, 2, 0, 3, 0, 5]])
  acc = _greedy(tree, jnp.asarray(tokens), jnp.asarray(logits))
  assert int(acc.num_accepted_B[0]) == 3 and int(acc.next_token_B[0]) == 0


def test_rejection_arithmetic_chain():
  """One sampled draft x with p, q: accept iff u < p(x)/q(x); residual norm(max(0, p - q))."""
  p = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  q = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
  tree = trees.chain(1)
  tokens = jnp.array([[0, 0], [0, 0], [0, 3]])
  p_BTV = jnp.asarray(np.stack([np.stack([p, p])] * 3))
  q_BTV = jnp.asarray(np.stack([np.stack([q, q])] * 3))
  u = jnp.array([[[0.24]], [[0.26]], [[0.999]]])      # 0.1/0.4 = 0.25; token 3: min(1, 4) = 1
  num, path, next_probs = _walk(tree, u, tokens, p_BTV, q_BTV)
  np.testing.assert_array_equal(num, [1, 0, 1])
  np.testing.assert_array_equal(path, [[0, 1], [0, -1], [0, 1]])
  np.testing.assert_allclose(next_probs[0], p)                      # bonus: p at the leaf
  np.testing.assert_allclose(next_probs[1], [0, 0, 0.25, 0.75], rtol=1e-6)  # residual
  # Deterministic draft (q = one-hot of x): accept with p(x); residual zeroes x.
  num, _, next_probs = _walk(tree, jnp.array([[[0.09]], [[0.11]]]),
                                                 tokens[:2], p_BTV[:2], None)
  np.testing.assert_array_equal(num, [1, 0])
  np.testing.assert_allclose(next_probs[1], [0, 2 / 9, 3 / 9, 4 / 9], rtol=1e-6)


@pytest.mark.parametrize('depth', [1, 4])
@pytest.mark.parametrize('draft', ['deterministic', 'sampled', 'q=p'])
def test_rejection_chain_equals_the_walk(depth, draft):
  """The loop-free chain path of `accept_rejection` gives the walk's results on the same uniforms:
  every accepted count from 0 to depth, rejections with and without a zero residual."""
  batch, vocab = 400, 5
  ks = jax.random.split(jax.random.key(depth), 4)
  p_BTV = jax.nn.softmax(3 * jax.random.normal(ks[0], (batch, depth + 1, vocab)))
  q_BTV = {'deterministic': None, 'q=p': p_BTV,
           'sampled': jax.nn.softmax(3 * jax.random.normal(ks[1], (batch, depth + 1, vocab)))}[draft]
  # Half the drafts are the target's argmax (long accepted runs), half random tokens.
  likely_BJ = jnp.argmax(p_BTV[:, :depth], axis=-1)
  random_BJ = jax.random.randint(ks[2], (batch, depth), 0, vocab)
  drafts_BJ = jnp.where(jnp.arange(batch)[:, None] % 2 == 0, likely_BJ, random_BJ)
  tokens_BT = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), drafts_BJ], axis=1)
  uniform_BJ1 = jax.random.uniform(ks[3], (batch, depth, 1))
  walk = _walk(trees.chain(depth), uniform_BJ1, tokens_BT, p_BTV, q_BTV)
  chain = jax.jit(acceptance.rejection_chain)(uniform_BJ1[..., 0], tokens_BT, p_BTV, q_BTV)
  np.testing.assert_array_equal(chain[0], walk[0])
  np.testing.assert_array_equal(chain[1], walk[1])
  np.testing.assert_allclose(chain[2], walk[2], rtol=1e-6, atol=1e-7)
  counts = np.bincount(np.asarray(walk[0]), minlength=depth + 1)
  assert counts[-1] > 0 and (draft == 'q=p' or counts[0] > 0), counts


def test_rejection_arithmetic_siblings():
  """Root with children tokens (0, 2) sampled from q: residual after each rejection."""
  tree = trees.Tree.from_choices([[0], [1]])
  p = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  q = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
  p_BTV = jnp.asarray(np.broadcast_to(p, (1, 3, 4)))
  q_BTV = jnp.asarray(np.broadcast_to(q, (1, 3, 4)))
  tokens = jnp.array([[1, 0, 2]])
  r1 = np.maximum(p - q, 0) / np.maximum(p - q, 0).sum()         # [0, 0, .25, .75]
  # child 1 (token 0): 0.25 -> reject with u=0.5; child 2 (token 2): r1[2]/q[2] = 1.25 -> accept.
  num, path, next_probs = _walk(tree, jnp.array([[[0.5, 0.99]]]), tokens,
                                                    p_BTV, q_BTV)
  assert int(num[0]) == 1 and list(np.asarray(path[0])) == [0, 2]
  np.testing.assert_allclose(next_probs[0], p, rtol=1e-6)           # bonus at leaf 2
  # Deterministic siblings: token 0 accepted w.p. .1; then token 2 w.p. .3/.9; else residual.
  num, _, next_probs = _walk(tree, jnp.array([[[0.5, 0.34]]]), tokens, p_BTV, None)
  assert int(num[0]) == 0
  np.testing.assert_allclose(next_probs[0], [0, 2 / 6, 0, 4 / 6], rtol=1e-6)
  num, path, _ = _walk(tree, jnp.array([[[0.5, 0.33]]]), tokens, p_BTV, None)
  assert int(num[0]) == 1 and list(np.asarray(path[0])) == [0, 2]
  del r1


def test_typical_threshold():
  tree = trees.chain(1)
  p = np.array([0.05, 0.15, 0.8], np.float32)        # H ~ 0.613, 0.3 exp(-H) ~ 0.162 -> thr 0.09
  p_BTV = jnp.asarray(np.broadcast_to(p, (3, 2, 3)))
  tokens = jnp.array([[0, 0], [0, 1], [0, 2]])
  acc = _typical(tree, jax.random.key(0), tokens, p_BTV)
  np.testing.assert_array_equal(acc.num_accepted_B, [0, 1, 1])


@pytest.mark.parametrize('eps, delta', [(0.09, 0.3), (0.3, 0.5)])
def test_typical_accepts_exactly_above_its_threshold(eps, delta):
  """Every token x of many hand-made p: accepted iff p(x) > min(eps, delta * exp(-H(p))) (float64
  reference), over peaked and flat p so that both sides of the min decide somewhere."""
  vocab, num_p = 6, 64
  rng = np.random.default_rng(0)
  concentration = np.repeat([0.1, 0.5, 2.0, 20.0], num_p // 4)
  p_PV = np.stack([rng.dirichlet(np.full(vocab, c)) for c in concentration])
  entropy_P = -np.sum(p_PV * np.log(np.maximum(p_PV, 1e-300)), axis=1)
  threshold_P = np.minimum(eps, delta * np.exp(-entropy_P))
  assert np.any(threshold_P == eps) and np.any(threshold_P < eps)
  expected_PV = p_PV > threshold_P[:, None]
  assert 0.1 < expected_PV.mean() < 0.9
  far_PV = np.abs(p_PV - threshold_P[:, None]) > 1e-5     # float32 cannot decide exact ties
  tree = trees.chain(1)
  tokens_BT = jnp.asarray(np.stack([np.zeros(num_p * vocab), np.tile(np.arange(vocab), num_p)], 1),
                          jnp.int32)
  p_BTV = jnp.asarray(np.repeat(p_PV, vocab, axis=0)[:, None].repeat(2, axis=1), jnp.float32)
  acc = _typical(tree, jax.random.key(0), tokens_BT, p_BTV, eps=eps, delta=delta)
  accepted_PV = np.asarray(acc.num_accepted_B).reshape(num_p, vocab) == 1
  np.testing.assert_array_equal(accepted_PV[far_PV], expected_PV[far_PV])


# --- Empirical distribution of the emitted tokens -------------------------------------------------
# Toy model: vocabulary V, target conditionals P1 (first token) and P2[x1] (second token), draft
# conditionals Q1, Q2[x1]. Each batch row is one independent trial; vmapped, so thousands are cheap.

V = 5


def _tables(seed):
  rng = np.random.default_rng(seed)
  p1 = rng.dirichlet(np.ones(V))
  p2 = rng.dirichlet(np.ones(V), size=V)
  q1 = rng.dirichlet(np.ones(V))
  q2 = rng.dirichlet(np.ones(V), size=V)
  return p1, p2, q1, q2


def _tv(a, b):
  return 0.5 * np.abs(np.asarray(a) - np.asarray(b)).sum()


def _emitted(tree, res, tokens_BT):
  """First and (when a draft was accepted) second emitted token of each row."""
  num = np.asarray(res.num_accepted_B)
  path = np.asarray(res.path_BP)
  nxt = np.asarray(res.next_token_B)
  toks = np.asarray(tokens_BT)
  rows = np.arange(len(num))
  first = np.where(num >= 1, toks[rows, np.maximum(path[:, 1], 0)], nxt)
  second = np.where(num >= 2, toks[rows, np.maximum(path[:, min(2, tree.max_depth)], 0)], nxt)
  return first, second, num


N = 40_000
TV_BOUND = 0.02     # expected TV of N=40k samples over 5 tokens is ~0.005


def _check_distribution(first, second, num, p1, p2):
  freq1 = np.bincount(first, minlength=V) / len(first)
  assert _tv(freq1, p1) < TV_BOUND, (freq1, p1)
  x1 = 0 if p1[0] > 0.1 else int(np.argmax(p1))
  sel = (num >= 1) & (first == x1)
  assert sel.sum() > 2000
  freq2 = np.bincount(second[sel], minlength=V) / sel.sum()
  assert _tv(freq2, p2[x1]) < 2.5 * TV_BOUND, (freq2, p2[x1])


def _wrong_first_token_law(p, q):
  """What 'resample from p instead of the residual' would emit for a sampled chain draft."""
  accept = np.minimum(p, q)
  return accept + (1 - accept.sum()) * p


@pytest.mark.parametrize('seed', [0, 1])
def test_rejection_sampled_chain_emits_target_distribution(seed):
  p1, p2, q1, q2 = _tables(seed)
  assert _tv(_wrong_first_token_law(p1, q1), p1) > 3 * TV_BOUND   # the bound catches that bug
  tree = trees.chain(2)
  k_draft, k_acc = jax.random.split(jax.random.key(seed))
  kd1, kd2 = jax.random.split(k_draft)
  d1 = jax.random.categorical(kd1, jnp.log(jnp.asarray(q1, jnp.float32)), shape=(N,))
  d2 = jax.random.categorical(kd2, jnp.log(jnp.asarray(q2, jnp.float32))[d1])
  tokens = jnp.stack([jnp.zeros_like(d1), d1, d2], axis=1).astype(jnp.int32)
  p_tab, q_tab = jnp.asarray(p2, jnp.float32), jnp.asarray(q2, jnp.float32)
  p_BTV = jnp.stack([jnp.broadcast_to(jnp.asarray(p1, jnp.float32), (N, V)), p_tab[d1], p_tab[d1]], 1)
  q_BTV = jnp.stack([jnp.broadcast_to(jnp.asarray(q1, jnp.float32), (N, V)), q_tab[d1], q_tab[d1]], 1)
  # Node 2 is a leaf: its "p" would be P3, never needed for the first two tokens.
  res = _rejection(tree, k_acc, tokens, p_BTV, q_BTV)
  first, second, num = _emitted(tree, res, tokens)
  _check_distribution(first, second, num, p1, p2)
  # Acceptance rate of the first draft is 1 - TV(p, q).
  assert abs(np.mean(num >= 1) - (1 - _tv(p1, q1))) < 0.01


@pytest.mark.parametrize('sampled', [True, False])
def test_rejection_tree_emits_target_distribution(sampled):
  """Tree: 3 children at depth 1, 2 under the first child. Sampled i.i.d. siblings, or top-k ranks."""
  p1, p2, q1, q2 = _tables(3)
  tree = trees.Tree.from_choices([[0], [1], [2], [0, 0], [0, 1]])
  # nodes: 0 root, 1..3 depth 1, 4..5 children of node 1.
  key = jax.random.key(7)
  if sampled:
    k1, k2, key = jax.random.split(key, 3)
    d1 = jax.random.categorical(k1, jnp.log(jnp.asarray(q1, jnp.float32)), shape=(N, 3))
    d2 = jax.random.categorical(k2, jnp.log(jnp.asarray(q2, jnp.float32))[d1[:, 0]], shape=(2, N)).T
    q_tab = jnp.asarray(q2, jnp.float32)
    q_BTV = jnp.concatenate([jnp.broadcast_to(jnp.asarray(q1, jnp.float32), (N, 1, V)),
                             q_tab[d1]] + [q_tab[d1[:, :1]]] * 2, axis=1)
  else:
    top1 = np.argsort(-q1)[:3]
    d1 = jnp.broadcast_to(jnp.asarray(top1), (N, 3))
    d2 = jnp.asarray(np.argsort(-q2, axis=1)[:, :2])[d1[:, 0]]
    q_BTV = None
  tokens = jnp.concatenate([jnp.zeros((N, 1), jnp.int32), d1, d2], axis=1).astype(jnp.int32)
  p_tab = jnp.asarray(p2, jnp.float32)
  parent_tok = jnp.concatenate([d1, d1[:, :1], d1[:, :1]], axis=1)   # token whose P2 row applies
  p_BTV = jnp.concatenate([jnp.broadcast_to(jnp.asarray(p1, jnp.float32), (N, 1, V)),
                           p_tab[d1], p_tab[parent_tok[:, 3:]]], axis=1)
  res = _rejection(tree, key, tokens, p_BTV, q_BTV)
  num = np.asarray(res.num_accepted_B)
  first, _, _ = _emitted(tree, res, tokens)
  freq1 = np.bincount(first, minlength=V) / N
  assert _tv(freq1, p1) < TV_BOUND, (freq1, p1)
  # Second token given that the first accepted node was node 1 (the only one with children).
  path = np.asarray(res.path_BP)
  sel = path[:, 1] == 1
  x1 = np.asarray(tokens)[sel, 1]
  second = np.where(num[sel] >= 2, np.asarray(tokens)[sel, np.maximum(path[sel, 2], 0)],
                    np.asarray(res.next_token_B)[sel])
  expected = p2[x1].mean(axis=0)       # mixture over the accepted first tokens
  freq2 = np.bincount(second, minlength=V) / sel.sum()
  assert sel.sum() > 2000 and _tv(freq2, expected) < 2.5 * TV_BOUND, (freq2, expected)


def test_typical_is_not_lossless_but_greedy_limit_matches():
  """Typical acceptance with a one-hot p (temperature 0) reduces to greedy."""
  tree = trees.Tree.from_choices([[0], [1], [0, 0]])
  logits = jax.random.normal(jax.random.key(0), (8, 4, 6))
  tokens = jax.random.randint(jax.random.key(1), (8, 4), 0, 6)
  tokens = tokens.at[:4, 1].set(jnp.argmax(logits[:4, 0], -1))
  onehot = jax.nn.one_hot(jnp.argmax(logits, -1), 6)
  typ = _typical(tree, jax.random.key(2), tokens, onehot)
  gre = _greedy(tree, tokens, logits)
  np.testing.assert_array_equal(typ.num_accepted_B, gre.num_accepted_B)
  np.testing.assert_array_equal(typ.next_token_B, gre.next_token_B)
  np.testing.assert_array_equal(typ.path_BP, gre.path_BP)
  assert int(jnp.sum(gre.num_accepted_B)) >= 4


def test_bad_shapes():
  tree = trees.chain(2)
  with pytest.raises(ValueError, match='tokens_BT'):
    _greedy(tree, jnp.zeros((2, 4), jnp.int32), jnp.zeros((2, 4, 5)))
  with pytest.raises(ValueError, match='draft_probs_BTV'):
    acceptance.accept_rejection(tree, jax.random.key(0), jnp.zeros((2, 3), jnp.int32),
                                jnp.zeros((2, 3, 5)), jnp.zeros((2, 3, 4)))
