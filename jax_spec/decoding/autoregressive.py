"""Autoregressive baseline `generate`: prefill, then one token per step inside one jitted `lax.while_loop`.

This is what the speculative sampler is measured against and must match (greedy: token for token).
The model is split outside (`nnx.split`, `decoding.prepare`) and merged inside the jitted function,
so the weights are arguments, not baked-in constants, and one compiled program serves every call
with the same shapes and settings.
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_spec import models
from jax_spec.decoding import prepared as prepared_lib
from jax_spec.decoding import sampling
from jax_spec.kernels import rows_matmul


class GenerateOutput(NamedTuple):
  tokens_BN: jax.Array    # int32 [B, max_new_tokens]; pad_id after each row's length
  lengths_B: jax.Array    # int32 [B]; number of generated tokens (EOS included)


def _int_array(name, x, hint=''):
  """`x` as a JAX array; text or other non-numbers are a ValueError naming the argument (JAX's
  own TypeError would come from deep inside)."""
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
      raise ValueError(f'{name} must hold integers, got {x.dtype} values{hint}')
  return jnp.asarray(x)


def validate_prompts(model, prompts_BT, prompt_lengths_B, max_new_tokens, eos_id, pad_id):
  """Shared input checks of `generate` and `speculative_generate` (`model`: a Transformer)."""
  prompts_BT = _int_array('prompts_BT', prompts_BT, ' (token ids: encode text with the '
                          'tokenizer first, e.g. tokenizer.encode)')
  prompt_lengths_B = _int_array('prompt_lengths_B', prompt_lengths_B)
  if prompts_BT.ndim != 2 or not jnp.issubdtype(prompts_BT.dtype, jnp.integer):
    raise ValueError(f'prompts_BT must be an int [batch, prompt_len] array, got '
                     f'{prompts_BT.dtype} {prompts_BT.shape}')
  if prompt_lengths_B.shape != prompts_BT.shape[:1] or not jnp.issubdtype(prompt_lengths_B.dtype,
                                                                           jnp.integer):
    raise ValueError(f'prompt_lengths_B must be int [{prompts_BT.shape[0]}], got '
                     f'{prompt_lengths_B.dtype} {prompt_lengths_B.shape}')
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be an int >= 1, got {max_new_tokens!r}')
  vocab = model.config.vocab_size
  if eos_id is not None and (not isinstance(eos_id, int) or not 0 <= eos_id < vocab):
    raise ValueError(f'eos_id must be None or an int in [0, {vocab}), got {eos_id!r}')
  if not isinstance(pad_id, int) or not 0 <= pad_id < vocab:
    raise ValueError(f'pad_id must be an int in [0, {vocab}), got {pad_id!r}')
  if not isinstance(prompt_lengths_B, jax.core.Tracer):
    lengths = jax.device_get(prompt_lengths_B)
    if lengths.min() < 1 or lengths.max() > prompts_BT.shape[1]:
      raise ValueError(f'prompt_lengths_B must be in [1, {prompts_BT.shape[1]}] (the padded prompt '
                       f'length), got {lengths.tolist()}')
  return prompts_BT.astype(jnp.int32), prompt_lengths_B.astype(jnp.int32)


# Default caches round the slots a request needs up to this multiple: the GPU decode kernel's key
# blocks tile the cache in 16s (any other length is padded, i.e. copied, at every call).
CACHE_SLOT_MULTIPLE = 16


def check_cache_len(cache_len, needed, what):
  """`cache_len`, checked to hold `needed` slots; None: `needed` rounded up to a multiple of 16.

  The default is sized to the request, not to the model's `max_seq_len`: XLA's cache attention
  reads every slot (masked), so on CPU plain decoding of a 64 + 160 token request with `small` is
  1.35-1.55x faster with the 224 slots it needs than with 512 (docs/benchmarks.md, "Cache length").
  """
  if cache_len is None:
    return -(-needed // CACHE_SLOT_MULTIPLE) * CACHE_SLOT_MULTIPLE
  if not isinstance(cache_len, int) or cache_len < needed:
    raise ValueError(f'cache_len={cache_len!r} is too small: {what} needs {needed} slots')
  return cache_len


def matmul_precision(model):
  """Context for tracing a decoder: full-precision matmuls when the model computes in fp32.

  Speculative greedy decoding equals plain decoding only if a T-token verify forward computes the
  same logits as T one-token steps. On GPUs, XLA's default precision runs fp32 matmuls with TF32
  inputs in tensor-core GEMMs (T rows) but not in the GEMV of a one-token step, so the two differ
  at TF32 rounding (~1e-3) and greedy near-ties flip. 'highest' keeps both in fp32. No effect on
  CPUs (XLA:CPU computes fp32 matmuls in fp32) or for bf16/fp16 models (see docs/benchmarks.md
  for bf16 on GPUs).
  """
  if jnp.dtype(model.policy.compute_dtype) == jnp.float32:
    return jax.default_matmul_precision('highest')
  return contextlib.nullcontext()


def generate(model, prompts_BT, prompt_lengths_B, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, pad_id: int = 0,
             rng=None, cache_len: int | None = None) -> GenerateOutput:
  """Samples up to `max_new_tokens` tokens after each right-padded prompt.

  A row stops after emitting `eos_id` (it is included in the row's length); positions after the
  length hold `pad_id`. Temperature 0 is greedy (no `rng` needed). `cache_len` defaults to
  `prompt_len + max_new_tokens` (the padded prompt length) rounded up to a multiple of 16.
  `model`: a Transformer, or one `decoding.prepare`d once for many calls.
  """
  prompts_BT, prompt_lengths_B = validate_prompts(prepared_lib.model_of(model), prompts_BT,
                                                  prompt_lengths_B, max_new_tokens, eos_id, pad_id)
  prepared = prepared_lib.as_prepared(model)
  config = sampling.SamplingConfig(temperature, top_k, top_p)
  if rng is None:
    if not config.greedy:
      raise ValueError('rng must be a jax.random key when temperature > 0')
    rng = jax.random.key(0)
  cache_len = check_cache_len(cache_len, prompts_BT.shape[1] + max_new_tokens,
                              f'a prompt of {prompts_BT.shape[1]} plus {max_new_tokens} new tokens')
  trunk = prepared.trunk
  with matmul_precision(prepared.model):
    return _generate(trunk.static, trunk.state, trunk.packs, prompts_BT, prompt_lengths_B, rng,
                     eos_array(eos_id), max_new_tokens=max_new_tokens, sampling_config=config,
                     pad_id=pad_id, cache_len=cache_len)


def eos_array(eos_id):
  """EOS as a traced int32 (-1 = none), so changing it never recompiles."""
  return jnp.int32(-1 if eos_id is None else eos_id)


def emit_first_token(logits_BTV, prompt_lengths_B, rng, sampling_config):
  """The token after each prompt, from the prefill logits at position `prompt_len - 1`."""
  last_BV = jnp.take_along_axis(logits_BTV, (prompt_lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return sampling.sample_logits(rng, last_BV, temperature=sampling_config.temperature,
                                top_k=sampling_config.top_k, top_p=sampling_config.top_p)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'sampling_config',
                                             'pad_id', 'cache_len'))
def _generate(graphdef, state, packs, prompts_BT, prompt_lengths_B, rng, eos_id, *, max_new_tokens,
              sampling_config, pad_id, cache_len):
  model, packs_by_key = prepared_lib.merge(graphdef, state, packs)
  with rows_matmul.packed(packs_by_key):   # the prefill's and every step's: none packed here
    batch = prompts_BT.shape[0]
    sc = sampling_config
    cache = models.init_cache(model, batch, cache_len)
    outs, cache = models.prefill(model, prompts_BT, prompt_lengths_B, cache)
    keys_N = sampling.step_keys(rng, max_new_tokens)[:, 0]   # token i's key: keys_N[i]
    first_B = emit_first_token(outs.logits_BTV, prompt_lengths_B, keys_N[0], sc)
    tokens_BN = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
    done_B = first_B == eos_id
    lengths_B = jnp.ones((batch,), jnp.int32)
    rows_B = jnp.arange(batch)
    depths_B1 = jnp.zeros((batch, 1), jnp.int32)
    mask_B11 = jnp.ones((batch, 1, 1), bool)

    def cond(carry):
      step, _, _, _, done_B, _ = carry
      return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(carry):
      step, cache, last_B, tokens_BN, done_B, lengths_B = carry
      outs, cache = models.extend(model, last_B[:, None], depths_B1, mask_B11, cache)
      cache = models.advance(cache, (~done_B).astype(jnp.int32))
      next_B = sampling.sample_logits(keys_N[step], outs.logits_BTV[:, 0],
                                      temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p)
      next_B = jnp.where(done_B, pad_id, next_B)
      tokens_BN = tokens_BN.at[rows_B, step].set(next_B)
      lengths_B = lengths_B + (~done_B).astype(jnp.int32)
      done_B = done_B | (next_B == eos_id)
      return step + 1, cache, next_B, tokens_BN, done_B, lengths_B

    carry = (jnp.int32(1), cache, first_B, tokens_BN, done_B, lengths_B)
    _, _, _, tokens_BN, _, lengths_B = jax.lax.while_loop(cond, body, carry)
    return GenerateOutput(tokens_BN, lengths_B)
