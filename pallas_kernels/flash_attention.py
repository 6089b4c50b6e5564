"""Flash attention in Pallas: public entry (validation, padding, backend choice, custom_vjp).

The FlashAttention algorithm: each program owns a block of queries and streams blocks of K/V
through an online softmax (running max m, running sum l, rescaled fp32 accumulator), so the
`[q_len, kv_len]` score matrix never exists in memory. The backward recomputes the probabilities
from the saved fp32 log-sum-exp (FlashAttention-2): p = exp(s - lse), dV = p^T dO,
dS = p * (dO V^T - delta) with delta = rowsum(dO * O), dQ = dS K, dK = dS^T Q.

Backends (one kernel family per file, forward and backward side by side):
- 'gpu': `flash_attention_gpu` (Pallas -> Triton), any NVIDIA GPU from Ampere on.
- 'tpu': `flash_attention_tpu` (Pallas -> Mosaic TPU).
`backend=None` picks 'gpu' on a GPU and 'tpu' on a TPU; on CPU it runs the GPU (Triton-style)
kernels with `interpret=True`. Either kernel runs in interpret mode on CPU (`interpret=True`).

Lengths that are not block multiples are padded here (zeros; padded keys are masked, padded query
rows are sliced away and get no gradient), so any `q_len, kv_len >= 1` works.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention_common as common
from pallas_kernels import flash_attention_gpu
from pallas_kernels import flash_attention_tpu

AttentionConfig = common.AttentionConfig
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_BACKENDS = {'gpu': flash_attention_gpu, 'tpu': flash_attention_tpu}


@dataclasses.dataclass(frozen=True)
class FlashOptions:
  """Tiling and launch options of `flash_attention` (JAX's `BlockSizes` pattern): the typed way
  to pass them through `jax_spec.attention`. Fields are `flash_attention`'s keyword arguments of
  the same names; None means the backend's default."""
  block_q: int | None = None
  block_k: int | None = None
  backend: str | None = None
  interpret: bool | None = None
  num_warps: int | None = None
  num_stages: int | None = None


@dataclasses.dataclass(frozen=True)
class _Launch:
  """Resolved launch settings the kernels read (hashable: a custom_vjp nondiff argument)."""
  backend: str          # 'gpu' | 'tpu'
  interpret: bool
  num_warps: int | None = None    # Triton (GPU only); None: per-head_dim default
  num_stages: int | None = None


def _backend_module(backend: str):
  return _BACKENDS[backend]


def _platform() -> str:
  return jax.default_backend()


def flash_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None,
                    sliding_window=None, logit_soft_cap=None, sm_scale=None, block_q=None,
                    block_k=None, interpret=None, return_lse=False, backend=None, num_warps=None,
                    num_stages=None):
  """Fused softmax attention, `softmax(mask(cap(q k^T * sm_scale))) v`, with a Pallas backward.

  Args:
    q: `[batch, q_len, num_heads, head_dim]`, fp32/bf16/fp16.
    k, v: `[batch, kv_len, num_kv_heads, head_dim]`, same dtype; `num_heads % num_kv_heads == 0`
      (MHA, GQA, MQA; K/V are never repeated).
    causal: bottom-right aligned (query i sits at key position `kv_len - q_len + i`).
    q_segment_ids, kv_segment_ids: integer `[batch, q_len]` / `[batch, kv_len]` (both or
      neither); a query sees only keys with the same id.
    sliding_window: int w > 0; key j visible to query i only if `0 <= pos_i - pos_j < w`.
    logit_soft_cap: float c > 0; scores become `c * tanh(s / c)` (gradient goes through it).
    sm_scale: softmax scale, default `head_dim ** -0.5`.
    block_q, block_k: tile sizes; default per backend (GPU: powers of two >= 16; TPU: multiples
      of 128, or any multiple of 8 that covers the whole sequence). Clamped to short sequences.
    interpret: run the Pallas kernels in interpret mode; default True unless the default device
      is the backend's own platform.
    return_lse: also return the fp32 log-sum-exp `[batch, num_heads, q_len]` (-inf on rows that
      see no key); its cotangent is honoured by the backward.
    backend: None | 'gpu' | 'tpu'.
    num_warps, num_stages: Triton launch options of the GPU kernels (forward and backward);
      default 4 warps for head_dim <= 128 else 8, and 2 stages. Not used by the TPU kernels.

  Returns:
    `[batch, q_len, num_heads, head_dim]` in q's dtype (rows with no visible key are zeros), and
    the lse if `return_lse`. Differentiable once (grad-of-grad raises NotImplementedError).
  """
  common.validate_attention_inputs(
      q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      sliding_window=sliding_window, logit_soft_cap=logit_soft_cap, sm_scale=sm_scale,
      dtypes=DTYPES)
  if q_segment_ids is not None:
    q_segment_ids = q_segment_ids.astype(jnp.int32)
    kv_segment_ids = kv_segment_ids.astype(jnp.int32)
  if backend is None:
    backend = 'tpu' if _platform() == 'tpu' else 'gpu'
  if backend not in _BACKENDS:
    raise ValueError(f"backend must be None, 'gpu' or 'tpu', got {backend!r}.")
  if interpret is None:
    interpret = _platform() != backend
  for name, n in (('num_warps', num_warps), ('num_stages', num_stages)):
    if n is None:
      continue
    if not common.is_positive_int(n):
      raise ValueError(f'{name} must be a positive int, got {n!r}.')
    if backend != 'gpu':
      raise ValueError(f'{name} is a Triton (GPU kernel) option; backend is {backend!r}.')
  block_q, block_k = _backend_module(backend).block_sizes(q.shape[1], k.shape[1], q.shape[3],
                                                          block_q, block_k)
  cfg = common.make_config(q, k, block_q=block_q, block_k=block_k, causal=causal,
                           q_segment_ids=q_segment_ids, sliding_window=sliding_window,
                           logit_soft_cap=logit_soft_cap, sm_scale=sm_scale)
  launch = _Launch(backend=backend, interpret=bool(interpret),
                   num_warps=None if num_warps is None else int(num_warps),
                   num_stages=None if num_stages is None else int(num_stages))
  o, lse = _flash_attention(q, k, v, q_segment_ids, kv_segment_ids, cfg, launch)
  return (o, lse) if return_lse else o


def _pad_seq(x, length, value=0):
  """Pads axis 1 of x up to `length` (ids are padded by repeating the last one)."""
  pad = length - x.shape[1]
  if pad == 0:
    return x
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.pad(x, [(0, 0), (0, pad)], mode='edge')
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _pad_inputs(q, k, v, q_ids, kv_ids, cfg):
  q = _pad_seq(q, cfg.q_len_padded)
  k, v = _pad_seq(k, cfg.kv_len_padded), _pad_seq(v, cfg.kv_len_padded)
  if q_ids is not None:
    q_ids, kv_ids = _pad_seq(q_ids, cfg.q_len_padded), _pad_seq(kv_ids, cfg.kv_len_padded)
  return q, k, v, q_ids, kv_ids


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash_attention(q, k, v, q_ids, kv_ids, cfg, launch):
  return _fwd(q, k, v, q_ids, kv_ids, cfg, launch)[0]


def _first_order_only(fn):
  """Kernel calls have no derivative of their own: differentiating them (grad-of-grad, or jvp
  through the custom_vjp forward) raises a clear error instead of a Pallas linearization error."""
  fn = jax.custom_jvp(fn, nondiff_argnums=(0, 1))

  @fn.defjvp
  def _jvp(cfg, launch, primals, tangents):
    del cfg, launch, primals, tangents
    raise NotImplementedError(
        'pallas_kernels.flash_attention supports first-order reverse-mode gradients only (its '
        'forward and backward are Pallas kernels without derivatives); use a plain-JAX '
        'attention (jax_spec.attention implementation="xla") for jvp or grad-of-grad.')

  return fn


@_first_order_only
def _forward(cfg, launch, q, k, v, q_ids, kv_ids):
  o, lse = _backend_module(launch.backend).forward(
      *_pad_inputs(q, k, v, q_ids, kv_ids, cfg), cfg, launch)
  return o[:, :cfg.q_len], lse[:, :, :cfg.q_len]


def _fwd(q, k, v, q_ids, kv_ids, cfg, launch):
  o, lse = _forward(cfg, launch, q, k, v, q_ids, kv_ids)
  return (o, lse), (q, k, v, q_ids, kv_ids, o, lse)


def _bwd(cfg, launch, res, cotangents):
  return _backward(cfg, launch, res, cotangents)


@_first_order_only
def _backward(cfg, launch, res, cotangents):
  q, k, v, q_ids, kv_ids, o, lse = res
  do, dlse = cotangents
  delta, lse = common.backward_row_stats(cfg, o, do, lse, dlse)
  do = _pad_seq(do.astype(q.dtype), cfg.q_len_padded)
  q, k, v, q_ids, kv_ids = _pad_inputs(q, k, v, q_ids, kv_ids, cfg)
  dq, dk, dv = _backend_module(launch.backend).backward(q, k, v, q_ids, kv_ids, do, lse, delta,
                                                       cfg, launch)
  return (dq[:, :cfg.q_len], dk[:, :cfg.kv_len], dv[:, :cfg.kv_len], None, None)


_flash_attention.defvjp(_fwd, _bwd)
