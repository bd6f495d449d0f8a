// Quantized GEMV (decode) and de-quantization (prefill) on 2- and 3-bit codes held in 16-row bit-plane
// tiles: the codes' own size (2 or 3 bits per weight), the one layout both paths read. The math, the
// activation chunks and the result are those of qgemv.cpp / qgemv16.cpp; only the code layout differs.
//
// Why: holding 3-bit codes in the 4-bit tiles costs 4 bits per weight (SmolLM2 w3 g128: ~15 MB over the
// memory goal of issue 17); unpacking a dense 3-bit bit stream per call is slow. Bit planes keep the
// 16-row tile scheme (one 32-bit lane per row, activations broadcast as dwords, no horizontal sums) and
// cost one shift + mask (+ one masked add of the high bit) per 64 codes.
//
// Layout (built by slimlm.kernels.tile_lowbit): uint8 [O/16, I/32, 64 * BITS]; block (R, kb) covers rows
// 16R..16R+15 and inputs 32kb..32kb+31, written as sub-blocks m = 0..7 of 4 inputs (32kb + 4m + j, j < 4):
//   bytes [64p, 64p + 64), p = 0, 1: low 2 bits; row r owns bytes 4r..4r+3, byte 4r + j holds in bits
//     2s..2s+1 the low bits of code(row, 32kb + 16p + 4s + j), s = 0..3 (so m = 4p + s);
//   bytes [128, 192) (3-bit only): the high bits as 8 little-endian uint64 masks, mask m's bit 4r + j =
//     bit 2 of code(row r, 32kb + 4m + j): the mask of one 64-byte register's bytes (AVX-512BW).
// scale / zs: float32 [O/16, ng, 16] as in qgemv16.cpp; bias float32 [O].
#include <ATen/Parallel.h>
#include <cstring>
#include "qgemv.h"

using namespace slimlm_k;

namespace slimlm_q {
namespace {

inline int32_t dword4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

#define Q23_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define Q23_512I __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))

// sub-block m's codes of 16 rows x 4 inputs as 64 bytes (row r in bytes 4r..4r+3)
template <int BITS, int M>
Q23_512I inline __m512i codes512(__m512i v0, __m512i v1, const uint8_t* hi) {
  const __m512i lv = M < 4 ? v0 : v1;
  constexpr int S = 2 * (M % 4);
  __m512i q = _mm512_and_si512(S ? _mm512_srli_epi16(lv, S) : lv, _mm512_set1_epi8(0x03));
  if constexpr (BITS == 3) q = _mm512_mask_add_epi8(q, _cvtu64_mask64(u64(hi + 8 * M)), q, _mm512_set1_epi8(4));
  return q;
}

template <int BITS, typename OT>
Q23_512 void tile_rows512(const Part& P, int64_t R, const Chunks& ch, const int8_t* a, const float* d, const float* xs,
                          int64_t B, int64_t Otot, const OT* res, OT* y) {
  constexpr int64_t TB = 64 * BITS;  // bytes per block of 16 rows x 32 inputs
  const int64_t I = ch.I, ng = ch.ng, nc = ch.n(), nb = I / QB;
  const uint8_t* t = P.w + R * nb * TB;
  const float* sc = P.scale + R * ng * TR;
  const float* zs = P.zs ? P.zs + R * ng * TR : nullptr;
  alignas(64) float out[TR];
  for (int64_t b = 0; b < B; ++b) {
    const int8_t* ab = a + b * I;
    const float* db = d + b * nc;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0, g = 0; g < ng; ++g) {
      __m512 gacc = _mm512_setzero_ps();
      for (; c < nc && ch.group[c] == g; ++c) {
        __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;  // 4 independent chains
        for (int64_t kb = ch.start[c]; kb < ch.start[c] + ch.nblk[c]; ++kb) {
          const uint8_t* tb = t + kb * TB;
          const __m512i v0 = _mm512_loadu_si512(tb), v1 = _mm512_loadu_si512(tb + 64);
          const int8_t* ak = ab + kb * QB;
#define Q23_STEP(M, S) S = _mm512_dpbusd_epi32(S, codes512<BITS, M>(v0, v1, tb + 128), _mm512_set1_epi32(dword4(ak + 4 * (M))))
          Q23_STEP(0, s0); Q23_STEP(1, s1); Q23_STEP(2, s2); Q23_STEP(3, s3);
          Q23_STEP(4, s0); Q23_STEP(5, s1); Q23_STEP(6, s2); Q23_STEP(7, s3);
#undef Q23_STEP
        }
        const __m512i s = _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3));
        gacc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(db[c]), gacc);
      }
      acc = _mm512_fmadd_ps(gacc, _mm512_loadu_ps(sc + g * TR), acc);
      if (zs) acc = _mm512_fnmadd_ps(_mm512_loadu_ps(zs + g * TR), _mm512_set1_ps(xs[b * ng + g]), acc);
    }
    _mm512_store_ps(out, acc);
    finish16(P, R, out, Otot, res, y, b);
  }
}

// AVX2: two halves of 8 rows (32 bytes of each plane); the high bits' 32 mask bits of a half are spread
// to bytes (byte i <- bit i) by a shuffle, a bit test and a compare. u8 x s8 pair sums (<= 2 * 7 * 127)
// stay int16 over one block (8 sub-blocks: <= 14,224) before widening.
template <int BITS, typename OT>
void tile_rows256(const Part& P, int64_t R, const Chunks& ch, const int8_t* a, const float* d, const float* xs,
                  int64_t B, int64_t Otot, const OT* res, OT* y) {
  constexpr int64_t TB = 64 * BITS;
  const int64_t I = ch.I, ng = ch.ng, nc = ch.n(), nb = I / QB;
  const uint8_t* t = P.w + R * nb * TB;
  const float* sc = P.scale + R * ng * TR;
  const float* zs = P.zs ? P.zs + R * ng * TR : nullptr;
  const __m256i m3 = _mm256_set1_epi8(0x03), four = _mm256_set1_epi8(4), ones = _mm256_set1_epi16(1);
  const __m256i sel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                       2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ULL));
  alignas(32) float out[TR];
  for (int64_t b = 0; b < B; ++b) {
    const int8_t* ab = a + b * I;
    const float* db = d + b * nc;
    for (int64_t h = 0; h < 2; ++h) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0, g = 0; g < ng; ++g) {
        __m256 gacc = _mm256_setzero_ps();
        for (; c < nc && ch.group[c] == g; ++c) {
          __m256i s32 = _mm256_setzero_si256();
          for (int64_t kb = ch.start[c]; kb < ch.start[c] + ch.nblk[c]; ++kb) {
            const uint8_t* tb = t + kb * TB;
            const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + 32 * h));
            const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + 64 + 32 * h));
            const int8_t* ak = ab + kb * QB;
            __m256i s16 = _mm256_setzero_si256();
            for (int m = 0; m < 8; ++m) {
              const __m256i lv = m < 4 ? v0 : v1;
              __m256i q = _mm256_and_si256(_mm256_srli_epi16(lv, 2 * (m % 4)), m3);
              if constexpr (BITS == 3) {
                uint32_t mk;
                std::memcpy(&mk, tb + 128 + 8 * m + 4 * h, 4);
                const __m256i bm = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int32_t>(mk)), sel);
                q = _mm256_or_si256(q, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(bm, bit), bit), four));
              }
              s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(q, _mm256_set1_epi32(dword4(ak + 4 * m))));
            }
            s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(s16, ones));
          }
          gacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_set1_ps(db[c]), gacc);
        }
        acc = _mm256_fmadd_ps(gacc, _mm256_loadu_ps(sc + g * TR + h * 8), acc);
        if (zs) acc = _mm256_fnmadd_ps(_mm256_loadu_ps(zs + g * TR + h * 8), _mm256_set1_ps(xs[b * ng + g]), acc);
      }
      _mm256_store_ps(out + h * 8, acc);
    }
    finish16(P, R, out, Otot, res, y, b);
  }
}

}  // namespace

template <int BITS, typename OT>
void qgemv23_run(const std::vector<Part>& parts, const Chunks& ch, const int8_t* a, const float* d, const float* xs,
                 int64_t B, int64_t Otot, const OT* res, OT* y) {
  std::vector<int64_t> first{0};  // part p covers tile blocks [first[p], first[p + 1])
  for (const Part& P : parts) first.push_back(first.back() + P.O / TR);
  const bool vnni = cpu_has_vnni512();
  const int64_t rbytes = ch.I / QB * 64 * BITS;  // bytes of one 16-row tile block
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    size_t p = 0;
    for (int64_t blk = begin; blk < end; ++blk) {
      while (blk >= first[p + 1]) ++p;
      const int64_t R = blk - first[p];
      if (R + 1 < parts[p].O / TR) {  // prefetch the next tile block, as qgemv16.cpp does
        const char* nx = reinterpret_cast<const char*>(parts[p].w + (R + 1) * rbytes);
        for (int64_t k = 0; k < rbytes; k += 64) _mm_prefetch(nx + k, _MM_HINT_T0);
      }
      if (vnni) tile_rows512<BITS>(parts[p], R, ch, a, d, xs, B, Otot, res, y);
      else tile_rows256<BITS>(parts[p], R, ch, a, d, xs, B, Otot, res, y);
    }
  });
}

#define Q23_INST(BITS, OT)                                                                                         \
  template void qgemv23_run<BITS, OT>(const std::vector<Part>&, const Chunks&, const int8_t*, const float*,       \
                                      const float*, int64_t, int64_t, const OT*, OT*);
Q23_INST(2, float)
Q23_INST(3, float)
Q23_INST(2, uint16_t)
Q23_INST(3, uint16_t)
#undef Q23_INST

}  // namespace slimlm_q

namespace {
using slimlm_q::TR;
using slimlm_q::u64;

// spreads the 4 low bits of n to bit 2 of 4 bytes
constexpr uint32_t spread_hi(uint32_t n) {
  return ((n & 1u) << 2) | ((n & 2u) << 9) | ((n & 4u) << 16) | ((n & 8u) << 23);
}
constexpr uint32_t HI_LUT[16] = {spread_hi(0), spread_hi(1), spread_hi(2), spread_hi(3), spread_hi(4), spread_hi(5),
                                 spread_hi(6), spread_hi(7), spread_hi(8), spread_hi(9), spread_hi(10), spread_hi(11),
                                 spread_hi(12), spread_hi(13), spread_hi(14), spread_hi(15)};

// tile block row R -> rows 16R..16R+15 of the dense [O, I] weight, w = (q - zero) * scale in fp32 (the
// arithmetic of QuantizedWeight.dequantize), stored as fp32 or rounded to bf16
template <typename OT>
void dequant_block23(const uint8_t* t, int bits, const float* scale, const float* zero, float zc, int64_t R, int64_t I,
                     int64_t ng, int64_t group, OT* out) {
  const int64_t nb = I / 32, tb = 64 * bits;
  for (int64_t kb = 0; kb < nb; ++kb) {
    const uint8_t* blk = t + (R * nb + kb) * tb;
    for (int64_t r = 0; r < TR; ++r) {
      const int64_t o = R * TR + r;
      uint32_t lo[2];
      std::memcpy(&lo[0], blk + 4 * r, 4);
      std::memcpy(&lo[1], blk + 64 + 4 * r, 4);
      for (int m = 0; m < 8; m += 2) {  // 8 inputs: sub-blocks m and m + 1
        const int64_t i0 = kb * 32 + 4 * m, g = i0 / group;  // group % 8 == 0: one group per 8 inputs
        uint32_t q[2];
        for (int u = 0; u < 2; ++u) {
          const int mm = m + u;
          q[u] = (lo[mm / 4] >> (2 * (mm % 4))) & 0x03030303u;
          if (bits == 3) q[u] |= HI_LUT[(u64(blk + 128 + 8 * mm) >> (4 * r)) & 0xF];
        }
        const uint64_t v = static_cast<uint64_t>(q[0]) | (static_cast<uint64_t>(q[1]) << 32);
        const __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(v))));
        const __m256 z = _mm256_set1_ps(zero ? zero[o * ng + g] : zc);
        store8(out + o * I + i0, _mm256_mul_ps(_mm256_sub_ps(qf, z), _mm256_set1_ps(scale[o * ng + g])));
      }
    }
  }
}

}  // namespace

// 2/3-bit codes in bit-plane tiles uint8 [O/16, I/32, 64 * bits] -> the dense weight [O, I] (see
// dequant_tiles in qgemv16.cpp for the arguments; that function dispatches here on the tile size).
torch::Tensor dequant_tiles23(const torch::Tensor& tiles, const float* s, const float* z, float c, int64_t group,
                              bool out_bf16) {
  const int bits = static_cast<int>(tiles.size(2) / 64);
  const int64_t O = tiles.size(0) * TR, I = tiles.size(1) * 32, ng = (I + group - 1) / group;
  auto out = torch::empty({O, I}, tiles.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* t = tiles.data_ptr<uint8_t>();
  at::parallel_for(0, O / TR, 1, [&](int64_t begin, int64_t end) {
    for (int64_t R = begin; R < end; ++R) {
      if (out_bf16) dequant_block23(t, bits, s, z, c, R, I, ng, group, reinterpret_cast<uint16_t*>(out.data_ptr()));
      else dequant_block23(t, bits, s, z, c, R, I, ng, group, out.data_ptr<float>());
    }
  });
  return out;
}
