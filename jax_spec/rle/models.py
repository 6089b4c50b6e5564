"""Small ResNet-style backbone and the regression / heatmap heads behind one interface.

`Regressor(loss=...)` = backbone + head. Every head maps the backbone's stride-8 feature map to a
`Prediction` (mu in normalized coordinates, optional sigma, a per-point score for AP ranking) and
owns its loss, so experiments swap `--loss` without touching the training loop:

  l1, l2   FC head predicting mu; score 1 (no confidence).
  nll      FC head predicting mu and sigma = sigmoid(.); Gaussian NLL; score = mean(1 - sigma).
  rle      as nll, plus a RealNVP flow on each point's residual; RLE loss (`rle_form`, default
           'two_nll', see losses.py); score = mean(1 - sigma).
  heatmap  deconv head to Gaussian heatmaps at 1/4 of the input resolution (MSE); decoded by a
           soft-argmax; score = peak heatmap value. Needs spatial targets (keypoints, not gaze).

The backbone runs in the policy's compute dtype; heads cast features to fp32, so mu, sigma, the flow
and every loss are fp32 under every policy.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jax_spec import precision as precision_lib
from jax_spec.rle import losses as losses_lib
from jax_spec.rle.flow import RealNVP

LOSSES = ('l1', 'l2', 'nll', 'rle', 'heatmap')


class Prediction(NamedTuple):
  mu: jax.Array                        # [B, K, D] normalized coordinates, fp32
  sigma: jax.Array | None = None       # [B, K, D] in (0, 1), fp32 (nll, rle)
  score: jax.Array | None = None       # [B, K] confidence used to rank predictions for AP
  heatmaps: jax.Array | None = None    # [B, h, w, K] (heatmap head)


def _groups(channels: int) -> int:
  return max(1, min(8, channels // 4))


class BasicBlock(nnx.Module):
  """ResNet basic block (two 3x3 convs) with GroupNorm (no batch statistics to carry around)."""

  def __init__(self, cin: int, cout: int, stride: int, *, dtype, rngs: nnx.Rngs):
    conv = lambda i, o, k, s: nnx.Conv(i, o, (k, k), strides=s, use_bias=False, dtype=dtype,
                                       rngs=rngs)
    self.conv1 = conv(cin, cout, 3, stride)
    self.norm1 = nnx.GroupNorm(cout, num_groups=_groups(cout), dtype=dtype, rngs=rngs)
    self.conv2 = conv(cout, cout, 3, 1)
    self.norm2 = nnx.GroupNorm(cout, num_groups=_groups(cout), dtype=dtype, rngs=rngs,
                               scale_init=nnx.initializers.zeros_init())  # block starts as identity
    self.proj = conv(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

  def __call__(self, x):
    h = jax.nn.relu(self.norm1(self.conv1(x)))
    h = self.norm2(self.conv2(h))
    return jax.nn.relu(h + (self.proj(x) if self.proj is not None else x))


class ResNetBackbone(nnx.Module):
  """3x3 stride-2 stem with widths[0] channels, then one stride-2 basic block per further width.

  The default (16, 32, 64) has output stride 8 (64x64 input -> 8x8x64 features) and costs about
  15 MFLOPs per 64x64 image: small enough to train in minutes on two CPU cores.
  """

  def __init__(self, in_channels: int, widths=(16, 32, 64), *, policy='fp32', rngs: nnx.Rngs):
    if len(widths) < 1 or any(w < 1 for w in widths):
      raise ValueError(f'widths must be a non-empty sequence of channel counts, got {widths}')
    dtype = precision_lib.get_policy(policy).compute_dtype
    self.dtype = dtype
    self.stem = nnx.Conv(in_channels, widths[0], (3, 3), strides=2, use_bias=False, dtype=dtype,
                         rngs=rngs)
    self.stem_norm = nnx.GroupNorm(widths[0], num_groups=_groups(widths[0]), dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([BasicBlock(cin, cout, 2, dtype=dtype, rngs=rngs)
                            for cin, cout in zip(widths[:-1], widths[1:])])
    self.out_channels = widths[-1]
    self.stride = 2 ** len(widths)

  def __call__(self, x_BHWC):
    h = jax.nn.relu(self.stem_norm(self.stem(x_BHWC.astype(self.dtype))))
    for block in self.blocks:
      h = block(h)
    return h


class RegressionHead(nnx.Module):
  """Flatten -> FC -> (mu, sigma). mu starts near 0 (the image centre), sigma near 1/2."""

  def __init__(self, in_shape, num_points: int, dims: int, *, loss: str, hidden: int = 128,
               q: str = 'laplace', rle_form: str = 'two_nll', rngs: nnx.Rngs):
    h, w, c = in_shape
    self.loss_name, self.num_points, self.dims, self.q = loss, num_points, dims, q
    self.rle_form = rle_form
    self.fc = nnx.Linear(h * w * c, hidden, rngs=rngs)
    small = nnx.initializers.variance_scaling(1e-4, 'fan_avg', 'uniform')  # xavier, gain 0.01
    self.fc_mu = nnx.Linear(hidden, num_points * dims, kernel_init=small, rngs=rngs)
    self.fc_sigma = (nnx.Linear(hidden, num_points * dims, kernel_init=small, rngs=rngs)
                     if loss in ('nll', 'rle') else None)
    self.flow = RealNVP(dims, rngs=rngs) if loss == 'rle' else None

  def __call__(self, feat_BHWC):
    b = feat_BHWC.shape[0]
    h = jax.nn.relu(self.fc(feat_BHWC.astype(jnp.float32).reshape(b, -1)))
    mu = self.fc_mu(h).reshape(b, self.num_points, self.dims)
    if self.fc_sigma is None:
      return Prediction(mu=mu, score=jnp.ones((b, self.num_points), jnp.float32))
    sigma = jax.nn.sigmoid(self.fc_sigma(h).reshape(b, self.num_points, self.dims))
    return Prediction(mu=mu, sigma=sigma, score=jnp.mean(1.0 - sigma, -1))

  def loss(self, pred: Prediction, target_BKD, weight_BK=None):
    if self.loss_name == 'l1':
      return losses_lib.l1_loss(pred.mu, target_BKD, weight_BK)
    if self.loss_name == 'l2':
      return losses_lib.l2_loss(pred.mu, target_BKD, weight_BK)
    if self.loss_name == 'nll':
      return losses_lib.gaussian_nll_loss(pred.mu, pred.sigma, target_BKD, weight_BK)
    return losses_lib.rle_loss(self.flow, pred.mu, pred.sigma, target_BKD, weight_BK, q=self.q,
                               form=self.rle_form)


class HeatmapHead(nnx.Module):
  """2x nearest upsampling + 3x3 conv + 1x1 conv: heatmaps at 1/4 of the input resolution.

  (Upsample + conv rather than SimpleBaseline's transposed conv: same receptive field, about 3x
  cheaper on XLA:CPU.)
  """

  def __init__(self, in_channels: int, num_points: int, *, hidden: int = 32, radius: int = 2,
               sigma_cells: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
    self.up = nnx.Conv(in_channels, hidden, (3, 3), dtype=dtype, rngs=rngs)
    self.norm = nnx.GroupNorm(hidden, num_groups=_groups(hidden), dtype=dtype, rngs=rngs)
    self.out = nnx.Conv(hidden, num_points, (1, 1), dtype=dtype, rngs=rngs)
    self.radius, self.sigma_cells = radius, sigma_cells

  def __call__(self, feat_BHWC):
    up = jnp.repeat(jnp.repeat(feat_BHWC, 2, axis=1), 2, axis=2)
    h = jax.nn.relu(self.norm(self.up(up)))
    hm = self.out(h).astype(jnp.float32)
    mu, peak = losses_lib.soft_argmax(hm, radius=self.radius)
    return Prediction(mu=mu, score=jnp.clip(peak, 0.0, 1.0), heatmaps=hm)

  def loss(self, pred: Prediction, target_BKD, weight_BK=None):
    return losses_lib.heatmap_mse_loss(pred.heatmaps, target_BKD, weight_BK, self.sigma_cells)


class Regressor(nnx.Module):
  """Backbone + head. `model(images) -> Prediction`, `model.loss(pred, target, weight)`."""

  def __init__(self, *, loss: str, num_points: int, dims: int = 2, image_shape=(64, 64, 3),
               widths=(16, 32, 64), hidden: int = 128, q: str = 'laplace',
               rle_form: str = 'two_nll', policy='fp32', rngs: nnx.Rngs):
    if loss not in LOSSES:
      raise ValueError(f'loss must be one of {LOSSES}, got {loss!r}')
    if num_points < 1 or dims < 1:
      raise ValueError(f'num_points and dims must be >= 1, got {num_points}, {dims}')
    if len(image_shape) != 3:
      raise ValueError(f'image_shape must be (H, W, C), got {image_shape}')
    if q not in losses_lib.Q_DISTRIBUTIONS:
      raise ValueError(f'q must be one of {losses_lib.Q_DISTRIBUTIONS}, got {q!r}')
    if rle_form not in losses_lib.RLE_FORMS:
      raise ValueError(f'rle_form must be one of {losses_lib.RLE_FORMS}, got {rle_form!r}')
    h, w, c = image_shape
    self.backbone = ResNetBackbone(c, widths, policy=policy, rngs=rngs)
    s = self.backbone.stride
    if h % s or w % s:
      raise ValueError(f'image_shape {image_shape} must be divisible by the backbone stride {s}')
    feat_shape = (h // s, w // s, self.backbone.out_channels)
    if loss == 'heatmap':
      if dims != 2:
        raise ValueError(f'the heatmap head needs 2-D points, got dims={dims}')
      self.head = HeatmapHead(feat_shape[-1], num_points, dtype=self.backbone.dtype, rngs=rngs)
    else:
      self.head = RegressionHead(feat_shape, num_points, dims, loss=loss, hidden=hidden, q=q,
                                 rle_form=rle_form, rngs=rngs)
    self.loss_name = loss

  def __call__(self, images_BHWC) -> Prediction:
    return self.head(self.backbone(images_BHWC))

  def loss(self, pred: Prediction, target_BKD, weight_BK=None):
    return self.head.loss(pred, target_BKD, weight_BK)
