"""Gaze (pitch, yaw) regression with RLE and baselines: python -m experiments.rle_gaze.

  python -m experiments.rle_gaze --workdir=/tmp/gaze --loss=rle
  python -m experiments.rle_gaze --workdir=/tmp/gaze_cmp --compare --compare_losses=l1,rle

Default data: rendered 32x48 grey eye images (jax_spec.rle.gaze_data) whose iris, pupil and
eyelid follow the sampled gaze. With --data_dir (and --test_dir) it reads the documented on-disk
format instead: image files + labels.csv with header filename,pitch,yaw (radians).
The regressor predicts one 2-D point (pitch, yaw) in radians; the RLE flow models its residual.
`--label_noise` gives that fraction of training labels Cauchy noise of `--label_noise_scale`
radians. Metric: mean angular error in degrees between predicted and true 3-D gaze vectors.

Writes into --workdir: checkpoints/, metrics.jsonl (+ TensorBoard), loss.png, results.json
(angular_error_deg, median_angular_error_deg); --compare adds comparison.{json,md,png}.
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
from jax_spec.rle import gaze_data, plots, trainer
from jax_spec.rle.models import Regressor

GAZE_LOSSES = ('l1', 'l2', 'nll', 'rle')


GAZE_METRICS = [('angular_error_deg', 'mean angular error (deg)', False)]
IMAGE_SHAPE = (32, 48)


@dataclasses.dataclass(frozen=True)
class GazeOptions(rle_common.RegressionOptions):
  LOSSES = GAZE_LOSSES

  label_noise_scale: float = 0.1
  data_dir: str | None = None
  test_dir: str | None = None

  def __post_init__(self):
    super().__post_init__()
    if bool(self.data_dir) != bool(self.test_dir):
      raise ValueError('data_dir and test_dir must be given together')
    if not 0 <= self.label_noise <= 1:
      raise ValueError(f'label_noise must be in [0, 1], got {self.label_noise}')


def load_data(opts: GazeOptions) -> dict:
  if opts.data_dir:
    train = gaze_data.load_gaze_directory(opts.data_dir, IMAGE_SHAPE)
    test = gaze_data.load_gaze_directory(opts.test_dir, IMAGE_SHAPE)
    name = 'directory'
  else:
    cfg = gaze_data.EyeConfig(height=IMAGE_SHAPE[0], width=IMAGE_SHAPE[1])
    train = gaze_data.render_eyes(opts.train_size, opts.seed, cfg)
    test = gaze_data.render_eyes(opts.num_test, opts.seed + 10_000, cfg)
    name = 'rendered eyes'
  train = dict(train)
  if opts.label_noise > 0:
    rng = np.random.default_rng(opts.seed + 20_000)
    hit = rng.uniform(size=(len(train['gaze']), 1)) < opts.label_noise
    noise = opts.label_noise_scale * rng.standard_cauchy(train['gaze'].shape)
    train['gaze'] = np.clip(np.where(hit, train['gaze'] + noise, train['gaze']), -1.2, 1.2
                            ).astype(np.float32)
  return {'train': train, 'test': test, 'name': name}


def run_one(opts: GazeOptions, data: dict | None = None) -> dict:
  os.makedirs(opts.workdir, exist_ok=True)
  data = data if data is not None else load_data(opts)
  train, test = data['train'], data['test']
  model = Regressor(loss=opts.loss, num_points=1, dims=2, image_shape=train['images'].shape[1:],
                    widths=tuple(opts.widths), q=opts.q, rle_form=opts.rle_form,
                    policy=opts.precision, rngs=nnx.Rngs(opts.seed))
  t0 = time.perf_counter()
  trainer.train(model, train['images'], train['gaze'][:, None, :],
                np.ones((len(train['gaze']), 1), np.float32), opts.train_config(), opts.workdir,
                desc=f'gaze/{opts.loss}')
  train_seconds = time.perf_counter() - t0
  pred = trainer.predict(model, test['images'])
  err = gaze_data.angular_error_deg(pred.mu[:, 0], test['gaze'])
  res = {'angular_error_deg': float(np.mean(err)),
         'median_angular_error_deg': float(np.median(err)),
         'loss': opts.loss, 'data': data['name'], 'steps': opts.steps,
         'batch_size': opts.batch_size, 'num_train': len(train['images']),
         'num_test': len(test['images']), 'label_noise': opts.label_noise,
         'precision': opts.precision, 'train_seconds': train_seconds, 'seed': opts.seed}
  if pred.score is not None and opts.loss in ('nll', 'rle'):
    # does the confidence know when it is wrong? (Spearman-free: Pearson of score vs error)
    res['confidence_error_corr'] = float(np.corrcoef(pred.score[:, 0], err)[0, 1])
  with open(os.path.join(opts.workdir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump(res, f, indent=2)
  plots.plot_loss_curve(opts.workdir, os.path.join(opts.workdir, 'loss.png'), f'gaze / {opts.loss}')
  print(f'[gaze/{opts.loss}] angular error {res["angular_error_deg"]:.3f} deg')
  return res


def run_compare(opts: GazeOptions, losses) -> dict:
  return rle_common.run_compare(opts, losses, load_data=load_data, run_one=run_one,
                                metrics=GAZE_METRICS, task='gaze')


def define_flags():
  """Defines the CLI flags (only when run as a script, so tests can import this module next to
  other experiments that define flags of the same names)."""
  rle_common.define_common_flags(GazeOptions, noise_what='labels', noise_unit='radians',
                                 compare_losses=['l1', 'l2', 'rle'])
  flags.DEFINE_string('data_dir', None, 'Training directory (images + labels.csv).')
  flags.DEFINE_string('test_dir', None, 'Held-out directory (images + labels.csv).')


def main(argv):
  del argv
  rle_common.run_main(GazeOptions, run_one, run_compare)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
