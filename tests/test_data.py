"""jax_spec.data: tokenizers, corpora, split, packing, step-indexed batches."""
import os
import time

import numpy as np
import pytest

from jax_spec import data
from jax_spec.data import corpus as corpus_lib
from jax_spec.data import pipeline

TEXTS = [
    'def f(x):\n  return x + 1\n',
    'héllo wörld — ünïcödé ✓ 日本語 🙂\n',
    'class A:\n  """Doc."""\n  pass\n',
    '',
    'print("a")\n' * 7,
]


def _fixture_docs(n=40, seed=0):
  rng = np.random.default_rng(seed)
  words = ['alpha', 'beta', 'gamma', 'délta', 'εψιλον', 'def', 'return', '(', ')', ':', '\n']
  return [corpus_lib.Document(f'dir{i % 3}/file{i:03d}.py',
                              ' '.join(rng.choice(words, size=int(rng.integers(5, 60)))))
          for i in range(n)]


def _write_tree(root):
  docs = _fixture_docs(30)
  for d in docs:
    path = os.path.join(root, d.name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
      f.write(d.text)
  return docs


# Tokenizers ---------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_specials():
  tok = data.ByteTokenizer()
  assert tok.vocab_size == 259 and {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258}
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == list(text.encode('utf-8'))
    assert tok.decode(ids) == text
  # Specials are dropped; a cut multi-byte character decodes to U+FFFD instead of raising.
  assert tok.decode([tok.bos_id] + tok.encode('ab') + [tok.eos_id, tok.pad_id]) == 'ab'
  assert tok.decode(tok.encode('é')[:1]) == '\ufffd'
  with pytest.raises(ValueError, match='ids'):
    tok.decode([259])


def test_encode_documents_layout_matches_encode():
  for tok in (data.ByteTokenizer(), data.BpeTokenizer.train(TEXTS * 3, 300)):
    stream, starts = tok.encode_documents(TEXTS)
    expected = []
    for t in TEXTS:
      expected += [tok.bos_id] + tok.encode(t) + [tok.eos_id]
    np.testing.assert_array_equal(stream, expected)
    lengths = [len(tok.encode(t)) + 2 for t in TEXTS]
    np.testing.assert_array_equal(starts, np.cumsum([0] + lengths[:-1]))


def test_bpe_train_save_load_identical(tmp_path):
  corpus = data.Corpus(train=_fixture_docs(60), validation=_fixture_docs(3, seed=1), source='x')
  tok = data.make_tokenizer('bpe', str(tmp_path), corpus, vocab_size=300)
  assert isinstance(tok, data.BpeTokenizer) and tok.vocab_size == 300
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  text = corpus.validation[0].text + ' ünseen ✓ 🙂'
  ids = tok.encode(text)
  assert len(ids) < len(text.encode('utf-8'))  # Merges were learned.
  assert tok.decode(ids) == text  # Byte-level: lossless even for unseen characters.
  # make_tokenizer again loads the saved one (no retraining) with identical ids.
  again = data.make_tokenizer('bpe', str(tmp_path), corpus, vocab_size=300)
  loaded = data.load_tokenizer(str(tmp_path / 'tokenizer'))
  reloaded = data.make_tokenizer('bpe', str(tmp_path))  # Resume without repeating vocab_size.
  assert again.encode(text) == ids == loaded.encode(text) == reloaded.encode(text)
  assert again.fingerprint == tok.fingerprint
  with pytest.raises(ValueError, match='workdir'):
    data.make_tokenizer('bpe', str(tmp_path), corpus, vocab_size=400)
  with pytest.raises(ValueError, match='workdir'):
    data.make_tokenizer('byte', str(tmp_path), corpus)
  with pytest.raises(ValueError, match='kind'):
    data.make_tokenizer('wordpiece', str(tmp_path), corpus)
  with pytest.raises(ValueError, match='vocab_size'):
    data.BpeTokenizer.train(['abc'], 100)
  with pytest.raises(ValueError, match='vocab_size is required'):
    data.make_tokenizer('bpe', str(tmp_path / 'other'), corpus)
  with pytest.raises(ValueError, match='smaller vocab_size'):
    data.make_tokenizer('bpe', str(tmp_path / 'other'), corpus, vocab_size=5000)


# Corpora and split --------------------------------------------------------------------------------


def test_split_is_stable_hash_and_disjoint():
  docs = [corpus_lib.Document(f'pkg/mod{i}.py', 'x = 1\n') for i in range(400)]
  c1 = corpus_lib.split_documents(docs)
  c2 = corpus_lib.split_documents(list(reversed(docs)))
  names1 = {d.name for d in c1.validation}
  assert names1 == {d.name for d in c2.validation}  # Order-independent.
  assert not names1 & {d.name for d in c1.train}
  assert len(c1.train) + len(c1.validation) == 400
  assert 5 <= len(names1) <= 40  # ~5%.
  # Stable across processes and Python versions: pinned sha1 values.
  assert corpus_lib.is_validation('pkg/mod0.py') == ('pkg/mod0.py' in names1)
  assert [corpus_lib.is_validation(f'pkg/mod{i}.py') for i in range(400)].count(True) == len(names1)
  # Adding documents never moves existing ones between splits.
  more = corpus_lib.split_documents(docs + [corpus_lib.Document(f'new{i}', 'y') for i in range(50)])
  assert names1 <= {d.name for d in more.validation}


def test_directory_corpus(tmp_path):
  docs = _write_tree(tmp_path)
  (tmp_path / 'blob.bin').write_bytes(b'\x00\x01binary')
  os.makedirs(tmp_path / '.git')
  (tmp_path / '.git' / 'HEAD').write_text('ref: main\n')
  corpus = data.load_corpus(str(tmp_path))
  got = {d.name: d.text for d in corpus.train + corpus.validation}
  assert got == {d.name: d.text for d in docs}  # Binary and hidden files skipped.
  assert corpus.validation and corpus.train


def test_file_corpus_chunks_cover_file(tmp_path):
  lines = [f'line {i}: ' + 'ü' * (i % 7) + '\n' for i in range(2000)]
  path = tmp_path / 'book.txt'
  path.write_text(''.join(lines), encoding='utf-8')
  corpus = data.load_corpus(str(path))
  chunks = sorted(corpus.train + corpus.validation, key=lambda d: d.name)
  assert len(chunks) >= 20 and corpus.validation
  assert ''.join(d.text for d in chunks) == ''.join(lines)  # Nothing lost, nothing duplicated.
  assert all(d.text.endswith('\n') for d in chunks)  # Cut at line ends.


def test_bad_data_paths(tmp_path):
  with pytest.raises(ValueError, match='does not exist'):
    data.load_corpus(str(tmp_path / 'missing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='no text'):
    data.load_corpus(str(tmp_path / 'empty'))
  (tmp_path / 'blank.txt').write_text('  \n\n')
  with pytest.raises(ValueError, match='no text'):
    data.load_corpus(str(tmp_path / 'blank.txt'))
  (tmp_path / 'one').mkdir()
  (tmp_path / 'one' / 'a.txt').write_text('only one document')
  with pytest.raises(ValueError, match='at least 2'):
    data.load_corpus(str(tmp_path / 'one'))


def test_stdlib_corpus_fast_and_byte_stream():
  """The one test on the real corpus: found, split, tokenized with numpy quickly."""
  start = time.perf_counter()
  corpus = data.load_corpus()
  names = [d.name for d in corpus.train]
  assert names == sorted(names) and 'os.py' in names + [d.name for d in corpus.validation]
  assert not any('site-packages' in n for n in names)
  assert 0.01 < len(corpus.validation) / (len(corpus.train) + len(corpus.validation)) < 0.1
  tok = data.ByteTokenizer()
  stream = data.build_stream(tok, corpus.validation)
  elapsed = time.perf_counter() - start
  assert stream.num_tokens == stream.num_bytes + 2 * len(corpus.validation)
  assert elapsed < 30, elapsed


# Packing ------------------------------------------------------------------------------------------


def _stream(n_docs=30, seed=0):
  return data.build_stream(data.ByteTokenizer(), _fixture_docs(n_docs, seed))


def _check_rows(stream, batch, offsets):
  """Every row is exactly the stream window, with segment ids / positions derived from starts."""
  doc_of = np.searchsorted(stream.starts, np.arange(stream.num_tokens), side='right') - 1
  for row, o in enumerate(offsets):
    toks, segs, pos = (batch[k][row] for k in ('tokens', 'segment_ids', 'positions'))
    for t in range(toks.shape[0]):
      i = o + t
      if i >= stream.num_tokens:
        assert toks[t] == stream.pad_id and segs[t] == 0 and pos[t] == 0
        continue
      assert toks[t] == stream.tokens[i]
      assert segs[t] == doc_of[i] - doc_of[o] + 1
      assert pos[t] == i - max(stream.starts[doc_of[i]], o)


def test_pack_rows_invariants():
  stream = _stream()
  tok = data.ByteTokenizer()
  offsets = np.array([0, 1, 37, stream.num_tokens - 10])
  batch = data.pack_rows(stream, offsets, 64)
  assert all(v.dtype == np.int32 and v.shape == (4, 64) for v in batch.values())
  _check_rows(stream, batch, offsets)
  # Segment ids advance (by one) exactly at bos, and positions reset there.
  segs, pos, toks = batch['segment_ids'][0], batch['positions'][0], batch['tokens'][0]
  starts = np.nonzero(np.diff(segs))[0] + 1
  np.testing.assert_array_equal(starts, np.nonzero(toks[1:] == tok.bos_id)[0] + 1)
  assert (pos[starts] == 0).all() and pos[0] == 0
  assert (batch['segment_ids'][3][10:] == 0).all()  # Padding past the end.


def test_validation_batches_cover_stream_once():
  stream = _stream(12)
  batches = data.validation_batches(stream, batch_size=4, seq_len=32)
  tokens = np.concatenate([b['tokens'].reshape(-1) for b in batches])
  segs = np.concatenate([b['segment_ids'].reshape(-1) for b in batches])
  np.testing.assert_array_equal(tokens[segs > 0], stream.tokens)  # Every token once, in order.
  assert (segs[stream.num_tokens:] == 0).all()
  assert len(batches) == -(-stream.num_tokens // (4 * 32))
  again = data.validation_batches(stream, 4, 32, num_batches=2)
  assert len(again) == 2
  for a, b in zip(again, batches):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # Process shards of the validation batches tile the single-process batches.
  halves = [data.validation_batches(stream, 4, 32, process_index=p, process_count=2)
            for p in range(2)]
  for k, full in enumerate(batches):
    np.testing.assert_array_equal(
        np.concatenate([halves[0][k]['tokens'], halves[1][k]['tokens']]), full['tokens'])


def test_validation_prompts_and_bytes_per_token():
  stream = _stream(20)
  tok = data.ByteTokenizer()
  prompts = data.validation_prompts(stream, num=5, prompt_len=8)
  assert prompts.shape == (5, 8) and prompts.dtype == np.int32
  assert (prompts[:, 0] == tok.bos_id).all() and (prompts[:, 1:] < 256).all()
  # Each prompt is the start of a different document long enough to hold it.
  doc_heads = [stream.tokens[s:s + 8].tolist() for s, n in
               zip(stream.starts, stream.document_lengths()) if n - 1 >= 8]
  chosen = [doc_heads.index(p) for p in prompts.tolist()]
  assert len(set(chosen)) == 5
  docs = _fixture_docs(20)
  with pytest.raises(ValueError, match='prompt_len'):
    data.validation_prompts(stream, num=5, prompt_len=10**6)
  # Byte tokenizer: one byte per predicted token except eos.
  total_bytes = sum(len(d.text.encode()) for d in docs)
  assert stream.num_bytes == total_bytes
  assert stream.bytes_per_token == pytest.approx(total_bytes / (total_bytes + len(docs)))


# Step-indexed batches -----------------------------------------------------------------------------


def test_get_batch_pure_function_of_seed_and_step():
  stream = _stream(40)
  b1 = data.get_batch(stream, seed=3, step=5, batch_size=8, seq_len=16)
  pipeline._epoch_order.cache_clear()
  b2 = data.get_batch(stream, seed=3, step=5, batch_size=8, seq_len=16)
  for k in b1:
    np.testing.assert_array_equal(b1[k], b2[k])
  assert not np.array_equal(b1['tokens'], data.get_batch(stream, 3, 6, 8, 16)['tokens'])
  assert not np.array_equal(b1['tokens'], data.get_batch(stream, 4, 5, 8, 16)['tokens'])
  rows = np.arange(5 * 8, 6 * 8)
  _check_rows(stream, b1, pipeline.train_offsets(stream.num_tokens, 3, rows, 16))


def test_epoch_covers_every_window_once():
  stream = _stream(10)
  seq_len, batch_size = 16, 4
  windows, max_shift = pipeline.epoch_layout(stream.num_tokens, seq_len)
  assert max_shift == seq_len - 1 and max_shift + windows * seq_len <= stream.num_tokens
  steps = -(-windows // batch_size)
  offsets = pipeline.train_offsets(stream.num_tokens, 0, np.arange(windows), seq_len)
  shift = offsets.min() % seq_len
  assert sorted(offsets.tolist()) == [shift + c * seq_len for c in range(windows)]
  batches = [data.get_batch(stream, 0, s, batch_size, seq_len) for s in range(steps)]
  tokens = np.concatenate([b['tokens'] for b in batches])[:windows]
  assert sorted(map(tuple, tokens.tolist())) == sorted(
      tuple(stream.tokens[o:o + seq_len].tolist()) for o in offsets)
  # The next epoch uses a different order.
  nxt = pipeline.train_offsets(stream.num_tokens, 0, np.arange(windows, 2 * windows), seq_len)
  assert not np.array_equal(nxt - nxt.min(), offsets - offsets.min())


def test_process_shards_disjoint_and_union_is_global_batch():
  stream = _stream(40)
  full = data.get_batch(stream, 7, 11, 12, 16)
  for count in (2, 3, 4):
    parts = [data.get_batch(stream, 7, 11, 12, 16, process_index=p, process_count=count)
             for p in range(count)]
    for k in full:
      assert all(p[k].shape == (12 // count, 16) for p in parts)
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
  with pytest.raises(ValueError, match='divisible'):
    data.get_batch(stream, 7, 11, 12, 16, process_index=0, process_count=5)
  with pytest.raises(ValueError, match='process_index'):
    data.get_batch(stream, 7, 11, 12, 16, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='seq_len'):
    data.get_batch(stream, 7, 11, 12, 10**7)
  with pytest.raises(ValueError, match='seed'):
    data.get_batch(stream, -1, 0, 12, 16)


def test_load_data_caches_stream_and_tokenizer(tmp_path):
  src = tmp_path / 'src'
  _write_tree(src)
  work = tmp_path / 'work'
  d1 = data.load_data('bpe', str(work), data_path=str(src), vocab_size=300)
  cached = sorted(os.listdir(work / 'data_cache'))
  assert len(cached) == 2 and (work / 'tokenizer' / 'tokenizer.json').exists()
  d2 = data.load_data('bpe', str(work), data_path=str(src), vocab_size=300)
  assert sorted(os.listdir(work / 'data_cache')) == cached
  np.testing.assert_array_equal(d1.train.tokens, d2.train.tokens)
  np.testing.assert_array_equal(d1.get_batch(0, 3, 4, 16)['tokens'],
                                d2.get_batch(0, 3, 4, 16)['tokens'])
  assert d1.vocab_size == 300 and d1.bytes_per_token > 1.0  # BPE merges bytes.
  texts = [d.text for d in d1.corpus.train]
  assert d1.tokenizer.decode(d1.train.tokens[: d1.train.starts[1]]) == texts[0]
