"""What every blockwise attention implementation shares: geometry, visibility, softmax algebra.

Used by the Pallas kernels (GPU Triton, TPU Mosaic, decode) and by the plain-JAX blockwise
implementations (`blockwise_attention`, `chunked_cache_attention`) alike, so the block ranges,
the visibility rule and the online-softmax update are written once.

Every implementation sees the same padded problem: q is padded to a multiple of `block_q`, k/v to
a multiple of `block_k`, and this module says which (query, key) pairs are visible and which key
blocks a query block must visit. Positions follow `pallas_kernels.reference.attention_mask`: query
row r sits at key position `r + kv_len - q_len` (bottom-right causal alignment); padded keys
(`>= kv_len`) are never visible. Padded query rows are not masked: they are sliced away, and the
backward gives them lse = +inf (so p = 0) and dO = 0.

The block ranges are written with `jnp.minimum/maximum` and `lax.div` on non-negative operands so
that they trace inside kernels (program ids are int32 scalars) and also run on Python ints in tests.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

_INTS = (int, np.integer)
_REALS = (int, float, np.integer, np.floating)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """The static problem of one call (lengths, tiles, mask, scale); hashable, so it can be a
  custom_vjp nondiff argument. Launch options (backend, interpret, warps) live with each kernel."""
  q_len: int            # true (unpadded) lengths
  kv_len: int
  block_q: int
  block_k: int
  causal: bool
  sliding_window: int | None
  logit_soft_cap: float | None
  sm_scale: float
  has_segments: bool

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


def matmul_precision(dtype):
  """fp32 operands use full fp32 precision (no TF32), so every backend computes one fp32 function."""
  return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def accumulator_dtype(dtype):
  """Statistics and accumulators: fp32 for 16/32-bit inputs, fp64 for fp64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def dot(a, b, *, trans_a=False, trans_b=False):
  """Matmul over the last two axes (leading axes are batch axes; kernel bodies pass 2-D tiles),
  accumulated in `accumulator_dtype`, at `matmul_precision`."""
  n = a.ndim
  batch = tuple(range(n - 2))
  dims = (((n - 2 if trans_a else n - 1,), (n - 1 if trans_b else n - 2,)), (batch, batch))
  return lax.dot_general(a, b, dims, precision=matmul_precision(a.dtype),
                         preferred_element_type=accumulator_dtype(a.dtype))


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


def dscores(p, dp, delta, tanh):
  """Score cotangent dS = P * (dP - delta), through the soft cap's tanh when there is one."""
  ds = p * (dp - delta)
  return ds if tanh is None else ds * (1.0 - tanh * tanh)


def backward_row_stats(cfg: AttentionConfig, o, do, lse, dlse):
  """The backward's per-row inputs `(delta, lse)`, `[B, H, q_len_padded]` in the accumulator dtype.

  delta = rowsum(dO * O) - dlse, so that dS = P * (dP - delta) covers both cotangents (an lse
  cotangent adds dlse * p to dS). Rows that see no key (lse = -inf) and padded rows get lse = +inf,
  so every p = exp(s - lse) there is exactly 0; padded rows get delta = 0.
  """
  acc = accumulator_dtype(o.dtype)
  delta = jnp.einsum('bthd,bthd->bht', do.astype(acc), o.astype(acc),
                     precision=matmul_precision(acc), preferred_element_type=acc) - dlse
  pad = [(0, 0), (0, 0), (0, cfg.q_len_padded - cfg.q_len)]
  lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)
  return jnp.pad(delta, pad), jnp.pad(lse, pad, constant_values=jnp.inf)


def ids_overlap(q_ids, kv_ids, axis=None):
  """False only where no (query, key) pair can have equal segment ids (disjoint id ranges), so
  the block pair can be skipped. Reduces over `axis` (None: all axes)."""
  return ((jnp.min(q_ids, axis) <= jnp.max(kv_ids, axis)) &
          (jnp.min(kv_ids, axis) <= jnp.max(q_ids, axis)))


def _expand(x, n):
  del n
  return x[..., None]


def online_softmax_init(o_shape, dtype=jnp.float32, *, stats_shape=None):
  """The running state `(o, m, l)` before any block: o = 0 `o_shape`, and m = -inf, l = 0 per row,
  shaped `o_shape[:-1]` (or `stats_shape`: the TPU's lane-replicated `[rows, lanes]`)."""
  stats_shape = tuple(o_shape[:-1]) if stats_shape is None else tuple(stats_shape)
  return (jnp.zeros(o_shape, dtype), jnp.full(stats_shape, -jnp.inf, dtype),
          jnp.zeros(stats_shape, dtype))


def online_softmax_step(o, m, l, s, pv, *, masked, widen=None):
  """One block of the online softmax: folds scores `s [..., n]` into the running state.

  `o [..., d]` is the unnormalized accumulator, `m`/`l` the running max / sum per row, shaped
  `s.shape[:-1]`; `pv(p)` returns `p @ v_block` (fp32, shaped like o). With `widen(x, n)` (TPU) the
  row statistics keep a trailing (lane) axis and `widen` maps them to width n instead of
  broadcasting. `masked`: s may hold -inf rows, whose max must not turn exp(s - m) into NaN.
  Returns the new `(o, m, l)`.
  """
  keep = widen is not None
  widen = _expand if widen is None else widen
  m_next = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=keep))
  m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next) if masked else m_next
  p = jnp.exp(s - widen(m_safe, s.shape[-1]))
  alpha = jnp.exp(m - m_safe)
  l = alpha * l + jnp.sum(p, axis=-1, keepdims=keep)
  o = widen(alpha, o.shape[-1]) * o + pv(p)
  return o, m_next, l


def softmax_finish(o, m, l, *, widen=None):
  """Normalized output and log-sum-exp of the running state; rows that saw no key (l = 0) give
  o = 0 and lse = -inf."""
  widen = _expand if widen is None else widen
  empty = l == 0.0
  l_safe = jnp.where(empty, 1.0, l)
  return o / widen(l_safe, o.shape[-1]), jnp.where(empty, -jnp.inf, m + jnp.log(l_safe))


def cache_slot_visible(rel, num_new, tree):
  """Decode visibility of a cache slot at `rel = slot - cache_length`: the prefix (`rel < 0`), and
  a new token `rel = t'` iff `tree` (the `[.., T, T]` mask entry of that token) says so."""
  return (rel < 0) | ((rel < num_new) & tree)


def cache_visibility(cache_lengths_B, tree_mask_BTT, slot_S):
  """Boolean `[B, T, S']` visibility of cache slots `slot_S` (any int vector) for the T queries."""
  num_new = tree_mask_BTT.shape[1]
  rel_BS = slot_S[None, :] - cache_lengths_B[:, None]
  idx_BTS = jnp.broadcast_to(jnp.clip(rel_BS, 0, num_new - 1)[:, None, :],
                             (rel_BS.shape[0], num_new, rel_BS.shape[1]))
  tree_BTS = jnp.take_along_axis(tree_mask_BTT, idx_BTS, axis=2)
  return cache_slot_visible(rel_BS[:, None, :], num_new, tree_BTS)


# ---------------------------------------------------------------------------------- validation

def is_positive_int(x) -> bool:
  return isinstance(x, _INTS) and not isinstance(x, bool) and x > 0


def validate_attention_inputs(q, k, v, *, q_segment_ids, kv_segment_ids, sliding_window,
                              logit_soft_cap, sm_scale, dtypes):
  """The checks every attention implementation makes (ValueError naming the argument).

  `dtypes`: the float dtypes the implementation accepts; q, k and v must share one of them.
  """
  for name, x in (('q', q), ('k', k), ('v', v)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{name} must have rank 4 [batch, seq, heads, head_dim], got shape '
                       f'{getattr(x, "shape", None)}.')
  batch, q_len, num_heads, head_dim = q.shape
  _, kv_len, num_kv_heads, _ = k.shape
  if k.shape != v.shape:
    raise ValueError(f'k and v must have the same shape, got k {k.shape} and v {v.shape}.')
  if k.shape[0] != batch:
    raise ValueError(f'k/v batch {k.shape[0]} does not match q batch {batch}.')
  if k.shape[-1] != head_dim:
    raise ValueError(f'head_dim mismatch: q has {head_dim}, k/v have {k.shape[-1]}.')
  if num_kv_heads == 0 or num_heads % num_kv_heads:
    raise ValueError(f'num_heads ({num_heads}) of q must be divisible by num_kv_heads '
                     f'({num_kv_heads}) of k/v.')
  if min(q_len, kv_len, head_dim, batch) < 1:
    raise ValueError(f'q, k, v must be non-empty, got q {q.shape}, k {k.shape}.')
  if not any(q.dtype == d for d in dtypes):
    names = ', '.join(jnp.dtype(d).name for d in dtypes)
    raise ValueError(f'q dtype must be one of {names}, got {q.dtype}.')
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f'q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}.')
  if (q_segment_ids is None) != (kv_segment_ids is None):
    missing = 'kv_segment_ids' if kv_segment_ids is None else 'q_segment_ids'
    raise ValueError(f'q_segment_ids and kv_segment_ids go together; {missing} is missing.')
  if q_segment_ids is not None:
    for name, ids, length in (('q_segment_ids', q_segment_ids, q_len),
                              ('kv_segment_ids', kv_segment_ids, kv_len)):
      if tuple(getattr(ids, 'shape', ())) != (batch, length):
        raise ValueError(f'{name} must have shape {(batch, length)}, got '
                         f'{getattr(ids, "shape", None)}.')
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f'{name} must be an integer array (int32), got {ids.dtype}.')
  if sliding_window is not None and not is_positive_int(sliding_window):
    raise ValueError(f'sliding_window must be a positive int, got {sliding_window!r}.')
  if logit_soft_cap is not None and not (isinstance(logit_soft_cap, _REALS) and
                                         logit_soft_cap > 0):
    raise ValueError(f'logit_soft_cap must be a positive float, got {logit_soft_cap!r}.')
  if sm_scale is not None and not (isinstance(sm_scale, _REALS) and math.isfinite(sm_scale)):
    raise ValueError(f'sm_scale must be a finite static Python/NumPy float, got {sm_scale!r}.')


def make_config(q, k, *, block_q, block_k, causal, q_segment_ids, sliding_window,
                logit_soft_cap, sm_scale) -> AttentionConfig:
  """The AttentionConfig of validated inputs (default scale `head_dim ** -0.5`)."""
  head_dim = q.shape[-1]
  return AttentionConfig(
      q_len=q.shape[1], kv_len=k.shape[1], block_q=int(block_q), block_k=int(block_k),
      causal=bool(causal),
      sliding_window=None if sliding_window is None else int(sliding_window),
      logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
      sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
      has_segments=q_segment_ids is not None)


MAX_NEW_QUERIES = 128   # cache attention: T new queries per row (a decode step or a tree)


def validate_cache_inputs(q_BTHE, k_cache_BSKE, v_cache_BSKE, *, cache_lengths_B, tree_mask_BTT,
                          sm_scale):
  """The checks every cache-attention implementation makes (ValueError naming the argument)."""
  for name, x in (('q_BTHE', q_BTHE), ('k_cache_BSKE', k_cache_BSKE),
                  ('v_cache_BSKE', v_cache_BSKE)):
    if getattr(x, 'ndim', None) != 4:
      raise ValueError(f'{name} must have rank 4, got shape {getattr(x, "shape", None)}')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'{name} must be a float array, got {x.dtype}')
  batch, num_new, num_heads, head_dim = q_BTHE.shape
  if k_cache_BSKE.shape != v_cache_BSKE.shape:
    raise ValueError(f'k_cache_BSKE and v_cache_BSKE must have the same shape, got '
                     f'{k_cache_BSKE.shape} and {v_cache_BSKE.shape}')
  if k_cache_BSKE.dtype != v_cache_BSKE.dtype:
    raise ValueError(f'k_cache_BSKE and v_cache_BSKE must share a dtype, got '
                     f'{k_cache_BSKE.dtype} and {v_cache_BSKE.dtype}')
  cb, cache_len, kvh, cd = k_cache_BSKE.shape
  if cb != batch or cd != head_dim:
    raise ValueError(f'k_cache_BSKE must be [batch={batch}, S, K, head_dim={head_dim}], '
                     f'got {k_cache_BSKE.shape}')
  if not 1 <= num_new <= MAX_NEW_QUERIES:
    raise ValueError(f'q_BTHE must hold 1 <= T <= {MAX_NEW_QUERIES} new queries, got T={num_new}')
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
  if sm_scale is not None and not (isinstance(sm_scale, _REALS) and math.isfinite(sm_scale)):
    raise ValueError(f'sm_scale must be a finite float or None, got {sm_scale!r}')
