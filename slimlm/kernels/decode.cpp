// slimlm's CPU decode kernels (AVX2 + FMA; built on first use by slimlm.kernels, with a torch fallback).
//
// Why: batch-1 decode of a small model is bound by how fast the weights stream from memory and by
// the per-op cost of many tiny tensor ops. On the 2-core CPUs slimlm targets, torch's fp32 GEMV
// reaches ~12 GB/s and does not scale with threads, and a bf16 weight gains nothing over fp32; an
// RMSNorm is ~10 small ops. These kernels stream each thread's block of weight rows with 4
// independent FMA chains (bf16 weights widened exactly by a 16-bit shift, so bf16 halves the bytes
// read) and fuse RMSNorm, SiLU*mul and rotary embedding into one pass each. Accumulation is fp32;
// bf16 outputs are rounded to nearest-even at the same points as the torch reference code.
#include <ATen/Parallel.h>
#include <vector>
#include <algorithm>
#include "common.h"

using namespace slimlm_k;

namespace {

template <typename WT>
inline float dot(const WT* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += scalar(w[i]) * x[i];
  return s;
}

template <typename WT, typename OT>
void gemv_run(const float* x, int64_t B, int64_t I, const WT* W, int64_t O, const float* bias, const OT* res, OT* y) {
  // rows of W split across threads; each row is read once and applied to every batch row. With a
  // residual, y = round(x w + b) + res is rounded again, as `res + F.linear(x, w, b)` would be.
  at::parallel_for(0, O, 64, [&](int64_t begin, int64_t end) {
    auto put = [&](int64_t b, int64_t o, float v) {
      v += bias ? bias[o] : 0.f;
      if (res) v = rnd(v, y) + ld(res, b * O + o);
      st(y, b * O + o, v);
    };
    for (int64_t o = begin; o < end; ++o)
      for (int64_t b = 0; b < B; ++b) put(b, o, dot(W + o * I, x + b * I, I));
  });
}

}  // namespace

// y = x @ w.T + bias (+ residual). x: [..., I] (fp32/bf16), w: [O, I] contiguous fp32/bf16, bias: [O] or
// empty, residual: [..., O] in x's dtype or empty. Returns [..., O] in x's dtype.
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor bias, torch::Tensor residual) {
  check_float(x, "x");
  check_float(w, "w");
  const int64_t I = x.size(-1), O = w.size(0);
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == I, "gemv: w must be [O, I] contiguous");
  auto xf = x.reshape({-1, I}).to(torch::kFloat32).contiguous();
  const int64_t B = xf.size(0);
  torch::Tensor bf;
  const float* bp = nullptr;
  if (bias.defined() && bias.numel() > 0) {
    TORCH_CHECK(bias.numel() == O, "gemv: bias must have O elements");
    bf = bias.to(torch::kFloat32).contiguous();
    bp = bf.data_ptr<float>();
  }
  auto sizes = x.sizes().vec();
  sizes.back() = O;
  auto y = torch::empty(sizes, x.options());
  const bool has_res = residual.defined() && residual.numel() > 0;
  if (has_res)
    TORCH_CHECK(residual.numel() == B * O && residual.is_contiguous() && residual.scalar_type() == x.scalar_type(),
                "gemv: residual must be [..., O] contiguous in x's dtype");
  const bool wf = w.scalar_type() == torch::kFloat32;
  const uint16_t* wb = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* xp = xf.data_ptr<float>();
  if (x.scalar_type() == torch::kFloat32) {
    const float* r = has_res ? residual.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    if (wf) gemv_run(xp, B, I, w.data_ptr<float>(), O, bp, r, yp);
    else gemv_run(xp, B, I, wb, O, bp, r, yp);
  } else {
    const uint16_t* r = has_res ? reinterpret_cast<const uint16_t*>(residual.data_ptr()) : nullptr;
    uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
    if (wf) gemv_run(xp, B, I, w.data_ptr<float>(), O, bp, r, yp);
    else gemv_run(xp, B, I, wb, O, bp, r, yp);
  }
  return y;
}

// RMSNorm over the last dim of x [N, D]. fp32 x: x * r * (offset + w). bf16 x: llama_bf16 ? bf16(bf16(x * r) * w)
// (transformers' Llama order) : bf16(x * r * (offset + w)) (Gemma: scale in fp32, cast once).
namespace {
template <typename T>
void rms_row(const T* x, const float* w, T* out, int64_t D, float eps, float off, bool llama_bf16) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    const __m256 v0 = load8(x + i), v1 = load8(x + i + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  for (; i + 8 <= D; i += 8) a0 = _mm256_fmadd_ps(load8(x + i), load8(x + i), a0);
  float ss = hsum(_mm256_add_ps(a0, a1));
  for (; i < D; ++i) ss += ld(x, i) * ld(x, i);
  const float r = 1.f / std::sqrt(ss / D + eps);
  const bool llama = llama_bf16 && sizeof(T) == 2;
  const __m256 rv = _mm256_set1_ps(r), ov = _mm256_set1_ps(off);
  for (i = 0; i + 8 <= D; i += 8) {
    const __m256 v = _mm256_mul_ps(load8(x + i), rv), wv = _mm256_loadu_ps(w + i);
    store8(out + i, llama ? _mm256_mul_ps(rbf8(v), rbf8(wv)) : _mm256_mul_ps(v, _mm256_add_ps(ov, wv)));
  }
  for (; i < D; ++i) {
    const float v = ld(x, i) * r;
    st(out, i, llama ? rbf(v) * rbf(w[i]) : v * (off + w[i]));
  }
}
}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps, double offset, bool llama_bf16) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.numel() == x.size(1), "rms_norm: x [N, D] contiguous, w [D]");
  const int64_t N = x.size(0), D = x.size(1);
  auto wf = w.scalar_type() == torch::kFloat32 && w.is_contiguous() ? w : w.to(torch::kFloat32).contiguous();
  const float* wp = wf.data_ptr<float>();
  auto out = torch::empty_like(x);
  const float e = static_cast<float>(eps), off = static_cast<float>(offset);
  for (int64_t n = 0; n < N; ++n) {
    if (x.scalar_type() == torch::kBFloat16)
      rms_row(reinterpret_cast<const uint16_t*>(x.data_ptr()) + n * D, wp, reinterpret_cast<uint16_t*>(out.data_ptr()) + n * D,
              D, e, off, llama_bf16);
    else
      rms_row(x.data_ptr<float>() + n * D, wp, out.data_ptr<float>() + n * D, D, e, off, llama_bf16);
  }
  return out;
}

// gu: [N, 2F] (gate | up, as the fused gate/up matmul returns them) -> silu(gate) * up: [N, F]; bf16 rounds
// silu(gate) before the product, as torch's F.silu(gate) * up does.
namespace {
template <typename T>
void silu_row(const T* g, T* out, int64_t F) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.f), neg = _mm256_set1_ps(-0.f);
  for (; i + 8 <= F; i += 8) {
    const __m256 a = load8(g + i);
    const __m256 sl = rnd8(_mm256_div_ps(a, _mm256_add_ps(one, exp8(_mm256_xor_ps(a, neg)))), out);
    store8(out + i, _mm256_mul_ps(sl, load8(g + F + i)));
  }
  for (; i < F; ++i) {
    const float a = ld(g, i);
    st(out, i, rnd(a / (1.f + std::exp(-a)), out) * ld(g, F + i));
  }
}
}  // namespace

torch::Tensor silu_mul(torch::Tensor gu) {
  check_float(gu, "gu");
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 2 == 0, "silu_mul: gu [N, 2F] contiguous");
  const int64_t N = gu.size(0), F = gu.size(1) / 2;
  auto out = torch::empty({N, F}, gu.options());
  for (int64_t n = 0; n < N; ++n) {
    if (gu.scalar_type() == torch::kBFloat16)
      silu_row(reinterpret_cast<const uint16_t*>(gu.data_ptr()) + n * 2 * F, reinterpret_cast<uint16_t*>(out.data_ptr()) + n * F, F);
    else
      silu_row(gu.data_ptr<float>() + n * 2 * F, out.data_ptr<float>() + n * F, F);
  }
  return out;
}

// Rotary embedding (rotate-half layout) of x [B, T, H, D] (any strides) with cos/sin [B, T, D]
// (contiguous, x's dtype). Returns a contiguous [B, T, H, D].
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && cos.is_contiguous() && sin.is_contiguous(), "rope: x [B, T, H, D], cos/sin [B, T, D]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "rope: cos/sin dtype must match x");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), h = D / 2;
  TORCH_CHECK(cos.size(0) == B && cos.size(1) == T && cos.size(2) == D && D % 2 == 0, "rope: shape mismatch");
  auto xc = x.contiguous();
  auto out = torch::empty_like(xc);
  const bool bf = x.scalar_type() == torch::kBFloat16;
  for (int64_t bt = 0; bt < B * T; ++bt) {
    for (int64_t hh = 0; hh < H; ++hh) {
      const int64_t base = (bt * H + hh) * D;
      if (bf) {
        const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr()) + base;
        const uint16_t* c = reinterpret_cast<const uint16_t*>(cos.data_ptr()) + bt * D;
        const uint16_t* s = reinterpret_cast<const uint16_t*>(sin.data_ptr()) + bt * D;
        uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr()) + base;
        for (int64_t i = 0; i < D; ++i) {
          const float rot = i < h ? -bf2f(xp[i + h]) : bf2f(xp[i - h]);
          op[i] = f2bf(rbf(bf2f(xp[i]) * bf2f(c[i])) + rbf(rot * bf2f(s[i])));
        }
      } else {
        const float* xp = xc.data_ptr<float>() + base;
        const float* c = cos.data_ptr<float>() + bt * D;
        const float* s = sin.data_ptr<float>() + bt * D;
        float* op = out.data_ptr<float>() + base;
        for (int64_t i = 0; i < D; ++i) {
          const float rot = i < h ? -xp[i + h] : xp[i - h];
          op[i] = xp[i] * c[i] + rot * s[i];
        }
      }
    }
  }
  return out;
}

// One decode step of attention for one layer, T = 1 new token per row, all rows writing cache slot `pos`:
// rotary on q and k (when cos/sin are given), k/v written into the cache, then softmax(q k^T * scale) v
// over slots [0, pos] (GQA: query head h reads kv head h / (H / Hkv)), skipping slots where mask is false.
// qkv: [B, 1, (H + 2 Hkv) D] (the fused q|k|v matmul output); cos/sin: [B, (1, 1,) D] or empty;
// kcache/vcache: [L, B, Hkv, Tmax, D] contiguous (slice `layer` is used); mask: [B, pos + 1] bool or empty.
// Returns [B, 1, H D] in qkv's dtype.
namespace {

template <typename T>
void attn_decode_run(const T* qkv, const T* cos, const T* sin, T* kc, T* vc, int64_t pos, const bool* mp, int64_t B,
                     int64_t H, int64_t Hkv, int64_t D, int64_t Tmax, float scale, T* out) {
  const int64_t S = pos + 1, half = D / 2, W = (H + 2 * Hkv) * D, group = H / Hkv;
  // rotary of the head vector at qkv[b, src:src+D] into float dst, rounded where the torch code rounds
  auto rotate = [&](int64_t b, int64_t src, float* dst) {
    const T* x = qkv + b * W + src;
    for (int64_t i = 0; i < D; ++i) {
      if (!cos) { dst[i] = ld(x, i); continue; }
      const float r = i < half ? -ld(x, i + half) : ld(x, i - half);
      dst[i] = rnd(rnd(ld(x, i) * ld(cos, b * D + i), x) + rnd(r * ld(sin, b * D + i), x), x);
    }
  };
  std::vector<float> tmp(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < Hkv; ++j) {
      rotate(b, (H + j) * D, tmp.data());
      const int64_t c = ((b * Hkv + j) * Tmax + pos) * D;
      const T* v = qkv + b * W + (H + Hkv + j) * D;
      for (int64_t i = 0; i < D; ++i) {
        st(kc, c + i, tmp[i]);
        vc[c + i] = v[i];
      }
    }
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(D), p(S), acc(D), row(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, j = h / group;
      rotate(b, h * D, q.data());
      const T* K = kc + (b * Hkv + j) * Tmax * D;
      const T* V = vc + (b * Hkv + j) * Tmax * D;
      float mx = -INFINITY;
      for (int64_t s = 0; s < S; ++s) {
        if (mp && !mp[b * S + s]) { p[s] = -INFINITY; continue; }
        p[s] = dot(K + s * D, q.data(), D) * scale;
        mx = std::max(mx, p[s]);
      }
      int64_t s = 0;
      __m256 den8 = _mm256_setzero_ps();
      for (const __m256 m8 = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY); s + 8 <= S; s += 8) {
        const __m256 v = _mm256_loadu_ps(p.data() + s);  // masked slots (-inf) stay exactly 0
        const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(v, m8)));
        _mm256_storeu_ps(p.data() + s, e);
        den8 = _mm256_add_ps(den8, e);
      }
      float den = hsum(den8);
      for (; s < S; ++s) { p[s] = p[s] == -INFINITY ? 0.f : std::exp(p[s] - mx); den += p[s]; }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < S; ++s) {
        if (p[s] == 0.f) continue;
        const float w = p[s] / den;
        const T* v = V + s * D;
        int64_t i = 0;
        for (; i + 8 <= D; i += 8)
          _mm256_storeu_ps(acc.data() + i, _mm256_fmadd_ps(_mm256_set1_ps(w), load8(v + i), _mm256_loadu_ps(acc.data() + i)));
        for (; i < D; ++i) acc[i] += w * ld(v, i);
      }
      for (int64_t i = 0; i < D; ++i) st(out, b * H * D + h * D + i, acc[i]);
    }
  });
}

}  // namespace

torch::Tensor attn_decode(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, torch::Tensor kcache,
                          torch::Tensor vcache, int64_t layer, int64_t pos, torch::Tensor mask, int64_t H, int64_t Hkv,
                          double scale) {
  check_float(qkv, "qkv");
  TORCH_CHECK(qkv.is_contiguous() && kcache.dim() == 5 && kcache.is_contiguous() && vcache.is_contiguous() &&
              layer >= 0 && layer < kcache.size(0), "attn_decode: qkv [B, 1, (H+2Hkv)D], caches [L, B, Hkv, Tmax, D] contiguous");
  TORCH_CHECK(kcache.scalar_type() == qkv.scalar_type() && vcache.scalar_type() == qkv.scalar_type(), "attn_decode: cache dtype");
  auto kc = kcache.select(0, layer), vc = vcache.select(0, layer);
  const int64_t B = kc.size(0), D = kc.size(3), Tmax = kc.size(2), S = pos + 1;
  TORCH_CHECK(qkv.numel() == B * (H + 2 * Hkv) * D && kc.size(1) == Hkv && pos >= 0 && pos < Tmax && H % Hkv == 0 &&
              D % 2 == 0, "attn_decode: shape mismatch");
  const bool rot = cos.numel() > 0;
  if (rot)
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == B * D && sin.numel() == B * D &&
                cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(), "attn_decode: cos/sin [B, D]");
  const bool* mp = nullptr;
  if (mask.numel() > 0) {
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.numel() == B * S, "attn_decode: mask [B, pos+1] bool");
    mp = mask.data_ptr<bool>();
  }
  auto out = torch::empty({B, 1, H * D}, qkv.options());
  const float sc = static_cast<float>(scale);
  if (qkv.scalar_type() == torch::kFloat32) {
    attn_decode_run(qkv.data_ptr<float>(), rot ? cos.data_ptr<float>() : nullptr, rot ? sin.data_ptr<float>() : nullptr,
                    kc.data_ptr<float>(), vc.data_ptr<float>(), pos, mp, B, H, Hkv, D, Tmax, sc, out.data_ptr<float>());
  } else {
    using U = uint16_t;
    attn_decode_run(reinterpret_cast<const U*>(qkv.data_ptr()), rot ? reinterpret_cast<const U*>(cos.data_ptr()) : nullptr,
                    rot ? reinterpret_cast<const U*>(sin.data_ptr()) : nullptr, reinterpret_cast<U*>(kc.data_ptr()),
                    reinterpret_cast<U*>(vc.data_ptr()), pos, mp, B, H, Hkv, D, Tmax, sc, reinterpret_cast<U*>(out.data_ptr()));
  }
  return out;
}

// A whole Llama-style decoder layer for one decode step, composed from the kernels above, so that a
// step costs one Python call per layer: h + o(attn(norm(h))) then + down(silu(gate) * up)(norm(h)).
// Each linear is 5 tensors (weight, bias, scale, zs, group): dense fp32/bf16 weights leave the last
// three empty (gemv); quantized codes carry qgemv's scale, zero*scale and a 1-element group size.
// `qkv` holds one fused linear or three (q, k, v), `gu` one fused linear or two (gate, up). h: [B, 1, D].
namespace {
torch::Tensor lin(const torch::Tensor& x, const std::vector<torch::Tensor>& t, size_t i, const torch::Tensor& res) {
  const torch::Tensor* p = t.data() + NL * i;
  if (p[4].numel() == 0) return gemv(x, p[0], p[1], res);
  return qgemv(x, p[0], p[1], res, p[2], p[3], p[4].data_ptr<int64_t>()[0]);
}
torch::Tensor lin_cat(const torch::Tensor& x, const std::vector<torch::Tensor>& t) {
  if (t.size() == NL) return lin(x, t, 0, torch::Tensor());
  bool same = true;  // all quantized alike: one qgemv pass (x quantized once, one parallel loop)
  for (size_t i = 0; i < t.size(); i += NL)
    same = same && t[i + 4].numel() == 1 && t[i].scalar_type() == t[0].scalar_type() &&
           t[i + 4].data_ptr<int64_t>()[0] == t[4].data_ptr<int64_t>()[0];
  if (same) return qgemv_cat(x, t);
  std::vector<torch::Tensor> parts;
  for (size_t i = 0; i < t.size() / NL; ++i) parts.push_back(lin(x, t, i, torch::Tensor()));
  return torch::cat(parts, -1);
}
}  // namespace

torch::Tensor decode_layer(torch::Tensor h, torch::Tensor attn_norm_w, torch::Tensor mlp_norm_w, double eps,
                           std::vector<torch::Tensor> qkv, std::vector<torch::Tensor> o, std::vector<torch::Tensor> gu,
                           std::vector<torch::Tensor> down, torch::Tensor cos, torch::Tensor sin, torch::Tensor kcache,
                           torch::Tensor vcache, int64_t layer, int64_t pos, torch::Tensor mask, int64_t H, int64_t Hkv,
                           double scale) {
  TORCH_CHECK(qkv.size() % NL == 0 && gu.size() % NL == 0 && o.size() == NL && down.size() == NL,
              "decode_layer: each linear is (weight, bias, scale, zs, group)");
  const bool llama_bf16 = h.scalar_type() == torch::kBFloat16;
  const int64_t D = h.size(-1);
  auto x = rms_norm(h.reshape({-1, D}), attn_norm_w, eps, 0.0, llama_bf16).view(h.sizes());
  auto a = attn_decode(lin_cat(x, qkv).contiguous(), cos, sin, kcache, vcache, layer, pos, mask, H, Hkv, scale);
  auto h1 = lin(a, o, 0, h);
  x = rms_norm(h1.reshape({-1, D}), mlp_norm_w, eps, 0.0, llama_bf16);
  auto act = silu_mul(lin_cat(x, gu).contiguous());
  return lin(act, down, 0, h1.reshape({-1, D})).view(h.sizes());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x @ w.T + bias (+ residual) for a few rows (decode)");
  m.def("qgemv", &qgemv, "the same for int8 / packed int4 codes with group scales (int8 activations)");
  m.def("qgemv_cat", &qgemv_cat, "several quantized matrices reading the same x in one pass");
  m.def("rms_norm", &rms_norm, "fused RMSNorm");
  m.def("silu_mul", &silu_mul, "silu(gate) * up from a fused [N, 2F] tensor");
  m.def("rope", &rope, "rotary embedding, rotate-half layout");
  m.def("attn_decode", &attn_decode, "one decode step of attention with the KV cache write");
  m.def("decode_layer", &decode_layer, "one decode step of a Llama-style decoder layer");
  m.def("gptq_sweep", &gptq_sweep, "GPTQ's column sweep over one lazy block, rows in parallel (gptq.cpp)");
  m.def("dequant_tiles", &dequant_tiles, "4-bit codes in 16-row tiles -> the dense fp32/bf16 weight (qgemv16.cpp)");
  m.def("nf4_gemv", &nf4_gemv, "NF4 codes x a few activation rows, levels looked up in registers (nf4.cpp)");
}
