"""Feature drafters: one module applied autoregressively to any depth (`jax_spec.models.eagle`).

- 'eagle': the model's EAGLE module (`config.eagle_layers` > 0).
- 'mtp_recursive': MTP module 1 reused recursively, so a model with `mtp_depth` MTP modules drafts
  chains and trees of any depth (vLLM's reuse of a DeepSeek MTP module).

After the prefill and after every verify, `models.eagle.feature_update` feeds the newly committed
positions (the accepted path's trunk hidden states and tokens) to the drafter's own KV cache and
returns the depth-1 distribution; `propose` then drafts a chain (one cached step per depth, each
reading the feature predicted by the step before) or a static tree (one call per depth over the
tree's breadth-first prefix, with the ancestor mask). With sampled drafts (rejection sampling on a
chain) draft d is sampled from the processed distribution of step d, and q is that distribution.
"""
from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from jax_spec.decoding import sampling
from jax_spec.decoding.drafters import base
from jax_spec.models import eagle as eagle_lib


class FeatureState(NamedTuple):
  cache: eagle_lib.FeatureCache
  logits_BV: jax.Array          # fp32 [B, V]: depth-1 distribution (of the root's child)


class _FeatureDrafter(base.Drafter):
  kind: ClassVar[str] = ''
  DEFAULT_DEPTH: ClassVar[int] = 4

  @classmethod
  def check_model(cls, model, draft_model):
    del draft_model
    eagle_lib.drafter_module(model, cls.kind)   # raises if the model lacks the module

  @classmethod
  def default_depth(cls, model, draft_model, tree_spec):
    del model, draft_model, tree_spec
    return cls.DEFAULT_DEPTH

  def _select_fn(self, key):
    if not self.sample_drafts:
      return None      # argmax
    return lambda logits_BV, d: sampling.sample_probs(jax.random.fold_in(key, d),
                                                      self.probs(logits_BV))

  def _update(self, ctx, cache, hidden_BAD, tokens_BA, num_new_B, next_token_B):
    logits_BV, cache = eagle_lib.feature_update(ctx.trunk, cache, hidden_BAD, tokens_BA, num_new_B,
                                                next_token_B, kind=self.kind)
    return FeatureState(cache, logits_BV)

  def init(self, ctx, prefill):
    cache = eagle_lib.init_feature_cache(ctx.trunk, prefill.prompts_BT.shape[0], self.cache_len,
                                         kind=self.kind)
    return self._update(ctx, cache, prefill.outputs.hidden_BTD, prefill.prompts_BT,
                        prefill.prompt_lengths_B, prefill.root_B)

  def propose(self, ctx, state, root_B, key):
    tree = self.tree
    if tree.is_chain:
      draft, _ = eagle_lib.feature_chain(ctx.trunk, state.cache, state.logits_BV,
                                         depth=tree.max_depth, kind=self.kind,
                                         select_fn=self._select_fn(key))
      tokens_BT = jnp.concatenate([root_B[:, None], draft.tokens_BD], axis=1)
      if not self.sample_drafts:
        return base.Candidates(tokens_BT), state
      # q of node t's children is step t + 1's distribution; the leaf's is unused.
      q_BDV = self.probs(draft.logits_BDV)
      return base.Candidates(tokens_BT, jnp.concatenate([q_BDV, q_BDV[:, -1:]], axis=1)), state
    tokens_BT, _ = eagle_lib.feature_tree_draft(ctx.trunk, state.cache, state.logits_BV, tree,
                                                   kind=self.kind)
    return base.Candidates(tokens_BT.at[:, 0].set(root_B)), state

  def update(self, ctx, state, verify):
    path_BP = verify.path_BP
    return self._update(ctx, state.cache, base.gather_nodes(verify.outputs.hidden_BTD, path_BP),
                        base.gather_nodes(verify.tokens_BT, path_BP),
                        jnp.where(verify.active_B, verify.num_accepted_B + 1, 0),
                        verify.accepted.next_token_B)


@base.register
class EagleDrafter(_FeatureDrafter):
  name = 'eagle'
  kind = 'eagle'


@base.register
class RecursiveMTPDrafter(_FeatureDrafter):
  name = 'mtp_recursive'
  kind = 'mtp'
