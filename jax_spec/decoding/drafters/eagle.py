"""Feature drafters: one module applied autoregressively to any depth (`jax_spec.models.eagle`).

- 'eagle': the model's EAGLE module (`config.eagle_layers` > 0).
- 'mtp_recursive': MTP module 1 reused recursively, so a model with `mtp_depth` MTP modules drafts
  chains and trees of any depth (vLLM's reuse of a DeepSeek MTP module).

After the prefill and after every verify, `models.eagle.feature_update` feeds the newly committed
positions (the accepted path's trunk hidden states and tokens) to the drafter's own KV cache and
returns the depth-1 distribution; `propose` then drafts a chain (one cached step per depth, each
reading the feature predicted by the step before), a static tree (one call per depth over the
tree's breadth-first prefix, with the ancestor mask) or a dynamic tree (EAGLE-2: `expand` scores
the frontier's children with one such call per level over the entries expanded so far). With sampled drafts (rejection sampling on a
chain) draft d is sampled from the processed distribution of step d, and q is that distribution.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jax_spec.decoding import dynamic_tree
from jax_spec.decoding.drafters import base
from jax_spec.models import eagle as eagle_lib


class FeatureState(NamedTuple):
  cache: eagle_lib.FeatureCache
  logits_BV: jax.Array          # fp32 [B, V]: depth-1 distribution (of the root's child)
  # Dynamic trees: the features predicted at the entries expanded so far this step (entry 0, the
  # root: `cache.feature_BD`), [B, 1 + (D - 1) k, d_model]; [B, 0, d_model] otherwise.
  tree_features_BMD: jax.Array


class _FeatureDrafter(base.Drafter):
  kind: ClassVar[str] = ''
  DEFAULT_DEPTH: ClassVar[int] = 4
  supports_dynamic_trees = True

  @classmethod
  def check_model(cls, model, draft_model):
    del draft_model
    eagle_lib.drafter_module(model, cls.kind)   # raises if the model lacks the module

  @classmethod
  def default_depth(cls, model, draft_model, tree_spec):
    del model, draft_model  # one module drafts to any depth
    return base.depth_of_tree_spec(tree_spec, cls.DEFAULT_DEPTH)

  @classmethod
  def extra_cache_slots(cls, model, tree):
    # `feature_update` writes the path (max_depth + 1) from the root; drafting then writes its
    # non-root nodes as scratch past the committed entries (a chain: max_depth - 1 of them).
    del model
    nodes = tree.expanded_nodes if isinstance(tree, dynamic_tree.DynamicTree) else tree.num_nodes
    return max(tree.max_depth + 1, nodes - 1)

  def _update(self, ctx, state, committed: base.Committed):
    logits_BV, cache = eagle_lib.feature_update(ctx.trunk, state.cache, *committed, kind=self.kind)
    return state._replace(cache=cache, logits_BV=logits_BV)

  def init(self, ctx, prefill):
    batch = prefill.prompts_BT.shape[0]
    cache = eagle_lib.init_feature_cache(ctx.trunk, batch, self.cache_len, kind=self.kind)
    entries = self.tree.expanded_nodes if self.is_dynamic else 0
    features_BMD = jnp.zeros((batch, entries, ctx.trunk.config.d_model), cache.feature_BD.dtype)
    state = FeatureState(cache, jnp.zeros((batch, ctx.trunk.config.vocab_size), jnp.float32),
                         features_BMD)
    return self._update(ctx, state, prefill.committed)

  def propose(self, ctx, state, root_B, key):
    if self.is_dynamic:
      return self.propose_dynamic(ctx, state, root_B)
    tree = self.tree
    if tree.is_chain:
      draft, cache = eagle_lib.feature_chain(ctx.trunk, state.cache, state.logits_BV,
                                             depth=tree.max_depth, kind=self.kind,
                                             select_fn=self.select_fn(ctx, key, tree.max_depth,
                                                                      root_B.shape[0]))
      q_BJV = self.probs(draft.logits_BJV) if self.sample_drafts else None
      # The drafts' scratch slots (past `lengths`) are overwritten by the next update; keeping
      # the written cache lets XLA update it in place instead of copying it first.
      return base.chain_candidates(root_B, draft.tokens_BJ, q_BJV), state._replace(cache=cache)
    tokens_BT, _ = eagle_lib.feature_tree_draft(ctx.trunk, state.cache, state.logits_BV, tree,
                                                   kind=self.kind)
    return base.Candidates(tokens_BT.at[:, 0].set(root_B)), state

  def expand(self, ctx, state, frontier):
    """Children of the frontier: the root's from the last update; deeper nodes' from one
    `feature_tree_step` over the non-root entries so far, each reading its parent's feature."""
    if frontier.level == 0:
      return jax.nn.log_softmax(state.logits_BV, axis=-1)[:, None], state
    depths_BM, mask_BMM = frontier.depths_BM, frontier.mask_BMM
    num = depths_BM.shape[1]
    features_BMD = state.tree_features_BMD[:, :num].at[:, 0].set(state.cache.feature_BD)
    new_BMD, logits_BMV = eagle_lib.feature_tree_step(
        ctx.trunk, state.cache, base.gather_nodes(features_BMD, frontier.parent_BM[:, 1:]),
        frontier.tokens_BM[:, 1:], depths_BM[:, 1:], mask_BMM[:, 1:, 1:], kind=self.kind)
    features = state.tree_features_BMD.at[:, 1:num].set(new_BMD.astype(features_BMD.dtype))
    logp_BUV = jax.nn.log_softmax(logits_BMV[:, -frontier.num_frontier:], axis=-1)
    return logp_BUV, state._replace(tree_features_BMD=features)

  def update(self, ctx, state, verify):
    return self._update(ctx, state, verify.committed)


@base.register
class EagleDrafter(_FeatureDrafter):
  name = 'eagle'
  kind = 'eagle'


@base.register
class RecursiveMTPDrafter(_FeatureDrafter):
  name = 'mtp_recursive'
  kind = 'mtp'
