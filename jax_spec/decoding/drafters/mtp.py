"""The model's own MTP modules (self-speculative): module k drafts depth k from the chain before it.

`models.mtp_draft` runs after the prefill and after every commit, with the accepted path's hidden
states and tokens, and returns the next chain d_1..d_D and the logits each was chosen from. A tree
may branch only off that chain (rank > 0 only under all-rank-0 parents): the alternatives at
depth k are the top-k of module k's logits. Dynamic trees: the same restriction (only chain nodes
have children, scored by the next module's log-probabilities), so at most depth * branching
candidates exist.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_spec import models
from jax_spec.decoding import dynamic_tree
from jax_spec.decoding.drafters import base


class MTPState(NamedTuple):
  cache: models.MTPCache
  chain_BJ: jax.Array           # int32 [B, J]: the next chain of drafts
  logits_BJV: jax.Array         # fp32 [B, J, V]: the logits each draft was chosen from


@base.register
class MTPDrafter(base.HeadsDrafter):
  name = 'mtp'
  supports_dynamic_trees = True
  heads_field = 'mtp_depth'
  heads_noun = 'MTP modules'
  too_deep_hint = " (drafter='mtp_recursive' reuses MTP module 1 to any depth)"

  @classmethod
  def check_tree(cls, tree, model):
    super().check_tree(tree, model)
    if isinstance(tree, dynamic_tree.DynamicTree):
      if tree.num_draft_nodes > tree.depth * tree.branching:
        raise ValueError(f"drafter='mtp' branches only off its chain: a dynamic tree has at most "
                         f"depth * branching = {tree.depth * tree.branching} draft nodes, got "
                         f"num_draft_nodes={tree.num_draft_nodes}")
      return
    for path in tree.choices:
      if any(path[:-1]):
        raise ValueError(f"drafter='mtp' drafts one chain; a tree may only branch off it (rank > 0 "
                         f"only under all-rank-0 parents), got path {list(path)}")

  @classmethod
  def extra_cache_slots(cls, model, tree):
    # `mtp_draft`'s window from the root: the accepted path (max_depth + 1) + mtp_depth - 1.
    return tree.max_depth + model.config.mtp_depth

  def _select_fn(self, ctx, key, batch):
    return self.select_fn(ctx, key, ctx.trunk.config.mtp_depth, batch)   # one draw per module

  def init(self, ctx, prefill):
    batch = prefill.prompts_BT.shape[0]
    cache = models.init_mtp_cache(ctx.trunk, batch, self.cache_len)
    draft, cache = models.mtp_draft(ctx.trunk, cache, *prefill.committed,
                                    select_fn=self._select_fn(ctx, prefill.key, batch))
    return MTPState(cache, draft.tokens_BJ, draft.logits_BJV)

  def propose(self, ctx, state, root_B, key):
    del key     # the chain was drawn in `mtp_draft`
    if self.is_dynamic:
      return self.propose_dynamic(ctx, state, root_B)
    depth = self.tree.max_depth
    chain_BJ, logits_BJV = state.chain_BJ[:, :depth], state.logits_BJV[:, :depth]
    if self.sample_drafts:
      return base.chain_candidates(root_B, chain_BJ, self.probs(logits_BJV)), state
    topk_JBk = jax.lax.top_k(logits_BJV, max(self.tree.topk_per_depth))[1].swapaxes(0, 1)
    tokens_BT = base.tree_tokens_from_ranks(self.tree, root_B, topk_JBk, chain_BJ)
    return base.Candidates(tokens_BT), state

  def expand(self, ctx, state, frontier):
    # A frontier node has children iff its path is the chain's prefix: root, d_1, .., d_level.
    tokens_BM, depths_BM = frontier.tokens_BM, frontier.depths_BM
    chain_BM = jnp.take_along_axis(state.chain_BJ, jnp.maximum(depths_BM - 1, 0), axis=1)
    on_chain_BM = (depths_BM == 0) | (tokens_BM == chain_BM)
    mask_BUM = frontier.mask_BMM[:, -frontier.num_frontier:]
    on_chain_BU = jnp.all(~mask_BUM | on_chain_BM[:, None], axis=-1)
    logp_BV = jax.nn.log_softmax(state.logits_BJV[:, frontier.level], axis=-1)
    return jnp.where(on_chain_BU[:, :, None], logp_BV[:, None], -jnp.inf), state

  def update(self, ctx, state, verify):
    draft, cache = models.mtp_draft(ctx.trunk, state.cache, *verify.committed,
                                    select_fn=self._select_fn(ctx, verify.key,
                                                              verify.tokens_BT.shape[0]))
    return MTPState(cache, draft.tokens_BJ, draft.logits_BJV)
