// Quantized GEMV on 4-bit codes laid out in 16-row tiles (decode). The math, the activation chunks and
// the result are those of qgemv.cpp; only the order of the codes in memory differs.
//
// Why: the row-major kernel reduces each row's vector of partial sums to one number, converts and
// scales per row and unpacks 64 codes per 3 ops; at 4 bits that instruction count, not memory, bounded
// the decode step (the same GEMV from L2 ran at ~24 GB/s per core). In a tile, one 32-bit lane is one
// row: a 64-byte load holds 8 codes of each of 16 rows, the 4 activations they meet are one broadcast
// dword, and `vpdpbusd` (or `vpmaddubsw` + `vpmaddwd` on AVX2) leaves every row's sum in its own lane:
// no horizontal sums, and chunk/group scaling and the zero-point term run on 16 rows at once.
//
// Tile layout (built by slimlm.kernels.tile_int4): codes uint8 [O/16, I/8, 64]; tile (R, k) covers rows
// 16R..16R+15 and inputs 8k..8k+7; row r owns bytes 4r..4r+3, byte j = code(8k + j) | code(8k + 4 + j) << 4.
// Low nibbles then meet activations 8k..8k+3 and high nibbles 8k+4..8k+7, in their natural order.
// scale / zs: float32 [O/16, ng, 16] (one group's 16 row values contiguous); bias: float32 [O].
#include <ATen/Parallel.h>
#include <cstring>
#include "qgemv.h"

using namespace slimlm_k;

namespace slimlm_q {
namespace {

inline int32_t dword(const int8_t* p) {  // 4 activations as one broadcastable dword
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

}  // namespace

__attribute__((target("avx,f16c"))) void tile_terms(const Part& P, int64_t R, int64_t ng, std::vector<float>& buf,
                                                     const float*& sc, const float*& zs) {
  const int64_t n = ng * TR, at = R * n;
  if (!P.scale_h) {
    sc = P.scale + at;
    zs = P.zs ? P.zs + at : nullptr;
    return;
  }
  buf.resize(2 * n);
  for (int64_t k = 0; k < 2; ++k) {
    const uint16_t* h = k ? P.zs_h : P.scale_h;
    if (!h) continue;
    for (int64_t i = 0; i < n; i += 8)  // n is a multiple of 16; fp16 -> fp32 is exact
      _mm256_storeu_ps(buf.data() + k * n + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + at + i))));
  }
  sc = buf.data();
  zs = P.zs_h ? buf.data() + n : nullptr;
}

namespace {

#define Q16_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// tile rows of block R of part P for every batch row: AVX-512 VNNI, 16 rows per vector
template <typename OT>
Q16_512 void tile_rows512(const Part& P, int64_t R, const Chunks& ch, const int8_t* a, const float* d, const float* xs,
                          int64_t B, int64_t Otot, const OT* res, OT* y) {
  const int64_t I = ch.I, ng = ch.ng, nc = ch.n(), kn = I / 8;
  const uint8_t* t = P.w + R * kn * 64;
  thread_local std::vector<float> hbuf;  // fp16 terms widened (Part::scale_h)
  const float *sc, *zs;
  tile_terms(P, R, ng, hbuf, sc, zs);
  const __m512i m = _mm512_set1_epi8(0x0F);
  alignas(64) float out[TR];
  for (int64_t b = 0; b < B; ++b) {
    const int8_t* ab = a + b * I;
    const float* db = d + b * nc;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0, g = 0; g < ng; ++g) {
      __m512 gacc = _mm512_setzero_ps();
      for (; c < nc && ch.group[c] == g; ++c) {
        const int64_t k0 = ch.start[c] * 4, k1 = k0 + ch.nblk[c] * 4;  // a block of 32 inputs = 4 tiles
        __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;  // 4 independent chains
        for (int64_t k = k0; k < k1; k += 2) {
          const __m512i v0 = _mm512_loadu_si512(t + k * 64), v1 = _mm512_loadu_si512(t + (k + 1) * 64);
          const int8_t* ak = ab + 8 * k;
          s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v0, m), _mm512_set1_epi32(dword(ak)));
          s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v0, 4), m), _mm512_set1_epi32(dword(ak + 4)));
          s2 = _mm512_dpbusd_epi32(s2, _mm512_and_si512(v1, m), _mm512_set1_epi32(dword(ak + 8)));
          s3 = _mm512_dpbusd_epi32(s3, _mm512_and_si512(_mm512_srli_epi16(v1, 4), m), _mm512_set1_epi32(dword(ak + 12)));
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

// the same on AVX2: two halves of 8 rows; u8 x s8 pair sums (<= 2 * 15 * 127) stay int16 over 4 tiles
// (8 pair sums per lane: <= 30,480) before widening
template <typename OT>
void tile_rows256(const Part& P, int64_t R, const Chunks& ch, const int8_t* a, const float* d, const float* xs,
                  int64_t B, int64_t Otot, const OT* res, OT* y) {
  const int64_t I = ch.I, ng = ch.ng, nc = ch.n(), kn = I / 8;
  const uint8_t* t = P.w + R * kn * 64;
  thread_local std::vector<float> hbuf;  // fp16 terms widened (Part::scale_h)
  const float *sc, *zs;
  tile_terms(P, R, ng, hbuf, sc, zs);
  const __m256i m = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  alignas(32) float out[TR];
  for (int64_t b = 0; b < B; ++b) {
    const int8_t* ab = a + b * I;
    const float* db = d + b * nc;
    for (int64_t h = 0; h < 2; ++h) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t c = 0, g = 0; g < ng; ++g) {
        __m256 gacc = _mm256_setzero_ps();
        for (; c < nc && ch.group[c] == g; ++c) {
          const int64_t k0 = ch.start[c] * 4, k1 = k0 + ch.nblk[c] * 4;
          __m256i s32 = _mm256_setzero_si256();
          for (int64_t k = k0; k < k1; k += 4) {
            __m256i s16 = _mm256_setzero_si256();
            for (int64_t j = k; j < k + 4; ++j) {
              const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + j * 64 + h * 32));
              const int8_t* aj = ab + 8 * j;
              s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(v, m), _mm256_set1_epi32(dword(aj))));
              s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m),
                                                               _mm256_set1_epi32(dword(aj + 4))));
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

template <typename OT>
void qgemv16_run(const std::vector<Part>& parts, const Chunks& ch, const int8_t* a, const float* d, const float* xs,
                 int64_t B, int64_t Otot, const OT* res, OT* y) {
  // tiles of all parts in one range: part p covers tiles [first[p], first[p + 1])
  std::vector<int64_t> first{0};
  for (const Part& P : parts) first.push_back(first.back() + P.O / TR);
  const bool vnni = cpu_has_vnni512();
  at::parallel_for(0, first.back(), 1, [&](int64_t begin, int64_t end) {
    size_t p = 0;
    for (int64_t blk = begin; blk < end; ++blk) {
      while (blk >= first[p + 1]) ++p;
      const int64_t R = blk - first[p];
      if (R + 1 < parts[p].O / TR) {  // prefetch the next tile block (Zen 5 decode: +13% over the hardware prefetcher alone)
        const char* nx = reinterpret_cast<const char*>(parts[p].w + (R + 1) * ch.I * 8);
        for (int64_t k = 0; k < ch.I * 8; k += 64) _mm_prefetch(nx + k, _MM_HINT_T0);
      }
      if (vnni) tile_rows512(parts[p], R, ch, a, d, xs, B, Otot, res, y);
      else tile_rows256(parts[p], R, ch, a, d, xs, B, Otot, res, y);
    }
  });
}

template void qgemv16_run<float>(const std::vector<Part>&, const Chunks&, const int8_t*, const float*, const float*,
                                 int64_t, int64_t, const float*, float*);
template void qgemv16_run<uint16_t>(const std::vector<Part>&, const Chunks&, const int8_t*, const float*, const float*,
                                    int64_t, int64_t, const uint16_t*, uint16_t*);

}  // namespace slimlm_q

torch::Tensor dequant_tiles23(const torch::Tensor& tiles, const float* s, const float* z, float c, int64_t group,
                              bool out_bf16);  // qgemv23.cpp

namespace {
using slimlm_q::TR;

// tile block R of codes -> rows 16R..16R+15 of the dense [O, I] weight, w = (q - zero) * scale in fp32
// (the arithmetic of QuantizedWeight.dequantize), stored as fp32 or rounded to bf16
template <typename OT>
void dequant_block(const uint8_t* t, const float* scale, const float* zero, float zc, int64_t R, int64_t I, int64_t ng,
                   int64_t group, OT* out) {
  const int64_t kn = I / 8;
  for (int64_t k = 0; k < kn; ++k) {
    const int64_t g = (8 * k) / group;
    const uint8_t* tk = t + (R * kn + k) * 64;
    for (int64_t r = 0; r < TR; ++r) {
      const int64_t o = R * TR + r;
      uint32_t dw;
      std::memcpy(&dw, tk + 4 * r, 4);
      const uint64_t v = static_cast<uint64_t>(dw & 0x0F0F0F0Fu) | (static_cast<uint64_t>((dw >> 4) & 0x0F0F0F0Fu) << 32);
      const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(v))));
      const __m256 z = _mm256_set1_ps(zero ? zero[o * ng + g] : zc);
      store8(out + o * I + 8 * k, _mm256_mul_ps(_mm256_sub_ps(q, z), _mm256_set1_ps(scale[o * ng + g])));
    }
  }
}

}  // namespace

// 4-bit codes in 16-row tiles uint8 [O/16, I/8, 64] -> the dense weight [O, I] in fp32 (or bf16 when
// out_bf16: the fp32 value rounded to nearest even, as .to(torch.bfloat16) does). scale: float32 [O, ng],
// zero: float32 [O, ng] or empty (then every zero is zc); group % 8 == 0 (the last group may be short).
// 2/3-bit tiles [O/16, I/32, 64 * bits] go to qgemv23.cpp. The prefill/eval path of the tiled linears: de-quantized per call, so the tiles are the only copy held.
torch::Tensor dequant_tiles(torch::Tensor tiles, torch::Tensor scale, torch::Tensor zero, double zc, int64_t group,
                            bool out_bf16) {
  TORCH_CHECK(tiles.scalar_type() == torch::kByte && tiles.dim() == 3 && tiles.is_contiguous() &&
                  (tiles.size(2) == 4 * TR || tiles.size(2) == 128 || tiles.size(2) == 192),
              "dequant_tiles: tiles must be uint8 [O/16, I/8, 64] (4-bit) or [O/16, I/32, 64 * bits] (2/3-bit) contiguous");
  const bool lowbit = tiles.size(2) != 4 * TR;
  const int64_t O = tiles.size(0) * TR, I = tiles.size(1) * (lowbit ? 32 : 8);
  TORCH_CHECK(group > 0 && group % 8 == 0, "dequant_tiles: group must be a positive multiple of 8");
  const int64_t ng = (I + group - 1) / group;
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == O * ng,
              "dequant_tiles: scale must be float32 [O, ceil(I / group)] contiguous");
  const bool has_zero = zero.defined() && zero.numel() > 0;
  if (has_zero)
    TORCH_CHECK(zero.scalar_type() == torch::kFloat32 && zero.is_contiguous() && zero.numel() == O * ng,
                "dequant_tiles: zero must be float32 [O, ceil(I / group)] contiguous or empty");
  const float* s = scale.data_ptr<float>();
  const float* z = has_zero ? zero.data_ptr<float>() : nullptr;
  const float c = static_cast<float>(zc);
  if (lowbit) return dequant_tiles23(tiles, s, z, c, group, out_bf16);
  auto out = torch::empty({O, I}, tiles.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat32));
  const uint8_t* t = tiles.data_ptr<uint8_t>();
  at::parallel_for(0, O / TR, 1, [&](int64_t begin, int64_t end) {
    for (int64_t R = begin; R < end; ++R) {
      if (out_bf16) dequant_block(t, s, z, c, R, I, ng, group, reinterpret_cast<uint16_t*>(out.data_ptr()));
      else dequant_block(t, s, z, c, R, I, ng, group, out.data_ptr<float>());
    }
  });
  return out;
}
