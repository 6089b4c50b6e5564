"""Attention dispatcher: one signature, three implementations.

- 'pallas': `pallas_kernels.flash_attention` (Triton on GPU, Mosaic on TPU, interpret on CPU).
- 'xla': blockwise online-softmax attention in plain JAX; memory linear in sequence length.
- 'reference': the materialized softmax (tests only).
`implementation=None` picks 'pallas' on GPU/TPU and 'xla' on CPU.
"""
from __future__ import annotations

import jax

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
