"""Speculative decoding in one jitted `lax.while_loop`: draft -> verify a tree -> accept -> commit.

State between steps (per row): the trunk KV cache holds every committed token except the last
emitted one, the *root*; the root is node 0 of the next candidate tree. One step:

1. draft: the drafter (`jax_spec.decoding.drafters`, one module each behind `drafters.Drafter`)
   proposes the tokens of every tree node (depths 1..max_depth):
   - 'medusa': top-k of each Medusa head at the last committed position (path independent);
   - 'mtp': the model's own MTP modules chained (module k drafts depth k from the chain of drafts
     before it); the tree may branch only off the chain (rank > 0 only under all-rank-0 parents),
     the alternatives being the top-k of module k's logits;
   - 'model': a separate, smaller Transformer drafts gamma = max_depth tokens autoregressively
     (chains only) with its own KV cache.
2. verify: one trunk `extend` of all T tree nodes against the cache with the tree's ancestor mask;
   node t's logits give the target distribution p over its children.
3. accept (`jax_spec.decoding.acceptance`): greedy, rejection sampling or typical acceptance.
4. commit the root and the accepted nodes to the trunk cache (per row; the other slots are
   discarded); `Drafter.update` sees the accepted path; the next token becomes the new root.
5. emit the accepted tokens and the next token into the output buffer at each row's offset,
   truncated at EOS and at max_new_tokens.

Drafts are deterministic (argmax / top-k ranks; `acceptance.accept_rejection` with q = one-hot)
except when `sample_drafts` is on (default: rejection sampling at temperature > 0 on a chain),
where each draft token is sampled from the drafter's distribution processed with the same
temperature / top-k / top-p, and q is that distribution. At temperature 0 every rule is greedy.

Statistics: `tau` (mean accepted length) = tokens emitted per trunk verify forward, bonus token
included, i.e. the mean of (accepted draft tokens + 1) over the (row, step) pairs where the row was
still generating, counted before truncation at EOS / max_new_tokens. The token sampled from the
prefill logits is not part of any verify step and is excluded. With no verify step tau is 1.0.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_spec import models
from jax_spec.decoding import acceptance as acceptance_lib
from jax_spec.decoding import sampling
from jax_spec.decoding import drafters as drafters_lib
from jax_spec.decoding import dynamic_tree
from jax_spec.decoding import prepared as prepared_lib
from jax_spec.decoding.autoregressive import (check_cache_len, emit_first_token, eos_array,
                                              matmul_precision, validate_prompts)
from jax_spec.decoding.drafters.base import gather_nodes
from jax_spec.decoding.trees import get_tree
from jax_spec.kernels import rows_matmul

ACCEPTANCE_RULES = ('greedy', 'rejection', 'typical')


class SpeculativeStats(NamedTuple):
  verify_steps_B: jax.Array        # int32 [B]: verify forwards while the row was generating
  accepted_B: jax.Array            # int32 [B]: accepted draft tokens, summed over those steps
  accepted_hist_I: jax.Array       # int32 [max_depth + 1]: (row, step) pairs by accepted count
  loop_steps: jax.Array            # int32 []: iterations of the while loop (batched verifies)


class SpeculativeOutput(NamedTuple):
  tokens_BN: jax.Array             # int32 [B, max_new_tokens]; pad_id after each row's length
  lengths_B: jax.Array             # int32 [B]
  stats: SpeculativeStats


def summarize(stats: SpeculativeStats, lengths_B=None) -> dict:
  """Host-side summary: tau, per-depth acceptance rates and the accepted-length histogram.

  With no verify step (every row ended on its first token: max_new_tokens=1 or EOS first) tau is
  1.0 and every acceptance rate 0.0 (no draft was accepted); `verify_steps == 0` tells that case.
  """
  steps = int(np.sum(stats.verify_steps_B))
  accepted = int(np.sum(stats.accepted_B))
  hist = np.asarray(stats.accepted_hist_I, np.int64)
  at_least = np.cumsum(hist[::-1])[::-1]          # at_least[d] = pairs with >= d accepted
  out = {
      'verify_steps': steps,
      'loop_steps': int(stats.loop_steps),
      'accepted_tokens': accepted,
      # No verify step (max_new_tokens=1, EOS first): 1.0, as for a drafter that never helps.
      'mean_accepted_length': (accepted + steps) / steps if steps else 1.0,
      'accepted_length_hist': hist.tolist(),
      # P(depth d accepted | depth d - 1 accepted), and P(depth d accepted), for d = 1..max_depth.
      'acceptance_rate_per_depth': [float(at_least[d] / max(at_least[d - 1], 1))
                                    for d in range(1, len(hist))],
      'acceptance_per_depth': [float(at_least[d] / max(steps, 1)) for d in range(1, len(hist))],
  }
  if lengths_B is not None:
    out['tokens_generated'] = int(np.sum(lengths_B))
  return out


def _resolve_tree(spec, num_draft):
  """A static `Tree` (trees.get_tree) or a `DynamicTree` ('dynamic', 'dynamic:N[:K]', an instance)."""
  if isinstance(spec, dynamic_tree.DynamicTree):
    if spec.depth > num_draft:
      raise ValueError(f'tree has depth {spec.depth} but the drafter provides only {num_draft} '
                       f'draft position(s)')
    return spec
  if isinstance(spec, str) and spec.startswith('dynamic'):
    return dynamic_tree.parse(spec, num_draft)
  return get_tree(spec, num_draft)


def _check_tree(tree, drafter_cls, model):
  if isinstance(tree, dynamic_tree.DynamicTree):
    if not drafter_cls.supports_dynamic_trees:
      raise ValueError(f'drafter={drafter_cls.name!r} does not build dynamic trees')
    max_rank = tree.branching
  else:
    if tree.max_depth < 1:
      raise ValueError('the tree must have at least one draft node')
    max_rank = max(tree.topk_per_depth)
  drafter_cls.check_tree(tree, model)
  if max_rank > model.config.vocab_size:
    raise ValueError(f'tree uses top-{max_rank} candidates but the vocabulary has '
                     f'{model.config.vocab_size}')


def speculative_generate(model, prompts_BT, prompt_lengths_B, *, drafter: str = 'mtp',
                         draft_model=None, tree='chain', num_draft: int | None = None,
                         acceptance: str | None = None, max_new_tokens: int,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         eos_id: int | None = None, pad_id: int = 0, rng=None,
                         sample_drafts: bool | None = None, typical_eps: float = 0.09,
                         typical_delta: float = 0.3,
                         cache_len: int | None = None) -> SpeculativeOutput:
  """Speculative sampling from `model` (see the module docstring).

  drafter: a name registered in `jax_spec.decoding.drafters` ('mtp', 'medusa', 'model', ...).
  acceptance: 'greedy', 'rejection' (exact: the output is distributed as the processed target) or
    'typical' (Medusa's, not exact). Default: 'greedy' at temperature 0, 'rejection' otherwise;
    'greedy' with temperature > 0 is an error (it would decode greedily after a sampled first token).
  tree: a `Tree`, a list of rank paths, or a name for `trees.get_tree` ('chain', 'chainN',
    'default', 'default:N'); or a dynamic tree built per step from the drafter's confidences
    (EAGLE-2): a `dynamic_tree.DynamicTree(num_draft_nodes, branching, depth)` or 'dynamic',
    'dynamic:N', 'dynamic:N:K' (N draft nodes, K children per expanded node, depth `num_draft`).
    Names are resolved against `num_draft` draft positions (default: the drafter's: MTP depth,
    Medusa heads; 4 for a draft model).
  cache_len: KV cache slots of the trunk and the drafter; default: what the request needs (prompt,
    `max_new_tokens`, the last step's overshoot and the tree's scratch) rounded up to a multiple
    of 16.
  model: a Transformer, or one `decoding.prepare`d once for many calls (with its draft model, if
    any: then `draft_model` may be omitted).
  Returns the tokens, lengths and `SpeculativeStats` (see `summarize`).
  """
  prompts_BT, prompt_lengths_B = validate_prompts(prepared_lib.model_of(model), prompts_BT,
                                                  prompt_lengths_B, max_new_tokens, eos_id, pad_id)
  prepared = prepared_lib.as_prepared(model, draft_model)
  model, draft_model = prepared.model, prepared.draft_model
  drafter_cls = drafters_lib.registered().get(drafter) if isinstance(drafter, str) else None
  if drafter_cls is None:
    raise ValueError(f'drafter must be one of {sorted(drafters_lib.registered())}, got {drafter!r}')
  if acceptance is not None and acceptance not in ACCEPTANCE_RULES:
    raise ValueError(f'acceptance must be None or one of {ACCEPTANCE_RULES}, got {acceptance!r}')
  drafter_cls.check_model(model, draft_model)
  if num_draft is None:
    num_draft = drafter_cls.default_depth(model, draft_model, tree)
  tree = _resolve_tree(tree, num_draft)
  _check_tree(tree, drafter_cls, model)
  sc = sampling.SamplingConfig(temperature, top_k, top_p)
  if acceptance is None:
    acceptance = 'greedy' if sc.greedy else 'rejection'
  elif acceptance == 'greedy' and not sc.greedy:
    raise ValueError(f"acceptance='greedy' needs temperature=0, got temperature={temperature!r}: use "
                     f"acceptance='rejection' (the default at temperature > 0) to sample exactly "
                     f"from the target, or temperature=0")
  if rng is None:
    if not sc.greedy:
      raise ValueError('rng must be a jax.random key when temperature > 0')
    rng = jax.random.key(0)
  if sample_drafts is None:
    sample_drafts = acceptance == 'rejection' and not sc.greedy and tree.is_chain
  if sample_drafts and (acceptance != 'rejection' or not tree.is_chain):
    raise ValueError('sample_drafts=True needs acceptance="rejection" and a chain tree')
  if sc.greedy:
    sample_drafts = False
  for name, value in (('typical_eps', typical_eps), ('typical_delta', typical_delta)):
    if not isinstance(value, (int, float)) or not value > 0:
      raise ValueError(f'{name} must be a positive float, got {value!r}')
  # A row commits fewer than prompt + max_new_tokens + max_depth tokens (its last step may accept
  # a whole path past max_new_tokens); a step then writes past them its tree into the trunk
  # cache and the drafter's scratch into its own caches, finished rows included (fixed shapes).
  committed = prompts_BT.shape[1] + max_new_tokens + tree.max_depth - 1
  scratch = max(tree.num_nodes, drafter_cls.extra_cache_slots(model, tree))
  cache_len = check_cache_len(cache_len, committed + scratch,
                              f'a prompt of {prompts_BT.shape[1]} plus {max_new_tokens} new tokens, '
                              f'a tree of {tree.num_nodes} nodes and drafter={drafter!r}')
  own = drafter_cls.own_module(model, draft_model)
  if own is not None and own is not draft_model:
    raise ValueError(f'drafter {drafter!r}: own_module must be the draft model (the one module '
                     f'prepared besides the trunk)')
  trunk, own_split = prepared.trunk, (prepared.draft if own is not None else None)
  settings = _Settings(drafter=drafter_cls(tree=tree, sampling=sc, sample_drafts=bool(sample_drafts),
                                           cache_len=cache_len),
                       acceptance=acceptance if not sc.greedy else 'greedy', pad_id=pad_id,
                       max_new_tokens=max_new_tokens, typical_eps=float(typical_eps),
                       typical_delta=float(typical_delta))
  with matmul_precision(model):  # the baseline's precision: see autoregressive.matmul_precision
    return _speculative(trunk.static, (trunk.state, trunk.packs),
                        own_split.static if own_split else None,
                        (own_split.state, own_split.packs) if own_split else None,
                        prompts_BT, prompt_lengths_B, rng, eos_array(eos_id), settings=settings)


class _Settings(NamedTuple):
  """Static settings of one compiled loop (the drafter holds the tree and sampling config)."""
  drafter: drafters_lib.Drafter
  acceptance: str
  pad_id: int
  max_new_tokens: int
  typical_eps: float
  typical_delta: float


class LoopState(NamedTuple):
  """The `lax.while_loop` carry."""
  cache: models.KVCache        # trunk cache: every committed token except the root
  root_B: jax.Array            # int32 [B]: the last emitted token, node 0 of the next tree
  done_B: jax.Array            # bool [B]
  buffer_BN: jax.Array         # int32 [B, max_new_tokens + max_depth + 1]: emitted tokens
  num_out_B: jax.Array         # int32 [B]: tokens emitted so far
  drafter: Any                 # the drafter's own state pytree
  stats: SpeculativeStats


def _accept(s, tree, key, candidates, logits_BTV):
  if s.acceptance == 'greedy':
    return acceptance_lib.accept_greedy(tree, candidates.tokens_BT, logits_BTV)
  p_BTV = s.drafter.probs(logits_BTV)
  if s.acceptance == 'rejection':
    return acceptance_lib.accept_rejection(tree, key, candidates.tokens_BT, p_BTV,
                                           candidates.draft_probs_BTV)
  return acceptance_lib.accept_typical(tree, key, candidates.tokens_BT, p_BTV,
                                       eps=s.typical_eps, delta=s.typical_delta)


def emit(tokens_BT, acc, num_B, active_B, done_B, buffer_BN, num_out_B, eos_id, *, pad_id: int,
         max_new_tokens: int):
  """Writes a step's accepted draft tokens, then its next token, at each row's output offset.

  Truncates at EOS and at `max_new_tokens`; finished rows (`~active_B`) write padding past the
  end. Returns (buffer_BN, num_out_B, done_B). `buffer_BN` has `max_new_tokens + max_depth + 1`
  columns, so a whole accepted path always fits.
  """
  depth = acc.path_BP.shape[1] - 1
  out_width = buffer_BN.shape[1]
  j_P = jnp.arange(depth + 1)
  nodes_BP = gather_nodes(tokens_BT, jnp.maximum(acc.path_BP, 0))
  shifted_BP = jnp.concatenate([nodes_BP[:, 1:], nodes_BP[:, :1]], axis=1)
  emit_BP = jnp.where(j_P[None] < num_B[:, None], shifted_BP,
                      jnp.where(j_P[None] == num_B[:, None], acc.next_token_B[:, None], pad_id))
  count_B = num_B + 1
  is_eos_BP = (emit_BP == eos_id) & (j_P[None] <= num_B[:, None])
  hit_eos_B = jnp.any(is_eos_BP, axis=1)
  count_B = jnp.where(hit_eos_B, jnp.argmax(is_eos_BP, axis=1) + 1, count_B)
  count_B = jnp.minimum(count_B, max_new_tokens - num_out_B)
  count_B = jnp.where(active_B, count_B, 0)
  buffer_BN = jax.vmap(lambda buf, e, off: jax.lax.dynamic_update_slice(buf, e, (off,)))(
      buffer_BN, jnp.where(active_B[:, None], emit_BP, pad_id),
      jnp.where(active_B, num_out_B, out_width - depth - 1))
  num_out_B = num_out_B + count_B
  done_B = done_B | (active_B & hit_eos_B) | (num_out_B >= max_new_tokens)
  return buffer_BN, num_out_B, done_B


@functools.partial(jax.jit, static_argnames=('graphdef', 'own_graphdef', 'settings'))
def _speculative(graphdef, state_and_packs, own_graphdef, own_state_and_packs, prompts_BT,
                 prompt_lengths_B, rng, eos_id, *, settings):
  s = settings
  drafter = s.drafter
  tree, sc = drafter.tree, drafter.sampling
  model, packs_by_key = prepared_lib.merge(graphdef, *state_and_packs)
  own = None
  if own_graphdef is not None:
    own, own_packs = prepared_lib.merge(own_graphdef, *own_state_and_packs)
    packs_by_key = {**packs_by_key, **own_packs}
  ctx = drafters_lib.Context(model, own)
  with rows_matmul.packed(packs_by_key):   # the prefill's and every step's: none packed here
    batch = prompts_BT.shape[0]
    num_nodes, depth = tree.num_nodes, tree.max_depth
    if not drafter.is_dynamic:
      static_depths_BT = jnp.broadcast_to(jnp.asarray(tree.depth_T), (batch, num_nodes))
      static_mask_BTT = jnp.broadcast_to(jnp.asarray(tree.ancestor_mask_TT),
                                         (batch, num_nodes, num_nodes))

    # --- prefill -------------------------------------------------------------------------------
    # Every key of the call in one PRNG call: row 0 the prefill's, row i the i-th verify step's
    # (a row emits >= 1 token per step, so there are < max_new_tokens steps).
    keys_SK = sampling.step_keys(rng, s.max_new_tokens + 1, 3)
    key_first, key_draft = keys_SK[0, 0], keys_SK[0, 1]
    cache = models.init_cache(model, batch, drafter.cache_len)
    outs, cache = models.prefill(model, prompts_BT, prompt_lengths_B, cache)
    root_B = emit_first_token(outs.logits_BTV, prompt_lengths_B, key_first, sc)
    drafter_state = drafter.init(ctx, drafters_lib.Prefill(outs, prompts_BT, prompt_lengths_B,
                                                           root_B, key_draft))

    out_width = s.max_new_tokens + depth + 1
    buffer_BN = jnp.full((batch, out_width), s.pad_id, jnp.int32).at[:, 0].set(root_B)
    done_B = (root_B == eos_id) | (s.max_new_tokens <= 1)
    stats = SpeculativeStats(jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32),
                             jnp.zeros((depth + 1,), jnp.int32), jnp.int32(0))

    # --- the loop --------------------------------------------------------------------------------
    def cond(carry: LoopState):
      return ~jnp.all(carry.done_B)

    def body(carry: LoopState):
      cache, root_B, done_B = carry.cache, carry.root_B, carry.done_B
      k_draft, k_accept, k_next_draft = keys_SK[carry.stats.loop_steps + 1]
      active_B = ~done_B
      candidates, drafter_state = drafter.propose(ctx, carry.drafter, root_B, k_draft)
      tokens_BT = candidates.tokens_BT
      if candidates.tree is None:
        step_tree, depths_BT, mask_BTT = tree, static_depths_BT, static_mask_BTT
      else:   # built this step (dynamic tree): per-row arrays
        step_tree = candidates.tree.arrays
        depths_BT, mask_BTT = candidates.tree.depths_BT, candidates.tree.mask_BTT

      outs, cache_ext = models.extend(model, tokens_BT, depths_BT, mask_BTT, cache)
      acc = _accept(s, step_tree, k_accept, candidates, outs.logits_BTV)
      num_B = jnp.where(active_B, acc.num_accepted_B, 0)
      path_BP = jnp.maximum(acc.path_BP, 0)
      keep_B = jnp.where(active_B, num_B + 1, 0)
      # A chain's accepted path is its prefix, already in place: only the lengths move.
      new_cache = (models.advance(cache_ext, keep_B) if tree.is_chain else
                   models.commit(cache_ext, path_BP, keep_B))

      buffer_BN, num_out_B, done_B = emit(tokens_BT, acc, num_B, active_B, done_B, carry.buffer_BN,
                                          carry.num_out_B, eos_id, pad_id=s.pad_id,
                                          max_new_tokens=s.max_new_tokens)

      drafter_state = drafter.update(ctx, drafter_state, drafters_lib.Verify(
          outs, tokens_BT, acc, active_B, num_B, cache.lengths, k_next_draft))
      st = carry.stats
      stats = SpeculativeStats(
          st.verify_steps_B + active_B.astype(jnp.int32), st.accepted_B + num_B,
          st.accepted_hist_I + jnp.sum(jax.nn.one_hot(num_B, depth + 1, dtype=jnp.int32)
                                       * active_B[:, None], axis=0),
          st.loop_steps + 1)
      return LoopState(new_cache, jnp.where(active_B, acc.next_token_B, root_B), done_B, buffer_BN,
                       num_out_B, drafter_state, stats)

    carry = LoopState(cache, root_B, done_B, buffer_BN, jnp.ones((batch,), jnp.int32),
                      drafter_state, stats)
    carry = jax.lax.while_loop(cond, body, carry)
    tokens_BN = carry.buffer_BN[:, :s.max_new_tokens]
    tokens_BN = jnp.where(jnp.arange(s.max_new_tokens)[None] < carry.num_out_B[:, None], tokens_BN,
                          s.pad_id)
    return SpeculativeOutput(tokens_BN, carry.num_out_B, carry.stats)
