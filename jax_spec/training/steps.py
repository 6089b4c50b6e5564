"""Optimizer, train state and the jitted train / eval steps.

The train state is a plain dict pytree, which is exactly what the checkpoint stores:

  params        nnx.State of the model's `nnx.Param`s (fp32 master weights; a frozen trunk in
                its storage dtype, `TrainConfig.trunk_param_dtype`)
  opt_state     optax state (AdamW moments, fp32; nothing for frozen parameters)
  loss_scale    {'scale': f32[], 'fin_steps': i32[]} (dynamic loss scaling; constant 1 otherwise)
  step          i32[]: number of steps taken (skipped ones included)
  skipped_steps i32[]: steps whose update was skipped because of a non-finite gradient
  rng           u32[2]: the run's base key data (per-step keys are `fold_in(rng, step)`)

`train_step(state, batch) -> (state, metrics)` is a pure function of its inputs (the model graph
and hyper-parameters are closed over), so resuming from a checkpoint and replaying the same
step-indexed batches reproduces an uninterrupted run bit for bit on CPU.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_spec import precision as precision_lib
from jax_spec.models import eagle as eagle_lib
from jax_spec.models.losses import HeadLoss, compute_losses, trunk_agreement
from jax_spec.training.sharding import path_to_str

State = dict[str, Any]


# Top-level parameter groups of the draft heads; `freeze_trunk` trains only these.
HEAD_PARAM_GROUPS = ('mtp', 'medusa', 'eagle')

def head_params(path: str) -> bool:
  """Trainable filter of the frozen-trunk setting (Medusa-1, EAGLE): only draft-head parameters.

  Every other parameter (embedding, blocks, final norm, LM head) gets `stop_gradient` in the loss,
  so there is no backward pass through the trunk, and zero updates."""
  return path.split('/', 1)[0] in HEAD_PARAM_GROUPS


def _labels(params, trainable: Callable[[str], bool] | None):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: 'train' if trainable is None or trainable(path_to_str(p)) else 'frozen', params)


def make_schedule(*, learning_rate: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to `min_lr_ratio * lr`."""
  if not learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0, got {learning_rate!r}')
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps must be >= 0, got {warmup_steps!r}')
  if total_steps < 1:
    raise ValueError(f'steps must be >= 1, got {total_steps!r}')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=learning_rate * min_lr_ratio)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, eps: float = 1e-8, grad_clip: float = 1.0,
                   trainable: Callable[[str], bool] | None = None
                   ) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) after global-norm clipping; frozen params get zero updates."""
  if grad_clip is not None and not grad_clip > 0:
    raise ValueError(f'grad_clip must be > 0 or None, got {grad_clip!r}')
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  parts = []
  if grad_clip is not None:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask))
  tx = optax.chain(*parts)
  if trainable is None:
    return tx
  return optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               lambda params: _labels(params, trainable))


def init_train_state(params, tx: optax.GradientTransformation, rng: jax.Array, *,
                     dynamic_loss_scale: bool = False) -> State:
  """A fresh state; with `dynamic_loss_scale` the loss scale starts at the fp16 default."""
  return {
      'params': params,
      'opt_state': tx.init(params),
      'loss_scale': precision_lib.initial_loss_scale(dynamic_loss_scale),
      'step': jnp.zeros((), jnp.int32),
      'skipped_steps': jnp.zeros((), jnp.int32),
      'rng': jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng,
  }


def set_loss_scale(state: State, scale: float) -> State:
  return dict(state, loss_scale=precision_lib.initial_loss_scale(True, scale))


def _forward_losses(graphdef, rest, params, batch, model_config, mtp_lambda, medusa_weight,
                    head: HeadLoss):
  """-> (loss, metrics, ModelOutputs, EAGLE `Unrolled` or None)."""
  model = nnx.merge(graphdef, params, rest)
  tokens, positions, seg = batch['tokens'], batch['positions'], batch['segment_ids']
  outputs = model(tokens, positions_BT=positions, segment_ids_BT=seg)
  eagle = None
  if model_config.eagle_layers:
    eagle = eagle_lib.unroll(model, outputs.hidden_BTD, tokens, steps=head.eagle_steps,
                             positions_BT=positions, segment_ids_BT=seg)
  loss, metrics = compute_losses(outputs, tokens, seg, model_config, mtp_lambda=mtp_lambda,
                                 medusa_weight=medusa_weight, eagle=eagle, head=head)
  return loss, metrics, outputs, eagle


def make_train_step(graphdef, rest, model_config, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, loss_scale: str = 'none',
                    growth_interval: int = precision_lib.DEFAULT_GROWTH_INTERVAL,
                    mtp_lambda: float = 0.3, medusa_weight: float = 0.8,
                    trainable: Callable[[str], bool] | None = None, head: HeadLoss = HeadLoss()):
  """Returns `train_step(state, batch) -> (state, metrics)`, not jitted (it is jitted with the
  state's shardings by `training.state.make_step_fns`).

  trainable: a filter on parameter paths (e.g. `head_params` for a frozen trunk); the others get
  `stop_gradient` (no backward pass into them) and zero updates (see `make_optimizer`).
  head: the head-loss options (targets, EAGLE steps and weights).

  loss_scale='dynamic': the loss is multiplied by the current scale before the backward pass,
  gradients are unscaled in fp32, and a non-finite gradient skips the update (params and optimizer
  state keep their old values), halves the scale and increments `skipped_steps`.
  loss_scale='none': plain gradients, every update applied (what fp16 underflow looks like).
  """
  if loss_scale not in precision_lib.LOSS_SCALE_MODES:
    raise ValueError(f'loss_scale must be one of {precision_lib.LOSS_SCALE_MODES}, '
                     f'got {loss_scale!r}')
  dynamic = loss_scale == 'dynamic'
  precision_lib.make_dynamic_scale(growth_interval=growth_interval)  # validates it now

  def train_step(state: State, batch: dict[str, jax.Array]):
    params = state['params']

    def loss_fn(p):
      if trainable is not None:  # e.g. a frozen trunk: no gradient (and no backward pass) into it
        p = jax.tree_util.tree_map_with_path(
            lambda path, x: x if trainable(path_to_str(path)) else jax.lax.stop_gradient(x), p)
      loss, metrics, _, _ = _forward_losses(graphdef, rest, p, batch, model_config, mtp_lambda,
                                            medusa_weight, head)
      return loss, metrics

    update = precision_lib.loss_scaled_update(
        loss_fn, params, state['opt_state'], state['loss_scale'], tx, dynamic=dynamic,
        growth_interval=growth_interval, has_aux=True)
    (loss, metrics), grads, finite = update.value, update.grads, update.finite
    new_params, new_opt_state, new_loss_scale = update.params, update.opt_state, update.loss_scale
    if trainable is not None:  # frozen leaves pass through bit for bit (p + 0 would turn -0 to +0)
      new_params = jax.tree_util.tree_map_with_path(
          lambda path, new, old: new if trainable(path_to_str(path)) else old, new_params, params)
    grad_norm = optax.global_norm(grads)
    skipped = jnp.logical_not(finite) if dynamic else jnp.zeros((), bool)
    # Learning rate used by this update: optax's count only advances on applied updates.
    lr = schedule(state['step'] - state['skipped_steps'])
    new_state = {
        'params': new_params,
        'opt_state': new_opt_state,
        'loss_scale': new_loss_scale,
        'step': state['step'] + 1,
        'skipped_steps': state['skipped_steps'] + skipped.astype(jnp.int32),
        'rng': state['rng'],
    }
    out = dict(metrics)
    out.update(loss=loss, grad_norm=grad_norm, learning_rate=lr,
               loss_scale=state['loss_scale']['scale'], grads_finite=finite,
               skipped_steps=new_state['skipped_steps'])
    return new_state, out

  return train_step


def make_eval_step(graphdef, rest, model_config, *, mtp_lambda: float = 0.3,
                   medusa_weight: float = 0.8, head: HeadLoss = HeadLoss()):
  """Returns `eval_step(params, batch) -> sums` for bits-per-token validation.

  `nll_sum` / `count` are over the main head's predicted tokens: a target counts iff it is in the
  same (non-padding) document as its context token. Head metrics are batch means: besides the
  training metrics, `{kind}_trunk_acc_k` (`models.trunk_agreement`), each head's agreement with the
  trunk's argmax, beside its accuracy against the data `{kind}_acc_k`.
  """

  def eval_step(params, batch):
    loss, metrics, outputs, eagle = _forward_losses(graphdef, rest, params, batch, model_config,
                                                    mtp_lambda, medusa_weight, head)
    tokens, seg = batch['tokens'], batch['segment_ids']
    logp_BTV = jax.nn.log_softmax(outputs.logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    nll_BT = -jnp.take_along_axis(logp_BTV, tokens[:, 1:, None], axis=-1)[..., 0]
    mask_BT = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    sums = {'nll_sum': jnp.sum(jnp.where(mask_BT, nll_BT, 0.0)),
            'count': jnp.sum(mask_BT.astype(jnp.int32))}
    means = dict(metrics)
    means.update(trunk_agreement(outputs, tokens, seg, model_config, eagle))
    means['loss'] = loss
    return sums, means

  return eval_step
