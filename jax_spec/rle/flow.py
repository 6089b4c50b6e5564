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

  def __init__(self, mask: np.ndarray, hidden: int, *, zero_init: bool, rngs: nnx.Rngs):
    dim = mask.shape[0]
    self.mask_values = tuple(float(v) for v in mask)  # static: part of the graph, not trained
    self.scale = _MLP(dim, hidden, final_tanh=True, zero_init=zero_init, rngs=rngs)
    self.shift = _MLP(dim, hidden, final_tanh=False, zero_init=zero_init, rngs=rngs)

  @property
  def mask(self):
    return jnp.asarray(self.mask_values, jnp.float32)

  def _st(self, x_kept):
    inv = 1.0 - self.mask
    return self.scale(x_kept) * inv, self.shift(x_kept) * inv

  def forward(self, z):
    """z -> x, log|det dx/dz| per row."""
    m = self.mask
    z_kept = z * m
    s, t = self._st(z_kept)
    x = z_kept + (1.0 - m) * (z * jnp.exp(s) + t)
    return x, jnp.sum(s, axis=-1)

  def inverse(self, x):
    """x -> z, log|det dz/dx| per row."""
    m = self.mask
    x_kept = x * m
    s, t = self._st(x_kept)
    z = x_kept + (1.0 - m) * (x - t) * jnp.exp(-s)
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
    masks = alternating_masks(num_layers, dim)
    self.layers = nnx.List([Coupling(m, hidden, zero_init=zero_init, rngs=rngs) for m in masks])

  def _check(self, x, name):
    if x.shape[-1:] != (self.dim,):
      raise ValueError(f'{name} must have last axis {self.dim}, got shape {x.shape}')
    return jnp.asarray(x, jnp.float32)

  def forward(self, z):
    """Generative direction z -> x. Returns (x, log|det dx/dz|)."""
    x = self._check(z, 'z')
    log_det = jnp.zeros(x.shape[:-1], jnp.float32)
    for layer in self.layers:
      x, ld = layer.forward(x)
      log_det = log_det + ld
    return x, log_det

  def inverse(self, x):
    """Normalizing direction x -> z. Returns (z, log|det dz/dx|)."""
    z = self._check(x, 'x')
    log_det = jnp.zeros(z.shape[:-1], jnp.float32)
    for layer in reversed(self.layers):
      z, ld = layer.inverse(z)
      log_det = log_det + ld
    return z, log_det

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
