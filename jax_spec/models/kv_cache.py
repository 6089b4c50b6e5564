"""KV caches and the pure decoding functions the samplers build on.

Caches are fixed-shape pytrees, so a whole decode loop fits in one `lax.while_loop`:
- trunk (and draft models): `init_cache`, `prefill`, `extend` (tree of candidates), `commit`.
- MTP modules: `init_mtp_cache`, `mtp_draft` (update the lagging MTP caches + chained drafts).
- Medusa: `medusa_logits`.
Nothing here mutates the model; use `nnx.split` outside a jitted loop and `nnx.merge` inside.
See docs/architecture.md, "Model and KV cache", for the contract.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jax_spec.models.layers import LayerCache
from jax_spec.models.transformer import Transformer

# The decode / tree-verify kernel takes at most this many new queries per call.
MAX_NEW_TOKENS_PER_CALL = 128


@struct.dataclass
class KVCache:
  """`layers`: one `LayerCache` (k, v [B, S, K, E]) per trunk layer; `lengths`: [B] int32
  committed slots, shared by the layers."""
  layers: tuple[LayerCache, ...]
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.layers[0].max_len

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]


@struct.dataclass
class DecodeOutputs:
  """Per-token outputs of `prefill` / `extend` (logits fp32, hidden final-normed)."""
  logits_BTV: jax.Array
  hidden_BTD: jax.Array
  medusa_logits_JBTV: jax.Array | None = None


@struct.dataclass
class MTPCache:
  """State of the MTP modules' caches (module k holds exact entries < max(lengths - k + 1, 0)).

  `layers[k - 1]`: module k's `LayerCache` (one block each); `lengths`: [B] trunk length seen so
  far (n); `tokens`: [B, S + J + 1] token at each position (committed, then the next token, then
  the drafts of the last call);
  `prev_hidden`: [J, B, D], module k's output at its last exact position.
  """
  layers: tuple[LayerCache, ...]
  lengths: jax.Array
  tokens: jax.Array
  prev_hidden: jax.Array

  @property
  def batch_size(self) -> int:
    return self.lengths.shape[0]


@struct.dataclass
class MTPDraft:
  """`tokens_BJ[:, k-1]` drafts t_{n'+k}; `logits_BJV` the fp32 draft logits it was chosen from."""
  tokens_BJ: jax.Array
  logits_BJV: jax.Array


def _check_model(model):
  if not isinstance(model, Transformer):
    raise ValueError(f'model must be a jax_spec.models.Transformer, got {type(model).__name__}')


def _check_int(name, x, ndim):
  if not hasattr(x, 'ndim') or x.ndim != ndim or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'{name} must be an integer array with {ndim} dims, got '
                     f'{getattr(x, "dtype", type(x))} {getattr(x, "shape", "")}')


def empty_layer_caches(model, num_layers, batch_size, max_len) -> tuple[LayerCache, ...]:
  """`num_layers` zero `LayerCache`s of `model`'s KV heads, head_dim and compute dtype."""
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
  if not isinstance(max_len, int) or max_len <= 0:
    raise ValueError(f'max_len must be a positive int, got {max_len!r}')
  c = model.config
  return tuple(LayerCache.zeros(batch_size, max_len, c.num_kv_heads, c.head_dim, model.dtype)
               for _ in range(num_layers))


def init_cache(model: Transformer, batch_size: int, max_len: int) -> KVCache:
  """An empty trunk cache (all rows length 0)."""
  _check_model(model)
  layers = empty_layer_caches(model, model.config.num_layers, batch_size, max_len)
  return KVCache(layers, jnp.zeros((batch_size,), jnp.int32))


def _outputs(model, hidden_BTD):
  medusa = model.medusa_logits(hidden_BTD) if model.config.medusa_heads else None
  return DecodeOutputs(model.decode_logits(hidden_BTD), hidden_BTD, medusa)


def prefill(model: Transformer, tokens_BT, prompt_lengths_B, cache: KVCache):
  """Runs right-padded prompts through the trunk and writes their K/V into slots [0, T).

  Resets every row: `lengths = prompt_lengths`. The trunk is the model's own (`Transformer.trunk`,
  as in the full forward: causal `dot_product_attention`); padding only affects outputs past each
  prompt's end. On CPU, an fp32 model whose blocks take the decode kernel runs the prompt as
  causal `extend` chunks of <= `MAX_NEW_TOKENS_PER_CALL` instead (`_prefill_by_extend`: the
  kernels' few-row matmuls beat XLA:CPU's GEMMs at prompt sizes; docs/benchmarks.md).
  Returns (DecodeOutputs at every position, cache).
  """
  _check_model(model)
  _check_int('tokens_BT', tokens_BT, 2)
  _check_int('prompt_lengths_B', prompt_lengths_B, 1)
  batch, seq_len = tokens_BT.shape
  if cache.batch_size != batch or prompt_lengths_B.shape != (batch,):
    raise ValueError(f'tokens_BT {tokens_BT.shape}, prompt_lengths_B {prompt_lengths_B.shape} and '
                     f'the cache batch {cache.batch_size} disagree')
  if seq_len > cache.max_len:
    raise ValueError(f'tokens_BT length {seq_len} exceeds the cache max_len {cache.max_len}')
  lengths = jnp.clip(prompt_lengths_B.astype(jnp.int32), 0, seq_len)

  def by_trunk(tokens_BT, layers):
    positions_BT = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    hidden_BTD, ks, vs = model.trunk(tokens_BT, model.rotary(positions_BT))
    put = lambda cache_BSKE, new_BTKE: jax.lax.dynamic_update_slice(
        cache_BSKE, new_BTKE.astype(cache_BSKE.dtype), (0, 0, 0, 0))
    return _outputs(model, hidden_BTD), tuple(
        LayerCache(put(layer.k, k_BTKE), put(layer.v, v_BTKE))
        for layer, k_BTKE, v_BTKE in zip(layers, ks, vs, strict=True))

  x_probe = jax.ShapeDtypeStruct((batch, 1, model.config.d_model), model.dtype)
  if not all(block.kernel_applies(x_probe, layer)
             for block, layer in zip(model.layers, cache.layers, strict=True)):
    outputs, layers = by_trunk(tokens_BT, cache.layers)
  else:
    outputs, layers = jax.lax.platform_dependent(
        tokens_BT, cache.layers, cpu=lambda t, l: _prefill_by_extend(model, t, l),
        default=by_trunk)
  return outputs, KVCache(layers, lengths)


def _prefill_by_extend(model, tokens_BT, layers):
  """`prefill`'s trunk forward as causal `extend` chunks from slot 0 -> (outputs, layers)."""
  batch, seq_len = tokens_BT.shape
  cache = KVCache(layers, jnp.zeros((batch,), jnp.int32))
  outs = []
  for start in range(0, seq_len, MAX_NEW_TOKENS_PER_CALL):
    width = min(MAX_NEW_TOKENS_PER_CALL, seq_len - start)
    depths_BC = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    mask_BCC = jnp.broadcast_to(jnp.tril(jnp.ones((width, width), bool)), (batch, width, width))
    out, cache = extend(model, tokens_BT[:, start:start + width], depths_BC, mask_BCC, cache)
    outs.append(out)
    cache = advance(cache, jnp.full((batch,), width, jnp.int32))
  if len(outs) == 1:
    return outs[0], cache.layers
  join = lambda *xs: None if xs[0] is None else jnp.concatenate(xs, axis=xs[0].ndim - 2)
  return jax.tree.map(join, *outs, is_leaf=lambda x: x is None), cache.layers


def extend(model: Transformer, tokens_BT, depths_BT, tree_mask_BTT, cache: KVCache):
  """Appends T candidate tokens at slots [len, len + T) and positions `len + depths`.

  Token t sees the committed prefix and token t' iff `tree_mask_BTT[b, t, t']` (diagonal True).
  `lengths` are not advanced: follow with `commit`. Returns (DecodeOutputs, cache).
  """
  _check_model(model)
  _check_int('tokens_BT', tokens_BT, 2)
  _check_int('depths_BT', depths_BT, 2)
  batch, num_new = tokens_BT.shape
  if depths_BT.shape != tokens_BT.shape:
    raise ValueError(f'depths_BT must have shape {tokens_BT.shape}, got {depths_BT.shape}')
  if tree_mask_BTT.shape != (batch, num_new, num_new) or tree_mask_BTT.dtype != jnp.bool_:
    raise ValueError(f'tree_mask_BTT must be a bool [{batch}, {num_new}, {num_new}] array, got '
                     f'{tree_mask_BTT.dtype} {tree_mask_BTT.shape}')
  if cache.batch_size != batch:
    raise ValueError(f'tokens_BT batch {batch} != cache batch {cache.batch_size}')
  if num_new > MAX_NEW_TOKENS_PER_CALL:
    raise ValueError(f'extend takes at most {MAX_NEW_TOKENS_PER_CALL} tokens, got {num_new}')
  positions_BT = cache.lengths[:, None] + depths_BT.astype(jnp.int32)
  x_BTD, rope = model.embed_tokens(tokens_BT), model.rotary(positions_BT)
  layers = []
  for block, layer_cache in zip(model.layers, cache.layers, strict=True):
    x_BTD, layer_cache = block.decode(x_BTD, rope, layer_cache, cache.lengths, tree_mask_BTT)
    layers.append(layer_cache)
  return _outputs(model, model.final_norm(x_BTD)), KVCache(tuple(layers), cache.lengths)


def commit(cache, path_BA, num_accepted_B):
  """Keeps the accepted path of the last `extend` and advances each row's length.

  `path_BA[b, a]` indexes the T appended tokens (root first, ancestors before descendants);
  entries `a < num_accepted_B[b]` move to slots `len + a`. Works for `KVCache` (and any cache
  with `layers` of `LayerCache` and `lengths` [B]).
  """
  _check_int('path_BA', path_BA, 2)
  _check_int('num_accepted_B', num_accepted_B, 1)
  batch, num_path = path_BA.shape
  if cache.lengths.shape != (batch,) or num_accepted_B.shape != (batch,):
    raise ValueError(f'path_BA {path_BA.shape} and num_accepted_B {num_accepted_B.shape} must '
                     f'match the cache batch {cache.lengths.shape[0]}')
  max_len = cache.layers[0].max_len
  rows_BA = jnp.broadcast_to(jnp.arange(batch)[:, None], path_BA.shape)
  lengths = cache.lengths
  src_BA = jnp.clip(lengths[:, None] + path_BA.astype(jnp.int32), 0, max_len - 1)
  keep_BA = jnp.arange(num_path)[None, :] < num_accepted_B[:, None]
  dst_BA = jnp.where(keep_BA, lengths[:, None] + jnp.arange(num_path, dtype=jnp.int32), max_len)
  # Gather everything first, then scatter: sources never get overwritten before they are read.
  move = lambda x_BS: x_BS.at[rows_BA, dst_BA].set(x_BS[rows_BA, src_BA], mode='drop')
  new_lengths = lengths + jnp.clip(num_accepted_B.astype(jnp.int32), 0, num_path)
  return cache.replace(layers=jax.tree.map(move, cache.layers), lengths=new_lengths)


def advance(cache, num_accepted_B):
  """`commit` for a chain: the last `extend`'s first `num_accepted_B` tokens already sit at slots
  `len + a` (path 0, 1, ...), so only the lengths move; no gather/scatter of the cache."""
  _check_int('num_accepted_B', num_accepted_B, 1)
  if num_accepted_B.shape != cache.lengths.shape:
    raise ValueError(f'num_accepted_B {num_accepted_B.shape} must match the cache batch '
                     f'{cache.lengths.shape}')
  return cache.replace(lengths=cache.lengths + jnp.maximum(num_accepted_B.astype(jnp.int32), 0))


def medusa_logits(model: Transformer, hidden_BTD):
  """[K, B, T, V] fp32: head k (from 1) at position i drafts t_{i+k+1}."""
  _check_model(model)
  return model.medusa_logits(hidden_BTD)


def init_mtp_cache(model: Transformer, batch_size: int, max_len: int) -> MTPCache:
  """Empty MTP caches; use the trunk cache's `max_len`."""
  _check_model(model)
  depth = model.config.mtp_depth
  if not depth:
    raise ValueError('init_mtp_cache: the model has no MTP modules (config.mtp_depth == 0)')
  return MTPCache(layers=empty_layer_caches(model, depth, batch_size, max_len),
                  lengths=jnp.zeros((batch_size,), jnp.int32),
                  tokens=jnp.zeros((batch_size, max_len + depth + 1), jnp.int32),
                  prev_hidden=jnp.zeros((depth, batch_size, model.config.d_model), model.dtype))


def _gather_rows(x_BW, idx_B):
  """x[b, idx[b]] for x [B, W, ...]."""
  idx = idx_B.reshape(idx_B.shape + (1,) * (x_BW.ndim - 1))
  return jnp.take_along_axis(x_BW, idx, axis=1)[:, 0]


def _argmax_select(logits_BV, depth):
  del depth
  return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def mtp_draft(model: Transformer, cache: MTPCache, hidden_BAD, tokens_BA, num_new_B,
              next_token_B, *, select_fn: Callable | None = None):
  """Feeds newly committed trunk positions to the MTP modules and drafts D chained tokens.

  Args:
    hidden_BAD, tokens_BA: trunk `hidden_BTD` and tokens at positions [n, n + num_new), with
      n = `cache.lengths` (after a prefill: the padded prompt and its hidden states; after a
      commit: the accepted path gathered from the `extend` outputs).
    num_new_B: number of valid entries per row (may be 0).
    next_token_B: the trunk's token at position n' = n + num_new (from the logits at n' - 1).
    select_fn: `(logits_BV, k) -> tokens_B` picks draft k (from 1); default argmax.
  Returns:
    (MTPDraft(tokens_BJ, logits_BJV), cache) with drafts for t_{n'+1} .. t_{n'+D}.

  Module k processes one window of W = A + D - 1 consecutive positions starting at its exact
  length c_k = max(n - k + 1, 0): the entries up to c'_k = max(n' - k + 1, 0) are exact (all the
  tokens they read are known), the rest up to n' - 1 read drafts and are overwritten next call.
  """
  _check_model(model)
  c = model.config
  depth = c.mtp_depth
  if not depth:
    raise ValueError('mtp_draft: the model has no MTP modules (config.mtp_depth == 0)')
  _check_int('tokens_BA', tokens_BA, 2)
  _check_int('num_new_B', num_new_B, 1)
  _check_int('next_token_B', next_token_B, 1)
  batch, num_new = tokens_BA.shape
  if hidden_BAD.shape != (batch, num_new, c.d_model):
    raise ValueError(f'hidden_BAD must have shape {(batch, num_new, c.d_model)}, got '
                     f'{hidden_BAD.shape}')
  if num_new_B.shape != (batch,) or next_token_B.shape != (batch,) or cache.batch_size != batch:
    raise ValueError(f'num_new_B {num_new_B.shape}, next_token_B {next_token_B.shape} and the '
                     f'cache batch {cache.batch_size} must match tokens_BA batch {batch}')
  select_fn = select_fn or _argmax_select
  width = num_new + depth - 1
  rows_B = jnp.arange(batch)
  n_B = cache.lengths
  n_new_B = n_B + jnp.clip(num_new_B.astype(jnp.int32), 0, num_new)
  num_tok = cache.tokens.shape[1]

  tok = cache.tokens.at[rows_B[:, None], n_B[:, None] + jnp.arange(num_new)].set(
      tokens_BA.astype(jnp.int32), mode='drop')
  tok = tok.at[rows_B, n_new_B].set(next_token_B.astype(jnp.int32), mode='drop')

  layers = list(cache.layers)
  h_in_BWD = jnp.pad(hidden_BAD.astype(model.dtype), ((0, 0), (0, depth - 1), (0, 0)))
  c_prev_B = n_B  # window start of the previous stage (the trunk: n)
  drafts, draft_logits, prev_hidden = [], [], []
  for k, module in enumerate(model.mtp, start=1):
    c_B = jnp.maximum(n_B - k + 1, 0)
    if k > 1:
      # Entry j is position c_k + j and needs h_{k-1} there; module k-1's window starts at
      # c_{k-1} = c_k + s (s in {0, 1}); position c_{k-1} - 1 is its stored last exact output.
      shift_B = c_prev_B - c_B
      padded_BWD = jnp.concatenate([cache.prev_hidden[k - 2][:, None], h_in_BWD], axis=1)
      idx_BW = jnp.arange(width)[None, :] + 1 - shift_B[:, None]
      h_in_BWD = jnp.take_along_axis(padded_BWD, idx_BW[:, :, None], axis=1)
    positions_BW = c_B[:, None] + jnp.arange(width, dtype=jnp.int32)
    tok_BW = jnp.take_along_axis(tok, jnp.clip(positions_BW + k, 0, num_tok - 1), axis=1)
    e_BWD = model.embed_tokens(tok_BW)
    # The decode kernel takes <= 128 queries: longer windows (a prefill) go in causal chunks.
    outs = []
    for start in range(0, width, MAX_NEW_TOKENS_PER_CALL):
      stop = min(start + MAX_NEW_TOKENS_PER_CALL, width)
      chunk = stop - start
      mask_BCC = jnp.broadcast_to(jnp.tril(jnp.ones((chunk, chunk), bool)), (batch, chunk, chunk))
      h_chunk, (layers[k - 1],) = module.decode(
          h_in_BWD[:, start:stop], e_BWD[:, start:stop],
          model.rotary(positions_BW[:, start:stop]), (layers[k - 1],), c_B + start, mask_BCC)
      outs.append(h_chunk)
    h_out_BWD = jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]

    last_B = jnp.clip(n_new_B - 1 - c_B, 0, width - 1)  # entry of position n' - 1
    h_last_BD = _gather_rows(h_out_BWD, last_B)
    if k == 1:
      # With nothing new (num_new == 0) module 1's position n' - 1 is before its window; its
      # output there is the stored last exact one.
      h_last_BD = jnp.where((n_new_B > n_B)[:, None], h_last_BD, cache.prev_hidden[0])
    logits_BV = model.decode_logits(model.final_norm(h_last_BD))
    draft_B = select_fn(logits_BV, k).astype(jnp.int32)
    tok = tok.at[rows_B, n_new_B + k].set(draft_B, mode='drop')
    drafts.append(draft_B)
    draft_logits.append(logits_BV)

    c_next_B = jnp.maximum(n_new_B - k + 1, 0)
    last_exact_BD = _gather_rows(h_out_BWD, jnp.clip(c_next_B - 1 - c_B, 0, width - 1))
    prev_hidden.append(jnp.where((c_next_B > c_B)[:, None], last_exact_BD, cache.prev_hidden[k - 1]))
    h_in_BWD, c_prev_B = h_out_BWD, c_B

  new_cache = MTPCache(layers=tuple(layers), lengths=n_new_B, tokens=tok,
                       prev_hidden=jnp.stack(prev_hidden).astype(cache.prev_hidden.dtype))
  return MTPDraft(jnp.stack(drafts, axis=1), jnp.stack(draft_logits, axis=1)), new_cache
