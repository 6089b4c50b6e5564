"""The samplers' unrolled Threefry: JAX's hash and counter layout bit for bit, and its laws."""
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
def test_bits_and_uniforms_equal_jax_non_partitionable(shape):
  key = jax.random.key(11)
  with jax.threefry_partitionable(False):
    np.testing.assert_array_equal(prng.random_bits(key, shape), jax.random.bits(key, shape))
    np.testing.assert_array_equal(prng.uniform(key, shape), jax.random.uniform(key, shape))
    np.testing.assert_allclose(prng.gumbel(key, shape), jax.random.gumbel(key, shape), rtol=1e-6)
  # A legacy uint32[2] key gives the typed key's words.
  np.testing.assert_array_equal(prng.random_bits(jax.random.PRNGKey(11), shape),
                                prng.random_bits(key, shape))


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
