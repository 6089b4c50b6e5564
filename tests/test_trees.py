"""Static candidate trees: layout, masks, paths, validation, defaults, greedy construction."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_spec.decoding import dynamic_tree, trees


def test_layout_of_a_small_tree():
  tree = trees.Tree.from_choices([[1], [0, 0], [0], [0, 1], [1, 0], [0, 0, 0]])
  # Breadth first, siblings by rank: root, [0], [1], [0,0], [0,1], [1,0], [0,0,0].
  assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
  np.testing.assert_array_equal(tree.parent_T, [-1, 0, 0, 1, 1, 2, 3])
  np.testing.assert_array_equal(tree.depth_T, [0, 1, 1, 2, 2, 2, 3])
  np.testing.assert_array_equal(tree.rank_T, [-1, 0, 1, 0, 1, 0, 0])
  assert tree.num_nodes == 7 and tree.max_depth == 3 and tree.topk_per_depth == (2, 2, 1)
  np.testing.assert_array_equal(tree.children_TC, [[1, 2], [3, 4], [5, -1], [6, -1], [-1, -1],
                                                   [-1, -1], [-1, -1]])
  np.testing.assert_array_equal(tree.paths_RP, [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]])
  expected = np.zeros((7, 7), bool)
  for t in range(7):
    s = t
    while s >= 0:
      expected[t, s] = True
      s = tree.parent_T[s]
  np.testing.assert_array_equal(tree.ancestor_mask_TT, expected)
  assert not tree.is_chain


def test_chain():
  tree = trees.chain(3)
  assert tree.is_chain and tree.num_nodes == 4
  np.testing.assert_array_equal(tree.ancestor_mask_TT, np.tril(np.ones((4, 4), bool)))
  np.testing.assert_array_equal(tree.paths_RP, [[0, 1, 2, 3]])
  assert trees.chain(0).num_nodes == 1


@pytest.mark.parametrize('choices, match', [
    ([[0], [0, 0], [0]], 'duplicate'),
    ([[0], [1, 0]], 'no parent path'),
    ([[0], [0, 0], [0, 0, 0]], 'depth 3'),
    ([[]], 'non-empty'),
    ([[0], [-1]], 'ints >= 0'),
    ('chain', 'list of rank paths'),
])
def test_validation(choices, match):
  with pytest.raises(ValueError, match=match):
    trees.Tree.from_choices(choices, num_heads=2)


def test_default_trees_fit_the_heads_and_are_prefix_closed():
  for heads in range(1, 5):
    tree = trees.default_tree(heads)
    assert tree.max_depth <= heads
    assert tree.num_nodes == trees.DEFAULT_TREE_NODES[heads] + 1
    # Every prefix of mc_sim_7b_63 restricted to the depth is a valid (prefix-closed) tree.
    paths = [p for p in trees.MC_SIM_7B_63 if len(p) <= heads]
    for n in range(1, len(paths) + 1):
      trees.Tree.from_choices(paths[:n], num_heads=heads)
  assert trees.Tree.from_choices(trees.MC_SIM_7B_63).num_nodes == 64
  with pytest.raises(ValueError, match='num_nodes'):
    trees.default_tree(1, 11)


def test_get_tree():
  assert trees.get_tree('chain', 3) == trees.chain(3)
  assert trees.get_tree('chain2', 3) == trees.chain(2)
  assert trees.get_tree('default:5', 2).num_nodes == 6
  with pytest.raises(ValueError, match='depth 3'):
    trees.get_tree(trees.chain(3), 2)
  with pytest.raises(ValueError, match='tree must be'):
    trees.get_tree('bushy', 2)


def _brute_force_greedy(acc, num_nodes):
  """Same rule by exhaustive scan of the frontier each step."""
  k = acc.shape[1]
  chosen = []
  prob = {(): 1.0}
  for _ in range(num_nodes):
    frontier = [p + (r,) for p in [()] + chosen for r in range(k)
                if len(p) < acc.shape[0] and p + (r,) not in prob]
    best = max(frontier, key=lambda p: (prob[p[:-1]] * acc[len(p) - 1, p[-1]], -len(p),
                                        tuple(-r for r in p)))
    prob[best] = prob[best[:-1]] * acc[len(best) - 1, best[-1]]
    chosen.append(best)
  return set(chosen)


def test_tree_from_accuracies_is_medusas_greedy_construction():
  rng = np.random.default_rng(0)
  acc = np.sort(rng.uniform(0, 1, (3, 4)), axis=1)[:, ::-1] * np.array([[0.5], [0.3], [0.2]])
  for n in (1, 5, 12, 30):
    tree = trees.tree_from_accuracies(acc, n)
    assert set(tree.choices) == _brute_force_greedy(acc, n)
    assert tree.num_nodes == n + 1
  # The greedy tree maximizes the expected accepted length among all prefix-closed trees of size 4.
  acc = acc[:2, :3]
  all_paths = [p for d in (1, 2) for p in itertools.product(range(3), repeat=d)]
  best = 0.0
  for subset in itertools.combinations(all_paths, 4):
    try:
      t = trees.Tree.from_choices(subset)
    except ValueError:
      continue
    best = max(best, trees.expected_accepted_length(t, acc))
  greedy = trees.expected_accepted_length(trees.tree_from_accuracies(acc, 4), acc)
  assert greedy >= best - 1e-12


def test_tree_from_cumulative_accuracies():
  cum = np.array([[0.5, 0.7, 0.8], [0.3, 0.45, 0.5]])
  per_rank = np.array([[0.5, 0.2, 0.1], [0.3, 0.15, 0.05]])
  assert (trees.tree_from_accuracies(cum, 6, cumulative=True)
          == trees.tree_from_accuracies(per_rank, 6))
  assert trees.tree_from_accuracies(per_rank, 3).choices == ((0,), (1,), (0, 0))
  with pytest.raises(ValueError, match='topk_acc_Jk'):
    trees.tree_from_accuracies(np.ones(3), 2)
  with pytest.raises(ValueError, match='num_nodes'):
    trees.tree_from_accuracies(per_rank, 100)


def test_measure_topk_accuracies():
  logits_JTV = np.array([[[3., 2., 1.], [1., 2., 3.], [0., 5., 1.]]])
  targets_JT = np.array([[0, 1, 0]])           # ranks 0, 1, 2
  acc = trees.measure_topk_accuracies(logits_JTV, targets_JT, np.ones((1, 3), bool), 2)
  np.testing.assert_allclose(acc, [[1 / 3, 1 / 3]])
  acc = trees.measure_topk_accuracies(logits_JTV, targets_JT, np.array([[True, True, False]]), 3)
  np.testing.assert_allclose(acc, [[0.5, 0.5, 0.0]])


def test_tree_from_accuracies_branching_off_the_chain_only():
  acc = np.array([[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.3, 0.1]])
  tree = trees.tree_from_accuracies(acc, 7, branch_from_chain_only=True)
  assert all(not any(p[:-1]) for p in tree.choices)           # MTP-drawable
  assert set(tree.choices) == {(0,), (1,), (2,), (0, 0), (0, 1), (0, 0, 0), (0, 0, 1)}
  with pytest.raises(ValueError, match='num_nodes'):
    trees.tree_from_accuracies(acc, 10, branch_from_chain_only=True)


# --- Dynamic trees (EAGLE-2 construction) ---------------------------------------------------------

class _TableDrafter:
  """A stand-in drafter: a frontier node's children scores are `table[its token]` (path
  dependent through the tokens), so a numpy enumeration can reproduce the construction."""

  def __init__(self, tree, table):
    self.tree, self.table = tree, table

  def expand(self, ctx, state, frontier):
    del ctx
    tokens_BU = frontier.tokens_BM[:, -frontier.num_frontier:]
    return jax.nn.log_softmax(jnp.asarray(self.table)[tokens_BU], axis=-1), state + 1


def _reference_dynamic_tree(table, root, spec):
  """EAGLE-2 in plain numpy: the set of kept token paths."""
  shifted = table - table.max(axis=-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
  frontier, pool = [((), 0.0)], []
  for _ in range(spec.depth):
    children = []
    for path, score in frontier:
      token = path[-1] if path else root
      for x in np.argsort(-logp[token], kind='stable')[:spec.branching]:
        children.append((path + (int(x),), score + logp[token, x]))
    pool += children
    frontier = sorted(children, key=lambda c: -c[1])[:spec.branching]
  return {path for path, _ in sorted(pool, key=lambda c: -c[1])[:spec.num_draft_nodes]}


@pytest.mark.parametrize('num, k, depth', [(6, 2, 3), (9, 3, 4), (3, 3, 1)])
def test_dynamic_tree_matches_the_eagle2_reference(num, k, depth):
  spec = dynamic_tree.DynamicTree(num, k, depth)
  vocab, batch = 7, 3
  table = np.random.default_rng(num).normal(0, 2.0, (vocab, vocab))
  roots = np.array([0, 3, 6])
  tokens_BT, tree, calls = jax.jit(lambda r: dynamic_tree.build(_TableDrafter(spec, table), None, 0, r))(
      jnp.asarray(roots, jnp.int32))
  assert int(calls) == depth and tokens_BT.shape == (batch, num + 1)
  parent, depth_T = np.asarray(tree.arrays.parent_BT), np.asarray(tree.depths_BT)
  mask, paths = np.asarray(tree.mask_BTT), np.asarray(tree.arrays.paths_BRP)
  children, toks = np.asarray(tree.arrays.children_BTC), np.asarray(tokens_BT)
  for b in range(batch):
    assert parent[b, 0] == -1 and np.all((parent[b, 1:] >= 0) & (parent[b, 1:] < np.arange(1, num + 1)))
    node_paths = []
    for t in range(num + 1):
      chain_t = [t]
      while parent[b, chain_t[-1]] >= 0:
        chain_t.append(parent[b, chain_t[-1]])
      chain_t = chain_t[::-1]
      assert depth_T[b, t] == len(chain_t) - 1
      np.testing.assert_array_equal(np.flatnonzero(mask[b, t]), sorted(chain_t))
      np.testing.assert_array_equal(paths[b, t], chain_t + [-1] * (depth + 1 - len(chain_t)))
      kids = [u for u in range(num + 1) if parent[b, u] == t]
      np.testing.assert_array_equal(children[b, t], kids + [-1] * (k - len(kids)))
      node_paths.append(tuple(int(toks[b, u]) for u in chain_t[1:]))
    assert toks[b, 0] == roots[b]
    assert set(node_paths[1:]) == _reference_dynamic_tree(table, roots[b], spec)


class _RecordingDrafter(_TableDrafter):
  """A `_TableDrafter` that keeps every frontier it is shown."""

  def __init__(self, tree, table):
    super().__init__(tree, table)
    self.frontiers = []

  def expand(self, ctx, state, frontier):
    self.frontiers.append(frontier)
    return super().expand(ctx, state, frontier)


def test_dynamic_tree_frontier_parents_agree_with_its_mask():
  """`Frontier.parent_BM` is each entry's ancestor one level up: its mask row is the parent's plus
  itself, at one level deeper (what the EAGLE drafter reads instead of re-deriving it)."""
  spec = dynamic_tree.DynamicTree(9, 3, 4)
  drafter = _RecordingDrafter(spec, np.random.default_rng(1).normal(0, 2.0, (7, 7)))

  def frontiers(root_B):
    dynamic_tree.build(drafter, None, 0, root_B)
    return [(f.parent_BM, f.depths_BM, f.mask_BMM) for f in drafter.frontiers]

  seen = jax.jit(frontiers)(jnp.asarray([0, 5], jnp.int32))
  assert [f.level for f in drafter.frontiers] == list(range(spec.depth))
  for level, arrays in enumerate(seen):
    parent, depths, mask = (np.asarray(x) for x in arrays)
    num = parent.shape[1]
    assert num == 1 + level * spec.branching and np.all(parent[:, 0] == -1)
    for b in range(parent.shape[0]):
      for m in range(1, num):
        p = parent[b, m]
        assert 0 <= p < m and depths[b, p] == depths[b, m] - 1
        np.testing.assert_array_equal(mask[b, m], mask[b, p] | (np.arange(num) == m))


def test_dynamic_tree_spec_validation():
  with pytest.raises(ValueError, match='num_draft_nodes=9 > the 6 candidates'):
    dynamic_tree.DynamicTree(9, 2, 2)
  with pytest.raises(ValueError, match='branching must be an int >= 1'):
    dynamic_tree.DynamicTree(4, 0, 2)
  assert dynamic_tree.parse('dynamic:8:3', 4) == dynamic_tree.DynamicTree(8, 3, 4)
  assert dynamic_tree.parse('dynamic:5', 3) == dynamic_tree.DynamicTree(5, 4, 3)
  with pytest.raises(ValueError, match="'dynamic:N:K'"):
    dynamic_tree.parse('dynamic:x', 3)
