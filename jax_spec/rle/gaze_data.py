"""Gaze data: rendered eye images whose appearance follows a sampled (pitch, yaw), and a loader.

Convention (as MPIIGaze): camera coordinates x right, y down, z forward; the eye looks back at the
camera, and the unit gaze vector of (pitch, yaw) in radians is
    g = (-cos(pitch) sin(yaw), -sin(pitch), -cos(pitch) cos(yaw)),
so positive pitch looks up and positive yaw moves the iris to the image's left.

Renderer (numpy, deterministic by seed): a skin-toned patch with an almond-shaped eye opening
between two parabolic lids, a bright sclera, an iris and pupil that are ellipses centred at the
projection of the eyeball's front, centre + R * (g_x, g_y), foreshortened by cos of the gaze angle.
The upper lid follows pitch (it drops when looking down, as real lids do), openness, eye size and
position, iris/skin tones, pupil size, a lighting gradient, gain, a corneal glint and pixel noise
vary per image.

On-disk format for `load_gaze_directory(path)`: a directory with image files (any format PIL
reads; converted to grayscale and resized to `image_shape`) and `labels.csv` whose header is
exactly `filename,pitch,yaw`, one row per image, pitch and yaw in radians.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class EyeConfig:
  height: int = 32
  width: int = 48
  max_pitch: float = 0.35     # radians (~20 degrees)
  max_yaw: float = 0.5        # radians (~29 degrees)
  noise_std: float = 0.03

  def __post_init__(self):
    if self.height < 16 or self.width < 16:
      raise ValueError(f'height and width must be >= 16, got {self.height}x{self.width}')
    if not 0 < self.max_pitch < math.pi / 2 or not 0 < self.max_yaw < math.pi / 2:
      raise ValueError('max_pitch and max_yaw must be in (0, pi/2)')
    if self.noise_std < 0:
      raise ValueError(f'noise_std must be >= 0, got {self.noise_std}')


def pitchyaw_to_vector(pitchyaw_N2):
  """Unit gaze vectors [N, 3] from (pitch, yaw) [N, 2] in radians."""
  py = np.asarray(pitchyaw_N2, np.float64)
  if py.ndim != 2 or py.shape[-1] != 2:
    raise ValueError(f'pitchyaw must be [N, 2], got shape {py.shape}')
  p, y = py[:, 0], py[:, 1]
  return np.stack([-np.cos(p) * np.sin(y), -np.sin(p), -np.cos(p) * np.cos(y)], -1)


def angular_error_deg(pred_N2, true_N2):
  """Angle in degrees [N] between the gaze vectors of predicted and true (pitch, yaw)."""
  a, b = pitchyaw_to_vector(pred_N2), pitchyaw_to_vector(true_N2)
  if a.shape != b.shape:
    raise ValueError(f'pred and true must have the same shape, got {a.shape} and {b.shape}')
  cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _ellipse(x, y, cx, cy, a_along, b_across, ux, uy):
  """Soft (about 1-px anti-aliased) inside-ellipse mask; semi-axis a along unit (ux, uy)."""
  dx, dy = x - cx, y - cy
  along = (dx * ux + dy * uy) / a_along
  across = (-dx * uy + dy * ux) / b_across
  r = np.sqrt(along**2 + across**2)
  return np.clip((1.0 - r) * np.minimum(a_along, b_across) + 0.5, 0.0, 1.0)


def render_eyes(num: int, seed: int, config: EyeConfig = EyeConfig()):
  """Returns dict images [N, H, W, 1] uint8 and gaze [N, 2] float32 (pitch, yaw) radians."""
  if num < 1:
    raise ValueError(f'num must be >= 1, got {num}')
  rng = np.random.default_rng(seed)
  n, h, w = num, config.height, config.width
  u = lambda lo, hi: rng.uniform(lo, hi, (n, 1, 1))
  pitch = rng.uniform(-config.max_pitch, config.max_pitch, n)
  yaw = rng.uniform(-config.max_yaw, config.max_yaw, n)
  radius = u(0.26, 0.32) * w                       # eyeball radius in pixels
  cx, cy = w / 2 + u(-2, 2), h / 2 + u(-1.5, 1.5)
  half_len = radius * u(1.05, 1.2)                 # half width of the eye opening
  openness = u(0.8, 1.1)
  iris_r = radius * u(0.42, 0.5)
  pupil_frac = u(0.35, 0.55)
  skin, sclera, iris_tone = u(0.45, 0.8), u(0.8, 0.95), u(0.15, 0.45)
  gain = u(0.6, 1.2)
  light = rng.uniform(-1, 1, (n, 2))
  glint_dir = light / np.linalg.norm(light, axis=-1, keepdims=True)
  noise = rng.standard_normal((n, h, w)) * config.noise_std

  g = pitchyaw_to_vector(np.stack([pitch, yaw], -1))
  gx, gy = g[:, 0, None, None], g[:, 1, None, None]
  ys, xs = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing='ij')
  x, y = xs[None], ys[None]
  icx, icy = cx + radius * gx, cy + radius * gy           # iris centre: projected cornea
  disp = np.sqrt(gx**2 + gy**2)
  ux = np.where(disp > 1e-6, gx / np.maximum(disp, 1e-6), 1.0)
  uy = np.where(disp > 1e-6, gy / np.maximum(disp, 1e-6), 0.0)
  fore = np.sqrt(np.maximum(1.0 - disp**2, 0.05))         # cos of the angle to the camera axis
  # the iris disc is foreshortened along the displacement direction
  iris = _ellipse(x, y, icx, icy, iris_r * fore, iris_r, ux, uy)
  pupil = _ellipse(x, y, icx, icy, iris_r * pupil_frac * fore, iris_r * pupil_frac, ux, uy)
  t = np.clip((x - cx) / half_len, -1.0, 1.0)
  bowl = 1.0 - t**2
  upper = cy - radius * openness * (0.75 + 0.9 * np.sin(pitch)[:, None, None]) * bowl
  lower = cy + radius * openness * 0.55 * bowl
  inside = np.clip(np.minimum(y - upper, lower - y) + 0.5, 0.0, 1.0) * (np.abs(x - cx) < half_len)
  lid_line = np.clip(1.0 - np.abs(y - upper) / 1.2, 0.0, 1.0) * (np.abs(x - cx) < half_len)
  eye = sclera * (1 - iris) + iris_tone * iris
  eye = eye * (1 - pupil) + 0.05 * pupil
  gl_x = icx + 0.35 * iris_r * glint_dir[:, 0, None, None]
  gl_y = icy + 0.35 * iris_r * glint_dir[:, 1, None, None]
  glint = np.exp(-((x - gl_x)**2 + (y - gl_y)**2) / 1.0) * iris
  skin_img = skin * (1.0 - 0.15 * ((y - cy) / h))              # mild shading below the brow
  img = skin_img * (1 - inside) + (eye + glint) * inside
  img = img * (1 - 0.6 * lid_line) + 0.1 * 0.6 * lid_line
  shade = 1.0 + 0.35 * (light[:, 0, None, None] * (x / w - 0.5) + light[:, 1, None, None] * (y / h - 0.5))
  img = np.clip(img * gain * shade + noise, 0.0, 1.0)
  return {
      'images': np.round(img[..., None] * 255).astype(np.uint8),
      'gaze': np.stack([pitch, yaw], -1).astype(np.float32),
  }


def load_gaze_directory(path: str, image_shape=(32, 48)):
  """Loads `path/labels.csv` + images (format in the module docstring).

  Returns dict images [N, H, W, 1] uint8, gaze [N, 2] float32, filenames [N].
  Raises ValueError naming the file and row for anything malformed.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise ValueError(f'path must be a directory, got {path!r}')
  labels = os.path.join(path, 'labels.csv')
  if not os.path.isfile(labels):
    raise ValueError(f'{labels} not found: expected a labels.csv with header filename,pitch,yaw')
  h, w = image_shape
  images, gaze, names = [], [], []
  with open(labels, newline='', encoding='utf-8') as f:
    rows = list(csv.reader(f))
  if not rows or [c.strip() for c in rows[0]] != ['filename', 'pitch', 'yaw']:
    raise ValueError(f'{labels}: header must be exactly "filename,pitch,yaw", '
                     f'got {rows[0] if rows else "an empty file"}')
  for line, row in enumerate(rows[1:], start=2):
    if not row or all(not c.strip() for c in row):
      continue
    if len(row) != 3:
      raise ValueError(f'{labels} line {line}: expected 3 columns filename,pitch,yaw, got {row}')
    name = row[0].strip()
    try:
      pitch, yaw = float(row[1]), float(row[2])
    except ValueError:
      raise ValueError(f'{labels} line {line}: pitch and yaw must be numbers, got {row[1:]}') from None
    if not (math.isfinite(pitch) and math.isfinite(yaw)) or abs(pitch) >= math.pi / 2 or abs(yaw) >= math.pi:
      raise ValueError(f'{labels} line {line}: pitch must be in (-pi/2, pi/2) and yaw in '
                       f'(-pi, pi) radians, got {pitch}, {yaw}')
    file = os.path.join(path, name)
    if not name or not os.path.isfile(file):
      raise ValueError(f'{labels} line {line}: image file {name!r} not found in {path}')
    try:
      with Image.open(file) as im:
        im = im.convert('L').resize((w, h), Image.BILINEAR)
        images.append(np.asarray(im, np.uint8))
    except (OSError, SyntaxError) as e:
      raise ValueError(f'{labels} line {line}: cannot read image {name!r}: {e}') from None
    gaze.append((pitch, yaw))
    names.append(name)
  if not images:
    raise ValueError(f'{labels} lists no images')
  return {
      'images': np.stack(images)[..., None],
      'gaze': np.asarray(gaze, np.float32),
      'filenames': names,
  }
