"""Transformer building blocks: RMSNorm, rotary embeddings, GQA attention, SwiGLU, a block.

Every module takes `dtype` (compute) and `param_dtype` (storage). Norm statistics and rotary
embeddings are computed in fp32 and cast back to the compute dtype for the next matmul.
Attention has two entry points: `__call__` for training/prefill (whole sequences through
`jax_spec.attention.dot_product_attention`) and `decode` for new tokens against a KV cache
(through `jax_spec.attention.cache_attention`).
"""
from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from jax_spec import attention as attention_lib
from jax_spec.kernels import block_decode, rows_matmul
from jax_spec.models.config import RopeScaling, TransformerConfig


@functools.partial(jax.jit, static_argnums=1)
def _flat_normal(key, size: int):
  return jax.random.normal(key, (size,), jnp.float32)


def normal_init(stddev: float):
  """N(0, stddev^2) initializer that compiles one RNG program per power-of-two size bucket.

  Eager model construction otherwise compiles a threefry program for every distinct parameter
  shape (about a second each on CPU); here each new shape only costs a slice and a reshape.
  Works under tracing too (nnx.eval_shape, nnx.jit).
  """
  def init(key, shape, dtype=jnp.float32):
    size = math.prod(shape)
    bucket = 1 << max(size - 1, 0).bit_length()
    return (_flat_normal(key, bucket)[:size].reshape(shape) * stddev).astype(dtype)
  return init


class Dense(nnx.Module):
  """A kernel of any shape applied with one einsum: `out = einsum(eqn, x, kernel) [+ bias]`.

  `bias_shape` (the output's trailing dims) adds a zero-initialised bias; None: no bias.
  """

  def __init__(self, kernel_shape, eqn: str, *, init, dtype, param_dtype, rngs: nnx.Rngs,
               bias_shape=None):
    self.kernel = nnx.Param(init(rngs.params(), tuple(kernel_shape), param_dtype))
    self.bias = None if bias_shape is None else nnx.Param(jnp.zeros(tuple(bias_shape), param_dtype))
    self.eqn = eqn
    self.dtype = dtype

  def __call__(self, x):
    y = jnp.einsum(self.eqn, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)

  def decode(self, x, in_axes: int = 1):
    """`self(x)` for the few rows of a decode step (`rows_matmul.matmul`; forward only). The
    equation must contract x's last `in_axes` dims with the kernel's first ones, in order."""
    lead, out = x.shape[:-in_axes], self.kernel.shape[in_axes:]
    y = rows_matmul.matmul(x.astype(self.dtype).reshape(lead + (-1,)), self.matrix(in_axes),
                           key=id(self)).reshape(lead + out)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)

  def matrix(self, in_axes: int = 1):
    """The kernel as a `[contracted, out]` matrix in the compute dtype."""
    kernel = self.kernel[...].astype(self.dtype)
    return kernel.reshape(math.prod(kernel.shape[:in_axes]), -1)


def fused_matrix(denses):
  """The kernels of `fused_dense`'s Dense layers concatenated along their outputs, `[D, sum]`."""
  return jnp.concatenate([d.matrix() for d in denses], axis=1)


def fused_key(denses):
  return tuple(id(d) for d in denses)


def decode_matrices(block) -> dict:
  """`{key: matrix}` of every matmul a block's `decode` runs (the keys of `rows_matmul.packed`)."""
  attn, mlp = block.attn, block.mlp
  qkv, gate_up = (attn.q, attn.k, attn.v), (mlp.gate, mlp.up)
  return {fused_key(qkv): fused_matrix(qkv), id(attn.out): attn.out.matrix(2),
          fused_key(gate_up): fused_matrix(gate_up), id(mlp.down): mlp.down.matrix()}


def fused_dense(x, denses):
  """`[d(x) for d in denses]` with one matmul: Dense layers of the same input, each a kernel
  `[D, *out]` with equation '...d,d...->...', their kernels concatenated along the outputs.

  Decoding runs a few rows per step, where a matmul costs per call more than per FLOP
  (docs/benchmarks.md, "Verify cost model"); the concatenation of loop-invariant weights is
  hoisted out of the decode loop by XLA. The stored kernels (and checkpoints) keep their layout.
  """
  dtype = denses[0].dtype
  sizes = [math.prod(d.kernel.shape[1:]) for d in denses]
  y = rows_matmul.matmul(x.astype(dtype), fused_matrix(denses), key=fused_key(denses))
  outs = []
  for d, part in zip(denses, jnp.split(y, list(itertools.accumulate(sizes))[:-1], -1)):
    part = part.reshape(x.shape[:-1] + d.kernel.shape[1:])
    outs.append(part if d.bias is None else part + d.bias[...].astype(dtype))
  return outs


class RMSNorm(nnx.Module):
  """RMSNorm with fp32 statistics; returns the compute dtype."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None):
  """[head_dim / 2] fp32 rotary frequencies, optionally scaled (`RopeScaling`)."""
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  if scaling is None:
    return inv_freq
  if scaling.kind == 'linear':
    return inv_freq / scaling.factor
  # llama3 (as transformers' _compute_llama3_parameters): low frequencies slowed by `factor`,
  # high ones kept, a linear blend in wavelength-space between.
  old_len = scaling.original_max_position_embeddings
  wavelen = 2 * math.pi / inv_freq
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
  return jnp.where(wavelen > old_len / scaling.low_freq_factor, inv_freq / scaling.factor,
                   jnp.where(wavelen < old_len / scaling.high_freq_factor, inv_freq, blended))


@struct.dataclass
class Rotary:
  """Rotary tables of one call's positions, `cos` and `sin` [B, T, 1, E] fp32, in the rotate-half
  form (`cos` holds the cosines twice, `sin` the sines with the first half negated).

  Every layer rotates by the same positions, so a forward computes them once (`rotary`) and
  hands them to each block.
  """
  cos: jax.Array
  sin: jax.Array


def rotary(positions_BT, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> Rotary:
  """The `Rotary` tables of `positions_BT` for heads of `head_dim`."""
  inv_freq = rope_inv_freq(head_dim, theta, scaling)
  angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq   # [B, T, E / 2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  return Rotary(jnp.concatenate([cos, cos], -1)[:, :, None],
                jnp.concatenate([-sin, sin], -1)[:, :, None])


def apply_rope(x_BTHE, rope: Rotary):
  """Rotary embedding (rotate-half form: `[x1 cos - x2 sin, x2 cos + x1 sin]`), in fp32."""
  x_BTHE32 = x_BTHE.astype(jnp.float32)
  x1, x2 = jnp.split(x_BTHE32, 2, axis=-1)
  out = x_BTHE32 * rope.cos + jnp.concatenate([x2, x1], axis=-1) * rope.sin
  return out.astype(x_BTHE.dtype)


def positions_from_segments(segment_ids_BT):
  """Positions that restart at 0 at every document start (a change of segment id)."""
  _, seq_len = segment_ids_BT.shape
  idx_T = jnp.arange(seq_len, dtype=jnp.int32)
  is_start_BT = jnp.concatenate(
      [jnp.ones_like(segment_ids_BT[:, :1], dtype=bool),
       segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
  start_BT = jax.lax.cummax(jnp.where(is_start_BT, idx_T, 0), axis=1)
  return idx_T - start_BT


def _inits(c: TransformerConfig):
  """(init, residual-output init): the output projections of attention and the MLP start scaled
  by 1 / sqrt(2 num_layers) (GPT-2), so the residual stream's variance does not grow with depth."""
  return normal_init(c.init_std), normal_init(c.init_std / math.sqrt(2 * c.num_layers))


@struct.dataclass
class LayerCache:
  """One attention layer's K/V cache: `k`, `v` [B, S, K, E] in the compute dtype.

  Each layer owns its arrays (not a slice of a stacked [L, ...] cache), so a layer's write is an
  in-place update of its own buffer inside the decode loop and its attention reads it directly
  (a stacked cache paid a slice per layer: 2.4x slower in a 4-layer micro-benchmark on XLA:CPU,
  the one-token step 1.12x slower; docs/benchmarks.md, "Verify cost model").
  """
  k: jax.Array
  v: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[1]

  @classmethod
  def zeros(cls, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, dtype):
    shape = (batch_size, max_len, num_kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

  def write(self, k_BTKE, v_BTKE, slots_BT) -> 'LayerCache':
    """Row b's new K/V go to slots `slots_BT[b, t]`; out-of-range slots are dropped."""
    rows_BT = jnp.broadcast_to(jnp.arange(slots_BT.shape[0])[:, None], slots_BT.shape)
    put = lambda cache_BSKE, new_BTKE: cache_BSKE.at[rows_BT, slots_BT].set(
        new_BTKE.astype(cache_BSKE.dtype), mode='drop')
    return LayerCache(put(self.k, k_BTKE), put(self.v, v_BTKE))


class Attention(nnx.Module):
  """Grouped-query attention with rotary embeddings (K/V heads are never repeated)."""

  def __init__(self, config: TransformerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    init, out_init = _inits(c)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    def proj(heads):
      return Dense((c.d_model, heads, c.head_dim), 'btd,dhk->bthk', init=init,
                   bias_shape=(heads, c.head_dim) if c.qkv_bias else None, **kw)
    self.q, self.k, self.v = proj(c.num_heads), proj(c.num_kv_heads), proj(c.num_kv_heads)
    self.out = Dense((c.num_heads, c.head_dim, c.d_model), 'bthk,hkd->btd', init=out_init,
                     bias_shape=(c.d_model,) if c.out_bias else None, **kw)
    # Qwen3: per-head RMSNorm of q and k (over head_dim, weights shared by heads) before RoPE.
    norm = lambda: RMSNorm(c.head_dim, eps=c.norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.q_norm, self.k_norm = (norm(), norm()) if c.qk_norm else (None, None)
    self.impl = c.attention_impl

  def qkv(self, x_BTD, rope: Rotary, fused: bool = False):
    if fused:
      q_BTHE, k_BTKE, v_BTKE = fused_dense(x_BTD, (self.q, self.k, self.v))
    else:
      q_BTHE, k_BTKE, v_BTKE = self.q(x_BTD), self.k(x_BTD), self.v(x_BTD)
    if self.q_norm is not None:
      q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
    return apply_rope(q_BTHE, rope), apply_rope(k_BTKE, rope), v_BTKE

  def __call__(self, x_BTD, rope: Rotary, segment_ids_BT=None):
    """Causal self-attention over the sequence; also returns this layer's K and V."""
    q_BTHE, k_BTKE, v_BTKE = self.qkv(x_BTD, rope)
    o_BTHE = attention_lib.dot_product_attention(
        q_BTHE, k_BTKE, v_BTKE, causal=True, q_segment_ids=segment_ids_BT,
        kv_segment_ids=segment_ids_BT, implementation=self.impl)
    return self.out(o_BTHE), k_BTKE, v_BTKE

  def decode(self, x_BTD, rope: Rotary, cache: LayerCache, lengths_B, tree_mask_BTT):
    """New tokens against this layer's cache: writes K/V at slots `[len, len + T)`, then attends.
    Returns (output, cache)."""
    q_BTHE, k_BTKE, v_BTKE = self.qkv(x_BTD, rope, fused=True)
    slots_BT = lengths_B[:, None] + jnp.arange(x_BTD.shape[1], dtype=jnp.int32)
    cache = cache.write(k_BTKE, v_BTKE, slots_BT)
    o_BTHE = attention_lib.cache_attention(
        q_BTHE, cache.k, cache.v, cache_lengths_B=lengths_B, tree_mask_BTT=tree_mask_BTT,
        implementation=self.impl)
    return self.out.decode(o_BTHE.astype(x_BTD.dtype), in_axes=2), cache


class SwiGLU(nnx.Module):

  def __init__(self, config: TransformerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    c = config
    init, out_init = _inits(c)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Dense((c.d_model, c.d_ff), 'btd,df->btf', init=init, **kw)
    self.up = Dense((c.d_model, c.d_ff), 'btd,df->btf', init=init, **kw)
    self.down = Dense((c.d_ff, c.d_model), 'btf,fd->btd', init=out_init, **kw)

  def __call__(self, x_BTD, fused: bool = False):
    """`fused`: the decode path (one matmul for gate and up; few-row kernels)."""
    if not fused:
      return self.down(jax.nn.silu(self.gate(x_BTD)) * self.up(x_BTD))
    gate_BTF, up_BTF = fused_dense(x_BTD, (self.gate, self.up))
    return self.down.decode(jax.nn.silu(gate_BTF) * up_BTF)


class Block(nnx.Module):
  """Pre-norm transformer block: x + Attn(norm(x)), then x + MLP(norm(x))."""

  def __init__(self, config: TransformerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.attn = Attention(config, rngs=rngs, **kw)
    self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, **kw)
    self.mlp = SwiGLU(config, rngs=rngs, **kw)

  def __call__(self, x_BTD, rope: Rotary, segment_ids_BT=None):
    """Returns (x, k, v); k/v are what prefill writes into the cache."""
    a_BTD, k_BTKE, v_BTKE = self.attn(self.attn_norm(x_BTD), rope, segment_ids_BT)
    x_BTD = x_BTD + a_BTD
    return x_BTD + self.mlp(self.mlp_norm(x_BTD)), k_BTKE, v_BTKE

  def decode(self, x_BTD, rope: Rotary, cache: LayerCache, lengths_B, tree_mask_BTT):
    """New tokens against this block's own cache -> (x, cache): fp32 on CPU one kernel call
    (`kernels.block_decode`), else (and on other platforms) the XLA ops of `decode_ops`."""
    if not self.kernel_applies(x_BTD, cache):
      return self.decode_ops(x_BTD, rope, cache, lengths_B, tree_mask_BTT)
    return jax.lax.platform_dependent(x_BTD, rope, cache, lengths_B, tree_mask_BTT,
                                      cpu=self._decode_kernel, default=self.decode_ops)

  def decode_ops(self, x_BTD, rope: Rotary, cache: LayerCache, lengths_B, tree_mask_BTT):
    a_BTD, cache = self.attn.decode(self.attn_norm(x_BTD), rope, cache, lengths_B, tree_mask_BTT)
    x_BTD = x_BTD + a_BTD
    return x_BTD + self.mlp(self.mlp_norm(x_BTD), fused=True), cache

  def kernel_applies(self, x_BTD, cache: LayerCache) -> bool:
    """Whether `decode` runs `kernels.block_decode`: fp32 throughout, XLA's cache attention."""
    attn = self.attn
    return (x_BTD.dtype == jnp.float32 and attn.q.dtype == jnp.float32
            and cache.k.dtype == jnp.float32 and attn.impl in (None, 'xla')
            and attn.q.kernel.shape[2] % 2 == 0
            and attn.q.kernel.shape[2] <= block_decode.MAX_HEAD_DIM and block_decode.enabled())

  def kernel_operands(self, x_BTD, rope: Rotary, cache: LayerCache, lengths_B, tree_mask_BTT):
    """(`block_decode.block_operands`, the call's attributes) of this block's kernel call."""
    attn = self.attn
    # The packed q|k|v, output, gate|up and down matrices, under the keys the decode loops pack.
    qkv_tiles, out_tiles, gate_up_tiles, down_tiles = (
        rows_matmul.tiles(w, key) for key, w in decode_matrices(self).items())
    _, num_heads, head_dim = attn.q.kernel.shape
    batch, num_new, _ = x_BTD.shape
    bias = lambda d: (jnp.zeros((math.prod(d.kernel.shape[1:]),), jnp.float32) if d.bias is None
                      else d.bias[...].reshape(-1))
    norm_scale = lambda norm: (jnp.ones((head_dim,), jnp.float32) if norm is None
                               else norm.scale[...])
    table = lambda t: jnp.broadcast_to(t, (batch, num_new, 1, head_dim)).reshape(
        batch, num_new, head_dim)
    operands = block_decode.block_operands(
        self.attn_norm.scale[...], qkv_tiles,
        jnp.concatenate([bias(d) for d in (attn.q, attn.k, attn.v)]), norm_scale(attn.q_norm),
        norm_scale(attn.k_norm), table(rope.cos), table(rope.sin), cache.k, cache.v, lengths_B,
        jnp.broadcast_to(tree_mask_BTT, (batch, num_new, num_new)), out_tiles, bias(attn.out),
        self.mlp_norm.scale[...], gate_up_tiles, down_tiles)
    # One eps for every norm of the block: they all take config.norm_eps.
    return operands, dict(eps=self.attn_norm.eps, sm_scale=head_dim ** -0.5, num_heads=num_heads,
                          qk_norm=attn.q_norm is not None)

  def _decode_kernel(self, x_BTD, rope: Rotary, cache: LayerCache, lengths_B, tree_mask_BTT):
    operands, attrs = self.kernel_operands(x_BTD, rope, cache, lengths_B, tree_mask_BTT)
    y_BTD, k_BSKE, v_BSKE = block_decode.block_decode(x_BTD, operands, **attrs)
    return y_BTD, LayerCache(k_BSKE, v_BSKE)
