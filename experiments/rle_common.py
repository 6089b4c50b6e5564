"""What the RLE experiments (rle_pose, rle_gaze) share: the options they have in common and their flags."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, ClassVar, Sequence

from absl import app
from absl import flags
from absl import logging

from jax_spec.rle import losses
from jax_spec.rle import plots
from jax_spec.rle import trainer


@dataclasses.dataclass(frozen=True)
class RegressionOptions:
  """Options common to the RLE experiments; subclasses add their data options and `LOSSES`."""
  LOSSES: ClassVar[tuple[str, ...]] = ()

  workdir: str
  loss: str = 'rle'
  steps: int = 600
  batch_size: int = 32
  learning_rate: float = 2e-3
  seed: int = 0
  precision: str = 'fp32'
  label_noise: float = 0.0
  label_noise_scale: float = 1.0
  q: str = 'laplace'
  rle_form: str = 'two_nll'
  sigma_lr_mult: float = 1.0
  num_train: int = 0   # 0: steps x batch_size, i.e. every training image is new (see train_size)
  num_test: int = 256
  widths: tuple = (16, 32, 64)
  log_every: int = 25
  checkpoint_every: int = 200

  def __post_init__(self):
    if not self.workdir:
      raise ValueError('workdir is required')
    if self.num_train < 0 or self.num_test < 1:
      raise ValueError(f'num_train must be >= 0 (0: steps x batch_size) and num_test >= 1, got '
                       f'{self.num_train} and {self.num_test}')
    if self.loss not in self.LOSSES:
      raise ValueError(f'loss must be one of {self.LOSSES}, got {self.loss!r}')

  @property
  def train_size(self) -> int:
    """Generated training images: `num_train`, or by default one per sample the run draws
    (steps x batch_size), so that the generator acts as an endless stream and no image is seen
    twice. Regression heads overfit a small fixed set (pose PCK, L1, 1200 steps: 0.38 with 2048
    images, 0.55 with 38400; docs/benchmarks.md)."""
    return self.num_train or self.steps * self.batch_size

  def train_config(self) -> trainer.TrainConfig:
    return trainer.TrainConfig(steps=self.steps, batch_size=self.batch_size,
                               learning_rate=self.learning_rate, seed=self.seed,
                               precision=self.precision, sigma_lr_mult=self.sigma_lr_mult,
                               log_every=self.log_every,
                               checkpoint_every=self.checkpoint_every)


def define_common_flags(options_cls, *, noise_what: str, noise_unit: str, compare_losses):
  """Defines the flags of `RegressionOptions`' fields (defaults from `options_cls`) plus --compare."""
  defaults = {f.name: f.default for f in dataclasses.fields(options_cls)}
  flags.DEFINE_string('workdir', None, 'Output directory (resumed if it holds checkpoints).')
  flags.DEFINE_enum('loss', defaults['loss'], options_cls.LOSSES, 'Loss / head.')
  flags.DEFINE_integer('steps', defaults['steps'], 'Optimizer steps.')
  flags.DEFINE_integer('batch_size', defaults['batch_size'], 'Batch size.')
  flags.DEFINE_float('learning_rate', defaults['learning_rate'],
                     'Peak learning rate (AdamW, warmup + cosine).')
  flags.DEFINE_integer('seed', defaults['seed'], 'Seed for data, initialisation and batch order.')
  flags.DEFINE_string('precision', defaults['precision'],
                      'fp32 | bf16 | fp16 (backbone compute dtype).')
  flags.DEFINE_float('label_noise', defaults['label_noise'],
                     f'Fraction of training {noise_what} given Cauchy noise.')
  flags.DEFINE_float('label_noise_scale', defaults['label_noise_scale'],
                     f'Scale ({noise_unit}) of the Cauchy label noise.')
  flags.DEFINE_enum('q', defaults['q'], list(losses.Q_DISTRIBUTIONS), 'RLE base distribution Q.')
  flags.DEFINE_enum('rle_form', defaults['rle_form'], list(losses.RLE_FORMS),
                    'RLE loss form (jax_spec/rle/losses.py docstring).')
  flags.DEFINE_float('sigma_lr_mult', defaults['sigma_lr_mult'],
                     'Learning-rate multiplier for the sigma head (nll, rle).')
  flags.DEFINE_bool('compare', False, 'Run all --compare_losses side by side.')
  flags.DEFINE_list('compare_losses', list(compare_losses), 'Losses for --compare.')
  flags.DEFINE_integer('num_train', defaults['num_train'],
                       'Generated training images (0: steps x batch_size, each image seen once; '
                       'the set then depends on --steps, so extend a run with an explicit value).')
  flags.DEFINE_integer('num_test', defaults['num_test'], 'Generated held-out images.')
  flags.DEFINE_list('widths', [str(w) for w in defaults['widths']],
                    'Backbone widths (stem, then one block each).')
  flags.DEFINE_integer('log_every', defaults['log_every'], 'Write training metrics every N steps.')
  flags.DEFINE_integer('checkpoint_every', defaults['checkpoint_every'],
                       'Checkpoint every N steps (and at the end).')


def options_from_flags(options_cls):
  """`options_cls` filled from the parsed flags of the same names; invalid values are usage errors
  (the options' own ValueError message, no traceback)."""
  values = {f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(options_cls)}
  try:
    values['widths'] = tuple(int(w) for w in values['widths'])
  except ValueError:
    raise app.UsageError(f'--widths must be comma-separated ints, got {values["widths"]}') from None
  try:
    return options_cls(**values)
  except ValueError as e:
    raise app.UsageError(str(e)) from None


def run_compare(opts: RegressionOptions, losses_to_compare: Sequence[str], *,
                load_data: Callable[[Any], dict], run_one: Callable[[Any, dict], dict],
                metrics, task: str) -> dict:
  """Every loss of `losses_to_compare` on the same data, steps and backbone, in
  `opts.workdir/<loss>/`; writes comparison.{json,md,png} of `metrics` into `opts.workdir`."""
  for loss in losses_to_compare:
    if loss not in opts.LOSSES:
      raise ValueError(f'compare_losses entries must be in {opts.LOSSES}, got {loss!r}')
  data = load_data(opts)
  results = {}
  for loss in losses_to_compare:
    sub = dataclasses.replace(opts, loss=loss, workdir=os.path.join(opts.workdir, loss))
    results[loss] = run_one(sub, data)
  plots.write_comparison(opts.workdir, results, metrics,
                         f'{task} ({data["name"]}, {opts.steps} steps x {opts.batch_size}, '
                         f'label noise {opts.label_noise})')
  return results


def run_main(options_cls, run_one: Callable, run_compare_fn: Callable):
  """An RLE experiment's main: one run of the flags' options, or --compare over
  --compare_losses."""
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  opts = options_from_flags(options_cls)
  if flags.FLAGS.compare:
    return run_compare_fn(opts, flags.FLAGS.compare_losses)
  return run_one(opts)
