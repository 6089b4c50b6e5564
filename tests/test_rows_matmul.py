"""The few-row CPU matmul kernel (jax_spec/kernels/rows_matmul.cc) against float64, row by row."""
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_spec.kernels import rows_matmul


@pytest.fixture(autouse=True)
def every_size_to_the_kernel(monkeypatch):
  """The odd shapes below are smaller than the size the decode path sends to the kernel."""
  monkeypatch.setattr(rows_matmul, 'MIN_WEIGHT_SIZE', 0)


def _uses_kernel(x, w):
  return 'jax_spec_rows_matmul' in jax.jit(rows_matmul.matmul).lower(x, w).as_text()


def test_kernel_is_built_and_used_on_cpu(monkeypatch):
  assert rows_matmul.available()   # a silent fallback would leave every test below vacuous
  x, w = jnp.ones((3, 16), jnp.float32), jnp.ones((16, 24), jnp.float32)
  assert _uses_kernel(x, w)
  monkeypatch.setattr(rows_matmul, 'MIN_WEIGHT_SIZE', 16 * 25 + 1)   # small weights: XLA's dot
  assert not _uses_kernel(x, jnp.ones((16, 25), jnp.float32))   # (new shapes: not a cached trace)


@pytest.mark.parametrize('rows, d_in, d_out', [(1, 256, 768), (3, 37, 9), (7, 256, 259),
                                               (13, 100, 37), (25, 64, 8), (12, 5, 1)])
def test_matches_float64(rows, d_in, d_out):
  rng = np.random.default_rng(rows * 1000 + d_out)
  x = rng.standard_normal((rows, d_in)).astype(np.float32)
  w = rng.standard_normal((d_in, d_out)).astype(np.float32)
  got = np.asarray(jax.jit(rows_matmul.matmul)(x, w), np.float64)
  want = x.astype(np.float64) @ w.astype(np.float64)
  scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)   # |error| <~ eps * this
  assert got.shape == (rows, d_out)
  assert np.max(np.abs(got - want) / scale) < 4 * d_in * np.finfo(np.float32).eps


def test_a_row_does_not_depend_on_the_rows_beside_it():
  """Bitwise: one token's row alone equals the same row in a 7-, 16- or 25-row call (one pass
  over the weight, or two or three; plain decoding and a verify step then give the same logits
  for the same token)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((25, 96)).astype(np.float32)
  w = rng.standard_normal((96, 40)).astype(np.float32)
  f = jax.jit(rows_matmul.matmul)
  alone = np.stack([np.asarray(f(x[i:i + 1], w))[0] for i in range(25)])
  np.testing.assert_array_equal(np.asarray(f(x, w)), alone)
  np.testing.assert_array_equal(np.asarray(f(x[:16], w)), alone[:16])
  np.testing.assert_array_equal(np.asarray(f(x[:7], w)), alone[:7])


def test_leading_dims_fallbacks_and_errors():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
  np.testing.assert_allclose(rows_matmul.matmul(x, w), x @ w, rtol=1e-5, atol=1e-5)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)   # not fp32: XLA's dot
  assert not _uses_kernel(xb, wb)
  np.testing.assert_array_equal(rows_matmul.matmul(xb, wb), xb @ wb)
  with pytest.raises(ValueError, match='do not contract'):
    rows_matmul.matmul(x, w.T)


def test_pack_is_column_tiles_of_the_kernels_simd_width():
  tile = rows_matmul.tile_width()
  assert tile in (8, 16)    # AVX2 or AVX-512 lanes
  w = jnp.arange(3 * (tile + 2), dtype=jnp.float32).reshape(3, tile + 2)
  tiles = np.asarray(rows_matmul.pack(w))
  assert tiles.shape == (2, 3, tile)
  np.testing.assert_array_equal(tiles[0], np.asarray(w)[:, :tile])
  np.testing.assert_array_equal(tiles[1, :, :2], np.asarray(w)[:, tile:])
  assert not tiles[1, :, 2:].any()


def test_other_platforms_lower_the_plain_dot():
  exported = jax.export.export(jax.jit(rows_matmul.matmul), platforms=['cuda'])(
      jax.ShapeDtypeStruct((4, 32), jnp.float32), jax.ShapeDtypeStruct((32, 16), jnp.float32))
  text = exported.mlir_module()
  assert 'jax_spec_rows_matmul' not in text and 'dot_general' in text


@pytest.mark.parametrize('rows, d_in, d_out', [(1, 256, 259), (7, 37, 9), (13, 64, 40)])
def test_bf16_tiles_give_bitwise_the_numbers_of_their_fp32_copy(rows, d_in, d_out):
  """bf16 tiles are widened exactly: the product equals, bit for bit, that of the fp32 tiles of
  the bf16-rounded weight, and differs from the unrounded weight's (so bf16 is really read)."""
  rng = np.random.default_rng(rows + d_out)
  x = jnp.asarray(rng.standard_normal((rows, d_in)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d_in, d_out)), jnp.float32)
  rounded = w.astype(jnp.bfloat16).astype(jnp.float32)
  run = jax.jit(lambda x, t: rows_matmul._kernel(x, t, d_out))
  bf16_tiles = rows_matmul.pack(w, jnp.bfloat16)
  assert bf16_tiles.dtype == jnp.bfloat16
  got = np.asarray(run(x, bf16_tiles))
  np.testing.assert_array_equal(got, np.asarray(run(x, rows_matmul.pack(rounded))))
  assert not np.array_equal(got, np.asarray(run(x, rows_matmul.pack(w))))
  with pytest.raises(ValueError, match='dtype must be float32 or bfloat16'):
    rows_matmul.pack(w, jnp.float16)


@pytest.mark.parametrize('rows, d_in, d_out', [(1, 256, 259), (5, 38, 9), (13, 64, 40),
                                               (3, 2, 17)])
def test_pair_tiles_multiply_bf16_rounded_rows(rows, d_in, d_out):
  """bf16 products: the kernel equals float64 of the bf16-rounded x and w to fp32 accumulation,
  and misses the product of the unrounded x by far more (so x is really rounded)."""
  rng = np.random.default_rng(rows + d_in)
  x = jnp.asarray(rng.standard_normal((rows, d_in)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d_in, d_out)), jnp.float32)
  tiles = rows_matmul.pack(w, jnp.bfloat16, pairs=True)
  assert tiles.shape == (-(-d_out // rows_matmul.tile_width()), d_in // 2,
                         rows_matmul.tile_width(), 2)
  got = np.asarray(jax.jit(lambda x, t: rows_matmul._kernel(x, t, d_out))(x, tiles), np.float64)
  f64 = lambda a: np.asarray(a.astype(jnp.bfloat16), np.float64)
  want = f64(x) @ f64(w)
  scale = np.abs(f64(x)) @ np.abs(f64(w))
  assert np.max(np.abs(got - want) / scale) < 4 * d_in * np.finfo(np.float32).eps
  unrounded_x = np.asarray(x, np.float64) @ f64(w)
  assert np.max(np.abs(got - unrounded_x) / scale) > 1e-4


def test_pair_tiles_row_does_not_depend_on_the_rows_beside_it():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((25, 96)), jnp.float32)
  tiles = rows_matmul.pack(jnp.asarray(rng.standard_normal((96, 40)), jnp.float32), jnp.bfloat16,
                           pairs=True)
  f = jax.jit(lambda x: rows_matmul._kernel(x, tiles, 40))
  alone = np.stack([np.asarray(f(x[i:i + 1]))[0] for i in range(25)])
  np.testing.assert_array_equal(np.asarray(f(x)), alone)
  np.testing.assert_array_equal(np.asarray(f(x[:7])), alone[:7])


def test_pair_tiles_layout_and_errors():
  tile = rows_matmul.tile_width()
  w = jnp.arange(4 * (tile + 1), dtype=jnp.float32).reshape(4, tile + 1)
  tiles = np.asarray(rows_matmul.pack(w, jnp.bfloat16, pairs=True).astype(jnp.float32))
  assert tiles.shape == (2, 2, tile, 2)
  np.testing.assert_array_equal(tiles[0, 1, :, 0], np.asarray(w)[2, :tile])   # rows 2k, 2k + 1
  np.testing.assert_array_equal(tiles[0, 1, :, 1], np.asarray(w)[3, :tile])
  np.testing.assert_array_equal(tiles[1, 0, 0], np.asarray(w)[:2, tile])
  assert not tiles[1, :, 1:].any()
  with pytest.raises(ValueError, match='pairs=True needs dtype bfloat16 and an even input'):
    rows_matmul.pack(w[:3], jnp.bfloat16, pairs=True)
  with pytest.raises(ValueError, match='pairs=True needs dtype bfloat16'):
    rows_matmul.pack(w, jnp.float32, pairs=True)


@pytest.mark.parametrize('flags', [['-mavx2', '-mfma'], ['-mavx512f', '-mavx512bw', '-mfma'], []],
                         ids=['avx2', 'avx512_without_bf16', 'scalar'])
def test_pair_tiles_of_the_builds_this_machine_does_not_run(tmp_path, flags):
  """The bf16-products fallbacks (the scalar PairBlock, with kCols 8 or 16) against double
  precision, compiled and run here with other instruction sets (tests/cpp/pair_tiles_check.cc)."""
  compiler = shutil.which(os.environ.get('CXX', 'c++')) or shutil.which('g++')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  binary = str(tmp_path / 'check')
  subprocess.run([compiler, '-O1', '-std=c++17', '-ffp-contract=off', '-w', *flags, '-I',
                  os.path.join(root, 'jax_spec', 'kernels'), '-I', jax.ffi.include_dir(),
                  os.path.join(root, 'tests', 'cpp', 'pair_tiles_check.cc'), '-o', binary],
                 check=True)
  run = subprocess.run([binary], capture_output=True, text=True)
  assert run.returncode == 0, run.stdout
  assert 'bf16_dot 0' in run.stdout
