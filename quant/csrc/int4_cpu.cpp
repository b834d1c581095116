// W4A16 on x86 CPUs with AVX512-BF16: the int4 matrix-vector product of decoding, and the dequantization of
// prefill, reading the checkpoint's own layout (no repacking); and the same product with the activations rounded
// to int8 (matmul_a8, AVX512-VNNI), an opt-in trade of exactness for speed.
//
// Layout (nvila.quant.w4a16): qweight (N, K/2) uint8, column 2j of the weight in the low nibble of byte j and
// column 2j + 1 in the high one; scales and zeros (N, K/group) bf16; w = (q - 8) * scale + zero.
//
// Why a kernel of our own: decoding is bound by memory bandwidth, and torch's CPU int4 kernel
// (_weight_int4pack_mm_for_cpu) converts every nibble to fp32 and multiplies in fp32, which makes it
// compute-bound well below the memory bandwidth of one core (8.5 of 13.7 GB/s on a Sapphire Rapids core). Here 32 nibbles become 32 exact bf16 values
// (q - 8) with one table lookup (vpermw), and one vdpbf16ps multiplies and adds them against the activations
// in fp32: the kernel reads weights near memory speed. Per group, the sum over the group is scaled once, and
// the zero enters as zero * sum(x over the group).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kRowBlock = 4;  // output rows per inner loop: four independent dot-product chains
#ifndef NVILA_PREFETCH_BYTES
#define NVILA_PREFETCH_BYTES 4096
#endif

// While a block of Rows rows is read at byte c of each row, fetch a block at least NVILA_PREFETCH_BYTES ahead at
// the same pace: its bytes [c * Rows, (c + 32) * Rows). Rows are short (K/2 bytes), so the hardware prefetcher
// falls behind the block's interleaved rows (measured: 33 -> 19 ms a token for the mid model on one Zen 4 core).
// Prefetches never fault, past the end included.
template <int64_t Rows>
inline void prefetch_ahead(const uint8_t* block, int64_t half, int64_t c) {
  const int64_t block_bytes = Rows * half;
  const int64_t blocks = (NVILA_PREFETCH_BYTES + block_bytes - 1) / block_bytes;
  const uint8_t* ahead = block + blocks * block_bytes + c * Rows;
  for (int64_t line = 0; line < Rows * 32; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(ahead + line), _MM_HINT_T0);
}

// bf16 bits of q - 8 for q = 0..15, twice (vpermw indexes 32 words with 5 bits; nibbles use 4).
__m512i centred_nibble_table() {
  alignas(64) uint16_t table[32];
  for (int q = 0; q < 32; ++q) table[q] = c10::BFloat16(static_cast<float>((q & 15) - 8)).x;
  return _mm512_load_si512(table);
}

// The 64 weights of 32 packed bytes as two vectors of 32 bf16 values: columns 2j (low) and 2j + 1 (high).
inline void unpack64(const uint8_t* bytes, __m512i table, __m512bh* low, __m512bh* high) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  const __m512i lo = _mm512_and_si512(words, _mm512_set1_epi16(15));
  const __m512i hi = _mm512_srli_epi16(words, 4);
  *low = (__m512bh)_mm512_permutexvar_epi16(lo, table);
  *high = (__m512bh)_mm512_permutexvar_epi16(hi, table);
}

// y for Rows output rows and Ms activation rows. x_even/x_odd hold each activation row's even and odd columns
// (K/2 bf16 each, rows `half` apart), x_sums its sum per group (fp32, rows `groups` apart). Each weight chunk is
// unpacked once and used for every activation row.
template <int64_t Rows, int64_t Ms>
void dot_block(const uint8_t* qweight, const c10::BFloat16* scales, const c10::BFloat16* zeros,
               const uint16_t* x_even, const uint16_t* x_odd, const float* x_sums, int64_t k, int64_t group,
               __m512i table, c10::BFloat16* out, int64_t out_stride) {
  const int64_t groups = k / group, half = k / 2;
  __m512 total[Ms][Rows];
  float zero_part[Ms][Rows];
  for (int64_t i = 0; i < Ms; ++i)
    for (int64_t r = 0; r < Rows; ++r) total[i][r] = _mm512_setzero_ps(), zero_part[i][r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[Ms][Rows];
    for (int64_t i = 0; i < Ms; ++i)
      for (int64_t r = 0; r < Rows; ++r) acc[i][r] = _mm512_setzero_ps();
    for (int64_t c = g * group / 2; c < (g + 1) * group / 2; c += 32) {  // 32 bytes: 64 weights a row
      prefetch_ahead<Rows>(qweight, half, c);
      __m512bh xe[Ms], xo[Ms];
      for (int64_t i = 0; i < Ms; ++i) {
        xe[i] = (__m512bh)_mm512_loadu_si512(x_even + i * half + c);
        xo[i] = (__m512bh)_mm512_loadu_si512(x_odd + i * half + c);
      }
      for (int64_t r = 0; r < Rows; ++r) {
        __m512bh low, high;
        unpack64(qweight + r * half + c, table, &low, &high);
        for (int64_t i = 0; i < Ms; ++i) {
          acc[i][r] = _mm512_dpbf16_ps(acc[i][r], low, xe[i]);
          acc[i][r] = _mm512_dpbf16_ps(acc[i][r], high, xo[i]);
        }
      }
    }
    for (int64_t r = 0; r < Rows; ++r) {
      const __m512 scale = _mm512_set1_ps(static_cast<float>(scales[r * groups + g]));
      const float zero = static_cast<float>(zeros[r * groups + g]);
      for (int64_t i = 0; i < Ms; ++i) {
        total[i][r] = _mm512_fmadd_ps(acc[i][r], scale, total[i][r]);
        zero_part[i][r] += zero * x_sums[i * groups + g];
      }
    }
  }
  for (int64_t i = 0; i < Ms; ++i)
    for (int64_t r = 0; r < Rows; ++r) out[i * out_stride + r] = c10::BFloat16(_mm512_reduce_add_ps(total[i][r]) + zero_part[i][r]);
}

// y for Rows output rows and one activation row (decoding): as dot_block<Rows, 1>, 20 % faster as written here.
template <int64_t Rows>
void dot_one(const uint8_t* qweight, const c10::BFloat16* scales, const c10::BFloat16* zeros,
             const uint16_t* x_even, const uint16_t* x_odd, const float* x_sums, int64_t k, int64_t group,
             __m512i table, c10::BFloat16* out) {
  const int64_t groups = k / group, half = k / 2;
  __m512 total[Rows];
  float zero_part[Rows];
  for (int64_t r = 0; r < Rows; ++r) total[r] = _mm512_setzero_ps(), zero_part[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 acc[Rows];
    for (int64_t r = 0; r < Rows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = g * group / 2; c < (g + 1) * group / 2; c += 32) {  // 32 bytes: 64 weights a row
      prefetch_ahead<Rows>(qweight, half, c);
      const __m512bh xe = (__m512bh)_mm512_loadu_si512(x_even + c);
      const __m512bh xo = (__m512bh)_mm512_loadu_si512(x_odd + c);
      for (int64_t r = 0; r < Rows; ++r) {
        __m512bh low, high;
        unpack64(qweight + r * half + c, table, &low, &high);
        acc[r] = _mm512_dpbf16_ps(acc[r], low, xe);
        acc[r] = _mm512_dpbf16_ps(acc[r], high, xo);
      }
    }
    for (int64_t r = 0; r < Rows; ++r) {
      const int64_t at = r * groups + g;
      total[r] = _mm512_fmadd_ps(acc[r], _mm512_set1_ps(static_cast<float>(scales[at])), total[r]);
      zero_part[r] += static_cast<float>(zeros[at]) * x_sums[g];
    }
  }
  for (int64_t r = 0; r < Rows; ++r) out[r] = c10::BFloat16(_mm512_reduce_add_ps(total[r]) + zero_part[r]);
}

// Rows output rows for all m activation rows, Ms at a time.
template <int64_t Rows>
void dot_rows(const uint8_t* qweight, const c10::BFloat16* scales, const c10::BFloat16* zeros,
              const uint16_t* x_even, const uint16_t* x_odd, const float* x_sums, int64_t m, int64_t k,
              int64_t group, __m512i table, c10::BFloat16* out, int64_t n) {
  const int64_t half = k / 2, groups = k / group;
  if (m == 1) {  // decoding
    dot_one<Rows>(qweight, scales, zeros, x_even, x_odd, x_sums, k, group, table, out);
    return;
  }
  int64_t i = 0;
  for (; i + 4 <= m; i += 4)
    dot_block<Rows, 4>(qweight, scales, zeros, x_even + i * half, x_odd + i * half, x_sums + i * groups, k, group,
                       table, out + i * n, n);
  const uint16_t *xe = x_even + i * half, *xo = x_odd + i * half;
  const float* xs = x_sums + i * groups;
  switch (m - i) {
    case 3: dot_block<Rows, 3>(qweight, scales, zeros, xe, xo, xs, k, group, table, out + i * n, n); break;
    case 2: dot_block<Rows, 2>(qweight, scales, zeros, xe, xo, xs, k, group, table, out + i * n, n); break;
    case 1: dot_block<Rows, 1>(qweight, scales, zeros, xe, xo, xs, k, group, table, out + i * n, n); break;
    default: break;
  }
}

inline float bf16_value(uint16_t bits) { return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits())); }

// -- int8 activations (vpdpbusd) ------------------------------------------------------------------------------
// The same product with the activations rounded to int8 in the weight's groups of 128 (one fp32 scale a group: the
// largest magnitude over 127), as llama.cpp's CPU kernels do with their Q8 blocks. Nibbles then need no conversion
// at all: a byte AND and a shift give 64 unsigned 8-bit values, and one vpdpbusd multiplies 64 of them by signed
// 8-bit activations and adds them, four to an int32 lane: twice the products of vdpbf16ps per instruction (the two
// take the same time on Zen 4), and none of its table lookups. The result is exactly the dequantized weight times
// the dequantized activations, summed in fp32: with w = (q - 8) * scale + zero and x = a * x8,
// sum(w * x) = scale * a * sum(q * x8) + (zero - 8 * scale) * a * sum(x8).
constexpr int64_t kA8Group = 128;  // 64 bytes of a row: one vector of low nibbles and one of high

// One activation row as int8: even and odd columns apart (K/2 each, as the nibbles), scale and a * sum(x8) per group.
void quantize_row_a8(const uint16_t* x, int64_t k, int8_t* even, int8_t* odd, float* scale, float* sum) {
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t g = 0; g < k / kA8Group; ++g) {
    __m512 v[kA8Group / 16];
    __m512 top = _mm512_setzero_ps();
    for (int64_t i = 0; i < kA8Group / 16; ++i) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + g * kA8Group + 16 * i));
      v[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
      top = _mm512_max_ps(top, _mm512_and_ps(v[i], magnitude));
    }
    const float peak = _mm512_reduce_max_ps(top);
    const float a = peak > 0.f ? peak / 127.f : 1.f;
    const __m512 inverse = _mm512_set1_ps(1.f / a);
    alignas(64) int8_t q[kA8Group];
    __m512i total = _mm512_setzero_si512();
    for (int64_t i = 0; i < kA8Group / 16; ++i) {  // rounded to nearest even, as MXCSR has it
      const __m512i r = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v[i], inverse)),
                                                          _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
      total = _mm512_add_epi32(total, r);
      _mm_store_si128(reinterpret_cast<__m128i*>(q + 16 * i), _mm512_cvtepi32_epi8(r));
    }
    for (int64_t i = 0; i < kA8Group / 64; ++i) {  // 64 values as 32 (even, odd) pairs of bytes
      const __m512i pairs = _mm512_load_si512(q + 64 * i);
      const int64_t at = (g * kA8Group + 64 * i) / 2;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(even + at), _mm512_cvtepi16_epi8(pairs));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(odd + at), _mm512_cvtepi16_epi8(_mm512_srai_epi16(pairs, 8)));
    }
    scale[g] = a, sum[g] = a * static_cast<float>(_mm512_reduce_add_epi32(total));
  }
}

// y for Rows output rows and one int8 activation row.
template <int64_t Rows>
__attribute__((target("avx512vnni"))) void dot_one_a8(const uint8_t* qweight, const c10::BFloat16* scales,
                                                      const c10::BFloat16* zeros, const int8_t* x_even,
                                                      const int8_t* x_odd, const float* x_scale, const float* x_sum,
                                                      int64_t k, c10::BFloat16* out) {
  const int64_t groups = k / kA8Group, half = k / 2;
  const __m512i nibble = _mm512_set1_epi8(15);
  __m512 total[Rows];
  float offset[Rows];
  for (int64_t r = 0; r < Rows; ++r) total[r] = _mm512_setzero_ps(), offset[r] = 0.f;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t c = g * kA8Group / 2;  // 64 bytes: the group's 128 weights in a row
    prefetch_ahead<Rows>(qweight, half, c);  // 64 bytes a row: two of its 32-byte paces (18 -> 9 ms a mid token)
    prefetch_ahead<Rows>(qweight, half, c + 32);
    const __m512i xe = _mm512_loadu_si512(x_even + c), xo = _mm512_loadu_si512(x_odd + c);
    for (int64_t r = 0; r < Rows; ++r) {
      const __m512i bytes = _mm512_loadu_si512(qweight + r * half + c);
      const __m512i low = _mm512_and_si512(bytes, nibble);
      const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
      const __m512i acc = _mm512_add_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), low, xe),
                                           _mm512_dpbusd_epi32(_mm512_setzero_si512(), high, xo));
      const int64_t at = r * groups + g;
      const float scale = static_cast<float>(scales[at]);
      total[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(scale * x_scale[g]), total[r]);
      offset[r] += (static_cast<float>(zeros[at]) - 8.f * scale) * x_sum[g];
    }
  }
  for (int64_t r = 0; r < Rows; ++r) out[r] = c10::BFloat16(_mm512_reduce_add_ps(total[r]) + offset[r]);
}

// -- int8 weights for prefill's int8 GEMM ---------------------------------------------------------------------------
// Prefill multiplies hundreds of rows by each weight: there it is bound by compute, and an int8 GEMM does twice the
// products of a bf16 one in the same time. Group scales do not fit a GEMM's single sum over K, so the int4 weight is
// widened to int8 with one scale per output channel (its largest magnitude over 127, a step about 1/17 of the int4
// one: the rounding adds little); nvila_int8::linear (int8_cpu.cpp) rounds the activations per row and multiplies.

// The values of 64 nibbles (32 bytes) in column order, as 64 unsigned bytes.
inline __m512i nibbles_in_order(const uint8_t* bytes) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  return _mm512_or_si512(_mm512_and_si512(words, _mm512_set1_epi16(15)),  // column 2j: the low nibble, first byte
                         _mm512_slli_epi16(_mm512_srli_epi16(words, 4), 8));  // column 2j + 1: the high one
}

// Round `count` fp32 values (a multiple of 16) times `inverse` to nearest even, as int8 (all within +-127).
inline void round_to_int8(const float* v, int64_t count, float inverse, int8_t* out) {
  const __m512 by = _mm512_set1_ps(inverse);
  for (int64_t i = 0; i < count; i += 16)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + i), by))));
}

// One weight row (K/2 bytes, groups of `group`) as int8 with its own scale: returns the scale.
float widen_row_to_int8(const uint8_t* bytes, const c10::BFloat16* scales, const c10::BFloat16* zeros, int64_t k,
                        int64_t group, float* values, int8_t* out) {
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512 top = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; c += 64) {  // 64 weights, within one group (groups are multiples of 64)
    const float scale = static_cast<float>(scales[c / group]);
    const __m512 s = _mm512_set1_ps(scale), base = _mm512_set1_ps(static_cast<float>(zeros[c / group]) - 8.f * scale);
    alignas(64) uint8_t q[64];
    _mm512_store_si512(q, nibbles_in_order(bytes + c / 2));
    for (int64_t i = 0; i < 64; i += 16) {
      const __m512 w = _mm512_fmadd_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + i)))), s, base);
      _mm512_storeu_ps(values + c + i, w);
      top = _mm512_max_ps(top, _mm512_and_ps(w, magnitude));
    }
  }
  const float peak = _mm512_reduce_max_ps(top);
  const float channel = peak > 0.f ? peak / 127.f : 1.f;
  round_to_int8(values, k, 1.f / channel, out);
  return channel;
}

void check(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros) {
  TORCH_CHECK(qweight.dtype() == at::kByte && qweight.dim() == 2 && qweight.is_contiguous(),
              "qweight must be a contiguous (N, K/2) uint8 tensor");
  TORCH_CHECK(scales.dtype() == at::kBFloat16 && zeros.dtype() == at::kBFloat16 && scales.is_contiguous() &&
                  zeros.is_contiguous() && scales.sizes() == zeros.sizes() && scales.size(0) == qweight.size(0),
              "scales and zeros must be contiguous (N, groups) bf16 tensors");
  const int64_t k = qweight.size(1) * 2;
  TORCH_CHECK(k % scales.size(1) == 0 && (k / scales.size(1)) % 64 == 0,
              "the group size must divide K and be a multiple of 64");
}

// A new (M, N) bf16 output, and f(first row, rows, output) over the weight's N rows in blocks of kRowBlock (the last
// one shorter), blocks in parallel on torch's threads.
template <typename F>
at::Tensor in_row_blocks(int64_t m, int64_t n, const at::TensorOptions& options, F&& f) {
  at::Tensor out = at::empty({m, n}, options);
  c10::BFloat16* y = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, (n + kRowBlock - 1) / kRowBlock, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) f(b * kRowBlock, std::min(kRowBlock, n - b * kRowBlock), y);
  });
  return out;
}

}  // namespace

// x (M, K) bf16 times the int4 weight (N, K): (M, N) bf16, accumulated in fp32.
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros) {
  check(qweight, scales, zeros);
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2, groups = scales.size(1), group = k / groups;
  TORCH_CHECK(x.dtype() == at::kBFloat16 && x.dim() == 2 && x.size(1) == k, "x must be (M, K) bf16");
  const int64_t m = x.size(0), half = k / 2;
  // The activations as even and odd columns (the weights' low and high nibbles) and their sums per group.
  const at::Tensor xc = x.contiguous();
  std::vector<uint16_t> even(m * half), odd(m * half);
  std::vector<float> sums(m * groups, 0.f);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < half; ++j) {
      const uint16_t first = xs[i * k + 2 * j], second = xs[i * k + 2 * j + 1];
      even[i * half + j] = first, odd[i * half + j] = second;
      sums[i * groups + 2 * j / group] += bf16_value(first) + bf16_value(second);
    }
  }
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const c10::BFloat16* s = scales.data_ptr<c10::BFloat16>();
  const c10::BFloat16* z = zeros.data_ptr<c10::BFloat16>();
  return in_row_blocks(m, n, x.options(), [&](int64_t row, int64_t rows, c10::BFloat16* y) {
    static const __m512i table = centred_nibble_table();
    if (rows == kRowBlock) {
      dot_rows<kRowBlock>(w + row * half, s + row * groups, z + row * groups, even.data(), odd.data(), sums.data(), m,
                          k, group, table, y + row, n);
    } else {
      for (int64_t r = row; r < row + rows; ++r)
        dot_rows<1>(w + r * half, s + r * groups, z + r * groups, even.data(), odd.data(), sums.data(), m, k, group,
                    table, y + r, n);
    }
  });
}

// x (M, K) bf16 times the int4 weight (N, K) with x rounded to int8 per group of 128 columns: (M, N) bf16.
at::Tensor int4_matmul_a8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                          const at::Tensor& zeros) {
  check(qweight, scales, zeros);
  const int64_t n = qweight.size(0), k = qweight.size(1) * 2, groups = scales.size(1);
  TORCH_CHECK(k / groups == kA8Group, "int8 activations take groups of 128 weights");
  __builtin_cpu_init();
  TORCH_CHECK(__builtin_cpu_supports("avx512vnni"), "int8 activations need a CPU with AVX512-VNNI");
  TORCH_CHECK(x.dtype() == at::kBFloat16 && x.dim() == 2 && x.size(1) == k, "x must be (M, K) bf16");
  const int64_t m = x.size(0), half = k / 2;
  const at::Tensor xc = x.contiguous();
  std::vector<int8_t> even(m * half), odd(m * half);
  std::vector<float> x_scale(m * groups), x_sum(m * groups);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  for (int64_t i = 0; i < m; ++i)
    quantize_row_a8(xs + i * k, k, even.data() + i * half, odd.data() + i * half, x_scale.data() + i * groups,
                    x_sum.data() + i * groups);
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const c10::BFloat16* s = scales.data_ptr<c10::BFloat16>();
  const c10::BFloat16* z = zeros.data_ptr<c10::BFloat16>();
  return in_row_blocks(m, n, x.options(), [&](int64_t row, int64_t rows, c10::BFloat16* y) {
    c10::BFloat16 column[kRowBlock];
    for (int64_t i = 0; i < m; ++i) {
      const int8_t *xe = even.data() + i * half, *xo = odd.data() + i * half;
      const float *sc = x_scale.data() + i * groups, *sm = x_sum.data() + i * groups;
      if (rows == kRowBlock) {
        dot_one_a8<kRowBlock>(w + row * half, s + row * groups, z + row * groups, xe, xo, sc, sm, k, column);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          dot_one_a8<1>(w + (row + r) * half, s + (row + r) * groups, z + (row + r) * groups, xe, xo, sc, sm, k,
                        column + r);
      }
      for (int64_t r = 0; r < rows; ++r) y[i * n + row + r] = column[r];
    }
  });
}

// The int4 weight (N, K) widened to int8 with one scale per output channel, for an int8 GEMM (nvila_int8::linear):
// (N, K) int8 and (N,) fp32. K a multiple of 64.
std::tuple<at::Tensor, at::Tensor> int4_widen_to_int8(const at::Tensor& qweight, const at::Tensor& scales,
                                                      const at::Tensor& zeros) {
  check(qweight, scales, zeros);
  const int64_t n = qweight.size(0), half = qweight.size(1), k = half * 2, groups = scales.size(1);
  at::Tensor w8 = at::empty({n, k}, qweight.options().dtype(at::kChar));
  at::Tensor channel = at::empty({n}, scales.options().dtype(at::kFloat));
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const c10::BFloat16* s = scales.data_ptr<c10::BFloat16>();
  const c10::BFloat16* z = zeros.data_ptr<c10::BFloat16>();
  int8_t* out = w8.data_ptr<int8_t>();
  float* c = channel.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> values(k);
    for (int64_t r = begin; r < end; ++r)
      c[r] = widen_row_to_int8(w + r * half, s + r * groups, z + r * groups, k, k / groups, values.data(), out + r * k);
  });
  return {w8, channel};
}

// The int4 weight as a dense (N, K) bf16 matrix, each value computed in fp32 and rounded once.
at::Tensor int4_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros) {
  check(qweight, scales, zeros);
  const int64_t n = qweight.size(0), half = qweight.size(1), k = half * 2, groups = scales.size(1), group = k / groups;
  at::Tensor out = at::empty({n, k}, scales.options());
  c10::BFloat16* y = out.data_ptr<c10::BFloat16>();
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const c10::BFloat16* s = scales.data_ptr<c10::BFloat16>();
  const c10::BFloat16* z = zeros.data_ptr<c10::BFloat16>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = s[r * groups + g], base = static_cast<float>(z[r * groups + g]) - 8.f * scale;
        const uint8_t* bytes = w + r * half + g * group / 2;
        c10::BFloat16* row = y + r * k + g * group;
        for (int64_t j = 0; j < group / 2; ++j) {
          row[2 * j] = c10::BFloat16(base + scale * static_cast<float>(bytes[j] & 15));
          row[2 * j + 1] = c10::BFloat16(base + scale * static_cast<float>(bytes[j] >> 4));
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY(nvila_int4, m) {
  m.def("matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros) -> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor zeros) -> Tensor");
  m.def("matmul_a8(Tensor x, Tensor qweight, Tensor scales, Tensor zeros) -> Tensor");
  m.def("widen_to_int8(Tensor qweight, Tensor scales, Tensor zeros) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nvila_int4, CPU, m) {
  m.impl("matmul", &int4_matmul);
  m.impl("dequantize", &int4_dequantize);
  m.impl("matmul_a8", &int4_matmul_a8);
  m.impl("widen_to_int8", &int4_widen_to_int8);
}
