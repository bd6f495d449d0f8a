// NF4 (QLoRA's 4-bit NormalFloat) weight-only GEMV for a few rows of activations (decode).
//
// Why: NF4's 16 levels are not an affine grid, so no integer kernel applies, and the module path
// de-quantizes the whole weight on every call: batch-1 decode of SmolLM2 ran at ~3 tok/s. Here each
// thread takes whole output rows, expands 8 codes at a time to their levels with two in-register
// table lookups (AVX2 permutes on levels 0-7 and 8-15, blended on bit 3), scales them by the block
// absmax and multiplies with every activation row while the weights are in registers.
//
// Math: w[o, i] = levels[code] * absmax[(o * in + i) / block], the float32 product the module's
// `dense_weight()` computes, then fp32 dot products (summation order differs from torch's GEMM).
#include <ATen/Parallel.h>
#include "common.h"

// x: [M, I] float32 or bfloat16 (M <= 8); codes: uint8 [O * I / 2] (element 2j in the low nibble);
// levels: float32 [16]. The block absmax is either `absmax` float32 [O * I / block] or, double-quantized
// (`absmax` empty), absmax_codes[b] * absmax_scale[b / dbs] + offset (int8, float32, as the module
// computes it). Needs I % block == 0 and block % 8 == 0. Returns [M, O] in x's dtype.
torch::Tensor nf4_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor levels, torch::Tensor absmax,
                       torch::Tensor absmax_codes, torch::Tensor absmax_scale, double offset, int64_t dbs,
                       int64_t out_features, int64_t block) {
  using namespace slimlm_k;
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8, "x: [M, in] with 1 <= M <= 8");
  const int64_t M = x.size(0), I = x.size(1), O = out_features;
  TORCH_CHECK(block > 0 && block % 8 == 0 && I % block == 0, "nf4_gemv: block must be a multiple of 8 dividing in");
  TORCH_CHECK(codes.scalar_type() == torch::kByte && codes.is_contiguous() && codes.numel() * 2 == O * I,
              "codes: uint8 [out * in / 2]");
  const int64_t NB = O * I / block;
  const bool dq = absmax.numel() == 0;
  if (dq) {
    TORCH_CHECK(absmax_codes.scalar_type() == torch::kChar && absmax_codes.is_contiguous() && absmax_codes.numel() == NB,
                "absmax_codes: int8 [out * in / block]");
    TORCH_CHECK(dbs > 0 && absmax_scale.scalar_type() == torch::kFloat && absmax_scale.is_contiguous() &&
                absmax_scale.numel() * dbs >= NB, "absmax_scale: float32 [ceil(n_blocks / dbs)]");
  } else {
    TORCH_CHECK(absmax.scalar_type() == torch::kFloat && absmax.is_contiguous() && absmax.numel() == NB,
                "absmax: float32 [out * in / block]");
  }
  TORCH_CHECK(levels.scalar_type() == torch::kFloat && levels.numel() == 16, "levels: float32 [16]");
  torch::Tensor xf = x.to(torch::kFloat).contiguous();
  torch::Tensor y = torch::empty({M, O}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float* ap = dq ? nullptr : absmax.data_ptr<float>();
  const int8_t* acp = dq ? absmax_codes.data_ptr<int8_t>() : nullptr;
  const float* asp = dq ? absmax_scale.data_ptr<float>() : nullptr;
  const float off = static_cast<float>(offset);
  float* yp = y.data_ptr<float>();
  const __m256 lo = _mm256_loadu_ps(levels.data_ptr<float>()), hi = _mm256_loadu_ps(levels.data_ptr<float>() + 8);
  at::parallel_for(0, O, 16, [&](int64_t begin, int64_t end) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i fifteen = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* c = cp + o * I / 2;
      const int64_t b0 = o * (I / block);  // first block of this row
      __m256 acc[8];
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t b = 0; b < I / block; ++b) {
        const int64_t bi = b0 + b;
        const float amax = dq ? static_cast<float>(acp[bi]) * asp[bi / dbs] + off : ap[bi];
        const __m256 a = _mm256_set1_ps(amax);
        for (int64_t k = b * block; k < (b + 1) * block; k += 8) {
          uint32_t v;
          std::memcpy(&v, c + k / 2, 4);  // 8 codes
          const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(v)), shifts), fifteen);
          const __m256 wl = _mm256_permutevar8x32_ps(lo, idx), wh = _mm256_permutevar8x32_ps(hi, idx);
          const __m256 w = _mm256_mul_ps(
              _mm256_blendv_ps(wl, wh, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven))), a);  // [8] weights
          for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp + m * I + k), acc[m]);
        }
      }
      for (int64_t m = 0; m < M; ++m) yp[m * O + o] = hsum(acc[m]);
    }
  });
  return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
}
