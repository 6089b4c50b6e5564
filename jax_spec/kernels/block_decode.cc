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
#include <utility>
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
inline jax_spec::Vec Max(jax_spec::Vec a, jax_spec::Vec b) { return _mm512_max_ps(a, b); }
inline jax_spec::Vec Div(jax_spec::Vec a, jax_spec::Vec b) { return _mm512_div_ps(a, b); }
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
inline jax_spec::Vec Max(jax_spec::Vec a, jax_spec::Vec b) { return _mm256_max_ps(a, b); }
inline jax_spec::Vec Div(jax_spec::Vec a, jax_spec::Vec b) { return _mm256_div_ps(a, b); }
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

// act[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i] for i < n: every operation
// lane-wise and exact (IEEE division), `ExpVec` on the full vectors and `std::exp` on the tail as
// before, so the numbers are those of the scalar loop it replaced. (The compiler left that loop
// scalar: a division per element was ~40% of the block's own non-matmul time at T = 5, perf
// 2026-12-07.)
void SiluTimes(const float* g, const float* u, float* act, int64_t n) {
  int64_t i = 0;
#if defined(JAX_SPEC_SIMD)
  const jax_spec::Vec one = Set1(1.0f), minus_one = Set1(-1.0f);
  for (; i + kCols <= n; i += kCols) {
    const jax_spec::Vec gv = jax_spec::Load(g + i);
    const jax_spec::Vec e = ExpVec(Mul(gv, minus_one));
    jax_spec::Store(act + i, Mul(Div(gv, Add(one, e)), jax_spec::Load(u + i)));
  }
#endif
  for (; i < n; ++i) act[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// sum_i x[i]^2 in a fixed order: four vectors of kCols lanes accumulate (independent FMA
// chains, where one scalar chain waited 4 cycles per add: 1.2 us of a 5-row block's 2 norms),
// then the vectors pairwise, the lanes in order and the tail. A row's sum does not depend on the
// other rows of the call.
float SumSquares(const float* x, int64_t d) {
  float sum = 0.0f;
  int64_t i = 0;
#if defined(JAX_SPEC_SIMD)
  if (d >= 4 * kCols) {
    jax_spec::Vec acc[4] = {jax_spec::Zero(), jax_spec::Zero(), jax_spec::Zero(), jax_spec::Zero()};
    for (; i + 4 * kCols <= d; i += 4 * kCols) {
      for (int64_t a = 0; a < 4; ++a) {
        const jax_spec::Vec v = jax_spec::Load(x + i + a * kCols);
        acc[a] = jax_spec::Fma(v, v, acc[a]);
      }
    }
    float lanes[kCols];
    jax_spec::Store(lanes, Add(Add(acc[0], acc[1]), Add(acc[2], acc[3])));
    for (float lane : lanes) sum += lane;
  }
#endif
  for (; i < d; ++i) sum += x[i] * x[i];
  return sum;
}

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * scale, rows of width d (in place allowed).
void RmsNorm(const float* x, const float* scale, float* y, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float* yr = y + r * d;
    const float inv = 1.0f / std::sqrt(SumSquares(xr, d) / static_cast<float>(d) + eps);
    int64_t i = 0;
#if defined(JAX_SPEC_SIMD)
    const jax_spec::Vec inv_v = Set1(inv);
    for (; i + kCols <= d; i += kCols)
      jax_spec::Store(yr + i, Mul(Mul(jax_spec::Load(xr + i), inv_v), jax_spec::Load(scale + i)));
#endif
    for (; i < d; ++i) yr[i] = xr[i] * inv * scale[i];
  }
}

// Rotate-half RoPE of one head in place: x = x cos + [x2, x1] sin (sin's first half negated).
void Rope(float* x, const float* cos, const float* sin, int64_t e) {
  const int64_t half = e / 2;
  float rotated[512];
  std::memcpy(rotated, x + half, sizeof(float) * half);
  std::memcpy(rotated + half, x, sizeof(float) * half);
  int64_t i = 0;
#if defined(JAX_SPEC_SIMD)
  for (; i + kCols <= e; i += kCols) {
    const jax_spec::Vec a = Mul(jax_spec::Load(x + i), jax_spec::Load(cos + i));
    jax_spec::Store(x + i, Add(a, Mul(jax_spec::Load(rotated + i), jax_spec::Load(sin + i))));
  }
#endif
  for (; i < e; ++i) x[i] = x[i] * cos[i] + rotated[i] * sin[i];
}

struct Dims {
  int64_t batch, rows_per_batch, d_model, slots, heads, kv_heads, head_dim, d_ff;
};

// Attention of one kv head's queries, kCols at a time: lane l of query vector `v` is query
// (t, h) = (l / per_group, g * per_group + l % per_group) of batch row b, l = v * kCols + lane.
// Lanes are queries in the scores and the softmax, so each is lane-wise and runs over the keys
// in slot order: the prefix slots j < len, then the T new slots len + u, which lane (t, .) sees
// iff mask[b, t, u] (and the slot exists). A masked key adds exact zeros, so a query's numbers
// do not depend on how many queries share the call. Scores are e-ordered FMA chains, four keys
// at a time (independent accumulators hide the FMA latency); the softmax is exact two-pass; the
// weighted sum of values (WeighValues) runs its lanes over head_dim instead.
struct AttendScratch {
  std::vector<float> q_t, scores, visible, masked;
  std::vector<const float*> v_rows;
};

#if defined(JAX_SPEC_SIMD)
using Lanes = jax_spec::Vec;
using jax_spec::Broadcast;
using jax_spec::Fma;
using jax_spec::Load;
using jax_spec::Store;
using jax_spec::Zero;
inline Lanes Exp(Lanes x) { return ExpVec(x); }
#else
// The scalar build's stand-in for a register of kCols lanes (the same lane-wise steps).
struct Lanes {
  float x[kCols];
};
inline Lanes Map2(Lanes a, Lanes b, float (*f)(float, float)) {
  for (int64_t i = 0; i < kCols; ++i) a.x[i] = f(a.x[i], b.x[i]);
  return a;
}
inline Lanes Zero() { return Lanes{}; }
inline Lanes Set1(float a) {
  Lanes v;
  std::fill(v.x, v.x + kCols, a);
  return v;
}
inline Lanes Broadcast(const float* p) { return Set1(*p); }
inline Lanes Load(const float* p) {
  Lanes v;
  std::copy(p, p + kCols, v.x);
  return v;
}
inline void Store(float* p, Lanes v) { std::copy(v.x, v.x + kCols, p); }
inline Lanes Fma(Lanes a, Lanes b, Lanes c) {
  for (int64_t i = 0; i < kCols; ++i) c.x[i] = std::fma(a.x[i], b.x[i], c.x[i]);
  return c;
}
inline Lanes Mul(Lanes a, Lanes b) { return Map2(a, b, [](float x, float y) { return x * y; }); }
inline Lanes Add(Lanes a, Lanes b) { return Map2(a, b, [](float x, float y) { return x + y; }); }
inline Lanes Sub(Lanes a, Lanes b) { return Map2(a, b, [](float x, float y) { return x - y; }); }
inline Lanes Max(Lanes a, Lanes b) {
  return Map2(a, b, [](float x, float y) { return std::max(x, y); });
}
inline Lanes Exp(Lanes a) {
  for (float& x : a.x) x = std::exp(x);
  return a;
}
#endif

// The weighted sum of values of `queries` queries (lane l of p_j = p[j * kCols + l] is query l's
// weight of key j): o_rows[l][i] = sum_j p_j[l] v_rows[j][i] / total[l] (0 if total[l] is 0), for
// i < e. A value row is contiguous, so lanes run over i and a query's weight is broadcast: every
// lane works, however few queries share the kv head (4 in a one-token step of 8 heads over 2).
// Each (l, i) is one FMA chain over the keys in slot order (the scalar tail's std::fma rounds as
// the vector FMA), so a query's output does not depend on the other queries of the call.
// kQ queries x kV vectors of i at a time stay in registers.
template <int64_t kQ, int64_t kV>
void WeighValuesBlock(const float* p, const float* const* v_rows, int64_t keys, int64_t q0,
                      int64_t i0, const float* total, float* const* o_rows) {
  Lanes acc[kQ][kV];
  for (int64_t q = 0; q < kQ; ++q)
    for (int64_t v = 0; v < kV; ++v) acc[q][v] = Zero();
  for (int64_t j = 0; j < keys; ++j) {
    Lanes val[kV];
    for (int64_t v = 0; v < kV; ++v) val[v] = Load(v_rows[j] + i0 + v * kCols);
    for (int64_t q = 0; q < kQ; ++q) {
      const Lanes w = Broadcast(p + j * kCols + q0 + q);
      for (int64_t v = 0; v < kV; ++v) acc[q][v] = Fma(val[v], w, acc[q][v]);
    }
  }
  for (int64_t q = 0; q < kQ; ++q) {
    float out[kV * kCols];
    for (int64_t v = 0; v < kV; ++v) Store(out + v * kCols, acc[q][v]);
    const float t = total[q0 + q];
    float* o = o_rows[q0 + q] + i0;
    for (int64_t i = 0; i < kV * kCols; ++i) o[i] = t > 0.0f ? out[i] / t : 0.0f;
  }
}

// Queries per WeighValuesBlock: kQ x 2 accumulators, two value vectors and a weight in registers.
constexpr int64_t kWeighQueries = jax_spec::kAcc / 3;
using WeighFn = void (*)(const float*, const float* const*, int64_t, int64_t, int64_t,
                         const float*, float* const*);
template <int64_t kV, size_t... kI>
constexpr std::array<WeighFn, sizeof...(kI)> WeighTable(std::index_sequence<kI...>) {
  return {WeighValuesBlock<kI + 1, kV>...};
}

void WeighValues(const float* p, const float* const* v_rows, int64_t keys, int64_t queries,
                 int64_t e, const float* total, float* const* o_rows) {
  static constexpr auto kPairs = WeighTable<2>(std::make_index_sequence<kWeighQueries>());
  static constexpr auto kSingles = WeighTable<1>(std::make_index_sequence<kWeighQueries>());
  for (int64_t q0 = 0; q0 < queries; q0 += kWeighQueries) {
    const int64_t n = std::min(kWeighQueries, queries - q0);
    int64_t i0 = 0;
    for (; i0 + 2 * kCols <= e; i0 += 2 * kCols)
      kPairs[n - 1](p, v_rows, keys, q0, i0, total, o_rows);
    for (; i0 + kCols <= e; i0 += kCols) kSingles[n - 1](p, v_rows, keys, q0, i0, total, o_rows);
    for (; i0 < e; ++i0) {   // the tail of a head_dim that is not a multiple of kCols
      for (int64_t q = q0; q < q0 + n; ++q) {
        float acc = 0.0f;
        for (int64_t j = 0; j < keys; ++j) acc = std::fma(v_rows[j][i0], p[j * kCols + q], acc);
        o_rows[q][i0] = total[q] > 0.0f ? acc / total[q] : 0.0f;
      }
    }
  }
}

void AttendLanes(const Dims& n, int64_t b, int64_t g, int64_t v, const float* qkv,
                 int64_t qkv_width, const float* k_cache, const float* v_cache, int64_t length,
                 const bool* mask, float scale, float* o, int64_t o_width, AttendScratch& s) {
  const int64_t e = n.head_dim, T = n.rows_per_batch, per_group = n.heads / n.kv_heads;
  const int64_t lanes = std::min<int64_t>(kCols, T * per_group - v * kCols);
  const int64_t stride = n.kv_heads * e, base = b * n.slots * stride + g * e;
  // Lane l is query (t, h): its row of x and its offset in a row of q (and of o), once.
  int64_t lane_t[kCols], lane_col[kCols];
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t q = v * kCols + l;
    lane_t[l] = q / per_group;
    lane_col[l] = (g * per_group + q % per_group) * e;
  }
  // q transposed: q_t[i * kCols + l] = q[lane l][i]; unused lanes 0.
  s.q_t.assign(e * kCols, 0.0f);
  for (int64_t l = 0; l < lanes; ++l) {
    const float* q_row = qkv + (b * T + lane_t[l]) * qkv_width + lane_col[l];
    for (int64_t i = 0; i < e; ++i) s.q_t[i * kCols + l] = q_row[i];
  }
  // Where lane l sees new slot len + u: visible 1 and masked 0, else 0 and -inf (unused lanes:
  // unseen). The lanes of one t are consecutive, so each mask entry is read once per t.
  s.visible.assign(T * kCols, 0.0f);
  s.masked.assign(T * kCols, -INFINITY);
  int64_t seen = 0;   // new slots up to the last one any lane sees
  for (int64_t l0 = 0, l1; l0 < lanes; l0 = l1) {
    for (l1 = l0 + 1; l1 < lanes && lane_t[l1] == lane_t[l0];) ++l1;
    const bool* mask_t = mask + (b * T + lane_t[l0]) * T;
    for (int64_t u = 0; u < T; ++u) {
      if (!mask_t[u] || length + u < 0 || length + u >= n.slots) continue;
      seen = std::max(seen, u + 1);
      std::fill(&s.visible[u * kCols + l0], &s.visible[u * kCols + l1], 1.0f);
      std::fill(&s.masked[u * kCols + l0], &s.masked[u * kCols + l1], 0.0f);
    }
  }
  // New slots past the last seen one would add exact zeros to every sum below: skipped (a causal
  // prompt chunk's early queries do not scan its later keys).
  const int64_t prefix = std::clamp<int64_t>(length, 0, n.slots), keys = prefix + seen;
  // Row of key j (prefix slots, then the new ones) in a cache; a slot past the end is never
  // seen, and reads the last one.
  auto row = [&](const float* cache, int64_t j) {
    const int64_t slot = prefix > j ? j : length + (j - prefix);
    return cache + base + std::clamp<int64_t>(slot, 0, n.slots - 1) * stride;
  };
  s.scores.resize(keys * kCols);
  const float* q_t = s.q_t.data();
  const Lanes scale_v = Set1(scale);
  int64_t j = 0;
  for (; j + 4 <= keys; j += 4) {
    const float *k0 = row(k_cache, j), *k1 = row(k_cache, j + 1), *k2 = row(k_cache, j + 2),
                *k3 = row(k_cache, j + 3);
    Lanes a0 = Zero(), a1 = Zero(), a2 = Zero(), a3 = Zero();
    for (int64_t i = 0; i < e; ++i) {
      const Lanes q = Load(q_t + i * kCols);
      a0 = Fma(q, Broadcast(k0 + i), a0);
      a1 = Fma(q, Broadcast(k1 + i), a1);
      a2 = Fma(q, Broadcast(k2 + i), a2);
      a3 = Fma(q, Broadcast(k3 + i), a3);
    }
    Store(&s.scores[j * kCols], Mul(a0, scale_v));
    Store(&s.scores[(j + 1) * kCols], Mul(a1, scale_v));
    Store(&s.scores[(j + 2) * kCols], Mul(a2, scale_v));
    Store(&s.scores[(j + 3) * kCols], Mul(a3, scale_v));
  }
  for (; j < keys; ++j) {
    const float* k = row(k_cache, j);
    Lanes a = Zero();
    for (int64_t i = 0; i < e; ++i) a = Fma(Load(q_t + i * kCols), Broadcast(k + i), a);
    Store(&s.scores[j * kCols], Mul(a, scale_v));
  }
  // Masked new keys score -inf (so they do not move the max) and weigh exactly 0.
  const Lanes neg_inf = Set1(-INFINITY), zero = Zero();
  Lanes max_score = neg_inf;
  for (j = 0; j < keys; ++j) {
    Lanes sc = Load(&s.scores[j * kCols]);
    if (j >= prefix) {   // + 0 (exact) where seen, + -inf where not
      sc = Add(sc, Load(&s.masked[(j - prefix) * kCols]));
      Store(&s.scores[j * kCols], sc);
    }
    max_score = Max(max_score, sc);
  }
  {  // a lane that sees nothing: max 0, so that every exp below is of -inf - 0 (weight 0)
    float m[kCols];
    Store(m, max_score);
    for (float& x : m) x = std::isinf(x) ? 0.0f : x;
    max_score = Load(m);
  }
  Lanes total = zero;
  for (j = 0; j < keys; ++j) {
    Lanes p = Exp(Sub(Load(&s.scores[j * kCols]), max_score));
    if (j >= prefix) p = Mul(p, Load(&s.visible[(j - prefix) * kCols]));
    Store(&s.scores[j * kCols], p);
    total = Add(total, p);
  }
  float total_l[kCols];
  Store(total_l, total);
  // o[lane][i] = sum_j p_j[lane] v_j[i] / total[lane].
  s.v_rows.resize(keys);
  for (j = 0; j < keys; ++j) s.v_rows[j] = row(v_cache, j);
  float* o_rows[kCols];
  for (int64_t l = 0; l < lanes; ++l) o_rows[l] = o + (b * T + lane_t[l]) * o_width + lane_col[l];
  WeighValues(s.scores.data(), s.v_rows.data(), keys, lanes, e, total_l, o_rows);
}

// y[:, :] += x @ w for the first `width` columns of the padded product (bias added if given).
void AddMatmul(ffi::ThreadPool pool, const float* x, const ffi::AnyBuffer& tiles, int64_t rows,
               const float* bias, float* y, int64_t width, std::vector<float>& scratch) {
  const int64_t num_tiles = tiles.dimensions()[0];
  scratch.resize(rows * num_tiles * kCols);
  jax_spec::Matmul(pool, x, tiles, scratch.data(), rows);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < width; ++i)
      y[r * width + i] += scratch[r * num_tiles * kCols + i] + (bias ? bias[i] : 0.0f);
}

// The block's arguments after x (the binding's order), shared by both handlers.
#define JAX_SPEC_BLOCK_PARAMS                                                                    \
  ffi::Buffer<ffi::F32> attn_scale, ffi::AnyBuffer qkv_tiles,                                     \
      ffi::Buffer<ffi::F32> qkv_bias, ffi::Buffer<ffi::F32> q_scale,                             \
      ffi::Buffer<ffi::F32> k_scale, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,       \
      ffi::Buffer<ffi::F32> k_in, ffi::Buffer<ffi::F32> v_in, ffi::Buffer<ffi::S32> lengths,     \
      ffi::Buffer<ffi::PRED> mask, ffi::AnyBuffer out_tiles,                                      \
      ffi::Buffer<ffi::F32> out_bias, ffi::Buffer<ffi::F32> mlp_scale,                           \
      ffi::AnyBuffer gate_up_tiles, ffi::AnyBuffer down_tiles
#define JAX_SPEC_BLOCK_ARGS                                                                      \
  attn_scale, qkv_tiles, qkv_bias, q_scale, k_scale, cos, sin, k_in, v_in, lengths, mask,        \
      out_tiles, out_bias, mlp_scale, gate_up_tiles, down_tiles

// The block on x [B, T, D] (`out`, updated in place), the caches written in place.
ffi::Error RunBlock(ffi::ThreadPool pool, float* out, ffi::Span<const int64_t> xd,
                    JAX_SPEC_BLOCK_PARAMS, float eps, float sm_scale, int64_t num_heads,
                    int64_t qk_norm, ffi::ResultBuffer<ffi::F32>& k_cache,
                    ffi::ResultBuffer<ffi::F32>& v_cache) {
  const auto kd = k_cache->dimensions();
  if (xd.size() != 3 || kd.size() != 4 || kd[0] != xd[0] || num_heads % kd[2] != 0 ||
      kd[3] > 512 || kd[3] % 2 != 0) {
    return ffi::Error::InvalidArgument(
        "block_decode: expected x [B, T, D], caches [B, S, K, E] (E even, <= 512) and "
        "num_heads a multiple of K");
  }
  using jax_spec::IsTiles;
  if (!IsTiles(qkv_tiles) || !IsTiles(out_tiles) || !IsTiles(gate_up_tiles) ||
      !IsTiles(down_tiles)) {
    return ffi::Error::InvalidArgument(
        "block_decode: packed weights must be fp32 or bf16 tiles [N, D, W] or bf16 pair tiles "
        "[N, D / 2, W, 2]");
  }
  using jax_spec::TilesDepth;
  const Dims n{xd[0], xd[1], xd[2], kd[1], num_heads, kd[2], kd[3], TilesDepth(down_tiles)};
  const int64_t rows = n.batch * n.rows_per_batch, e = n.head_dim;
  const int64_t q_width = n.heads * e, kv_width = n.kv_heads * e;
  const int64_t qkv_width = q_width + 2 * kv_width;
  if (TilesDepth(qkv_tiles) != n.d_model || TilesDepth(out_tiles) != q_width ||
      qkv_tiles.dimensions()[0] * kCols < qkv_width ||
      out_tiles.dimensions()[0] * kCols < n.d_model ||
      gate_up_tiles.dimensions()[0] * kCols < 2 * n.d_ff ||
      down_tiles.dimensions()[0] * kCols < n.d_model) {
    return ffi::Error::InvalidArgument(
        "block_decode: packed weights do not match x and the cache");
  }
  std::vector<float> h(rows * n.d_model), qkv(rows * qkv_width, 0.0f), o(rows * q_width);
  std::vector<float> scratch;

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
  // Work items: (batch row, kv head, vector of kCols of its queries), split between the threads.
  const int64_t vectors = (n.rows_per_batch * (n.heads / n.kv_heads) + kCols - 1) / kCols;
  const int64_t items = n.batch * n.kv_heads * vectors, threads = jax_spec::KernelThreads(pool);
  const int64_t chunks = std::min(threads, items);
  jax_spec::ParallelFor(pool, chunks, threads, [&](int64_t chunk) {
    AttendScratch scratch_c;
    for (int64_t i = chunk * items / chunks; i < (chunk + 1) * items / chunks; ++i) {
      const int64_t b = i / (n.kv_heads * vectors), g = (i / vectors) % n.kv_heads, v = i % vectors;
      AttendLanes(n, b, g, v, qkv.data(), qkv_width, kc, vc, len[b], m, sm_scale, o.data(),
                  q_width, scratch_c);
    }
  });
  AddMatmul(pool, o.data(), out_tiles, rows, out_bias.typed_data(), out, n.d_model, scratch);

  // MLP: norm, [gate, up], silu(gate) * up, down.
  RmsNorm(out, mlp_scale.typed_data(), h.data(), rows, n.d_model, eps);
  const int64_t gu_stride = gate_up_tiles.dimensions()[0] * kCols;
  std::vector<float> gate_up(rows * gu_stride), act(rows * n.d_ff);
  jax_spec::Matmul(pool, h.data(), gate_up_tiles, gate_up.data(), rows);
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up.data() + r * gu_stride;
    SiluTimes(g, g + n.d_ff, act.data() + r * n.d_ff, n.d_ff);
  }
  AddMatmul(pool, act.data(), down_tiles, rows, nullptr, out, n.d_model, scratch);
  return ffi::Error::Success();
}

ffi::Error BlockDecodeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, JAX_SPEC_BLOCK_PARAMS,
                           float eps, float sm_scale, int64_t num_heads, int64_t qk_norm,
                           ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> k_cache,
                           ffi::ResultBuffer<ffi::F32> v_cache) {
  std::memcpy(y->typed_data(), x.typed_data(), sizeof(float) * x.element_count());
  return RunBlock(pool, y->typed_data(), x.dimensions(), JAX_SPEC_BLOCK_ARGS, eps, sm_scale,
                  num_heads, qk_norm, k_cache, v_cache);
}

// A feature drafter's step (`models.eagle`: an MTP / EAGLE module of one block, then the read):
//   x = [RMSNorm(h); RMSNorm(e)] W_proj (+ b);  x = Block(x);  f = RMSNorm(x);  logits = f W_head
ffi::Error FeatureDecodeImpl(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> hidden, ffi::Buffer<ffi::F32> embedded,
    ffi::Buffer<ffi::F32> hidden_scale, ffi::Buffer<ffi::F32> embed_scale,
    ffi::AnyBuffer proj_tiles, ffi::Buffer<ffi::F32> proj_bias, JAX_SPEC_BLOCK_PARAMS,
    ffi::Buffer<ffi::F32> final_scale, ffi::AnyBuffer head_tiles, float eps,
    float sm_scale, int64_t num_heads, int64_t qk_norm, ffi::ResultBuffer<ffi::F32> feature,
    ffi::ResultBuffer<ffi::F32> logits, ffi::ResultBuffer<ffi::F32> k_cache,
    ffi::ResultBuffer<ffi::F32> v_cache) {
  const auto xd = hidden.dimensions();
  const int64_t d = xd[xd.size() - 1], rows = hidden.element_count() / d;
  const int64_t vocab = logits->dimensions()[logits->dimensions().size() - 1];
  if (!jax_spec::IsTiles(proj_tiles) || !jax_spec::IsTiles(head_tiles) ||
      embedded.element_count() != rows * d || jax_spec::TilesDepth(proj_tiles) != 2 * d ||
      proj_tiles.dimensions()[0] * kCols < d || jax_spec::TilesDepth(head_tiles) != d ||
      head_tiles.dimensions()[0] * kCols < vocab) {
    return ffi::Error::InvalidArgument(
        "feature_decode: expected hidden and embedded [B, T, D], proj [2D, D] and head [D, V] "
        "packed (fp32 or bf16 tiles)");
  }
  std::vector<float> both(rows * 2 * d), scratch;
  for (int64_t r = 0; r < rows; ++r) {
    RmsNorm(hidden.typed_data() + r * d, hidden_scale.typed_data(), both.data() + r * 2 * d, 1, d,
            eps);
    RmsNorm(embedded.typed_data() + r * d, embed_scale.typed_data(), both.data() + r * 2 * d + d,
            1, d, eps);
  }
  float* x = feature->typed_data();
  std::fill(x, x + rows * d, 0.0f);
  AddMatmul(pool, both.data(), proj_tiles, rows, proj_bias.typed_data(), x, d, scratch);
  const ffi::Error error = RunBlock(pool, x, xd, JAX_SPEC_BLOCK_ARGS, eps, sm_scale, num_heads,
                                    qk_norm, k_cache, v_cache);
  if (error.failure()) return error;
  RmsNorm(x, final_scale.typed_data(), x, rows, d, eps);
  float* y = logits->typed_data();
  std::fill(y, y + rows * vocab, 0.0f);
  AddMatmul(pool, x, head_tiles, rows, nullptr, y, vocab, scratch);
  return ffi::Error::Success();
}

}  // namespace

// The block's operands after x in the binding (JAX_SPEC_BLOCK_PARAMS' order).
template <typename Binding>
auto BindBlock(Binding binding) {
  return std::move(binding)
      .template Arg<ffi::Buffer<ffi::F32>>()              // attn_norm scale [D]
      .template Arg<ffi::AnyBuffer>()                     // q|k|v packed (fp32 or bf16)
      .template Arg<ffi::Buffer<ffi::F32>>()              // q|k|v bias
      .template Arg<ffi::Buffer<ffi::F32>>()              // q_norm scale [E]
      .template Arg<ffi::Buffer<ffi::F32>>()              // k_norm scale [E]
      .template Arg<ffi::Buffer<ffi::F32>>()              // cos [B, T, E]
      .template Arg<ffi::Buffer<ffi::F32>>()              // sin [B, T, E]
      .template Arg<ffi::Buffer<ffi::F32>>()              // k cache (aliased)
      .template Arg<ffi::Buffer<ffi::F32>>()              // v cache (aliased)
      .template Arg<ffi::Buffer<ffi::S32>>()              // lengths [B]
      .template Arg<ffi::Buffer<ffi::PRED>>()             // mask [B, T, T]
      .template Arg<ffi::AnyBuffer>()                     // out packed
      .template Arg<ffi::Buffer<ffi::F32>>()              // out bias [D]
      .template Arg<ffi::Buffer<ffi::F32>>()              // mlp_norm scale [D]
      .template Arg<ffi::AnyBuffer>()                     // gate|up packed
      .template Arg<ffi::AnyBuffer>();                    // down packed
}

// The attributes both handlers take after their operands.
template <typename Binding>
auto BindAttrs(Binding binding) {
  return std::move(binding).template Attr<float>("eps")
      .template Attr<float>("sm_scale")
      .template Attr<int64_t>("num_heads")
      .template Attr<int64_t>("qk_norm");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxSpecBlockDecode, BlockDecodeImpl,
    BindAttrs(BindBlock(ffi::Ffi::Bind()
                                     .Ctx<ffi::ThreadPool>()
                                     .Arg<ffi::Buffer<ffi::F32>>()))  // x [B, T, D]
        .Ret<ffi::Buffer<ffi::F32>>()                                 // y [B, T, D]
        .Ret<ffi::Buffer<ffi::F32>>()                                 // k cache
        .Ret<ffi::Buffer<ffi::F32>>());                               // v cache

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxSpecFeatureDecode, FeatureDecodeImpl,
    BindAttrs(BindBlock(ffi::Ffi::Bind()
                                     .Ctx<ffi::ThreadPool>()
                                     .Arg<ffi::Buffer<ffi::F32>>()     // hidden [B, T, D]
                                     .Arg<ffi::Buffer<ffi::F32>>()     // embedded tokens [B, T, D]
                                     .Arg<ffi::Buffer<ffi::F32>>()     // hidden_norm scale [D]
                                     .Arg<ffi::Buffer<ffi::F32>>()     // embed_norm scale [D]
                                     .Arg<ffi::AnyBuffer>()            // proj packed [2D, D]
                                     .Arg<ffi::Buffer<ffi::F32>>())    // proj bias [D]
                           .Arg<ffi::Buffer<ffi::F32>>()               // final_norm scale [D]
                           .Arg<ffi::AnyBuffer>())                     // LM head packed [D, V]
        .Ret<ffi::Buffer<ffi::F32>>()                                  // feature [B, T, D]
        .Ret<ffi::Buffer<ffi::F32>>()                                  // logits [B, T, V]
        .Ret<ffi::Buffer<ffi::F32>>()                                  // k cache
        .Ret<ffi::Buffer<ffi::F32>>());                                // v cache
