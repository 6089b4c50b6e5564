"""Static configuration, mask geometry and the matmul shared by the Pallas attention kernels.

Every backend (GPU Triton, TPU Mosaic, a future Mosaic GPU one) sees the same padded problem:
q is padded to a multiple of `block_q`, k/v to a multiple of `block_k`, and this module says which
(query, key) pairs are visible and which key blocks a query block must visit. Positions follow
`pallas_kernels.reference.attention_mask`: query row r sits at key position `r + kv_len - q_len`
(bottom-right causal alignment); padded keys (`>= kv_len`) are never visible.

The block ranges are written with `jnp.minimum/maximum` and `lax.div` on non-negative operands so
that they trace inside kernels (program ids are int32 scalars) and also run on Python ints in tests.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Everything static about one call; hashable, so it can be a custom_vjp nondiff argument."""
  q_len: int            # true (unpadded) lengths
  kv_len: int
  block_q: int
  block_k: int
  causal: bool
  sliding_window: int | None
  logit_soft_cap: float | None
  sm_scale: float
  has_segments: bool
  interpret: bool
  backend: str          # 'gpu' | 'tpu'
  num_warps: int | None = None    # Triton launch options (GPU only); None: per-head_dim default
  num_stages: int | None = None

  @property
  def q_len_padded(self) -> int:
    return -(-self.q_len // self.block_q) * self.block_q

  @property
  def kv_len_padded(self) -> int:
    return -(-self.kv_len // self.block_k) * self.block_k

  @property
  def offset(self) -> int:
    """Key position of query row 0 (bottom-right alignment)."""
    return self.kv_len - self.q_len

  @property
  def banded(self) -> bool:
    """True when visibility depends on positions (causal or window; a window implies causal)."""
    return self.causal or self.sliding_window is not None

  @property
  def needs_mask(self) -> bool:
    return self.banded or self.has_segments or self.kv_len_padded != self.kv_len


def dot(a, b, *, trans_a=False, trans_b=False):
  """fp32-accumulating matmul for kernel bodies; fp32 inputs use full fp32 precision (no TF32), so
  every backend and the XLA paths compute the same fp32 function."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _cdiv(a, b: int):
  """Ceil division for non-negative `a` (int or int32 scalar)."""
  return -(-a // b) if isinstance(a, int) else lax.div(a + (b - 1), b)


def _div(a, b: int):
  """Floor division for non-negative `a`."""
  return a // b if isinstance(a, int) else lax.div(a, b)


def _max(a, b):
  return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
  return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def _clamp(x, lo, hi):
  return _min(_max(x, lo), hi)


def kv_block_range(cfg: AttentionConfig, q_start, block_q: int, block_k: int):
  """Key blocks a query block `[q_start, q_start + block_q)` must visit.

  Returns `(lo, full_lo, full_hi, hi)`: blocks in `[lo, hi)` may hold visible keys (all others
  are skipped), and blocks in `[full_lo, full_hi)` are visible to every row of the query block,
  so they need no mask. `lo <= full_lo <= full_hi <= hi`. Python ints in, Python ints out.
  """
  off = cfg.offset
  w = cfg.sliding_window
  if cfg.banded:
    # The last row sees keys up to its own position.
    hi = _cdiv(_max(_min(q_start + block_q + off, cfg.kv_len), 0), block_k)
  else:
    hi = _cdiv(cfg.kv_len, block_k)
  lo = 0
  if w is not None:
    # The first row sees keys from position (pos - w + 1) on.
    lo = _min(_div(_max(q_start + off - w + 1, 0), block_k), hi)
  if cfg.has_segments:
    return lo, hi, hi, hi
  full_hi = cfg.kv_len // block_k   # a partially padded last block always needs the mask
  if cfg.banded:
    full_hi = _min(full_hi, _div(_max(q_start + off + 1, 0), block_k))
  full_lo = lo
  if w is not None:
    full_lo = _cdiv(_max(q_start + block_q + off - w, 0), block_k)
  full_lo = _clamp(full_lo, lo, hi)
  full_hi = _clamp(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def q_block_range(cfg: AttentionConfig, k_start, block_k: int, block_q: int):
  """Query blocks that may see keys `[k_start, k_start + block_k)`; same contract as above."""
  n_q = cfg.q_len_padded // block_q
  off = cfg.offset
  w = cfg.sliding_window
  lo, hi = 0, n_q
  if cfg.banded:
    # Row r sees key k_start only if r + off >= k_start.
    lo = _min(_div(_max(k_start - off, 0), block_q), n_q)
  if w is not None:
    # Row r sees some key of the block only if r + off - w < k_start + block_k - 1.
    hi = _min(_cdiv(_max(k_start + block_k - 1 - off + w, 0), block_q), n_q)
  hi = _max(hi, lo)
  if cfg.has_segments:
    return lo, hi, hi, hi
  full_lo, full_hi = lo, hi
  if cfg.banded:
    full_lo = _cdiv(_max(k_start + block_k - 1 - off, 0), block_q)
  if w is not None:
    full_hi = _div(_max(k_start + w - off, 0), block_q)
  full_lo = _clamp(full_lo, lo, hi)
  full_hi = _clamp(full_hi, full_lo, hi)
  if cfg.kv_len_padded != cfg.kv_len:
    # The last key block holds padding: it must always be masked.
    # (Integer arithmetic, not jnp.where: a traced bool here trips the Triton lowering.)
    fully_valid = _clamp(cfg.kv_len - k_start - block_k + 1, 0, 1)   # 1 iff no padded key
    full_hi = full_lo + (full_hi - full_lo) * fully_valid
  return lo, full_lo, full_hi, hi


def visible(cfg: AttentionConfig, q_pos, k_pos, q_ids=None, kv_ids=None):
  """Boolean visibility for broadcastable row indices `q_pos` and key indices `k_pos`.

  `q_pos` are padded query *row* indices (not key positions); ids broadcast like positions.
  Returns None when nothing needs masking.
  """
  mask = None

  def _and(a, b):
    return b if a is None else a & b

  if cfg.kv_len_padded != cfg.kv_len:
    mask = _and(mask, k_pos < cfg.kv_len)
  if cfg.banded:
    delta = q_pos + cfg.offset - k_pos   # query position minus key position
    mask = _and(mask, delta >= 0)
    if cfg.sliding_window is not None:
      mask = _and(mask, delta < cfg.sliding_window)
  if cfg.has_segments:
    mask = _and(mask, q_ids == kv_ids)
  return mask


def scores(cfg: AttentionConfig, s_raw):
  """Scaled (and soft-capped) fp32 logits; also returns tanh(.) for the backward (or None)."""
  s = s_raw * cfg.sm_scale
  if cfg.logit_soft_cap is None:
    return s, None
  t = jnp.tanh(s / cfg.logit_soft_cap)
  return cfg.logit_soft_cap * t, t
