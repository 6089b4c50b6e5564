"""The samplers' random numbers: Threefry-2x32 with its rounds unrolled.

JAX lowers its `threefry2x32` primitive on CPU as a rolled `while` loop (5 iterations of 4
rounds, a few small ops each), a loop of small thunks per call inside a decode loop. Written out
here, XLA fuses the 20 rounds into one elementwise loop. Same hash: `threefry_2x32` equals
`jax.extend.random.threefry_2x32` bit for bit (tests/test_prng.py). `random_bits` takes word i
from the first output of the block (i, 0), one hash per word: JAX's layout (the two output words
of blocks (i, i + n/2) concatenated) costs XLA:CPU a select per element that keeps the fused loop
from vectorizing, 2.3x slower for the same words. Keys of other implementations
(`jax.random.key(..., impl='rbg')`) go through `jax.random`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x, d: int):
  return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry_2x32(keypair, x1, x2):
  """Threefry-2x32 (20 rounds) of the counter words (x1, x2) under keypair = (k1, k2), uint32."""
  k1, k2 = keypair
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for rot in _ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = _rotate_left(x2, rot) ^ x1
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _threefry_key_data(key):
  """(k1, k2) of a Threefry key (typed or a legacy uint32[2]), or None for another PRNG."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if str(jax.random.key_impl(key)) != 'threefry2x32':
      return None
    key = jax.random.key_data(key)
  if key.shape != (2,) or key.dtype != jnp.uint32:
    raise ValueError(f'key must be a scalar jax.random key or a uint32[2] PRNGKey, got '
                     f'{key.dtype}{list(key.shape)}')
  return key[0], key[1]


def random_bits(key, shape) -> jax.Array:
  """uint32 words of `shape`: word i (row-major) is the first output word of the block (i, 0)."""
  keypair = _threefry_key_data(key)
  if keypair is None:
    return jax.random.bits(key, shape, jnp.uint32)
  size = int(np.prod(shape))
  if size >= 2**32:
    raise ValueError(f'shape must have fewer than 2**32 elements, got {shape}')
  counts = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
  return threefry_2x32(keypair, counts, jnp.zeros_like(counts))[0]


def uniform(key, shape, minval: float = 0.0) -> jax.Array:
  """fp32 uniforms in [minval, 1) from the top 23 bits of each word (`jax.random.uniform`'s map)."""
  bits = random_bits(key, shape)
  floats = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000),
                                        jnp.float32) - 1.0
  return jnp.maximum(jnp.float32(minval), floats * (1.0 - minval) + minval)


def exponential(key, shape) -> jax.Array:
  """Standard exponential noise, -log(u) for u uniform in [tiny, 1) (positive: at most ~87)."""
  return -jnp.log(uniform(key, shape, minval=float(jnp.finfo(jnp.float32).tiny)))


def gumbel(key, shape) -> jax.Array:
  """Standard Gumbel noise, -log(-log(u)) for u uniform in [tiny, 1) (`jax.random.gumbel`'s map)."""
  return -jnp.log(exponential(key, shape))
