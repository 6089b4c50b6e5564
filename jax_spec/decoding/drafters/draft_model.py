"""A separate, smaller Transformer drafts gamma = depth tokens autoregressively with its own cache.

Chains only. The draft cache follows the trunk's: it holds every committed token except the root
and, on rows whose whole previous chain was accepted ("pending"), except that chain's last draft
(never fed to the draft model). `propose` appends `[last draft, root]` (pending rows) or just the
root, then runs gamma - 1 one-token forwards; `update` cuts the cache back to the root plus the
min(a, gamma - 1) accepted drafts whose K/V it computed (finished rows: back to the trunk's
length, so their cache stops growing). So a step costs gamma draft forwards.

Dynamic trees (`DraftModelTreeState`): the cache holds every committed token except the root and
the drafts accepted at the last step (`pending`). Level 0 of the tree appends `[pending, root]`
(causal, per-row count) and keeps them; level l >= 1 runs the non-root nodes expanded so far with
their ancestor mask (`models.extend`) into scratch slots that are never committed, and reads the
children distributions at the frontier. Cost per step: D forwards of D + 1, k, 2k, .., (D - 1) k
tokens.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_spec import models
from jax_spec.decoding import dynamic_tree
from jax_spec.decoding.drafters import base


class DraftModelState(NamedTuple):
  cache: models.KVCache
  pending_B: jax.Array          # bool [B]: the last draft of a fully accepted chain is not cached
  last_draft_B: jax.Array       # int32 [B]: the previous chain's last draft


class DraftModelTreeState(NamedTuple):
  """Dynamic trees: the cache lacks the root and the `num_pending_B` drafts accepted last step."""
  cache: models.KVCache
  pending_BJ: jax.Array         # int32 [B, J]: those accepted drafts, in order
  num_pending_B: jax.Array      # int32 [B]


@base.register
class DraftModelDrafter(base.Drafter):
  name = 'model'
  supports_dynamic_trees = True

  @classmethod
  def check_model(cls, model, draft_model):
    if not isinstance(draft_model, models.Transformer):
      raise ValueError(f"drafter='model' needs draft_model, a jax_spec.models.Transformer, got "
                       f"{type(draft_model).__name__}")
    if draft_model.config.vocab_size != model.config.vocab_size:
      raise ValueError(f'draft_model vocab_size {draft_model.config.vocab_size} != the target '
                       f'model vocab_size {model.config.vocab_size}')

  @classmethod
  def default_depth(cls, model, draft_model, tree_spec):
    del model, draft_model  # a draft model drafts any gamma
    return base.depth_of_tree_spec(tree_spec, 4)

  @classmethod
  def check_tree(cls, tree, model):
    del model
    if not tree.is_chain and not isinstance(tree, dynamic_tree.DynamicTree):
      raise ValueError("drafter='model' drafts a chain of gamma tokens or a dynamic tree: use tree='chain', "
                       "chain(gamma) or 'dynamic:N'")

  @classmethod
  def extra_cache_slots(cls, model, tree):
    del model
    if isinstance(tree, dynamic_tree.DynamicTree):
      # Level 0 appends [pending drafts, root, padding] (depth + 1); deeper levels append the
      # non-root nodes so far after the root.
      return max(tree.depth + 1, tree.expanded_nodes)
    return max(2, tree.max_depth)   # [last draft, root], then the chain after the root

  @classmethod
  def own_module(cls, model, draft_model):
    del model
    return draft_model

  def init(self, ctx, prefill):
    batch = prefill.prompts_BT.shape[0]
    cache = models.init_cache(ctx.module, batch, self.cache_len)
    _, cache = models.prefill(ctx.module, prefill.prompts_BT, prefill.prompt_lengths_B, cache)
    if self.is_dynamic:
      return DraftModelTreeState(cache, jnp.zeros((batch, self.tree.depth), jnp.int32),
                                 jnp.zeros((batch,), jnp.int32))
    return DraftModelState(cache, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32))

  def _pick(self, logits_BV, select, j):
    """The draft at chain index j and its q (an empty q for argmax drafts); `select` is this
    step's `select_fn` (None: argmax)."""
    if select is None:
      return (jnp.argmax(logits_BV, -1).astype(jnp.int32),
              jnp.zeros((logits_BV.shape[0], 0), jnp.float32))
    return select(logits_BV, j + 1), self.probs(logits_BV)

  def propose(self, ctx, state, root_B, key):
    if self.is_dynamic:
      return self.propose_dynamic(ctx, state, root_B)
    draft_model, depth = ctx.module, self.tree.max_depth
    batch = root_B.shape[0]
    cache, pending_B = state.cache, state.pending_B
    # First forward: [previous last draft, root], masked so that rows without a pending draft see
    # (and commit) only the root.
    two_tokens_B2 = jnp.stack([state.last_draft_B, root_B], axis=1)
    depths_B2 = jnp.where(pending_B[:, None], jnp.array([0, 1]), jnp.array([0, 0])).astype(jnp.int32)
    mask_B22 = jnp.where(pending_B[:, None, None], jnp.tril(jnp.ones((2, 2), bool)),
                         jnp.eye(2, dtype=bool))
    douts, cache = models.extend(draft_model, two_tokens_B2, depths_B2, mask_B22, cache)
    select = self.select_fn(ctx, key, depth, batch)
    path_B2 = jnp.where(pending_B[:, None], jnp.array([0, 1]), jnp.array([1, 0])).astype(jnp.int32)
    cache = models.commit(cache, path_B2, jnp.where(pending_B, 2, 1).astype(jnp.int32))

    def draft_step(j, carry):
      cache, tok_B, tokens_BJ, q_BJV = carry
      douts, cache = models.extend(draft_model, tok_B[:, None], jnp.zeros((batch, 1), jnp.int32),
                                   jnp.ones((batch, 1, 1), bool), cache)
      cache = models.advance(cache, jnp.ones((batch,), jnp.int32))
      tok_B, q_BV = self._pick(douts.logits_BTV[:, 0], select, j)
      tokens_BJ = tokens_BJ.at[:, j].set(tok_B)
      q_BJV = q_BJV.at[:, j].set(q_BV) if self.sample_drafts else q_BJV
      return cache, tok_B, tokens_BJ, q_BJV

    tok_B, q_BV = self._pick(douts.logits_BTV[:, 1], select, 0)
    vocab = q_BV.shape[-1]
    tokens_BJ = jnp.zeros((batch, depth), jnp.int32).at[:, 0].set(tok_B)
    q_BJV = jnp.zeros((batch, depth, vocab), jnp.float32)
    if self.sample_drafts:
      q_BJV = q_BJV.at[:, 0].set(q_BV)
    cache, _, tokens_BJ, q_BJV = jax.lax.fori_loop(1, depth, draft_step,
                                                   (cache, tok_B, tokens_BJ, q_BJV))
    candidates = base.chain_candidates(root_B, tokens_BJ, q_BJV if self.sample_drafts else None)
    return candidates, state._replace(cache=cache)

  def expand(self, ctx, state, frontier):
    cache, batch = state.cache, frontier.tokens_BM.shape[0]
    if frontier.level == 0:
      # [pending drafts, root, padding]: causal; keep the pending drafts and the root.
      width, num_B = self.tree.depth + 1, state.num_pending_B
      j_W = jnp.arange(width)
      tokens_BW = jnp.where(j_W[None] < num_B[:, None],
                            jnp.pad(state.pending_BJ, ((0, 0), (0, 1))),
                            jnp.where(j_W[None] == num_B[:, None], frontier.tokens_BM[:, :1], 0))
      outs, cache = models.extend(ctx.module, tokens_BW, jnp.broadcast_to(j_W, (batch, width)),
                                  jnp.broadcast_to(jnp.tril(jnp.ones((width, width), bool)),
                                                   (batch, width, width)), cache)
      cache = models.advance(cache, num_B + 1)
      logits_BUV = base.gather_nodes(outs.logits_BTV, num_B[:, None])
    else:
      # The non-root nodes so far (the root is cached: depth d sits at position len + d - 1).
      outs, cache = models.extend(ctx.module, frontier.tokens_BM[:, 1:],
                                  frontier.depths_BM[:, 1:] - 1, frontier.mask_BMM[:, 1:, 1:], cache)
      logits_BUV = outs.logits_BTV[:, -frontier.num_frontier:]
    return jax.nn.log_softmax(logits_BUV, axis=-1), state._replace(cache=cache)

  def update(self, ctx, state, verify):
    if self.is_dynamic:
      # Active rows: the cache ends at the root (level 0); the accepted drafts are pending.
      # Finished rows: back to their committed tokens, nothing pending.
      active_B = verify.active_B
      lengths_B = verify.root_position_B + active_B.astype(jnp.int32)
      return DraftModelTreeState(state.cache.replace(lengths=lengths_B),
                                 base.gather_nodes(verify.tokens_BT, verify.path_BP[:, 1:]),
                                 jnp.where(active_B, verify.num_accepted_B, 0))
    depth = self.tree.max_depth
    num_B = verify.num_accepted_B
    keep_B = verify.root_position_B + 1 + jnp.minimum(num_B, depth - 1)
    # A finished row's cache goes back to its committed tokens: `propose` ran on it too (fixed
    # shapes), but it must not grow (the cache attention would scan up to the longest row).
    lengths_B = jnp.where(verify.active_B, keep_B, verify.root_position_B)
    return DraftModelState(state.cache.replace(lengths=lengths_B),
                           pending_B=verify.active_B & (num_B == depth),
                           last_draft_B=verify.tokens_BT[:, -1])
