"""The fused block-decode CPU kernel (jax_spec/kernels/block_decode.cc) against a float64 block."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import decoding
from jax_spec import models
from jax_spec.kernels import block_decode
from jax_spec.kernels import rows_matmul
from jax_spec.models import layers


def _block(seed=0, **overrides):
  cfg = models.get_config('tiny', **overrides)
  return cfg, layers.Block(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


def _randomize(block, seed):
  """Non-trivial norm scales and biases (the defaults are ones and zeros)."""
  rng = np.random.default_rng(seed)
  for path, leaf in nnx.iter_graph(block):
    if isinstance(leaf, nnx.Param) and path[-1] in ('scale', 'bias'):
      leaf.value = jnp.asarray(rng.uniform(0.5, 1.5, leaf.value.shape) if path[-1] == 'scale'
                               else rng.standard_normal(leaf.value.shape) * 0.3, jnp.float32)


def _inputs(cfg, batch, num_new, slots, lengths, seed):
  rng = np.random.default_rng(seed)
  kv = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
  x = jnp.asarray(rng.standard_normal((batch, num_new, cfg.d_model)), jnp.float32)
  cache = layers.LayerCache(jnp.asarray(rng.standard_normal(kv), jnp.float32),
                            jnp.asarray(rng.standard_normal(kv), jnp.float32))
  lengths = jnp.asarray(lengths, jnp.int32)
  rope = layers.rotary(lengths[:, None] + jnp.arange(num_new), cfg.head_dim, cfg.rope_theta)
  return x, cache, lengths, rope


def _bf16(a):
  return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


def _reference(block, cfg, x, rope, cache, lengths, mask, bf16_products=False):
  """The block in float64 numpy: (x, k cache, v cache). bf16_products: every matmul's input and
  weight rounded to bf16 first (pair tiles)."""
  f64 = lambda a: np.asarray(a, np.float64)
  eps = cfg.norm_eps
  rms = lambda a, s: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + eps) * f64(s)
  r = _bf16 if bf16_products else f64
  dense = lambda d, a, axes=1: (np.tensordot(r(a), r(d.kernel[...]), axes=axes)
                                + (0 if d.bias is None else f64(d.bias[...])))
  cos, sin = f64(rope.cos), f64(rope.sin)          # [B, T, 1, E]
  def rot(a):
    a1, a2 = np.split(a, 2, -1)
    return a * cos + np.concatenate([a2, a1], -1) * sin
  attn, mlp = block.attn, block.mlp
  x = f64(x)
  h = rms(x, block.attn_norm.scale[...])
  q, k, v = dense(attn.q, h), dense(attn.k, h), dense(attn.v, h)
  if attn.q_norm is not None:
    q, k = rms(q, attn.q_norm.scale[...]), rms(k, attn.k_norm.scale[...])
  q, k = rot(q), rot(k)
  kc, vc = f64(cache.k).copy(), f64(cache.v).copy()
  batch, num_new, _ = x.shape
  slots, group = kc.shape[1], cfg.num_heads // cfg.num_kv_heads
  o = np.zeros(q.shape)
  for b in range(batch):
    n = int(lengths[b])
    for t in range(num_new):
      if n + t < slots:
        kc[b, n + t], vc[b, n + t] = k[b, t], v[b, t]
    for t in range(num_new):
      seen = [j for j in range(min(n, slots))] + [n + u for u in range(num_new)
                                                   if mask[b, t, u] and n + u < slots]
      if not seen:
        continue
      for hd in range(cfg.num_heads):
        s = kc[b, seen, hd // group] @ q[b, t, hd] / np.sqrt(cfg.head_dim)
        p = np.exp(s - s.max())
        o[b, t, hd] = p @ vc[b, seen, hd // group] / p.sum()
  x = x + dense(attn.out, o, axes=2)
  g, u = dense(mlp.gate, rms(x, block.mlp_norm.scale[...])), dense(mlp.up, rms(x, block.mlp_norm.scale[...]))
  return x + dense(mlp.down, g / (1 + np.exp(-g)) * u), kc, vc


def _decode(block):
  return jax.jit(lambda x, rope, cache, lengths, mask: block.decode(x, rope, cache, lengths, mask))


def test_kernel_is_used_on_cpu_and_not_when_switched_off(monkeypatch):
  assert block_decode.enabled()    # a silent fallback would leave every test below vacuous
  cfg, block = _block()
  x, cache, lengths, rope = _inputs(cfg, 1, 2, 8, [3], 0)
  mask = jnp.ones((1, 2, 2), bool)
  lowered = lambda: _decode(block).lower(x, rope, cache, lengths, mask).as_text()
  assert 'jax_spec_block_decode' in lowered()
  monkeypatch.setenv('JAX_SPEC_BLOCK_DECODE', '0')
  assert 'jax_spec_block_decode' not in lowered()


@pytest.mark.parametrize('overrides, batch, num_new, slots, lengths', [
    ({}, 2, 5, 12, [3, 9]),                                          # a write past the cache end
    ({'qkv_bias': True, 'out_bias': True, 'qk_norm': True}, 1, 3, 20, [17]),   # Qwen-style
    ({'num_heads': 6, 'num_kv_heads': 3, 'd_model': 36, 'd_ff': 37}, 3, 1, 9, [0, 4, 8]),  # E = 6
    ({'num_kv_heads': 4}, 2, 7, 16, [0, 5]),                          # MHA, a prefill-like chunk
    ({}, 1, 33, 48, [6]),        # many query vectors, each scanning up to its last seen key
])
def test_matches_a_float64_block(overrides, batch, num_new, slots, lengths):
  cfg, block = _block(seed=len(overrides), **overrides)
  _randomize(block, batch)
  x, cache, lengths, rope = _inputs(cfg, batch, num_new, slots, lengths, num_new)
  rng = np.random.default_rng(slots)
  # A tree mask with holes (the diagonal kept), and in the last row a query that sees nothing.
  mask = np.tril(rng.random((batch, num_new, num_new)) < 0.6) | np.eye(num_new, dtype=bool)
  y, new = _decode(block)(x, rope, cache, lengths, jnp.asarray(mask))
  want_y, want_k, want_v = _reference(block, cfg, x, rope, cache, np.asarray(lengths), mask)
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(new.k, np.float64), want_k, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(np.asarray(new.v, np.float64), want_v, rtol=2e-5, atol=2e-5)
  # ... and the XLA ops it replaces (the path of other platforms) agree with both.
  y_ops, _ = jax.jit(lambda *a: block.decode_ops(*a))(x, rope, cache, lengths, jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(y_ops, np.float64), want_y, rtol=2e-5, atol=2e-5)


def test_a_query_that_sees_nothing_gets_zero_attention():
  cfg, block = _block()
  x, cache, lengths, rope = _inputs(cfg, 1, 2, 8, [0], 1)
  mask = jnp.asarray([[[True, False], [False, False]]])
  y, _ = _decode(block)(x, rope, cache, lengths, mask)
  want_y, _, _ = _reference(block, cfg, x, rope, cache, np.asarray(lengths), np.asarray(mask))
  np.testing.assert_allclose(np.asarray(y, np.float64), want_y, rtol=2e-5, atol=2e-5)


def test_pair_tiles_match_a_float64_block_of_bf16_products():
  """With pair tiles (`decode_packs(bf16_products=True)`) the kernel's block is float64's with
  every matmul's input and weight rounded to bf16, and misses the unrounded block by far more."""
  cfg, block = _block(seed=6, d_model=64, d_ff=96)
  _randomize(block, 2)
  batch, num_new, slots, lengths = 2, 5, 24, [3, 11]
  x, cache, lengths, rope = _inputs(cfg, batch, num_new, slots, lengths, 4)
  mask = np.tril(np.ones((batch, num_new, num_new), bool))
  packs = models.decode_packs(block, bf16_products=True)
  assert [t.ndim for t in packs.values()] == [4, 4, 4, 4]   # q|k|v, out, gate|up, down

  def run(*a):
    with rows_matmul.packed(packs):
      return block.decode(*a)
  y, new = jax.jit(run)(x, rope, cache, lengths, jnp.asarray(mask))
  want_y, want_k, _ = _reference(block, cfg, x, rope, cache, np.asarray(lengths), mask,
                                 bf16_products=True)
  error = np.max(np.abs(np.asarray(y, np.float64) - want_y))
  assert error < 2e-5, error
  np.testing.assert_allclose(np.asarray(new.k, np.float64), want_k, rtol=2e-5, atol=2e-5)
  fp32_y, _, _ = _reference(block, cfg, x, rope, cache, np.asarray(lengths), mask)
  assert np.max(np.abs(np.asarray(y, np.float64) - fp32_y)) > 10 * error


@pytest.mark.parametrize('num_new', [6, 21])
def test_a_chain_verify_equals_one_token_steps_bitwise(num_new):
  """T rows of a causal chain in one call give bitwise the outputs and cache entries of T
  successive one-row calls: plain decoding and a verify step agree exactly (with 21 rows, the
  query vectors of early rows stop before the chain's later keys)."""
  cfg, block = _block(seed=3)
  _randomize(block, 3)
  slots = 40
  x, cache, lengths, rope = _inputs(cfg, 2, num_new, slots, [4, 11], 5)
  decode = _decode(block)
  y_all, all_cache = decode(x, rope, cache, lengths, jnp.tril(jnp.ones((2, num_new, num_new), bool)))
  step_cache, ys = cache, []
  for t in range(num_new):
    step_rope = layers.Rotary(rope.cos[:, t:t + 1], rope.sin[:, t:t + 1])
    y_t, step_cache = decode(x[:, t:t + 1], step_rope, step_cache, lengths + t,
                             jnp.ones((2, 1, 1), bool))
    ys.append(y_t)
  np.testing.assert_array_equal(np.asarray(y_all), np.asarray(jnp.concatenate(ys, axis=1)))
  np.testing.assert_array_equal(np.asarray(all_cache.k), np.asarray(step_cache.k))
  np.testing.assert_array_equal(np.asarray(all_cache.v), np.asarray(step_cache.v))


def test_other_platforms_lower_the_xla_ops():
  cfg, block = _block()
  x, cache, lengths, rope = _inputs(cfg, 1, 2, 8, [3], 0)
  exported = jax.export.export(_decode(block), platforms=['cuda'])(
      x, rope, cache, lengths, jnp.ones((1, 2, 2), bool))
  assert 'jax_spec_block_decode' not in exported.mlir_module()


@pytest.mark.parametrize('kind, bf16_products', [('eagle', False), ('mtp', False),
                                                 ('eagle', True)])
def test_feature_step_matches_a_float64_module_and_read(kind, bf16_products, monkeypatch):
  """`MTPModule.decode_read` (one `feature_decode` call on CPU: combine, block, final norm, LM
  head) against float64: the module's block by `_reference`, the rest in numpy. bf16_products:
  with pair tiles, every matmul's input and weight rounded to bf16 in the reference."""
  # The tiny combine and LM head are below the size `decode_packs` packs outside blocks.
  monkeypatch.setattr(rows_matmul, 'MIN_WEIGHT_SIZE', 0)
  cfg = models.get_config('tiny', eagle_layers=1, eagle_d_ff=24, mtp_depth=1)
  model = models.Transformer(cfg, rngs=nnx.Rngs(4))
  _randomize(model, 4)
  module = model.eagle if kind == 'eagle' else model.mtp[0]
  mcfg = cfg.eagle_config if kind == 'eagle' else cfg
  batch, num_new, slots = 2, 3, 10
  x, cache, lengths, rope = _inputs(mcfg, batch, num_new, slots, [2, 6], 7)
  rng = np.random.default_rng(8)
  e = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
  mask = jnp.asarray(np.tril(np.ones((batch, num_new, num_new), bool)))
  packs = models.decode_packs(model, bf16_products=True) if bf16_products else {}

  def read(*a):
    with rows_matmul.packed(packs):
      return module.decode_read(model, *a)
  run = jax.jit(read)
  assert 'jax_spec_feature_decode' in run.lower(x, e, rope, (cache,), lengths, mask).as_text()
  exported = jax.export.export(run, platforms=['cuda'])(x, e, rope, (cache,), lengths, mask)
  assert 'jax_spec_feature_decode' not in exported.mlir_module()   # other platforms: the ops
  feature, logits, (new,) = run(x, e, rope, (cache,), lengths, mask)

  f64 = lambda a: np.asarray(a, np.float64)
  r = _bf16 if bf16_products else f64
  rms = lambda a, s: a / np.sqrt(np.mean(a * a, -1, keepdims=True) + cfg.norm_eps) * f64(s)
  combined = np.concatenate([rms(f64(x), module.hidden_norm.scale[...]),
                             rms(f64(e), module.embed_norm.scale[...])], -1)
  combined = r(combined) @ r(module.proj.kernel[...])
  y, want_k, want_v = _reference(module.block, mcfg, combined, rope, cache, np.asarray(lengths),
                                 np.asarray(mask), bf16_products=bf16_products)
  want_feature = rms(y, model.final_norm.scale[...])
  np.testing.assert_allclose(f64(feature), want_feature, rtol=2e-5, atol=2e-5)
  want_logits = r(want_feature) @ r(model.shared_head_DV())
  np.testing.assert_allclose(f64(logits), want_logits, rtol=2e-5, atol=5e-5)
  if bf16_products:   # ... and not the fp32 read of the same feature
    assert np.max(np.abs(f64(logits) - want_feature @ f64(model.shared_head_DV()))) > 1e-3
  np.testing.assert_allclose(f64(new.k), want_k, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(f64(new.v), want_v, rtol=2e-5, atol=2e-5)


def test_feature_step_with_bf16_tiles_is_bitwise_its_fp32_copy():
  """A drafter prepared with `drafter_dtype=bfloat16` runs its kernel step on bf16 tiles; the
  numbers are bitwise those of fp32 tiles of the same rounded weights (packed on the fly), and
  not those of the unrounded module (so the rounding is in effect)."""
  cfg = models.get_config('tiny', eagle_layers=1, eagle_d_ff=24, mtp_depth=0)
  model = models.Transformer(cfg, rngs=nnx.Rngs(5))
  _randomize(model, 5)
  prepared = decoding.prepare(model, drafter_dtype=jnp.bfloat16)
  rounded = nnx.merge(prepared.trunk.graphdef, prepared.trunk.state)
  batch, num_new, slots = 2, 3, 10
  x, cache, lengths, rope = _inputs(cfg.eagle_config, batch, num_new, slots, [2, 6], 9)
  e = jnp.asarray(np.random.default_rng(10).standard_normal(x.shape), jnp.float32)
  mask = jnp.asarray(np.tril(np.ones((batch, num_new, num_new), bool)))

  def step(m, packs):
    def fn(*a):
      with rows_matmul.packed(packs):
        return m.eagle.decode_read(m, *a)
    return jax.jit(fn)(x, e, rope, (cache,), lengths, mask)

  packs = models.decode_packs(rounded)
  assert {t.dtype for t in packs.values()} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
  with_bf16 = jax.tree.leaves(step(rounded, packs))
  for got, want in zip(with_bf16, jax.tree.leaves(step(rounded, {})), strict=True):
    np.testing.assert_array_equal(got, want)
  unrounded = jax.tree.leaves(step(model, {}))
  assert not np.array_equal(with_bf16[1], unrounded[1])   # the logits
