"""Medusa heads: head d drafts depth d from the trunk's hidden state at the last committed position.

The heads are path independent: the candidates at depth d are head d's top-k, whatever the nodes
above them. With sampled drafts (chains) the chain is one sample per head and q is that head's
processed distribution. Dynamic trees: every node at depth d scores its children with head d + 1
(cumulative log-probabilities of path-independent heads).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_spec.decoding import sampling
from jax_spec.decoding.drafters import base


class MedusaState(NamedTuple):
  head_logits_JBV: jax.Array    # fp32 [J, B, V]: every head's logits at the last committed position


@base.register
class MedusaDrafter(base.HeadsDrafter):
  name = 'medusa'
  supports_dynamic_trees = True
  heads_field = 'medusa_heads'
  heads_noun = 'Medusa heads'

  def init(self, ctx, prefill):
    # The heads at each prompt's last position only: XLA then drops the prefill's all-position
    # Medusa logits (3 heads x the prompt's rows through a ResBlock and the LM head, ~1 ms of a
    # 64-token prompt on a 2-core CPU).
    last_B1 = jnp.maximum(prefill.prompt_lengths_B - 1, 0)[:, None]
    hidden_B1D = base.gather_nodes(prefill.outputs.hidden_BTD, last_B1)
    return MedusaState(ctx.trunk.decode_medusa_logits(hidden_B1D)[:, :, 0])

  def propose(self, ctx, state, root_B, key):
    if self.is_dynamic:
      return self.propose_dynamic(ctx, state, root_B)
    depth = self.tree.max_depth
    head_JBV = state.head_logits_JBV[:depth]
    if self.sample_drafts:
      q_JBV = self.probs(head_JBV)   # head j + 1 drafts depth j + 1, the children of node j
      chain_JB = sampling.sample_probs(key, q_JBV)
      return base.chain_candidates(root_B, chain_JB.T, q_JBV.swapaxes(0, 1)), state
    topk_JBk = jax.lax.top_k(head_JBV, max(self.tree.topk_per_depth))[1]
    return base.Candidates(base.tree_tokens_from_ranks(self.tree, root_B, topk_JBk)), state

  def expand(self, ctx, state, frontier):
    logp_BV = jax.nn.log_softmax(state.head_logits_JBV[frontier.level], axis=-1)
    return jnp.broadcast_to(logp_BV[:, None], (logp_BV.shape[0], frontier.num_frontier,
                                               logp_BV.shape[1])), state

  def update(self, ctx, state, verify):
    # The heads only at each row's new last position (one node, not all T; XLA drops the unused
    # all-node Medusa logits of `extend`).
    hidden_B1D = base.gather_nodes(verify.outputs.hidden_BTD, verify.last_node_B[:, None])
    return MedusaState(ctx.trunk.decode_medusa_logits(hidden_B1D)[:, :, 0])
