// The few-row fp32 matmul core shared by the FFI handlers (rows_matmul.cc, block_decode.cc):
// y[R, F] = x[R, D] @ w[D, F] from the weight packed into column tiles (see rows_matmul.cc).
// The weight is fp32 (`float`) or bfloat16 (`uint16_t`, its bits): a bf16 weight is widened to
// fp32 exactly in registers, so it gives bitwise the result of its fp32 copy and streams half the
// bytes (a feature drafter's depth reads its weights for one row: docs/benchmarks.md).
#pragma once
#include <algorithm>
#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_spec {

// The packed weight's tile width and the register file: 16 fp32 lanes and 32 registers with
// AVX-512, 8 and 16 with AVX2. Python reads the width (JaxSpecRowsMatmulTile) and packs to it.
#if defined(__AVX512F__)
constexpr int64_t kCols = 16;
constexpr int64_t kAcc = 24;    // accumulator registers (+ weights + broadcast: <= 32)
using Vec = __m512;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec Load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Broadcast(const float* p) { return _mm512_set1_ps(*p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec Load(const uint16_t* p) {   // bf16 bits -> the fp32 of the same value
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
#define JAX_SPEC_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kCols = 8;
constexpr int64_t kAcc = 12;    // accumulator registers (+ weights + broadcast: <= 16)
using Vec = __m256;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec Load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Broadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec Load(const uint16_t* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
#define JAX_SPEC_SIMD 1
#else
constexpr int64_t kCols = 8;
constexpr int64_t kAcc = 12;
#endif
// Rows per pass over the weight (more: another pass). With AVX-512, 16 rows in one pass (one
// tile each) ran 1.3x slower than two passes of 8 (three tiles each; experiments.bench_matmul).
constexpr int64_t kRows = 12;

// A weight element as fp32: itself, or a bf16's bits in the high half of a float's.
inline float ToFloat(float w) { return w; }
inline float ToFloat(uint16_t w) {
  uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// kR rows x kT column tiles: y[r, (t0 + t) * kCols + j] = sum_d x[r, d] * w[t0 + t, d, j], d in
// order, one fused multiply-add per term. kR * kT <= kAcc independent accumulators hide the FMA
// latency when there are few rows.
template <typename W, int64_t kR, int64_t kT>
void Block(const float* x, const W* w, float* y, int64_t d_in, int64_t y_stride) {
#if defined(JAX_SPEC_SIMD)
  Vec acc[kR][kT];
  for (int64_t r = 0; r < kR; ++r)
    for (int64_t t = 0; t < kT; ++t) acc[r][t] = Zero();
  for (int64_t d = 0; d < d_in; ++d) {
    Vec w_t[kT];
    for (int64_t t = 0; t < kT; ++t) w_t[t] = Load(w + (t * d_in + d) * kCols);
    for (int64_t r = 0; r < kR; ++r) {
      const Vec xv = Broadcast(x + r * d_in + d);
      for (int64_t t = 0; t < kT; ++t) acc[r][t] = Fma(xv, w_t[t], acc[r][t]);
    }
  }
  for (int64_t r = 0; r < kR; ++r)
    for (int64_t t = 0; t < kT; ++t) Store(y + r * y_stride + t * kCols, acc[r][t]);
#else
  float acc[kR][kT][kCols] = {};
  for (int64_t d = 0; d < d_in; ++d)
    for (int64_t r = 0; r < kR; ++r)
      for (int64_t t = 0; t < kT; ++t)
        for (int64_t j = 0; j < kCols; ++j)
          acc[r][t][j] = std::fma(x[r * d_in + d], ToFloat(w[(t * d_in + d) * kCols + j]),
                                  acc[r][t][j]);
  for (int64_t r = 0; r < kR; ++r)
    for (int64_t t = 0; t < kT; ++t)
      for (int64_t j = 0; j < kCols; ++j) y[r * y_stride + t * kCols + j] = acc[r][t][j];
#endif
}

// At most this many weight tiles are read side by side. With AVX-512 on a Zen 4 core, weights
// streamed from L3, one row over 12 tiles (12 streams) ran at 0.6x the speed of 3-6 tiles, two
// rows at 0.5-0.7x, and 24 tiles at a third (experiments.bench_matmul; docs/benchmarks.md).
constexpr int64_t kMaxStreams = 6;

template <typename W, int64_t kR, size_t... kI>
constexpr auto BlocksTable(std::index_sequence<kI...>) {
  return std::array<void (*)(const float*, const W*, float*, int64_t, int64_t),
                    sizeof...(kI)>{Block<W, kR, kI + 1>...};
}

// Tiles [t_begin, t_end) of kR rows: blocks of kT tiles, then one block of the rest.
template <typename W, int64_t kR>
void Tiles(const float* x, const W* w, float* y, int64_t d_in, int64_t tiles, int64_t t_begin,
           int64_t t_end) {
  constexpr int64_t kT = std::max<int64_t>(1, std::min<int64_t>(kMaxStreams, kAcc / kR));
  static constexpr auto kBlocks = BlocksTable<W, kR>(std::make_index_sequence<kT>());  // [n - 1]
  const int64_t y_stride = tiles * kCols;
  int64_t t = t_begin;
  for (; t + kT <= t_end; t += kT)
    Block<W, kR, kT>(x, w + t * d_in * kCols, y + t * kCols, d_in, y_stride);
  if (t < t_end) kBlocks[t_end - t - 1](x, w + t * d_in * kCols, y + t * kCols, d_in, y_stride);
}

template <typename W>
using TilesFn = void (*)(const float*, const W*, float*, int64_t, int64_t, int64_t, int64_t);
template <typename W, size_t... kI>
constexpr std::array<TilesFn<W>, sizeof...(kI)> TilesTable(std::index_sequence<kI...>) {
  return {Tiles<W, kI + 1>...};
}
template <typename W>   // [kR - 1]: kR rows
constexpr auto kTilesFns = TilesTable<W>(std::make_index_sequence<kRows>());

// bf16 products: the weight packed as pair tiles [N, ceil(D / 2), kCols, 2] bf16 (`pack(...,
// pairs=True)`: w[2k, j] and w[2k + 1, j] side by side) and the rows rounded to bf16 (round to
// nearest even) at each matmul, as pairs x[2k] | x[2k + 1] << 16. With AVX512_BF16 one vdpbf16ps
// adds two products of bf16 values to each of 16 fp32 accumulators: twice the products of an fp32
// FMA per instruction, from half the weight bytes. Elsewhere a scalar loop adds the two exact
// products with two FMAs (correct, slow; and not bitwise the instruction's sums).
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define JAX_SPEC_BF16_DOT 1
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

template <int64_t kR, int64_t kT>
void PairBlock(const uint32_t* x, const uint16_t* w, float* y, int64_t half, int64_t y_stride) {
#if defined(JAX_SPEC_BF16_DOT)
  __m512 acc[kR][kT];
  for (int64_t r = 0; r < kR; ++r)
    for (int64_t t = 0; t < kT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < half; ++k) {
    __m512i w_t[kT];
    for (int64_t t = 0; t < kT; ++t)
      w_t[t] = _mm512_loadu_si512(w + (t * half + k) * 2 * kCols);
    for (int64_t r = 0; r < kR; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * half + k]));
      for (int64_t t = 0; t < kT; ++t)
        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], xv, (__m512bh)w_t[t]);
    }
  }
  for (int64_t r = 0; r < kR; ++r)
    for (int64_t t = 0; t < kT; ++t) _mm512_storeu_ps(y + r * y_stride + t * kCols, acc[r][t]);
#else
  float acc[kR][kT][kCols] = {};
  for (int64_t k = 0; k < half; ++k)
    for (int64_t r = 0; r < kR; ++r) {
      const uint32_t pair = x[r * half + k];
      const float x0 = ToFloat(static_cast<uint16_t>(pair));
      const float x1 = ToFloat(static_cast<uint16_t>(pair >> 16));
      for (int64_t t = 0; t < kT; ++t)
        for (int64_t j = 0; j < kCols; ++j) {
          const uint16_t* w_kj = w + ((t * half + k) * kCols + j) * 2;
          const float first = std::fma(x0, ToFloat(w_kj[0]), acc[r][t][j]);
          acc[r][t][j] = std::fma(x1, ToFloat(w_kj[1]), first);
        }
    }
  for (int64_t r = 0; r < kR; ++r)
    for (int64_t t = 0; t < kT; ++t)
      for (int64_t j = 0; j < kCols; ++j) y[r * y_stride + t * kCols + j] = acc[r][t][j];
#endif
}

template <int64_t kR, size_t... kI>
constexpr auto PairBlocksTable(std::index_sequence<kI...>) {
  return std::array<void (*)(const uint32_t*, const uint16_t*, float*, int64_t, int64_t),
                    sizeof...(kI)>{PairBlock<kR, kI + 1>...};
}

// PairBlock's Tiles: tiles [t_begin, t_end) of kR rows of pairs.
template <int64_t kR>
void PairTiles(const uint32_t* x, const uint16_t* w, float* y, int64_t half, int64_t tiles,
               int64_t t_begin, int64_t t_end) {
  constexpr int64_t kT = std::max<int64_t>(1, std::min<int64_t>(kMaxStreams, kAcc / kR));
  static constexpr auto kBlocks = PairBlocksTable<kR>(std::make_index_sequence<kT>());
  const int64_t y_stride = tiles * kCols, tile = half * 2 * kCols;
  int64_t t = t_begin;
  for (; t + kT <= t_end; t += kT)
    PairBlock<kR, kT>(x, w + t * tile, y + t * kCols, half, y_stride);
  if (t < t_end) kBlocks[t_end - t - 1](x, w + t * tile, y + t * kCols, half, y_stride);
}

using PairTilesFn = void (*)(const uint32_t*, const uint16_t*, float*, int64_t, int64_t, int64_t,
                             int64_t);
template <size_t... kI>
constexpr std::array<PairTilesFn, sizeof...(kI)> PairTilesTable(std::index_sequence<kI...>) {
  return {PairTiles<kI + 1>...};
}
constexpr auto kPairTilesFns = PairTilesTable(std::make_index_sequence<kRows>());  // [kR - 1]

// fp32 -> bf16 bits, round to nearest even (NaN stays a quiet NaN).
inline uint16_t ToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// x [rows, d] -> pairs [rows, half] (half = ceil(d / 2); an odd d's last pair padded with 0).
inline void ToPairs(const float* x, int64_t rows, int64_t d, int64_t half, uint32_t* pairs) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    uint32_t* pr = pairs + r * half;
    int64_t i = 0;
#if defined(JAX_SPEC_BF16_DOT)
    for (; i + 32 <= d; i += 32) {   // the instruction's rounding for every full vector
      const __m512bh both =
          _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + i + 16), _mm512_loadu_ps(xr + i));
      _mm512_storeu_si512(pr + i / 2, (__m512i)both);
    }
#endif
    for (; i < d; i += 2) {
      const uint32_t lo = ToBf16(xr[i]), hi = i + 1 < d ? ToBf16(xr[i + 1]) : 0;
      pr[i / 2] = lo | hi << 16;
    }
  }
}

// Work shared between the caller and pool threads: chunks of tiles are claimed from a counter,
// and the caller runs every chunk nobody has claimed, so it only ever waits for chunks already
// running on another thread (no deadlock when the pool is busy).
struct Shared {
  std::function<void(int64_t)> run_chunk;
  int64_t chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  void Work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      run_chunk(c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// fn(c) for c in [0, chunks), on the caller and up to `threads - 1` threads of the pool.
inline void ParallelFor(ffi::ThreadPool pool, int64_t chunks, int64_t threads,
                        std::function<void(int64_t)> fn) {
  auto shared = std::make_shared<Shared>();
  shared->chunks = chunks;
  shared->run_chunk = std::move(fn);
  for (int64_t i = 1; i < std::min(threads, chunks); ++i)
    pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  // Spin while the other chunk is short; then yield, so that a pool thread the OS preempted (more
  // busy threads than cores: several processes, or test workers) gets the core back.
  for (int64_t spins = 0; shared->done.load(std::memory_order_acquire) < shared->chunks; ++spins) {
    if (spins > 2000) std::this_thread::yield();
  }
}

// Threads a kernel uses: two (the decode step's matrices are too small to feed more).
inline int64_t KernelThreads(ffi::ThreadPool pool) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), 2));
}

// fn(r0, r1, t0, t1) over equal groups of at most kRows rows (13 rows: 7 + 6, not 12 + 1; each
// streams the weight once) times column chunks that split the weight between up to two threads
// of the pool (a chunk reads its own tiles only). Chunks claimed from a counter in finer pieces
// ran 5% slower (docs/benchmarks.md, "Inside the block kernel").
template <typename Fn>
void ParallelTiles(ffi::ThreadPool pool, int64_t rows, int64_t tiles, Fn fn) {
  const int64_t groups = (rows + kRows - 1) / kRows;
  const int64_t threads = KernelThreads(pool);
  const int64_t min_tiles = 64 / kCols;  // below 64 columns a chunk is not worth a thread's wake-up
  const int64_t splits = std::max<int64_t>(1, std::min(threads, tiles / min_tiles));
  ParallelFor(pool, groups * splits, splits, [=](int64_t c) {
    const int64_t g = c / splits, s = c % splits;
    fn(g * rows / groups, (g + 1) * rows / groups, s * tiles / splits, (s + 1) * tiles / splits);
  });
}

// x [rows, d_in] (row-major), w_data [tiles, d_in, kCols] -> y [rows, tiles * kCols].
template <typename W>
void ParallelMatmul(ffi::ThreadPool pool, const float* x_data, const W* w_data, float* y_data,
                    int64_t rows, int64_t d_in, int64_t tiles) {
  ParallelTiles(pool, rows, tiles, [=](int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
    kTilesFns<W>[r1 - r0 - 1](x_data + r0 * d_in, w_data, y_data + r0 * tiles * kCols, d_in,
                              tiles, t0, t1);
  });
}

// A packed weight's tiles [N, D, kCols] in fp32 or bf16, or bf16 pair tiles [N, D / 2, kCols, 2]
// (bf16 products, PairBlock): the types the handlers accept.
inline bool IsPairTiles(const ffi::AnyBuffer& tiles) {
  const auto dims = tiles.dimensions();
  return dims.size() == 4 && dims[2] == kCols && dims[3] == 2 &&
         tiles.element_type() == ffi::DataType::BF16;
}
inline bool IsTiles(const ffi::AnyBuffer& tiles) {
  const auto type = tiles.element_type();
  return IsPairTiles(tiles) ||
         (tiles.dimensions().size() == 3 && tiles.dimensions()[2] == kCols &&
          (type == ffi::DataType::F32 || type == ffi::DataType::BF16));
}

// The input width D a packed weight contracts (pair tiles: even).
inline int64_t TilesDepth(const ffi::AnyBuffer& tiles) {
  return tiles.dimensions()[1] * (IsPairTiles(tiles) ? 2 : 1);
}

// y [rows, N * kCols] = x [rows, TilesDepth(tiles)] @ tiles (IsTiles), on up to two threads of
// the pool.
inline void Matmul(ffi::ThreadPool pool, const float* x, const ffi::AnyBuffer& tiles, float* y,
                   int64_t rows) {
  const int64_t num_tiles = tiles.dimensions()[0], depth = tiles.dimensions()[1];
  if (IsPairTiles(tiles)) {
    std::vector<uint32_t> pairs(rows * depth);
    ToPairs(x, rows, 2 * depth, depth, pairs.data());
    const auto* w = static_cast<const uint16_t*>(tiles.untyped_data());
    const uint32_t* x_pairs = pairs.data();
    ParallelTiles(pool, rows, num_tiles, [=](int64_t r0, int64_t r1, int64_t t0, int64_t t1) {
      kPairTilesFns[r1 - r0 - 1](x_pairs + r0 * depth, w, y + r0 * num_tiles * kCols, depth,
                                 num_tiles, t0, t1);
    });
  } else if (tiles.element_type() == ffi::DataType::BF16) {
    ParallelMatmul(pool, x, static_cast<const uint16_t*>(tiles.untyped_data()), y, rows, depth,
                   num_tiles);
  } else {
    ParallelMatmul(pool, x, static_cast<const float*>(tiles.untyped_data()), y, rows, depth,
                   num_tiles);
  }
}

}  // namespace jax_spec
