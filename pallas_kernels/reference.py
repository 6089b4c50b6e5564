"""Materialized reference attention: the ground truth every kernel is tested against.

Shapes follow `jax.nn.dot_product_attention`: q `[batch, q_len, num_heads, head_dim]`,
k/v `[batch, kv_len, num_kv_heads, head_dim]`. Causal masking is bottom-right aligned: query i
sits at key position `kv_len - q_len + i`. Rows with no visible key return zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention_common as common


def attention_mask(q_len: int, kv_len: int, *, causal: bool = False, q_segment_ids=None,
                   kv_segment_ids=None, sliding_window: int | None = None):
  """Boolean visibility mask `[batch or 1, q_len, kv_len]` (True = key visible to query)."""
  q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
  kv_pos = jnp.arange(kv_len)[None, :]
  mask = jnp.ones((q_len, kv_len), dtype=bool)
  if causal:
    mask &= kv_pos <= q_pos
  if sliding_window is not None:
    mask &= (q_pos - kv_pos < sliding_window) & (q_pos - kv_pos >= 0)
  mask = mask[None]
  if q_segment_ids is not None:
    mask = mask & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
  return mask


def reference_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                        sliding_window=None, logit_soft_cap=None, sm_scale=None, mask=None,
                        return_lse=False, precision=jax.lax.Precision.HIGHEST):
  """Plain softmax attention with the full `[q_len, kv_len]` score matrix.

  Computes in the promoted dtype of the inputs (pass float64 inputs for a float64 reference).
  `mask` is an extra boolean mask broadcastable to `[batch, num_heads, q_len, kv_len]`.
  """
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  group = num_heads // num_kv_heads
  q_BKGTE = q.reshape(batch, q_len, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  s = jnp.einsum('bkgqd,bskd->bkgqs', q_BKGTE, k, precision=precision) * sm_scale
  if logit_soft_cap is not None:
    s = logit_soft_cap * jnp.tanh(s / logit_soft_cap)
  visible = attention_mask(q_len, kv_len, causal=causal, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids, sliding_window=sliding_window)
  visible = jnp.broadcast_to(visible[:, None, None], (batch, num_kv_heads, group, q_len, kv_len))
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, num_heads, q_len, kv_len))
    visible = visible & mask.reshape(batch, num_kv_heads, group, q_len, kv_len)
  s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(visible, jnp.exp(s - m), 0.0)
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum('bkgqs,bskd->bkgqd', p / jnp.where(l == 0, 1.0, l), v, precision=precision)
  o = o.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)
  if not return_lse:
    return o
  lse = jnp.where(l[..., 0] == 0, -jnp.inf, m[..., 0] + jnp.log(jnp.where(l[..., 0] == 0, 1.0, l[..., 0])))
  return o, lse.reshape(batch, num_heads, q_len).astype(jnp.float32)


def reference_cache_attention(q_BTHE, k_cache_BSKE, v_cache_BSKE, *, cache_lengths_B,
                              tree_mask_BTT, sm_scale=None):
  """Cache attention (`decode_attention`'s semantics) through the materialized softmax."""
  visible_BTS = common.cache_visibility(cache_lengths_B, tree_mask_BTT,
                                        jnp.arange(k_cache_BSKE.shape[1]))
  return reference_attention(q_BTHE, k_cache_BSKE, v_cache_BSKE, sm_scale=sm_scale,
                             mask=visible_BTS[:, None])
