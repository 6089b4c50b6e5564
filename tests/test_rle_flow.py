"""RealNVP: invertibility, exact log-determinant, normalization, and fitting a known density."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jax_spec.rle.flow import RealNVP, alternating_masks


def _random_flow(seed=0, dim=2, num_layers=6):
  # zero_init=False: a non-identity flow, so the checks below are not trivially true
  return RealNVP(dim, num_layers, 16, rngs=nnx.Rngs(seed), zero_init=False)


def test_masks_alternate():
  np.testing.assert_array_equal(alternating_masks(4, 2), [[0, 1], [1, 0], [0, 1], [1, 0]])


def test_default_flow_is_identity_and_paper_sized():
  flow = RealNVP(rngs=nnx.Rngs(0))
  assert flow.dim == 2 and flow.num_layers == 6
  assert flow.couplings.scale.l1.kernel.shape == (6, 2, 64)  # stacked over the 6 couplings
  x = jax.random.normal(jax.random.key(0), (7, 2))
  z, log_det = flow.inverse(x)
  np.testing.assert_allclose(z, x, atol=1e-6)
  np.testing.assert_allclose(log_det, 0.0, atol=1e-6)


def test_inverse_of_forward_is_identity(dim=3):  # odd dim: masks [1,0,1] / [0,1,0]
  graphdef, state = nnx.split(_random_flow(dim=dim))
  x = 2.0 * jax.random.normal(jax.random.key(1), (4, 5, dim))

  @jax.jit   # one compile instead of op-by-op dispatch
  def round_trips(state, x):
    flow = nnx.merge(graphdef, state)
    z, ld_inv = flow.inverse(x)
    x2, ld_fwd = flow.forward(z)
    return z, ld_inv, x2, ld_fwd, flow.inverse(flow.forward(x)[0])[0]

  z, ld_inv, x2, ld_fwd, z2 = round_trips(state, x)
  assert not np.allclose(z, x, atol=1e-2)  # the flow does something
  np.testing.assert_allclose(x2, x, atol=1e-5)
  np.testing.assert_allclose(ld_inv + ld_fwd, 0.0, atol=1e-5)
  np.testing.assert_allclose(z2, x, atol=1e-5)


def test_log_det_matches_jacobian():
  flow = _random_flow(seed=3)
  xs = np.asarray(jax.random.normal(jax.random.key(2), (6, 2)) * 1.5, np.float64)
  # the flow always runs in fp32 (by design); the determinant is taken in float64
  jac_inv = jax.vmap(jax.jacfwd(lambda v: flow.inverse(v)[0]))(jnp.asarray(xs, jnp.float32))
  jac_fwd = jax.vmap(jax.jacfwd(lambda v: flow.forward(v)[0]))(jnp.asarray(xs, jnp.float32))
  logdet = lambda j: np.log(np.abs(np.linalg.det(np.asarray(j, np.float64))))
  np.testing.assert_allclose(flow.inverse(xs)[1], logdet(jac_inv), atol=1e-4)
  np.testing.assert_allclose(flow.forward(xs)[1], logdet(jac_fwd), atol=1e-4)
  assert np.all(np.abs(logdet(jac_inv)) > 1e-3)  # non-trivial Jacobians


def test_density_integrates_to_one():
  flow = _random_flow(seed=4)
  n, lim = 1000, 30.0  # the random flow has heavy tails
  g = np.linspace(-lim, lim, n)
  xx, yy = np.meshgrid(g, g)
  grid = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
  dens = np.exp(np.asarray(flow.log_prob(grid), np.float64))
  total = dens.sum() * (g[1] - g[0]) ** 2
  assert abs(total - 1.0) < 0.01, total


def test_sample_shape_and_validation():
  flow = _random_flow()
  s = flow.sample(jax.random.key(0), 11)
  assert s.shape == (11, 2) and s.dtype == jnp.float32
  with pytest.raises(ValueError, match='last axis'):
    flow.log_prob(jnp.zeros((3, 3)))
  with pytest.raises(ValueError, match='num'):
    flow.sample(jax.random.key(0), 0)
  with pytest.raises(ValueError, match='dim'):
    RealNVP(1, rngs=nnx.Rngs(0))


def test_flow_fits_known_distribution():
  """Maximum likelihood on a correlated, shifted, skewed 2-D target: NLL drops well below the
  standard-normal NLL and the flow's samples match the data's mean and covariance."""
  rng = np.random.default_rng(0)
  n = 2048
  a = rng.normal(size=n)
  b = 0.8 * a + 0.3 * rng.normal(size=n) + 0.4 * a**2      # banana-shaped
  data = jnp.asarray(np.stack([a + 1.0, b - 0.5], -1), jnp.float32)
  flow = RealNVP(2, 6, 32, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(flow)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  def nll(p):
    return -jnp.mean(nnx.merge(graphdef, p).log_prob(data))

  @jax.jit
  def fit(p, o):
    def body(carry, _):
      p, o = carry
      u, o = tx.update(jax.grad(nll)(p), o, p)
      return (optax.apply_updates(p, u), o), None
    return jax.lax.scan(body, (p, o), None, length=300)[0][0]

  start = float(nll(params))
  params = fit(params, opt)
  end = float(nll(params))
  # the best Gaussian fit: its NLL is the Gaussian entropy of the data covariance
  cov = np.cov(np.asarray(data).T)
  gauss_nll = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * cov))
  assert end < start - 1.0, (start, end)
  assert end < gauss_nll, (end, gauss_nll)       # beats any Gaussian: it learned the curvature
  samples = np.asarray(nnx.merge(graphdef, params).sample(jax.random.key(1), 4096))
  np.testing.assert_allclose(samples.mean(0), np.asarray(data).mean(0), atol=0.12)
  np.testing.assert_allclose(np.cov(samples.T), cov, atol=0.2)
