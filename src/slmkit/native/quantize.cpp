// slmkit's W8A8 kernels: the per-token int8 activation quantizer and its way back from int32 (for torch's int8
// kernels), and the int8 linear that does both around its own multiply (built on first use by
// slmkit/native/__init__.py; compiled without fast-math and without FMA contraction: bit-identical to torch's ops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

// Per-row symmetric int8: scale = max|x| / 127.5 (>= 1e-10), q = clamp(round_half_even(x / scale), -128, 127).
// One row of x (divided by smooth where given) into K_pad bytes: q as int8, or as uint8 q + 128 when `offset`
// (oneDNN's zero point, VNNI's unsigned operand); the bytes past K are 0. Returns the row's scale.
static float quantize_row(const float* r, const float* smooth, int64_t K, int64_t Kp, bool offset, uint8_t* out) {
  float mx = 0.f;
  if (smooth != nullptr) {
    for (int64_t i = 0; i < K; ++i) mx = std::max(mx, std::fabs(r[i] / smooth[i]));
  } else {
    #pragma omp simd reduction(max:mx)
    for (int64_t i = 0; i < K; ++i) mx = std::max(mx, std::fabs(r[i]));
  }
  const float scale = std::max(mx / 127.5f, 1e-10f);
  for (int64_t i = 0; i < K; ++i) {
    const float v = smooth != nullptr ? r[i] / smooth[i] : r[i];
    const float q = std::min(127.f, std::max(-128.f, std::nearbyint(v / scale)));
    out[i] = offset ? static_cast<uint8_t>(q + 128.f) : static_cast<uint8_t>(static_cast<int8_t>(q));
  }
  for (int64_t i = K; i < Kp; ++i) out[i] = 0;
  return scale;
}

// x: (M, K) f32 -> (q int8 (M, K) [+ offset as uint8 when offset = 128], scale f32 (M, 1))
static std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, int64_t offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2);
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  auto q = at::empty({M, K}, xc.options().dtype(offset ? at::kByte : at::kChar));
  auto s = at::empty({M, 1}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  uint8_t* qp = static_cast<uint8_t*>(q.data_ptr());
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) sp[m] = quantize_row(xp + m * K, nullptr, K, K, offset != 0, qp + m * K);
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

// ---- W8A8 linear: per-token int8 activations x int8 weights -> int32 -> float, in one op ----
// The weight is packed once (pack_int8) into tiles of TILE_N = 64 output columns: for each group of 4 inputs, the
// tile's 64 columns x 4 bytes (256 contiguous bytes), so a tile is one sequential stream. N is padded to a multiple
// of 64 and K to a multiple of 4 with zero weights.
// With AVX-512 VNNI (vpdpbusd: u8 x s8 -> s32) the activations go in as u8 = q + 128 and the kernel subtracts
// 128 * sum_k w[n][k] (comp) afterwards; the int32 sums equal q . w exactly, as torch._int_mm's do. Elsewhere a plain
// C++ loop computes the same (slow: the kernel probe then keeps torch's kernels).
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#include <immintrin.h>
#define SLMKIT_VNNI 1
#else
#define SLMKIT_VNNI 0
#endif

constexpr int64_t TILE_N = 64;  // output columns per tile: 4 vectors of 16 int32

static bool int8_vnni() { return SLMKIT_VNNI; }

// w (N, K) int8 -> (packed int8 (N_pad/64, K_pad/4, 64, 4), comp int32 (N_pad,) = 128 * sum_k w[n][k])
static std::tuple<at::Tensor, at::Tensor> pack_int8(const at::Tensor& w) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "pack_int8: an int8 (N, K) weight");
  auto wc = w.contiguous();
  const int64_t N = wc.size(0), K = wc.size(1);
  const int64_t Np = (N + TILE_N - 1) / TILE_N * TILE_N, K4 = (K + 3) / 4;
  auto packed = at::zeros({Np / TILE_N, K4, TILE_N, 4}, wc.options());
  auto comp = at::zeros({Np}, wc.options().dtype(at::kInt));
  const int8_t* wp = wc.data_ptr<int8_t>();
  int8_t* pp = packed.data_ptr<int8_t>();
  int32_t* cp = comp.data_ptr<int32_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t t = n / TILE_N, c = n % TILE_N;
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        pp[((t * K4 + k / 4) * TILE_N + c) * 4 + k % 4] = wp[n * K + k];
        sum += wp[n * K + k];
      }
      cp[n] = 128 * sum;
    }
  });
  return {packed, comp};
}

#if SLMKIT_VNNI
// MR rows x one 64-column tile: acc[r][j] += u8(a[r][4k..4k+3]) . w[tile][k][16j..16j+15][0..3]
template <int MR>
static inline void tile_vnni(const uint8_t* a, int64_t lda, const int8_t* wt, int64_t K4, __m512i acc[MR][4]) {
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K4; ++k) {
    const int8_t* wk = wt + k * TILE_N * 4;
    const __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 64);
    const __m512i w2 = _mm512_loadu_si512(wk + 128), w3 = _mm512_loadu_si512(wk + 192);
    for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + 4 * k, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], av, w0);
      acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], av, w1);
      acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], av, w2);
      acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], av, w3);
    }
  }
}

// out[r][n] = float(acc - comp[n]) * row_scale[r] * col_scale[n] (+ bias[n]), the order torch computes it in
template <int MR>
static inline void store_vnni(__m512i acc[MR][4], const int32_t* comp, const float* rs, const float* cs,
                              const float* bias, float* out, int64_t ldo, int64_t n0, int64_t N) {
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + 16 * j;
    if (n >= N) break;
    const __mmask16 mask = N - n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - n)) - 1);
    const __m512i cv = _mm512_loadu_si512(comp + n);
    const __m512 sv = _mm512_maskz_loadu_ps(mask, cs + n);
    const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], cv));
      y = _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(rs[r])), sv);
      if (bias != nullptr) y = _mm512_add_ps(y, bv);
      _mm512_mask_storeu_ps(out + r * ldo + n, mask, y);
    }
  }
}

template <int MR>
static void rows_vnni(const uint8_t* a, int64_t lda, const int8_t* wt, int64_t K4, const int32_t* comp, const float* rs,
                      const float* cs, const float* bias, float* out, int64_t ldo, int64_t n0, int64_t N) {
  __m512i acc[MR][4];
  tile_vnni<MR>(a, lda, wt, K4, acc);
  store_vnni<MR>(acc, comp, rs, cs, bias, out, ldo, n0, N);
}
#endif

// x (M, K) f32 -> (M, N) f32: quantize each row per token (after x / smooth), multiply by the packed int8 weight on
// the integer units, scale back by the row's and the column's scale, add the bias. Equal, bit for bit, to
// quantize_rows + torch._int_mm + dequantize_rows (+ bias).
static at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp, int64_t N,
                              const at::Tensor& col_scale, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& smooth) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "int8_linear: x float32 (M, K)");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == TILE_N && packed.size(3) == 4,
              "int8_linear: a weight packed by pack_int8");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), K4 = packed.size(1), Kp = 4 * K4, tiles = packed.size(0);
  TORCH_CHECK(K4 == (K + 3) / 4 && tiles * TILE_N >= N && comp.numel() == tiles * TILE_N, "int8_linear: x's K or N does not match the packed weight");
  TORCH_CHECK(col_scale.scalar_type() == at::kFloat && col_scale.numel() == N, "int8_linear: col_scale float32 (N,)");
  auto cs = col_scale.contiguous();
  at::Tensor bc, sc;
  if (bias.has_value()) { bc = bias->contiguous(); TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == N); }
  if (smooth.has_value()) { sc = smooth->contiguous(); TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.numel() == K); }
  auto out = at::empty({M, N}, xc.options());
  auto qa = at::empty({M, Kp}, xc.options().dtype(at::kByte));
  std::vector<float> rs(M);
  const float* xp = xc.data_ptr<float>();
  const float* sp = sc.defined() ? sc.data_ptr<float>() : nullptr;
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  const float* csp = cs.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const int32_t* cmp = comp.data_ptr<int32_t>();
  uint8_t* ap = qa.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(tiles, M)));
  #pragma omp parallel num_threads(threads)
  {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) rs[m] = quantize_row(xp + m * K, sp, K, Kp, SLMKIT_VNNI, ap + m * Kp);
    // each thread takes whole column tiles (its weights read once) and walks all rows over them
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int8_t* wt = wp + t * K4 * TILE_N * 4;
      const int64_t n0 = t * TILE_N;
#if SLMKIT_VNNI
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) rows_vnni<4>(ap + m * Kp, Kp, wt, K4, cmp, rs.data() + m, csp, bp, op + m * N, N, n0, N);
      switch (M - m) {
        case 3: rows_vnni<3>(ap + m * Kp, Kp, wt, K4, cmp, rs.data() + m, csp, bp, op + m * N, N, n0, N); break;
        case 2: rows_vnni<2>(ap + m * Kp, Kp, wt, K4, cmp, rs.data() + m, csp, bp, op + m * N, N, n0, N); break;
        case 1: rows_vnni<1>(ap + m * Kp, Kp, wt, K4, cmp, rs.data() + m, csp, bp, op + m * N, N, n0, N); break;
        default: break;
      }
#else
      for (int64_t r = 0; r < M; ++r) {
        const int8_t* a = reinterpret_cast<const int8_t*>(ap + r * Kp);
        for (int64_t c = 0; c < TILE_N && n0 + c < N; ++c) {
          int32_t acc = 0;
          for (int64_t k = 0; k < K4; ++k)
            for (int64_t j = 0; j < 4; ++j) acc += static_cast<int32_t>(a[4 * k + j]) * wt[(k * TILE_N + c) * 4 + j];
          const int64_t n = n0 + c;
          float y = static_cast<float>(acc) * rs[r] * csp[n];
          if (bp != nullptr) y = y + bp[n];
          op[r * N + n] = y;
        }
      }
#endif
    }
  }
  return out;
}

TORCH_LIBRARY(slmkit_quantize, m) {
  m.def("dequantize_rows(Tensor y, Tensor row_scale, Tensor col_scale, Tensor? bias=None) -> Tensor", dequantize_rows);
  m.def("quantize_rows(Tensor x, int offset) -> (Tensor, Tensor)", quantize_rows);
  m.def("pack_int8(Tensor w) -> (Tensor, Tensor)", pack_int8);
  m.def("int8_linear(Tensor x, Tensor packed, Tensor comp, int N, Tensor col_scale, Tensor? bias=None, Tensor? smooth=None) -> Tensor", int8_linear);
  m.def("int8_vnni() -> bool", int8_vnni);
}
