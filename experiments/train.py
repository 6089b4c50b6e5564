"""Train a transformer (optionally with MTP modules / Medusa heads): python -m experiments.train.

  python -m experiments.train --workdir=/tmp/run --config=small --steps=2000 --precision=bf16
  python -m experiments.train --workdir=/tmp/wide --config=configs/small_wide.py --model.num_layers=6

One flag per TrainConfig field (jax_spec/training/config.py) and `--model.<field>` per
TransformerConfig field; `--config` is a preset or a config file, overridden by the flags given.
Writes into --workdir: train_config.json, tokenizer/, checkpoints/, metrics.jsonl, tensorboard/,
training_curves.png and results.json. Running the same command again resumes from the latest
checkpoint (and does nothing more once --steps is reached). SIGTERM / Ctrl-C save a checkpoint
and stop. Multi-host: start one process per host with the same flags plus
--coordinator_address=host0:port --num_processes=N --process_id=i.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
from absl import flags

from jax_spec import cli
from jax_spec.evaluation import plots
from jax_spec.models import TransformerConfig
from jax_spec.training import loop
from jax_spec.training.config import DERIVED_MODEL_FIELDS, TrainConfig

# One flag per TrainConfig field; --model.<field> for every TransformerConfig field the run does
# not derive itself (rope_scaling, a RopeScaling, comes from a preset, a config file or
# --init_from_hf's config.json). --config takes a preset name or a config file.
_TRAIN_FIELDS = cli.define_flags(TrainConfig, skip=('config', 'model'))
_MODEL_FIELDS = cli.define_flags(
    TransformerConfig, prefix='model.', skip=DERIVED_MODEL_FIELDS + ('rope_scaling',),
    defaults={f.name: None for f in dataclasses.fields(TransformerConfig)},
    help_suffix=" (TransformerConfig field; default: the preset's value)")
flags.DEFINE_string(
    'config', TrainConfig.__dataclass_fields__['config'].default,
    'Model preset (tiny | small | base), or a config file: a .py file whose get_config() returns '
    'a dict of TrainConfig fields (a nested dict under "model" overrides the preset\'s '
    'TransformerConfig), or a .json file such as a workdir\'s train_config.json. Flags given on '
    'the command line override the file.')

FLAGS = flags.FLAGS


def config_from_flags() -> TrainConfig:
  """The TrainConfig of the command line: dataclass defaults < config file < flags given.

  Invalid values raise ValueError naming the field.
  """
  if cli.is_config_file(FLAGS.config):
    values = cli.load_config_file(FLAGS.config)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'--config={FLAGS.config}: unknown TrainConfig field(s) {unknown}')
  else:
    values = {'config': FLAGS.config}
  values.update(cli.flag_values(TrainConfig, _TRAIN_FIELDS, only_present=True))
  values['model'] = {**values.get('model', {}),
                     **cli.flag_values(TransformerConfig, _MODEL_FIELDS, prefix='model.',
                                       only_present=True)}
  if not values.get('workdir'):
    raise ValueError('--workdir is required')
  return TrainConfig(**values)


def run(cfg: TrainConfig) -> dict:
  """Trains, then writes training_curves.png and results.json (process 0); returns the summary."""
  summary = loop.train(cfg)
  if jax.process_index() == 0:
    if os.path.exists(os.path.join(cfg.workdir, 'metrics.jsonl')):
      try:
        summary['plot'] = plots.plot_training_curves(
            cfg.workdir, os.path.join(cfg.workdir, 'training_curves.png'),
            title=f'{cfg.config} {cfg.precision}')
      except ValueError as e:  # e.g. no metrics logged yet
        logging.warning('No training curves: %s', e)
    with open(os.path.join(cfg.workdir, 'results.json'), 'w') as f:
      json.dump(summary, f, indent=2, sort_keys=True)
  return summary


def main(argv):
  del argv  # cli.run rejects positional arguments
  cfg = config_from_flags()
  summary = run(cfg)
  print(json.dumps(summary, sort_keys=True))


if __name__ == '__main__':
  cli.run(main, quiet=True)
