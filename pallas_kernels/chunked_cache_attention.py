"""Cache attention (decode / tree verify) in plain JAX: online softmax over cache chunks.

The XLA counterpart of `decode_attention` (same contract, same visibility rule and online-softmax
update from `flash_attention_common`): T <= 128 new queries against a KV cache, stopping after
the longest row's last visible slot. Chunks are read from the cache in place (no padding or
transposed copy of the cache); the last chunk is shifted back to end at the cache end and its
already-seen slots are masked. Forward only. The default on CPU and TPU.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from pallas_kernels import flash_attention_common as common

_DEFAULT_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class ChunkOptions:
  """`chunk`: cache slots per loop step (None: 1024, clamped to the cache length)."""
  chunk: int | None = None


def chunked_cache_attention(q_BTHE, k_cache_BSKE, v_cache_BSKE, *, cache_lengths_B,
                            tree_mask_BTT, sm_scale=None, chunk=None):
  """Arguments and semantics of `pallas_kernels.decode_attention.decode_attention`."""
  common.validate_cache_inputs(q_BTHE, k_cache_BSKE, v_cache_BSKE,
                               cache_lengths_B=cache_lengths_B, tree_mask_BTT=tree_mask_BTT,
                               sm_scale=sm_scale)
  if chunk is not None and not common.is_positive_int(chunk):
    raise ValueError(f'chunk must be a positive int, got {chunk!r}')
  cache_lengths_B = cache_lengths_B.astype(jnp.int32)
  tree_mask_BTT = tree_mask_BTT.astype(bool)
  batch, num_new, num_heads, head_dim = q_BTHE.shape
  cache_len, kvh = k_cache_BSKE.shape[1:3]
  group = num_heads // kvh
  chunk = min(cache_len, _DEFAULT_CHUNK if chunk is None else int(chunk))
  scale = head_dim ** -0.5 if sm_scale is None else float(sm_scale)
  q_BKQE = (q_BTHE.reshape(batch, num_new, kvh, group, head_dim).transpose(0, 2, 3, 1, 4)
            .reshape(batch, kvh, group * num_new, head_dim))
  rows = group * num_new
  end = jnp.minimum(jnp.max(cache_lengths_B) + num_new, cache_len)
  num_chunks = (end + chunk - 1) // chunk
  precision = common.matmul_precision(q_BKQE.dtype)

  def body(c, carry):
    nominal = c * chunk
    start = jnp.minimum(nominal, cache_len - chunk)
    slot_S = start + jnp.arange(chunk)
    k_chunk_BSKE = lax.dynamic_slice_in_dim(k_cache_BSKE, start, chunk, axis=1)
    v_chunk_BSKE = lax.dynamic_slice_in_dim(v_cache_BSKE, start, chunk, axis=1)
    s = jnp.einsum('bkmd,bckd->bkmc', q_BKQE, k_chunk_BSKE, precision=precision,
                   preferred_element_type=jnp.float32) * scale
    vis_BTS = (common.cache_visibility(cache_lengths_B, tree_mask_BTT, slot_S)
               & (slot_S >= nominal))
    s = jnp.where(vis_BTS[:, None, None], s.reshape(batch, kvh, group, num_new, chunk), -jnp.inf)
    pv = lambda p: jnp.einsum('bkmc,bckd->bkmd', p.astype(v_cache_BSKE.dtype), v_chunk_BSKE,
                              precision=precision, preferred_element_type=jnp.float32)
    return common.online_softmax_step(*carry, s.reshape(batch, kvh, rows, chunk), pv,
                                      masked=True)

  init = common.online_softmax_init((batch, kvh, rows, head_dim))
  if chunk == cache_len:
    state = body(0, init)  # One chunk: a while loop would only add per-step overhead.
  else:
    state = lax.fori_loop(0, num_chunks, body, init)
  o, _ = common.softmax_finish(*state)
  o = o.reshape(batch, kvh, group, num_new, head_dim).transpose(0, 3, 1, 2, 4)
  return o.reshape(batch, num_new, num_heads, head_dim).astype(q_BTHE.dtype)
