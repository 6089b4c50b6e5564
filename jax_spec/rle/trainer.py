"""Training loop shared by the pose and gaze experiments.

The model is split into (graphdef, params); the jitted step is a pure function of the train state
`{params, opt_state, loss_scale, step}` and a batch, so the state is checkpointed as one pytree
(`jax_spec.io.checkpointing.Checkpointer`) and a run resumes exactly: batches are a pure
function of (seed, step) (an epoch-wise permutation of the fixed training set).

Precision: the backbone runs in the policy's compute dtype; heads, flow and losses in fp32
(see models.py). fp16 uses the shared dynamic loss scale (`precision.loss_scaled_update`, as the
LM trainer): non-finite gradients skip the update and halve the scale, and the scale doubles
after `precision.DEFAULT_GROWTH_INTERVAL` finite steps.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from jax_spec import precision as precision_lib
from jax_spec.rle.models import Prediction, Regressor
from jax_spec.io.checkpointing import Checkpointer
from jax_spec.io.metrics import MetricsWriter


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 600
  batch_size: int = 32
  learning_rate: float = 2e-3
  weight_decay: float = 1e-4
  warmup_steps: int = 50
  seed: int = 0
  precision: str = 'fp32'
  log_every: int = 25
  checkpoint_every: int = 200
  # Learning-rate multiplier for the sigma head (params under a `fc_sigma` module). sigma starts
  # at sigmoid(0) = 1/2 of the image; at the shared rate its logit moves by only ~1 in a few
  # hundred steps, so sigma never reaches the error scale and cannot weight points (measured:
  # docs/benchmarks.md, RLE section).
  sigma_lr_mult: float = 1.0

  def __post_init__(self):
    if self.steps < 1:
      raise ValueError(f'steps must be >= 1, got {self.steps}')
    if self.batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {self.batch_size}')
    if not self.learning_rate > 0:
      raise ValueError(f'learning_rate must be > 0, got {self.learning_rate}')
    if not self.sigma_lr_mult > 0:
      raise ValueError(f'sigma_lr_mult must be > 0, got {self.sigma_lr_mult}')
    if self.log_every < 1 or self.checkpoint_every < 1:
      raise ValueError('log_every and checkpoint_every must be >= 1')
    precision_lib.get_policy(self.precision)


def batch_indices(step: int, batch_size: int, num: int, seed: int) -> np.ndarray:
  """Indices of the examples in batch `step`: epoch e visits permutation(seed, e) in order."""
  pos = np.arange(step * batch_size, (step + 1) * batch_size)
  out = np.empty_like(pos)
  for epoch in np.unique(pos // num):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(num)
    sel = pos // num == epoch
    out[sel] = perm[pos[sel] % num]
  return out


def to_float(images_uint8) -> np.ndarray:
  return np.asarray(images_uint8, np.float32) / 255.0


def _is_sigma_param(path) -> bool:
  return any(getattr(k, 'key', getattr(k, 'name', None)) == 'fc_sigma' for k in path)


def make_optimizer(config: TrainConfig):
  """AdamW with warmup + cosine decay; the sigma head's rate is scaled by `sigma_lr_mult`."""
  def schedule_for(peak):
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, min(config.warmup_steps, max(config.steps - 1, 1)), max(config.steps, 2),
        end_value=peak * 0.01)

  def adamw(peak):
    return optax.adamw(schedule_for(peak), weight_decay=config.weight_decay)

  schedule = schedule_for(config.learning_rate)
  if config.sigma_lr_mult == 1.0:
    inner = adamw(config.learning_rate)
  else:
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: 'sigma' if _is_sigma_param(path) else 'rest', params)
    inner = optax.multi_transform(
        {'rest': adamw(config.learning_rate),
         'sigma': adamw(config.learning_rate * config.sigma_lr_mult)}, labels)
  return optax.chain(optax.clip_by_global_norm(5.0), inner), schedule


def make_train_step(graphdef, rest, tx, *, fp16: bool,
                    growth_interval: int = precision_lib.DEFAULT_GROWTH_INTERVAL):
  """`train_step(state, images, targets, weights) -> (state, metrics)`; the update (and with fp16
  the dynamic loss scale: skip, halve, grow) is `precision.loss_scaled_update`, the LM trainer's."""
  precision_lib.make_dynamic_scale(growth_interval=growth_interval)  # validates it now

  def train_step(state, images, targets, weights):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest)
      return model.loss(model(images), targets, weights)

    update = precision_lib.loss_scaled_update(
        loss_fn, state['params'], state['opt_state'], state['loss_scale'], tx, dynamic=fp16,
        growth_interval=growth_interval)
    new_state = {'params': update.params, 'opt_state': update.opt_state,
                 'loss_scale': update.loss_scale, 'step': state['step'] + 1}
    return new_state, {'loss': update.value, 'grad_norm': optax.global_norm(update.grads),
                       'grads_finite': update.finite}

  return train_step


def predict(model: Regressor, images_uint8, batch_size: int = 256) -> Prediction:
  """Runs the model over `images` in batches; returns numpy mu, sigma (or None) and score."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def fwd(p, x):
    pred = nnx.merge(graphdef, p, rest)(x)
    return pred.mu, pred.sigma, pred.score

  mus, sigmas, scores = [], [], []
  n = len(images_uint8)
  for lo in range(0, n, batch_size):
    chunk = to_float(images_uint8[lo:lo + batch_size])
    pad = batch_size - len(chunk) if n > batch_size else 0   # one compiled shape
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    mu, sigma, score = jax.device_get(fwd(params, chunk))
    keep = slice(0, batch_size - pad)
    mus.append(mu[keep])
    scores.append(score[keep])
    if sigma is not None:
      sigmas.append(sigma[keep])
  return Prediction(mu=np.concatenate(mus), sigma=np.concatenate(sigmas) if sigmas else None,
                    score=np.concatenate(scores))


def train(model: Regressor, images, targets, weights, config: TrainConfig, workdir: str, *,
          desc: str = 'train', extra_metrics=None) -> Regressor:
  """Trains `model` in place on (uint8 images, normalized targets [N, K, D], weights [N, K]).

  Resumes from `workdir/checkpoints` if present; logs to `workdir/metrics.jsonl`.
  `extra_metrics(model) -> dict` (optional) is evaluated and logged at the end.
  """
  n = len(images)
  if targets.shape[0] != n or weights.shape != targets.shape[:2]:
    raise ValueError(f'images, targets and weights disagree: {images.shape}, {targets.shape}, '
                     f'{weights.shape}')
  policy = precision_lib.get_policy(config.precision)
  fp16 = policy.needs_loss_scale
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx, schedule = make_optimizer(config)
  state = {'params': params, 'opt_state': tx.init(params),
           'loss_scale': precision_lib.initial_loss_scale(fp16),
           'step': jnp.zeros((), jnp.int32)}
  ckpt = Checkpointer(os.path.join(workdir, 'checkpoints'), max_to_keep=2,
                      save_interval_steps=config.checkpoint_every)
  restored = ckpt.restore_latest(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                              state))
  start = 0
  if restored is not None:
    start, state = restored
    print(f'[{desc}] resumed from step {start}')
  step_fn = jax.jit(make_train_step(graphdef, rest, tx, fp16=fp16), donate_argnums=0)
  writer = MetricsWriter(workdir)
  targets = np.asarray(targets, np.float32)
  weights = np.asarray(weights, np.float32)
  window, t0, t_log = [], time.perf_counter(), None
  bar = tqdm(range(start, config.steps), desc=desc, initial=start, total=config.steps,
             mininterval=2.0, leave=False)
  for step in bar:
    idx = batch_indices(step, config.batch_size, n, config.seed)
    state, out = step_fn(state, to_float(images[idx]), targets[idx], weights[idx])
    window.append(out['loss'])
    done = step + 1
    if done % config.log_every == 0 or done == config.steps:
      losses = np.asarray(jax.device_get(window), np.float64)
      now = time.perf_counter()
      record = {'loss': float(np.mean(losses)), 'learning_rate': float(schedule(step)),
                'grad_norm': float(out['grad_norm']),
                'loss_scale': float(state['loss_scale']['scale'])}
      if t_log is not None:  # the first window includes compilation
        record['steps_per_sec'] = len(window) / (now - t_log)
      t_log = now
      writer.write(done, record)
      bar.set_postfix(loss=f'{record["loss"]:.4f}')
      window = []
    ckpt.save(done, state, force=done == config.steps)
  bar.close()
  ckpt.close()
  nnx.update(model, state['params'])
  if extra_metrics is not None:
    writer.write(config.steps, extra_metrics(model))
  writer.close()
  print(f'[{desc}] {config.steps - start} steps in {time.perf_counter() - t0:.1f}s')
  return model
