"""Blockwise flash attention in plain JAX (XLA), with a custom_vjp: the CPU implementation.

Same contract as `flash_attention` and the same geometry (`flash_attention_common`: block
ranges, visibility, online softmax, dS), written with `lax.scan` / `fori_loop` instead of a
Pallas grid, so forward and backward memory grow linearly with sequence length (no
`[q_len, kv_len]` tensor anywhere) and fully masked blocks (causal, sliding window, disjoint
segment ranges) are skipped. Any float dtype including float64 (statistics accumulate in fp64
then), any block sizes; differentiable once.

Layout: q is reshaped (never K/V repeated) to blocks `[nq, B, K, G*bq, E]` so that the query
heads sharing a kv head form the matmul M dimension; k/v to `[nk, B, K, bk, E]`. The forward
runs a scan over q blocks with an inner while-loop over only the kv blocks that can be visible;
the backward is kv-block-outer (FlashAttention-2) with dq accumulated in place into a `[nq, ...]`
buffer. Memory is O(B*H*T*D) plus one `[B, H, bq, bk]` tile.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import flash_attention_common as common

DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
_DEFAULT_BLOCK = 256  # CPU: [B, H, 256, 256] fp32 score tiles stay cache-resident; measured best.


@dataclasses.dataclass(frozen=True)
class BlockwiseOptions:
  """Tile sizes of `blockwise_attention` (None: 256, clamped to the 8-padded length)."""
  block_q: int | None = None
  block_k: int | None = None


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block_size(requested, length: int, name: str) -> int:
  if requested is None:
    return min(_DEFAULT_BLOCK, _round_up(length, 8))
  if not common.is_positive_int(requested):
    raise ValueError(f'{name} must be a positive int, got {requested!r}')
  return min(int(requested), _round_up(length, 8))  # No block larger than the padded length.


def blockwise_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                        sliding_window=None, logit_soft_cap=None, sm_scale=None, return_lse=False,
                        block_q=None, block_k=None):
  """`[B, Tq, H, E]` x `[B, Tk, K, E]` -> `[B, Tq, H, E]` (and fp32/fp64 lse `[B, H, Tq]`);
  the arguments and semantics of `pallas_kernels.flash_attention.flash_attention`."""
  common.validate_attention_inputs(
      q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, sm_scale=sm_scale,
      dtypes=DTYPES)
  batch, q_len, _, _ = q.shape
  kv_len = k.shape[1]
  cfg = common.make_config(
      q, k, block_q=_block_size(block_q, q_len, 'block_q'),
      block_k=_block_size(block_k, kv_len, 'block_k'), causal=causal,
      q_segment_ids=q_segment_ids, sliding_window=sliding_window, logit_soft_cap=logit_soft_cap,
      sm_scale=sm_scale)
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
  o, lse = _flash(cfg, q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
  return (o, lse) if return_lse else o


def _num_blocks(cfg):
  return cfg.q_len_padded // cfg.block_q, cfg.kv_len_padded // cfg.block_k


def _three_loops(ranges, body, carry, skip=None):
  """Runs `body(i, carry, masked)` over `[lo, full_lo)` and `[full_hi, hi)` masked (one loop,
  so the masked body is compiled once) and `[full_lo, full_hi)` unmasked. `skip(i)` (segments)
  may veto a masked block (as `flash_attention_gpu._run_blocks`)."""
  lo, full_lo, full_hi, hi = ranges
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  num_left = full_lo - lo

  def edge(i, c):
    i = jnp.where(i < num_left, lo + i, full_hi + i - num_left)
    if skip is None:
      return body(i, c, masked=True)
    return lax.cond(skip(i), lambda c: c, lambda c: body(i, c, masked=True), c)

  return lax.fori_loop(0, num_left + hi - full_hi, edge, carry)


def _masked_scores(cfg: common.AttentionConfig, s_BKQS, qi, kj, qseg_Bq, kseg_Bk):
  """Masks the `[B, K, G*bq, bk]` scores of tile (qi, kj) with `common.visible`."""
  q_pos = qi * cfg.block_q + jnp.arange(cfg.block_q)[:, None]
  k_pos = kj * cfg.block_k + jnp.arange(cfg.block_k)[None, :]
  ids = (qseg_Bq[:, :, None], kseg_Bk[:, None, :]) if cfg.has_segments else (None, None)
  mask = common.visible(cfg, q_pos, k_pos, *ids)
  if mask is None:
    return s_BKQS
  mask = mask if mask.ndim == 3 else mask[None]            # [B or 1, bq, bk]
  batch, kvh, rows, width = s_BKQS.shape
  s = s_BKQS.reshape(batch, kvh, rows // cfg.block_q, cfg.block_q, width)
  return jnp.where(mask[:, None, None], s, -jnp.inf).reshape(s_BKQS.shape)


def _q_to_blocks(cfg, x_BTHE, num_kv_heads):
  """`[B, Tq, H, E]` -> `[nq, B, K, G*bq, E]` (zero padded)."""
  batch, _, num_heads, head_dim = x_BTHE.shape
  group, bq = num_heads // num_kv_heads, cfg.block_q
  nq = cfg.q_len_padded // bq
  x = jnp.pad(x_BTHE, ((0, 0), (0, cfg.q_len_padded - cfg.q_len), (0, 0), (0, 0)))
  return (x.reshape(batch, nq, bq, num_kv_heads, group, head_dim)
          .transpose(1, 0, 3, 4, 2, 5).reshape(nq, batch, num_kv_heads, group * bq, head_dim))


def _kv_to_blocks(cfg, x_BSKE):
  """`[B, Tk, K, E]` -> `[nk, B, K, bk, E]` (zero padded)."""
  batch, _, kvh, head_dim = x_BSKE.shape
  bk = cfg.block_k
  x = jnp.pad(x_BSKE, ((0, 0), (0, cfg.kv_len_padded - cfg.kv_len), (0, 0), (0, 0)))
  return x.reshape(batch, cfg.kv_len_padded // bk, bk, kvh, head_dim).transpose(1, 0, 3, 2, 4)


def _seg_to_blocks(ids_BT, padded_len, block):
  batch, length = ids_BT.shape
  ids = jnp.pad(ids_BT, ((0, 0), (0, padded_len - length)))
  return ids.reshape(batch, padded_len // block, block).swapaxes(0, 1)


def _to_blocks(cfg, q, k, v, qseg, kseg):
  return (_q_to_blocks(cfg, q, k.shape[2]), _kv_to_blocks(cfg, k), _kv_to_blocks(cfg, v),
          _seg_to_blocks(qseg, cfg.q_len_padded, cfg.block_q),
          _seg_to_blocks(kseg, cfg.kv_len_padded, cfg.block_k))


def _from_q_blocks(cfg, x_nBKQE, num_heads, dtype):
  nq, batch, kvh, _, head_dim = x_nBKQE.shape
  x = x_nBKQE.reshape(nq, batch, kvh, num_heads // kvh, cfg.block_q, head_dim)
  x = x.transpose(1, 0, 4, 2, 3, 5)
  return x.reshape(batch, cfg.q_len_padded, num_heads, head_dim)[:, :cfg.q_len].astype(dtype)


def _rows_from_blocks(cfg, x_nBKQ, num_heads):
  """`[nq, B, K, G*bq]` row statistics -> `[B, H, Tq]`."""
  nq, batch, kvh, _ = x_nBKQ.shape
  x = x_nBKQ.reshape(nq, batch, kvh, num_heads // kvh, cfg.block_q).transpose(1, 2, 3, 0, 4)
  return x.reshape(batch, num_heads, cfg.q_len_padded)[:, :, :cfg.q_len]


def _rows_to_blocks(cfg, x_BHT, num_kv_heads):
  """Padded `[B, H, q_len_padded]` row statistics -> `[nq, B, K, G*bq]`."""
  batch, num_heads, _ = x_BHT.shape
  group, bq = num_heads // num_kv_heads, cfg.block_q
  nq = cfg.q_len_padded // bq
  x = x_BHT.reshape(batch, num_kv_heads, group, nq, bq).transpose(3, 0, 1, 2, 4)
  return x.reshape(nq, batch, num_kv_heads, group * bq)


def _forward(cfg, q, k, v, qseg, kseg):
  q_nBKQE, k_nBKSE, v_nBKSE, qseg_nBq, kseg_nBk = _to_blocks(cfg, q, k, v, qseg, kseg)
  _, batch, kvh, rows, head_dim = q_nBKQE.shape
  acc = common.accumulator_dtype(q.dtype)

  def q_block(_, xs):
    qi, q_BKQE, qseg_Bq = xs

    def update(kj, carry, masked):
      s, _ = common.scores(cfg, common.dot(q_BKQE, k_nBKSE[kj], trans_b=True))
      if masked:
        s = _masked_scores(cfg, s, qi, kj, qseg_Bq, kseg_nBk[kj])
      pv = lambda p: common.dot(p.astype(v.dtype), v_nBKSE[kj])
      return common.online_softmax_step(*carry, s, pv, masked=masked)

    skip = None
    if cfg.has_segments:
      skip = lambda kj: ~jnp.any(common.ids_overlap(qseg_Bq, kseg_nBk[kj], axis=1))

    init = common.online_softmax_init((batch, kvh, rows, head_dim), acc)
    ranges = common.kv_block_range(cfg, qi * cfg.block_q, cfg.block_q, cfg.block_k)
    o, lse = common.softmax_finish(*_three_loops(ranges, update, init, skip))
    return None, (o.astype(q.dtype), lse)

  nq, _ = _num_blocks(cfg)
  _, (o_nBKQE, lse_nBKQ) = lax.scan(q_block, None, (jnp.arange(nq), q_nBKQE, qseg_nBq))
  num_heads = q.shape[2]
  return _from_q_blocks(cfg, o_nBKQE, num_heads, q.dtype), _rows_from_blocks(cfg, lse_nBKQ,
                                                                              num_heads)


def _backward(cfg, q, k, v, qseg, kseg, o, lse, do, dlse):
  q_nBKQE, k_nBKSE, v_nBKSE, qseg_nBq, kseg_nBk = _to_blocks(cfg, q, k, v, qseg, kseg)
  acc = common.accumulator_dtype(q.dtype)
  kvh = k.shape[2]
  do_nBKQE = _q_to_blocks(cfg, do.astype(q.dtype), kvh)
  delta_BHT, lse_BHT = common.backward_row_stats(cfg, o, do, lse, dlse)
  delta_nBKQ, lse_nBKQ = _rows_to_blocks(cfg, delta_BHT, kvh), _rows_to_blocks(cfg, lse_BHT, kvh)
  _, batch, _, rows, head_dim = q_nBKQE.shape

  def kv_block(dq_nBKQE, xs):
    kj, k_BKSE, v_BKSE, kseg_Bk = xs

    def update(qi, carry, masked):
      dq, dk, dv = carry
      q_BKQE, do_BKQE = q_nBKQE[qi], do_nBKQE[qi]
      s, tanh = common.scores(cfg, common.dot(q_BKQE, k_BKSE, trans_b=True))
      if masked:
        s = _masked_scores(cfg, s, qi, kj, qseg_nBq[qi], kseg_Bk)
      p = jnp.exp(s - lse_nBKQ[qi][..., None])
      dv = dv + common.dot(p.astype(v.dtype), do_BKQE, trans_a=True)
      dp = common.dot(do_BKQE, v_BKSE, trans_b=True)
      ds = common.dscores(p, dp, delta_nBKQ[qi][..., None], tanh)
      ds = (ds * cfg.sm_scale).astype(q.dtype)
      dq = dq.at[qi].add(common.dot(ds, k_BKSE))
      dk = dk + common.dot(ds, q_BKQE, trans_a=True)
      return dq, dk, dv

    skip = None
    if cfg.has_segments:
      skip = lambda qi: ~jnp.any(common.ids_overlap(qseg_nBq[qi], kseg_Bk, axis=1))

    zeros = jnp.zeros((batch, kvh, cfg.block_k, head_dim), acc)
    ranges = common.q_block_range(cfg, kj * cfg.block_k, cfg.block_k, cfg.block_q)
    dq_nBKQE, dk, dv = _three_loops(ranges, update, (dq_nBKQE, zeros, zeros), skip)
    return dq_nBKQE, (dk, dv)

  nq, nk = _num_blocks(cfg)
  dq_nBKQE = jnp.zeros((nq, batch, kvh, rows, head_dim), acc)
  dq_nBKQE, (dk_nBKSE, dv_nBKSE) = lax.scan(
      kv_block, dq_nBKQE, (jnp.arange(nk), k_nBKSE, v_nBKSE, kseg_nBk))

  def from_kv_blocks(x_nBKSE, dtype):
    x = x_nBKSE.transpose(1, 0, 3, 2, 4).reshape(batch, cfg.kv_len_padded, kvh, head_dim)
    return x[:, :cfg.kv_len].astype(dtype)

  return (_from_q_blocks(cfg, dq_nBKQE, q.shape[2], q.dtype), from_kv_blocks(dk_nBKSE, k.dtype),
          from_kv_blocks(dv_nBKSE, v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, qseg, kseg):
  return _forward(cfg, q, k, v, qseg, kseg)


def _flash_fwd(cfg, q, k, v, qseg, kseg):
  o, lse = _forward(cfg, q, k, v, qseg, kseg)
  return (o, lse), (q, k, v, qseg, kseg, o, lse)


def _flash_bwd(cfg, res, cotangents):
  q, k, v, qseg, kseg, o, lse = res
  do, dlse = cotangents   # without symbolic_zeros, an unused lse gets a zero cotangent
  dq, dk, dv = _backward(cfg, q, k, v, qseg, kseg, o, lse, do, dlse)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
