"""The samplers' unrolled Threefry: JAX's hash bit for bit, the documented counter layout, and
the laws of the numbers made from it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32 as jax_threefry_2x32

from jax_spec.decoding import prng


@pytest.mark.parametrize('seed', [0, 123456789])
def test_threefry_equals_jax(seed):
  rng = np.random.default_rng(seed)
  keypair = jnp.asarray(rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32))
  count = jnp.asarray(rng.integers(0, 2**32, 64, dtype=np.uint64).astype(np.uint32))
  y1, y2 = jax.jit(prng.threefry_2x32)((keypair[0], keypair[1]), count[:32], count[32:])
  np.testing.assert_array_equal(np.concatenate([y1, y2]), jax_threefry_2x32(keypair, count))


@pytest.mark.parametrize('shape', [(1,), (7,), (3, 259), (2, 3, 4)])
def test_bits_are_the_first_words_of_blocks_i_0(shape):
  """Word i is JAX's Threefry of the block (i, 0), first word; the floats are JAX's maps of it."""
  key = jax.random.key(11)
  size = int(np.prod(shape))
  blocks = jnp.concatenate([jnp.arange(size, dtype=jnp.uint32), jnp.zeros(size, jnp.uint32)])
  expected = np.asarray(jax_threefry_2x32(jax.random.key_data(key), blocks)[:size]).reshape(shape)
  np.testing.assert_array_equal(jax.jit(prng.random_bits, static_argnums=1)(key, shape), expected)
  floats = (expected >> 9).astype(np.float64) / 2**23   # 23-bit mantissa in [0, 1)
  np.testing.assert_array_equal(prng.uniform(key, shape), floats.astype(np.float32))
  tiny = np.finfo(np.float32).tiny
  np.testing.assert_allclose(prng.exponential(key, shape), -np.log(np.maximum(floats, tiny)),
                             rtol=1e-6)
  np.testing.assert_allclose(prng.gumbel(key, shape), -np.log(-np.log(np.maximum(floats, tiny))),
                             rtol=1e-5, atol=1e-6)
  # A legacy uint32[2] key gives the typed key's words.
  np.testing.assert_array_equal(prng.random_bits(jax.random.PRNGKey(11), shape), expected)


def test_uniform_exponential_and_gumbel_laws():
  u = np.asarray(prng.uniform(jax.random.key(0), (200_000,), minval=0.25))
  assert u.min() >= 0.25 and u.max() < 1.0
  assert abs(u.mean() - 0.625) < 0.002
  g = np.asarray(prng.gumbel(jax.random.key(1), (200_000,)))
  assert abs(g.mean() - np.euler_gamma) < 0.01 and abs(g.var() - np.pi**2 / 6) < 0.03
  e = np.asarray(prng.exponential(jax.random.key(2), (200_000,)))
  assert e.min() > 0 and abs(e.mean() - 1) < 0.01 and abs(e.var() - 1) < 0.03
  # Distinct keys, distinct streams.
  assert not np.array_equal(prng.random_bits(jax.random.key(0), (8,)),
                            prng.random_bits(jax.random.key(1), (8,)))


def test_other_key_implementations_go_through_jax_random():
  key = jax.random.key(3, impl='rbg')
  np.testing.assert_array_equal(prng.random_bits(key, (5,)), jax.random.bits(key, (5,)))


def test_bad_key():
  with pytest.raises(ValueError, match='key must be'):
    prng.random_bits(jnp.zeros((3,), jnp.uint32), (4,))
