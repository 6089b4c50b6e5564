"""Synthetic 2-D pose data: articulated stick figures rendered with numpy, deterministic by seed.

Each figure has the 14 LSP-style joints of `JOINT_NAMES`, a random pose (torso lean, facing front or
back, arm/leg joint angles), scale, translation and limb thickness. Right limbs, left limbs and
torso/head get different hues (jittered per figure) so left and right are identifiable, as in real
images. Nuisances: a random background gradient, clutter (grey segments and blobs behind the
figure), an occluding rectangle over part of the figure, and pixel noise.

Labels follow the COCO conventions: keypoints `[N, K, 2]` as (x, y) in pixels with pixel i covering
[i, i + 1); visibility 2 = visible, 1 = labelled but occluded (under the rectangle); `boxes`
`[N, 4]` = (x, y, w, h) of the keypoints' tight box, padded by the limb thickness.

All random numbers are drawn before drawing, so `draw_figure=False` renders exactly the same
background, clutter, occluder and noise without the figure (used by the tests).
"""
from __future__ import annotations

import dataclasses

import numpy as np

JOINT_NAMES = ('head', 'neck', 'r_shoulder', 'r_elbow', 'r_wrist', 'l_shoulder', 'l_elbow',
               'l_wrist', 'r_hip', 'r_knee', 'r_ankle', 'l_hip', 'l_knee', 'l_ankle')
NUM_JOINTS = len(JOINT_NAMES)
# (parent, child, part) with part 0 = torso/head, 1 = right, 2 = left
LIMBS = ((1, 0, 0), (1, 8, 0), (1, 11, 0), (8, 11, 0), (2, 5, 0),
         (2, 3, 1), (3, 4, 1), (8, 9, 1), (9, 10, 1),
         (5, 6, 2), (6, 7, 2), (11, 12, 2), (12, 13, 2))
PART_COLORS = np.array([[0.25, 0.45, 1.0], [1.0, 0.35, 0.2], [0.25, 0.95, 0.3]], np.float32)


@dataclasses.dataclass(frozen=True)
class StickFigureConfig:
  image_size: int = 64
  min_extent: float = 0.45     # figure's larger bbox side as a fraction of the image
  max_extent: float = 0.85
  min_thickness: float = 1.0   # limb half-width in pixels
  max_thickness: float = 2.2
  occlusion_prob: float = 0.5  # chance of one occluding rectangle
  max_clutter: int = 6         # 0..max_clutter grey segments and blobs behind the figure
  noise_std: float = 0.04      # pixel noise (images are in [0, 1])
  draw_figure: bool = True

  def __post_init__(self):
    if self.image_size < 16:
      raise ValueError(f'image_size must be >= 16, got {self.image_size}')
    if not 0 < self.min_extent <= self.max_extent <= 1:
      raise ValueError(f'need 0 < min_extent <= max_extent <= 1, got '
                       f'{self.min_extent}, {self.max_extent}')
    if not 0 < self.min_thickness <= self.max_thickness:
      raise ValueError(f'need 0 < min_thickness <= max_thickness, got '
                       f'{self.min_thickness}, {self.max_thickness}')
    if not 0 <= self.occlusion_prob <= 1:
      raise ValueError(f'occlusion_prob must be in [0, 1], got {self.occlusion_prob}')
    if self.max_clutter < 0 or self.noise_std < 0:
      raise ValueError('max_clutter and noise_std must be >= 0')


def _rot(angle):
  return np.stack([np.cos(angle), np.sin(angle)], -1)


def sample_poses(rng: np.random.Generator, num: int):
  """Joint positions [num, K, 2] in body units (torso length 1), y pointing down."""
  deg = np.pi / 180
  n = num
  down = np.pi / 2 + rng.normal(0, 20 * deg, n)            # torso direction neck -> pelvis
  facing = rng.choice([-1.0, 1.0], n)                        # front / back: mirrors left-right
  perp = _rot(down + facing * np.pi / 2)                     # towards the figure's right side
  kp = np.zeros((n, NUM_JOINTS, 2))
  neck = np.zeros((n, 2))
  pelvis = neck + _rot(down)
  kp[:, 1] = neck
  kp[:, 0] = neck + 0.4 * _rot(down + np.pi + rng.normal(0, 15 * deg, n))
  for side, (sho, elb, wri, hip, kne, ank) in ((1.0, (2, 3, 4, 8, 9, 10)),
                                               (-1.0, (5, 6, 7, 11, 12, 13))):
    kp[:, sho] = neck + side * 0.38 * perp
    upper = down + rng.uniform(-160, 160, n) * deg
    kp[:, elb] = kp[:, sho] + 0.5 * _rot(upper)
    kp[:, wri] = kp[:, elb] + 0.45 * _rot(upper + rng.uniform(-140, 140, n) * deg)
    kp[:, hip] = pelvis + side * 0.2 * perp
    thigh = down + rng.uniform(-50, 50, n) * deg
    kp[:, kne] = kp[:, hip] + 0.65 * _rot(thigh)
    kp[:, ank] = kp[:, kne] + 0.6 * _rot(thigh + rng.uniform(-100, 100, n) * deg)
  return kp


def _segment_coverage(px_P2, a_N2, b_N2, half_width_N):
  """Anti-aliased coverage [N, P] of segments a->b of the given half-width."""
  ab = b_N2 - a_N2
  denom = np.maximum(np.sum(ab * ab, -1), 1e-9)[:, None]
  t = np.clip(((px_P2[None, :, 0] - a_N2[:, None, 0]) * ab[:, None, 0]
               + (px_P2[None, :, 1] - a_N2[:, None, 1]) * ab[:, None, 1]) / denom, 0.0, 1.0)
  dx = px_P2[None, :, 0] - (a_N2[:, None, 0] + t * ab[:, None, 0])
  dy = px_P2[None, :, 1] - (a_N2[:, None, 1] + t * ab[:, None, 1])
  return np.clip(half_width_N[:, None] + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)


def _paint(img_N3P, cov_NP, color_N3):
  """Alpha-blends `color` over the channel-first image in place, with coverage as alpha."""
  for ch in range(3):
    plane = img_N3P[:, ch]
    plane += cov_NP * (color_N3[:, ch, None] - plane)
  return img_N3P


def render_stick_figures(num: int, seed: int, config: StickFigureConfig = StickFigureConfig()):
  """`num` images with labels. Returns a dict of numpy arrays:

  images [N, S, S, 3] uint8, keypoints [N, K, 2] float32 pixels, visibility [N, K] int32 (2/1),
  boxes [N, 4] float32 (x, y, w, h).
  """
  if num < 1:
    raise ValueError(f'num must be >= 1, got {num}')
  rng = np.random.default_rng(seed)
  s, n = config.image_size, num
  # ---- sample everything first ----
  kp = sample_poses(rng, n)
  lo, hi = kp.min(1), kp.max(1)
  extent = rng.uniform(config.min_extent, config.max_extent, n) * s
  scale = extent / np.max(hi - lo, -1)
  half_w = rng.uniform(config.min_thickness, config.max_thickness, n)
  kp = (kp - lo[:, None]) * scale[:, None, None]
  size = (hi - lo) * scale[:, None]
  margin = half_w[:, None] + 1.0
  offset = margin + rng.uniform(0, 1, (n, 2)) * np.maximum(s - size - 2 * margin, 0.0)
  kp = kp + offset[:, None]
  colors = np.clip(PART_COLORS[None] + rng.uniform(-0.15, 0.15, (n, 3, 3)), 0, 1)
  head_r = half_w * rng.uniform(1.8, 2.4, n)
  bg_base = rng.uniform(0.0, 0.45, (n, 3))
  bg_grad = rng.uniform(-0.25, 0.25, (n, 2))
  num_clutter = rng.integers(0, config.max_clutter + 1, n)
  clutter_a = rng.uniform(0, s, (n, config.max_clutter, 2))
  clutter_b = clutter_a + rng.normal(0, s / 5, (n, config.max_clutter, 2))
  clutter_w = rng.uniform(0.5, 3.0, (n, config.max_clutter))
  clutter_gray = rng.uniform(0.1, 0.8, (n, config.max_clutter))
  occluded = rng.uniform(0, 1, n) < config.occlusion_prob
  occ_size = rng.uniform(0.15, 0.35, (n, 2)) * s
  occ_centre = kp[np.arange(n), rng.integers(0, NUM_JOINTS, n)] + rng.normal(0, 2, (n, 2))
  occ_lo, occ_hi = occ_centre - occ_size / 2, occ_centre + occ_size / 2
  occ_gray = rng.uniform(0.2, 0.7, n)
  noise = (rng.standard_normal((n, s, s, 3), np.float32) * config.noise_std).astype(np.float32)
  # ---- draw (float32, in chunks for cache locality) ----
  ys, xs = np.meshgrid(np.arange(s) + 0.5, np.arange(s) + 0.5, indexing='ij')
  px = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)          # [P, 2] pixel centres
  f32 = lambda a: np.asarray(a, np.float32)
  images = np.empty((n, s, s, 3), np.uint8)
  for lo_i in range(0, n, 64):
    sl = slice(lo_i, min(n, lo_i + 64))
    m = sl.stop - sl.start
    img = f32(bg_base[sl, :, None] + ((px / s - 0.5) @ bg_grad[sl].T).T[:, None, :])  # [m, 3, P]
    for c in range(config.max_clutter):
      on = f32(c < num_clutter[sl])
      cov = _segment_coverage(px, f32(clutter_a[sl, c]), f32(clutter_b[sl, c]),
                              f32(clutter_w[sl, c])) * on[:, None]
      img = _paint(img, cov, f32(np.repeat(clutter_gray[sl, c, None], 3, -1)))
    if config.draw_figure:
      k = f32(kp[sl])
      for parent, child, part in LIMBS:
        cov = _segment_coverage(px, k[:, parent], k[:, child], f32(half_w[sl]))
        img = _paint(img, cov, f32(colors[sl, part]))
      cov = _segment_coverage(px, k[:, 0], k[:, 0], f32(head_r[sl]))       # head disk
      img = _paint(img, cov, f32(colors[sl, 0]))
    inside = np.all((px[None] >= occ_lo[sl, None]) & (px[None] < occ_hi[sl, None]), -1)
    img = _paint(img, f32(inside & occluded[sl, None]), f32(np.repeat(occ_gray[sl, None], 3, -1)))
    img = np.clip(img.reshape(m, 3, s, s).transpose(0, 2, 3, 1) + noise[sl], 0.0, 1.0)
    images[sl] = np.round(img * 255).astype(np.uint8)
  # occluded iff the pixel containing the keypoint is painted by the occluder
  centre = np.floor(kp) + 0.5
  hidden = np.all((centre >= occ_lo[:, None]) & (centre < occ_hi[:, None]), -1) & occluded[:, None]
  lo_px = kp.min(1) - half_w[:, None]
  hi_px = kp.max(1) + half_w[:, None]
  return {
      'images': images,
      'keypoints': kp.astype(np.float32),
      'visibility': np.where(hidden, 1, 2).astype(np.int32),
      'boxes': np.concatenate([lo_px, hi_px - lo_px], -1).astype(np.float32),
  }


def corrupt_labels(keypoints, seed: int, fraction: float, scale: float, image_size: int):
  """Heavy-tailed label noise: each keypoint, with probability `fraction`, moves by
  `scale` * Cauchy noise per coordinate (clipped to the image). Models sloppy annotations.
  """
  if not 0 <= fraction <= 1:
    raise ValueError(f'fraction must be in [0, 1], got {fraction}')
  if scale < 0:
    raise ValueError(f'scale must be >= 0, got {scale}')
  rng = np.random.default_rng(seed)
  kp = np.asarray(keypoints, np.float32)
  hit = rng.uniform(0, 1, kp.shape[:-1] + (1,)) < fraction
  noise = scale * rng.standard_cauchy(kp.shape)
  return np.clip(np.where(hit, kp + noise, kp), 0.0, image_size - 1e-3).astype(np.float32)
