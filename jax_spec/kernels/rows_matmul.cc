// y[R, F] = x[R, D] @ w[D, F] for few rows R, in fp32 (w fp32 or bf16, widened exactly): the
// decode / verify step's matmuls on CPU.
//
// Why: XLA:CPU sends every matmul of more than one row to a GEMM that packs the weight into
// panels at each call, so on a 2-core CPU a 4..16-row matmul costs 2-4 one-row ones although it
// reads the same weight (experiments.bench_matmul). Here the weight is streamed once per group of
// up to kRows rows, straight from its row-major layout: each output tile of kRows x kCols floats
// lives in registers while d runs over D. Every output element is summed over d in the same
// order with one fused multiply-add per term (built with -ffp-contract=off, so the compiler
// cannot fuse some products and not others), whatever R is: a row's result does not depend on how
// many rows share the call.
#include "rows_matmul.h"

namespace {

using jax_spec::kCols;

// x [R, D], w_tiles [F / kCols, D, kCols] (the weight [D, F] packed into column tiles, fp32 or
// bf16) -> y [R, F].
ffi::Error RowsMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w_tiles,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w_tiles.dimensions();
  const auto y_dims = y->dimensions();
  if (!jax_spec::IsTiles(w_tiles) || x_dims.size() != 2 ||
      x_dims[1] != jax_spec::TilesDepth(w_tiles) ||
      y_dims.size() != 2 || y_dims[0] != x_dims[0] || y_dims[1] != w_dims[0] * kCols) {
    return ffi::Error::InvalidArgument(
        "rows_matmul: expected x [R, D], w_tiles [F / W, D, W] fp32 or bf16 or pair tiles "
        "[F / W, D / 2, W, 2] bf16 (W = JaxSpecRowsMatmulTile()) and y [R, F]");
  }
  jax_spec::Matmul(pool, x.typed_data(), w_tiles, y->typed_data(), x_dims[0]);
  return ffi::Error::Success();
}

}  // namespace

// The tile width `pack` must use with this build.
extern "C" int64_t JaxSpecRowsMatmulTile() { return kCols; }

// Whether pair tiles (bf16 products) run on the AVX512_BF16 instructions (else a scalar loop).
extern "C" int64_t JaxSpecRowsMatmulBf16Dot() { return jax_spec::kBf16Dot ? 1 : 0; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSpecRowsMatmul, RowsMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::AnyBuffer>()          // w tiles
                                  .Ret<ffi::Buffer<ffi::F32>>());
