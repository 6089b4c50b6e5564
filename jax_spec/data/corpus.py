"""Text corpora: the Python standard library's own sources by default, or any file/directory.

Documents are named by a path relative to the corpus root; the train/validation split is a hash of
that name, so it is the same on every machine and does not move when files are added elsewhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig

VALIDATION_FRACTION = 0.05
SKIP_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})
FILE_CHUNK_CHARS = 32 * 1024
FILE_MIN_CHUNKS = 20
_BINARY_PROBE = 8192


@dataclasses.dataclass(frozen=True)
class Document:
  name: str
  text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: list[Document]
  validation: list[Document]
  source: str

  @property
  def fingerprint(self) -> str:
    """Hash of the split and every document (name and text): keys the token-stream cache."""
    h = hashlib.sha1()
    for split, docs in (('train', self.train), ('validation', self.validation)):
      h.update(f'{split}:{len(docs)}\0'.encode())
      for d in docs:
        h.update(d.name.encode('utf-8', 'surrogateescape') + b'\0')
        h.update(hashlib.sha1(d.text.encode('utf-8')).digest())
    return h.hexdigest()[:16]


def _hash_unit(name: str) -> float:
  """sha1(name) as a number in [0, 1): unlike hash(), the same in every process."""
  digest = hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()
  return int(digest[:8], 16) / 2**32


def is_validation(name: str, fraction: float = VALIDATION_FRACTION) -> bool:
  return _hash_unit(name) < fraction


def split_documents(docs: list[Document], fraction: float = VALIDATION_FRACTION,
                    source: str = '') -> Corpus:
  """Hash split; if a side ends up empty the smallest-hash document goes to validation."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f'fraction must be in (0, 1), got {fraction}')
  if len(docs) < 2:
    raise ValueError(f'data_path {source!r} yields {len(docs)} document(s); need at least 2 to '
                     'split into train and validation')
  train = [d for d in docs if not is_validation(d.name, fraction)]
  validation = [d for d in docs if is_validation(d.name, fraction)]
  if not validation or not train:
    first = min(docs, key=lambda d: _hash_unit(d.name))
    train = [d for d in docs if d is not first]
    validation = [first]
  return Corpus(train=train, validation=validation, source=source)


def _read_text(path: str) -> str:
  with open(path, 'rb') as f:
    return f.read().decode('utf-8', errors='replace')


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def stdlib_documents(root: str | None = None) -> list[Document]:
  """Every `.py` file of the standard library, sorted by relative path (tests included)."""
  root = root or stdlib_root()
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
    for fname in filenames:
      if fname.endswith('.py'):
        path = os.path.join(dirpath, fname)
        text = _read_text(path)
        if text:
          docs.append(Document(os.path.relpath(path, root).replace(os.sep, '/'), text))
  docs.sort(key=lambda d: d.name)
  return docs


def _is_binary(path: str) -> bool:
  with open(path, 'rb') as f:
    return b'\0' in f.read(_BINARY_PROBE)


def directory_documents(root: str) -> list[Document]:
  """All text files below `root` (hidden entries and binary files skipped), one per document."""
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and d not in SKIP_DIRS)
    for fname in filenames:
      path = os.path.join(dirpath, fname)
      if fname.startswith('.') or not os.path.isfile(path) or _is_binary(path):
        continue
      text = _read_text(path)
      if text.strip():
        docs.append(Document(os.path.relpath(path, root).replace(os.sep, '/'), text))
  docs.sort(key=lambda d: d.name)
  return docs


def file_documents(path: str, chunk_chars: int | None = None) -> list[Document]:
  """One file cut into chunks at line ends: ~32 KiB each, but at least ~20 chunks.

  Why chunks rather than paragraphs: packed rows then see long continuous context, and the hash
  split still has many units to choose from.
  """
  text = _read_text(path)
  if not text.strip():
    return []
  if chunk_chars is None:
    chunk_chars = max(1, min(FILE_CHUNK_CHARS, len(text) // FILE_MIN_CHUNKS))
  name = os.path.basename(path)
  docs, start = [], 0
  while start < len(text):
    end = start + chunk_chars
    if end < len(text):
      newline = text.find('\n', end - 1)
      end = len(text) if newline < 0 else newline + 1
    chunk = text[start:end]
    if chunk.strip():
      docs.append(Document(f'{name}#{len(docs):05d}', chunk))
    start = end
  return docs


def load_corpus(data_path: str | None = None,
                validation_fraction: float = VALIDATION_FRACTION) -> Corpus:
  """The stdlib corpus (`data_path=None`), or a text file / directory of text files."""
  if data_path is None:
    root = stdlib_root()
    docs = stdlib_documents(root)
    source = f'stdlib:{root}'
  else:
    if not isinstance(data_path, (str, os.PathLike)):
      raise ValueError(f'data_path must be a path, got {type(data_path).__name__}')
    data_path = os.fspath(data_path)
    if not os.path.exists(data_path):
      raise ValueError(f'data_path {data_path!r} does not exist')
    if os.path.isdir(data_path):
      docs = directory_documents(data_path)
    elif _is_binary(data_path):
      docs = []
    else:
      docs = file_documents(data_path)
    source = os.path.abspath(data_path)
    if not docs:
      raise ValueError(f'data_path {data_path!r} contains no text')
  return split_documents(docs, validation_fraction, source)
