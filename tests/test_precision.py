"""Precision policies and fp16 dynamic loss scaling (on the real train step)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_spec import precision
from jax_spec.models import get_config
from jax_spec.rle import trainer as rle_trainer
from jax_spec.training import config as train_config
from jax_spec.training import state as train_state
from jax_spec.training import steps


def test_get_policy_and_validation():
  assert precision.get_policy('bf16').compute_dtype == jnp.bfloat16
  assert precision.get_policy('fp16').needs_loss_scale
  for name in ('fp32', 'bf16', 'fp16'):
    assert precision.get_policy(name).param_dtype == jnp.float32  # master weights
  with pytest.raises(ValueError, match='precision'):
    precision.get_policy('fp8')
  with pytest.raises(ValueError, match='loss_scale'):
    precision.validate_loss_scale('static', 'fp16')
  assert precision.validate_loss_scale('dynamic', 'fp16') == 'dynamic'
  assert precision.validate_loss_scale('dynamic', 'bf16') == 'none'  # only fp16 scales
  with pytest.raises(ValueError, match='growth_interval'):
    precision.make_dynamic_scale(growth_interval=0)
  with pytest.raises(ValueError, match='initial_scale'):
    precision.make_dynamic_scale(initial_scale=0.0)


def test_dynamic_scale_schedule_on_a_toy_loss():
  ds = precision.make_dynamic_scale(initial_scale=8.0, growth_interval=3)
  assert float(ds.scale) == 8.0
  grad_fn = jax.jit(lambda ds, p: ds.value_and_grad(lambda q: jnp.sum(q * q))(p))
  scales = []
  for _ in range(7):
    ds, finite, _, grad = grad_fn(ds, jnp.ones(2))
    assert bool(finite)
    np.testing.assert_allclose(grad, 2 * np.ones(2))  # unscaled
    scales.append(float(ds.scale))
  # Doubles right after every 3rd consecutive finite step.
  assert scales == [8, 8, 16, 16, 16, 32, 32]
  ds, finite, _, _ = grad_fn(ds, jnp.array([jnp.inf, 1.0]))
  assert not bool(finite) and float(ds.scale) == 16 and int(ds.fin_steps) == 0


@functools.lru_cache(maxsize=None)
def _fp16_setup(growth_interval):
  cfg = train_config.TrainConfig(workdir='/unused', config='tiny', steps=100, warmup_steps=0,
                                 learning_rate=1e-2, precision='fp16', mtp_depth=0, medusa_heads=0)
  mc = get_config('tiny', num_layers=1, mtp_depth=0, medusa_heads=0)
  setup = train_state.create_train_state(cfg, mc)
  state = setup.state
  step = jax.jit(steps.make_train_step(setup.graphdef, setup.rest, mc, setup.tx, setup.schedule,
                                       loss_scale='dynamic', growth_interval=growth_interval))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, mc.vocab_size, (2, 16)).astype(np.int32)
  batch = {'tokens': tokens, 'segment_ids': np.ones_like(tokens),
           'positions': np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape).copy()}
  # Unoptimised XLA code compiles ~2x faster; this checks the scaling logic, not speed.
  return state, train_state.compile_fast(step, state, batch), batch


def _tree_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_fp16_overflow_skips_step_and_halves_scale():
  state, step, batch = _fp16_setup(2)
  assert float(state['loss_scale']['scale']) == 2.0**15
  # A scale of 2**40 is fine in fp32 but overflows the fp16 backward pass: a real overflow.
  huge = steps.set_loss_scale(state, 2.0**40)
  new, m = step(huge, batch)
  assert not bool(m['grads_finite'])
  assert _tree_equal(new['params'], state['params'])
  assert _tree_equal(new['opt_state'], state['opt_state'])
  assert float(new['loss_scale']['scale']) == 2.0**39
  assert int(new['skipped_steps']) == 1 and int(new['step']) == 1
  assert np.isfinite(float(m['loss']))  # the loss itself is reported unscaled
  # The default scale trains normally: params move, nothing skipped.
  new, m = step(state, batch)
  assert bool(m['grads_finite']) and int(new['skipped_steps']) == 0
  assert not _tree_equal(new['params'], state['params'])
  assert np.isfinite(float(m['grad_norm'])) and float(m['grad_norm']) > 0


def test_fp16_scale_doubles_after_interval():
  state, step, batch = _fp16_setup(2)
  scales = []
  for _ in range(4):
    state, m = step(state, batch)
    assert bool(m['grads_finite'])
    scales.append(float(state['loss_scale']['scale']))
  assert scales == [2.0**15, 2.0**16, 2.0**16, 2.0**17]
  assert int(state['skipped_steps']) == 0


def _scale_trajectory(step, state):
  """(finite, next scale, next fin_steps, params kept) over one overflowing step at 2**40, then
  four finite steps from 2**10, the same script for any trainer's `step(state)`."""
  out = []
  for scale, num_steps in ((2.0**40, 1), (2.0**10, 4)):
    state = dict(state, loss_scale=precision.initial_loss_scale(True, scale))
    for _ in range(num_steps):
      new, m = step(state)
      out.append((bool(m['grads_finite']), float(new['loss_scale']['scale']),
                  int(new['loss_scale']['fin_steps']), _tree_equal(new['params'], state['params'])))
      state = new
  return out


class _TinyRegressor(nnx.Module):
  """What `rle.trainer` trains (`model(images)`, `model.loss(pred, targets, weights)`), with an
  fp16 matmul, so an fp16 backward can overflow; small so that it builds and compiles fast."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(12, 4, dtype=jnp.float16, rngs=rngs)

  def __call__(self, images):
    return self.dense(images.reshape(images.shape[0], -1)).astype(jnp.float32)

  def loss(self, pred, targets, weights):
    return jnp.mean(weights[..., None] * jnp.abs(pred.reshape(targets.shape) - targets))


def test_lm_and_rle_trainers_skip_halve_and_grow_identically():
  lm_state, lm_step, lm_batch = _fp16_setup(2)
  lm = _scale_trajectory(lambda s: lm_step(s, lm_batch), lm_state)

  graphdef, params, rest = nnx.split(_TinyRegressor(nnx.Rngs(0)), nnx.Param, ...)
  tx, _ = rle_trainer.make_optimizer(rle_trainer.TrainConfig(steps=10, warmup_steps=0))
  rle_state = {'params': params, 'opt_state': tx.init(params),
               'loss_scale': precision.initial_loss_scale(True), 'step': jnp.zeros((), jnp.int32)}
  rng = np.random.default_rng(0)
  batch = (rng.uniform(size=(4, 2, 2, 3)).astype(np.float32),
           rng.uniform(-1, 1, (4, 2, 2)).astype(np.float32), np.ones((4, 2), np.float32))
  rle_step = train_state.compile_fast(
      jax.jit(rle_trainer.make_train_step(graphdef, rest, tx, fp16=True, growth_interval=2)),
      rle_state, *batch)
  rle = _scale_trajectory(lambda s: rle_step(s, *batch), rle_state)
  # Skip and halve on the overflow; double after every 2 finite steps; updates applied then.
  want = [(False, 2.0**39, 0, True)] + [(True, 2.0**s, f, False)
                                        for s, f in ((10, 1), (11, 0), (11, 1), (12, 0))]
  assert lm == rle == want
