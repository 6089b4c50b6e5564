"""RLE loss against a hand computation, baselines, heatmap decoding, heads under precision policies."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec.rle import losses
from jax_spec.rle.flow import RealNVP
from jax_spec.rle.models import Regressor


def _normal_logpdf(x):
  return -0.5 * np.sum(x * x, -1) - math.log(2 * math.pi)


@pytest.mark.parametrize('q,form', [('laplace', 'paper'), ('gaussian', 'paper'),
                                    ('laplace', 'two_nll'), ('gaussian', 'two_nll'),
                                    ('laplace', 'official')])
def test_rle_loss_matches_hand_computation(q, form):
  rng = np.random.default_rng(0)
  mu = rng.normal(size=(3, 4, 2)).astype(np.float32) * 0.1
  gt = rng.normal(size=(3, 4, 2)).astype(np.float32) * 0.1
  sigma = rng.uniform(0.05, 0.9, size=(3, 4, 2)).astype(np.float32)
  w = (rng.uniform(size=(3, 4)) > 0.3).astype(np.float32)
  flow = RealNVP(rngs=nnx.Rngs(0))            # zero-initialised: the identity, G = N(0, I)
  got = float(losses.rle_loss(flow, mu, sigma, gt, w, q=q, form=form))
  m, g, s = (a.astype(np.float64) for a in (mu, gt, sigma))
  bar = (g - m) / s
  neg_log_q = (np.sum(np.abs(bar) + math.log(2), -1) if q == 'laplace'
               else np.sum(0.5 * bar**2 + 0.5 * math.log(2 * math.pi), -1))
  log_sigma = np.sum(np.log(s), -1)
  if form == 'paper':
    per_point = neg_log_q - _normal_logpdf(bar) + log_sigma
  elif form == 'two_nll':
    per_point = neg_log_q + log_sigma - _normal_logpdf(bar) + log_sigma
  else:  # the official code: nf_loss = log sigma - log_phi ([B, K, 2]) + logQ, summed over D
    nf_loss = np.log(s) - _normal_logpdf(bar)[..., None]
    log_q = np.log(s * math.sqrt(2 * math.pi)) + np.abs(g - m) / (math.sqrt(2) * s)
    per_point = np.sum(nf_loss + log_q, -1)
  expected = np.sum(per_point * w) / np.sum(w)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_rle_loss_uses_flow_log_prob():
  # with a non-trivial flow, the flow term is exactly -flow.log_prob(mu_bar) per point
  flow = RealNVP(rngs=nnx.Rngs(1), zero_init=False)
  mu = jnp.full((1, 1, 2), 0.2)
  gt = jnp.full((1, 1, 2), 0.5)
  sigma = jnp.full((1, 1, 2), 0.25)
  bar = (gt - mu) / sigma
  expected = (np.sum(np.abs(bar) + math.log(2)) - float(flow.log_prob(bar)[0, 0])
              + 2 * math.log(0.25))
  np.testing.assert_allclose(float(losses.rle_loss(flow, mu, sigma, gt, form='paper')), expected,
                             rtol=1e-5)


def test_rle_gradients_finite_at_extreme_sigma():
  flow = RealNVP(rngs=nnx.Rngs(2), zero_init=False)
  gt = jnp.array([[[0.3, -0.2], [0.0, 0.0]]])
  graphdef, flow_params = nnx.split(flow)
  mu = jnp.array([[[0.25, -0.1], [0.0, 1e-3]]])
  logits_L = jnp.array([-16.0, -8.0, 8.0, 16.0])   # sigma ~1e-7 ... 1 - 1e-7

  def f(mu, logits, fp, form):
    return losses.rle_loss(nnx.merge(graphdef, fp), mu, jax.nn.sigmoid(logits), gt, form=form)

  @jax.jit   # one compile for every form and sigma
  def all_grads(logits_L):
    def one(logit):
      logits = jnp.full((1, 2, 2), logit)
      return {form: jax.value_and_grad(f, argnums=(0, 1, 2))(mu, logits, flow_params, form)
              for form in losses.RLE_FORMS}
    return jax.vmap(one)(logits_L)

  for form, (val_L, grads) in all_grads(logits_L).items():
    assert np.all(np.isfinite(np.asarray(val_L))), form
    for leaf in jax.tree.leaves(grads):
      assert np.all(np.isfinite(np.asarray(leaf))), form


def test_baseline_losses_by_hand():
  mu = jnp.array([[[0.0, 0.0], [1.0, 1.0]]])
  gt = jnp.array([[[0.5, -1.0], [1.0, 3.0]]])
  w = jnp.array([[1.0, 0.0]])
  np.testing.assert_allclose(losses.l1_loss(mu, gt, w), 1.5)
  np.testing.assert_allclose(losses.l2_loss(mu, gt, w), 1.25)
  np.testing.assert_allclose(losses.l1_loss(mu, gt), (1.5 + 2.0) / 2)
  sigma = jnp.full((1, 2, 2), 0.5)
  expected = 2 * math.log(0.5) + 0.5 * (1.0 + 4.0) + math.log(2 * math.pi)
  np.testing.assert_allclose(losses.gaussian_nll_loss(mu, sigma, gt, w), expected, rtol=1e-6)
  with pytest.raises(ValueError, match='target'):
    losses.l1_loss(mu, gt[:, :1])
  with pytest.raises(ValueError, match='q must be'):
    losses.rle_loss(RealNVP(rngs=nnx.Rngs(0)), mu, sigma, gt, q='cauchy')
  with pytest.raises(ValueError, match='form must be'):
    losses.rle_loss(RealNVP(rngs=nnx.Rngs(0)), mu, sigma, gt, form='eq9')
  with pytest.raises(ValueError, match="q must be 'laplace'"):
    losses.rle_loss(RealNVP(rngs=nnx.Rngs(0)), mu, sigma, gt, q='gaussian', form='official')


def test_heatmap_targets_and_soft_argmax_decoding():
  rng = np.random.default_rng(0)
  pts = jnp.asarray(rng.uniform(-0.35, 0.35, (4, 3, 2)), jnp.float32)   # normalized (x, y)
  hm = losses.gaussian_heatmaps(pts, 16, 16, sigma_cells=1.0)
  assert hm.shape == (4, 16, 16, 3)
  np.testing.assert_allclose(jnp.max(hm, (1, 2)), 1.0, atol=0.25)
  decoded, peak = losses.soft_argmax(hm)
  # sub-cell accurate: well below one heatmap cell (1/16)
  assert float(jnp.max(jnp.abs(decoded - pts))) < 0.1 / 16
  assert peak.shape == (4, 3)
  # the MSE loss is zero exactly at the targets and positive elsewhere
  assert float(losses.heatmap_mse_loss(hm, pts)) < 1e-10
  assert float(losses.heatmap_mse_loss(hm, pts + 0.1)) > 0.1


def test_every_head_runs_and_is_fp32_under_bf16():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)), jnp.float32)
  gt = jnp.zeros((2, 5, 2))
  for loss in ('l1', 'nll', 'rle', 'heatmap'):   # l2 shares l1's head
    model = Regressor(loss=loss, num_points=5, image_shape=(16, 16, 3), widths=(8,),
                      policy='bf16', rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def run(state):
      m = nnx.merge(graphdef, state)
      p = m(x)
      return p, m.loss(p, gt)

    # Without XLA's optimisations: this checks shapes and dtypes, and compiles 4 models.
    pred, value = jax.jit(run).lower(state).compile(
        {'xla_backend_optimization_level': 0})(state)
    assert pred.mu.shape == (2, 5, 2) and pred.mu.dtype == jnp.float32
    assert pred.score.shape == (2, 5)
    if loss in ('nll', 'rle'):
      assert pred.sigma.dtype == jnp.float32
      assert np.all((np.asarray(pred.sigma) > 0) & (np.asarray(pred.sigma) < 1))
    assert value.dtype == jnp.float32 and np.isfinite(float(value))
  with pytest.raises(ValueError, match='loss must be'):
    Regressor(loss='huber', num_points=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='divisible'):
    Regressor(loss='l1', num_points=5, image_shape=(30, 30, 3), widths=(8, 16), rngs=nnx.Rngs(0))
