"""Attention dispatcher: one signature per use, the implementations in `pallas_kernels`.

`dot_product_attention` (training, prefill):
- 'pallas': `pallas_kernels.flash_attention` (Triton on GPU, Mosaic on TPU, interpret on CPU).
- 'xla': `pallas_kernels.blockwise_attention` (plain-JAX flash attention with a custom_vjp;
  linear memory; any float dtype including float64). The CPU default.
- 'reference': the materialized softmax (tests only; differentiable any number of times).

`cache_attention` (decode, tree verification: T <= 128 new queries against a KV cache):
- 'pallas': `pallas_kernels.decode_attention` (flash-decoding, Triton; interpret on CPU). The
  kernel is Triton-only, so on TPU 'pallas' runs the 'xla' path (a model configured with
  attention_impl='pallas' lands here); decode kernel options are then an error, never a reason to
  run something else.
- 'xla': `pallas_kernels.chunked_cache_attention`. The default off NVIDIA GPUs.
- 'reference': the materialized mask.

`implementation=None` picks by platform only. Kernel options are typed (`options=`): a
`FlashOptions` / `BlockwiseOptions` resp. `DecodeOptions` / `ChunkOptions` instance that must match
the implementation that runs. Inputs are validated once, by the implementation's entry point, with
the rules of `flash_attention_common`.
"""
from __future__ import annotations

import dataclasses

import jax

from pallas_kernels import flash_attention_common as common
from pallas_kernels.blockwise_attention import DTYPES as _BLOCKWISE_DTYPES
from pallas_kernels.blockwise_attention import BlockwiseOptions, blockwise_attention
from pallas_kernels.chunked_cache_attention import ChunkOptions, chunked_cache_attention
from pallas_kernels.decode_attention import DecodeOptions, decode_attention
from pallas_kernels.flash_attention import FlashOptions, flash_attention
from pallas_kernels.reference import reference_attention, reference_cache_attention

IMPLEMENTATIONS = ('pallas', 'xla', 'reference')
_OPTIONS = {'pallas': FlashOptions, 'xla': BlockwiseOptions}
_CACHE_OPTIONS = {'pallas': DecodeOptions, 'xla': ChunkOptions}

__all__ = ['IMPLEMENTATIONS', 'BlockwiseOptions', 'ChunkOptions', 'DecodeOptions', 'FlashOptions',
           'cache_attention', 'default_cache_implementation', 'default_implementation',
           'dot_product_attention']


def default_implementation() -> str:
  return 'pallas' if jax.default_backend() in ('gpu', 'cuda', 'rocm', 'tpu') else 'xla'


def default_cache_implementation() -> str:
  """The decode kernel is Triton-only: 'pallas' on NVIDIA GPUs, 'xla' elsewhere."""
  return 'pallas' if jax.default_backend() in ('gpu', 'cuda') else 'xla'


def _check_implementation(implementation, default):
  implementation = default() if implementation is None else implementation
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {IMPLEMENTATIONS} or None, '
                     f'got {implementation!r}')
  return implementation


def _option_kwargs(options, implementation: str, table, note: str = '') -> dict:
  """`options` as keyword arguments of the implementation; ValueError if it is for another."""
  if options is None:
    return {}
  want = table.get(implementation)
  if want is None or type(options) is not want:  # pylint: disable=unidiomatic-typecheck
    expected = 'no options' if want is None else f'{want.__name__} (or None)'
    raise ValueError(f'options must be {expected} for implementation {implementation!r}{note}, '
                     f'got {type(options).__name__}')
  return dataclasses.asdict(options)


def dot_product_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                          sliding_window=None, logit_soft_cap=None, sm_scale=None,
                          implementation=None, options=None, return_lse=False):
  """q `[B, Tq, H, E]`, k/v `[B, Tk, K, E]` -> `[B, Tq, H, E]` (and fp32 lse `[B, H, Tq]`).

  Semantics are those of `pallas_kernels.flash_attention`: causal is bottom-right aligned, a key
  j is in the sliding window of query i iff `0 <= pos_i - pos_j < sliding_window`, segments attend
  within equal ids, rows with no visible key give zeros (and zero gradients). `options`:
  `FlashOptions` for 'pallas', `BlockwiseOptions` for 'xla'. 'pallas' and 'xla' are
  differentiable once (custom_vjp; grad-of-grad raises), 'reference' any number of times.
  """
  implementation = _check_implementation(implementation, default_implementation)
  kwargs = dict(causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, sm_scale=sm_scale,
                return_lse=return_lse, **_option_kwargs(options, implementation, _OPTIONS))
  if implementation == 'pallas':
    return flash_attention(q, k, v, **kwargs)
  if implementation == 'xla':
    return blockwise_attention(q, k, v, **kwargs)
  # The reference is a test oracle without checks of its own; it takes the blockwise path's.
  common.validate_attention_inputs(
      q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, sm_scale=sm_scale,
      dtypes=_BLOCKWISE_DTYPES)
  return reference_attention(q, k, v, **kwargs)


def cache_attention(q_BTHE, k_cache_BSKE, v_cache_BSKE, *, cache_lengths_B, tree_mask_BTT,
                    sm_scale=None, implementation=None, options=None):
  """T new queries against a KV cache whose slots `[len_b, len_b + T)` hold the new tokens' K/V.

  Query t of row b sees cache slots `j < len_b` and slot `len_b + t'` iff `tree_mask_BTT[b, t, t']`
  (slots past the end of the cache do not exist). Returns `[B, T, H, E]` in q's dtype; a query
  that sees nothing gets zeros. 'xla' and 'pallas' are forward-only (decoding); 'reference' is
  differentiable. `options`: `DecodeOptions` for 'pallas' (not on TPU, where 'pallas' runs
  'xla'), `ChunkOptions` for 'xla'.
  """
  implementation = _check_implementation(implementation, default_cache_implementation)
  note = ''
  if implementation == 'pallas' and jax.default_backend() == 'tpu':
    implementation, note = 'xla', " (on TPU 'pallas' runs the 'xla' cache path)"
  kwargs = dict(cache_lengths_B=cache_lengths_B, tree_mask_BTT=tree_mask_BTT, sm_scale=sm_scale,
                **_option_kwargs(options, implementation, _CACHE_OPTIONS, note))
  if implementation == 'pallas':
    return decode_attention(q_BTHE, k_cache_BSKE, v_cache_BSKE, **kwargs)
  if implementation == 'xla':
    return chunked_cache_attention(q_BTHE, k_cache_BSKE, v_cache_BSKE, **kwargs)
  common.validate_cache_inputs(q_BTHE, k_cache_BSKE, v_cache_BSKE, **kwargs)
  return reference_cache_attention(q_BTHE, k_cache_BSKE, v_cache_BSKE, **kwargs)
