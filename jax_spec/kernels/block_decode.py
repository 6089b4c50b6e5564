"""One transformer block's decode step as one fp32 CPU kernel (`block_decode.cc`, XLA FFI).

`models.layers.Block.decode` runs about 25 XLA ops per block: RMSNorm, fused q/k/v, RoPE, cache
write, the cache attention (which reads every slot of the cache), the output projection,
RMSNorm, fused gate/up, SwiGLU, down. The kernel runs them in one call, with `rows_matmul`'s
matmuls (the packed weights of `models.decode_packs`) and an exact two-pass softmax over the
cache slots a query can see only (docs/benchmarks.md, "One block per kernel call"). A row's
output does not depend on how many rows share the call, so plain decoding and a verify step give
bitwise the same numbers for the same token and context. The K/V caches are updated in place
(input/output aliases).

It is built into `rows_matmul`'s library; `JAX_SPEC_BLOCK_DECODE=0` turns it off (back to the XLA
ops), as `JAX_SPEC_ROWS_MATMUL=0` turns off both. On other platforms (and when exporting for
one) `lax.platform_dependent` lowers the XLA ops.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_spec.kernels import rows_matmul

MAX_HEAD_DIM = 512


def enabled() -> bool:
  """Whether the kernel may be used: built (see `rows_matmul.available`) and not switched off."""
  return os.environ.get('JAX_SPEC_BLOCK_DECODE', '1') != '0' and rows_matmul.available()


def block_operands(attn_scale_D, qkv_tiles, qkv_bias, q_scale_E, k_scale_E, cos_BTE, sin_BTE,
                   k_BSKE, v_BSKE, lengths_B, mask_BTT, out_tiles, out_bias_D, mlp_scale_D,
                   gate_up_tiles, down_tiles) -> tuple:
  """A block's kernel operands after its input, in the binding's order (`layers.Block` builds
  them). The *_tiles are `rows_matmul.pack`ed `[D, (H + 2K) E]`, `[H E, D]`, `[D, 2F]` (gate then
  up) and `[F, D]` matrices; cos/sin are the rotate-half tables of `layers.Rotary`; biases and the
  q/k norm scales are fp32 vectors (zeros / ones where the model has none)."""
  f32 = lambda a: a.astype(jnp.float32)
  return (f32(attn_scale_D), qkv_tiles, f32(qkv_bias), f32(q_scale_E), f32(k_scale_E),
          f32(cos_BTE), f32(sin_BTE), k_BSKE, v_BSKE, lengths_B.astype(jnp.int32),
          mask_BTT.astype(jnp.bool_), out_tiles, f32(out_bias_D), f32(mlp_scale_D), gate_up_tiles,
          down_tiles)


_CACHES = (7, 8)   # the k and v caches among `block_operands`, updated in place


def _attrs(eps, sm_scale, num_heads, qk_norm):
  return dict(eps=np.float32(eps), sm_scale=np.float32(sm_scale), num_heads=np.int64(num_heads),
              qk_norm=np.int64(bool(qk_norm)))


def block_decode(x_BTD, block: tuple, *, eps: float, sm_scale: float, num_heads: int,
                 qk_norm: bool):
  """The kernel call (CPU only): -> (x_BTD, k_BSKE, v_BSKE); see block_decode.cc for the math.
  `block`: `block_operands(...)`."""
  k_BSKE, v_BSKE = (block[i] for i in _CACHES)
  out_types = (jax.ShapeDtypeStruct(x_BTD.shape, jnp.float32),
               jax.ShapeDtypeStruct(k_BSKE.shape, jnp.float32),
               jax.ShapeDtypeStruct(v_BSKE.shape, jnp.float32))
  call = jax.ffi.ffi_call(rows_matmul.BLOCK_TARGET, out_types, vmap_method='sequential',
                          input_output_aliases={1 + _CACHES[0]: 1, 1 + _CACHES[1]: 2})
  return call(x_BTD.astype(jnp.float32), *block, **_attrs(eps, sm_scale, num_heads, qk_norm))


def feature_decode(hidden_BTD, embedded_BTD, hidden_scale_D, embed_scale_D, proj_tiles,
                   proj_bias_D, block: tuple, final_scale_D, head_tiles, *, vocab: int,
                   eps: float, sm_scale: float, num_heads: int, qk_norm: bool):
  """A feature drafter's step in one call (CPU only): the MTP combine
  `[RMSNorm(h); RMSNorm(e)] W_proj (+ b)`, the block, the final RMSNorm and the LM head.
  -> (feature_BTD, logits_BTV fp32, k_BSKE, v_BSKE). proj / head tiles: `rows_matmul.pack`ed
  `[2D, D]` and `[D, V]`; `block`: `block_operands(...)`."""
  f32 = lambda a: a.astype(jnp.float32)
  k_BSKE, v_BSKE = (block[i] for i in _CACHES)
  out_types = (jax.ShapeDtypeStruct(hidden_BTD.shape, jnp.float32),
               jax.ShapeDtypeStruct(hidden_BTD.shape[:-1] + (vocab,), jnp.float32),
               jax.ShapeDtypeStruct(k_BSKE.shape, jnp.float32),
               jax.ShapeDtypeStruct(v_BSKE.shape, jnp.float32))
  call = jax.ffi.ffi_call(rows_matmul.FEATURE_TARGET, out_types, vmap_method='sequential',
                          input_output_aliases={6 + _CACHES[0]: 2, 6 + _CACHES[1]: 3})
  return call(f32(hidden_BTD), f32(embedded_BTD), f32(hidden_scale_D), f32(embed_scale_D),
              proj_tiles, f32(proj_bias_D), *block, f32(final_scale_D), head_tiles,
              **_attrs(eps, sm_scale, num_heads, qk_norm))
