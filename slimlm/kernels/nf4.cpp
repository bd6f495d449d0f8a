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
//
// bf16 activations on CPUs with AVX-512 BF16 (Zen 4/5, Xeon): 32 codes at a time become 32 bf16
// levels with one `vpermw` each from two tables, hi = bf16(level) and lo = bf16(level - hi) (hi + lo
// is the fp32 level to ~2^-16), and `vdpbf16ps` multiplies them with the bf16 activations (exact
// products, fp32 sums); each block's sum is scaled by its absmax once. ~4x the AVX2 path's rate.
#include <ATen/Parallel.h>
#include "common.h"

using namespace slimlm_k;

namespace {

struct Nf4Args {
  int64_t M, I, O, block, dbs;
  const uint8_t* codes;
  const float *absmax, *absmax_scale;  // absmax null: double-quantized
  const int8_t* absmax_codes;
  float offset;
};

inline float block_absmax(const Nf4Args& A, int64_t bi) {
  return A.absmax ? A.absmax[bi] : static_cast<float>(A.absmax_codes[bi]) * A.absmax_scale[bi / A.dbs] + A.offset;
}

// R rows from o with M bf16 activation rows xb: [M, I] (bits); needs block % 32 == 0. y: [M, O] fp32.
// The hi and lo levels and each of the R rows have their own accumulators, so the vdpbf16ps chains
// stay independent (one chain per row was latency-bound: ~2.7 weights per cycle).
#define NF4_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
template <int M, int R>
NF4_TARGET inline void nf4_tile_bf16dot(const Nf4Args& A, const uint16_t* xb, __m512i thi, __m512i tlo, int64_t o,
                                        float* y) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const int64_t nb = A.I / A.block;
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 sh[R][M], sl[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) sh[r][m] = sl[r][m] = _mm512_setzero_ps();
    for (int64_t k = b * A.block; k < (b + 1) * A.block; k += 32) {
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(xb + m * A.I + k);
      for (int r = 0; r < R; ++r) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(A.codes + (o + r) * A.I / 2 + k / 2));
        const __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
        const __m512i idx = _mm512_cvtepu8_epi16(
            _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi)));  // [32] codes, element order
        const __m512bh wh = (__m512bh)_mm512_permutexvar_epi16(idx, thi);
        const __m512bh wl = (__m512bh)_mm512_permutexvar_epi16(idx, tlo);
        for (int m = 0; m < M; ++m) {
          sh[r][m] = _mm512_dpbf16_ps(sh[r][m], wh, xv[m]);
          sl[r][m] = _mm512_dpbf16_ps(sl[r][m], wl, xv[m]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(block_absmax(A, (o + r) * nb + b));
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(_mm512_add_ps(sh[r][m], sl[r][m]), a, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) y[m * A.O + o + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int M, int R>
NF4_TARGET void nf4_rows_m(const Nf4Args& A, const uint16_t* xb, __m512i thi, __m512i tlo, int64_t o0, int64_t o1,
                           float* y) {
  int64_t o = o0;
  for (; o + R <= o1; o += R) nf4_tile_bf16dot<M, R>(A, xb, thi, tlo, o, y);
  for (; o < o1; ++o) nf4_tile_bf16dot<M, 1>(A, xb, thi, tlo, o, y);
}

// rows [o0, o1): 4 rows at a time for one activation row, 2 for two, else 1
NF4_TARGET void nf4_rows_bf16dot(const Nf4Args& A, const uint16_t* xb, const uint16_t* lv_hi, const uint16_t* lv_lo,
                                 int64_t o0, int64_t o1, float* y) {
  const __m512i thi = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lv_hi)));
  const __m512i tlo = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lv_lo)));
  switch (A.M) {
    case 1: return nf4_rows_m<1, 4>(A, xb, thi, tlo, o0, o1, y);
    case 2: return nf4_rows_m<2, 2>(A, xb, thi, tlo, o0, o1, y);
    case 3: return nf4_rows_m<3, 1>(A, xb, thi, tlo, o0, o1, y);
    case 4: return nf4_rows_m<4, 1>(A, xb, thi, tlo, o0, o1, y);
    case 5: return nf4_rows_m<5, 1>(A, xb, thi, tlo, o0, o1, y);
    case 6: return nf4_rows_m<6, 1>(A, xb, thi, tlo, o0, o1, y);
    case 7: return nf4_rows_m<7, 1>(A, xb, thi, tlo, o0, o1, y);
    default: return nf4_rows_m<8, 1>(A, xb, thi, tlo, o0, o1, y);
  }
}

bool cpu_has_bf16_dot() {
  static const bool ok = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

}  // namespace

// x: [M, I] float32 or bfloat16 (M <= 8); codes: uint8 [O * I / 2] (element 2j in the low nibble);
// levels: float32 [16]. The block absmax is either `absmax` float32 [O * I / block] or, double-quantized
// (`absmax` empty), absmax_codes[b] * absmax_scale[b / dbs] + offset (int8, float32, as the module
// computes it). Needs I % block == 0 and block % 8 == 0. Returns [M, O] in x's dtype. allow_bf16_dot:
// bf16 x takes the AVX-512 BF16 path where the CPU has it and block % 32 == 0 (False: the AVX2 path).
torch::Tensor nf4_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor levels, torch::Tensor absmax,
                       torch::Tensor absmax_codes, torch::Tensor absmax_scale, double offset, int64_t dbs,
                       int64_t out_features, int64_t block, bool allow_bf16_dot) {
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
  const Nf4Args A{M, I, O, block, dbs, codes.data_ptr<uint8_t>(), dq ? nullptr : absmax.data_ptr<float>(),
                  dq ? absmax_scale.data_ptr<float>() : nullptr, dq ? absmax_codes.data_ptr<int8_t>() : nullptr,
                  static_cast<float>(offset)};
  if (allow_bf16_dot && x.scalar_type() == torch::kBFloat16 && block % 32 == 0 && cpu_has_bf16_dot()) {
    const torch::Tensor xc = x.contiguous();
    torch::Tensor y = torch::empty({M, O}, x.options().dtype(torch::kFloat));
    uint16_t lv_hi[16], lv_lo[16];
    const float* lv = levels.data_ptr<float>();
    for (int i = 0; i < 16; ++i) {
      lv_hi[i] = f2bf(lv[i]);
      lv_lo[i] = f2bf(lv[i] - bf2f(lv_hi[i]));
    }
    const auto* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, O, 16, [&](int64_t begin, int64_t end) { nf4_rows_bf16dot(A, xb, lv_hi, lv_lo, begin, end, yp); });
    return y.to(torch::kBFloat16);
  }
  torch::Tensor xf = x.to(torch::kFloat).contiguous();
  torch::Tensor y = torch::empty({M, O}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const __m256 lo = _mm256_loadu_ps(levels.data_ptr<float>()), hi = _mm256_loadu_ps(levels.data_ptr<float>() + 8);
  at::parallel_for(0, O, 16, [&](int64_t begin, int64_t end) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i fifteen = _mm256_set1_epi32(15), seven = _mm256_set1_epi32(7);
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t* c = A.codes + o * I / 2;
      const int64_t b0 = o * (I / block);  // first block of this row
      __m256 acc[8];
      for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t b = 0; b < I / block; ++b) {
        const __m256 a = _mm256_set1_ps(block_absmax(A, b0 + b));
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
