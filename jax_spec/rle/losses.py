"""Regression losses: RLE and the baselines (L1, L2, Gaussian NLL, heatmap MSE).

Shapes: predictions and targets are `[B, K, D]` (K points of D coordinates, D = 2 for keypoints and
for gaze (pitch, yaw)); `weight_BK` is 1 for labelled points and 0 otherwise. Every loss returns the
weighted mean over labelled points of the per-point loss (summed over D), in fp32.

RLE (Li et al. 2021, eq. 9): with the regressor's mean mu and scale sigma (from a sigmoid) and the
normalized residual mu_bar = (mu_gt - mu) / sigma, `form` selects the per-point loss:

  'paper'     L = -log Q(mu_bar) - log G_phi(mu_bar) + sum_d log sigma_d      (the paper's eq. 9)
  'official'  L = sum_d [2 log sigma_d + log sqrt(2 pi) + |mu_bar_d| / sqrt(2)] - D log G_phi(mu_bar)
  'two_nll'   L = [-log Q(mu_bar) + sum_d log sigma_d] + [-log G_phi(mu_bar) + sum_d log sigma_d]
              (the default)

Q is a fixed unit Laplace (default) or standard Gaussian per coordinate, G_phi a RealNVP flow on the
point's D-D residual. 'official' is what github.com/Jeff-sjtu/res-loglikelihood-regression computes
(`RegressFlow.forward`: nf_loss = log sigma - log_phi, shape [B, K, D] with log_phi broadcast over
D; `RLELoss.logQ` = log(sigma / amp) + |r| / (sqrt(2) sigma), amp = 1 / sqrt(2 pi)), summed over D:
log sigma is counted twice per coordinate and the flow term once per coordinate (D times per
point); its Q is fixed (the `q` argument must be 'laplace'). 'two_nll' is the same structure with
normalized Q and the flow counted once: the sum of two proper negative log-likelihoods of the
residual r (Q scaled by sigma, and the flow scaled by sigma).

Why the extra log sigma matters: in 'paper', -log G_phi(r / sigma) + log sigma is unchanged when
sigma grows by a factor c and the flow widens by c, while -log Q(r / sigma) falls, so a flexible flow
absorbs the scale and sigma drifts up instead of tracking the error (measured: learned sigma of
noisy vs clean labels differs by ~1.3x instead of the true ~25x). In 'official' and 'two_nll' the
Q term carries its own log sigma, a proper Laplace/Gaussian likelihood of r in sigma, which pins
sigma to the residual scale. Gradients flow through mu_bar into mu, sigma and the flow alike
(nothing is detached), as in the official code.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jax_spec.rle.flow import RealNVP

Q_DISTRIBUTIONS = ('laplace', 'gaussian')
RLE_FORMS = ('paper', 'official', 'two_nll')


def _check(pred_BKD, target_BKD, weight_BK):
  if pred_BKD.ndim != 3:
    raise ValueError(f'pred must be [B, K, D], got shape {pred_BKD.shape}')
  if target_BKD.shape != pred_BKD.shape:
    raise ValueError(f'target must have shape {pred_BKD.shape}, got {target_BKD.shape}')
  if weight_BK is None:
    weight_BK = jnp.ones(pred_BKD.shape[:2], jnp.float32)
  if weight_BK.shape != pred_BKD.shape[:2]:
    raise ValueError(f'weight must have shape {pred_BKD.shape[:2]}, got {weight_BK.shape}')
  return (jnp.asarray(pred_BKD, jnp.float32), jnp.asarray(target_BKD, jnp.float32),
          jnp.asarray(weight_BK, jnp.float32))


def weighted_mean(loss_BK, weight_BK):
  """Mean of the per-point loss over labelled points (0 when nothing is labelled)."""
  return jnp.sum(loss_BK * weight_BK) / jnp.maximum(jnp.sum(weight_BK), 1.0)


def l1_loss(mu_BKD, target_BKD, weight_BK=None):
  mu_BKD, target_BKD, weight_BK = _check(mu_BKD, target_BKD, weight_BK)
  return weighted_mean(jnp.sum(jnp.abs(target_BKD - mu_BKD), -1), weight_BK)


def l2_loss(mu_BKD, target_BKD, weight_BK=None):
  mu_BKD, target_BKD, weight_BK = _check(mu_BKD, target_BKD, weight_BK)
  return weighted_mean(jnp.sum(jnp.square(target_BKD - mu_BKD), -1), weight_BK)


def _check_sigma(sigma_BKD, mu_BKD):
  if sigma_BKD.shape != mu_BKD.shape:
    raise ValueError(f'sigma must have shape {mu_BKD.shape}, got {sigma_BKD.shape}')
  return jnp.asarray(sigma_BKD, jnp.float32)


def gaussian_nll_loss(mu_BKD, sigma_BKD, target_BKD, weight_BK=None):
  """Heteroscedastic Gaussian NLL: sum_d log sigma + (r / sigma)^2 / 2 + log(2 pi) / 2."""
  mu_BKD, target_BKD, weight_BK = _check(mu_BKD, target_BKD, weight_BK)
  sigma_BKD = _check_sigma(sigma_BKD, mu_BKD)
  bar = (target_BKD - mu_BKD) / sigma_BKD
  nll = jnp.log(sigma_BKD) + 0.5 * bar * bar + 0.5 * math.log(2 * math.pi)
  return weighted_mean(jnp.sum(nll, -1), weight_BK)


def neg_log_q(bar_BKD, q: str = 'laplace'):
  """-log Q(mu_bar) summed over D; Q is a unit Laplace or a standard Gaussian per coordinate."""
  if q == 'laplace':
    return jnp.sum(jnp.abs(bar_BKD) + math.log(2.0), -1)
  if q == 'gaussian':
    return jnp.sum(0.5 * bar_BKD * bar_BKD + 0.5 * math.log(2 * math.pi), -1)
  raise ValueError(f'q must be one of {Q_DISTRIBUTIONS}, got {q!r}')


def rle_per_point(flow: RealNVP, mu_BKD, sigma_BKD, target_BKD, q: str = 'laplace',
                  form: str = 'two_nll'):
  """Per-point RLE loss [B, K] (fp32); `form` as in the module docstring."""
  mu_BKD = jnp.asarray(mu_BKD, jnp.float32)
  sigma_BKD = jnp.asarray(sigma_BKD, jnp.float32)
  bar_BKD = (jnp.asarray(target_BKD, jnp.float32) - mu_BKD) / sigma_BKD
  log_sigma_BK = jnp.sum(jnp.log(sigma_BKD), -1)
  log_g_BK = flow.log_prob(bar_BKD)
  if form == 'paper':
    return neg_log_q(bar_BKD, q) - log_g_BK + log_sigma_BK
  if form == 'two_nll':
    return neg_log_q(bar_BKD, q) - log_g_BK + 2.0 * log_sigma_BK
  if form == 'official':
    d = bar_BKD.shape[-1]
    q_BK = jnp.sum(jnp.abs(bar_BKD) / math.sqrt(2.0) + 0.5 * math.log(2 * math.pi), -1)
    return q_BK + 2.0 * log_sigma_BK - d * log_g_BK
  raise ValueError(f'form must be one of {RLE_FORMS}, got {form!r}')


def rle_loss(flow: RealNVP, mu_BKD, sigma_BKD, target_BKD, weight_BK=None, *, q: str = 'laplace',
             form: str = 'two_nll'):
  """RLE loss (module docstring), weighted mean over labelled points."""
  mu_BKD, target_BKD, weight_BK = _check(mu_BKD, target_BKD, weight_BK)
  sigma_BKD = _check_sigma(sigma_BKD, mu_BKD)
  if q not in Q_DISTRIBUTIONS:
    raise ValueError(f'q must be one of {Q_DISTRIBUTIONS}, got {q!r}')
  if form not in RLE_FORMS:
    raise ValueError(f'form must be one of {RLE_FORMS}, got {form!r}')
  if form == 'official' and q != 'laplace':
    raise ValueError(f"form='official' has a fixed (Laplace-like) Q; q must be 'laplace', got {q!r}")
  if flow.dim != mu_BKD.shape[-1]:
    raise ValueError(f'flow.dim ({flow.dim}) must equal the point dimension {mu_BKD.shape[-1]}')
  return weighted_mean(rle_per_point(flow, mu_BKD, sigma_BKD, target_BKD, q, form), weight_BK)


# --- heatmaps ---------------------------------------------------------------------------------
# Coordinates everywhere are normalized: u = x / width - 1/2 in [-1/2, 1/2], with pixel i covering
# [i, i + 1) so its centre is at u = (i + 1/2) / size - 1/2. Heatmaps use the same convention.


def heatmap_grid(size: int):
  """Normalized coordinates of the centres of `size` heatmap cells."""
  return (jnp.arange(size, dtype=jnp.float32) + 0.5) / size - 0.5


def gaussian_heatmaps(points_BK2, height: int, width: int, sigma_cells: float = 1.0):
  """Gaussian target maps [B, height, width, K], peak 1, std `sigma_cells` heatmap cells."""
  if points_BK2.ndim != 3 or points_BK2.shape[-1] != 2:
    raise ValueError(f'points must be [B, K, 2], got shape {points_BK2.shape}')
  if sigma_cells <= 0:
    raise ValueError(f'sigma_cells must be > 0, got {sigma_cells}')
  points_BK2 = jnp.asarray(points_BK2, jnp.float32)
  # distance in heatmap cells
  dx_BKW = (heatmap_grid(width)[None, None, :] - points_BK2[..., 0:1]) * width
  dy_BKH = (heatmap_grid(height)[None, None, :] - points_BK2[..., 1:2]) * height
  g_BKHW = jnp.exp(-(dy_BKH[..., :, None] ** 2 + dx_BKW[..., None, :] ** 2) / (2 * sigma_cells**2))
  return jnp.transpose(g_BKHW, (0, 2, 3, 1))


def soft_argmax(heatmaps_BHWK, radius: int = 2):
  """Local soft-argmax: the centroid of relu(heatmap) in a (2r+1)^2 window around the argmax.

  A global softmax(beta * h) is pulled towards the map centre by the many near-zero cells; the
  local centroid recovers sub-cell positions of Gaussian blobs (sigma 1 cell) to ~0.03 cells clean
  and ~0.08 cells with noise 0.05, vs ~0.16 for the best global beta (measured on 16x16 maps).
  Returns (points [B, K, 2] normalized (x, y), peak value [B, K]).
  """
  if heatmaps_BHWK.ndim != 4:
    raise ValueError(f'heatmaps must be [B, H, W, K], got shape {heatmaps_BHWK.shape}')
  if radius < 0:
    raise ValueError(f'radius must be >= 0, got {radius}')
  b, h, w, k = heatmaps_BHWK.shape
  hm_BKN = jnp.transpose(jnp.asarray(heatmaps_BHWK, jnp.float32), (0, 3, 1, 2)).reshape(b, k, h * w)
  arg_BK = jnp.argmax(hm_BKN, -1)
  iy_BK, ix_BK = arg_BK // w, arg_BK % w
  rows_N, cols_N = jnp.arange(h * w) // w, jnp.arange(h * w) % w
  near_BKN = ((jnp.abs(rows_N - iy_BK[..., None]) <= radius)
              & (jnp.abs(cols_N - ix_BK[..., None]) <= radius))
  wts_BKN = jnp.where(near_BKN, jnp.maximum(hm_BKN, 0.0), 0.0)
  # all-negative window: fall back to the argmax cell itself
  wts_BKN = wts_BKN + 1e-12 * (jnp.arange(h * w) == arg_BK[..., None])
  wts_BKN = wts_BKN / jnp.sum(wts_BKN, -1, keepdims=True)
  x_BK = jnp.sum(wts_BKN * heatmap_grid(w)[cols_N], -1)
  y_BK = jnp.sum(wts_BKN * heatmap_grid(h)[rows_N], -1)
  return jnp.stack([x_BK, y_BK], -1), jnp.max(hm_BKN, -1)


def heatmap_mse_loss(heatmaps_BHWK, target_BK2, weight_BK=None, sigma_cells: float = 1.0):
  """MSE to Gaussian targets (SimpleBaseline): per point 1/2 * sum over cells (O(1) per point)."""
  b, h, w, k = heatmaps_BHWK.shape
  if target_BK2.shape != (b, k, 2):
    raise ValueError(f'target must have shape {(b, k, 2)}, got {target_BK2.shape}')
  if weight_BK is None:
    weight_BK = jnp.ones((b, k), jnp.float32)
  if weight_BK.shape != (b, k):
    raise ValueError(f'weight must have shape {(b, k)}, got {weight_BK.shape}')
  goal = gaussian_heatmaps(target_BK2, h, w, sigma_cells)
  per_point_BK = 0.5 * jnp.sum(jnp.square(jnp.asarray(heatmaps_BHWK, jnp.float32) - goal), (1, 2))
  return weighted_mean(per_point_BK, jnp.asarray(weight_BK, jnp.float32))
