// Quantized GEMV for decode: int8 or packed int4 weight codes with per-group scales (and zeros), the
// activations quantized to int8 on the fly, as llama.cpp does for its quantized dot products.
//
// Why: on AVX2 a weight-only kernel that widens codes to fp32 is compute-bound below the memory
// bandwidth (one int8 code per FMA lane: ~9 GB/s on 2 cores, slower than the bf16 GEMV it should
// beat). With int8 activations, `vpmaddubsw` multiplies 32 code/activation pairs per instruction and
// the products of up to 128 inputs are summed in integers before one conversion to fp32. CPUs with
// AVX-512 VNNI (Zen 4/5, Ice Lake and later) take `vpdpbusd` instead: 64 pairs per instruction summed
// straight into int32 lanes (the same integers; set SLIMLM_QGEMV_AVX2=1 to force the AVX2 path).
//
// Math, per output row o and input row b (x is the activation, G the quantization group size):
//   activation chunks: each group is cut into chunks of C = the largest of 128/96/64/32 dividing G (a
//   short last group gives a short last chunk); chunk c: d_c = max|x_c| / 127, a_i = round(x_i / d_c)
//   in [-127, 127] (round half to even)
//   y[b, o] = sum_g s[o, g] * sum_{c in g} d_c * (sum_{i in c} q[o, i] a_i)  -  sum_g zs[o, g] * xs[b, g]
//   with xs[b, g] = sum_{c in g} d_c * sum_{i in c} a_i and zs = zero * scale (empty when symmetric),
//   i.e. x_q @ ((q - zero) * scale).T where x_q = d * a is the int8 round trip of x.
// Codes: int8 [O, I] signed (w = (q - zero) * s with a signed zero), or uint8 [O, I/2] holding two 4-bit
// codes 0..15 per byte, element 2j in the low nibble (slimlm's portable `pack_int4` layout). For 4-bit
// weights the activations of each pair of blocks (64 inputs, 32 code bytes; a chunk's odd last block
// alone) are stored evens-then-odds, matching the low/high nibble split of the loaded bytes. Integer sums are exact: a 4-bit chunk's int16 lanes reach at most 4 * 2 * 15 * 127.
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdlib>
#include <vector>
#include "qgemv.h"

using namespace slimlm_k;
using namespace slimlm_q;

bool slimlm_q::cpu_has_vnni512() {
  static const bool ok = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512vnni") && !std::getenv("SLIMLM_QGEMV_AVX2");
  return ok;
}

namespace {

// products of two blocks (64 codes in 32 bytes) summed as 16 int16 lanes
inline __m256i pair4(const uint8_t* w, const int8_t* a) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i m = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(v, m), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);  // evens, odds
  return _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + QB))));
}
// products of one block of 32 as 16 int16 pair sums
inline __m256i block4(const uint8_t* w, const int8_t* a) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));  // [evens | odds]
  return _mm256_maddubs_epi16(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
}
inline __m256i block8(const int8_t* w, const int8_t* a) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  return _mm256_maddubs_epi16(_mm256_abs_epi8(q), _mm256_sign_epi8(x, q));
}

// one chunk's integer dot as 8 int32 lanes: 4-bit pair sums stay int16 over the chunk (no overflow),
// int8 ones (up to 2 * 128 * 127) are widened per block. N: blocks in the chunk (unrolled).
template <bool NIB, int N>
inline __m256i chunk_dot(const uint8_t* wr, const int8_t* a, int64_t k0) {
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (NIB) {
    __m256i s = N >= 2 ? pair4(wr + k0 * 16, a + k0 * QB) : block4(wr + k0 * 16, a + k0 * QB);
    if (N >= 3) {
      const int64_t k = k0 + 2;
      s = _mm256_add_epi16(s, N == 4 ? pair4(wr + k * 16, a + k * QB) : block4(wr + k * 16, a + k * QB));
    }
    return _mm256_madd_epi16(s, ones);
  } else {
    const int8_t* w = reinterpret_cast<const int8_t*>(wr);
    __m256i s = _mm256_madd_epi16(block8(w + k0 * QB, a + k0 * QB), ones);
    for (int k = 1; k < N; ++k)
      s = _mm256_add_epi32(s, _mm256_madd_epi16(block8(w + (k0 + k) * QB, a + (k0 + k) * QB), ones));
    return s;
  }
}
template <bool NIB>
inline __m256i chunk_dot(const uint8_t* wr, const int8_t* a, int64_t k0, int64_t n) {
  switch (n) {
    case 4: return chunk_dot<NIB, 4>(wr, a, k0);
    case 3: return chunk_dot<NIB, 3>(wr, a, k0);
    case 2: return chunk_dot<NIB, 2>(wr, a, k0);
    default: return chunk_dot<NIB, 1>(wr, a, k0);
  }
}

// The next output row(s) from r of a thread's range [., end) over the concatenated parts: 4-bit rows go
// two at a time (they share the activation loads and the loop overhead; a lone last row of a range or
// of a part is computed twice, stored once); int8 rows one at a time (measured faster).
struct RowStep {
  const Part* P;
  int64_t o, o1;  // rows within the part
  bool two;
  const uint8_t *w0, *w1;
};
__attribute__((always_inline)) inline RowStep row_step(const std::vector<Part>& parts, size_t& p, int64_t r, int64_t end, bool nib, int64_t row_bytes) {
  while (r >= parts[p].off + parts[p].O) ++p;
  const Part& P = parts[p];
  const int64_t o = r - P.off;
  const bool two = nib && r + 1 < end && o + 1 < P.O;
  const uint8_t* w0 = P.w + o * row_bytes;
  return {&P, o, two ? o + 1 : o, two, w0, two ? w0 + row_bytes : w0};
}

// int8 rows: the row this many rows ahead is prefetched while one is computed (measured on Zen 5, int8
// model decode: +5% at 4-8 rows ahead, +1% at 2, +3% at 16; the hardware prefetcher alone left gaps)
constexpr int64_t PF_ROWS = 6;

// --- AVX-512 VNNI (Zen 4/5, Ice Lake and later): 64 code/activation pairs per vpdpbusd, summed
// straight into int32 lanes. Same integers as the AVX2 path, so the same result up to fp32 order.

#define QG512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define QG512I __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline))

// a pair of 4-bit blocks: 32 code bytes broadcast to both halves, the upper half shifted by 4 per
// 64-bit lane, masked -> [evens | odds] (3 ops), times the 64 activations laid out so
QG512I inline __m512i pair4_512(__m512i acc, const uint8_t* w, const int8_t* a) {
  const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  const __m512i q = _mm512_and_si512(_mm512_srlv_epi64(v, _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0)),
                                     _mm512_set1_epi8(0x0F));
  return _mm512_dpbusd_epi32(acc, q, _mm512_loadu_si512(a));
}
// one 4-bit block alone: 16 code bytes -> [evens | odds] (256 bits)
QG512I inline __m256i block4_256(__m256i acc, const uint8_t* w, const int8_t* a) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m256i q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
  return _mm256_dpbusd_epi32(acc, q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
}
// signed int8 codes: |q| (unsigned) times x with q's sign (vpdpbusd multiplies u8 by s8)
QG512I inline __m512i pair8_512(__m512i acc, const int8_t* w, const int8_t* a) {
  const __m512i q = _mm512_loadu_si512(w), x = _mm512_loadu_si512(a);
  const __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(q), _mm512_setzero_si512(), x);
  return _mm512_dpbusd_epi32(acc, _mm512_abs_epi8(q), sx);
}
QG512I inline __m256i block8_256(__m256i acc, const int8_t* w, const int8_t* a) {
  const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  return _mm256_dpbusd_epi32(acc, _mm256_abs_epi8(q), _mm256_sign_epi8(x, q));
}
// one chunk (N <= 4 blocks from block k0) as 16 int32 lanes
template <bool NIB, int N>
QG512I inline __m512i chunk_dot512(const uint8_t* wr, const int8_t* a, int64_t k0) {
  const int8_t* w8 = reinterpret_cast<const int8_t*>(wr);
  __m512i s = _mm512_setzero_si512();
  if constexpr (N >= 2) s = NIB ? pair4_512(s, wr + k0 * 16, a + k0 * QB) : pair8_512(s, w8 + k0 * QB, a + k0 * QB);
  if constexpr (N == 4) s = NIB ? pair4_512(s, wr + (k0 + 2) * 16, a + (k0 + 2) * QB) : pair8_512(s, w8 + (k0 + 2) * QB, a + (k0 + 2) * QB);
  if constexpr (N % 2) {
    const int64_t k = k0 + N - 1;
    const __m256i t = NIB ? block4_256(_mm256_setzero_si256(), wr + k * 16, a + k * QB)
                          : block8_256(_mm256_setzero_si256(), w8 + k * QB, a + k * QB);
    s = _mm512_add_epi32(s, _mm512_zextsi256_si512(t));
  }
  return s;
}
template <bool NIB>
QG512I inline __m512i chunk_dot512(const uint8_t* wr, const int8_t* a, int64_t k0, int64_t n) {
  switch (n) {
    case 4: return chunk_dot512<NIB, 4>(wr, a, k0);
    case 3: return chunk_dot512<NIB, 3>(wr, a, k0);
    case 2: return chunk_dot512<NIB, 2>(wr, a, k0);
    default: return chunk_dot512<NIB, 1>(wr, a, k0);
  }
}

// rows [begin, end) of the concatenated parts, stepped by row_step (4-bit rows in pairs, int8 one by one)
template <bool NIB, typename OT>
QG512 void qgemv_rows512(const std::vector<Part>& parts, const Chunks& ch, const int8_t* a, const float* d,
                         const float* xs, int64_t B, int64_t Otot, const OT* res, OT* y, int64_t begin, int64_t end) {
  const int64_t I = ch.I, ng = ch.ng, nc = ch.n(), row_bytes = NIB ? I / 2 : I;
  const int64_t *cstart = ch.start.data(), *cnblk = ch.nblk.data(), *cgroup = ch.group.data();
  size_t p = 0;
  for (int64_t r = begin; r < end;) {
    const RowStep S = row_step(parts, p, r, end, NIB, row_bytes);
    const Part& P = *S.P;
    const int64_t o = S.o, o1 = S.o1;
    const bool two = S.two;
    const uint8_t *w0 = S.w0, *w1 = S.w1;
    if (!NIB && r + PF_ROWS < end)  // software prefetch PF_ROWS rows ahead (see PF_ROWS)
      for (int64_t k = 0; k < row_bytes; k += 64) _mm_prefetch(reinterpret_cast<const char*>(w0 + PF_ROWS * row_bytes + k), _MM_HINT_T0);
    for (int64_t b = 0; b < B; ++b) {
      const int8_t* ab = a + b * I;
      const float* db = d + b * nc;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
      for (int64_t c = 0, g = 0; g < ng; ++g) {
        __m512 g0 = _mm512_setzero_ps(), g1 = _mm512_setzero_ps();
        for (; c < nc && cgroup[c] == g; ++c) {
          const __m512 dc = _mm512_set1_ps(db[c]);
          g0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(chunk_dot512<NIB>(w0, ab, cstart[c], cnblk[c])), dc, g0);
          if (two) g1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(chunk_dot512<NIB>(w1, ab, cstart[c], cnblk[c])), dc, g1);
        }
        acc0 = _mm512_fmadd_ps(g0, _mm512_set1_ps(P.scale[o * ng + g]), acc0);
        if (two) acc1 = _mm512_fmadd_ps(g1, _mm512_set1_ps(P.scale[o1 * ng + g]), acc1);
      }
      finish_out(P, ng, xs, Otot, res, y, o, r, b, _mm512_reduce_add_ps(acc0));
      if (two) finish_out(P, ng, xs, Otot, res, y, o1, r + 1, b, _mm512_reduce_add_ps(acc1));
    }
    r += two ? 2 : 1;
  }
}

template <bool NIB, typename OT>
void qgemv_run(const std::vector<Part>& parts, const Chunks& ch, const int8_t* a, const float* d, const float* xs,
               int64_t B, int64_t Otot, const OT* res, OT* y) {
  if (cpu_has_vnni512()) {
    at::parallel_for(0, Otot, 16, [&](int64_t begin, int64_t end) {
      qgemv_rows512<NIB, OT>(parts, ch, a, d, xs, B, Otot, res, y, begin, end);
    });
    return;
  }
  const int64_t I = ch.I, ng = ch.ng, nc = ch.n(), row_bytes = NIB ? I / 2 : I;
  const int64_t *cstart = ch.start.data(), *cnblk = ch.nblk.data(), *cgroup = ch.group.data();
  at::parallel_for(0, Otot, 16, [&](int64_t begin, int64_t end) {
    size_t p = 0;
    for (int64_t r = begin; r < end;) {
      const RowStep S = row_step(parts, p, r, end, NIB, row_bytes);
      const Part& P = *S.P;
      const int64_t o = S.o, o1 = S.o1;
      const bool two = S.two;
      const uint8_t *w0 = S.w0, *w1 = S.w1;
      for (int64_t b = 0; b < B; ++b) {
        const int8_t* ab = a + b * I;
        const float* db = d + b * nc;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        for (int64_t c = 0, g = 0; g < ng; ++g) {
          __m256 g0 = _mm256_setzero_ps(), g1 = _mm256_setzero_ps();
          for (; c < nc && cgroup[c] == g; ++c) {
            const __m256 dc = _mm256_set1_ps(db[c]);
            g0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_dot<NIB>(w0, ab, cstart[c], cnblk[c])), dc, g0);
            if constexpr (NIB) g1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(chunk_dot<NIB>(w1, ab, cstart[c], cnblk[c])), dc, g1);
          }
          acc0 = _mm256_fmadd_ps(g0, _mm256_set1_ps(P.scale[o * ng + g]), acc0);
          if constexpr (NIB) acc1 = _mm256_fmadd_ps(g1, _mm256_set1_ps(P.scale[o1 * ng + g]), acc1);
        }
        finish_out(P, ng, xs, Otot, res, y, o, r, b, hsum(acc0));
        if (two) finish_out(P, ng, xs, Otot, res, y, o1, r + 1, b, hsum(acc1));
      }
      r += two ? 2 : 1;
    }
  });
}

torch::Tensor opt_float(const torch::Tensor& t, int64_t n, const char* what) {
  if (!t.defined() || t.numel() == 0) return torch::Tensor();
  TORCH_CHECK(t.numel() == n, "qgemv: ", what, " must have ", n, " elements");
  if (t.scalar_type() == torch::kFloat32 && t.is_contiguous()) return t;  // the usual case: no dispatch
  return t.to(torch::kFloat32).contiguous();
}

// the shared body of qgemv and qgemv_cat: specs are 5 tensors per part (w, bias, scale, zs, group)
torch::Tensor qgemv_parts(const torch::Tensor& x, const std::vector<torch::Tensor>& specs, const torch::Tensor& residual,
                          int64_t group) {
  check_float(x, "x");
  const int64_t I = x.size(-1);
  TORCH_CHECK(specs.size() % NL == 0 && !specs.empty(), "qgemv: specs are (w, bias, scale, zs, group) per part");
  TORCH_CHECK(I % QB == 0 && group > 0 && group % QB == 0, "qgemv: I and the group size must be multiples of 32");
  const Chunks ch(I, std::min(group, I));
  const bool tiled = specs[0].dim() == 3;  // 4-bit codes in 16-row tiles (qgemv16.cpp) or 2/3-bit bit planes (qgemv23.cpp)
  const int64_t tbits = tiled ? specs[0].size(2) / 64 : 0;  // 1: 4-bit tiles (64 bytes per 16 x 8); 2, 3: bits
  const bool nib = !tiled && specs[0].scalar_type() == torch::kByte;
  std::vector<Part> parts;
  std::vector<torch::Tensor> keep;  // float copies of biases / zs that must outlive the run
  int64_t Otot = 0;
  for (size_t i = 0; i < specs.size(); i += NL) {
    const torch::Tensor &w = specs[i], &scale = specs[i + 2];
    const int64_t O = tiled ? w.size(0) * TR : w.size(0);
    if (tiled) {
      TORCH_CHECK(w.scalar_type() == torch::kByte && w.dim() == 3 && w.is_contiguous() && w.size(2) == 64 * tbits &&
                      w.size(1) == (tbits == 1 ? I / 8 : I / QB) && tbits <= 3,
                  "qgemv: tiled codes must be uint8 [O/16, I/8, 64] (4-bit) or [O/16, I/32, 64 * bits] (2/3-bit) "
                  "contiguous (all parts alike)");
      TORCH_CHECK(scale.dim() == 3 && scale.size(0) == O / TR && scale.size(2) == TR, "qgemv: tiled scale must be [O/16, ng, 16]");
    } else {
      TORCH_CHECK(w.scalar_type() == (nib ? torch::kByte : torch::kChar), "qgemv: w must be int8 codes or uint8 packed 4-bit codes (all parts alike)");
      TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == (nib ? I / 2 : I), "qgemv: w must be [O, I] / [O, I/2] contiguous");
    }
    // fp16 terms (scale and zs alike): 4-bit tiles only (GGUF Q4_0/Q4_1, slimlm.quant.linear.gguf)
    const bool h16 = tiled && w.size(2) == 4 * TR && scale.scalar_type() == torch::kHalf;
    TORCH_CHECK((h16 || scale.scalar_type() == torch::kFloat32) && scale.is_contiguous() && scale.numel() == O * ch.ng,
                "qgemv: scale must be float32 [O, ceil(I / group)] contiguous (or fp16 with 4-bit tiles)");
    const torch::Tensor& z16 = specs[i + 3];
    if (h16)
      TORCH_CHECK(z16.numel() == 0 || (z16.scalar_type() == torch::kHalf && z16.is_contiguous() && z16.numel() == O * ch.ng),
                  "qgemv: with fp16 scales zs must be fp16 [O, ng] contiguous or empty");
    auto zf = h16 ? torch::Tensor() : opt_float(specs[i + 3], O * ch.ng, "zs"), bf = opt_float(specs[i + 1], O, "bias");
    keep.push_back(zf);
    keep.push_back(bf);
    parts.push_back({reinterpret_cast<const uint8_t*>(w.data_ptr()), O, Otot, h16 ? nullptr : scale.data_ptr<float>(),
                     zf.defined() ? zf.data_ptr<float>() : nullptr, bf.defined() ? bf.data_ptr<float>() : nullptr});
    if (h16) {
      parts.back().scale_h = reinterpret_cast<const uint16_t*>(scale.data_ptr());
      parts.back().zs_h = z16.numel() ? reinterpret_cast<const uint16_t*>(z16.data_ptr()) : nullptr;
    }
    Otot += O;
  }
  const torch::Tensor xc = x.is_contiguous() ? x : x.contiguous();  // fp32 or bf16, read as is
  const int64_t B = xc.numel() / I;
  const bool has_res = residual.defined() && residual.numel() > 0;
  if (has_res)
    TORCH_CHECK(residual.numel() == B * Otot && residual.is_contiguous() && residual.scalar_type() == x.scalar_type(),
                "qgemv: residual must be [..., O] contiguous in x's dtype");
  std::vector<int8_t> a(B * I);
  std::vector<float> d(B * ch.n()), xs(B * ch.ng);
  if (x.scalar_type() == torch::kFloat32)
    quantize_chunks(xc.data_ptr<float>(), B, ch, nib, a.data(), d.data(), xs.data());
  else
    quantize_chunks(reinterpret_cast<const uint16_t*>(xc.data_ptr()), B, ch, nib, a.data(), d.data(), xs.data());
  auto sizes = x.sizes().vec();
  sizes.back() = Otot;
  auto y = torch::empty(sizes, x.options());
  auto run = [&](auto* yp, const auto* rp) {
    if (tbits == 2) qgemv23_run<2>(parts, ch, a.data(), d.data(), xs.data(), B, Otot, rp, yp);
    else if (tbits == 3) qgemv23_run<3>(parts, ch, a.data(), d.data(), xs.data(), B, Otot, rp, yp);
    else if (tiled) qgemv16_run(parts, ch, a.data(), d.data(), xs.data(), B, Otot, rp, yp);
    else if (nib) qgemv_run<true>(parts, ch, a.data(), d.data(), xs.data(), B, Otot, rp, yp);
    else qgemv_run<false>(parts, ch, a.data(), d.data(), xs.data(), B, Otot, rp, yp);
  };
  if (x.scalar_type() == torch::kFloat32) {
    run(y.data_ptr<float>(), has_res ? residual.data_ptr<float>() : static_cast<const float*>(nullptr));
  } else {
    using U = uint16_t;
    run(reinterpret_cast<U*>(y.data_ptr()), has_res ? reinterpret_cast<const U*>(residual.data_ptr()) : static_cast<const U*>(nullptr));
  }
  return y;
}

}  // namespace

// x: [..., I] fp32/bf16 with I % 32 == 0; w: int8 [O, I] or uint8 [O, I/2] (4-bit codes); scale: float32
// [O, ng] with ng = ceil(I / group) and group % 32 == 0 (the last group may be short); zs: float32 [O, ng]
// (zero * scale) or empty; bias [O] or empty; residual [..., O] in x's dtype or empty.
torch::Tensor qgemv(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor residual, torch::Tensor scale,
                    torch::Tensor zs, int64_t group) {
  return qgemv_parts(x, {w, bias, scale, zs, torch::Tensor()}, residual, group);
}

// Several quantized matrices that read the same x (q|k|v, gate|up) in one pass: x is quantized once and
// one parallel loop covers all rows. specs: 5 tensors per part as in qgemv's arguments (the 5th, the
// group size, must be the same for all). Returns [..., sum of O].
torch::Tensor qgemv_cat(torch::Tensor x, std::vector<torch::Tensor> specs) {
  TORCH_CHECK(specs.size() % NL == 0 && !specs.empty(), "qgemv_cat: specs are (w, bias, scale, zs, group) per part");
  auto group_of = [&](size_t i) {
    TORCH_CHECK(specs[i].numel() == 1 && specs[i].scalar_type() == torch::kLong, "qgemv_cat: group sizes are 1-element int64");
    return specs[i].data_ptr<int64_t>()[0];
  };
  const int64_t group = group_of(NL - 1);
  bool mixed = false;  // tiled and row-major parts (O % 16 differs) or tiles of other bits: one call per part
  for (size_t i = NL; i < specs.size(); i += NL) {
    TORCH_CHECK(group_of(i + NL - 1) == group, "qgemv_cat: all parts must share the group size");
    mixed = mixed || specs[i].dim() != specs[0].dim() || (specs[0].dim() == 3 && specs[i].size(2) != specs[0].size(2));
  }
  if (!mixed) return qgemv_parts(x, specs, torch::Tensor(), group);
  std::vector<torch::Tensor> outs;
  for (size_t i = 0; i < specs.size(); i += NL)
    outs.push_back(qgemv_parts(x, std::vector<torch::Tensor>(specs.begin() + i, specs.begin() + i + NL), torch::Tensor(), group));
  return torch::cat(outs, -1);
}
