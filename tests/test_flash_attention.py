"""pallas_kernels.flash_attention against a float64 materialized reference (interpret mode on CPU).

Interpret mode compiles every kernel into an XLA while loop, which takes seconds per
configuration on CPU, so each fast case packs several features into one compile; the full sweep
is `pytest -m slow tests/test_flash_attention.py`.
"""
import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import flash_attention_common as common
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.reference import attention_mask, reference_attention

# Max error relative to max |reference| (float64 reference evaluated on the same rounded inputs).
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}
_MASK_KEYS = ('causal', 'sliding_window', 'logit_soft_cap', 'sm_scale')


def _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim, dtype, segments=None):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (batch, q_len, heads, head_dim), jnp.float32).astype(dtype)
  k = jax.random.normal(ks[1], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  v = jax.random.normal(ks[2], (batch, kv_len, kv_heads, head_dim), jnp.float32).astype(dtype)
  do = jax.random.normal(ks[3], q.shape, jnp.float32).astype(dtype)
  dlse = jax.random.normal(ks[4], (batch, heads, q_len), jnp.float32)
  ids = {}
  if segments == 'packed':   # sorted ids: packed documents, shared between q and kv
    assert q_len == kv_len
    ids_BT = jnp.cumsum(jax.random.bernoulli(ks[4], 0.05, (batch, q_len)), axis=1).astype(jnp.int32)
    ids = dict(q_segment_ids=ids_BT, kv_segment_ids=ids_BT)
  elif segments == 'random':  # unsorted ids; id 3 exists only on the query side (empty rows)
    ids = dict(q_segment_ids=jax.random.randint(ks[4], (batch, q_len), 0, 4),
               kv_segment_ids=jax.random.randint(ks[3], (batch, kv_len), 0, 3))
  return (q, k, v, do, dlse), ids


# Interpret-mode kernels are big XLA while loops; XLA's CPU optimizations only slow their compile.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)(*args)


def _kernel_vjp(q, k, v, do, dlse, ids, kw):
  def fn(q, k, v, do, dlse, ids):
    (o, lse), vjp = jax.vjp(
        lambda q, k, v: flash_attention(q, k, v, return_lse=True, **ids, **kw), q, k, v)
    return o, lse, vjp((do, dlse))
  return _compiled(fn, q, k, v, do, dlse, ids)


def _reference_vjp(q, k, v, do, dlse, ids, kw):
  kw = {a: b for a, b in kw.items() if a in _MASK_KEYS}

  def fn(q, k, v, do, dlse, ids):
    (o, lse), vjp = jax.vjp(
        lambda q, k, v: reference_attention(q, k, v, return_lse=True, **ids, **kw), q, k, v)
    return (o, lse, *vjp((do, dlse)))

  with jax.enable_x64(True):
    f64 = lambda x: np.asarray(x, np.float64)
    # The reference returns lse in fp32 (rounding ~1e-7 relative); everything else is fp64.
    out = jax.jit(fn)(f64(q), f64(k), f64(v), f64(do), np.asarray(dlse, np.float32), ids)
    return tuple(np.asarray(x, np.float64) for x in out)


def _rel_err(x, ref):
  x = np.asarray(x, np.float64)
  finite = np.isfinite(ref)   # -inf lse rows are compared separately
  diff = np.where(finite, x - np.where(finite, ref, 0.0), 0.0)
  scale = np.max(np.abs(np.where(finite, ref, 0.0)), initial=0.0)
  return float(np.max(np.abs(diff), initial=0.0) / max(scale, 1e-30))


def check(batch=1, q_len=33, kv_len=33, heads=2, kv_heads=2, head_dim=32, dtype=jnp.float32,
          segments=None, seed=0, **kw):
  """Forward, lse and dq/dk/dv (with a random lse cotangent) against the float64 reference."""
  (q, k, v, do, dlse), ids = _inputs(seed, batch, q_len, kv_len, heads, kv_heads, head_dim,
                                     dtype, segments)
  o, lse, (dq, dk, dv) = _kernel_vjp(q, k, v, do, dlse, ids, kw)
  assert o.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype and dv.dtype == dtype
  assert o.shape == q.shape and dk.shape == k.shape and lse.shape == (batch, heads, q_len)
  assert lse.dtype == jnp.float32
  ref = _reference_vjp(q, k, v, do, dlse, ids, kw)
  errs = {name: _rel_err(x, r) for name, x, r in zip(('o', 'lse', 'dq', 'dk', 'dv'),
                                                     (o, lse, dq, dk, dv), ref)}
  for name, x in zip(('o', 'dq', 'dk', 'dv'), (o, dq, dk, dv)):
    assert np.all(np.isfinite(np.asarray(x, np.float32))), f'{name} has NaN/inf'
  tol = TOL[dtype]
  assert all(e <= tol for e in errs.values()), f'errors {errs} > {tol}'
  # Rows that see no key: lse = -inf, output and dq exactly zero.
  empty_BHT = np.isneginf(ref[1])
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty_BHT)
  empty_BTH = empty_BHT.transpose(0, 2, 1)
  assert np.all(np.asarray(o, np.float32)[empty_BTH] == 0)
  assert np.all(np.asarray(dq, np.float32)[empty_BTH] == 0)
  return errs, int(empty_BHT.sum())


# --------------------------------------------------------------------------- GPU kernel (fast)

@pytest.mark.parametrize('case', [
    # odd lengths with padding in both q and kv, MHA, no mask, fp32
    dict(q_len=129, kv_len=129, head_dim=64, block_q=32, block_k=32),
    # causal with q_len > kv_len (bottom-right): the first 17 query rows see no key; MQA
    dict(q_len=37, kv_len=20, heads=4, kv_heads=1, causal=True, block_q=16, block_k=16),
    # sliding window alone (implies causal), q_len < kv_len, GQA, custom scale, default blocks
    dict(q_len=7, kv_len=300, heads=4, kv_heads=2, sliding_window=40, sm_scale=0.3),
    # every mask option combined, bf16, GQA, batch 2
    dict(batch=2, q_len=100, kv_len=100, heads=4, kv_heads=2, head_dim=64, dtype=jnp.bfloat16,
         segments='packed', causal=True, sliding_window=24, logit_soft_cap=5.0, block_q=32,
         block_k=16),
    # segments alone (unsorted, some query ids absent from kv -> empty rows), fp16
    dict(q_len=50, kv_len=70, dtype=jnp.float16, segments='random', block_q=16, block_k=32),
    # soft cap alone, head_dim 256, bf16, a single query row
    dict(q_len=1, kv_len=45, heads=1, kv_heads=1, head_dim=256, dtype=jnp.bfloat16,
         logit_soft_cap=2.0),
], ids=['odd-mha', 'causal-tq>tk-empty-rows-mqa', 'window-gqa-tq<tk', 'all-masks-bf16',
        'segments-fp16', 'softcap-d256-bf16'])
def test_gpu_kernel_matches_float64_reference(case):
  errs, n_empty = check(**case)
  if case.get('q_len') == 37 or case.get('segments') == 'random':
    assert n_empty > 0   # these cases are meant to exercise empty rows
  print(case, errs)


def test_jit_vmap_composition():
  (q, k, v, do, _), _ = _inputs(1, 2, 24, 40, 2, 1, 32, jnp.float32)

  def run(attention, q, k, v, do):
    # vmap over the batch axis of per-example [T, H, E] inputs, and the gradient through it.
    fv = jax.vmap(lambda q, k, v: attention(q[None], k[None], v[None], causal=True)[0])
    loss = lambda q, k, v: jnp.sum(fv(q, k, v) * do)
    return fv(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  kernel = functools.partial(flash_attention, block_q=16, block_k=16)
  o, grads = _compiled(functools.partial(run, kernel), q, k, v, do)
  with jax.enable_x64(True):
    f64 = lambda x: np.asarray(x, np.float64)
    ro, rgrads = jax.jit(functools.partial(run, reference_attention))(f64(q), f64(k), f64(v),
                                                                       f64(do))
  assert _rel_err(o, np.asarray(ro)) < TOL[jnp.float32]
  for g, rg in zip(grads, rgrads):
    assert _rel_err(g, np.asarray(rg)) < TOL[jnp.float32]


def test_grad_of_grad_raises_clear_error():
  (q, k, v, *_), _ = _inputs(0, 1, 8, 8, 1, 1, 16, jnp.float32)
  loss = lambda q: jnp.sum(flash_attention(q, k, v) ** 2)
  with pytest.raises(NotImplementedError, match='first-order'):
    jax.grad(lambda q: jnp.sum(jax.grad(loss)(q)))(q)


# -------------------------------------------------------------------------- TPU kernel (fast)

@pytest.mark.parametrize('case', [
    dict(q_len=7, kv_len=129, heads=4, kv_heads=2, head_dim=128, causal=True),
    dict(q_len=130, kv_len=300, heads=2, kv_heads=1, head_dim=64, dtype=jnp.bfloat16,
         segments='random', sliding_window=100, logit_soft_cap=3.0),
], ids=['causal-gqa', 'all-masks-mqa-bf16'])
def test_tpu_kernel_interpret_matches_reference(case):
  errs, _ = check(backend='tpu', interpret=True, **case)
  print(case, errs)


# ------------------------------------------------------------------------- block-skip geometry

def _geometry_configs():
  rng = np.random.default_rng(0)
  for _ in range(300):
    q_len, kv_len = (int(x) for x in rng.integers(1, 80, 2))
    bq, bk = (int(x) for x in rng.choice([8, 16, 32], 2))
    causal = bool(rng.integers(2))
    window = None if rng.integers(3) == 0 else int(rng.integers(1, 40))
    yield q_len, kv_len, bq, bk, causal, window


def _numpy_mask(q_len, kv_len, causal, window):
  delta = np.arange(q_len)[:, None] + kv_len - q_len - np.arange(kv_len)[None, :]
  mask = np.ones((q_len, kv_len), bool)
  if causal:
    mask &= delta >= 0
  if window is not None:
    mask &= (delta >= 0) & (delta < window)
  return mask


def test_numpy_mask_matches_reference_mask():
  for causal, window in [(True, None), (False, 5), (True, 3)]:
    np.testing.assert_array_equal(
        _numpy_mask(13, 29, causal, window),
        np.asarray(attention_mask(13, 29, causal=causal, sliding_window=window))[0])


def _check_block_range(block_range, any_vis, all_vis, tight, where):
  """`(lo, full_lo, full_hi, hi)` of one block against the other side's blocks: every block with a
  visible pair is inside `[lo, hi)` (exactly those when the lengths are block multiples), and
  every block in `[full_lo, full_hi)` is visible to every pair."""
  lo, flo, fhi, hi = (int(x) for x in block_range)
  assert lo <= flo <= fhi <= hi, where
  for j, (some, every) in enumerate(zip(any_vis, all_vis)):
    inside = lo <= j < hi
    assert inside or not some, (where, j)
    assert not (flo <= j < fhi) or every, (where, j)
    if tight:
      assert inside == some, (where, j)


def test_block_ranges_cover_every_visible_pair_and_full_blocks_need_no_mask():
  """Brute force: skipped blocks hold no visible pair; 'full' blocks are entirely visible."""
  for q_len, kv_len, bq, bk, causal, window in _geometry_configs():
    cfg = common.AttentionConfig(q_len=q_len, kv_len=kv_len, block_q=bq, block_k=bk,
                                 causal=causal, sliding_window=window, logit_soft_cap=None,
                                 sm_scale=1.0, has_segments=False)
    vis = np.zeros((cfg.q_len_padded, cfg.kv_len_padded), bool)
    vis[:q_len, :kv_len] = _numpy_mask(q_len, kv_len, causal, window)
    # The kernels' own mask agrees with the reference mask on real rows.
    mine = common.visible(cfg, np.arange(cfg.q_len_padded)[:, None],
                          np.arange(cfg.kv_len_padded)[None, :])
    mine = np.ones_like(vis) if mine is None else np.broadcast_to(np.asarray(mine), vis.shape)
    np.testing.assert_array_equal(mine[:q_len], vis[:q_len])
    nq, nk = cfg.q_len_padded // bq, cfg.kv_len_padded // bk
    blocks = vis.reshape(nq, bq, nk, bk)
    any_vis, all_vis = blocks.any(axis=(1, 3)), np.zeros((nq, nk), bool)
    for i, j in itertools.product(range(nq), range(nk)):
      rows = min(bq, q_len - i * bq)
      all_vis[i, j] = blocks[i, :rows, j, :].all()
    tight = q_len % bq == 0 and kv_len % bk == 0
    seg = dataclasses.replace(cfg, has_segments=True)   # every visited block is masked
    for i in range(nq):
      lo, flo, fhi, hi = (int(x) for x in common.kv_block_range(seg, i * bq, bq, bk))
      assert flo == fhi == hi and (lo, hi) == tuple(
          int(x) for x in common.kv_block_range(cfg, i * bq, bq, bk))[::3]
    for i in range(nq):
      _check_block_range(common.kv_block_range(cfg, i * bq, bq, bk), any_vis[i], all_vis[i],
                         tight, (cfg, 'q block', i))
    for j in range(nk):
      _check_block_range(common.q_block_range(cfg, j * bk, bk, bq), any_vis[:, j], all_vis[:, j],
                         tight, (cfg, 'kv block', j))


def test_causal_block_skipping_visits_about_half_the_blocks():
  cfg = common.AttentionConfig(q_len=512, kv_len=512, block_q=64, block_k=64, causal=True,
                               sliding_window=None, logit_soft_cap=None, sm_scale=1.0,
                               has_segments=False)
  visited = unmasked = 0
  for i in range(8):
    lo, flo, fhi, hi = (int(x) for x in common.kv_block_range(cfg, i * 64, 64, 64))
    visited += hi - lo
    unmasked += fhi - flo
  assert visited == 36 and unmasked == 28   # 8*9/2 blocks visited, only the 8 diagonal masked


# ------------------------------------------------------------------------------- bad inputs

def _bad(**overrides):
  q = jnp.zeros((1, 8, 4, 32))
  k = jnp.zeros((1, 8, 2, 32))
  args = dict(q=q, k=k, v=k)
  args.update(overrides)
  q, k, v = args.pop('q'), args.pop('k'), args.pop('v')
  return lambda: flash_attention(q, k, v, **args)


@pytest.mark.parametrize('overrides, match', [
    (dict(q=jnp.zeros((8, 4, 32))), 'q must have rank 4'),
    (dict(k=jnp.zeros((1, 8, 2, 16)), v=jnp.zeros((1, 8, 2, 16))), 'head_dim'),
    (dict(k=jnp.zeros((1, 8, 3, 32)), v=jnp.zeros((1, 8, 3, 32))), 'num_heads'),
    (dict(v=jnp.zeros((1, 9, 2, 32))), 'k and v'),
    (dict(q=jnp.zeros((1, 8, 4, 32), jnp.int32)), 'dtype'),
    (dict(q=np.zeros((1, 8, 4, 32), np.float64)), 'q dtype must be one of float32'),
    (dict(q=jnp.zeros((1, 8, 4, 32), jnp.bfloat16)), 'share one dtype'),
    (dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32)), 'kv_segment_ids is missing'),
    (dict(q_segment_ids=jnp.zeros((1, 7), jnp.int32), kv_segment_ids=jnp.zeros((1, 8), jnp.int32)),
     'q_segment_ids must have shape'),
    (dict(q_segment_ids=jnp.zeros((1, 8)), kv_segment_ids=jnp.zeros((1, 8))),
     'q_segment_ids must be an integer'),
    (dict(sliding_window=0), 'sliding_window'),
    (dict(sliding_window=2.5), 'sliding_window'),
    (dict(logit_soft_cap=-1.0), 'logit_soft_cap'),
    (dict(block_q=24), 'block_q must be a power of two'),
    (dict(block_k=8), 'block_k must be a power of two'),
    (dict(backend='tpu', block_q=12), 'block_q must be a positive multiple of 8'),
    (dict(backend='tpu', block_k=64, k=jnp.zeros((1, 300, 2, 32)), v=jnp.zeros((1, 300, 2, 32))),
     'block_k=64 must be a multiple of 128'),
    (dict(backend='cuda'), 'backend'),
    (dict(num_warps=0), 'num_warps must be a positive int'),
    (dict(backend='tpu', num_stages=3), 'num_stages is a Triton'),
])
def test_bad_inputs_raise_value_error(overrides, match):
  with pytest.raises(ValueError, match=match):
    _bad(**overrides)()


def test_default_backend_and_interpret(monkeypatch):
  """The platform's own kernel natively; on CPU the GPU (Triton-style) kernel, interpreted."""
  from pallas_kernels import flash_attention as fa
  seen = {}
  real = fa._flash_attention

  def spy(q, k, v, q_ids, kv_ids, cfg, launch):
    seen['cfg'], seen['launch'] = cfg, launch
    return real(q, k, v, q_ids, kv_ids, cfg, launch)

  monkeypatch.setattr(fa, '_flash_attention', spy)
  jax.eval_shape(lambda q: fa.flash_attention(q, q, q), jnp.zeros((1, 4, 1, 16)))
  platform = jax.default_backend()
  backend = 'tpu' if platform == 'tpu' else 'gpu'
  assert seen['launch'].backend == backend and seen['launch'].interpret == (platform != backend)
  if backend == 'gpu':
    assert (seen['cfg'].block_q, seen['cfg'].block_k) == (16, 16)   # clamped to the short sequence


# ------------------------------------------------------------------------------ slow sweep

_SWEEP = [dict(q_len=tq, kv_len=tk, heads=h, kv_heads=kh, head_dim=d, dtype=dt, causal=c,
               sliding_window=w, logit_soft_cap=cap, segments=seg, block_q=32, block_k=32)
          for (tq, tk), (h, kh), d, dt, c, w, cap, seg in [
              ((1, 1), (2, 2), 32, jnp.float32, False, None, None, None),
              ((1, 1), (2, 1), 32, jnp.float32, True, None, None, None),
              ((7, 7), (4, 2), 32, jnp.bfloat16, True, 3, None, None),
              ((129, 7), (2, 2), 64, jnp.float32, True, None, None, None),
              ((300, 300), (4, 1), 64, jnp.float16, True, None, None, 'packed'),
              ((300, 129), (2, 2), 32, jnp.float32, False, 50, 10.0, 'random'),
              ((129, 300), (3, 1), 96, jnp.bfloat16, True, 64, 30.0, None),
              ((64, 64), (2, 2), 256, jnp.float32, False, None, 1.0, None),
          ]]


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['gpu', 'tpu'])
@pytest.mark.parametrize('case', _SWEEP)
def test_sweep_matches_float64_reference(case, backend):
  if backend == 'tpu':
    case = dict(case, block_q=128, block_k=128)
  # The GPU kernel runs natively where there is a GPU (interpret=None), interpreted elsewhere.
  print(case, check(backend=backend, interpret=True if backend == 'tpu' else None, **case))
