"""Speculative decoding in one jitted `lax.while_loop`: draft -> verify a tree -> accept -> commit.

State between steps (per row): the trunk KV cache holds every committed token except the last
emitted one, the *root*; the root is node 0 of the next candidate tree. One step:

1. draft: the drafter proposes tokens for tree depths 1..max_depth
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
   discarded), and to the drafter's state; the next token becomes the new root.
5. emit the accepted tokens and the next token into the output buffer at each row's offset,
   truncated at EOS and at max_new_tokens.

Drafts are deterministic (argmax / top-k ranks; `acceptance.accept_rejection` with q = one-hot)
except when `sample_drafts` is on (default: rejection sampling at temperature > 0 on a chain),
where each draft token is sampled from the drafter's distribution processed with the same
temperature / top-k / top-p, and q is that distribution. At temperature 0 every rule is greedy.

Statistics: `tau` (mean accepted length) = tokens emitted per trunk verify forward, bonus token
included, i.e. the mean of (accepted draft tokens + 1) over the (row, step) pairs where the row was
still generating, counted before truncation at EOS / max_new_tokens. The token sampled from the
prefill logits is not part of any verify step and is excluded.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_spec import models
from jax_spec.decoding import acceptance as acceptance_lib
from jax_spec.decoding import sampling
from jax_spec.decoding.autoregressive import (TRACE_COUNTS, check_cache_len, emit_first_token,
                                              eos_array, matmul_precision, validate_prompts)
from jax_spec.decoding.trees import Tree, get_tree

DRAFTERS = ('mtp', 'medusa', 'model')
ACCEPTANCE_RULES = ('greedy', 'rejection', 'typical')


class SpeculativeStats(NamedTuple):
  verify_steps_B: jax.Array        # int32 [B]: verify forwards while the row was generating
  accepted_B: jax.Array            # int32 [B]: accepted draft tokens, summed over those steps
  accepted_hist_A: jax.Array       # int32 [max_depth + 1]: (row, step) pairs by accepted count
  loop_steps: jax.Array            # int32 []: iterations of the while loop (batched verifies)


class SpeculativeOutput(NamedTuple):
  tokens_BN: jax.Array             # int32 [B, max_new_tokens]; pad_id after each row's length
  lengths_B: jax.Array             # int32 [B]
  stats: SpeculativeStats


def summarize(stats: SpeculativeStats, lengths_B=None) -> dict:
  """Host-side summary: tau, per-depth acceptance rates and the accepted-length histogram."""
  steps = int(np.sum(stats.verify_steps_B))
  accepted = int(np.sum(stats.accepted_B))
  hist = np.asarray(stats.accepted_hist_A, np.int64)
  at_least = np.cumsum(hist[::-1])[::-1]          # at_least[d] = pairs with >= d accepted
  out = {
      'verify_steps': steps,
      'loop_steps': int(stats.loop_steps),
      'accepted_tokens': accepted,
      'mean_accepted_length': (accepted + steps) / max(steps, 1),
      'accepted_length_hist': hist.tolist(),
      # P(depth d accepted | depth d - 1 accepted), and P(depth d accepted), for d = 1..max_depth.
      'acceptance_rate_per_depth': [float(at_least[d] / max(at_least[d - 1], 1))
                                    for d in range(1, len(hist))],
      'acceptance_per_depth': [float(at_least[d] / max(steps, 1)) for d in range(1, len(hist))],
  }
  if lengths_B is not None:
    out['tokens_generated'] = int(np.sum(lengths_B))
  return out


def _check_tree_for_drafter(tree, drafter, config, draft_model):
  if drafter == 'medusa':
    if not config.medusa_heads:
      raise ValueError("drafter='medusa' needs a model with Medusa heads (config.medusa_heads == 0)")
    if tree.max_depth > config.medusa_heads:
      raise ValueError(f'tree depth {tree.max_depth} > the {config.medusa_heads} Medusa heads')
  elif drafter == 'mtp':
    if not config.mtp_depth:
      raise ValueError("drafter='mtp' needs a model with MTP modules (config.mtp_depth == 0)")
    if tree.max_depth > config.mtp_depth:
      raise ValueError(f'tree depth {tree.max_depth} > the {config.mtp_depth} MTP modules')
    for path in tree.choices:
      if any(path[:-1]):
        raise ValueError(f"drafter='mtp' drafts one chain; a tree may only branch off it (rank > 0 "
                         f"only under all-rank-0 parents), got path {list(path)}")
  elif drafter == 'model':
    if not isinstance(draft_model, models.Transformer):
      raise ValueError(f"drafter='model' needs draft_model, a jax_spec.models.Transformer, got "
                       f"{type(draft_model).__name__}")
    if draft_model.config.vocab_size != config.vocab_size:
      raise ValueError(f'draft_model vocab_size {draft_model.config.vocab_size} != the target '
                       f'model vocab_size {config.vocab_size}')
    if not tree.is_chain:
      raise ValueError("drafter='model' drafts a chain of gamma tokens: use tree='chain' or chain(gamma)")
  if tree.max_depth < 1:
    raise ValueError('the tree must have at least one draft node')
  max_rank = max(tree.topk_per_depth)
  if max_rank > config.vocab_size:
    raise ValueError(f'tree uses top-{max_rank} candidates but the vocabulary has {config.vocab_size}')


def speculative_generate(model, prompts_BT, prompt_lengths_B, *, drafter: str = 'mtp',
                         draft_model=None, tree='chain', num_draft: int | None = None,
                         acceptance: str = 'greedy', max_new_tokens: int,
                         temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         eos_id: int | None = None, pad_id: int = 0, rng=None,
                         sample_drafts: bool | None = None, typical_eps: float = 0.09,
                         typical_delta: float = 0.3,
                         cache_len: int | None = None) -> SpeculativeOutput:
  """Speculative sampling from `model` (see the module docstring).

  tree: a `Tree`, a list of rank paths, or a name for `trees.get_tree` ('chain', 'chainN',
    'default', 'default:N'); names are resolved against `num_draft` draft positions (default: the
    drafter's: MTP depth, Medusa heads; 4 for a draft model).
  Returns the tokens, lengths and `SpeculativeStats` (see `summarize`).
  """
  prompts_BT, prompt_lengths_B = validate_prompts(model, prompts_BT, prompt_lengths_B,
                                                  max_new_tokens, eos_id, pad_id)
  if drafter not in DRAFTERS:
    raise ValueError(f'drafter must be one of {DRAFTERS}, got {drafter!r}')
  if acceptance not in ACCEPTANCE_RULES:
    raise ValueError(f'acceptance must be one of {ACCEPTANCE_RULES}, got {acceptance!r}')
  config = model.config
  if num_draft is None and drafter == 'model' and not isinstance(tree, str):
    # A draft model drafts any gamma: an explicit chain sets it.
    num_draft = (tree if isinstance(tree, Tree) else Tree.from_choices(tree)).max_depth
  if num_draft is None:
    num_draft = {'mtp': config.mtp_depth, 'medusa': config.medusa_heads, 'model': 4}[drafter]
    if num_draft == 0:
      _check_tree_for_drafter(Tree.from_choices([[0]]), drafter, config, draft_model)
  tree = get_tree(tree, num_draft)
  _check_tree_for_drafter(tree, drafter, config, draft_model)
  sc = sampling.SamplingConfig(temperature, top_k, top_p)
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
  extra = tree.num_nodes + tree.max_depth + max(config.mtp_depth, 1) + 1
  cache_len = check_cache_len(cache_len, prompts_BT.shape[1] + max_new_tokens + extra,
                              f'a prompt of {prompts_BT.shape[1]} plus {max_new_tokens} new tokens '
                              f'and a tree of {tree.num_nodes} nodes')
  graphdef, state = nnx.split(model)
  if drafter == 'model':
    draft_graphdef, draft_state = nnx.split(draft_model)
  else:
    draft_graphdef, draft_state = None, None
  settings = _Settings(drafter=drafter, tree=tree, acceptance=acceptance if not sc.greedy else
                       'greedy', sampling=sc, sample_drafts=bool(sample_drafts),
                       pad_id=pad_id, max_new_tokens=max_new_tokens, cache_len=cache_len,
                       typical_eps=float(typical_eps), typical_delta=float(typical_delta))
  with matmul_precision(model):  # the baseline's precision: see autoregressive.matmul_precision
    return _speculative(graphdef, state, draft_graphdef, draft_state, prompts_BT,
                        prompt_lengths_B, rng, eos_array(eos_id), settings=settings)


class _Settings(NamedTuple):
  drafter: str
  tree: Tree
  acceptance: str
  sampling: sampling.SamplingConfig
  sample_drafts: bool
  pad_id: int
  max_new_tokens: int
  cache_len: int
  typical_eps: float
  typical_delta: float


def _probs(logits, sc):
  return sampling.target_probs(logits, temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p)


def _gather_nodes(x_BT, idx_BP):
  """x[b, idx[b, p]] for x [B, T, ...] and idx [B, P] (idx >= 0)."""
  idx = idx_BP.reshape(idx_BP.shape + (1,) * (x_BT.ndim - 2))
  return jnp.take_along_axis(x_BT, idx, axis=1)


def _tree_tokens_from_ranks(tree, root_B, topk_DBk, chain_BD=None):
  """Node tokens: root, then for node t the rank_t-th candidate of depth_t (chain override rank 0)."""
  depth_T, rank_T = tree.depth_T[1:] - 1, tree.rank_T[1:]
  nodes_BT = topk_DBk[depth_T, :, rank_T].T                 # [B, T-1]
  if chain_BD is not None:
    nodes_BT = jnp.where(jnp.asarray(rank_T == 0)[None], chain_BD[:, depth_T], nodes_BT)
  return jnp.concatenate([root_B[:, None], nodes_BT], axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'draft_graphdef', 'settings'))
def _speculative(graphdef, state, draft_graphdef, draft_state, prompts_BT, prompt_lengths_B, rng,
                 eos_id, *, settings):
  TRACE_COUNTS['speculative'] += 1
  s = settings
  tree, sc = s.tree, s.sampling
  model = nnx.merge(graphdef, state)
  draft_model = nnx.merge(draft_graphdef, draft_state) if s.drafter == 'model' else None
  batch = prompts_BT.shape[0]
  num_nodes, depth = tree.num_nodes, tree.max_depth
  rows_B = jnp.arange(batch)
  depths_BT = jnp.broadcast_to(jnp.asarray(tree.depth_T), (batch, num_nodes))
  mask_BTT = jnp.broadcast_to(jnp.asarray(tree.ancestor_mask_TT), (batch, num_nodes, num_nodes))
  kmax = max(tree.topk_per_depth)

  def select_fn(key):
    if not s.sample_drafts:
      return None      # argmax
    return lambda logits_BV, k: sampling.sample_probs(jax.random.fold_in(key, k), _probs(logits_BV, sc))

  # --- prefill ---------------------------------------------------------------------------------
  key0, key_first, key_draft = jax.random.split(jax.random.fold_in(rng, 0), 3)
  cache = models.init_cache(model, batch, s.cache_len)
  outs, cache = models.prefill(model, prompts_BT, prompt_lengths_B, cache)
  root_B = emit_first_token(outs.logits_BTV, prompt_lengths_B, key_first, sc)
  drafter_state = {}
  if s.drafter == 'medusa':
    drafter_state['medusa_KBV'] = outs.medusa_logits_KBTV[:, rows_B, prompt_lengths_B - 1]
  elif s.drafter == 'mtp':
    mtp_cache = models.init_mtp_cache(model, batch, s.cache_len)
    draft, mtp_cache = models.mtp_draft(model, mtp_cache, outs.hidden_BTD, prompts_BT,
                                        prompt_lengths_B, root_B, select_fn=select_fn(key_draft))
    drafter_state.update(mtp_cache=mtp_cache, chain_BD=draft.tokens_BD, logits_BDV=draft.logits_BDV)
  else:
    dcache = models.init_cache(draft_model, batch, s.cache_len)
    _, dcache = models.prefill(draft_model, prompts_BT, prompt_lengths_B, dcache)
    drafter_state.update(dcache=dcache, pending_B=jnp.zeros((batch,), bool),
                         last_draft_B=jnp.zeros((batch,), jnp.int32))
  del key0

  out_width = s.max_new_tokens + depth + 1
  buffer_BN = jnp.full((batch, out_width), s.pad_id, jnp.int32).at[:, 0].set(root_B)
  done_B = root_B == eos_id
  done_B = done_B | (s.max_new_tokens <= 1)
  num_out_B = jnp.ones((batch,), jnp.int32)
  stats = SpeculativeStats(jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32),
                           jnp.zeros((depth + 1,), jnp.int32), jnp.int32(0))

  # --- drafting ----------------------------------------------------------------------------------
  def draft_candidates(drafter_state, root_B, key):
    """-> (tokens_BT, draft_probs_BTV or None, drafter_state)."""
    if s.drafter == 'medusa':
      head_KBV = drafter_state['medusa_KBV'][:depth]
      if s.sample_drafts:
        q_DBV = _probs(head_KBV, sc)
        chain_DB = sampling.sample_probs(key, q_DBV)
        tokens_BT = jnp.concatenate([root_B[:, None], chain_DB.T], axis=1)
        q_BTV = jnp.concatenate([q_DBV, q_DBV[-1:]], axis=0).swapaxes(0, 1)
        return tokens_BT, q_BTV, drafter_state
      topk_DBk = jax.lax.top_k(head_KBV, kmax)[1]
      return _tree_tokens_from_ranks(tree, root_B, topk_DBk), None, drafter_state
    if s.drafter == 'mtp':
      chain_BD = drafter_state['chain_BD'][:, :depth]
      logits_BDV = drafter_state['logits_BDV'][:, :depth]
      if s.sample_drafts:
        q_BDV = _probs(logits_BDV, sc)
        tokens_BT = jnp.concatenate([root_B[:, None], chain_BD], axis=1)
        return tokens_BT, jnp.concatenate([q_BDV, q_BDV[:, -1:]], axis=1), drafter_state
      topk_DBk = jax.lax.top_k(logits_BDV, kmax)[1].swapaxes(0, 1)
      return _tree_tokens_from_ranks(tree, root_B, topk_DBk, chain_BD), None, drafter_state
    # Draft model: the first forward appends [previous last draft, root] (the last draft of a fully
    # accepted step was never fed to the draft model), masked so that rows without a pending draft
    # see only the root; then gamma - 1 single-token forwards.
    dcache, pending_B = drafter_state['dcache'], drafter_state['pending_B']
    two_tokens_B2 = jnp.stack([drafter_state['last_draft_B'], root_B], axis=1)
    depths_B2 = jnp.where(pending_B[:, None], jnp.array([0, 1]), jnp.array([0, 0])).astype(jnp.int32)
    mask_B22 = jnp.where(pending_B[:, None, None], jnp.tril(jnp.ones((2, 2), bool)),
                         jnp.eye(2, dtype=bool))
    douts, dcache = models.extend(draft_model, two_tokens_B2, depths_B2, mask_B22, dcache)
    path_B2 = jnp.where(pending_B[:, None], jnp.array([0, 1]), jnp.array([1, 0])).astype(jnp.int32)
    dcache = models.commit(dcache, path_B2, jnp.where(pending_B, 2, 1).astype(jnp.int32))
    logits_BV = douts.logits_BTV[:, 1]

    def pick(logits_BV, k):
      if s.sample_drafts:
        q_BV = _probs(logits_BV, sc)
        return sampling.sample_probs(jax.random.fold_in(key, k), q_BV), q_BV
      return jnp.argmax(logits_BV, -1).astype(jnp.int32), jnp.zeros((batch, 0), jnp.float32)

    def draft_step(j, carry):
      dcache, tok_B, tokens_BD, q_BDV = carry
      douts, dcache = models.extend(draft_model, tok_B[:, None], jnp.zeros((batch, 1), jnp.int32),
                                    jnp.ones((batch, 1, 1), bool), dcache)
      dcache = models.advance(dcache, jnp.ones((batch,), jnp.int32))
      tok_B, q_BV = pick(douts.logits_BTV[:, 0], j)
      tokens_BD = tokens_BD.at[:, j].set(tok_B)
      q_BDV = q_BDV.at[:, j].set(q_BV) if s.sample_drafts else q_BDV
      return dcache, tok_B, tokens_BD, q_BDV

    tok_B, q_BV = pick(logits_BV, 0)
    vocab = logits_BV.shape[-1] if s.sample_drafts else 0
    tokens_BD = jnp.zeros((batch, depth), jnp.int32).at[:, 0].set(tok_B)
    q_BDV = jnp.zeros((batch, depth, vocab), jnp.float32)
    if s.sample_drafts:
      q_BDV = q_BDV.at[:, 0].set(q_BV)
    dcache, _, tokens_BD, q_BDV = jax.lax.fori_loop(1, depth, draft_step,
                                                    (dcache, tok_B, tokens_BD, q_BDV))
    tokens_BT = jnp.concatenate([root_B[:, None], tokens_BD], axis=1)
    q_BTV = jnp.concatenate([q_BDV, q_BDV[:, -1:]], axis=1) if s.sample_drafts else None
    return tokens_BT, q_BTV, dict(drafter_state, dcache=dcache)

  def update_drafter(drafter_state, outs, tokens_BT, acc, active_B, old_len_B, key):
    num_B = jnp.where(active_B, acc.num_accepted_B, 0)
    last_B = _gather_nodes(acc.path_BP, num_B[:, None])[:, 0]
    if s.drafter == 'medusa':
      # Heads only at each row's new last position (one row, not all T nodes; XLA drops the
      # unused all-node Medusa logits of `extend`).
      hidden_B1D = _gather_nodes(outs.hidden_BTD, last_B[:, None])
      return dict(drafter_state, medusa_KBV=models.medusa_logits(model, hidden_B1D)[:, :, 0])
    if s.drafter == 'mtp':
      path_BP = jnp.maximum(acc.path_BP, 0)
      draft, mtp_cache = models.mtp_draft(
          model, drafter_state['mtp_cache'], _gather_nodes(outs.hidden_BTD, path_BP),
          _gather_nodes(tokens_BT, path_BP), jnp.where(active_B, num_B + 1, 0), acc.next_token_B,
          select_fn=select_fn(key))
      return dict(drafter_state, mtp_cache=mtp_cache, chain_BD=draft.tokens_BD,
                  logits_BDV=draft.logits_BDV)
    dcache = drafter_state['dcache']
    keep_B = old_len_B + 1 + jnp.minimum(num_B, depth - 1)
    lengths_B = jnp.where(active_B, keep_B, dcache.lengths)
    return dict(drafter_state, dcache=dcache.replace(lengths=lengths_B),
                pending_B=active_B & (num_B == depth), last_draft_B=tokens_BT[:, -1])

  # --- the loop ----------------------------------------------------------------------------------
  def cond(carry):
    return ~jnp.all(carry['done_B'])

  def body(carry):
    TRACE_COUNTS['speculative_step'] += 1
    cache, root_B, done_B = carry['cache'], carry['root_B'], carry['done_B']
    key = jax.random.fold_in(rng, carry['stats'].loop_steps + 1)
    k_draft, k_accept, k_next_draft = jax.random.split(key, 3)
    active_B = ~done_B
    tokens_BT, q_BTV, drafter_state = draft_candidates(carry['drafter'], root_B, k_draft)

    outs, cache_ext = models.extend(model, tokens_BT, depths_BT, mask_BTT, cache)
    if s.acceptance == 'greedy':
      acc = acceptance_lib.accept_greedy(tree, tokens_BT, outs.logits_BTV)
    elif s.acceptance == 'rejection':
      acc = acceptance_lib.accept_rejection(tree, k_accept, tokens_BT, _probs(outs.logits_BTV, sc),
                                            q_BTV)
    else:
      acc = acceptance_lib.accept_typical(tree, k_accept, tokens_BT, _probs(outs.logits_BTV, sc),
                                          eps=s.typical_eps, delta=s.typical_delta)
    num_B = jnp.where(active_B, acc.num_accepted_B, 0)
    path_BP = jnp.maximum(acc.path_BP, 0)
    old_len_B = cache.lengths
    keep_B = jnp.where(active_B, num_B + 1, 0)
    # A chain's accepted path is its prefix, already in place: only the lengths move.
    cache = (models.advance(cache_ext, keep_B) if tree.is_chain else
             models.commit(cache_ext, path_BP, keep_B))

    # Emit: accepted draft tokens, then the next token; truncate at EOS and max_new_tokens.
    j_P = jnp.arange(depth + 1)
    nodes_BP = _gather_nodes(tokens_BT, path_BP)
    shifted_BP = jnp.concatenate([nodes_BP[:, 1:], nodes_BP[:, :1]], axis=1)
    emit_BP = jnp.where(j_P[None] < num_B[:, None], shifted_BP,
                        jnp.where(j_P[None] == num_B[:, None], acc.next_token_B[:, None], s.pad_id))
    count_B = num_B + 1
    is_eos_BP = (emit_BP == eos_id) & (j_P[None] <= num_B[:, None])
    hit_eos_B = jnp.any(is_eos_BP, axis=1)
    count_B = jnp.where(hit_eos_B, jnp.argmax(is_eos_BP, axis=1) + 1, count_B)
    count_B = jnp.minimum(count_B, s.max_new_tokens - carry['num_out_B'])
    count_B = jnp.where(active_B, count_B, 0)
    buffer_BN = jax.vmap(lambda buf, e, off: jax.lax.dynamic_update_slice(buf, e, (off,)))(
        carry['buffer_BN'], jnp.where(active_B[:, None], emit_BP, s.pad_id),
        jnp.where(active_B, carry['num_out_B'], out_width - depth - 1))
    num_out_B = carry['num_out_B'] + count_B
    done_B = done_B | (active_B & hit_eos_B) | (num_out_B >= s.max_new_tokens)

    drafter_state = update_drafter(drafter_state, outs, tokens_BT, acc, active_B, old_len_B,
                                   k_next_draft)
    st = carry['stats']
    stats = SpeculativeStats(
        st.verify_steps_B + active_B.astype(jnp.int32), st.accepted_B + num_B,
        st.accepted_hist_A + jnp.sum(jax.nn.one_hot(num_B, depth + 1, dtype=jnp.int32)
                                     * active_B[:, None], axis=0),
        st.loop_steps + 1)
    return dict(cache=cache, root_B=jnp.where(active_B, acc.next_token_B, root_B), done_B=done_B,
                buffer_BN=buffer_BN, num_out_B=num_out_B, drafter=drafter_state, stats=stats)

  carry = dict(cache=cache, root_B=root_B, done_B=done_B, buffer_BN=buffer_BN,
               num_out_B=num_out_B, drafter=drafter_state, stats=stats)
  carry = jax.lax.while_loop(cond, body, carry)
  num_out_B = carry['num_out_B']
  tokens_BN = carry['buffer_BN'][:, :s.max_new_tokens]
  tokens_BN = jnp.where(jnp.arange(s.max_new_tokens)[None] < num_out_B[:, None], tokens_BN, s.pad_id)
  return SpeculativeOutput(tokens_BN, num_out_B, carry['stats'])
