// De-quantization of slimlm's GGUF native storage (slimlm/quant/linear/gguf.py) to a float32 or bf16
// [O, I] matrix, for the calls that do not take the decode kernels (prefill, eval): the torch version
// (unpack, float, multiply, subtract) spends ~5 ns per weight, more than a bf16 GEMM of 512 rows needs.
//
// Math, the same float32 operations in the same order as the torch reference (GGUFLinear.dense_rows),
// so the result is bit for bit the same (the build uses -ffp-contract=off: no fused multiply-add):
//   w[o, i] = float(q[o, i] - c0) * scale[o, g]  (- zs[o, g] when zs is given),  g = i / group
// then rounded to bf16 (nearest even, as torch's .to(bfloat16)) when bf16 is set.
// Storage: codes uint8 [O/16, I/8, 64] (16-row tiles of 4-bit codes, see slimlm.kernels.tile_int4) with
// scale/zs [O/16, ng, 16]; uint8 [O, I/2] (two 4-bit codes per byte, even element low) or int8 [O, I]
// with scale/zs [O, ng]. Registered as torch.ops.slimlm_gguf.dequant (no change to decode.cpp's module).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "common.h"

using namespace slimlm_k;

namespace {

constexpr int64_t TR = 16;  // rows per tile

template <typename OT>
inline void put(OT* y, int64_t n, const float* v) {
  if constexpr (sizeof(OT) == 4) {
    std::memcpy(y, v, n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = f2bf(v[i]);
  }
}

// one row: codes already widened to int16 values q - c0 in qv[0..I)
template <typename OT>
inline void finish_row(const int16_t* qv, int64_t I, int64_t group, const float* s, int64_t s_step, const float* z,
                       OT* y, float* tmp) {
  for (int64_t g0 = 0, g = 0; g0 < I; g0 += group, ++g) {
    const float sc = s[g * s_step];
    const int64_t n = std::min(group, I - g0);
    for (int64_t i = 0; i < n; ++i) tmp[g0 + i] = static_cast<float>(qv[g0 + i]) * sc;
    if (z) {
      const float zz = z[g * s_step];
      for (int64_t i = 0; i < n; ++i) tmp[g0 + i] = tmp[g0 + i] - zz;
    }
  }
  put(y, I, tmp);
}

template <typename OT>
void run(const torch::Tensor& codes, const float* s, const float* z, int64_t O, int64_t I, int64_t group, int64_t c0,
         OT* y) {
  const int64_t ng = (I + group - 1) / group;
  const bool tiled = codes.dim() == 3, nib = !tiled && codes.scalar_type() == torch::kByte;
  const uint8_t* cu = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  at::parallel_for(0, O, TR, [&](int64_t begin, int64_t end) {
    std::vector<int16_t> qv(I);
    std::vector<float> tmp(I);
    for (int64_t o = begin; o < end; ++o) {
      if (tiled) {  // tile (R, k): row r in bytes 4r..4r+3, byte j = code(8k + j) | code(8k + 4 + j) << 4
        const int64_t R = o / TR, r = o % TR;
        const uint8_t* t = cu + R * (I / 8) * 4 * TR + 4 * r;
        for (int64_t k = 0; k < I / 8; ++k)
          for (int64_t j = 0; j < 4; ++j) {
            const uint8_t b = t[k * 4 * TR + j];
            qv[8 * k + j] = static_cast<int16_t>((b & 0x0F) - c0);
            qv[8 * k + 4 + j] = static_cast<int16_t>((b >> 4) - c0);
          }
        const int64_t off = R * ng * TR + r;
        finish_row(qv.data(), I, group, s + off, TR, z ? z + off : nullptr, y + o * I, tmp.data());
      } else {
        if (nib) {
          const uint8_t* p = cu + o * (I / 2);
          for (int64_t j = 0; j < I / 2; ++j) {
            qv[2 * j] = static_cast<int16_t>((p[j] & 0x0F) - c0);
            qv[2 * j + 1] = static_cast<int16_t>((p[j] >> 4) - c0);
          }
        } else {
          const int8_t* p = reinterpret_cast<const int8_t*>(cu) + o * I;
          for (int64_t i = 0; i < I; ++i) qv[i] = static_cast<int16_t>(p[i] - c0);
        }
        finish_row(qv.data(), I, group, s + o * ng, 1, z ? z + o * ng : nullptr, y + o * I, tmp.data());
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
  TORCH_CHECK(group > 0 && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == O * ng,
              "gguf_dequant: scale must be float32 with O * ceil(I / group) elements");
  const bool has_z = zs.numel() > 0;
  if (has_z) {
    TORCH_CHECK(zs.scalar_type() == torch::kFloat32 && zs.is_contiguous() && zs.numel() == O * ng, "gguf_dequant: bad zs");
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
