// De-quantization of slimlm's GGUF native storage (slimlm/quant/linear/gguf.py) to a float32 or bf16
// [O, I] matrix, for the calls that do not take the decode kernels (prefill, eval): the torch version
// (unpack, float, multiply, subtract) spends ~5 ns per weight, more than a bf16 GEMM of 512 rows needs.
//
// Math, the same float32 operations in the same order as the torch reference (GGUFLinear.dense_rows),
// so the result is bit for bit the same (the build uses -ffp-contract=off: no fused multiply-add):
//   w[o, i] = float(q[o, i] - c0) * scale[o, g]  (- zs[o, g] when zs is given),  g = i / group
// then rounded to bf16 (nearest even, as torch's .to(bfloat16)) when bf16 is set. AVX2, 8 weights at a time.
// Storage: codes uint8 [O/16, I/8, 64] (16-row tiles of 4-bit codes, see slimlm.kernels.tile_int4) with
// scale/zs [O/16, ng, 16]; uint8 [O, I/2] (two 4-bit codes per byte, even element low) or int8 [O, I]
// with scale/zs [O, ng]. Registered as torch.ops.slimlm_gguf.dequant (no change to decode.cpp's module).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "common.h"

using namespace slimlm_k;

namespace {

constexpr int64_t TR = 16;  // rows per tile

// 8 codes (int32 lanes, already minus c0) -> 8 outputs: float(q) * s (- z), stored as fp32 or bf16
template <typename OT>
inline void emit8(__m256i q, __m256 s, const __m256* z, OT* y) {
  __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(q), s);
  if (z) v = _mm256_sub_ps(v, *z);
  if constexpr (sizeof(OT) == 4) {
    _mm256_storeu_ps(reinterpret_cast<float*>(y), v);
  } else {  // round to nearest even, as f2bf: bits + 0x7FFF + ((bits >> 16) & 1), upper half
    const __m256i b = _mm256_castps_si256(v);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                        _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1)))), 16);
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_castsi256_si128(p));
  }
}

// 4 code bytes -> 8 codes as int32 lanes: tiled order (4 low nibbles, then the 4 high) or portable
// order (low, high per byte)
inline __m256i nib8(uint32_t w, bool tiled) {
  const __m128i lo = _mm_cvtsi32_si128(static_cast<int>(w & 0x0F0F0F0Fu));
  const __m128i hi = _mm_cvtsi32_si128(static_cast<int>((w >> 4) & 0x0F0F0F0Fu));
  return _mm256_cvtepu8_epi32(tiled ? _mm_unpacklo_epi32(lo, hi) : _mm_unpacklo_epi8(lo, hi));
}

template <typename OT>
void run(const torch::Tensor& codes, const float* s, const float* z, int64_t O, int64_t I, int64_t group, int64_t c0,
         OT* y) {
  const int64_t ng = (I + group - 1) / group;
  const bool tiled = codes.dim() == 3, nib = !tiled && codes.scalar_type() == torch::kByte;
  const uint8_t* cu = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const __m256i off = _mm256_set1_epi32(static_cast<int>(c0));
  at::parallel_for(0, O, TR, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t R = o / TR, r = o % TR;
      const int64_t t0 = tiled ? R * ng * TR + r : o * ng, step = tiled ? TR : 1;  // terms of row o
      OT* yo = y + o * I;
      for (int64_t i = 0; i < I; i += 8) {  // groups are multiples of 8 (16 or 32)
        const int64_t g = i / group;
        const __m256 sv = _mm256_set1_ps(s[t0 + g * step]);
        const __m256 zv = _mm256_set1_ps(z ? z[t0 + g * step] : 0.f);
        __m256i q;
        if (tiled) {  // tile (R, k): row r in bytes 4r..4r+3, byte j = code(8k + j) | code(8k + 4 + j) << 4
          uint32_t w;
          std::memcpy(&w, cu + (R * (I / 8) + i / 8) * 4 * TR + 4 * r, 4);
          q = nib8(w, true);
        } else if (nib) {
          uint32_t w;
          std::memcpy(&w, cu + o * (I / 2) + i / 2, 4);
          q = nib8(w, false);
        } else {
          int64_t w;
          std::memcpy(&w, cu + o * I + i, 8);
          q = _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(w));
        }
        emit8(_mm256_sub_epi32(q, off), sv, z ? &zv : nullptr, yo + i);
      }
    }
  });
}

torch::Tensor gguf_dequant(torch::Tensor codes, torch::Tensor scale, torch::Tensor zs, int64_t out_features,
                           int64_t in_features, int64_t group, int64_t code_offset, bool bf16) {
  const int64_t O = out_features, I = in_features, ng = (I + group - 1) / group;
  TORCH_CHECK(codes.is_contiguous() && (codes.scalar_type() == torch::kByte || codes.scalar_type() == torch::kChar),
              "gguf_dequant: codes must be contiguous uint8/int8");
  const bool tiled = codes.dim() == 3;
  if (tiled) {
    TORCH_CHECK(O % TR == 0 && I % 8 == 0 && codes.numel() == O * I / 2, "gguf_dequant: tiles must be [O/16, I/8, 64]");
  } else {
    TORCH_CHECK(codes.dim() == 2 && codes.size(0) == O && codes.size(1) == (codes.scalar_type() == torch::kByte ? I / 2 : I),
                "gguf_dequant: codes must be [O, I/2] uint8 or [O, I] int8");
  }
  TORCH_CHECK(group > 0 && group % 8 == 0 && I % 8 == 0 && (scale.scalar_type() == torch::kFloat32 || scale.scalar_type() == torch::kHalf) &&
              scale.numel() == O * ng, "gguf_dequant: scale must be float32 / fp16 with O * ceil(I / group) elements");
  scale = scale.to(torch::kFloat32).contiguous();  // fp16 terms (Q4_0/Q4_1 tiles) widened exactly; a no-op for fp32
  const bool has_z = zs.numel() > 0;
  if (has_z) {
    TORCH_CHECK((zs.scalar_type() == torch::kFloat32 || zs.scalar_type() == torch::kHalf) && zs.numel() == O * ng, "gguf_dequant: bad zs");
    zs = zs.to(torch::kFloat32).contiguous();
  }
  auto y = torch::empty({O, I}, torch::dtype(bf16 ? torch::kBFloat16 : torch::kFloat32));
  const float* s = scale.data_ptr<float>();
  const float* z = has_z ? zs.data_ptr<float>() : nullptr;
  if (bf16)
    run(codes, s, z, O, I, group, code_offset, reinterpret_cast<uint16_t*>(y.data_ptr()));
  else
    run(codes, s, z, O, I, group, code_offset, y.data_ptr<float>());
  return y;
}

}  // namespace

TORCH_LIBRARY(slimlm_gguf, m) {
  m.def("dequant(Tensor codes, Tensor scale, Tensor zs, int out_features, int in_features, int group, int code_offset, bool bf16) -> Tensor",
        &gguf_dequant);
}
