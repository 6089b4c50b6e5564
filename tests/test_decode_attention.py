"""cache_attention (decode / tree verify): 'xla' and the Pallas kernel against float64 references.

The Pallas kernel runs with interpret=True on CPU; its Triton lowering is checked through
`jax.export` for CUDA.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_spec import attention
from jax_spec.attention import ChunkOptions, DecodeOptions, cache_attention, dot_product_attention
from pallas_kernels.decode_attention import combine_splits, decode_attention

_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _random_tree(rng, batch, num_new):
  """Ancestor masks of random trees (node t's parent is a random earlier node)."""
  mask = np.zeros((batch, num_new, num_new), bool)
  for b in range(batch):
    parent = [-1] + [int(rng.integers(0, t)) for t in range(1, num_new)]
    for t in range(num_new):
      a = t
      while a >= 0:
        mask[b, t, a] = True
        a = parent[a]
  return mask


def _inputs(seed, batch, num_new, cache_len, heads, kv_heads, head_dim, lengths, tree):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, num_new, heads, head_dim))
  k = rng.standard_normal((batch, cache_len, kv_heads, head_dim))
  v = rng.standard_normal((batch, cache_len, kv_heads, head_dim))
  if tree == 'chain':
    mask = np.broadcast_to(np.tril(np.ones((num_new, num_new), bool)), (batch, num_new, num_new))
  else:
    mask = _random_tree(rng, batch, num_new)
  return q, k, v, jnp.asarray(lengths, jnp.int32), jnp.asarray(mask)


def _numpy_reference(q, k, v, lengths, mask, sm_scale=None):
  """Per-row, per-head float64 loop straight from the documented semantics."""
  batch, num_new, heads, head_dim = q.shape
  cache_len, kv_heads = k.shape[1:3]
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  out = np.zeros(q.shape)
  for b in range(batch):
    n = int(lengths[b])
    for t in range(num_new):
      slots = [j for j in range(cache_len)
               if j < n or (0 <= j - n < num_new and mask[b, t, j - n])]
      for h in range(heads):
        kh = h // (heads // kv_heads)
        s = k[b, slots, kh] @ q[b, t, h] * scale
        p = np.exp(s - s.max())
        out[b, t, h] = p @ v[b, slots, kh] / p.sum()
  return out


# (batch, T, S, heads, kv_heads, head_dim, lengths, tree, pallas kwargs)
CASES = [
    (2, 5, 64, 4, 2, 32, [10, 40], 'chain', DecodeOptions(block_k=16, num_splits=2)),   # GQA
    (3, 7, 48, 3, 1, 16, [17, 0, 41], 'tree', DecodeOptions(block_k=16, num_splits=3)),  # MQA
    (2, 9, 80, 2, 2, 64, [74, 33], 'tree', DecodeOptions(block_k=16, block_m=16)),  # past the end
    (1, 1, 40, 8, 2, 24, [39], 'chain', None),                             # decode, S%16, D
]


@pytest.mark.parametrize('case', CASES, ids=[f'case{i}' for i in range(len(CASES))])
def test_cache_attention_matches_float64(case):
  batch, num_new, cache_len, heads, kv_heads, head_dim, lengths, tree, kw = case
  q, k, v, lens, mask = _inputs(len(lengths) + num_new, batch, num_new, cache_len, heads,
                                kv_heads, head_dim, lengths, tree)
  want = _numpy_reference(q, k, v, lens, np.asarray(mask))
  with jax.enable_x64(True):
    ref = cache_attention(q, k, v, cache_lengths_B=lens, tree_mask_BTT=mask,
                          implementation='reference')
  np.testing.assert_allclose(ref, want, atol=1e-12)
  q32, k32, v32 = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  for impl, options in (('xla', ChunkOptions(chunk=16)), ('xla', None), ('pallas', kw)):
    fn = jax.jit(lambda q, k, v, l, m: cache_attention(
        q, k, v, cache_lengths_B=l, tree_mask_BTT=m, implementation=impl, options=options))
    out = fn.lower(q32, k32, v32, lens, mask).compile(_FAST_COMPILE)(q32, k32, v32, lens, mask)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5, err_msg=f'{impl} {options}')


@pytest.mark.parametrize('dtype,tol', [(jnp.bfloat16, 3e-2), (jnp.float16, 5e-3)])
def test_cache_attention_low_precision(dtype, tol):
  q, k, v, lens, mask = _inputs(1, 2, 6, 64, 4, 1, 32, [5, 50], 'tree')
  want = _numpy_reference(*(np.asarray(jnp.asarray(x, dtype), np.float64) for x in (q, k, v)),
                          lens, np.asarray(mask))
  args = tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (lens, mask)
  for impl in ('xla', 'pallas'):
    fn = jax.jit(lambda q, k, v, l, m: cache_attention(
        q, k, v, cache_lengths_B=l, tree_mask_BTT=m, implementation=impl))
    out = fn.lower(*args).compile(_FAST_COMPILE)(*args)   # one compile, not op-by-op dispatch
    assert out.dtype == dtype
    err = np.max(np.abs(np.asarray(out, np.float64) - want)) / np.max(np.abs(want))
    assert err < tol, (impl, err)


def test_chain_mask_equals_causal_attention_over_prefix_plus_new():
  """A causal chain of T new tokens is exactly causal attention over the first len + T slots."""
  q, k, v, lens, mask = _inputs(2, 1, 6, 32, 2, 1, 16, [11], 'chain')
  q, k, v = (x.astype(np.float32) for x in (q, k, v))
  n = 11 + 6
  k2 = k.copy()
  k2[:, n:] = 1e4   # slots past len + T are ignored whatever they hold

  def run(q, k, k2, v):
    cached = lambda k: cache_attention(q, k, v, cache_lengths_B=lens, tree_mask_BTT=mask,
                                       implementation='xla')
    want = dot_product_attention(q, k[:, :n], v[:, :n], causal=True, implementation='reference')
    return cached(k), cached(k2), want

  out, out2, want = jax.jit(run).lower(q, k, k2, v).compile(_FAST_COMPILE)(q, k, k2, v)
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_allclose(out2, out, atol=1e-6)


def test_combine_splits_merges_partials_exactly():
  rng = np.random.default_rng(0)
  s = rng.standard_normal((1, 1, 12, 3))      # scores of 3 rows over 12 slots
  v = rng.standard_normal((1, 1, 12, 4))
  parts = []
  for lo, hi in ((0, 5), (5, 5), (5, 12)):   # the middle split is empty
    ss = s[..., lo:hi, :]
    m = ss.max(axis=2) if hi > lo else np.full((1, 1, 3), -np.inf)
    p = np.exp(ss - np.where(np.isfinite(m), m, 0)[:, :, None])
    parts.append((np.einsum('bksm,bksd->bkmd', p, v[..., lo:hi, :]), m, p.sum(axis=2)))
  o = combine_splits(*(jnp.asarray(np.stack(x, axis=2)) for x in zip(*parts)))
  p = np.exp(s - s.max(axis=2, keepdims=True))
  want = np.einsum('bksm,bksd->bkmd', p / p.sum(axis=2, keepdims=True), v)
  np.testing.assert_allclose(o, want, atol=1e-6)


@pytest.mark.parametrize('shape', [
    (2, 1, 1024, 8, 2, 128, jnp.bfloat16),   # single-token decode, GQA
    (1, 64, 4096, 32, 8, 128, jnp.bfloat16),  # tree verify, 64 candidates
    (2, 7, 200, 4, 4, 64, jnp.float16),       # odd T, S not a power of two
    (1, 128, 512, 4, 1, 80, jnp.float32),     # T = 128, MQA, head_dim padded
])
def test_triton_lowering_for_cuda(shape):
  batch, num_new, cache_len, heads, kv_heads, head_dim, dtype = shape
  fn = jax.jit(lambda q, k, v, l, m: decode_attention(
      q, k, v, cache_lengths_B=l, tree_mask_BTT=m, interpret=False))
  exported = jax.export.export(
      fn, platforms=['cuda'],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton')])(
          jax.ShapeDtypeStruct((batch, num_new, heads, head_dim), dtype),
          jax.ShapeDtypeStruct((batch, cache_len, kv_heads, head_dim), dtype),
          jax.ShapeDtypeStruct((batch, cache_len, kv_heads, head_dim), dtype),
          jax.ShapeDtypeStruct((batch,), jnp.int32),
          jax.ShapeDtypeStruct((batch, num_new, num_new), jnp.bool_))
  text = exported.mlir_module()
  assert text.count('__gpu$xla.gpu.triton') == 1
  assert exported.platforms == ('cuda',)


def test_default_implementation_is_the_kernel_on_gpu_only():
  on_gpu = jax.default_backend() == 'gpu'
  assert attention.default_cache_implementation() == ('pallas' if on_gpu else 'xla')


@pytest.mark.parametrize('kwargs,match', [
    (dict(q=np.zeros((2, 3, 4))), 'q_BTHE must have rank 4'),
    (dict(q=np.zeros((2, 129, 4, 16), np.float32)), 'T <= 128'),
    (dict(k=np.zeros((2, 32, 3, 16), np.float32), v=np.zeros((2, 32, 3, 16), np.float32)),
     'divisible'),
    (dict(v=np.zeros((2, 31, 2, 16), np.float32)), 'same shape'),
    (dict(k=np.zeros((2, 32, 2, 8), np.float32), v=np.zeros((2, 32, 2, 8), np.float32)),
     'head_dim'),
    (dict(cache_lengths_B=np.zeros((3,), np.int32)), 'cache_lengths_B'),
    (dict(cache_lengths_B=np.zeros((2,), np.float32)), 'cache_lengths_B'),
    (dict(tree_mask_BTT=np.ones((2, 3, 4), bool)), 'tree_mask_BTT'),
    (dict(implementation='cudnn'), 'implementation'),
    (dict(implementation='pallas', options=DecodeOptions(block_k=24)), 'block_k'),
    (dict(implementation='pallas', options=DecodeOptions(num_splits=0)), 'num_splits'),
    (dict(implementation='xla', options=DecodeOptions(block_k=16)), 'options must be ChunkOptions'),
    (dict(implementation='xla', options=ChunkOptions(chunk=0)), 'chunk must be a positive int'),
    (dict(implementation='reference', options=ChunkOptions()), 'no options'),
])
def test_bad_cache_inputs_raise(kwargs, match):
  args = dict(q=np.zeros((2, 3, 4, 16), np.float32), k=np.zeros((2, 32, 2, 16), np.float32),
              v=np.zeros((2, 32, 2, 16), np.float32), cache_lengths_B=np.zeros((2,), np.int32),
              tree_mask_BTT=np.ones((2, 3, 3), bool))
  args.update(kwargs)
  q, k, v = args.pop('q'), args.pop('k'), args.pop('v')
  with pytest.raises(ValueError, match=match):
    cache_attention(q, k, v, **args)


def test_on_tpu_pallas_runs_xla_and_decode_options_raise(monkeypatch):
  """The decode kernel is Triton-only: on TPU 'pallas' is the 'xla' path, options never switch."""
  q, k, v, lens, mask = _inputs(4, 1, 3, 32, 2, 1, 16, [9], 'tree')
  calls = []
  monkeypatch.setattr(attention.jax, 'default_backend', lambda: 'tpu')
  monkeypatch.setattr(attention, 'decode_attention', lambda *a, **kw: calls.append('kernel'))
  monkeypatch.setattr(attention, 'chunked_cache_attention',
                      lambda *a, **kw: calls.append(('xla', kw.get('chunk'))))
  args = dict(cache_lengths_B=lens, tree_mask_BTT=mask, implementation='pallas')
  cache_attention(q, k, v, **args)
  cache_attention(q, k, v, **args, options=ChunkOptions(chunk=16))
  with pytest.raises(ValueError, match="on TPU 'pallas' runs the 'xla' cache path"):
    cache_attention(q, k, v, **args, options=DecodeOptions(interpret=True))
  assert calls == [('xla', None), ('xla', 16)]
