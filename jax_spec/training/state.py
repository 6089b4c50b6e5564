"""Creating a run's train state: model, optimizer, loss scale, shardings, jitted steps.

`create_train_state(cfg, model_config)` is what `train()` starts from and what benchmarks and
tests use to get the same state and step functions without running the loop.
"""
from __future__ import annotations

import functools
import math
import logging
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_spec import precision as precision_lib
from jax_spec.models import Transformer, TransformerConfig
from jax_spec.training import sharding
from jax_spec.training import steps as steps_lib
from jax_spec.training.config import TrainConfig, head_loss, trainable_filter

log = logging.getLogger(__name__)

# Initialisation runs once: compile it cheaply (threefry for every parameter takes XLA:CPU ~4x
# longer to compile at the default optimisation level, and the run time is negligible anyway).
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def compile_fast(jitted, *args):
  """`jitted` compiled for `args` without XLA's expensive optimisations (run-once programs,
  and tests that check logic rather than speed)."""
  return jitted.lower(*args).compile(compiler_options=_FAST_COMPILE)


def build_model(model_config: TransformerConfig, policy, seed: int) -> Transformer:
  return Transformer(model_config, policy=policy, rngs=nnx.Rngs(params=seed))


def build_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = steps_lib.make_schedule(learning_rate=cfg.learning_rate,
                                     warmup_steps=min(cfg.warmup_steps, cfg.steps),
                                     total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio)
  tx = steps_lib.make_optimizer(schedule, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                                trainable=trainable_filter(cfg))
  return tx, schedule


class TrainSetup(NamedTuple):
  """A fresh run: its train state and what the step functions close over."""
  state: steps_lib.State            # what the checkpoint stores (see steps.py)
  rest: Any                         # non-parameter model variables (rebuilt, never saved)
  graphdef: Any                     # the model's nnx graph
  model_config: TransformerConfig
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  loss_scale: str                   # resolved mode: 'dynamic' (fp16) or 'none'
  state_shardings: Any              # per-leaf shardings of `state` (None without a mesh)


def state_shardings(abstract_state: steps_lib.State, mesh) -> dict[str, Any]:
  repl = sharding.replicated_sharding(mesh)
  return {
      'params': sharding.param_shardings(abstract_state['params'], mesh),
      'opt_state': sharding.param_shardings(abstract_state['opt_state'], mesh),
      'loss_scale': jax.tree.map(lambda _: repl, abstract_state['loss_scale']),
      'step': repl,
      'skipped_steps': repl,
      'rng': repl,
  }


def storage_dtype_fn(cfg: TrainConfig) -> Callable[[str, Any], Any]:
  """`(parameter path, built dtype) -> dtype the run stores it in`: a frozen trunk's parameters in
  `cfg.trunk_param_dtype`, every trained parameter as built (the policy's fp32 master weights)."""
  trainable, trunk_dtype = trainable_filter(cfg), jnp.dtype(cfg.trunk_param_dtype)
  return lambda path, dtype: dtype if trainable is None or trainable(path) else trunk_dtype


def to_storage_dtypes(params, cfg: TrainConfig):
  """`params` (arrays) with each leaf in the dtype the run stores it in (`storage_dtype_fn`)."""
  dtype_of = storage_dtype_fn(cfg)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.astype(dtype_of(sharding.path_to_str(p), x.dtype)), params)


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of `tree` (arrays or ShapeDtypeStructs), exactly."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _init(cfg, model_config, policy, tx, loss_scale_mode):
  """(train state, non-parameter model variables) of a fresh run; jitted by the caller."""
  model = build_model(model_config, policy, cfg.seed)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  params = to_storage_dtypes(params, cfg)  # a frozen trunk in its storage dtype
  state = steps_lib.init_train_state(params, tx, jax.random.fold_in(jax.random.key(cfg.seed), 1),
                                     dynamic_loss_scale=loss_scale_mode == 'dynamic')
  return state, rest


def create_train_state(cfg: TrainConfig, model_config: TransformerConfig, *,
                       mesh=None) -> TrainSetup:
  """Initialises the train state of `cfg` (precision, optimizer, seed) for `model_config`.

  With a `mesh`, one compiled program initialises every array directly into its sharding (eager
  init would compile one small program per parameter shape); without, on the default device.
  """
  policy = precision_lib.get_policy(cfg.precision)
  loss_scale_mode = precision_lib.validate_loss_scale(cfg.loss_scale, policy)
  tx, schedule = build_optimizer(cfg)
  init_fn = functools.partial(_init, cfg, model_config, policy, tx, loss_scale_mode)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(model_config, policy, cfg.seed)))
  shardings = None
  if mesh is None:
    jitted = jax.jit(init_fn)
  else:
    abstract_state, abstract_rest = jax.eval_shape(init_fn)
    shardings = state_shardings(abstract_state, mesh)
    rest_sh = jax.tree.map(lambda _: sharding.replicated_sharding(mesh), abstract_rest)
    jitted = jax.jit(init_fn, out_shardings=(shardings, rest_sh))
  state, rest = compile_fast(jitted)()
  return TrainSetup(state, rest, graphdef, model_config, tx, schedule, loss_scale_mode, shardings)


def make_step_fns(cfg: TrainConfig, setup: TrainSetup) -> tuple[Callable, Callable]:
  """`(train_step, eval_step)` of the run, not jitted (see `steps.make_train_step`)."""
  train_step = steps_lib.make_train_step(
      setup.graphdef, setup.rest, setup.model_config, setup.tx, setup.schedule,
      loss_scale=setup.loss_scale, growth_interval=cfg.loss_scale_growth_interval,
      mtp_lambda=cfg.mtp_lambda, medusa_weight=cfg.medusa_weight,
      trainable=trainable_filter(cfg), head=head_loss(cfg))
  eval_step = steps_lib.make_eval_step(setup.graphdef, setup.rest, setup.model_config,
                                       mtp_lambda=cfg.mtp_lambda,
                                       medusa_weight=cfg.medusa_weight, head=head_loss(cfg))
  return train_step, eval_step


def copy_matching_params(source_params, params, *, source_name: str):
  """`params` with every array that `source_params` has at the same path and shape replaced by
  the source's, in the dtype of `params` (e.g. a trained trunk under new heads, stored in bf16
  with a frozen bf16 trunk)."""
  src = {sharding.path_to_str(p): x
         for p, x in jax.tree_util.tree_flatten_with_path(source_params)[0]}
  copied = []

  def take(path, x):
    key = sharding.path_to_str(path)
    y = src.get(key)
    if y is not None and y.shape == x.shape:
      copied.append(key)
      return jnp.asarray(y, x.dtype)
    return x

  new = jax.tree_util.tree_map_with_path(take, params)
  log.info('init_from %s: copied %d of %d parameter arrays.', source_name, len(copied),
           len(jax.tree.leaves(params)))
  if not copied:
    raise ValueError(f'init_from {source_name!r} shares no parameter (same path and shape) '
                     'with this model')
  return new
