// Decoding attention on x86 CPUs with AVX-512: one query per sequence against the whole KV cache, in one call.
//
// Why: a decoding step asks each layer for softmax(q k^T / sqrt(d)) v with a single query row. As torch ops that is
// two small batched matmuls plus a softmax and a mask, each a separate kernel with its own fixed cost (about 30 us
// per matmul through oneDNN on one Zen 4 core at a 60-token cache): more than the arithmetic, and 48 matmuls a step
// for a 24-layer model. Here one call per layer reads each key and value row once, for all the query heads that
// share it (grouped-query attention).
//
// Numerics: scores, softmax and the weighted sum of values are computed in fp32 from the bf16 (or fp32) inputs,
// and rounded once to the output dtype, as transformers' eager attention does, with fewer roundings in between.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "avx512_math.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {


// 16 values from memory as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Which of 16 positions from `at` attend (all of them without a mask), and those past `length` do not.
inline __mmask16 attending(const bool* keep, int64_t at, int64_t length) {
  const __mmask16 inside = nvila::first_lanes(length - at);
  if (keep == nullptr) return inside;
  const __m128i bytes = _mm_maskz_loadu_epi8(inside, keep + at);
  return _mm_cmpneq_epi8_mask(bytes, _mm_setzero_si128());
}

// out lane i = the sum of the 16 lanes of r[i]: 16 horizontal sums for about the cost of three.
inline __m512 sum16(const __m512 (&r)[16]) {
  __m512 pairs[8], quads[4];
  for (int64_t i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] for a = r[2i], b = r[2i+1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]), _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]));
  for (int64_t i = 0; i < 4; ++i) {  // per 128-bit lane: r[4i .. 4i+3], each summed over that lane
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // the four lanes of each quad summed, quad j into lane j
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88), _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88), _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

// Scores of `heads` query rows (each Chunks x 16 wide) against every key row: scores[h * length + l], scaled.
// Keys go 16 at a time: a block is read (and widened to fp32) once for all the heads, and each head's 16 dot
// products are summed across lanes together (sum16); the last length % 16 keys one at a time.
template <typename T, int64_t Chunks>
void score_rows(const T* query, int64_t query_stride, const T* key, int64_t row_stride, int64_t length,
                int64_t heads, float scaling, float* scores) {
  constexpr int64_t width = Chunks * 16;
  std::vector<float> q(heads * width);  // the queries in fp32, scaled
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t c = 0; c < Chunks; ++c)
      _mm512_storeu_ps(&q[h * width + 16 * c],
                       _mm512_mul_ps(load16(query + h * query_stride + 16 * c), _mm512_set1_ps(scaling)));
  alignas(64) float block[16][width];
  int64_t l = 0;
  for (; l + 16 <= length; l += 16) {
#pragma GCC unroll 16
    for (int64_t j = 0; j < 16; ++j)
#pragma GCC unroll 16
      for (int64_t c = 0; c < Chunks; ++c) _mm512_store_ps(&block[j][16 * c], load16(key + (l + j) * row_stride + 16 * c));
    for (int64_t h = 0; h < heads; ++h) {
      const float* qh = &q[h * width];
      __m512 acc[16];
#pragma GCC unroll 16
      for (int64_t j = 0; j < 16; ++j) acc[j] = _mm512_mul_ps(_mm512_loadu_ps(qh), _mm512_load_ps(&block[j][0]));
#pragma GCC unroll 16
      for (int64_t c = 1; c < Chunks; ++c) {
        const __m512 qc = _mm512_loadu_ps(qh + 16 * c);
#pragma GCC unroll 16
        for (int64_t j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qc, _mm512_load_ps(&block[j][16 * c]), acc[j]);
      }
      _mm512_storeu_ps(scores + h * length + l, sum16(acc));
    }
  }
  for (; l < length; ++l) {
    const T* k = key + l * row_stride;
    for (int64_t h = 0; h < heads; ++h) {
      __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int64_t c = 0; c < Chunks; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(&q[h * width + 16 * c]), load16(k + 16 * c), acc);
      scores[h * length + l] = _mm512_reduce_add_ps(acc);
    }
  }
}

// Softmax weights in place of one head's scores, masked positions exactly zero; returns 1 / their sum.
inline float softmax_row(float* s, const bool* keep, int64_t length) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t l = 0; l < length; l += 16) {
    const __mmask16 m = attending(keep, l, length);
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, m, s + l));
  }
  const __m512 peak = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t l = 0; l < length; l += 16) {
    const __mmask16 m = attending(keep, l, length);
    const __mmask16 inside = nvila::first_lanes(length - l);
    const __m512 e =
        _mm512_maskz_mov_ps(m, nvila::exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + l), peak)));
    _mm512_mask_storeu_ps(s + l, inside, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// out[h] = sum over l of weights[h * length + l] * value row l, times norm[h], for Heads heads; each value row
// is read once for all of them.
template <typename T, int64_t Chunks, int64_t Heads>
void weigh_values(const float* weights, const float* norm, const T* value, int64_t row_stride, int64_t length,
                  T* out, int64_t out_stride) {
  __m512 acc[Heads][Chunks];
  #pragma GCC unroll 16
  for (int64_t h = 0; h < Heads; ++h)
    #pragma GCC unroll 16
    for (int64_t c = 0; c < Chunks; ++c) acc[h][c] = _mm512_setzero_ps();
  for (int64_t l = 0; l < length; ++l) {
    const T* v = value + l * row_stride;
    __m512 w[Heads];
    #pragma GCC unroll 16
    for (int64_t h = 0; h < Heads; ++h) w[h] = _mm512_set1_ps(weights[h * length + l]);
    #pragma GCC unroll 16
    for (int64_t c = 0; c < Chunks; ++c) {
      const __m512 vc = load16(v + 16 * c);
      #pragma GCC unroll 16
      for (int64_t h = 0; h < Heads; ++h) acc[h][c] = _mm512_fmadd_ps(w[h], vc, acc[h][c]);
    }
  }
  #pragma GCC unroll 16
  for (int64_t h = 0; h < Heads; ++h) {
    alignas(64) float row[16];
    #pragma GCC unroll 16
    for (int64_t c = 0; c < Chunks; ++c) {
      _mm512_store_ps(row, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(norm[h])));
      for (int64_t j = 0; j < 16; ++j) out[h * out_stride + 16 * c + j] = static_cast<T>(row[j]);
    }
  }
}

// f.template operator()<Heads>(first head) over `heads` heads in blocks of Block, the last block possibly shorter:
// every block size is a compile-time constant, so that its vectors stay in registers.
template <int64_t Block, typename F>
void in_head_blocks(int64_t heads, F&& f) {
  int64_t h = 0;
  for (; h + Block <= heads; h += Block) f.template operator()<Block>(h);
  if constexpr (Block > 1) {
    const int64_t rest = heads - h;
    if (rest == 1) f.template operator()<1>(h);
    if constexpr (Block > 2) if (rest == 2) f.template operator()<2>(h);
    if constexpr (Block > 3) if (rest == 3) f.template operator()<3>(h);
  }
}

// One (sequence, KV head): the `heads` query rows that share it, against `length` key and value rows.
template <typename T, int64_t Chunks>
void attend(const T* query, int64_t query_stride, const T* key, const T* value, int64_t row_stride,
            const bool* keep, int64_t length, int64_t heads, float scaling, T* out, int64_t out_stride,
            std::vector<float>& scores) {
  constexpr int64_t kBlock = Chunks >= 16 ? 1 : Chunks >= 8 ? 2 : 4;  // heads whose vectors fit in registers
  scores.resize(heads * length);
  std::vector<float> norm(heads);
  score_rows<T, Chunks>(query, query_stride, key, row_stride, length, heads, scaling, scores.data());
  for (int64_t h = 0; h < heads; ++h) norm[h] = softmax_row(scores.data() + h * length, keep, length);
  in_head_blocks<kBlock>(heads, [&]<int64_t Heads>(int64_t h) {
    weigh_values<T, Chunks, Heads>(scores.data() + h * length, norm.data() + h, value, row_stride, length,
                                   out + h * out_stride, out_stride);
  });
}

// Every (sequence, KV head) pair, in parallel.
template <typename T>
void run(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& keep,
         float scaling, at::Tensor& out) {
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = key.size(1), length = key.size(2), group = heads / kv_heads;
  const int64_t sb = key.stride(0), sh = key.stride(1), sl = key.stride(2);
  const T* qs = query.data_ptr<T>();
  const T* ks = key.data_ptr<T>();
  const T* vs = value.data_ptr<T>();
  const bool* ms = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  T* os = out.data_ptr<T>();
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / kv_heads, h = i % kv_heads;
      const T* q = qs + (b * heads + h * group) * dim;
      const T *k = ks + b * sb + h * sh, *v = vs + b * sb + h * sh;
      const bool* m = ms ? ms + b * length : nullptr;
      T* o = os + (b * heads + h * group) * dim;
      switch (dim / 16) {  // the head widths of common models
        case 2: attend<T, 2>(q, dim, k, v, sl, m, length, group, scaling, o, dim, scores); break;
        case 4: attend<T, 4>(q, dim, k, v, sl, m, length, group, scaling, o, dim, scores); break;
        case 8: attend<T, 8>(q, dim, k, v, sl, m, length, group, scaling, o, dim, scores); break;
        case 16: attend<T, 16>(q, dim, k, v, sl, m, length, group, scaling, o, dim, scores); break;
        default: TORCH_CHECK(false, "head width must be 32, 64, 128 or 256");
      }
    }
  });
}

}  // namespace

// query (B, H, D); key and value (B, KVH, L, D), each row contiguous; keep (B, L) bool (true: attend) or none.
// Returns (B, H, D) in the query's dtype: softmax(q k^T * scaling) v, heads h attending to KV head h / (H / KVH).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& keep, double scaling) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 4 && value.sizes() == key.sizes(),
              "query must be (B, H, D), key and value (B, KVH, L, D)");
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = key.size(1), length = key.size(2);
  TORCH_CHECK(key.size(0) == batch && key.size(3) == dim && heads % kv_heads == 0,
              "key and value must match the query's batch and width, with H a multiple of KVH");
  TORCH_CHECK(dim == 32 || dim == 64 || dim == 128 || dim == 256, "head width must be 32, 64, 128 or 256");
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && key.scalar_type() == value.scalar_type() &&
                  (query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kFloat),
              "query, key and value must all be bf16 or all fp32");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1 && key.strides() == value.strides(),
              "key and value rows must be contiguous, with the same strides");
  const at::Tensor q = query.contiguous();
  at::Tensor mask;
  if (keep.has_value()) {
    mask = keep->contiguous();
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == batch &&
                    mask.size(1) == length, "keep must be a (B, L) bool mask");
  }
  at::Tensor out = at::empty({batch, heads, dim}, query.options());
  if (query.scalar_type() == at::kBFloat16)
    run<c10::BFloat16>(q, key, value, mask, static_cast<float>(scaling), out);
  else
    run<float>(q, key, value, mask, static_cast<float>(scaling), out);
  return out;
}

TORCH_LIBRARY(nvila_attention, m) {
  m.def("decode(Tensor query, Tensor key, Tensor value, Tensor? keep, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(nvila_attention, CPU, m) { m.impl("decode", &decode_attention); }
