// slmkit's per-token int8 activation quantizer in one pass (built on first use by slmkit/native/__init__.py;
// compiled without fast-math and without FMA contraction: bit-identical to torch's ops it replaces).
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

// The int32 products of quantized rows back to float: out = (float(y) * row_scale[m]) * col_scale[n] (+ bias[n]),
// in one pass and in the order torch's `y.float().mul_(s).mul_(scales)` computes it (bit-identical).
static at::Tensor dequantize_rows(const at::Tensor& y, const at::Tensor& row_scale, const at::Tensor& col_scale,
                                  const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(y.scalar_type() == at::kInt && y.dim() == 2 && row_scale.scalar_type() == at::kFloat &&
              col_scale.scalar_type() == at::kFloat, "y int32 (M, N), scales float32");
  const int64_t M = y.size(0), N = y.size(1);
  TORCH_CHECK(row_scale.numel() == M && col_scale.numel() == N, "row_scale (M,), col_scale (N,)");
  auto yc = y.contiguous(), rs = row_scale.contiguous(), cs = col_scale.contiguous();
  at::Tensor bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == N, "bias: (N,) float32");
  }
  auto out = at::empty({M, N}, y.options().dtype(at::kFloat));
  const int32_t* yp = yc.data_ptr<int32_t>();
  const float* rp = rs.data_ptr<float>();
  const float* cp = cs.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* yr = yp + m * N;
      float* orow = op + m * N;
      const float r = rp[m];
      if (bp != nullptr) {
        for (int64_t n = 0; n < N; ++n) orow[n] = static_cast<float>(yr[n]) * r * cp[n] + bp[n];
      } else {
        for (int64_t n = 0; n < N; ++n) orow[n] = static_cast<float>(yr[n]) * r * cp[n];
      }
    }
  });
  return out;
}

TORCH_LIBRARY(slmkit_quantize, m) {
  m.def("dequantize_rows(Tensor y, Tensor row_scale, Tensor col_scale, Tensor? bias=None) -> Tensor", dequantize_rows);
  m.def("quantize_rows(Tensor x, int offset) -> (Tensor, Tensor)", quantize_rows);
}
