"""2-D keypoint regression with RLE and baselines: python -m experiments.rle_pose.

  python -m experiments.rle_pose --workdir=/tmp/pose --loss=rle
  python -m experiments.rle_pose --workdir=/tmp/pose_cmp --compare --label_noise=0.1

Default data: generated stick figures (jax_spec.rle.pose_data), 64x64, 14 joints; the test set
is always clean, `--label_noise` corrupts that fraction of training keypoints with Cauchy noise
(`--label_noise_scale` pixels). With --coco_train_json/--coco_train_images and
--coco_val_json/--coco_val_images it trains on COCO person crops instead (17 keypoints, COCO OKS
sigmas).

Writes into --workdir: checkpoints/, metrics.jsonl (+ TensorBoard), loss.png, predictions.png and
results.json with pck (PCK@0.05 of the image side), ap (OKS AP .50:.95), ap50, ap75,
pixel_error (mean, input pixels). Running again resumes from the last checkpoint. --compare runs
every loss in --compare_losses on the same data/steps/backbone in workdir/<loss>/ and writes
comparison.json, comparison.md and comparison.png.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import flags
from flax import nnx

from experiments import rle_common
from jax_spec import cli
from jax_spec.rle import coco, metrics, plots, pose_data, trainer
from jax_spec.rle.models import LOSSES, Regressor


POSE_METRICS = [('pck', 'PCK@0.05', True), ('ap', 'AP (OKS .50:.95)', True),
                ('pixel_error', 'pixel error', False)]


@dataclasses.dataclass(frozen=True)
class PoseOptions(rle_common.RegressionOptions):
  LOSSES = LOSSES

  label_noise_scale: float = 4.0
  image_size: int = 64
  coco_train_json: str | None = None
  coco_train_images: str | None = None
  coco_val_json: str | None = None
  coco_val_images: str | None = None

  def __post_init__(self):
    super().__post_init__()
    if self.image_size % 8 or self.image_size < 16:
      raise ValueError(f'image_size must be a multiple of 8 and >= 16, got {self.image_size}')
    coco_args = (self.coco_train_json, self.coco_train_images, self.coco_val_json,
                 self.coco_val_images)
    if any(coco_args) and not all(coco_args):
      raise ValueError('COCO needs all of coco_train_json, coco_train_images, coco_val_json, '
                       'coco_val_images')


def load_data(opts: PoseOptions) -> dict:
  """{'train': ..., 'test': ..., 'sigmas': [K], 'name': str}; test labels are never corrupted."""
  s = opts.image_size
  if opts.coco_train_json:
    train = coco.load_coco_keypoints(opts.coco_train_json, opts.coco_train_images, image_size=s)
    test = coco.load_coco_keypoints(opts.coco_val_json, opts.coco_val_images, image_size=s)
    sigmas, name = coco.COCO_SIGMAS, 'coco'
  else:
    cfg = pose_data.StickFigureConfig(image_size=s)
    train = pose_data.render_stick_figures(opts.train_size, opts.seed, cfg)
    test = pose_data.render_stick_figures(opts.num_test, opts.seed + 10_000, cfg)
    for d in (train, test):
      d['areas'] = d['boxes'][:, 2] * d['boxes'][:, 3]
    sigmas, name = np.full(pose_data.NUM_JOINTS, metrics.UNIFORM_SIGMA, np.float32), 'stick'
  train = dict(train)
  train['clean_keypoints'] = train['keypoints']
  if opts.label_noise > 0:
    train['keypoints'] = pose_data.corrupt_labels(train['keypoints'], opts.seed + 20_000,
                                                  opts.label_noise, opts.label_noise_scale, s)
  return {'train': train, 'test': test, 'sigmas': sigmas, 'name': name}


def evaluate(model: Regressor, data: dict, image_size: int) -> tuple[dict, np.ndarray]:
  test = data['test']
  pred = trainer.predict(model, test['images'])
  pred_px = (pred.mu + 0.5) * image_size
  res = metrics.keypoint_metrics(pred_px, test['keypoints'], test['visibility'],
                                 image_size=image_size, areas_N=test['areas'],
                                 sigmas_K=data['sigmas'], scores_N=pred.score.mean(-1))
  return res, pred_px


def run_one(opts: PoseOptions, data: dict | None = None) -> dict:
  """Trains and evaluates one loss in opts.workdir; returns (and writes) results.json."""
  os.makedirs(opts.workdir, exist_ok=True)
  data = data if data is not None else load_data(opts)
  train, s = data['train'], opts.image_size
  k = train['keypoints'].shape[1]
  model = Regressor(loss=opts.loss, num_points=k, dims=2, image_shape=train['images'].shape[1:],
                    widths=tuple(opts.widths), q=opts.q, rle_form=opts.rle_form,
                    policy=opts.precision, rngs=nnx.Rngs(opts.seed))
  targets = train['keypoints'] / s - 0.5
  weights = (train['visibility'] > 0).astype(np.float32)
  t0 = time.perf_counter()
  trainer.train(model, train['images'], targets, weights, opts.train_config(), opts.workdir,
                desc=f'pose/{opts.loss}')
  train_seconds = time.perf_counter() - t0
  res, pred_px = evaluate(model, data, s)
  res.update(loss=opts.loss, data=data['name'], steps=opts.steps, batch_size=opts.batch_size,
             num_train=len(train['images']), num_test=len(data['test']['images']),
             label_noise=opts.label_noise, precision=opts.precision,
             train_seconds=train_seconds, seed=opts.seed)
  with open(os.path.join(opts.workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(res, f, indent=2)
  plots.plot_loss_curve(opts.workdir, os.path.join(opts.workdir, 'loss.png'),
                        f'pose / {opts.loss}')
  test = data['test']
  plots.plot_keypoints(test['images'], test['keypoints'], pred_px, test['visibility'],
                       os.path.join(opts.workdir, 'predictions.png'),
                       f'{opts.loss}: PCK {res["pck"]:.3f}, AP {res["ap"]:.3f}, '
                       f'{res["pixel_error"]:.2f} px (white: truth, yellow: prediction)')
  print(f'[pose/{opts.loss}] ' + ', '.join(f'{m}={res[m]:.4f}' for m, _, _ in POSE_METRICS))
  return res


def run_compare(opts: PoseOptions, losses) -> dict:
  return rle_common.run_compare(opts, losses, load_data=load_data, run_one=run_one,
                                metrics=POSE_METRICS, task='pose')


def define_flags():
  """Defines the CLI flags (only when run as a script, so tests can import this module next to
  other experiments that define flags of the same names)."""
  rle_common.define_common_flags(PoseOptions, noise_what='keypoints', noise_unit='pixels',
                                 compare_losses=LOSSES)
  flags.DEFINE_integer('image_size', 64, 'Input side in pixels (multiple of 8).')
  flags.DEFINE_string('coco_train_json', None, 'COCO person_keypoints json (train).')
  flags.DEFINE_string('coco_train_images', None, 'Directory of the train images.')
  flags.DEFINE_string('coco_val_json', None, 'COCO person_keypoints json (held-out).')
  flags.DEFINE_string('coco_val_images', None, 'Directory of the held-out images.')


def main(argv):
  del argv
  rle_common.run_main(PoseOptions, run_one, run_compare)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
