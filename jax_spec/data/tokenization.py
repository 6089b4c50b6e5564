"""Tokenizers: raw UTF-8 bytes, and a byte-level BPE trained locally on the corpus.

Both share one small interface so that the rest of the code (packing, decoding benchmarks) never
needs to know which one it has: `encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`,
`save(dir)`, `fingerprint`, and `encode_documents` (the fast path that builds a token stream).
Nothing is downloaded: the BPE vocabulary is learned from the training split.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np

CONFIG_FILE = 'tokenizer_config.json'
BPE_FILE = 'tokenizer.json'
KINDS = ('byte', 'bpe')


def _stream_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def _assemble(docs: Sequence[np.ndarray], bos_id: int, eos_id: int,
              dtype) -> tuple[np.ndarray, np.ndarray]:
  """Lays out `bos + doc + eos` for every document (one slice copy per document, no temporaries
  per token). Returns the stream and the start offset of every document (its `bos`)."""
  lengths = np.fromiter((d.shape[0] for d in docs), np.int64, count=len(docs))
  starts = np.zeros(len(docs), np.int64)
  if len(docs) > 1:
    starts[1:] = np.cumsum(lengths + 2)[:-1]
  out = np.empty(int(lengths.sum()) + 2 * len(docs), dtype)
  out[starts] = bos_id
  out[starts + lengths + 1] = eos_id
  for start, ids in zip(starts.tolist(), docs):
    out[start + 1:start + 1 + ids.shape[0]] = ids
  return out, starts


class ByteTokenizer:
  """UTF-8 bytes are the ids 0..255; `pad`, `bos`, `eos` come after them.

  Why bytes by default: no training, no unknown symbols, and tokenizing the whole standard library
  is one `np.frombuffer`.
  """
  kind = 'byte'
  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  @property
  def fingerprint(self) -> str:
    return 'byte-v1'

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise ValueError(f'text must be a str, got {type(text).__name__}')
    return list(text.encode('utf-8'))

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f'ids must lie in [0, {self.vocab_size}), got range '
                       f'[{ids.min()}, {ids.max()}]')
    return bytes(ids[ids < 256].astype(np.uint8)).decode('utf-8', errors='replace')

  def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    docs = [np.frombuffer(t.encode('utf-8'), np.uint8) for t in texts]
    return _assemble(docs, self.bos_id, self.eos_id, _stream_dtype(self.vocab_size))

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
      json.dump({'kind': self.kind, 'vocab_size': self.vocab_size}, f)

  def __eq__(self, other):
    return isinstance(other, ByteTokenizer)

  def __repr__(self):
    return 'ByteTokenizer(vocab_size=259)'


SPECIALS = ('<pad>', '<bos>', '<eos>')


class BpeTokenizer:
  """Byte-level BPE (GPT-2 style pre-tokenization) from the `tokenizers` package.

  Byte-level means every string round-trips exactly; specials are ids 0 (pad), 1 (bos), 2 (eos).
  """
  kind = 'bpe'
  pad_id = 0
  bos_id = 1
  eos_id = 2

  def __init__(self, tokenizer):
    self._tok = tokenizer
    self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
    for i, name in enumerate(SPECIALS):
      if tokenizer.token_to_id(name) != i:
        raise ValueError(f'tokenizer must map {name} to id {i}, got {tokenizer.token_to_id(name)}')

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> 'BpeTokenizer':
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    min_size = 256 + len(SPECIALS)
    if not isinstance(vocab_size, int) or vocab_size < min_size:
      raise ValueError(f'vocab_size must be an int >= {min_size} (bytes + specials), '
                       f'got {vocab_size!r}')
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return cls(tok)

  @property
  def fingerprint(self) -> str:
    return 'bpe-' + hashlib.sha1(self._tok.to_str().encode('utf-8')).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    if not isinstance(text, str):
      raise ValueError(f'text must be a str, got {type(text).__name__}')
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f'ids must lie in [0, {self.vocab_size}), got {bad[:5]}')
    # The ByteLevel decoder turns a split multi-byte character into U+FFFD (errors='replace').
    return self._tok.decode(ids, skip_special_tokens=True)

  def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    texts = list(texts)
    encodings = self._tok.encode_batch(texts, add_special_tokens=False) if texts else []
    dtype = _stream_dtype(self.vocab_size)
    docs = [np.asarray(e.ids, dtype) for e in encodings]
    return _assemble(docs, self.bos_id, self.eos_id, dtype)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    self._tok.save(os.path.join(directory, BPE_FILE))
    with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
      json.dump({'kind': self.kind, 'vocab_size': self.vocab_size}, f)

  def __eq__(self, other):
    return isinstance(other, BpeTokenizer) and other.fingerprint == self.fingerprint

  def __repr__(self):
    return f'BpeTokenizer(vocab_size={self.vocab_size})'


Tokenizer = ByteTokenizer | BpeTokenizer


def load_tokenizer(directory: str) -> Tokenizer:
  """Loads a tokenizer written by `save(directory)`."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'directory {directory!r} holds no {CONFIG_FILE}')
  with open(path) as f:
    config = json.load(f)
  kind = config.get('kind')
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'bpe':
    from tokenizers import Tokenizer as HfTokenizer
    return BpeTokenizer(HfTokenizer.from_file(os.path.join(directory, BPE_FILE)))
  if kind == 'hf':  # a pretrained model's tokenizer.json (jax_spec.pretrained)
    from jax_spec.pretrained.tokenizer import HfTokenizer  # pylint: disable=g-import-not-at-top
    return HfTokenizer.from_directory(directory)
  raise ValueError(f'{path} has unknown kind {kind!r}; expected one of {KINDS}')


def make_tokenizer(kind: str, workdir: str | None, corpus=None,
                   vocab_size: int | None = None) -> Tokenizer:
  """Loads `workdir/tokenizer/` if present, else builds it (BPE: trains on `corpus.train`).

  A saved tokenizer of another kind or size is an error, never silently replaced: the checkpoints
  in the same workdir were trained with it. `kind` may also be a tokenizer object (a pretrained
  model's): it is saved there, or checked against the saved one.
  """
  if not isinstance(kind, str):
    directory = os.path.join(workdir, 'tokenizer') if workdir else None
    if directory and os.path.isfile(os.path.join(directory, CONFIG_FILE)):
      if load_tokenizer(directory).fingerprint != kind.fingerprint:
        raise ValueError(f'workdir {workdir!r} already holds another tokenizer than {kind!r}; '
                         f'use a fresh --workdir')
    elif directory:
      kind.save(directory)
    return kind
  if kind not in KINDS:
    raise ValueError(f'tokenizer kind must be one of {KINDS}, got {kind!r}')
  if kind == 'byte' and vocab_size not in (None, ByteTokenizer.vocab_size):
    raise ValueError(f'vocab_size of the byte tokenizer is fixed at {ByteTokenizer.vocab_size}, '
                     f'got {vocab_size}')
  directory = os.path.join(workdir, 'tokenizer') if workdir else None
  if directory and os.path.isfile(os.path.join(directory, CONFIG_FILE)):
    tok = load_tokenizer(directory)
    if tok.kind != kind or (vocab_size is not None and tok.vocab_size != vocab_size):
      raise ValueError(
          f'workdir {workdir!r} already holds a {tok!r}, but tokenizer={kind!r} '
          f'vocab_size={vocab_size} was requested; use a fresh --workdir')
    return tok
  if kind == 'byte':
    tok = ByteTokenizer()
  else:
    if vocab_size is None:
      raise ValueError('vocab_size is required to train the bpe tokenizer')
    if corpus is None:
      raise ValueError('corpus is required to train the bpe tokenizer')
    tok = BpeTokenizer.train((d.text for d in corpus.train), vocab_size)
    if tok.vocab_size != vocab_size:
      # BpeTrainer stops early when the corpus has fewer merges to offer than requested.
      raise ValueError(f'the corpus only supports a BPE vocabulary of {tok.vocab_size} < '
                       f'vocab_size={vocab_size}; choose a smaller vocab_size')
  if directory:
    tok.save(directory)
  return tok
