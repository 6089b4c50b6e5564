"""Mixed-precision policies and the one loss-scaled optimizer update every trainer uses.

Parameters, gradients and optimizer state stay fp32 (master weights); matmuls run in
`compute_dtype`; norms, softmax statistics, logits and losses are fp32 (`output_dtype`).
`loss_scaled_update` is the fp16-aware step of both the language-model trainer
(`jax_spec.training.steps`) and the RLE trainer (`jax_spec.rle.trainer`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax.training.dynamic_scale import DynamicScale


@dataclasses.dataclass(frozen=True)
class Policy:
  name: str
  param_dtype: jnp.dtype
  compute_dtype: jnp.dtype
  output_dtype: jnp.dtype = jnp.float32
  # fp16 needs dynamic loss scaling (make_dynamic_scale below).
  needs_loss_scale: bool = False


POLICIES = {
    'fp32': Policy('fp32', jnp.float32, jnp.float32),
    'bf16': Policy('bf16', jnp.float32, jnp.bfloat16),
    'fp16': Policy('fp16', jnp.float32, jnp.float16, needs_loss_scale=True),
}


def get_policy(name: str | Policy) -> Policy:
  """Returns the policy called `name` (one of fp32, bf16, fp16)."""
  if isinstance(name, Policy):
    return name
  if name not in POLICIES:
    raise ValueError(f'precision must be one of {sorted(POLICIES)}, got {name!r}')
  return POLICIES[name]


# ----------------------------------------------------------------------------------------------
# Dynamic loss scaling (fp16).
#
# We use flax's maintained `flax.training.dynamic_scale.DynamicScale`: it is a plain pytree
# (`scale`, `fin_steps`) with a functional `value_and_grad`, so it composes with NNX through
# `nnx.split`/`nnx.merge` (the loss function is differentiated with respect to an `nnx.State`)
# and it can be checkpointed like any other array. Growth semantics: flax grows the scale on the
# first finite step *after* `growth_interval` finite steps have been counted; we pass
# `growth_interval - 1` so that the scale doubles exactly after `growth_interval` finite steps
# (the step that completes the interval is taken with the old scale, the next one with 2x), as
# jmp and PyTorch's GradScaler do.
# ----------------------------------------------------------------------------------------------

LOSS_SCALE_MODES = ('dynamic', 'none')
DEFAULT_INITIAL_SCALE = 2.0**15
DEFAULT_GROWTH_INTERVAL = 2000


def make_dynamic_scale(initial_scale: float = DEFAULT_INITIAL_SCALE,
                       growth_interval: int = DEFAULT_GROWTH_INTERVAL,
                       growth_factor: float = 2.0, backoff_factor: float = 0.5,
                       minimum_scale: float = 1.0):
  """A `flax.training.dynamic_scale.DynamicScale` that doubles after `growth_interval` finite steps.

  On a non-finite gradient the scale is multiplied by `backoff_factor` (not below
  `minimum_scale`) and the caller must skip the update (see `select_tree`).
  """
  if not initial_scale > 0:
    raise ValueError(f'initial_scale must be > 0, got {initial_scale!r}')
  if not isinstance(growth_interval, int) or growth_interval < 1:
    raise ValueError(f'growth_interval must be an int >= 1, got {growth_interval!r}')
  if not growth_factor >= 1:
    raise ValueError(f'growth_factor must be >= 1, got {growth_factor!r}')
  if not 0 < backoff_factor < 1:
    raise ValueError(f'backoff_factor must be in (0, 1), got {backoff_factor!r}')
  return DynamicScale(
      growth_factor=float(growth_factor), backoff_factor=float(backoff_factor),
      growth_interval=growth_interval - 1, minimum_scale=float(minimum_scale),
      fin_steps=jnp.zeros((), jnp.int32), scale=jnp.asarray(initial_scale, jnp.float32))


def validate_loss_scale(loss_scale: str, policy: Policy | str) -> str:
  """Checks `--loss_scale`; returns the effective mode ('dynamic' only matters for fp16)."""
  policy = get_policy(policy)
  if loss_scale not in LOSS_SCALE_MODES:
    raise ValueError(f'loss_scale must be one of {LOSS_SCALE_MODES}, got {loss_scale!r}')
  return loss_scale if policy.needs_loss_scale else 'none'


def all_finite(tree) -> jnp.ndarray:
  """True iff every leaf of `tree` is finite (a scalar bool array)."""
  leaves = jax.tree_util.tree_leaves(tree)
  finite = jnp.array(True)
  for leaf in leaves:
    finite &= jnp.all(jnp.isfinite(leaf))
  return finite


def select_tree(pred, on_true, on_false):
  """`jnp.where(pred, a, b)` leaf by leaf: keeps the old params/opt state on a skipped step."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def initial_loss_scale(dynamic: bool, initial_scale: float = DEFAULT_INITIAL_SCALE) -> dict:
  """The `{'scale', 'fin_steps'}` train-state entry: `initial_scale` if dynamic, else a constant 1."""
  return {'scale': jnp.asarray(initial_scale if dynamic else 1.0, jnp.float32),
          'fin_steps': jnp.zeros((), jnp.int32)}


class ScaledUpdate(NamedTuple):
  """What `loss_scaled_update` returns."""
  params: Any
  opt_state: Any
  loss_scale: dict        # the next `{'scale', 'fin_steps'}`
  value: Any              # loss_fn's (unscaled) value: loss, or (loss, aux) with has_aux
  grads: Any              # unscaled fp32 gradients (non-finite on an overflow)
  finite: jax.Array       # bool[]: every gradient finite (False: the update was skipped)


def loss_scaled_update(loss_fn: Callable, params, opt_state, loss_scale: dict,
                       tx: optax.GradientTransformation, *, dynamic: bool,
                       growth_interval: int = DEFAULT_GROWTH_INTERVAL,
                       has_aux: bool = False) -> ScaledUpdate:
  """One optimizer update of `params` on `loss_fn(params)`, with fp16 dynamic loss scaling.

  dynamic=True: the loss is multiplied by `loss_scale['scale']` before the backward pass,
  gradients are unscaled in fp32; a non-finite gradient skips the update (params and optimizer
  state keep their values) and halves the scale; `growth_interval` finite steps in a row double
  it (`make_dynamic_scale`). dynamic=False: plain gradients, every update applied, the scale
  entry passed through.
  """
  if dynamic:
    scaler = make_dynamic_scale(growth_interval=growth_interval).replace(
        scale=loss_scale['scale'], fin_steps=loss_scale['fin_steps'])
    new_scaler, finite, value, grads = scaler.value_and_grad(loss_fn, has_aux=has_aux)(params)
    loss_scale = {'scale': new_scaler.scale.astype(jnp.float32),
                  'fin_steps': new_scaler.fin_steps.astype(jnp.int32)}
  else:
    value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params)
    finite = all_finite(grads)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if dynamic:
    new_params = select_tree(finite, new_params, params)
    new_opt_state = select_tree(finite, new_opt_state, opt_state)
  return ScaledUpdate(new_params, new_opt_state, loss_scale, value, grads, finite)
