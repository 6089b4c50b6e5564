// One pre-norm transformer block (`jax_spec.models.layers.Block.decode`) on the few new rows of a
// decode or verify step, in fp32, in one call:
//
//   h = RMSNorm(x); q, k, v = h W_qkv (+ b) [; per-head RMSNorm of q, k]; RoPE(q, k)
//   write k, v at cache slots [len, len + T); o = softmax(q K^T * scale) V over the visible slots
//   x += o W_out (+ b);  x += (silu(g) * u) W_down, [g, u] = RMSNorm(x) W_gate_up
//
// Why: XLA:CPU runs such a block as ~25 small ops, and its cache attention reads every slot of the
// cache; here they are one custom call whose matmuls are rows_matmul.h's and whose attention reads
// only the slots a query can see (docs/benchmarks.md, "One block per kernel call": 1.13-1.35x on
// the decode loops).
//
// Query t of row b sees the slots j < len_b and len_b + t' iff mask[b, t, t'] (slots past the
// cache end do not exist), in increasing slot order; its softmax is exact two-pass (max, then
// exp and sums in slot order). Every row is computed by the same code whatever the number of rows
// in the call, so a token's output does not depend on how many tokens share the step: plain
// decoding (1 row) and a verify step (T rows) give bitwise the same numbers for the same token and
// context.
#include <cstring>
#include <vector>

#include "rows_matmul.h"

namespace {

using jax_spec::kCols;

// The SIMD operations this file needs beyond rows_matmul.h's, per instruction set.
#if defined(__AVX512F__)
inline jax_spec::Vec Set1(float a) { return _mm512_set1_ps(a); }
inline jax_spec::Vec Mul(jax_spec::Vec a, jax_spec::Vec b) { return _mm512_mul_ps(a, b); }
inline jax_spec::Vec Add(jax_spec::Vec a, jax_spec::Vec b) { return _mm512_add_ps(a, b); }
inline jax_spec::Vec Sub(jax_spec::Vec a, jax_spec::Vec b) { return _mm512_sub_ps(a, b); }
inline jax_spec::Vec Clamp(jax_spec::Vec x, float lo, float hi) {
  return _mm512_min_ps(_mm512_max_ps(x, Set1(lo)), Set1(hi));
}
inline jax_spec::Vec RoundNearest(jax_spec::Vec x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
// 2^n for integral n (as floats) in the normal range: n + 127 in the exponent bits.
inline jax_spec::Vec Pow2(jax_spec::Vec n) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline float HorizontalSum(jax_spec::Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
inline jax_spec::Vec Set1(float a) { return _mm256_set1_ps(a); }
inline jax_spec::Vec Mul(jax_spec::Vec a, jax_spec::Vec b) { return _mm256_mul_ps(a, b); }
inline jax_spec::Vec Add(jax_spec::Vec a, jax_spec::Vec b) { return _mm256_add_ps(a, b); }
inline jax_spec::Vec Sub(jax_spec::Vec a, jax_spec::Vec b) { return _mm256_sub_ps(a, b); }
inline jax_spec::Vec Clamp(jax_spec::Vec x, float lo, float hi) {
  return _mm256_min_ps(_mm256_max_ps(x, Set1(lo)), Set1(hi));
}
inline jax_spec::Vec RoundNearest(jax_spec::Vec x) {
  return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline jax_spec::Vec Pow2(jax_spec::Vec n) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline float HorizontalSum(jax_spec::Vec v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#endif

#if defined(JAX_SPEC_SIMD)
// Cephes expf: exp(x) = 2^n exp(r), r = x - n ln 2 (in two parts), exp(r) a degree-6 polynomial.
inline jax_spec::Vec ExpVec(jax_spec::Vec x) {
  x = Clamp(x, -87.0f, 88.0f);
  const jax_spec::Vec n = RoundNearest(Mul(x, Set1(1.44269504088896341f)));
  jax_spec::Vec r = Sub(x, Mul(n, Set1(0.693359375f)));
  r = Sub(r, Mul(n, Set1(-2.12194440e-4f)));
  jax_spec::Vec p = Set1(1.9875691500E-4f);
  for (float c : {1.3981999507E-3f, 8.3334519073E-3f, 4.1665795894E-2f, 1.6666665459E-1f,
                  5.0000001201E-1f})
    p = Add(Mul(p, r), Set1(c));
  p = Add(Add(Mul(p, Mul(r, r)), r), Set1(1.0f));
  return Mul(p, Pow2(n));
}
#endif

// y[i] = exp(x[i]) for i < n (the same lanes and order whatever the caller).
void Exp(const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(JAX_SPEC_SIMD)
  for (; i + kCols <= n; i += kCols) jax_spec::Store(y + i, ExpVec(jax_spec::Load(x + i)));
#endif
  for (; i < n; ++i) y[i] = std::exp(x[i]);
}

float Dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
  int64_t i = 0;
#if defined(JAX_SPEC_SIMD)
  if (n >= kCols) {
    jax_spec::Vec acc = jax_spec::Zero();
    for (; i + kCols <= n; i += kCols)
      acc = jax_spec::Fma(jax_spec::Load(a + i), jax_spec::Load(b + i), acc);
    sum = HorizontalSum(acc);
  }
#endif
  for (; i < n; ++i) sum = std::fma(a[i], b[i], sum);
  return sum;
}

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * scale, rows of width d (in place allowed).
void RmsNorm(const float* x, const float* scale, float* y, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float sq = 0.0f;
    for (int64_t i = 0; i < d; ++i) sq += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(sq / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) y[r * d + i] = xr[i] * inv * scale[i];
  }
}

// Rotate-half RoPE of one head in place: x = x cos + [x2, x1] sin (sin's first half negated).
void Rope(float* x, const float* cos, const float* sin, int64_t e) {
  const int64_t half = e / 2;
  float rotated[512];
  for (int64_t i = 0; i < half; ++i) {
    rotated[i] = x[half + i];
    rotated[half + i] = x[i];
  }
  for (int64_t i = 0; i < e; ++i) x[i] = x[i] * cos[i] + rotated[i] * sin[i];
}

struct Dims {
  int64_t batch, rows_per_batch, d_model, slots, heads, kv_heads, head_dim, d_ff;
};

// Attention of query (b, t, h) into o [head_dim]; `scores` has room for slots + kCols floats.
void AttendOne(const Dims& n, int64_t b, int64_t t, int64_t h, const float* q, const float* k_cache,
               const float* v_cache, int64_t length, const bool* mask, float scale, float* o,
               std::vector<int64_t>& visible, std::vector<float>& scores) {
  const int64_t e = n.head_dim, g = h / (n.heads / n.kv_heads), T = n.rows_per_batch;
  visible.clear();
  for (int64_t j = 0; j < std::min(length, n.slots); ++j) visible.push_back(j);
  for (int64_t u = 0; u < T; ++u)
    if (mask[(b * T + t) * T + u] && length + u < n.slots && length + u >= 0)
      visible.push_back(length + u);
  std::fill(o, o + e, 0.0f);
  const int64_t count = static_cast<int64_t>(visible.size());
  if (count == 0) return;
  const int64_t stride = n.kv_heads * e, base = b * n.slots * stride + g * e;
  float max_score = -INFINITY;
  for (int64_t i = 0; i < count; ++i) {
    scores[i] = Dot(q, k_cache + base + visible[i] * stride, e) * scale;
    max_score = std::max(max_score, scores[i]);
  }
  for (int64_t i = 0; i < count; ++i) scores[i] -= max_score;
  Exp(scores.data(), scores.data(), count);
  float total = 0.0f;
  for (int64_t i = 0; i < count; ++i) total += scores[i];
  int64_t j0 = 0;
#if defined(JAX_SPEC_SIMD)
  // o = sum_i p_i v_i, kMaxAcc vectors of head_dim at a time in registers, keys in slot order.
  constexpr int64_t kMaxAcc = 8;
  for (; j0 + kCols <= e; j0 += kMaxAcc * kCols) {
    const int64_t vecs = std::min<int64_t>(kMaxAcc, (e - j0) / kCols);
    jax_spec::Vec acc[kMaxAcc];
    for (int64_t a = 0; a < vecs; ++a) acc[a] = jax_spec::Zero();
    for (int64_t i = 0; i < count; ++i) {
      const jax_spec::Vec p = jax_spec::Broadcast(&scores[i]);
      const float* v = v_cache + base + visible[i] * stride + j0;
      for (int64_t a = 0; a < vecs; ++a)
        acc[a] = jax_spec::Fma(p, jax_spec::Load(v + a * kCols), acc[a]);
    }
    for (int64_t a = 0; a < vecs; ++a) jax_spec::Store(o + j0 + a * kCols, acc[a]);
    if (vecs < kMaxAcc) {
      j0 += vecs * kCols;
      break;
    }
  }
#endif
  for (int64_t i = 0; i < count; ++i) {
    const float* v = v_cache + base + visible[i] * stride;
    for (int64_t j = j0; j < e; ++j) o[j] = std::fma(scores[i], v[j], o[j]);
  }
  for (int64_t j = 0; j < e; ++j) o[j] /= total;
}

// y[:, :] += x @ w for the first `width` columns of the padded product (bias added if given).
void AddMatmul(ffi::ThreadPool pool, const float* x, ffi::Buffer<ffi::F32>& tiles, int64_t rows,
               const float* bias, float* y, int64_t width, std::vector<float>& scratch) {
  const int64_t num_tiles = tiles.dimensions()[0], d_in = tiles.dimensions()[1];
  scratch.resize(rows * num_tiles * kCols);
  jax_spec::ParallelMatmul(pool, x, tiles.typed_data(), scratch.data(), rows, d_in, num_tiles);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i)
      y[r * width + i] += scratch[r * num_tiles * kCols + i] + (bias ? bias[i] : 0.0f);
}

ffi::Error BlockDecodeImpl(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> attn_scale,
    ffi::Buffer<ffi::F32> qkv_tiles, ffi::Buffer<ffi::F32> qkv_bias, ffi::Buffer<ffi::F32> q_scale,
    ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
    ffi::Buffer<ffi::F32> k_in, ffi::Buffer<ffi::F32> v_in, ffi::Buffer<ffi::S32> lengths,
    ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::F32> out_tiles, ffi::Buffer<ffi::F32> out_bias,
    ffi::Buffer<ffi::F32> mlp_scale, ffi::Buffer<ffi::F32> gate_up_tiles,
    ffi::Buffer<ffi::F32> down_tiles, float eps, float sm_scale, int64_t num_heads,
    int64_t qk_norm, ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> k_cache,
    ffi::ResultBuffer<ffi::F32> v_cache) {
  const auto xd = x.dimensions(), kd = k_cache->dimensions();
  if (xd.size() != 3 || kd.size() != 4 || kd[0] != xd[0] || num_heads % kd[2] != 0 ||
      kd[3] > 512 || kd[3] % 2 != 0) {
    return ffi::Error::InvalidArgument(
        "block_decode: expected x [B, T, D], caches [B, S, K, E] (E even, <= 512) and "
        "num_heads a multiple of K");
  }
  const Dims n{xd[0], xd[1], xd[2], kd[1], num_heads, kd[2], kd[3], down_tiles.dimensions()[1]};
  const int64_t rows = n.batch * n.rows_per_batch, e = n.head_dim;
  const int64_t q_width = n.heads * e, kv_width = n.kv_heads * e;
  const int64_t qkv_width = q_width + 2 * kv_width;
  if (qkv_tiles.dimensions()[1] != n.d_model || out_tiles.dimensions()[1] != q_width ||
      qkv_tiles.dimensions()[0] * kCols < qkv_width ||
      out_tiles.dimensions()[0] * kCols < n.d_model ||
      gate_up_tiles.dimensions()[0] * kCols < 2 * n.d_ff ||
      down_tiles.dimensions()[0] * kCols < n.d_model) {
    return ffi::Error::InvalidArgument("block_decode: packed weights do not match x and the cache");
  }
  std::vector<float> h(rows * n.d_model), qkv(rows * qkv_width, 0.0f), o(rows * q_width);
  std::vector<float> scratch;
  float* out = y->typed_data();
  std::memcpy(out, x.typed_data(), sizeof(float) * rows * n.d_model);

  // Attention: norm, q/k/v, RoPE, cache write.
  RmsNorm(out, attn_scale.typed_data(), h.data(), rows, n.d_model, eps);
  AddMatmul(pool, h.data(), qkv_tiles, rows, qkv_bias.typed_data(), qkv.data(), qkv_width, scratch);
  float* kc = k_cache->typed_data();
  float* vc = v_cache->typed_data();
  const int32_t* len = lengths.typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t b = r / n.rows_per_batch, t = r % n.rows_per_batch;
    float* q_r = qkv.data() + r * qkv_width;
    float* k_r = q_r + q_width;
    if (qk_norm) {
      RmsNorm(q_r, q_scale.typed_data(), q_r, n.heads, e, eps);
      RmsNorm(k_r, k_scale.typed_data(), k_r, n.kv_heads, e, eps);
    }
    const float* c = cos.typed_data() + r * e;
    const float* s = sin.typed_data() + r * e;
    for (int64_t hd = 0; hd < n.heads + n.kv_heads; ++hd) Rope(q_r + hd * e, c, s, e);
    const int64_t slot = static_cast<int64_t>(len[b]) + t;
    if (slot >= 0 && slot < n.slots) {
      const int64_t at = (b * n.slots + slot) * kv_width;
      std::memcpy(kc + at, k_r, sizeof(float) * kv_width);
      std::memcpy(vc + at, k_r + kv_width, sizeof(float) * kv_width);
    }
  }
  const bool* m = mask.typed_data();
  const int64_t queries = rows * n.heads, threads = jax_spec::KernelThreads(pool);
  const int64_t chunks = std::min(threads, queries);
  jax_spec::ParallelFor(pool, chunks, threads, [&](int64_t chunk) {
    std::vector<int64_t> visible;
    std::vector<float> scores(n.slots + n.rows_per_batch + kCols);
    for (int64_t i = chunk * queries / chunks; i < (chunk + 1) * queries / chunks; ++i) {
      const int64_t r = i / n.heads, hd = i % n.heads;
      const int64_t b = r / n.rows_per_batch, t = r % n.rows_per_batch;
      AttendOne(n, b, t, hd, qkv.data() + r * qkv_width + hd * e, kc, vc, len[b], m, sm_scale,
                o.data() + r * q_width + hd * e, visible, scores);
    }
  });
  AddMatmul(pool, o.data(), out_tiles, rows, out_bias.typed_data(), out, n.d_model, scratch);

  // MLP: norm, [gate, up], silu(gate) * up, down.
  RmsNorm(out, mlp_scale.typed_data(), h.data(), rows, n.d_model, eps);
  const int64_t gu_stride = gate_up_tiles.dimensions()[0] * kCols;
  std::vector<float> gate_up(rows * gu_stride), act(rows * n.d_ff), neg(n.d_ff);
  jax_spec::ParallelMatmul(pool, h.data(), gate_up_tiles.typed_data(), gate_up.data(), rows,
                           n.d_model, gate_up_tiles.dimensions()[0]);
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up.data() + r * gu_stride;
    const float* u = g + n.d_ff;
    for (int64_t i = 0; i < n.d_ff; ++i) neg[i] = -g[i];
    Exp(neg.data(), neg.data(), n.d_ff);
    for (int64_t i = 0; i < n.d_ff; ++i) act[r * n.d_ff + i] = g[i] / (1.0f + neg[i]) * u[i];
  }
  AddMatmul(pool, act.data(), down_tiles, rows, nullptr, out, n.d_model, scratch);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxSpecBlockDecode, BlockDecodeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // x [B, T, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // attn_norm scale [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q|k|v packed
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q|k|v bias
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q_norm scale [E]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // k_norm scale [E]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // cos [B, T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // sin [B, T, E]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // k cache (aliased)
                                  .Arg<ffi::Buffer<ffi::F32>>()    // v cache (aliased)
                                  .Arg<ffi::Buffer<ffi::S32>>()    // lengths [B]
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // mask [B, T, T]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // out packed
                                  .Arg<ffi::Buffer<ffi::F32>>()    // out bias [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // mlp_norm scale [D]
                                  .Arg<ffi::Buffer<ffi::F32>>()    // gate|up packed
                                  .Arg<ffi::Buffer<ffi::F32>>()    // down packed
                                  .Attr<float>("eps")
                                  .Attr<float>("sm_scale")
                                  .Attr<int64_t>("num_heads")
                                  .Attr<int64_t>("qk_norm")
                                  .Ret<ffi::Buffer<ffi::F32>>()    // y [B, T, D]
                                  .Ret<ffi::Buffer<ffi::F32>>()    // k cache
                                  .Ret<ffi::Buffer<ffi::F32>>());  // v cache
