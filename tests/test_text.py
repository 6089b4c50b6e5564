"""generate_text: strings out, streaming that changes nothing (greedy: same tokens as one call,
streamed pieces concatenate to the returned text), batches of unequal prompts, drafters."""
import copy
import os

import jax
import numpy as np
import pytest

from jax_spec import pretrained
from jax_spec.decoding import autoregressive
from jax_spec.decoding import text as text_lib

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'hf', 'smollm2')
PROMPTS = ['def greet(name):', 'import json\nclass Decoder']


@pytest.fixture(scope='module')
def loaded():
  model, tok, _ = pretrained.from_pretrained(FIXTURE, medusa_heads=2)
  for i, head in enumerate(model.medusa):  # drafts that are sometimes wrong
    head.res[0].kernel[...] = 0.5 * jax.random.normal(jax.random.key(i), head.res[0].kernel.shape)
  return model, tok


def test_streaming_is_lossless_and_matches_generate(loaded):
  model, tok = loaded
  whole = text_lib.generate_text(model, tok, PROMPTS, max_new_tokens=14)
  pieces = {0: [], 1: []}
  streamed = text_lib.generate_text(model, tok, PROMPTS, max_new_tokens=14, chunk_tokens=5,
                                    on_text=lambda row, s: pieces[row].append(s))
  assert streamed.tokens == whole.tokens and streamed.texts == whole.texts
  assert [''.join(pieces[r]) for r in (0, 1)] == streamed.texts
  assert max(len(p) for p in pieces.values()) > 1  # it did stream, in several pieces
  # The same as the token-level baseline on the encoded, right-padded prompts.
  ids = [tok.encode(p) for p in PROMPTS]
  width = -(-(max(map(len, ids)) + 14) // text_lib.WIDTH_MULTIPLE) * text_lib.WIDTH_MULTIPLE
  padded = np.full((2, width), tok.pad_id, np.int32)  # generate_text's layout: one compile
  for row, seq in enumerate(ids):
    padded[row, :len(seq)] = seq
  out = autoregressive.generate(model, padded, np.asarray([len(i) for i in ids]),
                                max_new_tokens=14, eos_id=tok.eos_id, pad_id=tok.pad_id)
  for row in range(2):
    assert whole.tokens[row] == np.asarray(out.tokens_BN)[row, :int(out.lengths_B[row])].tolist()
    assert whole.texts[row] == tok.decode(whole.tokens[row])
  # A second stop id (generation_config.json lists several for e.g. Llama 3) ends a row there.
  stopper = copy.copy(tok)
  stop_token = whole.tokens[0][3]
  stopper.eos_ids = (tok.eos_id, stop_token)
  stopped = text_lib.generate_text(model, stopper, PROMPTS, max_new_tokens=14)
  assert stopped.tokens[0] == whole.tokens[0][:whole.tokens[0].index(stop_token) + 1]
  # Speculative decoding with the random Medusa heads, streamed: the same tokens again.
  fast = text_lib.generate_text(model, tok, PROMPTS, max_new_tokens=14, drafter='medusa',
                                tree='default', chunk_tokens=5, on_text=lambda row, s: None)
  assert fast.tokens == whole.tokens and 1 <= fast.stats['mean_accepted_length'] <= 3


def test_bad_arguments(loaded):
  model, tok = loaded
  with pytest.raises(ValueError, match='prompts must be a non-empty list of str'):
    text_lib.generate_text(model, tok, 'a string')
  with pytest.raises(ValueError, match='max_new_tokens'):
    text_lib.generate_text(model, tok, PROMPTS, max_new_tokens=0)
  with pytest.raises(ValueError, match='speculative decoding only'):
    text_lib.generate_text(model, tok, PROMPTS, tree='chain')
  with pytest.raises(ValueError, match='max_seq_len'):
    text_lib.generate_text(model, tok, ['x ' * 300])
