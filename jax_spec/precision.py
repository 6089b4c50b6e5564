"""Mixed-precision policies.

Parameters, gradients and optimizer state stay fp32 (master weights); matmuls run in
`compute_dtype`; norms, softmax statistics, logits and losses are fp32 (`output_dtype`).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp


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
  from flax.training.dynamic_scale import DynamicScale  # pylint: disable=g-import-not-at-top
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
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves(tree)
  finite = jnp.array(True)
  for leaf in leaves:
    finite &= jnp.all(jnp.isfinite(leaf))
  return finite


def select_tree(pred, on_true, on_false):
  """`jnp.where(pred, a, b)` leaf by leaf: keeps the old params/opt state on a skipped step."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)
