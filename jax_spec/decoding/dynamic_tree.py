"""Dynamic draft trees (EAGLE-2, Li et al. 2024): a candidate tree built per step from the drafter's
own confidences, in fixed shapes inside the jitted loop.

With k = `branching`, D = `depth`, N = `num_draft_nodes` (all static):
1. expand the root: its k most probable children (by the drafter's log-probability) form level 1;
2. for each next level, expand the k frontier nodes: each proposes its top-k children, whose score
   is the cumulative draft log-probability of their path; all k^2 join the candidate pool, and the
   k best become the next frontier (D levels in all);
3. keep the N pool nodes of highest cumulative log-probability. A child's score is never above its
   parent's and ties go to the earlier (shallower) pool entry, so the kept set is prefix closed.

Expansion is the drafter's `expand(ctx, state, Frontier) -> (logprobs_BUV, state)` hook: the
log-probabilities of the U frontier nodes' children, -inf where a node can have no children.
The tree is then verified like a static one (one trunk `extend` with its ancestor mask; the
accepted path is `commit`ted), with per-row tree arrays (`acceptance.TreeArrays`). The proposals
are a deterministic function of the drafter state, so rejection sampling with q = one-hot per
child (SpecInfer's multi-draft rule, `accept_rejection(draft_probs=None)`) stays exact.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_spec.decoding.acceptance import TreeArrays


@dataclasses.dataclass(frozen=True)
class DynamicTree:
  """The static shape of a dynamic tree: N draft nodes kept out of D levels of top-k expansion."""
  num_draft_nodes: int
  branching: int
  depth: int

  def __post_init__(self):
    for name in ('num_draft_nodes', 'branching', 'depth'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'DynamicTree: {name} must be an int >= 1, got {value!r}')
    if self.num_draft_nodes > self.pool_size:
      raise ValueError(f'DynamicTree: num_draft_nodes={self.num_draft_nodes} > the '
                       f'{self.pool_size} candidates of depth={self.depth} levels of '
                       f'branching={self.branching} (k + (D - 1) k^2)')

  @property
  def pool_size(self) -> int:
    return self.branching + (self.depth - 1) * self.branching ** 2

  @property
  def num_nodes(self) -> int:
    """Verified nodes, the root included (as `Tree.num_nodes`)."""
    return self.num_draft_nodes + 1

  @property
  def max_depth(self) -> int:
    return self.depth

  @property
  def is_chain(self) -> bool:
    return False

  @property
  def expanded_nodes(self) -> int:
    """Nodes of the tree so far at the last expansion (root + (D - 1) frontiers of k)."""
    return 1 + (self.depth - 1) * self.branching

  def __repr__(self):
    return (f'DynamicTree(num_draft_nodes={self.num_draft_nodes}, branching={self.branching}, '
            f'depth={self.depth})')


def parse(spec: str, depth: int) -> DynamicTree:
  """'dynamic' | 'dynamic:N' | 'dynamic:N:K' (N draft nodes, K children per node; depth `depth`)."""
  parts = spec.split(':')
  if parts[0] != 'dynamic' or len(parts) > 3 or not all(p.isdigit() for p in parts[1:]):
    raise ValueError(f"a dynamic tree is 'dynamic', 'dynamic:N' or 'dynamic:N:K', got {spec!r}")
  num = int(parts[1]) if len(parts) > 1 else min(2 * depth + 2, 16)
  branching = int(parts[2]) if len(parts) > 2 else min(4, num)
  return DynamicTree(num, branching, depth)


class Frontier(NamedTuple):
  """What `Drafter.expand` sees at one level: the tree expanded so far and its last U nodes.

  Entries are the root, then each expanded level's nodes (k each), level by level; the frontier
  (the nodes to expand) is the last `num_frontier` entries, all at depth `level`.
  """
  level: int                # static: depth of the frontier nodes (0: the root alone)
  num_frontier: int         # static: U (1 at level 0, else k)
  tokens_BM: jax.Array      # int32 [B, M]
  parent_BM: jax.Array      # int32 [B, M]: the parent's entry, -1 for the root
  depths_BM: jax.Array      # int32 [B, M]
  mask_BMM: jax.Array       # bool [B, M, M]: [m, m'] iff m' is m or an ancestor of m


class DraftTree(NamedTuple):
  """A verified tree of one step (static or dynamic), as the loop uses it."""
  depths_BT: jax.Array      # int32 [B, T]
  mask_BTT: jax.Array       # bool [B, T, T] ancestor mask
  arrays: TreeArrays


def tree_arrays(parent_BT, depth_BT, max_depth: int, max_children: int) -> DraftTree:
  """Ancestor mask, root-to-node paths and children lists of per-row trees given by their parents
  (node 0 the root, parents before children); children are kept in node order."""
  batch, num_nodes = parent_BT.shape
  nodes_T = jnp.arange(num_nodes)
  # ancestors_BTZ[:, t, z]: t's ancestor z levels up (-1 above the root).
  ancestors = [jnp.broadcast_to(nodes_T, (batch, num_nodes))]
  for _ in range(max_depth):
    prev = ancestors[-1]
    ancestors.append(jnp.where(prev >= 0, jnp.take_along_axis(parent_BT, jnp.maximum(prev, 0), 1), -1))
  ancestors_BTZ = jnp.stack(ancestors, axis=-1)
  mask_BTT = jnp.any(ancestors_BTZ[:, :, None, :] == nodes_T[None, None, :, None], axis=-1)
  # Root first: path[j] = ancestor (depth - j) levels up.
  up_BTP = depth_BT[:, :, None] - jnp.arange(max_depth + 1)[None, None]
  paths_BTP = jnp.where(up_BTP >= 0, jnp.take_along_axis(ancestors_BTZ, jnp.maximum(up_BTP, 0), 2), -1)
  # Rank among siblings = earlier nodes with the same parent.
  same_BTT = (parent_BT[:, :, None] == parent_BT[:, None, :]) & (nodes_T[None, :] < nodes_T[:, None])[None]
  rank_BT = jnp.sum(same_BTT, axis=-1)
  rows_BT = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, num_nodes))
  has_parent_BT = parent_BT >= 0
  children_BTC = jnp.full((batch, num_nodes, max_children), -1, jnp.int32).at[
      rows_BT, jnp.where(has_parent_BT, parent_BT, num_nodes), rank_BT].set(
          jnp.broadcast_to(nodes_T, (batch, num_nodes)).astype(jnp.int32), mode='drop')
  return DraftTree(depth_BT.astype(jnp.int32), mask_BTT,
                   TreeArrays(parent_BT.astype(jnp.int32), paths_BTP.astype(jnp.int32), children_BTC))


def _append(tree: Frontier, tokens_BU, parent_BU, num_frontier: int) -> Frontier:
  """The tree so far plus U new nodes one level down (parents given as entry indices), as the
  next level's frontier."""
  batch, num = tokens_BU.shape
  parent_mask_BUM = jnp.take_along_axis(tree.mask_BMM, parent_BU[:, :, None], axis=1)
  new_rows_BUM = jnp.concatenate([parent_mask_BUM, jnp.broadcast_to(jnp.eye(num, dtype=bool),
                                                                    (batch, num, num))], axis=2)
  level = tree.level + 1
  return Frontier(
      level=level, num_frontier=num_frontier,
      tokens_BM=jnp.concatenate([tree.tokens_BM, tokens_BU], axis=1),
      parent_BM=jnp.concatenate([tree.parent_BM, parent_BU.astype(jnp.int32)], axis=1),
      depths_BM=jnp.concatenate([tree.depths_BM, jnp.full((batch, num), level, jnp.int32)], axis=1),
      mask_BMM=jnp.concatenate([jnp.pad(tree.mask_BMM, ((0, 0), (0, 0), (0, num))), new_rows_BUM],
                               axis=1))


def build(drafter, ctx, state, root_B):
  """Builds the step's dynamic tree with `drafter.expand`. -> (tokens_BT, DraftTree, state)."""
  spec: DynamicTree = drafter.tree
  k, depth = spec.branching, spec.depth
  batch = root_B.shape[0]
  frontier = Frontier(level=0, num_frontier=1, tokens_BM=root_B[:, None].astype(jnp.int32),
                      parent_BM=jnp.full((batch, 1), -1, jnp.int32),
                      depths_BM=jnp.zeros((batch, 1), jnp.int32),
                      mask_BMM=jnp.ones((batch, 1, 1), bool))
  # The candidate pool, level by level after the root (entry 0, scored +inf so it is always kept):
  # token, cumulative log-probability, parent pool entry (-1 for the root), depth.
  pool_tokens, pool_parents = [frontier.tokens_BM], [jnp.full((batch, 1), -1, jnp.int32)]
  pool_scores, pool_depths = [jnp.full((batch, 1), jnp.inf, jnp.float32)], [frontier.depths_BM]
  frontier_score_BU = jnp.zeros((batch, 1), jnp.float32)
  frontier_pool_BU = jnp.zeros((batch, 1), jnp.int32)
  pool_start = 1
  for level in range(depth):
    num_frontier = frontier.num_frontier
    logprobs_BUV, state = drafter.expand(ctx, state, frontier)
    child_logp_BUk, child_tok_BUk = jax.lax.top_k(logprobs_BUV.astype(jnp.float32), k)
    score_BUk = frontier_score_BU[:, :, None] + child_logp_BUk
    pool_tokens.append(child_tok_BUk.reshape(batch, -1))
    pool_scores.append(score_BUk.reshape(batch, -1))
    pool_parents.append(jnp.repeat(frontier_pool_BU, k, axis=1))
    pool_depths.append(jnp.full((batch, num_frontier * k), level + 1, jnp.int32))
    if level + 1 < depth:
      # The next frontier: the k best of these children (entries of the tree so far, for the mask).
      next_score_Bk, pick_Bk = jax.lax.top_k(score_BUk.reshape(batch, -1), k)
      parent_entry_Bk = frontier.tokens_BM.shape[1] - num_frontier + pick_Bk // k
      frontier = _append(frontier, jnp.take_along_axis(pool_tokens[-1], pick_Bk, 1),
                         parent_entry_Bk, k)
      frontier_score_BU, frontier_pool_BU = next_score_Bk, pool_start + pick_Bk
    pool_start += num_frontier * k
  # Keep the root and the N best, in pool order (parents before children): node t is entry keep[t].
  keep_BT = jnp.sort(jax.lax.top_k(jnp.concatenate(pool_scores, axis=1), spec.num_nodes)[1], axis=1)
  pool_tokens_BY, pool_parent_BY, pool_depth_BY = (
      jnp.concatenate(x, axis=1) for x in (pool_tokens, pool_parents, pool_depths))
  node_of_pool_BY = jnp.full(pool_tokens_BY.shape, -1, jnp.int32).at[
      jnp.arange(batch)[:, None], keep_BT].set(jnp.arange(spec.num_nodes))
  parent_pool_BT = jnp.take_along_axis(pool_parent_BY, keep_BT, 1)
  parent_BT = jnp.where(parent_pool_BT >= 0,
                        jnp.take_along_axis(node_of_pool_BY, jnp.maximum(parent_pool_BT, 0), 1), -1)
  tokens_BT = jnp.take_along_axis(pool_tokens_BY, keep_BT, 1).astype(jnp.int32)
  depth_BT = jnp.take_along_axis(pool_depth_BY, keep_BT, 1)
  return tokens_BT, tree_arrays(parent_BT, depth_BT, depth, k), state
