"""EAGLE-style feature drafting: one module applied autoregressively to any depth.

A *feature drafter* is a module `f = final_norm(Blocks(W [RMSNorm(h); RMSNorm(Emb(t))]))` (the
DeepSeek-V3 MTP combine): from the trunk's (final-normed) hidden state at position i and the
embedding of token t_{i+1} it predicts the trunk's hidden state at i + 1; the prediction is read
through the shared LM head (`model.logits`) and fed back as the feature for the next depth. Two
modules qualify (`kind`):
- 'eagle': the model's `EagleModule` (`config.eagle_layers` blocks), trained for this;
- 'mtp':   MTP module 1 reused recursively (vLLM's reuse of a DeepSeek MTP module), so the MTP
           drafter can draft deeper than `config.mtp_depth`.

Indexing (as for MTP module k / Medusa head k): unrolled step s (from 1) at *chain start* i reads
t_{i+s}, sits at position i + s - 1, predicts the trunk feature h_{i+s} and the token t_{i+s+1}.
Step 1 reads the trunk's own h_i; step s > 1 reads step s - 1's prediction at the same chain start.
Attention is what decoding sees: step s at chain start i attends to the step-1 entries of chain
starts j <= i (exact: their features come from the trunk) and to its own chain's entries of steps
2..s (the drafts before it), the EAGLE-3 "training-time test" mask. `unroll` computes this for a
whole sequence (training, and the offline reference of the tests); `feature_draft` /
`feature_tree_draft` compute the same thing incrementally with a KV cache inside the sampler.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jax_spec.attention import reference_attention
# The same argument checks and default draft selection as the MTP drafts.
from jax_spec.models.losses import shift  # past the row end: masked by the losses
from jax_spec.models.kv_cache import (MAX_NEW_TOKENS_PER_CALL, _argmax_select, _check_int,
                                     empty_layer_caches)
from jax_spec.models.layers import LayerCache
from jax_spec.models.transformer import MTPModule, Transformer

DRAFTER_KINDS = ('eagle', 'mtp')


class Unrolled(NamedTuple):
  """`features_JBTD[s - 1]` at chain start i predicts h_{i+s}; `logits_JBTV` (fp32) t_{i+s+1}."""
  features_JBTD: jax.Array
  logits_JBTV: jax.Array


@struct.dataclass
class FeatureCache:
  """A feature drafter's KV cache.

  `layers`: one `LayerCache` per block of the module; `lengths`: [B] exact entries, equal to the
  trunk's length n (entry j reads h_j and t_{j+1}, and t_n, the root, is known); `feature_BD`: the
  module's prediction of h_n (its output at entry n - 1), the feature depth 1 drafts from.
  Slots >= lengths hold the last call's drafts and are overwritten by the next update.
  """
  layers: tuple[LayerCache, ...]
  lengths: jax.Array
  feature_BD: jax.Array

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]


class FeatureDraft(NamedTuple):
  """`tokens_BJ[:, d - 1]` drafts t_{n+d}; `logits_BJV` (fp32) the distribution it came from."""
  tokens_BJ: jax.Array
  logits_BJV: jax.Array


def drafter_module(model: Transformer, kind: str) -> MTPModule:
  """The module a feature drafter of `kind` ('eagle' | 'mtp') applies recursively."""
  if not isinstance(model, Transformer):
    raise ValueError(f'model must be a jax_spec.models.Transformer, got {type(model).__name__}')
  if kind not in DRAFTER_KINDS:
    raise ValueError(f'kind must be one of {DRAFTER_KINDS}, got {kind!r}')
  if kind == 'eagle':
    if model.eagle is None:
      raise ValueError("kind='eagle' needs a model with an EAGLE module (config.eagle_layers == 0)")
    return model.eagle
  if not model.config.mtp_depth:
    raise ValueError("kind='mtp' needs a model with MTP modules (config.mtp_depth == 0)")
  return model.mtp[0]


def _read(model, x_BTD):
  """Module output -> (predicted final-normed feature, fp32 logits through the shared head)."""
  feature = model.final_norm(x_BTD)
  return feature, model.decode_logits(feature)


def _block_with_attention(block, x_BTD, rope, attend):
  """`Block.__call__` with the attention replaced by `attend(q, k, v) -> o`; returns (x, k, v)."""
  q_BTHE, k_BTKE, v_BTKE = block.attn.qkv(block.attn_norm(x_BTD), rope)
  x_BTD = x_BTD + block.attn.out(attend(q_BTHE, k_BTKE, v_BTKE).astype(x_BTD.dtype))
  return x_BTD + block.mlp(block.mlp_norm(x_BTD)), k_BTKE, v_BTKE


def unroll(model: Transformer, hidden_BTD, tokens_BT, *, steps: int, kind: str = 'eagle',
           positions_BT=None, segment_ids_BT=None) -> Unrolled:
  """Full-sequence forward of the feature drafter unrolled on its own predictions for `steps`.

  hidden_BTD: the trunk's final-normed hidden states (`ModelOutputs.hidden_BTD`). Step 1 is the
  ordinary causal forward (EAGLE-1 training); steps > 1 are EAGLE-3's training-time test.
  """
  module = drafter_module(model, kind)
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f'steps must be a positive int, got {steps!r}')
  batch, seq_len = tokens_BT.shape
  if hidden_BTD.shape[:2] != (batch, seq_len):
    raise ValueError(f'hidden_BTD {hidden_BTD.shape} does not match tokens_BT {tokens_BT.shape}')
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
  seg_BT = jnp.ones_like(tokens_BT) if segment_ids_BT is None else segment_ids_BT
  # Step s's query at chain start i sees step-1 keys j <= i of its document, and its own chain's
  # keys of steps 2..s (one per step, at the same chain start i).
  exact_BTT = (jnp.tril(jnp.ones((seq_len, seq_len), bool))[None]
               & (seg_BT[:, :, None] == seg_BT[:, None, :]))
  own_BTT = jnp.broadcast_to(jnp.eye(seq_len, dtype=bool), exact_BTT.shape)

  feature_BTD, features, logits = hidden_BTD, [], []
  kv_by_step = []   # kv_by_step[s - 1][l] = (k, v) of block l at step s
  for s in range(1, steps + 1):
    x_BTD = module.combine(feature_BTD, model.embed_tokens(shift(tokens_BT, s)))
    rope = model.rotary(positions_BT + (s - 1))
    step_kv = []
    for l, block in enumerate(module.blocks):
      if s == 1:
        x_BTD, k_BTKE, v_BTKE = block(x_BTD, rope, segment_ids_BT)
      else:
        def attend(q, k, v, l=l):
          ks = [kv_by_step[0][l][0]] + [kv[l][0] for kv in kv_by_step[1:]] + [k]
          vs = [kv_by_step[0][l][1]] + [kv[l][1] for kv in kv_by_step[1:]] + [v]
          mask_BTS = jnp.concatenate([exact_BTT] + [own_BTT] * (s - 1), axis=2)
          return reference_attention(q, jnp.concatenate(ks, axis=1), jnp.concatenate(vs, axis=1),
                                     mask=mask_BTS[:, None])
        x_BTD, k_BTKE, v_BTKE = _block_with_attention(block, x_BTD, rope, attend)
      step_kv.append((k_BTKE, v_BTKE))
    kv_by_step.append(step_kv)
    feature_BTD, logits_BTV = _read(model, x_BTD)
    features.append(feature_BTD)
    logits.append(logits_BTV)
  return Unrolled(jnp.stack(features), jnp.stack(logits))


def init_feature_cache(model: Transformer, batch_size: int, max_len: int, *,
                       kind: str = 'eagle') -> FeatureCache:
  """An empty feature-drafter cache; use the trunk cache's `max_len`."""
  module = drafter_module(model, kind)
  layers = empty_layer_caches(model, len(module.blocks), batch_size, max_len)
  return FeatureCache(layers=layers, lengths=jnp.zeros((batch_size,), jnp.int32),
                      feature_BD=jnp.zeros((batch_size, model.config.d_model), model.dtype))


def _decode_read(model, module, feature_BTD, tokens_BT, positions_BT, layers, lengths_B,
                 mask_BTT):
  """The module on T new entries written at slots [lengths, lengths + T), then the read ->
  (predicted features, fp32 logits, layers)."""
  return module.decode_read(model, feature_BTD, model.embed_tokens(tokens_BT),
                            model.rotary(positions_BT), layers, lengths_B, mask_BTT)


def feature_update(model: Transformer, cache: FeatureCache, hidden_BAD, tokens_BA, num_new_B,
                   next_token_B, *, kind: str = 'eagle'):
  """Feeds newly committed trunk positions [n, n + num_new) to the drafter's cache.

  Args (as for `models.mtp_draft`): hidden_BAD / tokens_BA: the trunk's hidden states and tokens
  at positions [n, n + A), n = `cache.lengths` (after a prefill: the padded prompt; after a verify:
  the accepted path); num_new_B: the valid entries per row (may be 0); next_token_B: the token
  at n' = n + num_new.
  Returns (logits_BV of depth 1, i.e. of t_{n'+1}, cache with lengths n' and feature_BD = h_{n'}).
  """
  module = drafter_module(model, kind)
  _check_int('tokens_BA', tokens_BA, 2)
  _check_int('num_new_B', num_new_B, 1)
  _check_int('next_token_B', next_token_B, 1)
  batch, width = tokens_BA.shape
  if hidden_BAD.shape != (batch, width, model.config.d_model):
    raise ValueError(f'hidden_BAD must have shape {(batch, width, model.config.d_model)}, got '
                     f'{hidden_BAD.shape}')
  if num_new_B.shape != (batch,) or next_token_B.shape != (batch,) or cache.batch_size != batch:
    raise ValueError(f'num_new_B {num_new_B.shape}, next_token_B {next_token_B.shape} and the '
                     f'cache batch {cache.batch_size} must match tokens_BA batch {batch}')
  num_B = jnp.clip(num_new_B.astype(jnp.int32), 0, width)
  n_B = cache.lengths
  # Entry n + a reads t_{n+a+1}: the next committed token, or next_token after the last one.
  a_A = jnp.arange(width)
  next_BA = jnp.pad(tokens_BA[:, 1:].astype(jnp.int32), ((0, 0), (0, 1)))
  next_BA = jnp.where(a_A[None] == num_B[:, None] - 1, next_token_B[:, None].astype(jnp.int32),
                      next_BA)
  positions_BA = n_B[:, None] + a_A.astype(jnp.int32)
  layers, features, logits = cache.layers, [], []
  # The decode kernel takes <= 128 queries: longer windows (a prefill) go in causal chunks.
  for start in range(0, width, MAX_NEW_TOKENS_PER_CALL):
    stop = min(start + MAX_NEW_TOKENS_PER_CALL, width)
    mask_BCC = jnp.broadcast_to(jnp.tril(jnp.ones((stop - start,) * 2, bool)),
                                (batch, stop - start, stop - start))
    feature_BCD, logits_BCV, layers = _decode_read(
        model, module, hidden_BAD[:, start:stop].astype(model.dtype), next_BA[:, start:stop],
        positions_BA[:, start:stop], layers, n_B + start, mask_BCC)
    features.append(feature_BCD)
    logits.append(logits_BCV)
  last_B11 = jnp.clip(num_B - 1, 0, width - 1)[:, None, None]
  last = lambda chunks: jnp.take_along_axis(jnp.concatenate(chunks, axis=1), last_B11,
                                            axis=1)[:, 0]
  has_new_B1 = (num_B > 0)[:, None]
  feature_BD = jnp.where(has_new_B1, last(features), cache.feature_BD).astype(
      cache.feature_BD.dtype)
  # A row with nothing new keeps its feature, and the distribution read from it.
  logits_BV = jnp.where(has_new_B1, last(logits), model.decode_logits(cache.feature_BD))
  return logits_BV, FeatureCache(layers=layers, lengths=n_B + num_B, feature_BD=feature_BD)


def feature_chain(model: Transformer, cache: FeatureCache, logits_BV, *, depth: int,
                  kind: str = 'eagle', select_fn: Callable | None = None):
  """A chain of `depth` drafts t_{n'+1} .. t_{n'+depth} from the cache left by `feature_update`.

  logits_BV: the depth-1 logits `feature_update` returned. select_fn: `(logits_BV, d) -> tokens_B`
  picks draft d (from 1); default argmax. Draft d > 1 runs one cached step at slot n' + d - 2,
  which sees the exact entries and the chain before it. Returns (FeatureDraft, cache); the
  drafts' slots are past `lengths`.
  """
  if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
    raise ValueError(f'depth must be a positive int, got {depth!r}')
  module = drafter_module(model, kind)
  select_fn = select_fn or _argmax_select
  batch = logits_BV.shape[0]
  token_B = select_fn(logits_BV, 1).astype(jnp.int32)
  tokens, logits = [token_B], [logits_BV]
  feature_BD, layers = cache.feature_BD, cache.layers
  one_B11 = jnp.ones((batch, 1, 1), bool)
  for d in range(2, depth + 1):
    slot_B = cache.lengths + (d - 2)
    feature_B1D, logits_B1V, layers = _decode_read(model, module, feature_BD[:, None],
                                                   token_B[:, None], slot_B[:, None], layers,
                                                   slot_B, one_B11)
    feature_BD, logits_BV = feature_B1D[:, 0], logits_B1V[:, 0]
    token_B = select_fn(logits_BV, d).astype(jnp.int32)
    tokens.append(token_B)
    logits.append(logits_BV)
  draft = FeatureDraft(jnp.stack(tokens, axis=1), jnp.stack(logits, axis=1))
  return draft, cache.replace(layers=layers)


def feature_draft(model: Transformer, cache: FeatureCache, hidden_BAD, tokens_BA, num_new_B,
                  next_token_B, *, depth: int, kind: str = 'eagle',
                  select_fn: Callable | None = None):
  """`feature_update`, then `feature_chain` (the `models.mtp_draft` contract, to any depth)."""
  logits_BV, cache = feature_update(model, cache, hidden_BAD, tokens_BA, num_new_B, next_token_B,
                                    kind=kind)
  return feature_chain(model, cache, logits_BV, depth=depth, kind=kind, select_fn=select_fn)


def feature_tree_step(model: Transformer, cache: FeatureCache, parent_features_BND, tokens_BN,
                      depths_BN, mask_BNN, *, kind: str = 'eagle'):
  """One step of the module on N tree nodes (not the root) written at slots n' .. n' + N - 1.

  Node j at depth d >= 1 (`depths_BN`) reads its parent's predicted feature (`parent_features_BND`;
  the root's is `cache.feature_BD`) and its token, sits at position n' + d - 1, and attends to the
  exact entries and the nodes `mask_BNN[:, j]` (itself and its non-root ancestors).
  Returns (features_BND: the nodes' predictions, logits_BNV fp32: their children's distribution).
  The cache is not changed (the slots are scratch).
  """
  module = drafter_module(model, kind)
  positions_BN = cache.lengths[:, None] + depths_BN.astype(jnp.int32) - 1
  features_BND, logits_BNV, _ = _decode_read(
      model, module, parent_features_BND.astype(model.dtype), tokens_BN, positions_BN,
      cache.layers, cache.lengths, mask_BNN)
  return features_BND, logits_BNV


def feature_tree_draft(model: Transformer, cache: FeatureCache, root_logits_BV, tree, *,
                       kind: str = 'eagle'):
  """Drafts a static tree from the cache left by `feature_update` (root = t_{n'}, node 0).

  tree: a `decoding.trees.Tree` (anything with numpy `parent_T`, `depth_T`, `rank_T`,
  `ancestor_mask_TT`; nodes in breadth-first order). Node t at depth d gets the rank_t-th most
  likely token of its parent's distribution (the root's is `root_logits_BV`); its own
  distribution comes from `feature_tree_step`. The nodes of depths <= d (a breadth-first prefix)
  go in one step per depth d < max depth.
  Returns (tokens_BT with slot 0 left 0 for the root, logits_BTV: each node's distribution over
  its children (fp32; 0 for the leaves at the maximum depth)).
  """
  drafter_module(model, kind)
  depth_np = [int(x) for x in tree.depth_T]
  num_nodes, max_depth = len(depth_np), max(depth_np)
  batch, vocab = root_logits_BV.shape
  parent_T, rank_T = jnp.asarray(tree.parent_T), jnp.asarray(tree.rank_T)
  tokens_BT = jnp.zeros((batch, num_nodes), jnp.int32)
  logits_BTV = jnp.zeros((batch, num_nodes, vocab), jnp.float32).at[:, 0].set(root_logits_BV)
  features_BTD = jnp.zeros((batch, num_nodes, model.config.d_model), model.dtype)
  features_BTD = features_BTD.at[:, 0].set(cache.feature_BD.astype(model.dtype))
  kmax = max(int(r) for r in tree.rank_T) + 1
  for d in range(1, max_depth + 1):
    level = [t for t in range(num_nodes) if depth_np[t] == d]
    lvl = jnp.asarray(level)
    topk_BLk = jax.lax.top_k(logits_BTV[:, parent_T[lvl]], kmax)[1]
    tokens_BT = tokens_BT.at[:, lvl].set(
        jnp.take_along_axis(topk_BLk, rank_T[lvl][None, :, None], axis=2)[..., 0].astype(jnp.int32))
    if d == max_depth:
      break
    m = max(level) + 1   # nodes 1 .. m - 1: every node of depth <= d
    f_BMD, l_BMV = feature_tree_step(
        model, cache, features_BTD[:, parent_T[1:m]], tokens_BT[:, 1:m],
        jnp.broadcast_to(jnp.asarray(tree.depth_T[1:m]), (batch, m - 1)),
        jnp.broadcast_to(jnp.asarray(tree.ancestor_mask_TT[1:m, 1:m]), (batch, m - 1, m - 1)),
        kind=kind)
    features_BTD = features_BTD.at[:, 1:m].set(f_BMD.astype(features_BTD.dtype))
    logits_BTV = logits_BTV.at[:, 1:m].set(l_BMV)
  return tokens_BT, logits_BTV
