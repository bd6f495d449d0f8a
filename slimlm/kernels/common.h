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
