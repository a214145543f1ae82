// slmkit's CPU decode attention (built on first use by slmkit/native/__init__.py; compiled with -ffast-math
// for vectorized expf: results within ~1e-6 of torch's scaled_dot_product_attention).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

// Decode attention over a slot cache: one new query token per row.
// q: (B, Hkv, G, D) f32; k, v: (S, Hkv, C, D) f32 (one layer's cache); lens: (B,) int64 valid positions of
// rows first..first+B-1 (the new token included). k_new, v_new (optional, B x Hkv x D): the new token's key and
// value, written at position lens - 1 of each row first. Returns (B, Hkv, G, D).
static at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens,
                                   int64_t first, double scale, const c10::optional<at::Tensor>& k_new,
                                   const c10::optional<at::Tensor>& v_new) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat);
  auto qc = q.contiguous();
  const int64_t B = qc.size(0), H = qc.size(1), G = qc.size(2), D = qc.size(3);
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.size(1) == H && k.size(3) == D, "k, v: (slots, Hkv, capacity, D)");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == D && v.stride(2) == D, "k, v: rows of D contiguous");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.numel() == B && lens.is_contiguous(), "lens: (B,) int64");
  TORCH_CHECK(first >= 0 && first + B <= k.size(0), "rows first..first+B-1 must be slots of the cache");
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(lp[b] >= 1 && lp[b] <= k.size(2), "lens must be in 1..capacity");
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "give both k_new and v_new, or neither");
  at::Tensor kn, vn;
  if (k_new.has_value()) {
    kn = k_new->contiguous();
    vn = v_new->contiguous();
    TORCH_CHECK(kn.scalar_type() == at::kFloat && vn.scalar_type() == at::kFloat && kn.numel() == B * H * D &&
                vn.numel() == B * H * D, "k_new, v_new: (B, Hkv, D) float32");
  }
  auto out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float* knp = kn.defined() ? kn.data_ptr<float>() : nullptr;
  const float* vnp = vn.defined() ? vn.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, L = lp[b];
      float* kb = kp + (first + b) * ks0 + h * ks1;
      float* vb = vp + (first + b) * vs0 + h * vs1;
      if (knp != nullptr) {
        std::copy(knp + (b * H + h) * D, knp + (b * H + h + 1) * D, kb + (L - 1) * D);
        std::copy(vnp + (b * H + h) * D, vnp + (b * H + h + 1) * D, vb + (L - 1) * D);
      }
      const float* qb = qp + (b * H + h) * G * D;
      float* ob = op + (b * H + h) * G * D;
      s.assign(G * L, 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const float* kr = kb + t * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qr = qb + g * D;
          float acc = 0.f;
          #pragma omp simd reduction(+:acc)
          for (int64_t d = 0; d < D; ++d) acc += qr[d] * kr[d];
          s[g * L + t] = acc * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * L;
        float m = -FLT_MAX;
        #pragma omp simd reduction(max:m)
        for (int64_t t = 0; t < L; ++t) m = std::max(m, sg[t]);
        float z = 0.f;
        #pragma omp simd reduction(+:z)
        for (int64_t t = 0; t < L; ++t) { sg[t] = expf(sg[t] - m); z += sg[t]; }
        const float inv = 1.f / z;
        for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
        float* o = ob + g * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      }
      for (int64_t t = 0; t < L; ++t) {
        const float* vr = vb + t * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * L + t];
          float* o = ob + g * D;
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += p * vr[d];
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY(slmkit_attention, m) {
  m.def("decode_attention(Tensor q, Tensor(a!) k, Tensor(b!) v, Tensor lens, int first, float scale, Tensor? k_new=None, "
        "Tensor? v_new=None) -> Tensor", decode_attention);
}
