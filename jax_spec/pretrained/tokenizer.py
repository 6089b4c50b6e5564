"""A Hugging Face `tokenizer.json` behind the interface of `jax_spec.data.tokenization`.

Encoding runs the `tokenizers` package (Rust; no transformers, no torch). Special ids come from
`tokenizer_config.json` (bos/eos/pad token strings), `generation_config.json` (eos_token_id,
which is what generation stops on, possibly several) and `config.json`, in that order of
preference for EOS, as transformers does for `generate`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np

from jax_spec.data import tokenization

TOKENIZER_FILE = 'tokenizer.json'
TOKENIZER_CONFIG_FILE = 'tokenizer_config.json'
GENERATION_CONFIG_FILE = 'generation_config.json'


def read_json(path: str, required: bool = True) -> dict:
  if not os.path.isfile(path):
    if required:
      raise ValueError(f'missing file {path}')
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not valid JSON: {e}') from None


def _token_string(value):
  """tokenizer_config stores special tokens as a string or as {'content': ...} (AddedToken)."""
  if isinstance(value, dict):
    return value.get('content')
  return value


def _as_list(value):
  if value is None:
    return []
  return list(value) if isinstance(value, (list, tuple)) else [value]


class HfTokenizer:
  """`encode` / `decode` / `encode_documents` / `save` as the built-in tokenizers.

  `encode(text)` adds the special tokens the tokenizer's post-processor adds (e.g. Llama's BOS),
  as transformers' `tokenizer(text)` does; `encode(text, add_special_tokens=False)` does not.
  `vocab_size` is the tokenizer's id range, which may be smaller than the model's (padded)
  vocabulary; `decode` drops ids outside it and special tokens. `pad_id` is EOS (or 0) when
  the tokenizer defines no pad token.
  """
  kind = 'hf'

  def __init__(self, tokenizer, *, bos_id: int | None, eos_ids: Sequence[int],
               pad_id: int | None):
    self._tok = tokenizer
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1 if vocab else 0
    self.bos_id = bos_id
    self.eos_ids = tuple(eos_ids)
    self.eos_id = self.eos_ids[0] if self.eos_ids else None
    self.pad_id = pad_id

  @classmethod
  def from_directory(cls, directory: str, model_config: dict | None = None) -> 'HfTokenizer':
    from tokenizers import Tokenizer
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
      raise ValueError(f'missing file {path} (the tokenizer; pass tokenizer=False to load the '
                       f'model alone)')
    try:
      tok = Tokenizer.from_file(path)
    except Exception as e:  # the Rust parser raises its own exception type
      raise ValueError(f'{path} is not a valid tokenizer.json: {e}') from None
    tok_config = read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE), required=False)
    gen_config = read_json(os.path.join(directory, GENERATION_CONFIG_FILE), required=False)
    model_config = model_config or {}

    def token_id(key):
      name = _token_string(tok_config.get(key))
      if name is None:
        return None
      idx = tok.token_to_id(name)
      if idx is None:
        raise ValueError(f'{os.path.join(directory, TOKENIZER_CONFIG_FILE)}: {key} {name!r} is '
                         f'not in {path}')
      return idx

    def first_of(key, *sources):
      for source in sources:
        if source.get(key) is not None:
          return source[key]
      return None

    bos = token_id('bos_token')
    bos = bos if bos is not None else first_of('bos_token_id', gen_config, model_config)
    eos = _as_list(first_of('eos_token_id', gen_config, model_config))
    if not eos and token_id('eos_token') is not None:
      eos = [token_id('eos_token')]
    pad = token_id('pad_token')
    pad = pad if pad is not None else first_of('pad_token_id', gen_config, model_config)
    if pad is None:  # e.g. Llama 3: padding is masked anyway, any id will do; EOS as transformers
      pad = eos[0] if eos else 0
    return cls(tok, bos_id=None if bos is None else int(bos), eos_ids=[int(e) for e in eos],
               pad_id=None if pad is None else int(pad))

  @property
  def fingerprint(self) -> str:
    return 'hf-' + hashlib.sha1(self._tok.to_str().encode('utf-8')).hexdigest()[:16]

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    if not isinstance(text, str):
      raise ValueError(f'text must be a str, got {type(text).__name__}')
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size],
                            skip_special_tokens=True)

  def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token stream `sep + doc + eos` per document (sep: BOS, or EOS for BOS-less tokenizers
    such as Qwen's), as `tokenization._assemble` lays it out."""
    if self.eos_id is None:
      raise ValueError('encode_documents needs an EOS token; the tokenizer defines none')
    texts = list(texts)
    encodings = self._tok.encode_batch(texts, add_special_tokens=False) if texts else []
    dtype = tokenization._stream_dtype(self.vocab_size)
    docs = [np.asarray(e.ids, dtype) for e in encodings]
    sep = self.bos_id if self.bos_id is not None else self.eos_id
    return tokenization._assemble(docs, sep, self.eos_id, dtype)

  def save(self, directory: str) -> None:
    """Writes tokenizer.json and the special tokens in a tokenizer_config.json."""
    os.makedirs(directory, exist_ok=True)
    self._tok.save(os.path.join(directory, TOKENIZER_FILE))
    name = lambda i: None if i is None else self._tok.id_to_token(i)
    with open(os.path.join(directory, TOKENIZER_CONFIG_FILE), 'w') as f:
      # 'kind' lets jax_spec.data.load_tokenizer find this class; transformers ignores it.
      json.dump({'kind': self.kind, 'tokenizer_class': 'PreTrainedTokenizerFast',
                 'bos_token': name(self.bos_id),
                 'eos_token': name(self.eos_id), 'pad_token': name(self.pad_id)}, f, indent=2)
    with open(os.path.join(directory, GENERATION_CONFIG_FILE), 'w') as f:
      json.dump({'bos_token_id': self.bos_id, 'eos_token_id': list(self.eos_ids),
                 'pad_token_id': self.pad_id}, f, indent=2)

  def __eq__(self, other):
    return isinstance(other, HfTokenizer) and other.fingerprint == self.fingerprint

  def __repr__(self):
    return (f'HfTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, '
            f'eos_ids={self.eos_ids}, pad_id={self.pad_id})')
