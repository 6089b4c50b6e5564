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
  # fp16 needs dynamic loss scaling; see jax_spec.training for the scale itself.
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
