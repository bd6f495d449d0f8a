// GPTQ's column sweep inside one lazy block (slimlm/quant/methods/gptq.py, `gptq_quantize`).
//
// Why: in torch the sweep is a dozen tensor ops per column; SmolLM2 has ~150k columns, so Python
// overhead made the sweep take ~45 s of a GPTQ run. Every output row's sweep is independent of the
// other rows (they share only the inverse Hessian), so here each thread takes whole rows and walks
// the block's columns in order.
//
// Math, per row r and column i of the block (s, z: the column's group scale and zero as floats,
// d = Hinv[i, i]), in the torch loop's order and float32 rounding (no fused multiply-add:
// -ffp-contract=off), so the codes and updated weights equal the torch loop's bit for bit:
//   q = clamp(nearbyint(w[r, i] / s) + z, 0, qmax);  e = (w[r, i] - (q - z) * s) / d
//   w[r, j] -= e * Hinv[i, j]  for j > i;  q1[r, i] = q;  err1[r, i] = e
#include <ATen/Parallel.h>
#include <cmath>
#include "common.h"

// w1, q1, err1: [O, B] float32 contiguous (w1 updated in place); hinv1: [B, B] float32 contiguous;
// scale, zero: [O, NG] float32 contiguous; group: [B] int64, the group of each column. Columns
// c0 <= i < c1 are swept (the caller splits a block where a new group's grid must be chosen).
void gptq_sweep(torch::Tensor w1, torch::Tensor q1, torch::Tensor err1, torch::Tensor hinv1, torch::Tensor scale,
                torch::Tensor zero, torch::Tensor group, int64_t c0, int64_t c1, double qmax) {
  TORCH_CHECK(w1.scalar_type() == torch::kFloat && w1.is_contiguous() && w1.dim() == 2, "w1: [O, B] float32");
  const int64_t O = w1.size(0), B = w1.size(1), NG = scale.size(1);
  TORCH_CHECK(q1.sizes() == w1.sizes() && err1.sizes() == w1.sizes() && q1.is_contiguous() && err1.is_contiguous(),
              "q1/err1 must match w1");
  TORCH_CHECK(hinv1.is_contiguous() && hinv1.size(0) == B && hinv1.size(1) == B, "hinv1: [B, B]");
  TORCH_CHECK(scale.is_contiguous() && zero.is_contiguous() && zero.sizes() == scale.sizes() && scale.size(0) == O,
              "scale/zero: [O, NG]");
  TORCH_CHECK(group.scalar_type() == torch::kLong && group.numel() == B, "group: [B] int64");
  TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= B, "column range");
  float* W = w1.data_ptr<float>();
  float* Q = q1.data_ptr<float>();
  float* E = err1.data_ptr<float>();
  const float* H = hinv1.data_ptr<float>();
  const float* S = scale.data_ptr<float>();
  const float* Z = zero.data_ptr<float>();
  const int64_t* G = group.data_ptr<int64_t>();
  const float qm = static_cast<float>(qmax);
  at::parallel_for(0, O, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* w = W + r * B;
      for (int64_t i = c0; i < c1; ++i) {
        const float s = S[r * NG + G[i]], z = Z[r * NG + G[i]];
        float q = std::nearbyint(w[i] / s) + z;
        q = std::min(std::max(q, 0.0f), qm);
        const float e = (w[i] - (q - z) * s) / H[i * B + i];
        Q[r * B + i] = q;
        E[r * B + i] = e;
        const float* h = H + i * B;
        for (int64_t j = i; j < B; ++j) w[j] -= e * h[j];  // j = i too, as the torch loop (unused after)
      }
    }
  });
}
