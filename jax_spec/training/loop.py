"""The training loop as a library function: `train(TrainConfig(...)) -> summary`.

Resumption: a run's identity is its workdir (jax_spec/training/workdir.py). `train` writes
`workdir/train_config.json` on the first start; a restart with the same workdir restores the
latest checkpoint (params, optimizer state, loss scale, step, rng), truncates `metrics.jsonl` to
the restored step and continues. Batches are `data.get_batch(seed, step, ...)`, a pure function of
the step, so no iterator state is needed and the resumed run's metrics equal an uninterrupted
run's bit for bit on CPU (timing fields such as tokens/s aside).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jax_spec import data as data_lib
from jax_spec import runtime
from jax_spec import pretrained
from jax_spec.io import checkpointing
from jax_spec.io import metrics as metrics_lib
from jax_spec.training import sharding
from jax_spec.training import workdir as workdir_lib
from jax_spec.training.config import CONFIG_FILE, TrainConfig, make_model_config
from jax_spec.training.restore import load_model_from_workdir
from jax_spec.training.state import copy_matching_params, create_train_state, make_step_fns

log = logging.getLogger(__name__)

# Fields of a metrics record that measure time, not the computation (they differ between runs).
TIMING_KEYS = ('tokens_per_sec', 'step_time_ms', 'elapsed_s', 'first_step_s')


def evaluate(eval_step, params, val_batches, mesh, bytes_per_token: float) -> dict[str, float]:
  """Validation metrics: means of the eval metrics and the main head's bits per token / byte."""
  nll, count, means = 0.0, 0, {}
  for batch in val_batches:
    sums, m = jax.device_get(eval_step(params, sharding.make_global_batch(batch, mesh)))
    nll += float(sums['nll_sum'])
    count += int(sums['count'])
    for k, v in m.items():
      means[k] = means.get(k, 0.0) + float(v) / len(val_batches)
  bits_per_token = nll / max(count, 1) / math.log(2)
  out = {f'val_{k}': v for k, v in sorted(means.items())}
  out['val_bits_per_token'] = bits_per_token
  out['val_bits_per_byte'] = bits_per_token / bytes_per_token
  return out


def _restore_or_start(cfg: TrainConfig, setup, checkpointer) -> tuple[int, dict[str, Any]]:
  """(start step, state): the latest checkpoint, else the fresh state (with `init_from`'s
  matching parameters copied in and the optimizer state initialised on them)."""
  state, shardings = setup.state, setup.state_shardings
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, shardings)
  restored = checkpointer.restore_latest(abstract)
  if restored is not None:
    start_step, state = restored
    log.info('Resumed from the checkpoint at step %d in %s.', start_step, checkpointer.directory)
  else:
    start_step = 0
    source = None
    if cfg.init_from:
      source, _, _ = load_model_from_workdir(cfg.init_from)
    elif cfg.init_from_hf:
      # Read straight into the trunk's storage dtype: a bf16 trunk never exists in fp32.
      source, _, _ = pretrained.from_pretrained(cfg.init_from_hf, tokenizer=False, heads=False,
                                                param_dtype=cfg.trunk_param_dtype)
    if source is not None:
      params = copy_matching_params(nnx.state(source, nnx.Param), state['params'],
                                    source_name=cfg.init_from or cfg.init_from_hf)
      state = dict(state, params=jax.device_put(params, shardings['params']))
      state['opt_state'] = jax.jit(setup.tx.init,
                                   out_shardings=shardings['opt_state'])(state['params'])
  if int(state['step']) != start_step:
    raise checkpointing.CheckpointRestoreError(
        f'checkpoint directory {start_step} holds state step {int(state["step"])}')
  return start_step, state


def _agree_on_stop(stop: str | None) -> str | None:
  """Every host of a multi-host run must take the same decision: process 0's."""
  if jax.process_count() == 1:
    return stop
  codes = (None, 'preempted', 'time_budget')
  return codes[int(multihost_utils.broadcast_one_to_all(np.int32(codes.index(stop))))]


def _latest_logged(workdir: str) -> dict[str, Any]:
  """The latest logged value of every metric in `workdir`'s metrics.jsonl ({} without one)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  return metrics_lib.latest_values(metrics_lib.read_metrics(path)) if os.path.exists(path) else {}


def train(cfg: TrainConfig) -> dict[str, Any]:
  """Trains (or resumes) the run in `cfg.workdir`; returns a summary dict.

  Summary keys: `step`, `start_step`, `stopped` ('done' | 'preempted' | 'time_budget'),
  `loss`, `val_bits_per_token`, `val_bits_per_byte`, `tokens_per_sec`, `skipped_steps`.
  """
  cfg.validate()
  sharding.initialize_distributed(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
  pidx, pcount = jax.process_index(), jax.process_count()
  is_main = pidx == 0
  workdir = os.path.abspath(cfg.workdir)
  os.makedirs(workdir, exist_ok=True)

  tokenizer = cfg.tokenizer_kind
  if cfg.init_from_hf:
    tokenizer = pretrained.load_tokenizer(cfg.init_from_hf)
  data = data_lib.load_data(tokenizer, workdir, cfg.data_path, cfg.vocab_size)
  model_config = make_model_config(cfg, data.vocab_size)
  run_info = workdir_lib.run_info(cfg, model_config, data.tokenizer)
  config_path = os.path.join(workdir, CONFIG_FILE)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR), max_to_keep=cfg.keep_checkpoints,
      save_interval_steps=cfg.checkpoint_every, async_save=cfg.async_checkpoint)
  try:
    if checkpointer.all_steps() and os.path.exists(config_path):
      with open(config_path) as f:
        workdir_lib.check_resume_config(config_path, json.load(f), run_info)
    if is_main:
      workdir_lib.write_json(config_path, run_info)

    mesh = sharding.make_mesh(data=cfg.mesh_data, fsdp=cfg.mesh_fsdp, tensor=cfg.mesh_tensor)
    setup = create_train_state(cfg, model_config, mesh=mesh)
    start_step, state = _restore_or_start(cfg, setup, checkpointer)
  except BaseException:
    # A refused resume is a usage error: close orbax's threads first, so that the exit is the
    # one error line and not also a background thread's traceback.
    checkpointer.close()
    raise
  if is_main:
    workdir_lib.truncate_metrics(workdir, start_step)
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)

  state_sh = setup.state_shardings
  batch_sh = sharding.batch_sharding(mesh)
  train_fn, eval_fn = make_step_fns(cfg, setup)
  train_step = jax.jit(train_fn, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                       donate_argnums=0)
  eval_step = jax.jit(eval_fn, in_shardings=(state_sh['params'], batch_sh))
  val_batches = data.validation_batches(cfg.batch_size, cfg.seq_len,
                                        num_batches=cfg.eval_batches, process_index=pidx,
                                        process_count=pcount)
  validate = lambda params: evaluate(eval_step, params, val_batches, mesh, data.bytes_per_token)
  save = lambda step, force: checkpointer.save(step, state, force=force,
                                               metadata=dict(run_info, step=int(step)))
  tokens_per_step = cfg.batch_size * cfg.seq_len

  summary: dict[str, Any] = {'start_step': start_step, 'stopped': 'done'}
  # A resumed run starts from its latest logged values: one resumed with no step left to run
  # (rerunning a finished command) reports its final loss and validation, not nothing.
  last_record: dict[str, Any] = _latest_logged(workdir) if start_step else {}
  bar = None
  if cfg.progress and is_main:
    bar = tqdm(total=cfg.steps, initial=start_step, desc='train', unit='step', dynamic_ncols=True)
  profiler = runtime.StepProfiler(cfg.profile_steps, os.path.join(workdir, 'profile'))
  t_start = time.perf_counter()
  # tokens/s covers the train steps only: evaluation and checkpoint time is subtracted, and the
  # first step of the process (which compiles) is reported apart as first_step_s.
  t_window, window_steps, paused = time.perf_counter(), 0, 0.0
  first_step_s = None
  step = start_step
  try:
    with checkpointing.PreemptionHandler() as preempt, profiler:
      while step < cfg.steps:
        profiler.step(step, wait_for=state)
        batch = data.get_batch(cfg.seed, step, cfg.batch_size, cfg.seq_len, pidx, pcount)
        state, step_metrics = train_step(state, sharding.make_global_batch(batch, mesh))
        step += 1
        if step == start_step + 1:
          jax.block_until_ready(state)
          first_step_s = time.perf_counter() - t_window
          t_window = time.perf_counter()
        else:
          window_steps += 1
        record: dict[str, Any] = {}
        last = step == cfg.steps
        if step % cfg.log_every == 0 or last:
          m = jax.device_get(step_metrics)
          record.update({k: m[k] for k in sorted(m) if k != 'grads_finite'})
          if first_step_s is not None:  # logged once, with the first record of the process
            record['first_step_s'], first_step_s = first_step_s, None
          if window_steps:
            dt = time.perf_counter() - t_window - paused
            record['tokens_per_sec'] = window_steps * tokens_per_step / max(dt, 1e-9)
            record['step_time_ms'] = 1000 * dt / window_steps
          t_window, window_steps, paused = time.perf_counter(), 0, 0.0
          if bar is not None:  # the sum of the losses, and the main head's (comparable to eval)
            bar.set_postfix(loss=f'{float(m["loss"]):.4f}',
                            main_loss=f'{float(m["main_loss"]):.4f}', refresh=False)
        if step % cfg.eval_every == 0 or last:
          jax.block_until_ready(state)
          t_eval = time.perf_counter()
          record.update(validate(state['params']))
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
        stop = _agree_on_stop(stop)
        if stop is not None and not last:
          log.warning('Stopping at step %d (%s); saving a checkpoint.', step, stop)
          if 'val_bits_per_token' not in record:  # report the stopped model's validation too
            last_record = {**last_record, **writer.write(step, validate(state['params']))}
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
