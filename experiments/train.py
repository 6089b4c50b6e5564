"""Train a transformer (optionally with MTP modules / Medusa heads): python -m experiments.train.

  python -m experiments.train --workdir=/tmp/run --config=small --steps=2000 --precision=bf16

Writes into --workdir: train_config.json, tokenizer/, checkpoints/, metrics.jsonl, tensorboard/,
training_curves.png and results.json. Running the same command again resumes from the latest
checkpoint (and does nothing more once --steps is reached). SIGTERM / Ctrl-C save a checkpoint
and stop. Multi-host: start one process per host with the same flags plus
--coordinator_address=host0:port --num_processes=N --process_id=i.
"""
from __future__ import annotations

import json
import logging
import os

from absl import app
from absl import flags
from absl import logging as absl_logging

from jax_spec.training import loop
from jax_spec.training.config import TrainConfig

_DEFAULTS = TrainConfig.__dataclass_fields__

flags.DEFINE_string('workdir', None, 'Output directory (resumed if it holds checkpoints).')
flags.DEFINE_string('config', 'small', 'Model preset: tiny | small | base.')
flags.DEFINE_integer('steps', 1000, 'Total optimizer steps.')
flags.DEFINE_integer('batch_size', 16, 'Global batch size (sequences).')
flags.DEFINE_integer('seq_len', 256, 'Tokens per sequence.')
flags.DEFINE_float('learning_rate', 1e-3, 'Peak learning rate (AdamW).')
flags.DEFINE_integer('warmup_steps', 100, 'Linear warmup steps before the cosine decay.')
flags.DEFINE_float('min_lr_ratio', 0.1, 'Final learning rate as a fraction of the peak.')
flags.DEFINE_float('weight_decay', 0.1, 'AdamW weight decay (matrices only).')
flags.DEFINE_float('grad_clip', 1.0, 'Global gradient-norm clipping threshold.')
flags.DEFINE_string('precision', 'fp32', 'fp32 | bf16 | fp16 (fp32 master weights always).')
flags.DEFINE_string('loss_scale', 'dynamic', 'dynamic | none (only used with fp16).')
flags.DEFINE_integer('loss_scale_growth_interval', 2000,
                     'Finite steps after which the dynamic loss scale doubles.')
flags.DEFINE_integer('mtp_depth', None, 'DeepSeek MTP modules (default: the preset\'s).')
flags.DEFINE_integer('medusa_heads', None, 'Medusa heads (default: the preset\'s).')
flags.DEFINE_string('medusa_mode', 'joint', 'joint (Medusa-2 / MTP) | frozen_trunk (Medusa-1).')
flags.DEFINE_float('mtp_lambda', 0.3, 'Weight of the mean MTP loss.')
flags.DEFINE_float('medusa_weight', 0.8, 'Medusa head k loss weight is medusa_weight**k.')
flags.DEFINE_integer('seed', 0, 'Seed for initialisation and data order.')
flags.DEFINE_string('tokenizer', 'bytes', 'bytes | bpe.')
flags.DEFINE_integer('vocab_size', None, 'BPE vocabulary size (required with --tokenizer=bpe).')
flags.DEFINE_string('data_path', None, 'Text file or directory (default: the Python stdlib).')
flags.DEFINE_string('attention_impl', None, 'pallas | xla | reference (default: by backend).')
flags.DEFINE_string('init_from', None, 'Workdir whose params initialise matching params '
                    '(e.g. a trained trunk for --medusa_mode=frozen_trunk).')
flags.DEFINE_string('init_from_hf', None, 'Hugging Face model directory: its model and tokenizer '
                    'replace --config and --tokenizer (heads: --medusa_mode=frozen_trunk).')
flags.DEFINE_integer('log_every', 10, 'Write training metrics every N steps.')
flags.DEFINE_integer('eval_every', 200, 'Validate every N steps (and at the end).')
flags.DEFINE_integer('eval_batches', 8, 'Validation batches per evaluation.')
flags.DEFINE_integer('checkpoint_every', 200, 'Checkpoint every N steps (and at the end).')
flags.DEFINE_integer('keep_checkpoints', 3, 'Keep the last K checkpoints.')
flags.DEFINE_float('minutes', None, 'Wall-clock budget: save and stop when exceeded.')
flags.DEFINE_integer('mesh_data', -1, 'Mesh axis "data" size (-1: all remaining devices).')
flags.DEFINE_integer('mesh_fsdp', 1, 'Mesh axis "fsdp" size (parameters sharded).')
flags.DEFINE_integer('mesh_tensor', 1, 'Mesh axis "tensor" size (heads / hidden sharded).')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: host:port of process 0.')
flags.DEFINE_integer('num_processes', 1, 'Multi-host: number of processes.')
flags.DEFINE_integer('process_id', 0, 'Multi-host: this process\'s index.')
flags.DEFINE_bool('progress', True, 'Show a tqdm progress bar.')

FLAGS = flags.FLAGS


def config_from_flags() -> TrainConfig:
  """Builds (and validates) the TrainConfig; invalid values raise ValueError."""
  if not FLAGS.workdir:
    raise ValueError('--workdir is required')
  kwargs = {name: getattr(FLAGS, name) for name in _DEFAULTS if name != 'model'}
  return TrainConfig(**kwargs)


def run(cfg: TrainConfig) -> dict:
  """Trains, then writes training_curves.png and results.json (process 0); returns the summary."""
  summary = loop.train(cfg)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    from experiments import plots  # pylint: disable=g-import-not-at-top
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
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    cfg = config_from_flags()
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  # Our progress messages at INFO; library chatter (orbax logs every save at INFO) at WARNING.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('jax_spec').setLevel(logging.INFO)
  summary = run(cfg)
  print(json.dumps(summary, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
