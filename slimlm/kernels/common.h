// Shared helpers of slimlm's CPU kernels (decode.cpp, qgemv.cpp, gptq.cpp, nf4.cpp): bf16 <-> fp32 conversion,
// vector loads, and element access that rounds like the torch reference code.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace slimlm_k {

inline float bf2f(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline uint16_t f2bf(float f) {  // round to nearest even (inputs are finite here)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}
inline float rbf(float f) { return bf2f(f2bf(f)); }  // round a float to bf16 precision

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline float scalar(float v) { return v; }
inline float scalar(uint16_t v) { return bf2f(v); }
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// e^x for 8 floats (range reduction by ln 2, degree-6 polynomial: within ~2 ulp of expf; x is clamped to
// [-87.3, 88.3], so the result stays a normal float: callers that need exact zeros, e.g. masked softmax
// entries, set them themselves)
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
// 8 floats rounded to bf16 precision (nearest even, as f2bf), still as floats
inline __m256 rbf8(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), odd);
  return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
// store 8 floats as fp32, or as bf16 rounded to nearest even
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(uint16_t* p, __m256 v) {
  const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(rbf8(v)), 16);  // 8 x 16 bits in 32-bit lanes
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
inline __m256 rnd8(__m256 v, const float*) { return v; }
inline __m256 rnd8(__m256 v, const uint16_t*) { return rbf8(v); }

// element access for fp32 / bf16 (uint16 bits) activations: load as float, store rounded, and round a
// float to the precision of the tensor a pointer belongs to (identity for fp32)
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const uint16_t* p, int64_t i) { return bf2f(p[i]); }
inline void st(float* p, int64_t i, float v) { p[i] = v; }
inline void st(uint16_t* p, int64_t i, float v) { p[i] = f2bf(v); }
inline float rnd(float v, const float*) { return v; }
inline float rnd(float v, const uint16_t*) { return rbf(v); }

inline void check_float(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 || t.scalar_type() == torch::kBFloat16, name,
              " must be float32 or bfloat16");
}

// tensors per linear in the kernels' linear specs: (weight, bias, scale, zs, group)
constexpr size_t NL = 5;

}  // namespace slimlm_k

// y = x @ w.T + bias (+ residual) for fp32/bf16 weights (decode.cpp)
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor residual);
// the same for int8 / packed int4 codes with group scales, activations int8 per chunk (qgemv.cpp)
torch::Tensor qgemv(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor residual, torch::Tensor scale,
                    torch::Tensor zs, int64_t group);
torch::Tensor qgemv_cat(torch::Tensor x, std::vector<torch::Tensor> specs);
// GPTQ's column sweep over one lazy block (gptq.cpp)
void gptq_sweep(torch::Tensor w1, torch::Tensor q1, torch::Tensor err1, torch::Tensor hinv1, torch::Tensor scale,
                torch::Tensor zero, torch::Tensor group, int64_t c0, int64_t c1, double qmax);
// NF4 codes x a few activation rows (nf4.cpp)
torch::Tensor nf4_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor levels, torch::Tensor absmax,
                       torch::Tensor absmax_codes, torch::Tensor absmax_scale, double offset, int64_t dbs,
                       int64_t out_features, int64_t block, bool allow_bf16_dot);
// 4-bit codes in 16-row tiles -> the dense fp32/bf16 weight (qgemv16.cpp)
torch::Tensor dequant_tiles(torch::Tensor tiles, torch::Tensor scale, torch::Tensor zero, double zc, int64_t group,
                            bool out_bf16);
