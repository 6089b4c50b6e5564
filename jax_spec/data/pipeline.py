"""Token streams, packing and step-indexed batches.

A batch is a pure function of (seed, step, batch_size, seq_len, process_index, process_count):
resuming a run needs no iterator state, and each host of a multi-host run computes only its own
rows. Every document is laid out as `bos + tokens + eos` in one flat stream; a row is a window of
that stream, with `segment_ids` telling documents apart and `positions` restarting per document.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tempfile

import numpy as np

from jax_spec.data import corpus as corpus_lib
from jax_spec.data import tokenization

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class TokenStream:
  tokens: np.ndarray  # [N] uint16 or int32: all documents, each as bos + tokens + eos.
  starts: np.ndarray  # [D] int64 offset of each document's bos; starts[0] == 0.
  num_bytes: int  # UTF-8 bytes of the documents' text.
  pad_id: int

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_documents(self) -> int:
    return int(self.starts.shape[0])

  @property
  def bytes_per_token(self) -> float:
    """UTF-8 bytes per *predicted* token (every token but bos): bits/byte = bits/token / this."""
    return self.num_bytes / max(1, self.num_tokens - self.num_documents)

  def document_lengths(self) -> np.ndarray:
    """Tokens per document including bos and eos."""
    return np.diff(np.append(self.starts, self.num_tokens))


def build_stream(tokenizer, documents: list[corpus_lib.Document],
                 cache_dir: str | None = None) -> TokenStream:
  """Tokenizes `documents` once; cached as .npz in `cache_dir` keyed by tokenizer + documents."""
  if not documents:
    raise ValueError('documents must not be empty')
  path = None
  if cache_dir:
    h = hashlib.sha1(tokenizer.fingerprint.encode())
    for d in documents:
      h.update(d.name.encode('utf-8', 'surrogateescape') + b'\0')
      h.update(hashlib.sha1(d.text.encode('utf-8')).digest())
    path = os.path.join(cache_dir, f'stream-{h.hexdigest()[:20]}.npz')
    if os.path.isfile(path):
      try:
        with np.load(path) as z:
          return TokenStream(z['tokens'], z['starts'], int(z['num_bytes']), tokenizer.pad_id)
      except (OSError, ValueError, KeyError):
        pass  # A damaged cache file is rebuilt below (it is only a cache).
  texts = [d.text for d in documents]
  tokens, starts = tokenizer.encode_documents(texts)
  num_bytes = sum(len(t.encode('utf-8')) for t in texts)
  if path:
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.npz.tmp')
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, tokens=tokens, starts=starts, num_bytes=np.int64(num_bytes))
    os.replace(tmp, path)  # Atomic: concurrent processes never read half a file.
  return TokenStream(tokens, starts, num_bytes, tokenizer.pad_id)


def pack_rows(stream: TokenStream, offsets: np.ndarray, seq_len: int) -> Batch:
  """Rows `[o, o + seq_len)` of the stream for each offset `o`.

  `segment_ids` number the documents of a row 1, 2, ...; 0 marks padding past the stream end.
  `positions` restart at 0 at every document start and at the row start, so they stay below
  `seq_len` whatever the model's maximum length.
  """
  offsets = np.asarray(offsets, np.int64).reshape(-1)
  idx_BT = offsets[:, None] + np.arange(seq_len, dtype=np.int64)[None, :]
  valid_BT = idx_BT < stream.num_tokens
  safe_BT = np.minimum(idx_BT, stream.num_tokens - 1)
  tokens_BT = np.where(valid_BT, stream.tokens[safe_BT].astype(np.int32), stream.pad_id)
  doc_BT = np.searchsorted(stream.starts, safe_BT, side='right') - 1
  segment_ids_BT = np.where(valid_BT, doc_BT - doc_BT[:, :1] + 1, 0)
  seg_start_BT = np.maximum(stream.starts[doc_BT], offsets[:, None])
  positions_BT = np.where(valid_BT, idx_BT - seg_start_BT, 0)
  return {
      'tokens': tokens_BT.astype(np.int32),
      'segment_ids': segment_ids_BT.astype(np.int32),
      'positions': positions_BT.astype(np.int32),
  }


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an int >= {minimum}, got {value!r}')
  return int(value)


def _process_rows(batch_size: int, process_index, process_count) -> tuple[int, int]:
  process_count = _check_int('process_count', process_count, 1)
  process_index = _check_int('process_index', process_index, 0)
  if process_index >= process_count:
    raise ValueError(f'process_index must be < process_count={process_count}, '
                     f'got {process_index}')
  if batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} must be divisible by '
                     f'process_count={process_count}')
  local = batch_size // process_count
  return process_index * local, local


def epoch_layout(num_tokens: int, seq_len: int) -> tuple[int, int]:
  """(windows per epoch C, largest start shift): C windows of seq_len tokens fit after the shift."""
  if num_tokens < seq_len:
    raise ValueError(f'seq_len={seq_len} is longer than the training stream '
                     f'({num_tokens} tokens); use a larger corpus or a shorter seq_len')
  windows = (num_tokens - (seq_len - 1)) // seq_len
  if windows >= 1:
    return windows, seq_len - 1
  return 1, num_tokens - seq_len


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, windows: int, max_shift: int) -> tuple[int, np.ndarray]:
  rng = np.random.default_rng([seed, epoch])
  shift = int(rng.integers(0, max_shift + 1))
  perm = rng.permutation(windows)
  perm.setflags(write=False)
  return shift, perm


def train_offsets(num_tokens: int, seed: int, rows: np.ndarray, seq_len: int) -> np.ndarray:
  """Stream offsets of the global rows `rows` (row i = step * batch_size + b).

  Epoch e = i // C reads the C windows `shift_e + c * seq_len` in the order `perm_e`, both drawn
  from `default_rng([seed, e])`: each token is seen once per epoch, in a new order and with new
  window boundaries every epoch.
  """
  windows, max_shift = epoch_layout(num_tokens, seq_len)
  rows = np.asarray(rows, np.int64)
  epochs, within = np.divmod(rows, windows)
  offsets = np.empty_like(rows)
  for epoch in np.unique(epochs).tolist():
    shift, perm = _epoch_order(seed, epoch, windows, max_shift)
    sel = epochs == epoch
    offsets[sel] = shift + perm[within[sel]] * seq_len
  return offsets


def get_batch(stream: TokenStream, seed: int, step: int, batch_size: int, seq_len: int,
              process_index: int = 0, process_count: int = 1) -> Batch:
  """This process's `[batch_size // process_count, seq_len]` slice of global batch `step`."""
  seed = _check_int('seed', seed, 0)
  step = _check_int('step', step, 0)
  batch_size = _check_int('batch_size', batch_size, 1)
  seq_len = _check_int('seq_len', seq_len, 1)
  first, local = _process_rows(batch_size, process_index, process_count)
  rows = step * batch_size + first + np.arange(local, dtype=np.int64)
  return pack_rows(stream, train_offsets(stream.num_tokens, seed, rows, seq_len), seq_len)


def validation_batches(stream: TokenStream, batch_size: int, seq_len: int,
                       num_batches: int | None = None, process_index: int = 0,
                       process_count: int = 1) -> list[Batch]:
  """The stream read in order, row r = `[r * seq_len, (r + 1) * seq_len)`, last row padded.

  Rows past the end (to fill the last batch) are all padding (segment 0). `num_batches` caps the
  count; the result is the same list every call.
  """
  batch_size = _check_int('batch_size', batch_size, 1)
  seq_len = _check_int('seq_len', seq_len, 1)
  first, local = _process_rows(batch_size, process_index, process_count)
  num_rows = -(-stream.num_tokens // seq_len)
  total = -(-num_rows // batch_size)
  if num_batches is not None:
    total = min(total, _check_int('num_batches', num_batches, 1))
  batches = []
  for k in range(total):
    rows = k * batch_size + first + np.arange(local, dtype=np.int64)
    batches.append(pack_rows(stream, rows * seq_len, seq_len))
  return batches


def validation_prompts(stream: TokenStream, num: int, prompt_len: int) -> np.ndarray:
  """`[num, prompt_len]` int32: bos + the first tokens of `num` documents, evenly spread over the
  documents that are long enough (never padded, never crossing into the next document)."""
  num = _check_int('num', num, 1)
  prompt_len = _check_int('prompt_len', prompt_len, 1)
  # Prompt = bos + up to the whole document body, never its eos.
  candidates = np.nonzero(stream.document_lengths() - 1 >= prompt_len)[0]
  if candidates.shape[0] < num:
    raise ValueError(f'only {candidates.shape[0]} validation documents have at least '
                     f'{prompt_len} tokens; asked for num={num} prompts of prompt_len={prompt_len}')
  chosen = candidates[(np.arange(num) * candidates.shape[0]) // num]
  idx = stream.starts[chosen][:, None] + np.arange(prompt_len)[None, :]
  return stream.tokens[idx].astype(np.int32)


class TextData:
  """Tokenizer + corpus + tokenized streams: everything the trainer needs from `jax_spec.data`."""

  def __init__(self, tokenizer, corpus: corpus_lib.Corpus, train: TokenStream,
               validation: TokenStream):
    self.tokenizer = tokenizer
    self.corpus = corpus
    self.train = train
    self.validation = validation

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def bytes_per_token(self) -> float:
    """Validation UTF-8 bytes per predicted token (bits/byte = bits/token / bytes_per_token)."""
    return self.validation.bytes_per_token

  def get_batch(self, seed: int, step: int, batch_size: int, seq_len: int,
                process_index: int = 0, process_count: int = 1) -> Batch:
    return get_batch(self.train, seed, step, batch_size, seq_len, process_index, process_count)

  def validation_batches(self, batch_size: int, seq_len: int, num_batches: int | None = None,
                         process_index: int = 0, process_count: int = 1) -> list[Batch]:
    return validation_batches(self.validation, batch_size, seq_len, num_batches, process_index,
                              process_count)

  def validation_prompts(self, num: int, prompt_len: int) -> np.ndarray:
    return validation_prompts(self.validation, num, prompt_len)

  def __repr__(self):
    return (f'TextData({self.tokenizer!r}, source={self.corpus.source!r}, '
            f'train={self.train.num_tokens} tokens/{self.train.num_documents} docs, '
            f'validation={self.validation.num_tokens} tokens/'
            f'{self.validation.num_documents} docs)')


def load_data(tokenizer: str = 'byte', workdir: str | None = None, data_path: str | None = None,
              vocab_size: int | None = None, cache: bool = True) -> TextData:
  """Corpus -> tokenizer (loaded from or saved to `workdir/tokenizer/`) -> cached streams."""
  corpus = corpus_lib.load_corpus(data_path)
  tok = tokenization.make_tokenizer(tokenizer, workdir, corpus, vocab_size)
  cache_dir = os.path.join(workdir, 'data_cache') if (workdir and cache) else None
  train = build_stream(tok, corpus.train, cache_dir)
  validation = build_stream(tok, corpus.validation, cache_dir)
  return TextData(tok, corpus, train, validation)
