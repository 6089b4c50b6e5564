"""Logits processors and sampling.

`target_probs` turns fp32 logits into the distribution p the sampler draws from: temperature, then
top-k, then top-p (the Hugging Face order). Temperature 0 means greedy: p is the one-hot of the
argmax (first index on ties, like `jnp.argmax`). The speculative acceptance rules compare draft
tokens against exactly this p, which is what makes rejection sampling lossless with respect to the
processed target distribution, not just the raw softmax.

The sampling settings are static Python numbers (they select code paths; a new setting compiles a
new program once).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jax_spec.decoding import prng


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature >= 0 (0 = greedy), top_k >= 0 (0 = off), 0 < top_p <= 1 (1 = off)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    validate_sampling(self.temperature, self.top_k, self.top_p)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def validate_sampling(temperature, top_k, top_p):
  if not isinstance(temperature, (int, float)) or not temperature >= 0:
    raise ValueError(f'temperature must be a Python float >= 0, got {temperature!r}')
  if not isinstance(top_k, int) or top_k < 0:
    raise ValueError(f'top_k must be an int >= 0 (0 = off), got {top_k!r}')
  if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
    raise ValueError(f'top_p must be a float in (0, 1], got {top_p!r}')


def _top_k_mask(logits_NV, top_k):
  if top_k == 0 or top_k >= logits_NV.shape[-1]:
    return logits_NV
  kth_N1 = jax.lax.top_k(logits_NV, top_k)[0][..., -1:]
  return jnp.where(logits_NV >= kth_N1, logits_NV, -jnp.inf)


def _top_p_mask(probs_NV, top_p):
  """Keeps the smallest set of most likely tokens whose mass reaches top_p (ties at the edge kept)."""
  if top_p >= 1.0:
    return probs_NV
  sorted_NV = -jnp.sort(-probs_NV, axis=-1)
  mass_before_NV = jnp.cumsum(sorted_NV, axis=-1) - sorted_NV
  keep_sorted_NV = mass_before_NV < top_p      # the most likely token is always kept
  num_kept_N1 = jnp.sum(keep_sorted_NV, axis=-1, keepdims=True)
  threshold_N1 = jnp.take_along_axis(sorted_NV, num_kept_N1 - 1, axis=-1)
  kept_NV = jnp.where(probs_NV >= threshold_N1, probs_NV, 0.0)
  return kept_NV / jnp.sum(kept_NV, axis=-1, keepdims=True)


def target_probs(logits_NV, *, temperature=0.0, top_k=0, top_p=1.0):
  """Logits `[..., V]` -> fp32 probabilities `[..., V]` of the processed target distribution."""
  validate_sampling(temperature, top_k, top_p)
  logits_NV = logits_NV.astype(jnp.float32)
  vocab = logits_NV.shape[-1]
  if temperature == 0:
    return jax.nn.one_hot(jnp.argmax(logits_NV, axis=-1), vocab, dtype=jnp.float32)
  logits_NV = _top_k_mask(logits_NV / temperature, top_k)
  return _top_p_mask(jax.nn.softmax(logits_NV, axis=-1), top_p)


def sample_probs(rng, probs_NV):
  """One token per row from probabilities `[..., V]` (zero-probability tokens are never drawn)."""
  return sample_probs_exponential(probs_NV, prng.exponential(rng, probs_NV.shape))


def sample_probs_exponential(probs_NV, exponential_NV):
  """`sample_probs` with its noise drawn beforehand: argmax(p / e), e i.i.d. standard exponential
  (the exponential race, token i arriving at e_i / p_i). It is the Gumbel-max trick argmax(log p +
  g) with g = -log e, the same sample from the same uniforms, at one log per token, not three;
  loops draw a step's noise for all its samples in one `prng` call. Zero-probability tokens score
  0 and the largest score is >= max(p) / 88 > 0, so they are never drawn."""
  return jnp.argmax(probs_NV / exponential_NV, axis=-1).astype(jnp.int32)


def step_keys(rng, num_steps: int, num_keys: int = 1):
  """Keys `[num_steps, num_keys]` of a decode loop's steps: row i is `split(fold_in(rng, i),
  num_keys)`, all rows made before the loop in one batched PRNG call (not a `fold_in` and a
  `split` inside every step). Row i does not depend on `num_steps`, so a longer call with the same
  `rng` repeats a shorter one's tokens."""
  steps = jnp.arange(num_steps, dtype=jnp.uint32)
  return jax.vmap(lambda i: jax.random.split(jax.random.fold_in(rng, i), num_keys))(steps)


def sample_logits(rng, logits_NV, *, temperature=0.0, top_k=0, top_p=1.0):
  """Samples from `target_probs(logits)`; greedy (temperature 0) is an argmax and ignores `rng`."""
  if temperature == 0:
    validate_sampling(temperature, top_k, top_p)
    return jnp.argmax(logits_NV, axis=-1).astype(jnp.int32)
  probs_NV = target_probs(logits_NV, temperature=temperature, top_k=top_k, top_p=top_p)
  return sample_probs(rng, probs_NV)
