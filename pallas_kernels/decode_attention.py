"""Decode / tree-verify attention over a KV cache in Pallas (flash-decoding), Triton or interpret.

T <= 128 new queries per row attend to a long KV cache `[B, S, K, E]`. The new tokens' K/V are
already written at slots `[len_b, len_b + T)`; query t of row b sees every slot `j < len_b` and
slot `len_b + t'` iff `tree_mask[b, t, t']` (a chain is the lower-triangular mask).

Why flash-decoding: with few queries there is too little work per (row, kv head) to fill a GPU,
so the cache length is split too. Grid `(B, K, M blocks, splits)`: each program owns one chunk of
the cache for one kv head and streams its key blocks through an online softmax, writing a partial
`(o, m, l)` (unnormalized fp32 accumulator, running max, running sum). A small combine in plain
JAX rescales the partials by `exp(m_s - max_s m)` and normalizes.

- GQA: the G query heads of a kv head and the T queries form the matmul M dimension
  (`m = g * T + t`), so K/V are read once per kv head and never repeated.
- Lengths: a program stops at `min(len_b + T, S)`; splits past a row's end do no work. Key blocks
  that lie entirely in the prefix (`j < len_b`) run without a mask.
- Tree mask: the wrapper lays out the `[T, T]` mask of each row into a small int8 window array
  `W[b, m, block_k + t'] = tree[b, m % T, t']` (zeros elsewhere), so the mask of a key block
  starting at slot `s0` is the contiguous slice `W[b, :, block_k + s0 - len_b : ... + block_k]`
  (clamped; the clamp only happens where no slot of the block is a new token). No gather.
- The cache is read in place (no transpose or copy) when S is a multiple of 16; otherwise it is
  zero padded first (a copy; keep cache sizes multiples of 16).

Backends: Triton (NVIDIA GPUs; pass `interpret=False`, the default on GPU) and `interpret=True`
(the default elsewhere; slow, for tests). There is no Mosaic TPU variant: `jax_spec.attention`
uses its 'xla' path on TPU. Forward only (decoding needs no gradient).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import flash_attention_common as common

_MIN_BLOCK = 16   # tl.dot needs every dimension >= 16.
_TARGET_PROGRAMS = 264  # ~2 waves of programs on a 132-SM H100/H200.


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """Tiling and launch options of `decode_attention` (JAX's `BlockSizes` pattern): the typed way
  to pass them through `jax_spec.attention.cache_attention`. Fields are `decode_attention`'s
  keyword arguments of the same names; None means the default."""
  block_k: int | None = None
  block_m: int | None = None
  num_splits: int | None = None
  interpret: bool | None = None
  num_warps: int | None = None
  num_stages: int = 2


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _largest_pow2_divisor(n: int) -> int:
  return n & -n


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, win_ref, o_ref, m_ref, l_ref, *, sm_scale,
                   num_new, block_k, blocks_per_split, cache_len):
  length = len_ref[0]
  block_m = q_ref.shape[0]
  first = pl.program_id(3) * blocks_per_split
  end_slot = jnp.minimum(length + num_new, cache_len)
  hi = jnp.minimum(first + blocks_per_split, (end_slot + block_k - 1) // block_k)
  # Blocks below `full` lie entirely in the prefix: every query sees every slot.
  full = jnp.clip(length // block_k, first, jnp.maximum(hi, first))
  q = q_ref[...]

  def step(j, carry, masked):
    start = j * block_k
    k_slice = pl.ds(start, block_k)
    s = common.dot(q, k_ref[k_slice, :], trans_b=True) * sm_scale  # [block_m, block_k]
    if masked:
      rel = (start - length + jnp.arange(block_k))[None, :]
      offset = jnp.clip(block_k + start - length, 0, block_k + num_new)
      tree = win_ref[:, pl.ds(offset, block_k)] != 0
      s = jnp.where(common.cache_slot_visible(rel, num_new, tree), s, -jnp.inf)
    pv = lambda p: common.dot(p.astype(v_ref.dtype), v_ref[k_slice, :])
    return common.online_softmax_step(*carry, s, pv, masked=masked)

  carry = common.online_softmax_init(o_ref.shape)
  carry = lax.fori_loop(first, full, functools.partial(step, masked=False), carry)
  o, m, l = lax.fori_loop(full, jnp.maximum(hi, full), functools.partial(step, masked=True), carry)
  o_ref[...] = o
  m_ref[...] = m
  l_ref[...] = l


def decode_attention(q_BTHE, k_cache_BSKE, v_cache_BSKE, *, cache_lengths_B, tree_mask_BTT,
                     sm_scale=None, block_k=None, block_m=None, num_splits=None, interpret=None,
                     num_warps=None, num_stages=2):
  """Attention of T new queries against a KV cache (semantics in the module docstring).

  Args:
    q_BTHE: `[B, T, H, E]` queries, 1 <= T <= 128 (`common.MAX_NEW_QUERIES`).
    k_cache_BSKE, v_cache_BSKE: `[B, S, K, E]` caches, `H % K == 0`; q is cast to their dtype.
    cache_lengths_B: int `[B]`, tokens in the cache before the T new ones.
    tree_mask_BTT: bool `[B, T, T]`, visibility among the new tokens.
    sm_scale: default `E ** -0.5`.
    block_k: key block (power of two >= 16 dividing S; default min(64, largest such)).
    block_m: query-row tile over the G*T rows of a kv head (power of two >= 16; default 64,
      clamped to the rows).
    num_splits: cache chunks per (row, kv head); default fills ~264 programs on GPU, 2 otherwise.
    interpret: default True unless running on a GPU.
  Returns:
    `[B, T, H, E]` in q's dtype; a query that sees no slot gets zeros.
  """
  common.validate_cache_inputs(q_BTHE, k_cache_BSKE, v_cache_BSKE,
                               cache_lengths_B=cache_lengths_B, tree_mask_BTT=tree_mask_BTT,
                               sm_scale=sm_scale)
  batch, num_new, num_heads, head_dim = q_BTHE.shape
  _, cache_len, num_kv_heads, _ = k_cache_BSKE.shape
  on_gpu = jax.default_backend() in ('gpu', 'cuda')
  if interpret is None:
    interpret = not on_gpu
  for name, b in (('block_k', block_k), ('block_m', block_m)):
    if b is not None and (not isinstance(b, int) or b < _MIN_BLOCK or b & (b - 1)):
      raise ValueError(f'{name} must be a power of two >= {_MIN_BLOCK}, got {b!r}')
  if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
    raise ValueError(f'num_splits must be a positive int, got {num_splits!r}')
  if sm_scale is None:
    sm_scale = head_dim ** -0.5
  dtype = k_cache_BSKE.dtype
  group = num_heads // num_kv_heads

  # Head dim: Triton tiles are powers of two (a non power of two pads: a copy of the cache).
  d_pad = max(_MIN_BLOCK, _next_pow2(head_dim))
  # Cache length: key blocks must tile S; pad only if S is not a multiple of 16 (a copy).
  s_pad = -(-cache_len // _MIN_BLOCK) * _MIN_BLOCK
  if (d_pad, s_pad) != (head_dim, cache_len):
    pad = ((0, 0), (0, s_pad - cache_len), (0, 0), (0, d_pad - head_dim))
    k_cache_BSKE, v_cache_BSKE = jnp.pad(k_cache_BSKE, pad), jnp.pad(v_cache_BSKE, pad)
  if block_k is None:
    block_k = min(64, _largest_pow2_divisor(s_pad))
  elif s_pad % block_k:
    raise ValueError(f'block_k ({block_k}) must divide the (16-padded) cache length {s_pad}')
  num_blocks = s_pad // block_k

  rows = group * num_new
  block_m = min(64 if block_m is None else block_m, max(_MIN_BLOCK, _next_pow2(rows)))
  rows_pad = -(-rows // block_m) * block_m
  m_blocks = rows_pad // block_m
  if num_splits is None:
    target = _TARGET_PROGRAMS if on_gpu and not interpret else 2
    num_splits = -(-target // (batch * num_kv_heads * m_blocks))
  num_splits = max(1, min(num_splits, num_blocks))
  blocks_per_split = -(-num_blocks // num_splits)
  num_splits = -(-num_blocks // blocks_per_split)

  # q rows m = g * T + t of kv head k: [B, K, rows_pad, E].
  q = q_BTHE.astype(dtype).reshape(batch, num_new, num_kv_heads, group, head_dim)
  q = q.transpose(0, 2, 3, 1, 4).reshape(batch, num_kv_heads, rows, head_dim)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, rows_pad - rows), (0, d_pad - head_dim)))
  # Tree-mask window: W[b, m, block_k + t'] = tree[b, m % T, t'] for m < rows.
  tree = jnp.tile(tree_mask_BTT.astype(jnp.int8), (1, group, 1))
  win = jnp.pad(tree, ((0, 0), (0, rows_pad - rows), (block_k, block_k)))
  lengths = cache_lengths_B.astype(jnp.int32)

  kernel = functools.partial(
      _decode_kernel, sm_scale=float(sm_scale), num_new=num_new, block_k=block_k,
      blocks_per_split=blocks_per_split, cache_len=cache_len)
  if num_warps is None:
    num_warps = 4 if block_m * d_pad <= 64 * 64 else 8
  o, m, l = pl.pallas_call(
      kernel,
      grid=(batch, num_kv_heads, m_blocks, num_splits),
      in_specs=[
          pl.BlockSpec((1,), lambda b, h, i, s: (b,)),
          pl.BlockSpec((None, None, block_m, d_pad), lambda b, h, i, s: (b, h, i, 0)),
          pl.BlockSpec((None, s_pad, None, d_pad), lambda b, h, i, s: (b, 0, h, 0)),
          pl.BlockSpec((None, s_pad, None, d_pad), lambda b, h, i, s: (b, 0, h, 0)),
          pl.BlockSpec((None, block_m, win.shape[2]), lambda b, h, i, s: (b, i, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, block_m, d_pad), lambda b, h, i, s: (b, h, s, i, 0)),
          pl.BlockSpec((None, None, None, block_m), lambda b, h, i, s: (b, h, s, i)),
          pl.BlockSpec((None, None, None, block_m), lambda b, h, i, s: (b, h, s, i)),
      ],
      out_shape=[
          jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows_pad, d_pad), jnp.float32),
          jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows_pad), jnp.float32),
          jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows_pad), jnp.float32),
      ],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name='decode_attention',
  )(lengths, q, k_cache_BSKE, v_cache_BSKE, win)
  o = combine_splits(o, m, l)[:, :, :rows, :head_dim]
  o = o.reshape(batch, num_kv_heads, group, num_new, head_dim).transpose(0, 3, 1, 2, 4)
  return o.reshape(batch, num_new, num_heads, head_dim).astype(q_BTHE.dtype)


def combine_splits(o_BKXQE, m_BKXQ, l_BKXQ):
  """Merges per-split partials (unnormalized o, running max m, running sum l) over axis 2."""
  m_max = jnp.max(m_BKXQ, axis=2, keepdims=True)
  m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
  w = jnp.exp(m_BKXQ - m_max)  # exp(-inf) = 0 for splits that saw nothing.
  l = jnp.sum(w * l_BKXQ, axis=2)
  o = jnp.sum(w[..., None] * o_BKXQE, axis=2)
  return o / jnp.where(l == 0.0, 1.0, l)[..., None]
