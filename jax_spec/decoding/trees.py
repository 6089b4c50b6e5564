"""Static candidate trees for speculative verification.

A tree is given in Medusa's `medusa_choices` form: a list of top-k rank paths. `[1, 0]` is the node
reached by taking the rank-1 (second most likely) token of the first draft head, then the rank-0
token of the second draft head under it. Every path's prefix must itself be in the list.

`Tree.from_choices` turns the list into the static arrays the sampler needs. Node 0 is the root:
the next token, already chosen by the target model at the previous step (or by the prefill); the
other nodes follow in breadth-first order, siblings by rank. Node t of the tree sits at sequence
position `cache_length + depth[t]` when the tree is verified.

Default trees (`default_tree`) come from Medusa's `mc_sim_7b_63` sparse tree, which Medusa's
authors built with the same greedy construction as `tree_from_accuracies` from measured head
accuracies of Vicuna-7B: the list is ordered by decreasing path probability, so every prefix of it
is itself a good tree of that size (and prefix-closed). Truncating it to the paths a drafter can
produce (depth <= number of heads) and to a node budget gives a tree that spends the budget on the
most likely paths. The budgets are small on purpose: on a CPU the verify forward is compute bound,
so each extra node costs time roughly in proportion, unlike a GPU where ~64 nodes are nearly free.
For a trained model, `tree_from_accuracies` on measured per-head accuracies
(`measure_topk_accuracies`, or `python -m experiments.speculative --derive_tree`) gives a tree
fitted to it.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import Sequence

import numpy as np

# Medusa's mc_sim_7b_63 (github.com/FasterDecoding/Medusa, medusa/model/medusa_choices.py; data).
MC_SIM_7B_63 = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0), (2, 1),
    (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3), (0, 0, 7),
    (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0), (3, 1), (2, 2),
    (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0), (0, 0, 0, 1), (1, 6),
    (0, 7, 0))

# Node budget (root excluded) of the default tree per number of draft heads, for CPU verification.
DEFAULT_TREE_NODES = {1: 3, 2: 8, 3: 14, 4: 20}


@dataclasses.dataclass(frozen=True, eq=False)
class Tree:
  """Static arrays of a candidate tree with T nodes (root included) and depth `max_depth`.

  choices:          the rank paths in node order (node t >= 1 is `choices[t - 1]`).
  parent_T:         parent node index, -1 for the root.
  depth_T:          0 for the root; node t is verified at position `cache_length + depth_T[t]`.
  rank_T:           top-k rank of the node's token in its drafting distribution, -1 for the root.
  ancestor_mask_TT: [t, s] is True iff s is t or an ancestor of t (the attention tree mask).
  paths_RP:         root-to-leaf node paths [num_leaves, max_depth + 1], padded with -1.
  children_TC:      children in rank order [T, max_children], padded with -1.
  topk_per_depth:   for depth d = 1..max_depth, how many top-k tokens the drafter must provide.
  """
  choices: tuple[tuple[int, ...], ...]
  parent_T: np.ndarray
  depth_T: np.ndarray
  rank_T: np.ndarray
  ancestor_mask_TT: np.ndarray
  paths_RP: np.ndarray
  children_TC: np.ndarray
  topk_per_depth: tuple[int, ...]

  @property
  def num_nodes(self) -> int:
    return len(self.parent_T)

  @property
  def max_depth(self) -> int:
    return int(self.depth_T.max())

  @property
  def num_leaves(self) -> int:
    return self.paths_RP.shape[0]

  @property
  def is_chain(self) -> bool:
    return all(c == (0,) * len(c) for c in self.choices) and self.num_nodes == self.max_depth + 1

  def __repr__(self):
    return f'Tree(num_nodes={self.num_nodes}, max_depth={self.max_depth}, choices={list(map(list, self.choices))})'

  def __hash__(self):
    return hash(self.choices)

  def __eq__(self, other):
    return isinstance(other, Tree) and self.choices == other.choices

  @classmethod
  def from_choices(cls, choices: Sequence[Sequence[int]], *, num_heads: int | None = None,
                   max_rank: int | None = None) -> 'Tree':
    """Validates `choices` and precomputes the arrays.

    num_heads: if given, paths deeper than this raise (a drafter with K heads drafts depth <= K).
    max_rank: if given, ranks >= this raise (e.g. the vocabulary size).
    """
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
      raise ValueError(f'choices must be a list of rank paths like [[0], [0, 0], [1]], got {choices!r}')
    paths = []
    for c in choices:
      if isinstance(c, (str, bytes)) or not isinstance(c, Sequence) or len(c) == 0:
        raise ValueError(f'choices: every path must be a non-empty list of ranks, got {c!r}')
      if not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 0 for r in c):
        raise ValueError(f'choices: ranks must be ints >= 0, got {list(c)!r}')
      paths.append(tuple(int(r) for r in c))
    seen = set()
    for p in paths:
      if p in seen:
        raise ValueError(f'choices: duplicate path {list(p)}')
      seen.add(p)
    for p in paths:
      if len(p) > 1 and p[:-1] not in seen:
        raise ValueError(f'choices: path {list(p)} has no parent path {list(p[:-1])} in the tree')
      if num_heads is not None and len(p) > num_heads:
        raise ValueError(f'choices: path {list(p)} has depth {len(p)} but the drafter has only '
                         f'{num_heads} head(s) (num_heads={num_heads})')
      if max_rank is not None and max(p) >= max_rank:
        raise ValueError(f'choices: path {list(p)} uses rank {max(p)} >= max_rank={max_rank}')
    order = tuple(sorted(paths, key=lambda p: (len(p), p)))      # breadth first, siblings by rank
    index = {(): 0}
    index.update({p: i + 1 for i, p in enumerate(order)})
    num_nodes = len(order) + 1
    parent = np.full((num_nodes,), -1, np.int32)
    depth = np.zeros((num_nodes,), np.int32)
    rank = np.full((num_nodes,), -1, np.int32)
    mask = np.eye(num_nodes, dtype=bool)
    for p in order:
      t = index[p]
      parent[t], depth[t], rank[t] = index[p[:-1]], len(p), p[-1]
      mask[t] = mask[index[p[:-1]]]
      mask[t, t] = True
    max_depth = int(depth.max()) if len(order) else 0
    is_parent = np.zeros((num_nodes,), bool)
    is_parent[parent[1:]] = True
    leaves = [t for t in range(num_nodes) if not is_parent[t]]
    paths_arr = np.full((len(leaves), max_depth + 1), -1, np.int32)
    for i, leaf in enumerate(leaves):
      nodes = [leaf]
      while parent[nodes[-1]] >= 0:
        nodes.append(int(parent[nodes[-1]]))
      paths_arr[i, :len(nodes)] = nodes[::-1]
    kids = [[t for t in range(1, num_nodes) if parent[t] == u] for u in range(num_nodes)]
    max_children = max(1, max(len(k) for k in kids))
    children = np.full((num_nodes, max_children), -1, np.int32)
    for u, k in enumerate(kids):
      children[u, :len(k)] = k
    topk = tuple(int(max(p[d] for p in order if len(p) > d)) + 1 for d in range(max_depth))
    for a in (parent, depth, rank, mask, paths_arr, children):
      a.setflags(write=False)
    return cls(order, parent, depth, rank, mask, paths_arr, children, topk)


def chain(n: int) -> Tree:
  """A chain of n draft tokens (the top-1 token of each of n heads): n + 1 nodes with the root."""
  if not isinstance(n, int) or n < 0:
    raise ValueError(f'n must be an int >= 0, got {n!r}')
  return Tree.from_choices([[0] * d for d in range(1, n + 1)])


def default_tree(num_heads: int, num_nodes: int | None = None) -> Tree:
  """Medusa's mc_sim_7b_63 restricted to depth <= num_heads and to its first `num_nodes` paths."""
  if not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f'num_heads must be an int >= 1, got {num_heads!r}')
  paths = [p for p in MC_SIM_7B_63 if len(p) <= num_heads]
  if num_nodes is None:
    num_nodes = DEFAULT_TREE_NODES.get(num_heads, DEFAULT_TREE_NODES[max(DEFAULT_TREE_NODES)])
  if not isinstance(num_nodes, int) or not 1 <= num_nodes <= len(paths):
    raise ValueError(f'num_nodes must be an int in [1, {len(paths)}] for {num_heads} heads, '
                     f'got {num_nodes!r}')
  return Tree.from_choices(paths[:num_nodes], num_heads=num_heads)


def get_tree(spec, num_heads: int) -> Tree:
  """'chain' (one token per head), 'default', 'default:N' (N nodes), 'chainN', or a Tree/choices."""
  if isinstance(spec, Tree):
    tree = spec
  elif isinstance(spec, str):
    if spec == 'chain':
      tree = chain(num_heads)
    elif spec.startswith('chain') and spec[5:].isdigit():
      tree = chain(int(spec[5:]))
    elif spec == 'default':
      tree = default_tree(num_heads)
    elif spec.startswith('default:') and spec[8:].isdigit():
      tree = default_tree(num_heads, int(spec[8:]))
    elif spec == 'mc_sim_7b_63':
      tree = Tree.from_choices(MC_SIM_7B_63)
    else:
      raise ValueError(f"tree must be 'chain', 'chainN', 'default', 'default:N', 'mc_sim_7b_63', "
                       f"a Tree or a list of rank paths, got {spec!r}")
  else:
    tree = Tree.from_choices(spec)
  if tree.max_depth > num_heads:
    raise ValueError(f'tree has depth {tree.max_depth} but the drafter provides only {num_heads} '
                     f'draft position(s)')
  return tree


def tree_from_accuracies(topk_acc_Jk, num_nodes: int, *, cumulative: bool = False,
                         branch_from_chain_only: bool = False) -> Tree:
  """Medusa's greedy tree construction from per-head top-k accuracies.

  topk_acc_Jk[j, r]: probability that head j's rank-r token is the correct one (or, with
  `cumulative=True`, that the correct token is within head j's top r+1; converted by differences).
  A path's probability is the product of its per-depth rank accuracies (heads treated as
  independent, as in Medusa). Starting from the root, repeatedly add the node with the largest path
  probability among the children of the current tree (ties: shallower, then smaller ranks first),
  until the tree has `num_nodes` non-root nodes. The result is prefix closed by construction.
  `branch_from_chain_only=True` only grows children under all-rank-0 paths (what the MTP drafter
  can produce: one chained draft, with top-k alternatives at each depth).
  """
  acc = np.asarray(topk_acc_Jk, np.float64)
  if acc.ndim != 2 or acc.shape[0] < 1 or acc.shape[1] < 1:
    raise ValueError(f'topk_acc_Jk must be [num_heads, k], got shape {acc.shape}')
  if not np.all(np.isfinite(acc)) or acc.min() < 0 or acc.max() > 1:
    raise ValueError('topk_acc_Jk must hold probabilities in [0, 1]')
  if cumulative:
    acc = np.diff(np.concatenate([np.zeros((acc.shape[0], 1)), acc], axis=1), axis=1)
    if acc.min() < -1e-9:
      raise ValueError('topk_acc_Jk with cumulative=True must be non-decreasing along k')
    acc = np.maximum(acc, 0)
  num_heads, k = acc.shape
  if branch_from_chain_only:
    max_nodes = num_heads * k
  else:
    max_nodes = sum(k ** d for d in range(1, num_heads + 1))
  if not isinstance(num_nodes, int) or not 1 <= num_nodes <= max_nodes:
    raise ValueError(f'num_nodes must be an int in [1, {max_nodes}], got {num_nodes!r}')
  heap = [(-acc[0, r], 1, (r,)) for r in range(k)]
  heapq.heapify(heap)
  chosen = []
  while len(chosen) < num_nodes:
    neg_prob, _, path = heapq.heappop(heap)
    chosen.append(path)
    if len(path) < num_heads and not (branch_from_chain_only and any(path)):
      for r in range(k):
        heapq.heappush(heap, (neg_prob * acc[len(path), r], len(path) + 1, path + (r,)))
  return Tree.from_choices(chosen, num_heads=num_heads)


def expected_accepted_length(tree: Tree, topk_acc_Jk) -> float:
  """Expected tau (accepted draft tokens + 1) of `tree` under the independent-heads model."""
  acc = np.asarray(topk_acc_Jk, np.float64)
  total = 1.0
  for p in tree.choices:
    total += float(np.prod([acc[d, r] if r < acc.shape[1] else 0.0 for d, r in enumerate(p)]))
  return total


def measure_topk_accuracies(head_logits_JTV, targets_JT, valid_JT, k: int) -> np.ndarray:
  """Per-rank accuracies `[J, k]`: fraction of valid positions where head j's rank-r token is right.

  head_logits_JTV: logits of J draft heads at T positions; targets_JT: the token each head should
  predict there; valid_JT: which positions count (sequence ends, padding).
  """
  import jax.numpy as jnp
  head_logits_JTV = jnp.asarray(head_logits_JTV)
  if head_logits_JTV.ndim != 3:
    raise ValueError(f'head_logits_JTV must be [J, T, V], got shape {head_logits_JTV.shape}')
  if not isinstance(k, int) or not 1 <= k <= head_logits_JTV.shape[-1]:
    raise ValueError(f'k must be an int in [1, vocab], got {k!r}')
  target_logit_JT1 = jnp.take_along_axis(head_logits_JTV, jnp.asarray(targets_JT)[..., None], -1)
  # Rank = number of tokens with a strictly larger logit (ties favour the target).
  rank_JT = jnp.sum(head_logits_JTV > target_logit_JT1, axis=-1)
  valid_JT = jnp.asarray(valid_JT, bool)
  hits_Jk = jnp.stack([jnp.sum((rank_JT == r) & valid_JT, axis=-1) for r in range(k)], axis=-1)
  count_J1 = jnp.maximum(jnp.sum(valid_JT, axis=-1, keepdims=True), 1)
  return np.asarray(hits_Jk / count_J1, np.float64)
