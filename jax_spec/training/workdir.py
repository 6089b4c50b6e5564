"""A run's identity is its workdir: the resolved configuration it was created with, and the
metrics that a resumed run continues.

  workdir/train_config.json   {'train': TrainConfig fields, 'model': TransformerConfig fields,
                               'tokenizer': {kind, vocab_size, fingerprint}}
  workdir/metrics.jsonl       one record per logged step (jax_spec.io.metrics)
  workdir/checkpoints/<step>  orbax checkpoints
  workdir/tokenizer/          the tokenizer the data pipeline built
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from jax_spec import cli
from jax_spec.models.config import TransformerConfig
from jax_spec.training.config import CONFIG_FILE, TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
# Fields that do not change the numbers a run computes: they may differ when resuming.
RUNTIME_FIELDS = ('workdir', 'steps', 'minutes', 'log_every', 'eval_every', 'eval_batches',
                  'checkpoint_every', 'keep_checkpoints', 'progress', 'coordinator_address',
                  'num_processes', 'process_id', 'mesh_data', 'mesh_fsdp', 'mesh_tensor',
                  'async_checkpoint', 'profile_steps')


def run_info(cfg: TrainConfig, model_config, tokenizer) -> dict[str, Any]:
  """What `train_config.json` holds: the resolved configuration of the run."""
  return {'train': cfg.to_json(), 'model': dataclasses.asdict(model_config),
          'tokenizer': {'kind': tokenizer.kind, 'vocab_size': int(tokenizer.vocab_size),
                        'fingerprint': tokenizer.fingerprint}}


def _defaults(cls) -> dict[str, Any]:
  """The dataclass's field defaults, as `train_config.json` stores them."""
  return {f.name: cli.field_default(f) for f in dataclasses.fields(cls)
          if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def check_resume_config(path: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
  """A restart must compute the same thing: compare everything but the runtime fields.

  A training or model field missing from an older `saved` file counts as its default (a field
  added to TrainConfig or TransformerConfig later does not make old runs unresumable).
  """
  diffs = []
  defaults = {'train': _defaults(TrainConfig), 'model': _defaults(TransformerConfig)}
  for section in ('train', 'model', 'tokenizer'):
    a, b = saved.get(section, {}), current[section]
    a = {**defaults.get(section, {}), **a}
    for key in sorted(set(a) | set(b)):
      if section == 'train' and key in RUNTIME_FIELDS:
        continue
      if a.get(key) != b.get(key):
        diffs.append(f'{section}.{key}: saved {a.get(key)!r}, now {b.get(key)!r}')
  if diffs:
    raise ValueError(
        f'the workdir was created with a different configuration ({path}): ' + '; '.join(diffs)
        + '. Resume with the original flags or use a fresh --workdir.')
  old_steps = saved.get('train', {}).get('steps')
  if old_steps is not None and old_steps != current['train']['steps']:
    log.warning('steps changed from %s to %s: the cosine schedule now decays over %s steps.',
                old_steps, current['train']['steps'], current['train']['steps'])


def write_json(path: str, obj: Any) -> None:
  """Writes atomically (a kill leaves the old file or the new one)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_run_info(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'workdir {workdir!r} has no {CONFIG_FILE}; is it a training workdir?')
  with open(path) as f:
    return json.load(f)


def train_config_of(workdir: str, info: dict[str, Any] | None = None) -> TrainConfig:
  """The TrainConfig a workdir was trained with (its data and init sources not re-checked)."""
  info = read_run_info(workdir) if info is None else info
  return TrainConfig(**{**info['train'], 'workdir': workdir, 'data_path': None,
                        'init_from': None})


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl lines with `step > step` (written after the checkpoint we resume)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:  # a line cut by a kill
      continue
    if rec.get('step', 0) <= step:
      keep.append(line if line.endswith('\n') else line + '\n')
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.writelines(keep)
  os.replace(tmp, path)
