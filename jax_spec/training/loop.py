"""The training loop as a library function: `train(TrainConfig(...)) -> summary`.

Resumption: a run's identity is its workdir. `train` writes `workdir/train_config.json` (training
flags, model config, tokenizer) on the first start; a restart with the same workdir restores the
latest checkpoint (params, optimizer state, loss scale, step, rng), truncates `metrics.jsonl` to
the restored step and continues. Batches are `data.get_batch(seed, step, ...)`, a pure function of
the step, so no iterator state is needed and the resumed run's metrics equal an uninterrupted
run's bit for bit on CPU (timing fields such as tokens/s aside).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_spec import precision as precision_lib
from jax_spec.io import checkpointing
from jax_spec.io import metrics as metrics_lib
from jax_spec.training import steps as steps_lib

log = logging.getLogger(__name__)

CONFIG_FILE = 'train_config.json'
TIMING_KEYS = ('tokens_per_sec', 'step_time_ms', 'elapsed_s')
MEDUSA_MODES = ('joint', 'frozen_trunk')
TOKENIZERS = ('bytes', 'byte', 'bpe')

# Fields that do not change the numbers a run computes: they may differ when resuming.
_RUNTIME_FIELDS = ('workdir', 'steps', 'minutes', 'log_every', 'eval_every', 'eval_batches',
                   'checkpoint_every', 'keep_checkpoints', 'progress', 'coordinator_address',
                   'num_processes', 'process_id', 'mesh_data', 'mesh_fsdp', 'mesh_tensor')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything `train` needs; `experiments.train` maps its absl flags 1:1 onto these fields.

  `mtp_depth` / `medusa_heads` None keep the preset's value. `medusa_mode='frozen_trunk'` is
  Medusa-1: only the MTP/Medusa head parameters train (start it from a trained trunk with
  `init_from=<workdir>`); 'joint' trains everything (Medusa-2 / DeepSeek MTP).
  """
  workdir: str
  config: str = 'small'
  steps: int = 1000
  batch_size: int = 16
  seq_len: int = 256
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  precision: str = 'fp32'
  loss_scale: str = 'dynamic'
  loss_scale_growth_interval: int = precision_lib.DEFAULT_GROWTH_INTERVAL
  mtp_depth: int | None = None
  medusa_heads: int | None = None
  medusa_mode: str = 'joint'
  mtp_lambda: float = 0.3
  medusa_weight: float = 0.8
  seed: int = 0
  tokenizer: str = 'bytes'
  vocab_size: int | None = None
  data_path: str | None = None
  attention_impl: str | None = None
  init_from: str | None = None
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  minutes: float | None = None
  mesh_data: int = -1
  mesh_fsdp: int = 1
  mesh_tensor: int = 1
  coordinator_address: str | None = None
  num_processes: int = 1
  process_id: int = 0
  progress: bool = True

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    """Raises ValueError naming the first invalid field."""
    if not isinstance(self.workdir, str) or not self.workdir:
      raise ValueError(f'workdir must be a non-empty path, got {self.workdir!r}')
    from jax_spec.models import config as model_config_lib  # pylint: disable=g-import-not-at-top
    if self.config not in model_config_lib.PRESETS:
      raise ValueError(f'config must be one of {sorted(model_config_lib.PRESETS)}, '
                       f'got {self.config!r}')

    def positive_int(name, allow_zero=False):
      v = getattr(self, name)
      lo = 0 if allow_zero else 1
      if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f'{name} must be an int >= {lo}, got {v!r}')

    for name in ('steps', 'batch_size', 'seq_len', 'log_every', 'eval_every', 'eval_batches',
                 'checkpoint_every', 'keep_checkpoints', 'loss_scale_growth_interval',
                 'num_processes', 'mesh_fsdp', 'mesh_tensor'):
      positive_int(name)
    for name in ('warmup_steps', 'seed', 'process_id'):
      positive_int(name, allow_zero=True)
    if self.seq_len < 2:
      raise ValueError(f'seq_len must be >= 2 (a target needs a context), got {self.seq_len}')
    if not isinstance(self.mesh_data, int) or (self.mesh_data < 1 and self.mesh_data != -1):
      raise ValueError(f'mesh_data must be -1 (all remaining devices) or >= 1, '
                       f'got {self.mesh_data!r}')
    if self.process_id >= self.num_processes:
      raise ValueError(f'process_id must be < num_processes ({self.num_processes}), '
                       f'got {self.process_id}')
    if self.num_processes > 1 and not self.coordinator_address:
      raise ValueError('coordinator_address is required when num_processes > 1')
    if self.batch_size % self.num_processes:
      raise ValueError(f'batch_size ({self.batch_size}) must be divisible by num_processes '
                       f'({self.num_processes})')
    for name in ('learning_rate', 'grad_clip'):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or math.isinf(v):
        raise ValueError(f'{name} must be a positive finite number, got {v!r}')
    for name in ('weight_decay', 'mtp_lambda', 'medusa_weight'):
      v = getattr(self, name)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or math.isinf(v):
        raise ValueError(f'{name} must be a finite number >= 0, got {v!r}')
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f'min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}')
    precision_lib.get_policy(self.precision)
    if self.loss_scale not in precision_lib.LOSS_SCALE_MODES:
      raise ValueError(f'loss_scale must be one of {precision_lib.LOSS_SCALE_MODES}, '
                       f'got {self.loss_scale!r}')
    for name in ('mtp_depth', 'medusa_heads'):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise ValueError(f'{name} must be an int >= 0 (or None for the preset), got {v!r}')
    if self.medusa_mode not in MEDUSA_MODES:
      raise ValueError(f'medusa_mode must be one of {MEDUSA_MODES}, got {self.medusa_mode!r}')
    if self.tokenizer not in TOKENIZERS:
      raise ValueError(f'tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}')
    if self.tokenizer == 'bpe' and (not isinstance(self.vocab_size, int) or self.vocab_size < 8):
      raise ValueError(f'vocab_size must be an int >= 8 for tokenizer=bpe, got {self.vocab_size!r}')
    if self.minutes is not None and not self.minutes > 0:
      raise ValueError(f'minutes must be > 0 (or None), got {self.minutes!r}')
    if self.data_path is not None and not os.path.exists(self.data_path):
      raise ValueError(f'data_path {self.data_path!r} does not exist')
    if self.init_from is not None and not os.path.isfile(os.path.join(self.init_from, CONFIG_FILE)):
      raise ValueError(f'init_from {self.init_from!r} is not a training workdir '
                       f'(no {CONFIG_FILE})')

  @property
  def tokenizer_kind(self) -> str:
    return 'byte' if self.tokenizer in ('bytes', 'byte') else self.tokenizer

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Building blocks shared by train() and load_model_from_workdir().
# ----------------------------------------------------------------------------------------------

def make_model_config(cfg: TrainConfig, vocab_size: int):
  from jax_spec.models import get_config  # pylint: disable=g-import-not-at-top
  preset = get_config(cfg.config)
  overrides = dict(vocab_size=vocab_size, max_seq_len=max(preset.max_seq_len, cfg.seq_len),
                   medusa_frozen_trunk=cfg.medusa_mode == 'frozen_trunk')
  if cfg.mtp_depth is not None:
    overrides['mtp_depth'] = cfg.mtp_depth
  if cfg.medusa_heads is not None:
    overrides['medusa_heads'] = cfg.medusa_heads
  if cfg.attention_impl is not None:
    overrides['attention_impl'] = cfg.attention_impl
  return get_config(cfg.config, **overrides)


def _trainable_filter(cfg: TrainConfig):
  if cfg.medusa_mode != 'frozen_trunk':
    return None
  return lambda path: path.startswith('medusa/') or path.startswith('mtp/')


def build_model(model_config, policy, seed: int):
  from jax_spec.models import Transformer  # pylint: disable=g-import-not-at-top
  return Transformer(model_config, policy=policy, rngs=nnx.Rngs(params=seed))


def build_optimizer(cfg: TrainConfig):
  schedule = steps_lib.make_schedule(learning_rate=cfg.learning_rate,
                                     warmup_steps=min(cfg.warmup_steps, cfg.steps),
                                     total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
  tx = steps_lib.make_optimizer(schedule, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                                trainable=_trainable_filter(cfg))
  return tx, schedule


def _state_shardings(state, mesh):
  from jax_spec.training import sharding  # pylint: disable=g-import-not-at-top
  repl = sharding.replicated_sharding(mesh)
  return {
      'params': sharding.param_shardings(state['params'], mesh),
      'opt_state': sharding.param_shardings(state['opt_state'], mesh),
      'loss_scale': jax.tree.map(lambda _: repl, state['loss_scale']),
      'step': repl,
      'skipped_steps': repl,
      'rng': repl,
  }


def _tokenizer_info(tokenizer) -> dict[str, Any]:
  return {'kind': tokenizer.kind, 'vocab_size': int(tokenizer.vocab_size),
          'fingerprint': tokenizer.fingerprint}


def _check_resume_config(path: str, saved: dict[str, Any], current: dict[str, Any]) -> None:
  """A restart must compute the same thing: compare everything but the runtime fields."""
  diffs = []
  for section in ('train', 'model', 'tokenizer'):
    a, b = saved.get(section, {}), current[section]
    for key in sorted(set(a) | set(b)):
      if section == 'train' and key in _RUNTIME_FIELDS:
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


def _write_json(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _load_init_params(init_from: str, params):
  """Copies params with the same path and shape from another run (e.g. a trained trunk)."""
  other, _, _ = load_model_from_workdir(init_from)
  other_params = nnx.state(other, nnx.Param)
  src = {steps_lib._path_str(p): x  # pylint: disable=protected-access
         for p, x in jax.tree_util.tree_flatten_with_path(other_params)[0]}
  copied = []

  def take(path, x):
    key = steps_lib._path_str(path)  # pylint: disable=protected-access
    y = src.get(key)
    if y is not None and y.shape == x.shape and y.dtype == x.dtype:
      copied.append(key)
      return jnp.asarray(y)
    return x

  new = jax.tree_util.tree_map_with_path(take, params)
  log.info('init_from %s: copied %d of %d parameter arrays.', init_from, len(copied),
           len(jax.tree.leaves(params)))
  if not copied:
    raise ValueError(f'init_from {init_from!r} shares no parameter (same path and shape) '
                     'with this model')
  return new


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl lines with `step > step` (written after the checkpoint we resume)."""
  path = os.path.join(workdir, 'metrics.jsonl')
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


# Initialisation runs once: compile it cheaply (threefry for every parameter takes XLA:CPU ~4x
# longer to compile at the default optimisation level, and the run time is negligible anyway).
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _compile_fast(jitted, *args):
  return jitted.lower(*args).compile(compiler_options=_FAST_COMPILE)


def _init_train_state(cfg, model_config, policy, tx, loss_scale_mode):
  """(train state, non-parameter model variables) for a fresh run; meant to be jitted."""
  model = build_model(model_config, policy, cfg.seed)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  state = steps_lib.init_train_state(params, tx, jax.random.fold_in(jax.random.key(cfg.seed), 1))
  if loss_scale_mode == 'dynamic':
    state = steps_lib.set_loss_scale(state, precision_lib.DEFAULT_INITIAL_SCALE)
  return state, rest


# ----------------------------------------------------------------------------------------------
# train()
# ----------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict[str, Any]:
  """Trains (or resumes) the run in `cfg.workdir`; returns a summary dict.

  Summary keys: `step`, `start_step`, `stopped` ('done' | 'preempted' | 'time_budget'),
  `loss`, `val_bits_per_token`, `val_bits_per_byte`, `tokens_per_sec`, `skipped_steps`.
  """
  from jax_spec import data as data_lib  # pylint: disable=g-import-not-at-top
  from jax_spec.training import sharding  # pylint: disable=g-import-not-at-top

  cfg.validate()
  sharding.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  pidx, pcount = jax.process_index(), jax.process_count()
  is_main = pidx == 0
  workdir = os.path.abspath(cfg.workdir)
  os.makedirs(workdir, exist_ok=True)

  data = data_lib.load_data(cfg.tokenizer_kind, workdir, cfg.data_path, cfg.vocab_size)
  model_config = make_model_config(cfg, data.vocab_size)
  policy = precision_lib.get_policy(cfg.precision)
  loss_scale_mode = precision_lib.validate_loss_scale(cfg.loss_scale, policy)

  run_info = {'train': cfg.to_json(), 'model': dataclasses.asdict(model_config),
              'tokenizer': _tokenizer_info(data.tokenizer)}
  config_path = os.path.join(workdir, CONFIG_FILE)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  checkpointer = checkpointing.Checkpointer(ckpt_dir, max_to_keep=cfg.keep_checkpoints,
                                            save_interval_steps=cfg.checkpoint_every)
  if checkpointer.all_steps() and os.path.exists(config_path):
    with open(config_path) as f:
      _check_resume_config(config_path, json.load(f), run_info)
  if is_main:
    _write_json(config_path, run_info)

  mesh = sharding.make_mesh(data=cfg.mesh_data, fsdp=cfg.mesh_fsdp, tensor=cfg.mesh_tensor)
  tx, schedule = build_optimizer(cfg)
  init_fn = functools.partial(_init_train_state, cfg, model_config, policy, tx, loss_scale_mode)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(model_config, policy, cfg.seed)))
  abstract_state, abstract_rest = jax.eval_shape(init_fn)
  state_sh = _state_shardings(abstract_state, mesh)
  rest_sh = jax.tree.map(lambda _: sharding.replicated_sharding(mesh), abstract_rest)
  # One compiled program initialises everything, directly into its shardings (eager init would
  # compile one small program per parameter shape).
  state, rest = _compile_fast(jax.jit(init_fn, out_shardings=(state_sh, rest_sh)))()

  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_state, state_sh)
  restored = checkpointer.restore_latest(abstract)
  if restored is not None:
    start_step, state = restored
    log.info('Resumed from the checkpoint at step %d in %s.', start_step, ckpt_dir)
  else:
    start_step = 0
    if cfg.init_from:
      params = _load_init_params(cfg.init_from, state['params'])
      state['params'] = jax.device_put(params, state_sh['params'])
      state['opt_state'] = jax.jit(tx.init, out_shardings=state_sh['opt_state'])(state['params'])
  if int(state['step']) != start_step:
    raise checkpointing.CheckpointRestoreError(
        f'checkpoint directory {start_step} holds state step {int(state["step"])}')

  if is_main:
    truncate_metrics(workdir, start_step)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)

  batch_sh = sharding.batch_sharding(mesh)
  train_step = jax.jit(
      steps_lib.make_train_step(graphdef, rest, model_config, tx, schedule,
                                loss_scale=loss_scale_mode,
                                growth_interval=cfg.loss_scale_growth_interval,
                                mtp_lambda=cfg.mtp_lambda, medusa_weight=cfg.medusa_weight,
                                trainable=_trainable_filter(cfg)),
      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
  eval_step = jax.jit(
      steps_lib.make_eval_step(graphdef, rest, model_config, mtp_lambda=cfg.mtp_lambda,
                               medusa_weight=cfg.medusa_weight),
      in_shardings=(state_sh['params'], batch_sh))
  val_batches = data.validation_batches(cfg.batch_size, cfg.seq_len,
                                        num_batches=cfg.eval_batches, process_index=pidx,
                                        process_count=pcount)
  tokens_per_step = cfg.batch_size * cfg.seq_len

  def evaluate(params) -> dict[str, float]:
    nll, count, means = 0.0, 0, {}
    for batch in val_batches:
      sums, m = eval_step(params, sharding.make_global_batch(batch, mesh))
      sums, m = jax.device_get((sums, m))
      nll += float(sums['nll_sum'])
      count += int(sums['count'])
      for k, v in m.items():
        means[k] = means.get(k, 0.0) + float(v) / len(val_batches)
    bits_per_token = nll / max(count, 1) / math.log(2)
    out = {f'val_{k}': v for k, v in sorted(means.items())}
    out['val_bits_per_token'] = bits_per_token
    out['val_bits_per_byte'] = bits_per_token / data.bytes_per_token
    return out

  def save(step, force):
    meta = dict(run_info, step=int(step))
    return checkpointer.save(step, state, force=force, metadata=meta)

  summary: dict[str, Any] = {'start_step': start_step, 'stopped': 'done'}
  last_record: dict[str, Any] = {}
  bar = None
  if cfg.progress and is_main:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=cfg.steps, initial=start_step, desc='train', unit='step', dynamic_ncols=True)
  t_start = time.perf_counter()
  # tokens/s covers the train steps only: evaluation and checkpoint time is subtracted.
  t_window, window_steps, paused = time.perf_counter(), 0, 0.0
  step = start_step
  try:
    with checkpointing.PreemptionHandler() as preempt:
      while step < cfg.steps:
        batch = data.get_batch(cfg.seed, step, cfg.batch_size, cfg.seq_len, pidx, pcount)
        state, step_metrics = train_step(state, sharding.make_global_batch(batch, mesh))
        step += 1
        window_steps += 1
        record: dict[str, Any] = {}
        last = step == cfg.steps
        if step % cfg.log_every == 0 or last:
          m = jax.device_get(step_metrics)
          dt = time.perf_counter() - t_window - paused
          record.update({k: m[k] for k in sorted(m) if k != 'grads_finite'})
          record['tokens_per_sec'] = window_steps * tokens_per_step / max(dt, 1e-9)
          record['step_time_ms'] = 1000 * dt / window_steps
          t_window, window_steps, paused = time.perf_counter(), 0, 0.0
          if bar is not None:
            bar.set_postfix(loss=f'{float(m["loss"]):.4f}', refresh=False)
        if step % cfg.eval_every == 0 or last:
          jax.block_until_ready(state)
          t_eval = time.perf_counter()
          record.update(evaluate(state['params']))
          paused += time.perf_counter() - t_eval
        if record:
          last_record = writer.write(step, record)
        if last or step % cfg.checkpoint_every == 0:
          jax.block_until_ready(state)  # the step's own compute stays in the window
          t_save = time.perf_counter()
          save(step, force=last)
          paused += time.perf_counter() - t_save
        if bar is not None:
          bar.update(1)
        stop = None
        if preempt.requested:
          stop = 'preempted'
        elif cfg.minutes is not None and time.perf_counter() - t_start > 60 * cfg.minutes:
          stop = 'time_budget'
        if pcount > 1:  # every host must take the same decision
          from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
          code = multihost_utils.broadcast_one_to_all(
              np.int32({None: 0, 'preempted': 1, 'time_budget': 2}[stop]))
          stop = {0: None, 1: 'preempted', 2: 'time_budget'}[int(code)]
        if stop is not None and not last:
          log.warning('Stopping at step %d (%s); saving a checkpoint.', step, stop)
          if 'val_bits_per_token' not in record:  # report the stopped model's validation too
            last_record = {**last_record, **writer.write(step, evaluate(state['params']))}
          save(step, force=True)
          summary['stopped'] = stop
          break
  finally:
    if bar is not None:
      bar.close()
    checkpointer.close()
    writer.close()

  summary['step'] = step
  summary['skipped_steps'] = int(state['skipped_steps'])
  for k in ('loss', 'val_bits_per_token', 'val_bits_per_byte', 'tokens_per_sec', 'loss_scale'):
    if k in last_record:
      summary[k] = last_record[k]
  summary['elapsed_s'] = time.perf_counter() - t_start
  return summary


# ----------------------------------------------------------------------------------------------
# Loading a trained model (decoding experiments).
# ----------------------------------------------------------------------------------------------

def read_run_info(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'workdir {workdir!r} has no {CONFIG_FILE}; is it a training workdir?')
  with open(path) as f:
    return json.load(f)


def load_model_from_workdir(workdir: str, *, step: int | None = None, policy=None):
  """Rebuilds the trained model: returns `(model, tokenizer, model_config)`.

  Restores params from the latest checkpoint (or `step`); `policy` defaults to the training
  precision. The optimizer state is restored too (checkpoints are restored whole) and dropped.
  """
  from jax_spec.data import load_tokenizer  # pylint: disable=g-import-not-at-top
  from jax_spec.models import TransformerConfig  # pylint: disable=g-import-not-at-top
  info = read_run_info(workdir)
  cfg = TrainConfig(**{**info['train'], 'workdir': workdir, 'data_path': None,
                       'init_from': None})
  model_config = TransformerConfig(**info['model'])
  tokenizer = load_tokenizer(os.path.join(workdir, 'tokenizer'))
  if tokenizer.fingerprint != info['tokenizer']['fingerprint']:
    raise ValueError(f'{workdir}/tokenizer does not match the tokenizer the run was trained with')
  policy = precision_lib.get_policy(policy or cfg.precision)

  def init():
    model = build_model(model_config, policy, cfg.seed)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    tx, _ = build_optimizer(cfg)
    return steps_lib.init_train_state(params, tx, jax.random.key(0))

  abstract = jax.eval_shape(init)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    if step is None:
      restored = ckpt.restore_latest(abstract)
      if restored is None:
        raise ValueError(f'workdir {workdir!r} has no checkpoint')
      _, state = restored
    else:
      state = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  # The graph and any non-parameter variables come from a fresh model; params from the checkpoint.
  build = lambda: build_model(model_config, policy, cfg.seed)
  graphdef = nnx.graphdef(nnx.eval_shape(build))
  rest = _compile_fast(jax.jit(lambda: nnx.split(build(), nnx.Param, ...)[2]))()
  model = nnx.merge(graphdef, state['params'], rest)
  return model, tokenizer, model_config
