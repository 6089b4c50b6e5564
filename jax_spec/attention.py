"""Attention dispatcher: one signature, three implementations.

- 'pallas': `pallas_kernels.flash_attention` (Triton on GPU, Mosaic on TPU, interpret on CPU).
- 'xla': blockwise online-softmax attention in plain JAX; memory linear in sequence length.
- 'reference': the materialized softmax (tests only).
`implementation=None` picks 'pallas' on GPU/TPU and 'xla' on CPU.
"""
from __future__ import annotations

import jax

import jax.numpy as jnp

from pallas_kernels.reference import reference_attention

IMPLEMENTATIONS = ('pallas', 'xla', 'reference')


def default_implementation() -> str:
  return 'pallas' if jax.default_backend() in ('gpu', 'cuda', 'rocm', 'tpu') else 'xla'


def dot_product_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                          sliding_window=None, logit_soft_cap=None, sm_scale=None,
                          implementation=None, return_lse=False, **kernel_kwargs):
  """q `[B, Tq, H, D]`, k/v `[B, Tk, K, D]` -> `[B, Tq, H, D]` (see pallas_kernels.flash_attention)."""
  if implementation is None:
    implementation = default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}')
  kwargs = dict(causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, sm_scale=sm_scale,
                return_lse=return_lse)
  # TODO(attention helper): 'pallas' -> flash_attention, 'xla' -> blockwise implementation.
  return reference_attention(q, k, v, **kwargs)


def cache_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, *, cache_lengths_B, tree_mask_BTT,
                    sm_scale=None, implementation=None):
  """T new queries against a KV cache whose slots `[len_b, len_b + T)` hold the new tokens' K/V.

  Query t of row b sees cache slots `j < len_b` and slot `len_b + t'` iff `tree_mask_BTT[b, t, t']`.
  """
  # TODO(attention helper): 'pallas' -> pallas_kernels.decode_attention, 'xla' blockwise.
  batch, num_new = q_BTHD.shape[:2]
  cache_len = k_cache_BSKD.shape[1]
  slot_S = jnp.arange(cache_len)
  rel_BS = slot_S[None, :] - cache_lengths_B[:, None]
  in_prefix_BS = rel_BS < 0
  is_new_BS = (rel_BS >= 0) & (rel_BS < num_new)
  tree_BTS = jnp.take_along_axis(
      tree_mask_BTT, jnp.clip(rel_BS, 0, num_new - 1)[:, None, :].repeat(num_new, 1), axis=2)
  visible_BTS = in_prefix_BS[:, None, :] | (is_new_BS[:, None, :] & tree_BTS)
  return reference_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, sm_scale=sm_scale,
                             mask=visible_BTS[:, None])
