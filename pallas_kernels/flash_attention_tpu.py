"""Flash attention for TPUs: Pallas kernels lowered through Mosaic (fwd, dq, dk/dv).

TPU tiles are (8 sublanes x 128 lanes), so the kernels work in `[batch, heads, seq, head_dim]`
(the public layout is transposed here) and every block's last two dimensions are either
multiples of (8, 128) or the full array dimensions:
- q/k/v blocks `(block, head_dim)`: head_dim is the full dimension, block a multiple of 8.
- running max / sum live lane-replicated in `(block_q, 128)` fp32 VMEM scratch (as JAX's own TPU
  kernel does); the forward writes lse lane-replicated and the wrapper keeps lane 0.
- the backward reads lse and delta as `(1, block_q)` rows, so block_q is a multiple of 128
  unless one block covers the whole sequence; scores `(block_q, block_k)` put keys on lanes, so
  block_k is a multiple of 128 under the same exception.
- segment ids are broadcast to `(block_q, 128)` / `(8, block_k)` tiles.

Grids put the reduction axis last ("arbitrary") and accumulate in VMEM scratch:
forward and dq `(batch, heads, q_blocks, kv_blocks)`; dk/dv `(batch, kv_heads, kv_blocks,
group, q_blocks)`, so the dK/dV of one KV head accumulate over its whole GQA group of query heads
before they are written once. Blocks outside the causal/window band are skipped with `pl.when`,
and their index maps repeat an in-band block so no DMA is issued for them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import flash_attention_common as common

NUM_LANES = 128
NUM_SUBLANES = 8


def block_sizes(q_len: int, kv_len: int, head_dim: int, block_q, block_k):
  """Validated (block_q, block_k) for Mosaic TPU tiling (see the module docstring)."""
  del head_dim
  out = []
  for name, b, n in (('block_q', block_q, q_len), ('block_k', block_k, kv_len)):
    if b is not None and (not isinstance(b, int) or b < NUM_SUBLANES or b % NUM_SUBLANES):
      raise ValueError(f'{name} must be a positive multiple of {NUM_SUBLANES} for the TPU '
                       f'kernel, got {b!r}.')
    n8 = -(-n // NUM_SUBLANES) * NUM_SUBLANES
    b = min(NUM_LANES if b is None else b, n8)
    if b % NUM_LANES and b < n8:
      raise ValueError(f'{name}={b} must be a multiple of {NUM_LANES} on TPU unless one block '
                       f'covers the whole sequence ({n8}).')
    out.append(b)
  return tuple(out)


def _lanes(x, n):
  """Lane-replicated `[rows, 128]` -> `[rows, n]` (tile, slice, or a 1-lane broadcast)."""
  if n % NUM_LANES == 0:
    return jnp.tile(x, (1, n // NUM_LANES)) if n > NUM_LANES else x
  if n < NUM_LANES:
    return x[:, :n]
  return x[:, :1]


def _mask(cfg, q_start, k_start, q_ids_ref, kv_ids_ref):
  shape = (cfg.block_q, cfg.block_k)
  q_pos = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  q_ids = kv_ids = None
  if cfg.has_segments:
    q_ids = _lanes(q_ids_ref[...], cfg.block_k)   # [bq, bk] (or [bq, 1])
    kv_ids = kv_ids_ref[:1, :]                    # [1, bk]
  return common.visible(cfg, q_pos, k_pos, q_ids, kv_ids)


def _when_in_band(cfg, idx, lo, full_lo, full_hi, hi, body):
  """Runs body(masked) for an in-band block; the unmasked variant inside the full range."""
  in_band = (idx >= lo) & (idx < hi)
  if not cfg.needs_mask:
    pl.when(in_band)(lambda: body(False))
    return
  full = (idx >= full_lo) & (idx < full_hi)
  pl.when(in_band & full)(lambda: body(False))
  pl.when(in_band & ~full)(lambda: body(True))


def _clamp_block(idx, lo, hi):
  # Skipped steps re-use an in-band block index, so the pipeline does not fetch new data.
  return jnp.minimum(jnp.maximum(idx, lo), jnp.maximum(hi - 1, 0))


def _to_bhtd(x):
  return jnp.swapaxes(x, 1, 2)


def _segment_inputs(q_ids, kv_ids):
  if q_ids is None:
    return None, None
  batch, q_len = q_ids.shape
  kv_len = kv_ids.shape[1]
  q_ids = lax.broadcast_in_dim(q_ids, (batch, q_len, NUM_LANES), (0, 1))
  kv_ids = lax.broadcast_in_dim(kv_ids, (batch, NUM_SUBLANES, kv_len), (0, 2))
  return q_ids, kv_ids


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, semantics, launch, name):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=grid, in_specs=in_specs, out_specs=out_specs,
          scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=launch.interpret,
      name=name,
  )


def _q_major_specs(cfg, group, head_dim):
  """BlockSpecs of q, k/v and the segment ids on the `(batch, heads, q_blocks, kv_blocks)` grid of
  the forward and dq kernels; out-of-band kv steps repeat an in-band block (no new DMA)."""
  bq, bk = cfg.block_q, cfg.block_k

  def kv_block(i, j):
    lo, _, _, hi = common.kv_block_range(cfg, i * bq, bq, bk)
    return _clamp_block(j, lo, hi)

  q_spec = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, head_dim),
                         lambda b, h, i, j: (b, h // group, kv_block(i, j), 0))
  q_ids_spec = kv_ids_spec = None
  if cfg.has_segments:
    q_ids_spec = pl.BlockSpec((None, bq, NUM_LANES), lambda b, h, i, j: (b, i, 0))
    kv_ids_spec = pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b, h, i, j: (b, 0, kv_block(i, j)))
  return q_spec, kv_spec, q_ids_spec, kv_ids_spec


# ----------------------------------------------------------------------------------- forward

def _fwd_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, o_ref, lse_ref,
                m_scr, l_scr, acc_scr, *, cfg):
  block_q, block_k = cfg.block_q, cfg.block_k
  i, j = pl.program_id(2), pl.program_id(3)
  q_start, k_start = i * block_q, j * block_k

  @pl.when(j == 0)
  def _init():
    acc_scr[...], m_scr[...], l_scr[...] = common.online_softmax_init(acc_scr.shape,
                                                                      stats_shape=m_scr.shape)

  def body(masked):
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s, _ = common.scores(cfg, common.dot(q, k, trans_b=True))
    if masked:
      s = jnp.where(_mask(cfg, q_start, k_start, q_ids_ref, kv_ids_ref), s, -jnp.inf)
    # Row statistics are lane-replicated [bq, 128]; `_lanes` widens them.
    acc_scr[...], m_scr[...], l_scr[...] = common.online_softmax_step(
        acc_scr[...], m_scr[...], l_scr[...], s, lambda p: common.dot(p.astype(v.dtype), v),
        masked=masked, widen=_lanes)

  lo, full_lo, full_hi, hi = common.kv_block_range(cfg, q_start, block_q, block_k)
  _when_in_band(cfg, j, lo, full_lo, full_hi, hi, body)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    o, lse = common.softmax_finish(acc_scr[...], m_scr[...], l_scr[...], widen=_lanes)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def forward(q, k, v, q_ids, kv_ids, cfg, launch):
  """Padded q `[B, Tq, H, E]`, k/v `[B, Tk, K, E]` -> (o `[B, Tq, H, E]`, lse `[B, H, Tq]` fp32)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  bq, bk = cfg.block_q, cfg.block_k
  q_spec, kv_spec, q_ids_spec, kv_ids_spec = _q_major_specs(cfg, group, head_dim)
  lse_spec = pl.BlockSpec((None, None, bq, NUM_LANES), lambda b, h, i, j: (b, h, i, 0))
  o, lse = _call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(batch, num_heads, q_len // bq, kv_len // bk),
      in_specs=[q_spec, kv_spec, kv_spec, q_ids_spec, kv_ids_spec],
      out_specs=[q_spec, lse_spec],
      out_shape=[jax.ShapeDtypeStruct((batch, num_heads, q_len, head_dim), q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len, NUM_LANES), jnp.float32)],
      scratch=[pltpu.VMEM((bq, NUM_LANES), jnp.float32), pltpu.VMEM((bq, NUM_LANES), jnp.float32),
               pltpu.VMEM((bq, head_dim), jnp.float32)],
      semantics=('parallel', 'parallel', 'parallel', 'arbitrary'),
      launch=launch, name='flash_attention_fwd_tpu',
  )(_to_bhtd(q), _to_bhtd(k), _to_bhtd(v), *_segment_inputs(q_ids, kv_ids))
  return _to_bhtd(o), lse[..., 0]


# ---------------------------------------------------------------------------------- backward

def _probs(cfg, q, k, lse, q_start, k_start, q_ids_ref, kv_ids_ref, masked):
  """p = exp(s - lse) recomputed for one block pair, and tanh(s/c) for the soft-cap chain rule."""
  s, t = common.scores(cfg, common.dot(q, k, trans_b=True))
  if masked:
    s = jnp.where(_mask(cfg, q_start, k_start, q_ids_ref, kv_ids_ref), s, -jnp.inf)
  return jnp.exp(s - lse), t


def _dq_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref, delta_ref,
               dq_ref, dq_scr, *, cfg):
  block_q, block_k = cfg.block_q, cfg.block_k
  i, j = pl.program_id(2), pl.program_id(3)
  q_start, k_start = i * block_q, j * block_k

  @pl.when(j == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def body(masked):
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    lse, delta = lse_ref[0][:, None], delta_ref[0][:, None]       # [bq, 1]
    p, t = _probs(cfg, q_ref[...], k, lse, q_start, k_start, q_ids_ref, kv_ids_ref, masked)
    dp = common.dot(do, v, trans_b=True)
    ds = common.dscores(p, dp, delta, t)
    dq_scr[...] += common.dot(ds.astype(k.dtype), k)

  lo, full_lo, full_hi, hi = common.kv_block_range(cfg, q_start, block_q, block_k)
  _when_in_band(cfg, j, lo, full_lo, full_hi, hi, body)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_ids_ref, kv_ids_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_scr, dv_scr, *, cfg):
  block_q, block_k = cfg.block_q, cfg.block_k
  j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)
  q_start, k_start = i * block_q, j * block_k

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def body(masked):
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    lse, delta = lse_ref[0][:, None], delta_ref[0][:, None]       # [bq, 1]
    p, t = _probs(cfg, q, k, lse, q_start, k_start, q_ids_ref, kv_ids_ref, masked)
    dv_scr[...] += common.dot(p.T.astype(do.dtype), do)
    dp = common.dot(do, v, trans_b=True)
    ds = common.dscores(p, dp, delta, t)
    dk_scr[...] += common.dot(ds.T.astype(q.dtype), q)

  lo, full_lo, full_hi, hi = common.q_block_range(cfg, k_start, block_k, block_q)
  _when_in_band(cfg, i, lo, full_lo, full_hi, hi, body)

  @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_scr[...] * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, q_ids, kv_ids, do, lse, delta, cfg, launch):
  """Padded inputs; lse and delta `[B, H, Tq]` fp32 (lse = +inf on rows to ignore)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  group = num_heads // num_kv_heads
  bq, bk = cfg.block_q, cfg.block_k
  nq, nk = q_len // bq, kv_len // bk
  q_t, k_t, v_t, do_t = _to_bhtd(q), _to_bhtd(k), _to_bhtd(v), _to_bhtd(do)
  lse, delta = lse[:, :, None, :], delta[:, :, None, :]              # [B, H, 1, Tq]
  q_ids_t, kv_ids_t = _segment_inputs(q_ids, kv_ids)

  # dq: grid (batch, heads, q_blocks, kv_blocks), as the forward.
  q_spec, kv_spec, q_ids_spec, kv_ids_spec = _q_major_specs(cfg, group, head_dim)
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i))
  dq = _call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(batch, num_heads, nq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_ids_spec, kv_ids_spec, q_spec, row_spec, row_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
      scratch=[pltpu.VMEM((bq, head_dim), jnp.float32)],
      semantics=('parallel', 'parallel', 'parallel', 'arbitrary'),
      launch=launch, name='flash_attention_bwd_dq_tpu',
  )(q_t, k_t, v_t, q_ids_t, kv_ids_t, do_t, lse, delta)

  # dk/dv: grid (batch, kv_heads, kv_blocks, group, q_blocks); query head = kh * group + g.
  def q_block(j, i):
    lo, _, _, hi = common.q_block_range(cfg, j * bk, bk, bq)
    return _clamp_block(i, lo, hi)

  qg_spec = pl.BlockSpec((None, None, bq, head_dim),
                         lambda b, kh, j, g, i: (b, kh * group + g, q_block(j, i), 0))
  rowg_spec = pl.BlockSpec((None, None, 1, bq),
                           lambda b, kh, j, g, i: (b, kh * group + g, 0, q_block(j, i)))
  kvb_spec = pl.BlockSpec((None, None, bk, head_dim), lambda b, kh, j, g, i: (b, kh, j, 0))
  if cfg.has_segments:
    q_ids_spec = pl.BlockSpec((None, bq, NUM_LANES), lambda b, kh, j, g, i: (b, q_block(j, i), 0))
    kv_ids_spec = pl.BlockSpec((None, NUM_SUBLANES, bk), lambda b, kh, j, g, i: (b, 0, j))
  dk, dv = _call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(batch, num_kv_heads, nk, group, nq),
      in_specs=[qg_spec, kvb_spec, kvb_spec, q_ids_spec, kv_ids_spec, qg_spec, rowg_spec,
                rowg_spec],
      out_specs=[kvb_spec, kvb_spec],
      out_shape=[jax.ShapeDtypeStruct(k_t.shape, k.dtype), jax.ShapeDtypeStruct(v_t.shape, v.dtype)],
      scratch=[pltpu.VMEM((bk, head_dim), jnp.float32), pltpu.VMEM((bk, head_dim), jnp.float32)],
      semantics=('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary'),
      launch=launch, name='flash_attention_bwd_dkv_tpu',
  )(q_t, k_t, v_t, q_ids_t, kv_ids_t, do_t, lse, delta)
  return _to_bhtd(dq), _to_bhtd(dk), _to_bhtd(dv)
