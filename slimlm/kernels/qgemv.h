// Shared pieces of slimlm's quantized GEMVs: qgemv.cpp (row-major int8 / packed 4-bit codes) and
// qgemv16.cpp (4-bit codes in 16-row tiles). The math and the activation quantization are described at
// the top of qgemv.cpp.
#pragma once
#include <algorithm>
#include <vector>
#include "common.h"

namespace slimlm_q {
using namespace slimlm_k;

constexpr int64_t QB = 32;  // weight block: one vpmaddubsw
constexpr int64_t TR = 16;  // rows per tile of the tiled 4-bit layout (qgemv16.cpp)

// How a row of I inputs is cut: chunks (activation scales) inside groups (weight scales).
struct Chunks {
  int64_t I, ng;
  std::vector<int64_t> start, nblk, group;  // per chunk: first block, blocks (<= 4), group index
  Chunks(int64_t I_, int64_t G) : I(I_), ng((I_ + G - 1) / G) {
    int64_t C = QB;
    for (int64_t c : {128, 96, 64})
      if (G % c == 0) { C = c; break; }
    for (int64_t g = 0; g < ng; ++g)
      for (int64_t i = g * G; i < std::min(I, (g + 1) * G); i += C) {
        start.push_back(i / QB);
        nblk.push_back((std::min({i + C, (g + 1) * G, I}) - i) / QB);
        group.push_back(g);
      }
  }
  int64_t n() const { return static_cast<int64_t>(start.size()); }
};

// Where element e of a chunk of nblk blocks goes in the 4-bit activation layout (see the top comment).
inline int64_t nib_pos(int64_t e, int64_t nblk) {
  const int64_t pair = e / (2 * QB);
  if (2 * pair + 1 < nblk) {
    const int64_t j = e % (2 * QB);
    return pair * 2 * QB + (j % 2) * QB + j / 2;
  }
  const int64_t j = e % QB;
  return e - j + (j % 2) * (QB / 2) + j / 2;
}

// x: [B, I] fp32 or bf16 -> a: [B, I] int8 (4-bit: evens-then-odds per pair of blocks), d: [B, chunks],
// xs: [B, ng] (the dequantized sum of each group's activations, for the zero-point term). Vectorized
// 32 at a time; the same arithmetic as the scalar form: a = nearbyint(x / d) clamped to +-127.
template <typename XT>
void quantize_chunks(const XT* x, int64_t B, const Chunks& ch, bool nib, int8_t* a, float* d, float* xs) {
  const int64_t I = ch.I, nc = ch.n();
  const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the lane interleave of the packs
  alignas(32) int8_t tmp[4 * QB];
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < ch.ng; ++g) xs[b * ch.ng + g] = 0.f;
    for (int64_t c = 0; c < nc; ++c) {
      const int64_t i0 = ch.start[c] * QB, n = ch.nblk[c] * QB;
      const XT* xc = x + b * I + i0;
      __m256 mx = _mm256_setzero_ps();
      for (int64_t i = 0; i < n; i += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, load8(xc + i)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const float dc = _mm_cvtss_f32(m4) / 127.f;
      int8_t* dst = nib ? tmp : a + b * I + i0;
      __m256i sum = _mm256_setzero_si256();
      if (dc > 0.f) {
        const __m256 dv = _mm256_set1_ps(dc);
        for (int64_t i = 0; i < n; i += 32) {
          __m256i q[4];
          for (int k = 0; k < 4; ++k) {
            const __m256 r = _mm256_round_ps(_mm256_div_ps(load8(xc + i + 8 * k), dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q[k] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, r)));
            sum = _mm256_add_epi32(sum, q[k]);
          }
          const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permutevar8x32_epi32(p, order));
        }
      } else {
        std::memset(dst, 0, n);
      }
      if (nib)
        for (int64_t i = 0; i < n; ++i) a[b * I + i0 + nib_pos(i, ch.nblk[c])] = tmp[i];
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
      d[b * nc + c] = dc;
      xs[b * ch.ng + ch.group[c]] += dc * static_cast<float>(_mm_cvtsi128_si32(s4));
    }
  }
}

struct Part {  // one weight matrix of a (possibly concatenated) call
  const uint8_t* w;
  int64_t O, off;  // rows, first output column
  const float *scale, *zs, *bias;
  // fp16 group terms (4-bit tiles only, scale/zs then null): GGUF's Q4_0/Q4_1 d and m as the file stores
  // them; qgemv16 widens one tile block's terms to fp32 (exact) before its loop
  const uint16_t *scale_h = nullptr, *zs_h = nullptr;
};

// one tile block's [ng, 16] terms of part P as fp32: P.scale/P.zs themselves, or the fp16 ones widened into buf
void tile_terms(const Part& P, int64_t R, int64_t ng, std::vector<float>& buf, const float*& sc, const float*& zs);

// the epilogue of one output: zero-point term, bias, residual, store in y's dtype
template <typename OT>
inline void finish_out(const Part& P, int64_t ng, const float* xs, int64_t Otot, const OT* res, OT* y, int64_t o,
                       int64_t r, int64_t b, float v) {
  if (P.zs)
    for (int64_t g = 0; g < ng; ++g) v -= P.zs[o * ng + g] * xs[b * ng + g];
  v += P.bias ? P.bias[o] : 0.f;
  if (res) v = rnd(v, y) + ld(res, b * Otot + r);
  st(y, b * Otot + r, v);
}

// The epilogue of a tile's 16 sums v (scaled, zero term applied): bias, residual, store (see finish_out).
template <typename OT>
inline void finish16(const Part& P, int64_t R, const float* v, int64_t Otot, const OT* res, OT* y, int64_t b) {
  for (int64_t r = 0; r < TR; ++r) {
    const int64_t o = R * TR + r, col = P.off + o;
    float s = v[r] + (P.bias ? P.bias[o] : 0.f);
    if (res) s = rnd(s, y) + ld(res, b * Otot + col);
    st(y, b * Otot + col, s);
  }
}

// whether the AVX-512 VNNI paths may run (the CPU has them and SLIMLM_QGEMV_AVX2 is unset; qgemv.cpp)
bool cpu_has_vnni512();

// The 16-row-tile GEMV (qgemv16.cpp): parts' w/scale/zs in the tile layout, activations quantized by
// quantize_chunks in natural order (nib = false).
template <typename OT>
void qgemv16_run(const std::vector<Part>& parts, const Chunks& ch, const int8_t* a, const float* d, const float* xs,
                 int64_t B, int64_t Otot, const OT* res, OT* y);

// The same on 2- or 3-bit codes in 16-row bit-plane tiles (qgemv23.cpp; BITS = 2 or 3).
template <int BITS, typename OT>
void qgemv23_run(const std::vector<Part>& parts, const Chunks& ch, const int8_t* a, const float* d, const float* xs,
                 int64_t B, int64_t Otot, const OT* res, OT* y);

}  // namespace slimlm_q
