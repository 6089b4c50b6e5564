// PairTiles (rows_matmul.h's bf16 products) of every build against a double-precision product of
// the same bf16-rounded rows and weights: tests/test_rows_matmul.py compiles this with the AVX2,
// AVX-512-without-BF16 and scalar flag sets, which the native build never runs. Prints the largest
// error relative to the largest |y| and exits 1 above 1e-5.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "rows_matmul.h"

int main() {
  using namespace jax_spec;
  const int64_t rows = 5, d = 38, half = d / 2, tiles = 3, f = tiles * kCols;
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  std::vector<float> x(rows * d), w(d * f);
  for (float& v : x) v = normal(gen);
  for (float& v : w) v = normal(gen);
  std::vector<uint32_t> pairs(rows * half);
  ToPairs(x.data(), rows, d, half, pairs.data());
  std::vector<uint16_t> packed(tiles * half * kCols * 2);   // pack(w, bf16, pairs=True)
  for (int64_t t = 0; t < tiles; ++t)
    for (int64_t k = 0; k < half; ++k)
      for (int64_t j = 0; j < kCols; ++j)
        for (int64_t p = 0; p < 2; ++p)
          packed[((t * half + k) * kCols + j) * 2 + p] = ToBf16(w[(2 * k + p) * f + t * kCols + j]);
  std::vector<float> y(rows * f);
  kPairTilesFns[rows - 1](pairs.data(), packed.data(), y.data(), half, tiles, 0, tiles);
  double error = 0, scale = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < f; ++c) {
      double want = 0;
      for (int64_t i = 0; i < d; ++i)
        want += double(ToFloat(ToBf16(x[r * d + i]))) * ToFloat(ToBf16(w[i * f + c]));
      error = std::max(error, std::fabs(want - y[r * f + c]));
      scale = std::max(scale, std::fabs(want));
    }
  std::printf("kCols %ld bf16_dot %d relative error %.3g\n", static_cast<long>(kCols),
              static_cast<int>(kBf16Dot), error / scale);
  return error / scale < 1e-5 ? 0 : 1;
}
