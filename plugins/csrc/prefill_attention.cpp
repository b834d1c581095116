// Prefill attention on x86 CPUs with AVX512-BF16: softmax(q k^T * scaling) v for many query rows at once, bf16 in
// and out, every product summed in fp32 by vdpbf16ps.
//
// Why: a SigLIP tile is 1,024 tokens attending to each other, and a VLM prompt's prefill is a thousand tokens or more.
// torch's CPU flash attention runs these at 57-80 GFLOP/s on one Zen 5 core, where the same core's bf16 matmuls reach
// 384: attention was over half the vision tower's time at 896x896. Here each product is a vdpbf16ps (32
// multiply-adds an instruction) on operands packed for it once per call, with the online softmax of flash attention
// between the two products, on blocks that stay in the L1 and L2 caches.
//
// Layouts. Keys are packed per key/value head as [keys / 16][dims / 2][16 keys][2 dims]: one 64-byte load holds a
// pair of dims for 16 keys, and a query's matching pair is broadcast against it. Values are packed as
// [keys / 2][dims rounded up to 16][2 keys]: one load holds 16 dims of two consecutive keys, against the broadcast
// pair of their two softmax weights. Query heads that share a key/value head (grouped-query attention) share its
// packed keys and values.
//
// Numerics: scores and the softmax in fp32; the softmax weights are rounded to bf16 for the second product, as torch's
// flash kernel does for bf16 inputs; their row sums are taken before that rounding; the output is rounded once.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "avx512_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using bf16 = c10::BFloat16;

constexpr int64_t kQueryBlock = 32;  // query rows one task owns, from start to finish
constexpr int64_t kKeyBlock = 128;   // keys per step of the online softmax
constexpr int64_t kKeyTile = 32;     // keys in one score micro-tile: two vectors of 16
constexpr int64_t kScoreRows = 8;    // query rows in one score micro-tile (16 accumulators)
constexpr int64_t kValueRows = 6;    // query rows in one value micro-tile (up to 24 accumulators)
constexpr int64_t kValueColumns = 4; // 16-dim vectors in one value micro-tile

// Two consecutive bf16 values as one 32-bit lane, the first in the low half.
inline uint32_t pair_at(const bf16* p) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  return bits;
}

inline uint32_t make_pair(bf16 low, bf16 high) {
  return static_cast<uint32_t>(low.x) | (static_cast<uint32_t>(high.x) << 16);
}

// One head's keys (rows of `dim`, `stride` apart) into [padded / 16][pairs][16][2], zeros past `length` and `dim`.
void pack_keys(const bf16* key, int64_t stride, int64_t length, int64_t dim, int64_t padded, uint32_t* out) {
  const int64_t pairs = (dim + 1) / 2;
  std::fill(out, out + padded * pairs, 0u);
  for (int64_t l = 0; l < length; ++l) {
    const bf16* row = key + l * stride;
    uint32_t* block = out + (l / 16) * pairs * 16 + (l % 16);
    for (int64_t p = 0; p < dim / 2; ++p) block[p * 16] = pair_at(row + 2 * p);
    if (dim % 2) block[(pairs - 1) * 16] = make_pair(row[dim - 1], bf16(0.0f));
  }
}

// One head's values into [padded / 2][width][2], width = dim rounded up to 16, zeros past `length` and `dim`.
void pack_values(const bf16* value, int64_t stride, int64_t length, int64_t dim, int64_t padded, int64_t width,
                 uint32_t* out) {
  std::fill(out, out + (padded / 2) * width, 0u);
  for (int64_t l = 0; l + 1 < length; l += 2) {
    const bf16* a = value + l * stride;
    const bf16* b = a + stride;
    uint32_t* row = out + (l / 2) * width;
    for (int64_t d = 0; d < dim; ++d) row[d] = make_pair(a[d], b[d]);
  }
  if (length % 2) {
    const bf16* a = value + (length - 1) * stride;
    uint32_t* row = out + (length / 2) * width;
    for (int64_t d = 0; d < dim; ++d) row[d] = make_pair(a[d], bf16(0.0f));
  }
}

// scores[r][0..32) = q_r . k for R query rows (pairs of dims, `pairs` of them per row) against 32 packed keys.
template <int R>
inline void score_tile(const uint32_t* query, int64_t pairs, const uint32_t* keys, float* scores, int64_t stride) {
  __m512 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint32_t* second = keys + pairs * 16;
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(keys + p * 16);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(second + p * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh q = (__m512bh)_mm512_set1_epi32(static_cast<int>(query[r * pairs + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], q, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], q, k1);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(scores + r * stride, acc[r][0]);
    _mm512_storeu_ps(scores + r * stride + 16, acc[r][1]);
  }
}

// out[r][0 .. 16 C) += sum over key pairs of weights[r][pair] . values[pair][0 .. 16 C), for R rows.
template <int R, int C>
inline void value_tile(const uint32_t* weights, int64_t weight_stride, const uint32_t* values, int64_t value_stride,
                       int64_t key_pairs, float* out, int64_t out_stride) {
  __m512 acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_loadu_ps(out + r * out_stride + 16 * c);
  for (int64_t kp = 0; kp < key_pairs; ++kp) {
    __m512bh v[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) v[c] = (__m512bh)_mm512_loadu_si512(values + kp * value_stride + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(weights[r * weight_stride + kp]));
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], w, v[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + r * out_stride + 16 * c, acc[r][c]);
}

// Score micro-tiles of `rows` rows (any count up to kScoreRows), dispatched to the matching unrolled kernel.
void score_block(int64_t rows, const uint32_t* query, int64_t pairs, const uint32_t* keys, float* scores,
                 int64_t stride) {
  switch (rows) {
    case 1: return score_tile<1>(query, pairs, keys, scores, stride);
    case 2: return score_tile<2>(query, pairs, keys, scores, stride);
    case 3: return score_tile<3>(query, pairs, keys, scores, stride);
    case 4: return score_tile<4>(query, pairs, keys, scores, stride);
    case 5: return score_tile<5>(query, pairs, keys, scores, stride);
    case 6: return score_tile<6>(query, pairs, keys, scores, stride);
    case 7: return score_tile<7>(query, pairs, keys, scores, stride);
    default: return score_tile<8>(query, pairs, keys, scores, stride);
  }
}

template <int C>
void value_rows(int64_t rows, const uint32_t* weights, int64_t weight_stride, const uint32_t* values,
                int64_t value_stride, int64_t key_pairs, float* out, int64_t out_stride) {
  switch (rows) {
    case 1: return value_tile<1, C>(weights, weight_stride, values, value_stride, key_pairs, out, out_stride);
    case 2: return value_tile<2, C>(weights, weight_stride, values, value_stride, key_pairs, out, out_stride);
    case 3: return value_tile<3, C>(weights, weight_stride, values, value_stride, key_pairs, out, out_stride);
    case 4: return value_tile<4, C>(weights, weight_stride, values, value_stride, key_pairs, out, out_stride);
    case 5: return value_tile<5, C>(weights, weight_stride, values, value_stride, key_pairs, out, out_stride);
    default: return value_tile<6, C>(weights, weight_stride, values, value_stride, key_pairs, out, out_stride);
  }
}

// Value micro-tiles over `rows` rows and `columns` 16-dim vectors, in tiles of kValueRows x kValueColumns.
void value_block(int64_t rows, int64_t columns, const uint32_t* weights, int64_t weight_stride,
                 const uint32_t* values, int64_t value_stride, int64_t key_pairs, float* out, int64_t out_stride) {
  for (int64_t r = 0; r < rows; r += kValueRows) {
    const int64_t n = std::min(kValueRows, rows - r);
    const uint32_t* w = weights + r * weight_stride;
    float* o = out + r * out_stride;
    for (int64_t c = 0; c < columns; c += kValueColumns) {
      const int64_t m = std::min(kValueColumns, columns - c);
      const uint32_t* v = values + 16 * c;
      switch (m) {
        case 1: value_rows<1>(n, w, weight_stride, v, value_stride, key_pairs, o + 16 * c, out_stride); break;
        case 2: value_rows<2>(n, w, weight_stride, v, value_stride, key_pairs, o + 16 * c, out_stride); break;
        case 3: value_rows<3>(n, w, weight_stride, v, value_stride, key_pairs, o + 16 * c, out_stride); break;
        default: value_rows<4>(n, w, weight_stride, v, value_stride, key_pairs, o + 16 * c, out_stride); break;
      }
    }
  }
}

// Per-task scratch: a query block's packed rows, its scores and weights for one key block, its running output.
struct Scratch {
  std::vector<uint32_t> query;   // [kQueryBlock][pairs]
  std::vector<float> scores;     // [kQueryBlock][kKeyBlock]
  std::vector<uint32_t> weights; // [kQueryBlock][kKeyBlock / 2]: bf16 softmax weights, in pairs
  std::vector<float> out;        // [kQueryBlock][width]
  std::vector<float> top, total; // per row: running maximum (scaled) and sum of weights
  Scratch(int64_t pairs, int64_t width)
      : query(kQueryBlock * pairs), scores(kQueryBlock * kKeyBlock), weights(kQueryBlock * kKeyBlock / 2),
        out(kQueryBlock * width), top(kQueryBlock), total(kQueryBlock) {}
};

struct Shape {
  int64_t heads, kv_heads, q_length, k_length, dim, value_dim, pairs, width, padded;
  bool causal;
  float scaling;
};

// Softmax step for `rows` rows of one key block of `keys` keys starting at `k0`: weights into scratch, the running
// output rescaled. Row i (query position q0 + i) sees keys below `visible(i)`.
template <typename Visible>
void softmax_block(Scratch& s, const Shape& shape, int64_t rows, int64_t k0, int64_t keys, Visible visible) {
  const __m512 scaling = _mm512_set1_ps(shape.scaling);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = std::clamp<int64_t>(visible(r) - k0, 0, keys);
    float* score = s.scores.data() + r * kKeyBlock;
    uint32_t* weight = s.weights.data() + r * (kKeyBlock / 2);
    __m512 peak = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; j += 16)
      peak = _mm512_max_ps(peak, _mm512_mask_loadu_ps(peak, nvila::first_lanes(n - j), score + j));
    const float old_top = s.top[r];
    const float block_top = n > 0 ? _mm512_reduce_max_ps(peak) * shape.scaling : old_top;
    const float new_top = std::max(old_top, block_top);
    const float rescale = old_top == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(old_top - new_top);
    const __m512 shift = _mm512_set1_ps(-new_top);
    __m512 sum = _mm512_setzero_ps();
    const int64_t padded_keys = (keys + 31) / 32 * 32;  // the value tiles read whole pairs up to here
    for (int64_t j = 0; j < padded_keys; j += 16) {
      const __mmask16 m = nvila::first_lanes(n - j);
      const __m512 x = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, score + j), scaling, shift);
      const __m512 e = _mm512_maskz_mov_ps(m, nvila::exp_nonpositive(x));
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(weight + j / 2), (__m256i)_mm512_cvtneps_pbh(e));
    }
    s.top[r] = new_top;
    s.total[r] = s.total[r] * rescale + _mm512_reduce_add_ps(sum);
    if (rescale != 1.0f) {
      float* o = s.out.data() + r * shape.width;
      const __m512 by = _mm512_set1_ps(rescale);
      for (int64_t d = 0; d < shape.width; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(by, _mm512_loadu_ps(o + d)));
    }
  }
}

// One task: query rows [q0, q0 + rows) of head h in batch b, against all the keys it sees, written to out.
void attend(Scratch& s, const Shape& shape, const bf16* query, const int64_t* q_strides, const uint32_t* packed_keys,
            const uint32_t* packed_values, bf16* out, int64_t q0, int64_t rows) {
  const int64_t pairs = shape.pairs;
  for (int64_t r = 0; r < rows; ++r) {  // the block's query rows, packed in pairs (odd widths end with a zero)
    const bf16* row = query + (q0 + r) * q_strides[0];
    uint32_t* dst = s.query.data() + r * pairs;
    for (int64_t p = 0; p < shape.dim / 2; ++p) dst[p] = pair_at(row + 2 * p);
    if (shape.dim % 2) dst[pairs - 1] = make_pair(row[shape.dim - 1], bf16(0.0f));
  }
  std::fill(s.out.begin(), s.out.begin() + rows * shape.width, 0.0f);
  std::fill(s.top.begin(), s.top.end(), -std::numeric_limits<float>::infinity());
  std::fill(s.total.begin(), s.total.end(), 0.0f);
  const int64_t seen = shape.causal ? std::min(shape.k_length, q0 + rows) : shape.k_length;  // keys any row sees
  auto visible = [&](int64_t r) { return shape.causal ? std::min(shape.k_length, q0 + r + 1) : shape.k_length; };
  for (int64_t k0 = 0; k0 < seen; k0 += kKeyBlock) {
    const int64_t count = std::min(kKeyBlock, seen - k0);
    for (int64_t t = 0; t < count; t += kKeyTile)
      for (int64_t r = 0; r < rows; r += kScoreRows)
        score_block(std::min(kScoreRows, rows - r), s.query.data() + r * pairs, pairs,
                    packed_keys + (k0 + t) / 16 * pairs * 16, s.scores.data() + r * kKeyBlock + t, kKeyBlock);
    softmax_block(s, shape, rows, k0, count, visible);
    value_block(rows, shape.width / 16, s.weights.data(), kKeyBlock / 2, packed_values + (k0 / 2) * shape.width,
                shape.width, (count + 1) / 2, s.out.data(), shape.width);
  }
  for (int64_t r = 0; r < rows; ++r) {
    bf16* dst = out + r * q_strides[1];
    const __m512 inverse = _mm512_set1_ps(1.0f / s.total[r]);
    const float* o = s.out.data() + r * shape.width;
    for (int64_t d = 0; d < shape.value_dim; d += 16) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(o + d), inverse));
      _mm256_mask_storeu_epi16(dst + d, nvila::first_lanes(shape.value_dim - d), (__m256i)y);
    }
  }
}

at::Tensor prefill_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, double scaling,
                             bool causal) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "query, key and value must be (batch, heads, length, dim)");
  TORCH_CHECK(query.scalar_type() == at::kBFloat16 && key.scalar_type() == at::kBFloat16 &&
                  value.scalar_type() == at::kBFloat16,
              "prefill attention takes bf16 query, key and value");
  TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
              "query, key and value rows must be contiguous (stride 1 in the last dim)");
  const int64_t batch = query.size(0), heads = query.size(1), q_length = query.size(2), dim = query.size(3);
  const int64_t kv_heads = key.size(1), k_length = key.size(2), value_dim = value.size(3);
  TORCH_CHECK(key.size(0) == batch && value.size(0) == batch && value.size(1) == kv_heads &&
                  value.size(2) == k_length && key.size(3) == dim,
              "key and value must match the query's batch and width, and each other's heads and length");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(!causal || q_length == k_length, "causal prefill attention needs as many queries as keys");
  TORCH_CHECK(dim <= 512 && value_dim <= 512, "head widths up to 512");

  Shape shape{heads, kv_heads, q_length, k_length, dim, value_dim, (dim + 1) / 2, (value_dim + 15) / 16 * 16,
              (k_length + kKeyTile - 1) / kKeyTile * kKeyTile, causal, static_cast<float>(scaling)};
  at::Tensor out = at::empty({batch, q_length, heads, value_dim}, query.options());
  if (batch == 0 || heads == 0 || q_length == 0 || value_dim == 0) return out;
  TORCH_CHECK(k_length > 0, "prefill attention needs at least one key");

  const int64_t heads_kv = batch * kv_heads;
  const int64_t key_size = shape.padded * shape.pairs, value_size = shape.padded / 2 * shape.width;
  std::vector<uint32_t> packed_keys(heads_kv * key_size), packed_values(heads_kv * value_size);
  const bf16* k = key.const_data_ptr<bf16>();
  const bf16* v = value.const_data_ptr<bf16>();
  at::parallel_for(0, heads_kv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / kv_heads, h = i % kv_heads;
      pack_keys(k + b * key.stride(0) + h * key.stride(1), key.stride(2), k_length, dim, shape.padded,
                packed_keys.data() + i * key_size);
      pack_values(v + b * value.stride(0) + h * value.stride(1), value.stride(2), k_length, value_dim, shape.padded,
                  shape.width, packed_values.data() + i * value_size);
    }
  });

  // Tasks go head by head, query blocks innermost: a contiguous share of them (one thread's) mixes short and long
  // causal rows, and heads of a group run close together while their packed keys are in cache.
  const int64_t blocks = (q_length + kQueryBlock - 1) / kQueryBlock;
  const bf16* q = query.const_data_ptr<bf16>();
  bf16* o = out.data_ptr<bf16>();
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, batch * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(shape.pairs, shape.width);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = t % blocks, bh = t / blocks, b = bh / heads, h = bh % heads;
      const int64_t kv = b * kv_heads + h / group;
      const int64_t q0 = block * kQueryBlock, rows = std::min(kQueryBlock, q_length - q0);
      const int64_t strides[2] = {query.stride(2), heads * value_dim};
      attend(scratch, shape, q + b * query.stride(0) + h * query.stride(1), strides,
             packed_keys.data() + kv * key_size, packed_values.data() + kv * value_size,
             o + ((b * q_length + q0) * heads + h) * value_dim, q0, rows);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(nvila_prefill_attention, m) {
  m.def("forward(Tensor query, Tensor key, Tensor value, float scaling, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(nvila_prefill_attention, CPU, m) { m.impl("forward", &prefill_attention); }
