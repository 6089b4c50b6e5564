"""Text in, text out: `generate_text(model, tokenizer, prompts)` over either sampler, streaming.

Streaming. Both samplers are one jitted `lax.while_loop` from prefill to the last token; the host
sees nothing until it returns. To stream, `generate_text` runs the sampler in chunks of
`chunk_tokens` new tokens: every call gets the prompts plus everything emitted so far, right-padded
into ONE fixed shape (prompt width + max_new_tokens), so all chunks share one compiled program;
after each chunk the new text of every row goes to `on_text`. What this keeps and costs:
- lossless: each chunk is the same sampler continuing the same sequences. Greedy output equals one
  unchunked call token for token as long as a prefill and decode steps give the same argmax (the
  same property speculative verification relies on; tests check it); sampled tokens are still
  drawn from the target's conditionals (a fresh key per chunk).
- cost: one prefill of the sequence so far per chunk (the KV cache is rebuilt), and a speculative
  step cut at a chunk boundary. With `on_text=None` there is a single call and no overhead.
The alternative, a host callback inside the loop at each emission, would stream token by token
with no re-prefill but needs the callback threaded through both samplers' loops.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_spec.decoding import autoregressive
from jax_spec.decoding import prepared as prepared_lib
from jax_spec.decoding import speculative


# Padded widths are rounded up to a multiple of this, so that prompts of similar lengths share one
# compiled sampler (an interactive session does not recompile for every prompt).
WIDTH_MULTIPLE = 32


class TextOutput(NamedTuple):
  texts: list[str]                 # the continuation of each prompt (specials dropped)
  tokens: list[list[int]]          # its token ids (EOS included if emitted)
  stats: dict | None               # speculative.summarize of all chunks (None: plain decoding)


def encode_prompt(tokenizer, text: str) -> list[int]:
  """Prompt ids as the model saw documents in training: a Hugging Face tokenizer adds its own
  specials (e.g. Llama's BOS); the built-in ones get their BOS in front."""
  if getattr(tokenizer, 'kind', None) == 'hf':
    return tokenizer.encode(text)
  return [tokenizer.bos_id] + tokenizer.encode(text)


def right_pad(seqs: Sequence[Sequence[int]], width: int, pad_id: int):
  """(tokens [B, width] int32, lengths [B] int32) of right-padded token sequences."""
  tokens_BT = np.full((len(seqs), width), pad_id, np.int32)
  for b, seq in enumerate(seqs):
    if len(seq) > width:
      raise ValueError(f'sequence {b} has {len(seq)} tokens > width {width}')
    tokens_BT[b, :len(seq)] = seq
  return tokens_BT, np.asarray([len(seq) for seq in seqs], np.int32)


def _stable_text(tokenizer, ids: list[int], final: bool) -> str:
  """Decoded text, holding back a trailing replacement character (a multi-byte character whose
  bytes are split across tokens is completed by a later token)."""
  text = tokenizer.decode(ids)
  if not final:
    text = text.rstrip('\ufffd')
  return text


def _merge_stats(total, stats):
  if total is None:
    return jax.tree.map(np.asarray, stats)
  return speculative.SpeculativeStats(*(np.asarray(a) + np.asarray(b)
                                        for a, b in zip(total, stats)))


def generate_text(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                  drafter: str | None = None, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                  on_text: Callable[[int, str], None] | None = None, chunk_tokens: int = 16,
                  **speculative_kwargs) -> TextOutput:
  """Continues each prompt; returns the continuations as strings (and ids, and stats).

  drafter: None decodes plainly (`generate`); 'medusa', 'mtp' or 'model' decode speculatively
    (`speculative_generate`, which takes `speculative_kwargs`: tree, draft_model, acceptance...).
  on_text(row, new_text): called with each row's new text as it is produced (see the module
    docstring; `chunk_tokens` new tokens per call).
  """
  if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
    raise ValueError(f'prompts must be a non-empty list of str, got {prompts!r:.80}')
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be an int >= 1, got {max_new_tokens!r}')
  if on_text is not None and not callable(on_text):
    raise ValueError(f'on_text must be None or a callable (row, text), got {on_text!r}')
  if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
    raise ValueError(f'chunk_tokens must be an int >= 1, got {chunk_tokens!r}')
  if drafter is None and speculative_kwargs:
    raise ValueError(f'{sorted(speculative_kwargs)} apply to speculative decoding only '
                     f'(drafter is None)')
  encoded = [encode_prompt(tokenizer, p) for p in prompts]
  if min(map(len, encoded)) == 0:
    raise ValueError('a prompt encodes to no tokens')
  # Streaming decodes in chunks, one call each: split and pack the model(s) once for all of them.
  speculative_kwargs = dict(speculative_kwargs)
  model = prepared_lib.as_prepared(model, speculative_kwargs.pop('draft_model', None))
  eos_id = tokenizer.eos_id if stop_at_eos else None
  # The samplers stop at one EOS id; other stop ids (e.g. Llama 3's <|eot_id|> besides
  # <|end_of_text|>, from generation_config.json) end the row here, on the host.
  stop_ids = set(getattr(tokenizer, 'eos_ids', ())) | {eos_id} if stop_at_eos else set()
  pad_id = tokenizer.pad_id
  batch, width = len(encoded), max(map(len, encoded)) + max_new_tokens
  if width > model.model.config.max_seq_len:
    raise ValueError(f'the longest prompt ({width - max_new_tokens} tokens) plus max_new_tokens '
                     f'({max_new_tokens}) exceeds the model\'s max_seq_len '
                     f'{model.model.config.max_seq_len}')
  width = -(-width // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
  step = max_new_tokens if on_text is None else min(chunk_tokens, max_new_tokens)
  sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                  pad_id=pad_id)
  key = jax.random.key(seed)

  generated = [[] for _ in range(batch)]
  shown = [''] * batch
  done = [False] * batch
  stats = None
  chunk = 0
  while not all(done):
    seqs = [e + g for e, g in zip(encoded, generated)]
    tokens_BT, lengths_B = map(jnp.asarray, right_pad(seqs, width, pad_id))
    rng = jax.random.fold_in(key, chunk) if temperature > 0 else None
    if drafter is None:
      out = autoregressive.generate(model, tokens_BT, lengths_B, max_new_tokens=step, rng=rng,
                                    **sampling)
    else:
      out = speculative.speculative_generate(model, tokens_BT, lengths_B, drafter=drafter,
                                             max_new_tokens=step, rng=rng, **sampling,
                                             **speculative_kwargs)
      stats = _merge_stats(stats, out.stats)
    new_BN, new_len_B = np.asarray(out.tokens_BN), np.asarray(out.lengths_B)
    for b in range(batch):
      if done[b]:
        continue
      room = max_new_tokens - len(generated[b])
      new = [int(t) for t in new_BN[b, :min(int(new_len_B[b]), room)]]
      stop = next((i for i, t in enumerate(new) if t in stop_ids), None)
      generated[b].extend(new if stop is None else new[:stop + 1])
      done[b] = stop is not None or len(generated[b]) >= max_new_tokens
      if on_text is not None:
        text = _stable_text(tokenizer, generated[b], final=done[b])
        if len(text) > len(shown[b]) and text.startswith(shown[b]):
          on_text(b, text[len(shown[b]):])
          shown[b] = text
    chunk += 1
  texts = [tokenizer.decode(g) for g in generated]
  summary = None if stats is None else speculative.summarize(stats, [len(g) for g in generated])
  return TextOutput(texts, generated, summary)
