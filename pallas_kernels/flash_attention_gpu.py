"""Flash attention for NVIDIA GPUs: Pallas kernels lowered through Triton (fwd, dq, dk/dv).

Layout is the public one, `[batch, seq, heads, head_dim]`; inputs arrive padded to block multiples
(see `flash_attention.py`) and with a power-of-two head_dim (padded here if needed).

- forward, grid `(q_blocks, batch, heads)`: one program owns a query block and streams the key
  blocks of its range through an online softmax; writes o and the fp32 log-sum-exp.
- dq, grid `(q_blocks, batch, heads)`: same loop, recomputes p = exp(s - lse) (FlashAttention-2).
- dk/dv, grid `(kv_blocks, batch, kv_heads)`: one program owns a key block of one KV head and
  loops over the query heads of its GQA group and over their query blocks, so the group sum of
  dK/dV is accumulated in registers (no atomics, K/V never repeated).

Blocks outside the causal/window band are skipped by the loop bounds; blocks fully inside it run
without a mask; with segment ids a block pair whose id ranges do not overlap is skipped.

This file is the Triton family only. A Mosaic GPU (Hopper wgmma / TMA) variant can sit beside it
as `flash_attention_mgpu.py` exposing the same `block_sizes/forward/backward` functions, and be
selected in `flash_attention._backend_module` (Pallas' Triton lowering is deprecated from JAX 0.11).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import flash_attention_common as common

_MIN_BLOCK = 16   # tl.dot needs every dimension >= 16.


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def block_sizes(q_len: int, kv_len: int, head_dim: int, block_q, block_k):
  """Validated (block_q, block_k): powers of two >= 16, clamped to the padded lengths."""
  for name, b in (('block_q', block_q), ('block_k', block_k)):
    if b is not None and (not isinstance(b, int) or b < _MIN_BLOCK or b & (b - 1)):
      raise ValueError(f'{name} must be a power of two >= {_MIN_BLOCK} for the GPU (Triton) '
                       f'kernel, got {b!r}.')
  # Defaults measured on an H200 (experiments.tune_flash_attention, docs/benchmarks.md): 64 x 64
  # tiles with 4 warps are the fastest forward + backward for head_dim 64 and 128.
  if block_q is None:
    block_q = 64
  if block_k is None:
    block_k = 64 if head_dim <= 128 else 32
  block_q = min(block_q, max(_MIN_BLOCK, _next_pow2(q_len)))
  block_k = min(block_k, max(_MIN_BLOCK, _next_pow2(kv_len)))
  return block_q, block_k


def _run_blocks(cfg, lo, full_lo, full_hi, hi, step, carry, skip=None):
  """Runs `step(idx, carry, masked)` over masked [lo, full_lo), plain [full_lo, full_hi) and
  masked [full_hi, hi). `skip(idx)` (segments) may veto a masked block."""

  def masked_step(idx, c):
    if skip is None:
      return step(idx, c, True)
    return lax.cond(skip(idx), lambda c: c, lambda c: step(idx, c, True), c)

  if not cfg.needs_mask:
    return lax.fori_loop(lo, hi, lambda i, c: step(i, c, False), carry)
  carry = lax.fori_loop(lo, full_lo, masked_step, carry)
  carry = lax.fori_loop(full_lo, full_hi, lambda i, c: step(i, c, False), carry)
  return lax.fori_loop(full_hi, hi, masked_step, carry)


def _q_block_index(cfg, i, num_q_blocks):
  # Causal: launch the longest rows first (better tail balance on the GPU).
  return num_q_blocks - 1 - i if cfg.banded else i


# ----------------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref, *, cfg):
  block_q, block_k = cfg.block_q, cfg.block_k
  qi = _q_block_index(cfg, pl.program_id(0), pl.num_programs(0))
  q_start = qi * block_q
  q = q_ref[...]
  q_ids = None if q_ids_ref is None else q_ids_ref[...]
  q_pos = q_start + jnp.arange(block_q)[:, None]

  def step(j, carry, masked):
    k_slice = pl.ds(j * block_k, block_k)
    s, _ = common.scores(cfg, common.dot(q, k_ref[k_slice, :], trans_b=True))  # [bq, bk]
    if masked:
      kv_ids = None if kv_ids_ref is None else kv_ids_ref[k_slice][None, :]
      k_pos = j * block_k + jnp.arange(block_k)[None, :]
      mask = common.visible(cfg, q_pos, k_pos, None if q_ids is None else q_ids[:, None], kv_ids)
      s = jnp.where(mask, s, -jnp.inf)
    pv = lambda p: common.dot(p.astype(v_ref.dtype), v_ref[k_slice, :])
    return common.online_softmax_step(*carry, s, pv, masked=masked)

  skip = None
  if cfg.has_segments:
    skip = lambda j: ~common.ids_overlap(q_ids, kv_ids_ref[pl.ds(j * block_k, block_k)])
  lo, full_lo, full_hi, hi = common.kv_block_range(cfg, q_start, block_q, block_k)
  carry = common.online_softmax_init(o_ref.shape)
  o, lse = common.softmax_finish(*_run_blocks(cfg, lo, full_lo, full_hi, hi, step, carry, skip))
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = lse


def _compiler_params(launch, head_dim):
  num_warps = launch.num_warps or (4 if head_dim <= 128 else 8)
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=launch.num_stages or 2)


def _pad_head_dim(*xs):
  d = xs[0].shape[-1]
  d_pad = max(_MIN_BLOCK, _next_pow2(d))
  if d_pad == d:
    return xs
  return tuple(jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, d_pad - d)]) for x in xs)


def forward(q, k, v, q_ids, kv_ids, cfg, launch):
  """Padded q `[B, Tq, H, E]`, k/v `[B, Tk, K, E]` -> (o `[B, Tq, H, E]`, lse `[B, H, Tq]` fp32)."""
  head_dim = q.shape[-1]
  q, k, v = _pad_head_dim(q, k, v)
  batch, q_len, num_heads, d = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  nq = q_len // cfg.block_q
  qi = functools.partial(_q_block_index, cfg, num_q_blocks=nq)
  q_spec = pl.BlockSpec((None, cfg.block_q, None, d), lambda i, b, h: (b, qi(i), h, 0))
  kv_spec = pl.BlockSpec((None, kv_len, None, d), lambda i, b, h: (b, 0, h // group, 0))
  q_ids_spec = kv_ids_spec = None
  if cfg.has_segments:
    q_ids_spec = pl.BlockSpec((None, cfg.block_q), lambda i, b, h: (b, qi(i)))
    kv_ids_spec = pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0))
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(nq, batch, num_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_ids_spec, kv_ids_spec],
      out_specs=[q_spec, pl.BlockSpec((None, None, cfg.block_q), lambda i, b, h: (b, h, qi(i)))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
      compiler_params=_compiler_params(launch, d),
      interpret=launch.interpret,
      name='flash_attention_fwd',
  )(q, k, v, q_ids, kv_ids)
  return o[..., :head_dim], lse


# ---------------------------------------------------------------------------------- backward

def _dq_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *, cfg):
  block_q, block_k = cfg.block_q, cfg.block_k
  qi = _q_block_index(cfg, pl.program_id(0), pl.num_programs(0))
  q_start = qi * block_q
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_ids = None if q_ids_ref is None else q_ids_ref[...]
  q_pos = q_start + jnp.arange(block_q)[:, None]

  def step(j, dq, masked):
    k_slice = pl.ds(j * block_k, block_k)
    k, v = k_ref[k_slice, :], v_ref[k_slice, :]
    s, t = common.scores(cfg, common.dot(q, k, trans_b=True))
    if masked:
      kv_ids = None if kv_ids_ref is None else kv_ids_ref[k_slice][None, :]
      k_pos = j * block_k + jnp.arange(block_k)[None, :]
      mask = common.visible(cfg, q_pos, k_pos, None if q_ids is None else q_ids[:, None], kv_ids)
      s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp(s - lse)
    ds = common.dscores(p, common.dot(do, v, trans_b=True), delta, t)
    return dq + common.dot(ds.astype(k.dtype), k)

  skip = None
  if cfg.has_segments:
    skip = lambda j: ~common.ids_overlap(q_ids, kv_ids_ref[pl.ds(j * block_k, block_k)])
  lo, full_lo, full_hi, hi = common.kv_block_range(cfg, q_start, block_q, block_k)
  dq = _run_blocks(cfg, lo, full_lo, full_hi, hi, step,
                   jnp.zeros(dq_ref.shape, jnp.float32), skip)
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, cfg, group):
  block_q, block_k = cfg.block_q, cfg.block_k
  k_start = pl.program_id(0) * block_k
  k, v = k_ref[...], v_ref[...]
  kv_ids = None if kv_ids_ref is None else kv_ids_ref[...]
  k_pos = k_start + jnp.arange(block_k)[None, :]
  lo, full_lo, full_hi, hi = common.q_block_range(cfg, k_start, block_k, block_q)

  def head(g, carry):
    def step(i, carry, masked):
      dk, dv = carry
      q_slice = pl.ds(i * block_q, block_q)
      q, do = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
      lse, delta = lse_ref[g, q_slice][:, None], delta_ref[g, q_slice][:, None]
      s, t = common.scores(cfg, common.dot(q, k, trans_b=True))   # [bq, bk]
      if masked:
        q_ids = None if q_ids_ref is None else q_ids_ref[q_slice][:, None]
        q_pos = i * block_q + jnp.arange(block_q)[:, None]
        mask = common.visible(cfg, q_pos, k_pos, q_ids,
                              None if kv_ids is None else kv_ids[None, :])
        s = jnp.where(mask, s, -jnp.inf)
      p = jnp.exp(s - lse)
      dv = dv + common.dot(p.astype(do.dtype), do, trans_a=True)
      ds = common.dscores(p, common.dot(do, v, trans_b=True), delta, t)
      dk = dk + common.dot(ds.astype(q.dtype), q, trans_a=True)
      return dk, dv

    skip = None
    if cfg.has_segments:
      skip = lambda i: ~common.ids_overlap(q_ids_ref[pl.ds(i * block_q, block_q)], kv_ids)
    return _run_blocks(cfg, lo, full_lo, full_hi, hi, step, carry, skip)

  zeros = jnp.zeros(dk_ref.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, q_ids, kv_ids, do, lse, delta, cfg, launch):
  """Padded inputs; lse and delta `[B, H, Tq]` fp32 (lse = +inf on rows to ignore).

  Returns dq, dk, dv in the dtypes of q, k, v.
  """
  head_dim = q.shape[-1]
  q, k, v, do = _pad_head_dim(q, k, v, do)
  batch, q_len, num_heads, d = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  nq, nk = q_len // cfg.block_q, kv_len // cfg.block_k
  params = _compiler_params(launch, d)

  qi = functools.partial(_q_block_index, cfg, num_q_blocks=nq)
  q_spec = pl.BlockSpec((None, cfg.block_q, None, d), lambda i, b, h: (b, qi(i), h, 0))
  row_spec = pl.BlockSpec((None, None, cfg.block_q), lambda i, b, h: (b, h, qi(i)))
  kv_spec = pl.BlockSpec((None, kv_len, None, d), lambda i, b, h: (b, 0, h // group, 0))
  q_ids_spec = kv_ids_spec = None
  if cfg.has_segments:
    q_ids_spec = pl.BlockSpec((None, cfg.block_q), lambda i, b, h: (b, qi(i)))
    kv_ids_spec = pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(nq, batch, num_heads),
      in_specs=[q_spec, kv_spec, kv_spec, q_ids_spec, kv_ids_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=launch.interpret,
      name='flash_attention_bwd_dq',
  )(q, k, v, q_ids, kv_ids, do, lse, delta)

  # dk/dv: the program of KV head kh sees the `group` query heads kh*group ... kh*group+group-1.
  q_group_spec = pl.BlockSpec((None, q_len, group, d), lambda j, b, kh: (b, 0, kh, 0))
  row_group_spec = pl.BlockSpec((None, group, q_len), lambda j, b, kh: (b, kh, 0))
  kv_block_spec = pl.BlockSpec((None, cfg.block_k, None, d), lambda j, b, kh: (b, j, kh, 0))
  if cfg.has_segments:
    q_ids_spec = pl.BlockSpec((None, q_len), lambda j, b, kh: (b, 0))
    kv_ids_spec = pl.BlockSpec((None, cfg.block_k), lambda j, b, kh: (b, j))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, group=group),
      grid=(nk, batch, num_kv_heads),
      in_specs=[q_group_spec, kv_block_spec, kv_block_spec, q_ids_spec, kv_ids_spec,
                q_group_spec, row_group_spec, row_group_spec],
      out_specs=[kv_block_spec, kv_block_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=launch.interpret,
      name='flash_attention_bwd_dkv',
  )(q, k, v, q_ids, kv_ids, do, lse, delta)
  return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]
