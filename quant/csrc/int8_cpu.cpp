// W8A8 on x86 CPUs with AVX-512: y = x @ W^T with x rounded to int8 per row (per token) and W stored as int8 per
// output channel, multiplied by oneDNN's int8 GEMM (at::_int_mm, int32 sums) and scaled back in one pass.
//
// Why not torch.ao's dynamic int8 linear (quantized::linear_dynamic): it takes and returns fp32, so a bf16 model
// converts every activation twice around it, and it rounds a whole call's activations with one scale, where one
// scale per row keeps small rows from losing their precision to a large one (SmoothQuant-style W8A8 does the same).
// Here bf16 or fp32 goes in and comes out, rounding and scaling are vectorized passes over the rows, and the GEMM is
// oneDNN's (VNNI's int8 dot products where the CPU has them).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "avx512_math.h"

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

// The first `count` (1 to 16) values of a row as fp32 (the rest zero), from bf16 bits or fp32.
inline __m512 load16(const c10::BFloat16* x, __mmask16 count) {
  const __m256i bits = _mm256_maskz_loadu_epi16(count, x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const float* x, __mmask16 count) { return _mm512_maskz_loadu_ps(count, x); }

// 16 fp32 values stored as bf16 (rounded to nearest even; finite values) or as fp32.
inline void store16(c10::BFloat16* y, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), _mm512_cvtepi32_epi16(rounded));
}
inline void store16(float* y, __m512 v) { _mm512_storeu_ps(y, v); }

// GELU with tanh's approximation, 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): what
// SigLIP's MLP applies after its first layer (transformers' gelu_pytorch_tanh). With e = exp(-|2u|) (never
// overflows), sigmoid(2u) is 1 / (1 + e) for u >= 0 and e / (1 + e) below.
inline __m512 gelu_tanh16(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(x, x), x), _mm512_set1_ps(0.044715f), x),
                                 _mm512_set1_ps(1.5957691216f));  // 2u
  const __m512 e = nvila::exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(z)));
  const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 top = _mm512_mask_blend_ps(negative, _mm512_set1_ps(1.f), e);
  return _mm512_mul_ps(x, _mm512_div_ps(top, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
}

inline float gelu_tanh(float x) { return 0.5f * x * (1.f + std::tanh(0.7978845608f * (x + 0.044715f * x * x * x))); }

// One row of K values as int8 with its own scale (its largest magnitude over 127, round half to even): returns the
// scale.
template <typename T>
float quantize_row(const T* x, int64_t k, int8_t* out) {
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  __m512 top = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16)
    top = _mm512_max_ps(top, _mm512_and_ps(load16(x + i, nvila::first_lanes(k - i)), magnitude));
  const float peak = _mm512_reduce_max_ps(top);
  const float scale = peak > 0.f ? peak / 127.f : 1.f;
  const __m512 inverse = _mm512_set1_ps(1.f / scale);
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 count = nvila::first_lanes(k - i);
    _mm_mask_storeu_epi8(out + i, count,
                         _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(load16(x + i, count), inverse))));
  }
  return scale;
}

// Rows per int8 GEMM call: the int32 products of one call stay within about 16 MB (4M sums), so the scaling pass
// reads them back from the last-level cache. A SigLIP MLP over five 1,024-token tiles at once (5,120 x 4,304 sums,
// 88 MB) ran at 459 GOPS in one call and 691 in calls of 1,024 rows on one Zen 5 core; smaller outputs are
// unaffected. At least 256 rows a call, below which oneDNN's GEMM loses to its fixed costs.
constexpr int64_t kProductsPerCall = int64_t{4} << 20;

// y = (x8 @ w8^T) * row scale * channel scale + bias, then the activation (none or GELU-tanh), in T.
template <typename T, bool Gelu>
void linear_rows(const T* x, const at::Tensor& weight, const float* channel, const float* bias, int64_t m, T* y) {
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t block = std::min(m, std::max<int64_t>(256, kProductsPerCall / std::max<int64_t>(n, 1)));
  at::Tensor x8 = at::empty({block, k}, weight.options());
  at::Tensor products = at::empty({block, n}, weight.options().dtype(at::kInt));
  std::vector<float> token(block);
  int8_t* x8p = x8.data_ptr<int8_t>();
  const int32_t* acc = products.data_ptr<int32_t>();
  for (int64_t r0 = 0; r0 < m; r0 += block) {
    const int64_t rows = std::min(block, m - r0);
    const T* xb = x + r0 * k;
    T* yb = y + r0 * n;
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) token[i] = quantize_row(xb + i * k, k, x8p + i * k);
    });
    at::Tensor sums = products.narrow(0, 0, rows);
    at::_int_mm_out(sums, x8.narrow(0, 0, rows), weight.t());  // (rows, N) int32
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const __m512 row_scale = _mm512_set1_ps(token[i]);
        int64_t r = 0;
        for (; r + 16 <= n; r += 16) {
          const __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + i * n + r));
          __m512 out = _mm512_mul_ps(_mm512_mul_ps(v, row_scale), _mm512_loadu_ps(channel + r));
          if (bias != nullptr) out = _mm512_add_ps(out, _mm512_loadu_ps(bias + r));
          store16(yb + i * n + r, Gelu ? gelu_tanh16(out) : out);
        }
        for (; r < n; ++r) {
          const float out = static_cast<float>(acc[i * n + r]) * token[i] * channel[r] + (bias ? bias[r] : 0.f);
          yb[i * n + r] = T(Gelu ? gelu_tanh(out) : out);
        }
      }
    });
  }
}

template <typename T>
void dispatch(const T* x, const at::Tensor& weight, const float* channel, const float* bias, bool gelu, int64_t m,
              T* y) {
  if (gelu)
    linear_rows<T, true>(x, weight, channel, bias, m, y);
  else
    linear_rows<T, false>(x, weight, channel, bias, m, y);
}

}  // namespace

// x (M, K) bf16 or fp32 (any K) times the int8 weight (N, K) with its per-channel scales (N,) fp32, plus the bias
// (N,) fp32 if given, then the activation ('none' or 'gelu_tanh'): (M, N) in x's dtype.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                       const std::optional<at::Tensor>& bias, c10::string_view activation) {
  TORCH_CHECK(weight.dtype() == at::kChar && weight.dim() == 2 && weight.is_contiguous(),
              "weight must be a contiguous (N, K) int8 tensor");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(weight_scale.dtype() == at::kFloat && weight_scale.is_contiguous() && weight_scale.numel() == n,
              "weight_scale must be (N,) float32");
  TORCH_CHECK(!bias.has_value() || (bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == n),
              "bias must be (N,) float32");
  TORCH_CHECK(activation == "none" || activation == "gelu_tanh", "activation must be 'none' or 'gelu_tanh'");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && (x.dtype() == at::kBFloat16 || x.dtype() == at::kFloat),
              "x must be (M, K) bf16 or float32");
  const at::Tensor xc = x.contiguous();
  const int64_t m = x.size(0);
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const bool gelu = activation == "gelu_tanh";
  at::Tensor out = at::empty({m, n}, x.options());
  if (x.dtype() == at::kBFloat16)
    dispatch(xc.data_ptr<c10::BFloat16>(), weight, weight_scale.data_ptr<float>(), b, gelu, m,
             out.data_ptr<c10::BFloat16>());
  else
    dispatch(xc.data_ptr<float>(), weight, weight_scale.data_ptr<float>(), b, gelu, m, out.data_ptr<float>());
  return out;
}

TORCH_LIBRARY(nvila_int8, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None, str activation='none') -> Tensor");
}

TORCH_LIBRARY_IMPL(nvila_int8, CPU, m) { m.impl("linear", &int8_linear); }
