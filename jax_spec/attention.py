"""Attention dispatcher: one signature, three implementations.

- 'pallas': `pallas_kernels.flash_attention` (Triton on GPU, Mosaic on TPU, interpret on CPU).
- 'xla': blockwise online-softmax attention in plain JAX with a custom_vjp whose backward
  recomputes the scores blockwise from the saved log-sum-exp, so forward and backward memory grow
  linearly with sequence length (no `[q_len, kv_len]` tensor anywhere). Fully masked blocks
  (causal, sliding window, disjoint segment ranges) are skipped. This is the CPU default.
- 'reference': the materialized softmax (tests only).
`implementation=None` picks 'pallas' on GPU/TPU and 'xla' on CPU.

`cache_attention` is the decode / tree-verify counterpart: T <= 128 new queries against a KV cache
('pallas' = `pallas_kernels.decode_attention`, flash-decoding; 'xla' = chunked plain JAX that stops
at the longest row; 'reference' = materialized mask).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.reference import reference_attention

IMPLEMENTATIONS = ('pallas', 'xla', 'reference')
_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)
_DEFAULT_BLOCK = 256  # CPU: [B, H, 256, 256] fp32 score tiles stay cache-resident; measured best.


def default_implementation() -> str:
  return 'pallas' if jax.default_backend() in ('gpu', 'cuda', 'rocm', 'tpu') else 'xla'


def default_cache_implementation() -> str:
  """The decode kernel is Triton-only: 'pallas' on NVIDIA GPUs, 'xla' elsewhere."""
  return 'pallas' if jax.default_backend() in ('gpu', 'cuda') else 'xla'


# ----------------------------------------------------------------------------------------------
# Validation.


def _is_positive_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0


def _validate_attention_args(q, k, v, q_segment_ids, kv_segment_ids, sliding_window,
                             logit_soft_cap, sm_scale):
  for name, x in (('q', q), ('k', k), ('v', v)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{name} must have rank 4 [batch, seq, heads, head_dim], '
                       f'got shape {getattr(x, "shape", None)}')
    if not any(x.dtype == d for d in _FLOAT_DTYPES):
      raise ValueError(f'{name} must be float16, bfloat16, float32 or float64, got {x.dtype}')
  if k.shape != v.shape:
    raise ValueError(f'k and v must have the same shape, got k {k.shape} and v {v.shape}')
  if q.shape[0] != k.shape[0]:
    raise ValueError(f'q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}')
  if q.shape[3] != k.shape[3]:
    raise ValueError(f'q and k must have the same head_dim, got {q.shape[3]} and {k.shape[3]}')
  if q.shape[1] < 1 or k.shape[1] < 1:
    raise ValueError(f'q_len and kv_len must be >= 1, got {q.shape[1]} and {k.shape[1]}')
  if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
    raise ValueError(f'num_heads ({q.shape[2]}) must be divisible by num_kv_heads ({k.shape[2]}) '
                     '(q is [B, T, H, D], k/v are [B, S, K, D])')
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError('q_segment_ids and kv_segment_ids must be given together')
  if q_segment_ids is not None:
    for name, ids, length in (('q_segment_ids', q_segment_ids, q.shape[1]),
                              ('kv_segment_ids', kv_segment_ids, k.shape[1])):
      if tuple(ids.shape) != (q.shape[0], length):
        raise ValueError(f'{name} must have shape {(q.shape[0], length)}, got {tuple(ids.shape)}')
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f'{name} must be an integer array, got {ids.dtype}')
  if sliding_window is not None and not _is_positive_int(sliding_window):
    raise ValueError(f'sliding_window must be a positive int or None, got {sliding_window!r}')
  if logit_soft_cap is not None and not (isinstance(logit_soft_cap, (int, float, np.floating))
                                         and logit_soft_cap > 0):
    raise ValueError(f'logit_soft_cap must be a positive float or None, got {logit_soft_cap!r}')
  if sm_scale is not None and not (isinstance(sm_scale, (int, float, np.floating))
                                   and math.isfinite(sm_scale)):
    raise ValueError(f'sm_scale must be a finite float or None, got {sm_scale!r}')


# ----------------------------------------------------------------------------------------------
# Dispatcher.


def dot_product_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                          sliding_window=None, logit_soft_cap=None, sm_scale=None,
                          implementation=None, return_lse=False, **kernel_kwargs):
  """q `[B, Tq, H, D]`, k/v `[B, Tk, K, D]` -> `[B, Tq, H, D]` (and fp32 lse `[B, H, Tq]`).

  Semantics are those of `pallas_kernels.flash_attention`: causal is bottom-right aligned, a key
  j is in the sliding window of query i iff `0 <= pos_i - pos_j < sliding_window`, segments attend
  within equal ids, rows with no visible key give zeros (and zero gradients). `kernel_kwargs`:
  `block_q`, `block_k` for 'pallas' and 'xla'; `interpret` (and whatever else the kernel takes)
  for 'pallas' only. 'pallas' and 'xla' are differentiable once (custom_vjp; grad-of-grad
  raises), 'reference' any number of times.
  """
  if implementation is None:
    implementation = default_implementation()
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}')
  kwargs = dict(causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, sm_scale=sm_scale,
                return_lse=return_lse)
  if implementation == 'pallas':
    from pallas_kernels.flash_attention import flash_attention  # pylint: disable=g-import-not-at-top
    return flash_attention(q, k, v, **kwargs, **kernel_kwargs)
  _validate_attention_args(q, k, v, q_segment_ids, kv_segment_ids, sliding_window,
                           logit_soft_cap, sm_scale)
  if implementation == 'reference':
    if kernel_kwargs:
      raise ValueError(f'implementation="reference" takes no kernel arguments, got {sorted(kernel_kwargs)}')
    return reference_attention(q, k, v, **kwargs)
  unknown = set(kernel_kwargs) - {'block_q', 'block_k'}
  if unknown:
    raise ValueError(f'implementation="xla" takes block_q and block_k only, got {sorted(unknown)}')
  return xla_attention(q, k, v, **kwargs, **kernel_kwargs)


# ----------------------------------------------------------------------------------------------
# 'xla': blockwise flash attention in plain JAX.
#
# Layout: q is reshaped (never K/V repeated) to blocks `[nq, B, K, G*bq, D]` so that the query
# heads sharing a kv head form the matmul M dimension; k/v to `[nk, B, K, bk, D]`. The forward
# runs a scan over q blocks with an inner while-loop over only the kv blocks that can be visible
# (causal / window bounds); the backward is kv-block-outer (FlashAttention-2) with dq accumulated
# in place into a `[nq, ...]` buffer. Memory is O(B*H*T*D) plus one `[B, H, bq, bk]` tile.


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _block_size(requested, length: int, name: str) -> int:
  if requested is None:
    return min(_DEFAULT_BLOCK, _round_up(length, 8))
  if not _is_positive_int(requested):
    raise ValueError(f'{name} must be a positive int, got {requested!r}')
  return min(int(requested), _round_up(length, 8))  # No block larger than the padded length.


def xla_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                  sliding_window=None, logit_soft_cap=None, sm_scale=None, return_lse=False,
                  block_q=None, block_k=None):
  """Blockwise attention in plain JAX (see module docstring); same contract as the dispatcher."""
  _validate_attention_args(q, k, v, q_segment_ids, kv_segment_ids, sliding_window,
                           logit_soft_cap, sm_scale)
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f'q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}')
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  cfg = _Config(
      q_len=q_len, kv_len=kv_len, num_heads=num_heads, num_kv_heads=k.shape[2],
      causal=bool(causal) or sliding_window is not None,
      window=None if sliding_window is None else int(sliding_window),
      soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
      sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
      block_q=_block_size(block_q, q_len, 'block_q'),
      block_k=_block_size(block_k, kv_len, 'block_k'),
      segmented=q_segment_ids is not None)
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
  o, lse = _flash(cfg, q, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
  return (o, lse) if return_lse else o


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static configuration (hashable: it is a nondiff argument of the custom_vjp)."""
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  causal: bool
  window: int | None
  soft_cap: float | None
  sm_scale: float
  block_q: int
  block_k: int
  segmented: bool

  @property
  def group(self):
    return self.num_heads // self.num_kv_heads

  @property
  def num_q_blocks(self):
    return -(-self.q_len // self.block_q)

  @property
  def num_k_blocks(self):
    return -(-self.kv_len // self.block_k)

  @property
  def offset(self):  # Bottom-right alignment: query i sits at key position i + offset.
    return self.kv_len - self.q_len


def _kv_range(cfg: _Config, qi):
  """kv blocks seen by q block `qi`: `(lo, full_lo, full_hi, hi)`.

  Blocks in `[lo, hi)` may be visible (the rest are skipped); those in `[full_lo, full_hi)` are
  entirely visible and unpadded, so they run without building a mask.
  """
  nk, bq, bk, off = cfg.num_k_blocks, cfg.block_q, cfg.block_k, cfg.offset
  lo, hi = 0, nk
  full_lo, full_hi = 0, cfg.kv_len // bk
  if cfg.causal:
    last_q = jnp.minimum((qi + 1) * bq, cfg.q_len) - 1
    hi = jnp.clip(-(-(last_q + off + 1) // bk), 0, nk)
    full_hi = jnp.minimum(full_hi, (qi * bq + off + 1) // bk)
  if cfg.window is not None:
    first_key = qi * bq + off - cfg.window + 1
    lo = jnp.clip(jnp.maximum(first_key, 0) // bk, 0, nk)
    full_lo = -(-((qi + 1) * bq + off - cfg.window) // bk)
  if cfg.segmented:
    full_hi = 0
  full_hi = jnp.where((qi + 1) * bq <= cfg.q_len, full_hi, 0)  # Padded q rows are masked.
  full_lo = jnp.clip(full_lo, lo, hi)
  return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def _q_range(cfg: _Config, kj):
  """q blocks that see kv block `kj`: `(lo, full_lo, full_hi, hi)` as in `_kv_range`."""
  nq, bq, bk, off = cfg.num_q_blocks, cfg.block_q, cfg.block_k, cfg.offset
  lo, hi = 0, nq
  full_lo, full_hi = 0, cfg.q_len // bq
  if cfg.causal:
    first_q = jnp.maximum(kj * bk - off, 0)
    lo = jnp.clip(first_q // bq, 0, nq)
    full_lo = -(-((kj + 1) * bk - 1 - off) // bq)
  if cfg.window is not None:
    last_key = jnp.minimum((kj + 1) * bk, cfg.kv_len) - 1
    end_q = jnp.clip(last_key + cfg.window - off, 0, cfg.q_len)
    hi = jnp.clip(-(-end_q // bq), 0, nq)
    full_hi = jnp.minimum(full_hi, (kj * bk + cfg.window - off) // bq)
  if cfg.segmented:
    full_hi = 0
  full_hi = jnp.where((kj + 1) * bk <= cfg.kv_len, full_hi, 0)  # Padded keys are masked.
  full_lo = jnp.clip(full_lo, lo, hi)
  return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def _three_loops(ranges, body, carry):
  """Runs `body(i, carry, masked)` over `[lo, full_lo)` and `[full_hi, hi)` masked (one loop,
  so the masked body is compiled once) and `[full_lo, full_hi)` unmasked."""
  lo, full_lo, full_hi, hi = ranges
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  num_left = full_lo - lo
  edge = lambda i, c: body(jnp.where(i < num_left, lo + i, full_hi + i - num_left), c, masked=True)
  return lax.fori_loop(0, num_left + hi - full_hi, edge, carry)


def _block_mask(cfg: _Config, qi, kj, qseg_Bq, kseg_Bk):
  """Visibility `[B or 1, 1, 1, bq, bk]` of the (qi, kj) tile (also masks padding)."""
  q_idx = qi * cfg.block_q + jnp.arange(cfg.block_q)
  k_idx = kj * cfg.block_k + jnp.arange(cfg.block_k)
  mask = (q_idx[:, None] < cfg.q_len) & (k_idx[None, :] < cfg.kv_len)
  rel = q_idx[:, None] + cfg.offset - k_idx[None, :]
  if cfg.causal:
    mask &= rel >= 0
  if cfg.window is not None:
    mask &= rel < cfg.window
  mask = mask[None]
  if cfg.segmented:
    mask = mask & (qseg_Bq[:, :, None] == kseg_Bk[:, None, :])
  return mask[:, None, None]


def _segments_overlap(qseg_Bq, kseg_Bk):
  """False only if no row can have equal ids in the two tiles (disjoint [min, max] ranges)."""
  return jnp.any((qseg_Bq.min(1) <= kseg_Bk.max(1)) & (kseg_Bk.min(1) <= qseg_Bq.max(1)))


def _einsum(eqn, a, b, *, preferred_element_type):
  """Accumulating einsum; fp32 operands use full fp32 precision (no TF32 on GPUs), as the Pallas
  kernels do, so that every implementation computes the same function."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.einsum(eqn, a, b, precision=precision, preferred_element_type=preferred_element_type)


def _acc_dtype(dtype):
  """Statistics and accumulators: fp32 for 16/32-bit inputs, fp64 for fp64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _scores(cfg: _Config, q_BKMD, k_BKND):
  """Raw fp32 scores `[B, K, G*bq, bk]` and, for soft capping, tanh(s / cap)."""
  acc = _acc_dtype(q_BKMD.dtype)
  s = _einsum('bkmd,bknd->bkmn', q_BKMD, k_BKND, preferred_element_type=acc)
  s = s * cfg.sm_scale
  if cfg.soft_cap is None:
    return s, None
  t = jnp.tanh(s / cfg.soft_cap)
  return cfg.soft_cap * t, t


def _masked(cfg: _Config, s_BKMN, mask):
  batch, kvh = s_BKMN.shape[:2]
  s = s_BKMN.reshape(batch, kvh, cfg.group, cfg.block_q, cfg.block_k)
  return jnp.where(mask, s, -jnp.inf).reshape(s_BKMN.shape)


def _q_to_blocks(cfg: _Config, x_BTHD):
  """`[B, Tq, H, D]` -> `[nq, B, K, G*bq, D]` (zero padded)."""
  batch, _, _, head_dim = x_BTHD.shape
  nq, bq = cfg.num_q_blocks, cfg.block_q
  x = jnp.pad(x_BTHD, ((0, 0), (0, nq * bq - cfg.q_len), (0, 0), (0, 0)))
  return (x.reshape(batch, nq, bq, cfg.num_kv_heads, cfg.group, head_dim)
          .transpose(1, 0, 3, 4, 2, 5).reshape(nq, batch, cfg.num_kv_heads, cfg.group * bq, head_dim))


def _kv_to_blocks(cfg: _Config, x_BSKD):
  """`[B, Tk, K, D]` -> `[nk, B, K, bk, D]` (zero padded)."""
  batch, _, kvh, head_dim = x_BSKD.shape
  nk, bk = cfg.num_k_blocks, cfg.block_k
  x = jnp.pad(x_BSKD, ((0, 0), (0, nk * bk - cfg.kv_len), (0, 0), (0, 0)))
  return x.reshape(batch, nk, bk, kvh, head_dim).transpose(1, 0, 3, 2, 4)


def _seg_to_blocks(ids_BT, length, num_blocks, block):
  batch = ids_BT.shape[0]
  ids = jnp.pad(ids_BT, ((0, 0), (0, num_blocks * block - length)))
  return ids.reshape(batch, num_blocks, block).swapaxes(0, 1)


def _to_blocks(cfg: _Config, q, k, v, qseg, kseg):
  return (_q_to_blocks(cfg, q), _kv_to_blocks(cfg, k), _kv_to_blocks(cfg, v),
          _seg_to_blocks(qseg, cfg.q_len, cfg.num_q_blocks, cfg.block_q),
          _seg_to_blocks(kseg, cfg.kv_len, cfg.num_k_blocks, cfg.block_k))


def _from_q_blocks(cfg: _Config, x_nBKMD, dtype):
  nq, batch, kvh, _, head_dim = x_nBKMD.shape
  x = x_nBKMD.reshape(nq, batch, kvh, cfg.group, cfg.block_q, head_dim).transpose(1, 0, 4, 2, 3, 5)
  return x.reshape(batch, nq * cfg.block_q, cfg.num_heads, head_dim)[:, :cfg.q_len].astype(dtype)


def _lse_from_blocks(cfg: _Config, lse_nBKM):
  nq, batch, kvh, _ = lse_nBKM.shape
  lse = lse_nBKM.reshape(nq, batch, kvh, cfg.group, cfg.block_q).transpose(1, 2, 3, 0, 4)
  return lse.reshape(batch, cfg.num_heads, nq * cfg.block_q)[:, :, :cfg.q_len]


def _lse_to_blocks(cfg: _Config, lse_BHT):
  batch = lse_BHT.shape[0]
  nq, bq = cfg.num_q_blocks, cfg.block_q
  lse = jnp.pad(lse_BHT, ((0, 0), (0, 0), (0, nq * bq - cfg.q_len)))
  lse = lse.reshape(batch, cfg.num_kv_heads, cfg.group, nq, bq).transpose(3, 0, 1, 2, 4)
  return lse.reshape(nq, batch, cfg.num_kv_heads, cfg.group * bq)


def _forward(cfg: _Config, q, k, v, qseg, kseg):
  q_nBKMD, k_nBKND, v_nBKND, qseg_nBq, kseg_nBk = _to_blocks(cfg, q, k, v, qseg, kseg)
  _, batch, kvh, rows, head_dim = q_nBKMD.shape
  acc = _acc_dtype(q.dtype)

  def q_block(_, xs):
    qi, q_BKMD, qseg_Bq = xs

    def update(kj, carry, masked):
      o, m, l = carry
      s, _ = _scores(cfg, q_BKMD, k_nBKND[kj])
      if masked:
        s = _masked(cfg, s, _block_mask(cfg, qi, kj, qseg_Bq, kseg_nBk[kj]))
      m_new = jnp.maximum(m, s.max(-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp(m - m_safe)
      p = jnp.exp(s - m_safe[..., None])
      l = alpha * l + p.sum(-1)
      o = alpha[..., None] * o + _einsum('bkmn,bknd->bkmd', p.astype(v.dtype), v_nBKND[kj],
                                            preferred_element_type=acc)
      return o, m_new, l

    def body(kj, carry, masked):
      if not cfg.segmented:
        return update(kj, carry, masked)
      return lax.cond(_segments_overlap(qseg_Bq, kseg_nBk[kj]),
                      functools.partial(update, masked=masked), lambda _, c: c, kj, carry)

    init = (jnp.zeros((batch, kvh, rows, head_dim), acc),
            jnp.full((batch, kvh, rows), -jnp.inf, acc),
            jnp.zeros((batch, kvh, rows), acc))
    o, m, l = _three_loops(_kv_range(cfg, qi), body, init)
    empty = l == 0.0
    o = o / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return None, (o.astype(q.dtype), lse)

  _, (o_nBKMD, lse_nBKM) = lax.scan(
      q_block, None, (jnp.arange(cfg.num_q_blocks), q_nBKMD, qseg_nBq))
  return _from_q_blocks(cfg, o_nBKMD, q.dtype), _lse_from_blocks(cfg, lse_nBKM)


def _backward(cfg: _Config, q, k, v, qseg, kseg, o, lse, do, dlse):
  q_nBKMD, k_nBKND, v_nBKND, qseg_nBq, kseg_nBk = _to_blocks(cfg, q, k, v, qseg, kseg)
  acc = _acc_dtype(q.dtype)
  do_nBKMD = _q_to_blocks(cfg, do.astype(q.dtype))
  # delta_i = rowsum(dO * O) - dlse_i, so that dS = P * (dP - delta) covers both cotangents.
  delta_BHT = _einsum('bthd,bthd->bht', do.astype(acc), o.astype(acc), preferred_element_type=acc)
  if dlse is not None:
    delta_BHT = delta_BHT - dlse
  delta_nBKM = _lse_to_blocks(cfg, delta_BHT)
  # Fully masked rows have lse = -inf; +inf makes every p = exp(s - lse) exactly zero.
  lse_nBKM = _lse_to_blocks(cfg, jnp.where(lse == -jnp.inf, jnp.inf, lse))
  _, batch, kvh, rows, head_dim = q_nBKMD.shape

  def kv_block(dq_nBKMD, xs):
    kj, k_BKND, v_BKND, kseg_Bk = xs

    def update(qi, carry, masked):
      dq, dk, dv = carry
      q_BKMD, do_BKMD = q_nBKMD[qi], do_nBKMD[qi]
      s, tanh = _scores(cfg, q_BKMD, k_BKND)
      if masked:
        s = _masked(cfg, s, _block_mask(cfg, qi, kj, qseg_nBq[qi], kseg_Bk))
      p = jnp.exp(s - lse_nBKM[qi][..., None])
      dv = dv + _einsum('bkmn,bkmd->bknd', p.astype(v.dtype), do_BKMD,
                           preferred_element_type=acc)
      dp = _einsum('bkmd,bknd->bkmn', do_BKMD, v_BKND, preferred_element_type=acc)
      ds = p * (dp - delta_nBKM[qi][..., None])
      if tanh is not None:
        ds = ds * (1.0 - tanh * tanh)
      ds = (ds * cfg.sm_scale).astype(q.dtype)
      dq_i = _einsum('bkmn,bknd->bkmd', ds, k_BKND, preferred_element_type=acc)
      dq = dq.at[qi].add(dq_i)
      dk = dk + _einsum('bkmn,bkmd->bknd', ds, q_BKMD, preferred_element_type=acc)
      return dq, dk, dv

    def body(qi, carry, masked):
      if not cfg.segmented:
        return update(qi, carry, masked)
      return lax.cond(_segments_overlap(qseg_nBq[qi], kseg_Bk),
                      functools.partial(update, masked=masked), lambda _, c: c, qi, carry)

    zeros = jnp.zeros((batch, kvh, cfg.block_k, head_dim), acc)
    dq_nBKMD, dk, dv = _three_loops(_q_range(cfg, kj), body, (dq_nBKMD, zeros, zeros))
    return dq_nBKMD, (dk, dv)

  dq_nBKMD = jnp.zeros((cfg.num_q_blocks, batch, kvh, rows, head_dim), acc)
  dq_nBKMD, (dk_nBKND, dv_nBKND) = lax.scan(
      kv_block, dq_nBKMD, (jnp.arange(cfg.num_k_blocks), k_nBKND, v_nBKND, kseg_nBk))

  def from_kv_blocks(x_nBKND, dtype):
    nk, _, _, bk, _ = x_nBKND.shape
    x = x_nBKND.transpose(1, 0, 3, 2, 4).reshape(batch, nk * bk, kvh, head_dim)
    return x[:, :cfg.kv_len].astype(dtype)

  return (_from_q_blocks(cfg, dq_nBKMD, q.dtype), from_kv_blocks(dk_nBKND, k.dtype),
          from_kv_blocks(dv_nBKND, v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, qseg, kseg):
  return _forward(cfg, q, k, v, qseg, kseg)


def _flash_fwd(cfg, q, k, v, qseg, kseg):
  o, lse = _forward(cfg, q, k, v, qseg, kseg)
  return (o, lse), (q, k, v, qseg, kseg, o, lse)


def _flash_bwd(cfg, res, cotangents):
  q, k, v, qseg, kseg, o, lse = res
  do, dlse = cotangents
  if isinstance(dlse, jax.custom_derivatives.SymbolicZero) or dlse is None:
    dlse = None
  dq, dk, dv = _backward(cfg, q, k, v, qseg, kseg, o, lse, do, dlse)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Attention over a KV cache (decode / tree verification).

CACHE_IMPLEMENTATIONS = ('pallas', 'xla', 'reference')
_CACHE_CHUNK = 1024


def _validate_cache_args(q_BTHD, k_cache_BSKD, v_cache_BSKD, cache_lengths_B, tree_mask_BTT,
                         sm_scale):
  for name, x in (('q_BTHD', q_BTHD), ('k_cache_BSKD', k_cache_BSKD),
                  ('v_cache_BSKD', v_cache_BSKD)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{name} must have rank 4, got shape {getattr(x, "shape", None)}')
    if not any(x.dtype == d for d in _FLOAT_DTYPES):
      raise ValueError(f'{name} must be a float array, got {x.dtype}')
  batch, num_new, num_heads, head_dim = q_BTHD.shape
  if k_cache_BSKD.shape != v_cache_BSKD.shape:
    raise ValueError(f'k_cache_BSKD and v_cache_BSKD must have the same shape, got '
                     f'{k_cache_BSKD.shape} and {v_cache_BSKD.shape}')
  cb, cache_len, kvh, cd = k_cache_BSKD.shape
  if cb != batch or cd != head_dim:
    raise ValueError(f'k_cache_BSKD must be [batch={batch}, S, K, head_dim={head_dim}], '
                     f'got {k_cache_BSKD.shape}')
  if not 1 <= num_new <= 128:
    raise ValueError(f'q_BTHD must hold 1 <= T <= 128 new queries, got T={num_new}')
  if num_new > cache_len:
    raise ValueError(f'the cache length ({cache_len}) must be >= T ({num_new})')
  if kvh < 1 or num_heads % kvh:
    raise ValueError(f'num_heads ({num_heads}) must be divisible by the cache num_kv_heads ({kvh})')
  if tuple(getattr(cache_lengths_B, 'shape', ())) != (batch,) or not jnp.issubdtype(
      cache_lengths_B.dtype, jnp.integer):
    raise ValueError(f'cache_lengths_B must be an integer array of shape ({batch},), got '
                     f'{getattr(cache_lengths_B, "shape", None)} '
                     f'{getattr(cache_lengths_B, "dtype", type(cache_lengths_B))}')
  if tuple(getattr(tree_mask_BTT, 'shape', ())) != (batch, num_new, num_new):
    raise ValueError(f'tree_mask_BTT must have shape {(batch, num_new, num_new)}, got '
                     f'{getattr(tree_mask_BTT, "shape", None)}')
  if sm_scale is not None and not (isinstance(sm_scale, (int, float, np.floating))
                                   and math.isfinite(sm_scale)):
    raise ValueError(f'sm_scale must be a finite float or None, got {sm_scale!r}')


def cache_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, *, cache_lengths_B, tree_mask_BTT,
                    sm_scale=None, implementation=None, **kernel_kwargs):
  """T new queries against a KV cache whose slots `[len_b, len_b + T)` hold the new tokens' K/V.

  Query t of row b sees cache slots `j < len_b` and slot `len_b + t'` iff `tree_mask_BTT[b, t, t']`
  (slots past the end of the cache do not exist). Returns `[B, T, H, D]` in q's dtype; a query
  that sees nothing gets zeros. 'xla' and 'pallas' are forward-only (decoding); 'reference' is
  differentiable. 'pallas' (Triton) falls back to 'xla' on TPU unless kernel arguments are
  given. `kernel_kwargs` go to `pallas_kernels.decode_attention.decode_attention`
  (`block_k`, `num_splits`, `block_m`, `interpret`, ...) or, for 'xla', `chunk`.
  """
  if implementation is None:
    implementation = default_cache_implementation()
  if implementation not in CACHE_IMPLEMENTATIONS:
    raise ValueError(f'implementation must be one of {CACHE_IMPLEMENTATIONS} or None, '
                     f'got {implementation!r}')
  _validate_cache_args(q_BTHD, k_cache_BSKD, v_cache_BSKD, cache_lengths_B, tree_mask_BTT,
                       sm_scale)
  cache_lengths_B = cache_lengths_B.astype(jnp.int32)
  tree_mask_BTT = tree_mask_BTT.astype(bool)
  if implementation == 'pallas' and jax.default_backend() == 'tpu' and not kernel_kwargs:
    # The decode kernel is Triton-only; on TPU it would run in interpret mode. 'xla' is the
    # fast path there (a model configured with attention_impl='pallas' lands here).
    implementation = 'xla'
  if implementation == 'pallas':
    from pallas_kernels.decode_attention import decode_attention  # pylint: disable=g-import-not-at-top
    return decode_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, cache_lengths_B=cache_lengths_B,
                            tree_mask_BTT=tree_mask_BTT, sm_scale=sm_scale, **kernel_kwargs)
  if implementation == 'xla':
    unknown = set(kernel_kwargs) - {'chunk'}
    if unknown:
      raise ValueError(f'implementation="xla" takes chunk only, got {sorted(unknown)}')
    return _xla_cache_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, cache_lengths_B,
                                tree_mask_BTT, sm_scale, **kernel_kwargs)
  if kernel_kwargs:
    raise ValueError(f'implementation="reference" takes no kernel arguments, got {sorted(kernel_kwargs)}')
  return _reference_cache_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, cache_lengths_B,
                                    tree_mask_BTT, sm_scale)


def cache_visibility(cache_lengths_B, tree_mask_BTT, slot_S):
  """Boolean `[B, T, S']` visibility of cache slots `slot_S` (any int vector) for the T queries."""
  num_new = tree_mask_BTT.shape[1]
  rel_BS = slot_S[None, :] - cache_lengths_B[:, None]
  in_prefix_BS = rel_BS < 0
  is_new_BS = (rel_BS >= 0) & (rel_BS < num_new)
  idx_BTS = jnp.broadcast_to(jnp.clip(rel_BS, 0, num_new - 1)[:, None, :],
                             (rel_BS.shape[0], num_new, rel_BS.shape[1]))
  tree_BTS = jnp.take_along_axis(tree_mask_BTT, idx_BTS, axis=2)
  return in_prefix_BS[:, None, :] | (is_new_BS[:, None, :] & tree_BTS)


def _reference_cache_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, cache_lengths_B,
                               tree_mask_BTT, sm_scale):
  visible_BTS = cache_visibility(cache_lengths_B, tree_mask_BTT,
                                 jnp.arange(k_cache_BSKD.shape[1]))
  return reference_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, sm_scale=sm_scale,
                             mask=visible_BTS[:, None])


def _xla_cache_attention(q_BTHD, k_cache_BSKD, v_cache_BSKD, cache_lengths_B, tree_mask_BTT,
                         sm_scale, chunk=None):
  """Online softmax over cache chunks, stopping after the longest row's last visible slot.

  Chunks are read from the cache in place (no padding or transposed copy of the cache); the last
  chunk is shifted back to end at the cache end and its already-seen slots are masked.
  """
  batch, num_new, num_heads, head_dim = q_BTHD.shape
  cache_len, kvh = k_cache_BSKD.shape[1:3]
  group = num_heads // kvh
  chunk = min(cache_len, _CACHE_CHUNK if chunk is None else int(chunk))
  if chunk < 1:
    raise ValueError(f'chunk must be positive, got {chunk}')
  scale = head_dim ** -0.5 if sm_scale is None else float(sm_scale)
  q_BKMD = (q_BTHD.reshape(batch, num_new, kvh, group, head_dim).transpose(0, 2, 3, 1, 4)
            .reshape(batch, kvh, group * num_new, head_dim))
  rows = group * num_new
  end = jnp.minimum(jnp.max(cache_lengths_B) + num_new, cache_len)
  num_chunks = (end + chunk - 1) // chunk

  def body(c, carry):
    o, m, l = carry
    nominal = c * chunk
    start = jnp.minimum(nominal, cache_len - chunk)
    slot_C = start + jnp.arange(chunk)
    k_BCKD = lax.dynamic_slice_in_dim(k_cache_BSKD, start, chunk, axis=1)
    v_BCKD = lax.dynamic_slice_in_dim(v_cache_BSKD, start, chunk, axis=1)
    s = _einsum('bkmd,bckd->bkmc', q_BKMD, k_BCKD, preferred_element_type=jnp.float32) * scale
    vis_BTC = cache_visibility(cache_lengths_B, tree_mask_BTT, slot_C) & (slot_C >= nominal)
    s = jnp.where(vis_BTC[:, None, None], s.reshape(batch, kvh, group, num_new, chunk), -jnp.inf)
    s = s.reshape(batch, kvh, rows, chunk)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    l = alpha * l + p.sum(-1)
    o = alpha[..., None] * o + _einsum('bkmc,bckd->bkmd', p.astype(v_cache_BSKD.dtype), v_BCKD,
                                          preferred_element_type=jnp.float32)
    return o, m_new, l

  init = (jnp.zeros((batch, kvh, rows, head_dim), jnp.float32),
          jnp.full((batch, kvh, rows), -jnp.inf, jnp.float32),
          jnp.zeros((batch, kvh, rows), jnp.float32))
  if chunk == cache_len:
    o, _, l = body(0, init)  # One chunk: a while loop would only add per-step overhead.
  else:
    o, _, l = lax.fori_loop(0, num_chunks, body, init)
  o = o / jnp.where(l == 0.0, 1.0, l)[..., None]
  o = o.reshape(batch, kvh, group, num_new, head_dim).transpose(0, 3, 1, 2, 4)
  return o.reshape(batch, num_new, num_heads, head_dim).astype(q_BTHD.dtype)
