"""RealNVP normalizing flow (Dinh et al. 2017) as used by RLE (Li et al., ICCV 2021).

The flow maps a standard normal `z` to `x = f(z)` through affine coupling layers with alternating
binary masks. Each coupling keeps the masked coordinates and transforms the others by
`x * exp(s(x_masked)) + t(x_masked)`; `s` ends in tanh so one layer scales by at most e, which keeps
the flow stable when it is trained jointly with the regressor. The Jacobian of each coupling is
triangular, so the log-determinant is exact: the sum of `s` over the transformed coordinates.

Defaults follow the RLE paper: 6 couplings on 2-D inputs, two hidden layers of 64 with LeakyReLU.
The last layer of every scale/shift net starts at zero (`zero_init=True`), so the untrained flow is
the identity and RLE starts as the plain Laplace/Gaussian likelihood.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class _MLP(nnx.Module):
  """dim -> hidden -> hidden -> dim with LeakyReLU, optionally ending in tanh (the scale net)."""

  def __init__(self, dim: int, hidden: int, *, final_tanh: bool, zero_init: bool, rngs: nnx.Rngs):
    last_init = nnx.initializers.zeros_init() if zero_init else nnx.initializers.lecun_normal()
    self.l1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.l3 = nnx.Linear(hidden, dim, kernel_init=last_init, rngs=rngs)
    self.final_tanh = final_tanh

  def __call__(self, x):
    h = jax.nn.leaky_relu(self.l1(x))
    h = jax.nn.leaky_relu(self.l2(h))
    y = self.l3(h)
    return jnp.tanh(y) if self.final_tanh else y


class Coupling(nnx.Module):
  """One affine coupling: coordinates where mask == 1 pass through and condition the others."""

  def __init__(self, dim: int, hidden: int, *, zero_init: bool, rngs: nnx.Rngs):
    self.scale = _MLP(dim, hidden, final_tanh=True, zero_init=zero_init, rngs=rngs)
    self.shift = _MLP(dim, hidden, final_tanh=False, zero_init=zero_init, rngs=rngs)

  def _st(self, x_kept, mask):
    return self.scale(x_kept) * (1.0 - mask), self.shift(x_kept) * (1.0 - mask)

  def forward(self, z, mask):
    """z -> x, log|det dx/dz| per row."""
    z_kept = z * mask
    s, t = self._st(z_kept, mask)
    x = z_kept + (1.0 - mask) * (z * jnp.exp(s) + t)
    return x, jnp.sum(s, axis=-1)

  def inverse(self, x, mask):
    """x -> z, log|det dz/dx| per row."""
    x_kept = x * mask
    s, t = self._st(x_kept, mask)
    z = x_kept + (1.0 - mask) * (x - t) * jnp.exp(-s)
    return z, -jnp.sum(s, axis=-1)


def alternating_masks(num_layers: int, dim: int) -> np.ndarray:
  """[num_layers, dim] masks [1,0,1,0..], [0,1,0,1..], ... (RLE's [[0,1],[1,0]] * 3 for dim 2)."""
  base = (np.arange(dim) % 2).astype(np.float32)
  return np.stack([base if i % 2 == 0 else 1.0 - base for i in range(num_layers)])


class RealNVP(nnx.Module):
  """RealNVP on `dim`-D vectors, standard-normal prior. Always runs in fp32.

  All methods act on the last axis and broadcast over leading axes.
  """

  def __init__(self, dim: int = 2, num_layers: int = 6, hidden: int = 64, *, rngs: nnx.Rngs,
               zero_init: bool = True):
    if dim < 2:
      raise ValueError(f'dim must be >= 2 for a coupling flow, got {dim}')
    if num_layers < 1:
      raise ValueError(f'num_layers must be >= 1, got {num_layers}')
    if hidden < 1:
      raise ValueError(f'hidden must be >= 1, got {hidden}')
    self.dim = dim
    self.masks = tuple(tuple(float(v) for v in m) for m in alternating_masks(num_layers, dim))

    # One stacked set of coupling weights [num_layers, ...], applied with lax.scan: compiles one
    # coupling instead of num_layers (XLA compile time dominates small CPU runs).
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return Coupling(dim, hidden, zero_init=zero_init, rngs=rngs)

    self.couplings = make(rngs)
    self.num_layers = num_layers

  def _scan(self, x, inverse: bool):
    graphdef, state = nnx.split(self.couplings)
    masks = jnp.asarray(self.masks, jnp.float32)

    def body(carry, layer_in):
      h, log_det = carry
      layer_state, mask = layer_in
      layer = nnx.merge(graphdef, layer_state)
      h, ld = layer.inverse(h, mask) if inverse else layer.forward(h, mask)
      return (h, log_det + ld), None

    init = (x, jnp.zeros(x.shape[:-1], jnp.float32))
    (out, log_det), _ = jax.lax.scan(body, init, (state, masks), reverse=inverse)
    return out, log_det

  def _check(self, x, name):
    if x.shape[-1:] != (self.dim,):
      raise ValueError(f'{name} must have last axis {self.dim}, got shape {x.shape}')
    return jnp.asarray(x, jnp.float32)

  def forward(self, z):
    """Generative direction z -> x. Returns (x, log|det dx/dz|)."""
    return self._scan(self._check(z, 'z'), inverse=False)

  def inverse(self, x):
    """Normalizing direction x -> z. Returns (z, log|det dz/dx|)."""
    return self._scan(self._check(x, 'x'), inverse=True)

  def log_prob(self, x):
    """log density of x under the flow: log N(f^-1(x); 0, I) + log|det d f^-1 / dx|."""
    z, log_det = self.inverse(x)
    log_prior = -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * self.dim * math.log(2 * math.pi)
    return log_prior + log_det

  def sample(self, key: jax.Array, num: int):
    """`num` samples [num, dim] from the flow."""
    if num < 1:
      raise ValueError(f'num must be >= 1, got {num}')
    z = jax.random.normal(key, (num, self.dim), jnp.float32)
    return self.forward(z)[0]

  def __call__(self, x):
    return self.log_prob(x)
