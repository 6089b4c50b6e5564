"""Acceptance rules: which candidate path of a verified tree to keep, and the next token.

All rules take a static `Tree` and batched arrays over rows b:
  tokens_BT:       token of every tree node (node 0 = root, already emitted);
  target p:        the target model's next-token distribution at every node (`target_probs` of the
                   verify logits; node t's distribution is over the children of t);
and return `Accepted(num_accepted_B, path_BP, next_token_B)`: how many draft tokens were accepted,
the accepted node path (root first, `[B, max_depth + 1]`, entries past `num_accepted` are -1) and
the token that follows them (the correction token, or the bonus token when a whole root-to-leaf
path was accepted). The row then emits `tokens[path[1:num_accepted + 1]]` followed by `next_token`.

- `accept_greedy`: the longest root-to-leaf prefix whose every token equals the target argmax at
  its parent. Identical to greedy autoregressive decoding, token for token.
- `accept_rejection`: speculative sampling (Leviathan et al. 2023; Chen et al. 2023), and for trees
  the recursive rejection over siblings of SpecInfer (Miao et al. 2024). At a node with target
  distribution p, children are tried in rank order; child x drawn from q is accepted with
  probability min(1, p(x) / q(x)); after a rejection p <- norm(max(0, p - q)) and the next sibling
  is tried against that residual. The first accepted child becomes the current node; if every
  child is rejected (or the node is a leaf) the next token is drawn from the current residual.
  Which q: with `draft_probs_BTV` given, the children of node t must be independent samples from
  `draft_probs_BTV[:, t]` (sampled drafts: a draft model or MTP chain at temperature > 0). With
  `draft_probs_BTV=None` the children are deterministic (top-k ranks of the draft heads, or greedy
  drafts), and the correct q for a deterministic proposal x is the one-hot of x: x is accepted with
  probability p(x), and a rejection zeroes p(x) and renormalizes. Both make the emitted tokens
  distributed exactly as p (tests/test_acceptance.py checks it empirically).
- `accept_typical`: Medusa's typical acceptance: child x of node t is acceptable if
  p_t(x) > min(eps, delta * exp(-H(p_t))); the longest acceptable path wins (ties: the larger sum
  of log p), and the next token is drawn from p at its last node. Not lossless: it trades
  faithfulness to p for longer accepted paths.

All functions are jittable with fixed shapes. The tree is a static `Tree`, or a `TreeArrays` of
per-row traced arrays (a dynamic tree, built per step: `jax_spec.decoding.dynamic_tree`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_spec.decoding import prng, sampling
from jax_spec.decoding.trees import Tree


class TreeArrays(NamedTuple):
  """A per-row candidate tree of T nodes (node 0 = root, parents before children), traced."""
  parent_BT: jax.Array        # int32 [B, T]: parent node, -1 for the root
  paths_BRP: jax.Array        # int32 [B, R, max_depth + 1]: root-to-node paths, -1 padded
  children_BTC: jax.Array     # int32 [B, T, C]: children in the order they are tried, -1 padded

  @property
  def num_nodes(self) -> int:
    return self.parent_BT.shape[1]

  @property
  def max_depth(self) -> int:
    return self.paths_BRP.shape[-1] - 1


def _layout(tree):
  """(parent, paths, children, batched): the static arrays of a `Tree`, or a `TreeArrays`' own."""
  if isinstance(tree, Tree):
    return (jnp.asarray(tree.parent_T), jnp.asarray(tree.paths_RP), jnp.asarray(tree.children_TC),
            False)
  return tree.parent_BT, tree.paths_BRP, tree.children_BTC, True


def _rows(x_B, idx, batched):
  """x[b, idx[b, ...]] (per-row idx) or x[:, idx] (static idx); idx >= 0."""
  if batched:
    return jax.vmap(lambda x, i: x[i])(x_B, idx)
  return x_B[:, idx]


class Accepted(NamedTuple):
  num_accepted_B: jax.Array   # int32 [B], in [0, max_depth]
  path_BP: jax.Array          # int32 [B, max_depth + 1], node indices, -1 past num_accepted
  next_token_B: jax.Array     # int32 [B]


def _check(tree, tokens_BT, dist_BTV, name):
  if not isinstance(tree, (Tree, TreeArrays)):
    raise ValueError(f'tree must be a Tree or TreeArrays, got {type(tree).__name__}')
  if tokens_BT.ndim != 2 or tokens_BT.shape[1] != tree.num_nodes:
    raise ValueError(f'tokens_BT must be [batch, {tree.num_nodes}], got shape {tokens_BT.shape}')
  if dist_BTV.ndim != 3 or dist_BTV.shape[:2] != tokens_BT.shape:
    raise ValueError(f'{name} must be [batch, {tree.num_nodes}, vocab], got shape {dist_BTV.shape}')


def _best_path(tree, edge_ok_BT, score_BT=None):
  """Longest root-to-leaf prefix whose edges are all ok. edge_ok_BT[b, t]: node t may follow its parent."""
  _, paths, _, batched = _layout(tree)
  valid = paths >= 0
  ok_BRP = _rows(edge_ok_BT, jnp.maximum(paths, 0), batched) & (valid if batched else valid[None])
  run_BRP = jnp.cumprod(ok_BRP[:, :, 1:].astype(jnp.int32), axis=-1)   # edges along each path
  len_BR = jnp.sum(run_BRP, axis=-1)
  if score_BT is None:
    best_B = jnp.argmax(len_BR, axis=-1)
  else:   # among the longest, the largest summed score of the accepted prefix
    path_score_BRP = _rows(score_BT, jnp.maximum(paths, 0), batched)
    prefix_score_BR = jnp.sum(path_score_BRP[:, :, 1:] * run_BRP, axis=-1)
    longest_BR = len_BR == jnp.max(len_BR, axis=-1, keepdims=True)
    best_B = jnp.argmax(jnp.where(longest_BR, prefix_score_BR, -jnp.inf), axis=-1)
  num_B = jnp.take_along_axis(len_BR, best_B[:, None], axis=1)[:, 0].astype(jnp.int32)
  path_BP = (jnp.take_along_axis(paths, best_B[:, None, None], axis=1)[:, 0] if batched
             else paths[best_B])
  path_BP = jnp.where(jnp.arange(tree.max_depth + 1)[None] <= num_B[:, None], path_BP, -1)
  return num_B, path_BP


def _last_node(path_BP, num_B):
  return jnp.take_along_axis(path_BP, num_B[:, None], axis=1)[:, 0]


def accept_greedy(tree: Tree, tokens_BT, target_logits_BTV) -> Accepted:
  """Greedy verification against the argmax of the target logits (or of any monotone transform)."""
  _check(tree, tokens_BT, target_logits_BTV, 'target_logits_BTV')
  argmax_BT = jnp.argmax(target_logits_BTV, axis=-1).astype(jnp.int32)
  parent, _, _, batched = _layout(tree)
  edge_ok_BT = tokens_BT == _rows(argmax_BT, jnp.maximum(parent, 0), batched)
  num_B, path_BP = _best_path(tree, edge_ok_BT)
  next_B = jnp.take_along_axis(argmax_BT, _last_node(path_BP, num_B)[:, None], axis=1)[:, 0]
  return Accepted(num_B, path_BP, next_B)


def accept_typical(tree: Tree, rng, tokens_BT, target_probs_BTV, *, eps: float = 0.09,
                   delta: float = 0.3) -> Accepted:
  """Medusa's typical acceptance (not lossless; see the module docstring)."""
  _check(tree, tokens_BT, target_probs_BTV, 'target_probs_BTV')
  p_BTV = target_probs_BTV.astype(jnp.float32)
  entropy_BT = -jnp.sum(jnp.where(p_BTV > 0, p_BTV * jnp.log(jnp.maximum(p_BTV, 1e-38)), 0.0), -1)
  threshold_BT = jnp.minimum(eps, delta * jnp.exp(-entropy_BT))
  parent, _, _, batched = _layout(tree)
  parent = jnp.maximum(parent, 0)
  p_tok_BT = jnp.take_along_axis(_rows(p_BTV, parent, batched), tokens_BT[:, :, None], axis=-1)[..., 0]
  edge_ok_BT = p_tok_BT > _rows(threshold_BT, parent, batched)
  num_B, path_BP = _best_path(tree, edge_ok_BT, jnp.log(jnp.maximum(p_tok_BT, 1e-38)))
  last_B = _last_node(path_BP, num_B)
  p_last_BV = jnp.take_along_axis(p_BTV, last_B[:, None, None], axis=1)[:, 0]
  return Accepted(num_B, path_BP, sampling.sample_probs(rng, p_last_BV))


def _normalize_or(residual_V, fallback_V):
  total = jnp.sum(residual_V, axis=-1, keepdims=True)
  return jnp.where(total > 0, residual_V / jnp.where(total > 0, total, 1.0), fallback_V)


def rejection_walk(tree: Tree, uniform_BJC, tokens_BT, target_probs_BTV, draft_probs_BTV=None):
  """The deterministic part of `accept_rejection` given its uniforms `[B, max(depth, 1), width]`.

  Returns `(num_accepted_B, path_BP, next_probs_BV)`: the distribution the next token is drawn
  from (the residual after the last rejection, or p at the last accepted node). Exposed for tests.
  """
  _, _, children, batched = _layout(tree)
  depth, width = tree.max_depth, children.shape[-1]

  def row(children_TC, tokens_T, p_TV, q_TV, uniform_JC):
    p_TV = p_TV.astype(jnp.float32)

    def level(d, carry):
      node, alive, num, path_P, residual_V = carry
      q_V = None if q_TV is None else q_TV[node].astype(jnp.float32)

      def sibling(c, inner):
        chosen, p_V = inner
        child = children_TC[node, c]
        trying = alive & (child >= 0) & (chosen < 0)
        x = tokens_T[jnp.maximum(child, 0)]
        if q_V is None:
          accept_prob = p_V[x]
          rejected_V = p_V.at[x].set(0.0)
        else:
          accept_prob = jnp.minimum(1.0, p_V[x] / jnp.maximum(q_V[x], 1e-30))
          rejected_V = jnp.maximum(p_V - q_V, 0.0)
        accepted = trying & (uniform_JC[d, c] < accept_prob)
        chosen = jnp.where(accepted, child, chosen)
        p_V = jnp.where(trying & ~accepted, _normalize_or(rejected_V, p_V), p_V)
        return chosen, p_V

      chosen, p_V = jax.lax.fori_loop(0, width, sibling, (jnp.int32(-1), p_TV[node]))
      descend = alive & (chosen >= 0)
      residual_V = jnp.where(alive & ~descend, p_V, residual_V)
      node = jnp.where(descend, chosen, node)
      path_P = path_P.at[d + 1].set(jnp.where(descend, chosen, -1))
      return node, descend, num + descend.astype(jnp.int32), path_P, residual_V

    init = (jnp.int32(0), jnp.bool_(True), jnp.int32(0),
            jnp.full((depth + 1,), -1, jnp.int32).at[0].set(0), p_TV[0])
    node, alive, num, path_P, residual_V = jax.lax.fori_loop(0, depth, level, init)
    residual_V = jnp.where(alive, p_TV[node], residual_V)   # whole path accepted: bonus from p
    return num, path_P, residual_V

  in_axes = (0 if batched else None, 0, 0, None if draft_probs_BTV is None else 0, 0)
  return jax.vmap(row, in_axes=in_axes)(children, tokens_BT, target_probs_BTV, draft_probs_BTV,
                                        uniform_BJC)


def rejection_chain(uniform_BJ, tokens_BT, target_probs_BTV, draft_probs_BTV=None):
  """`rejection_walk` on a chain (node t's one child is node t + 1), without its loops: the J
  tests at once, the accepted run, and the residual at the first rejection. Same results given
  the same uniforms `[B, J]`."""
  depth = tokens_BT.shape[1] - 1
  p_BTV = target_probs_BTV.astype(jnp.float32)
  x_BJ1 = tokens_BT[:, 1:, None]
  p_x_BJ = jnp.take_along_axis(p_BTV[:, :depth], x_BJ1, axis=-1)[..., 0]
  if draft_probs_BTV is None:
    accept_prob_BJ = p_x_BJ
  else:
    q_BTV = draft_probs_BTV.astype(jnp.float32)
    q_x_BJ = jnp.take_along_axis(q_BTV[:, :depth], x_BJ1, axis=-1)[..., 0]
    accept_prob_BJ = jnp.minimum(1.0, p_x_BJ / jnp.maximum(q_x_BJ, 1e-30))
  ok_BJ = uniform_BJ < accept_prob_BJ
  num_B = jnp.sum(jnp.cumprod(ok_BJ.astype(jnp.int32), axis=-1), axis=-1)
  j_P = jnp.arange(depth + 1)
  path_BP = jnp.where(j_P[None] <= num_B[:, None], j_P[None], -1).astype(jnp.int32)
  p_last_BV = jnp.take_along_axis(p_BTV, num_B[:, None, None], axis=1)[:, 0]
  if draft_probs_BTV is None:   # q one-hot: the rejected token's mass goes
    rejected_B1 = jnp.take_along_axis(tokens_BT, jnp.minimum(num_B + 1, depth)[:, None], axis=1)
    rejected_BV = jnp.where(jnp.arange(p_BTV.shape[-1])[None] == rejected_B1, 0.0, p_last_BV)
  else:
    q_last_BV = jnp.take_along_axis(q_BTV, num_B[:, None, None], axis=1)[:, 0]
    rejected_BV = jnp.maximum(p_last_BV - q_last_BV, 0.0)
  next_probs_BV = jnp.where((num_B < depth)[:, None], _normalize_or(rejected_BV, p_last_BV),
                            p_last_BV)   # whole chain accepted: the bonus token from p
  return num_B.astype(jnp.int32), path_BP, next_probs_BV


def accept_rejection(tree: Tree, rng, tokens_BT, target_probs_BTV, draft_probs_BTV=None) -> Accepted:
  """Recursive rejection sampling over the tree; lossless (see the module docstring for q)."""
  _check(tree, tokens_BT, target_probs_BTV, 'target_probs_BTV')
  if draft_probs_BTV is not None and draft_probs_BTV.shape != target_probs_BTV.shape:
    raise ValueError(f'draft_probs_BTV must have the shape of target_probs_BTV '
                     f'{target_probs_BTV.shape}, got {draft_probs_BTV.shape}')
  batch, vocab = tokens_BT.shape[0], target_probs_BTV.shape[-1]
  depth, width = max(tree.max_depth, 1), _layout(tree)[2].shape[-1]
  # One PRNG call: the walk's uniforms, then the next token's exponential noise (from uniforms in
  # [tiny, 1), as `prng.exponential`).
  u_BN = prng.uniform(rng, (batch, depth * width + vocab), minval=float(jnp.finfo(jnp.float32).tiny))
  uniform_BJC = u_BN[:, :depth * width].reshape(batch, depth, width)
  exponential_BV = -jnp.log(u_BN[:, depth * width:])
  if isinstance(tree, Tree) and tree.is_chain and tree.max_depth >= 1:
    num_B, path_BP, next_probs_BV = rejection_chain(uniform_BJC[..., 0], tokens_BT,
                                                    target_probs_BTV, draft_probs_BTV)
  else:
    num_B, path_BP, next_probs_BV = rejection_walk(tree, uniform_BJC, tokens_BT, target_probs_BTV,
                                                   draft_probs_BTV)
  return Accepted(num_B, path_BP, sampling.sample_probs_exponential(next_probs_BV, exponential_BV))
