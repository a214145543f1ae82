// slmkit's per-token int8 activation quantizer in one pass (built on first use by slmkit/engine/native/__init__.py;
// compiled without fast-math: bit-identical to compress/quant_ops.quantize_rows).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <tuple>

// Per-row symmetric int8: scale = max|x| / 127.5 (>= 1e-10), q = clamp(round_half_even(x / scale), -128, 127).
// x: (M, K) f32 -> (q int8 (M, K) [+ offset as uint8 when offset = 128], scale f32 (M, 1))
static std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2);
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  auto q = at::empty({M, K}, xc.options().dtype(offset ? at::kByte : at::kChar));
  auto s = at::empty({M, 1}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* r = xp + m * K;
      float mx = 0.f;
      #pragma omp simd reduction(max:mx)
      for (int64_t i = 0; i < K; ++i) mx = std::max(mx, std::fabs(r[i]));
      const float scale = std::max(mx / 127.5f, 1e-10f);
      sp[m] = scale;
      if (offset) {
        uint8_t* o = q.data_ptr<uint8_t>() + m * K;
        for (int64_t i = 0; i < K; ++i) o[i] = static_cast<uint8_t>(std::min(127.f, std::max(-128.f, std::nearbyint(r[i] / scale))) + 128.f);
      } else {
        int8_t* o = q.data_ptr<int8_t>() + m * K;
        for (int64_t i = 0; i < K; ++i) o[i] = static_cast<int8_t>(std::min(127.f, std::max(-128.f, std::nearbyint(r[i] / scale))));
      }
    }
  });
  return {q, s};
}

TORCH_LIBRARY(slmkit_quantize, m) {
  m.def("quantize_rows(Tensor x, int offset) -> (Tensor, Tensor)", quantize_rows);
}
