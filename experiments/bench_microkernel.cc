// One core's fp32 FMA peak, and rows_matmul.h's register block against it, without XLA.
//
//   c++ -O3 -march=native -ffp-contract=off -std=c++17 -I jax_spec/kernels \
//       -I "$(python -c 'import jax.ffi; print(jax.ffi.include_dir())')" \
//       experiments/bench_microkernel.cc -o /tmp/bench_microkernel && /tmp/bench_microkernel
//
// (AVX2 or AVX-512 machines: the scalar build has no SIMD register type to time.)
//
// Prints GFLOP/s of 12 independent FMA chains (the core's peak), then of `jax_spec::Block<R, T>`
// (R rows, T column tiles) over 16 distinct [256, 768] weights (12.6 MB, streamed from L3 as a
// model's are), one thread, in fp32 and in bf16 pair tiles (`jax_spec::PairBlock`). docs/benchmarks.md ("Part timings without fixed costs") reads the
// verify cost's floor from the peak and chose rows_matmul.h's kMaxStreams from the T sweep.
#include <chrono>
#include <cstdio>
#include <vector>

#include "rows_matmul.h"

namespace {

using jax_spec::kCols;

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

float Peak(int64_t iterations) {
  jax_spec::Vec acc[12];
  float init[kCols] = {};
  for (int i = 0; i < 12; ++i) acc[i] = jax_spec::Load(init);
  float b_init[kCols], c_init[kCols];
  for (int64_t i = 0; i < kCols; ++i) b_init[i] = 0.9999f, c_init[i] = 1e-4f;
  const jax_spec::Vec b = jax_spec::Load(b_init), c = jax_spec::Load(c_init);
  for (int64_t k = 0; k < iterations; ++k)
    for (int i = 0; i < 12; ++i) acc[i] = jax_spec::Fma(acc[i], b, c);
  float out[kCols], sum = 0;
  for (int i = 0; i < 12; ++i) {
    jax_spec::Store(out, acc[i]);
    sum += out[0];
  }
  return sum;
}

template <int64_t kR, int64_t kT>
double BlockGflops(int64_t d_in = 256, int64_t tiles = 48, int64_t weights = 16, int reps = 150) {
  std::vector<float> x(kR * d_in, 0.5f), w(weights * tiles * d_in * kCols, 0.25f);
  std::vector<float> y(kR * tiles * kCols);
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r)
    for (int64_t m = 0; m < weights; ++m) {
      const float* wm = w.data() + m * tiles * d_in * kCols;
      for (int64_t t = 0; t + kT <= tiles; t += kT)
        jax_spec::Block<float, kR, kT>(x.data(), wm + t * d_in * kCols, y.data() + t * kCols,
                                       d_in, tiles * kCols);
    }
  return 2.0 * kR * d_in * (tiles / kT * kT) * kCols * reps * weights / Seconds(t0) / 1e9;
}

// The same product in bf16 pair tiles (`jax_spec::PairBlock`: rows as bf16 pairs, the weight's
// tiles [d_in / 2, kCols, 2] bf16): half the weight bytes, two products per instruction.
template <int64_t kR, int64_t kT>
double PairBlockGflops(int64_t d_in = 256, int64_t tiles = 48, int64_t weights = 16,
                       int reps = 150) {
  const int64_t half = d_in / 2;
  std::vector<uint32_t> x(kR * half, 0x3f003f00u);                     // pairs of 0.5
  std::vector<uint16_t> w(weights * tiles * half * 2 * kCols, 0x3e80);  // 0.25
  std::vector<float> y(kR * tiles * kCols);
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r)
    for (int64_t m = 0; m < weights; ++m) {
      const uint16_t* wm = w.data() + m * tiles * half * 2 * kCols;
      for (int64_t t = 0; t + kT <= tiles; t += kT)
        jax_spec::PairBlock<kR, kT>(x.data(), wm + t * half * 2 * kCols, y.data() + t * kCols,
                                    half, tiles * kCols);
    }
  return 2.0 * kR * d_in * (tiles / kT * kT) * kCols * reps * weights / Seconds(t0) / 1e9;
}

}  // namespace

int main() {
  constexpr int64_t kIterations = 100000000;
  const auto t0 = std::chrono::steady_clock::now();
  const float sink = Peak(kIterations);
  std::printf("peak, one core: %.1f GFLOP/s (%g)\n",
              2.0 * kCols * 12 * kIterations / Seconds(t0) / 1e9, sink);
  std::printf("Block<R, T> GFLOP/s, one core, L3-resident weights (fp32 | bf16 pairs%s):\n",
              jax_spec::kBf16Dot ? "" : ", scalar: no AVX512_BF16");
  std::printf("R=1: T=4 %.0f | %.0f  T=6 %.0f | %.0f\n", BlockGflops<1, 4>(), PairBlockGflops<1, 4>(),
              BlockGflops<1, 6>(), PairBlockGflops<1, 6>());
  std::printf("R=2: T=6 %.0f | %.0f\n", BlockGflops<2, 6>(), PairBlockGflops<2, 6>());
  std::printf("R=5: T=4 %.0f | %.0f\n", BlockGflops<5, 4>(), PairBlockGflops<5, 4>());
  std::printf("R=8: T=3 %.0f | %.0f\n", BlockGflops<8, 3>(), PairBlockGflops<8, 3>());
  std::printf("R=12: T=2 %.0f | %.0f\n", BlockGflops<12, 2>(), PairBlockGflops<12, 2>());
  return 0;
}
