"""Few-row fp32 matmuls on CPU through an XLA FFI kernel (`rows_matmul.cc`), for decoding.

A decode or verify step multiplies a handful of rows (1 token, or the T nodes of a candidate tree)
by every weight. XLA:CPU runs a one-row matmul as a matrix-vector product and every larger one as
a GEMM that repacks the weight at each call, so on a 2-core CPU `[7, 256] x [256, 768]` costs
~2.7-3.7 one-row products (docs/benchmarks.md, "A few-row matmul kernel"). The kernel streams the
weight once, from a column-tiled copy (`pack`), with the output tile in registers, on up to two
threads of XLA's intra-op pool. XLA does not hoist the pack out of a while loop, so decode loops
pack their weights before the loop (`packed`, `models.decode_packs`).

Each output element is summed in the same order whatever the number of rows, so a token's logits
do not depend on how many tokens share the call: plain decoding (1 row) and a verify step (T rows)
give bitwise the same numbers for the same token and context.

`matmul(x, w)` uses the kernel when it can (CPU, fp32, the library built) and `x @ w` otherwise;
on other platforms (also when exporting for one) `lax.platform_dependent` lowers the plain dot.
The library is compiled with the system's C++ compiler on first use into `JAX_SPEC_CACHE_DIR`
(default `~/.cache/jax_spec`); `JAX_SPEC_ROWS_MATMUL=0` turns the kernel off.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp

_TARGET = 'jax_spec_rows_matmul'
BLOCK_TARGET = 'jax_spec_block_decode'   # block_decode.cc, built into the same library
FEATURE_TARGET = 'jax_spec_feature_decode'   # block_decode.cc: a feature drafter's whole step
_DIR = os.path.dirname(os.path.abspath(__file__))
_SOURCES = tuple(os.path.join(_DIR, name) for name in ('rows_matmul.cc', 'block_decode.cc'))
_HEADERS = (os.path.join(_DIR, 'rows_matmul.h'),)
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_signature() -> str:
  """What the -march=native build depends on: the CPU's feature flags."""
  try:
    with open('/proc/cpuinfo') as fh:
      flags = next((line for line in fh if line.startswith('flags')), '')
  except OSError:
    flags = ''
  return flags or platform.processor() or platform.machine()


def _library_path() -> str:
  source = b''
  for path in _SOURCES + _HEADERS:
    with open(path, 'rb') as fh:
      source += fh.read()
  key = hashlib.sha256(source + jax.__version__.encode() + _cpu_signature().encode()).hexdigest()
  cache = os.environ.get('JAX_SPEC_CACHE_DIR',
                         os.path.join(os.path.expanduser('~'), '.cache', 'jax_spec'))
  return os.path.join(cache, f'rows_matmul-{key[:16]}.so')


def _build(path: str) -> None:
  compiler = shutil.which(os.environ.get('CXX', 'c++')) or shutil.which('g++')
  if compiler is None:
    raise RuntimeError('no C++ compiler (set CXX)')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=os.path.dirname(path))
  os.close(fd)
  # -ffp-contract=off: the kernel's fused multiply-adds are explicit; nothing else may be fused.
  cmd = [compiler, '-O3', '-march=native', '-ffp-contract=off', '-std=c++17', '-shared', '-fPIC',
         '-w', '-I', jax.ffi.include_dir(), *_SOURCES, '-o', tmp]
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    os.replace(tmp, path)   # atomic: concurrent builders (test workers) never see a partial file
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{e.stderr[-2000:]}') from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def available() -> bool:
  """Whether the kernel is registered (building it on the first call); False if it is switched
  off or cannot be built (logged once)."""
  with _lock:
    if 'ok' not in _state:
      _state['ok'] = False
      if os.environ.get('JAX_SPEC_ROWS_MATMUL', '1') != '0':
        try:
          path = _library_path()
          if not os.path.exists(path):
            _build(path)
          lib = ctypes.cdll.LoadLibrary(path)
          jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.JaxSpecRowsMatmul),
                                      platform='cpu')
          jax.ffi.register_ffi_target(BLOCK_TARGET, jax.ffi.pycapsule(lib.JaxSpecBlockDecode),
                                      platform='cpu')
          jax.ffi.register_ffi_target(FEATURE_TARGET,
                                      jax.ffi.pycapsule(lib.JaxSpecFeatureDecode), platform='cpu')
          lib.JaxSpecRowsMatmulTile.restype = ctypes.c_int64
          lib.JaxSpecRowsMatmulBf16Dot.restype = ctypes.c_int64
          _state['tile'] = int(lib.JaxSpecRowsMatmulTile())
          _state['bf16_dot'] = bool(lib.JaxSpecRowsMatmulBf16Dot())
          _state['ok'] = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
          logging.warning('rows_matmul: falling back to XLA dots (%s)', e)
    return bool(_state['ok'])


def tile_width() -> int:
  """Columns per packed tile of the built kernel: its SIMD width (16 with AVX-512, 8 with AVX2)."""
  if not available():
    raise RuntimeError('rows_matmul: the kernel is not available (see the logged reason)')
  return int(_state['tile'])


def bf16_dot() -> bool:
  """Whether pair tiles (bf16 products) run on AVX512_BF16 dot-product instructions; without
  them the kernel computes the same products in a scalar loop (correct, slow)."""
  return available() and bool(_state['bf16_dot'])


PACK_DTYPES = (jnp.float32, jnp.bfloat16)


def pack(w_DF, dtype=jnp.float32, pairs: bool = False):
  """`[D, F]` -> `[ceil(F / W), D, W]` column tiles (zero padded), W = `tile_width()`: the
  kernel's weight layout. dtype: the tiles' type, fp32 or bf16. The kernel widens bf16 tiles to
  fp32 exactly, so they give bitwise the numbers of the fp32 tiles of the same (bf16-rounded)
  weight, from half the bytes.

  pairs: bf16 products instead. `[ceil(F / W), D / 2, W, 2]` bf16 (rows 2k and 2k + 1 of a column
  side by side; D even): the kernel rounds x to bf16 at each matmul and adds the products of bf16
  values in fp32, two per dot-product instruction (AVX512_BF16; `bf16_dot`)."""
  if not any(jnp.dtype(dtype) == d for d in PACK_DTYPES):
    raise ValueError(f'pack: dtype must be float32 or bfloat16, got {dtype!r}')
  d_in, d_out = w_DF.shape
  if pairs and (jnp.dtype(dtype) != jnp.bfloat16 or d_in % 2):
    raise ValueError(f'pack: pairs=True needs dtype bfloat16 and an even input width, got '
                     f'{jnp.dtype(dtype).name} and w_DF {w_DF.shape}')
  tile = tile_width()
  padded = -(-d_out // tile) * tile
  w_DF = jnp.pad(w_DF.astype(dtype), ((0, 0), (0, padded - d_out)))
  if pairs:
    return w_DF.reshape(d_in // 2, 2, padded // tile, tile).transpose(2, 0, 3, 1)
  return w_DF.reshape(d_in, padded // tile, tile).transpose(1, 0, 2)


def _kernel(x_RD, tiles_NDW, d_out):
  num_tiles, tile = tiles_NDW.shape[0], tiles_NDW.shape[2]
  y = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x_RD.shape[0], num_tiles * tile),
                                                     jnp.float32),
                       vmap_method='sequential')(x_RD, tiles_NDW)
  return y[:, :d_out]


_PACKED: contextvars.ContextVar[dict | None] = contextvars.ContextVar('rows_matmul_packed',
                                                                     default=None)


# Below this many weight elements the custom call's own cost outweighs the GEMM's repacking (the
# `tiny` draft model's 64-wide matmuls ran slower through the kernel).
MIN_WEIGHT_SIZE = 1 << 15


def usable(w_DF) -> bool:
  """Whether `matmul` sends this weight to the kernel: fp32, large enough, the kernel built."""
  return w_DF.dtype == jnp.float32 and w_DF.size >= MIN_WEIGHT_SIZE and available()


@contextlib.contextmanager
def packed(tiles_by_key: dict):
  """Within the block, `matmul(..., key=k)` uses `tiles_by_key[k]` instead of packing its weight.

  A decode loop packs its weights once, before the loop, and traces its body in this block: XLA
  does not hoist the pack out of a while loop by itself, and a pack per step would copy every
  weight at every token.
  """
  token = _PACKED.set(tiles_by_key)
  try:
    yield
  finally:
    _PACKED.reset(token)


def tiles(w_DF, key=None):
  """`w_DF` packed: its entry `key` in an enclosing `packed` block, else packed here."""
  tiles_NDW = (_PACKED.get() or {}).get(key) if key is not None else None
  return pack(w_DF) if tiles_NDW is None else tiles_NDW


def matmul(x, w_DF, key=None):
  """`x @ w_DF` for `x [..., D]`, through the kernel on CPU when both are fp32 (see the module
  docstring); forward only (no gradient), for decoding. `key`: this weight's entry in an
  enclosing `packed` block, if any."""
  if x.shape[-1] != w_DF.shape[0]:
    raise ValueError(f'matmul: x {x.shape} and w_DF {w_DF.shape} do not contract')
  if x.dtype != jnp.float32 or not usable(w_DF):
    return x @ w_DF
  x_RD = x.reshape(-1, x.shape[-1])
  tiles_NDW = tiles(w_DF, key)
  y_RF = jax.lax.platform_dependent(
      x_RD, tiles_NDW, w_DF, cpu=lambda x, t, _: _kernel(x, t, w_DF.shape[1]),
      default=lambda x, _, w: x @ w)
  return y_RF.reshape(x.shape[:-1] + (w_DF.shape[1],))
