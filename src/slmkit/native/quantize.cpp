// slmkit's W8A8 kernels: the per-token int8 activation quantizer and its way back from int32 (for torch's int8
// kernels), and the int8 linear that does both around its own multiply (built on first use by
// slmkit/native/__init__.py; compiled without fast-math and without FMA contraction: bit-identical to torch's ops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
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
// W4A8's kernel has an AVX2 path too (vpmaddubsw + vpmaddwd: u8 nibbles x s8 activations, exact in int16 pairs)
#if !SLMKIT_VNNI && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SLMKIT_AVX2_INT4 1
#else
#define SLMKIT_AVX2_INT4 0
#endif

constexpr int64_t TILE_N = 64;  // output columns per tile: 4 vectors of 16 int32

static bool int8_vnni() { return SLMKIT_VNNI; }
static bool int4_simd() { return SLMKIT_VNNI || SLMKIT_AVX2_INT4; }  // W4A8's kernel is vectorized (VNNI or AVX2)

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
// acc[r][j] += rows' 4 inputs at k (a[r][4k..4k+3], broadcast) . w[j]: 16 columns x 4 inputs each. W_UNSIGNED: the
// weights are vpdpbusd's unsigned operand (W4A8's nibbles; activations int8), else the activations (W8A8's u8 = q + 128)
template <int MR, bool W_UNSIGNED>
static inline void dot4(const uint8_t* a, int64_t lda, int64_t k, const __m512i w[4], __m512i acc[MR][4]) {
  for (int r = 0; r < MR; ++r) {
    int32_t a4;
    std::memcpy(&a4, a + r * lda + 4 * k, 4);
    const __m512i av = _mm512_set1_epi32(a4);
    for (int j = 0; j < 4; ++j) acc[r][j] = W_UNSIGNED ? _mm512_dpbusd_epi32(acc[r][j], w[j], av) : _mm512_dpbusd_epi32(acc[r][j], av, w[j]);
  }
}

template <int MR>
static inline void tile_vnni(const uint8_t* a, int64_t lda, const int8_t* wt, int64_t K4, __m512i acc[MR][4]) {
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K4; ++k) {
    const int8_t* wk = wt + k * TILE_N * 4;
    const __m512i w[4] = {_mm512_loadu_si512(wk), _mm512_loadu_si512(wk + 64), _mm512_loadu_si512(wk + 128), _mm512_loadu_si512(wk + 192)};
    dot4<MR, false>(a, lda, k, w, acc);
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

// ---- AMX: the same products on Intel's tile units (Sapphire Rapids and later), for blocks of 16 rows ----
// Compiled only where -march=native enables AMX-INT8 (this machine has it), used only once the OS grants this process
// the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) and a probe multiply equals the plain loop.
// tdpbusd is vpdpbusd on tiles: u8 activations (q + 128) x s8 weights -> exact s32 sums, so the epilogue (acc - comp,
// then the scales) is store_vnni's and the output is bit-identical to the VNNI kernel's. The packed weight is read as
// it is: a B tile is 16 steps of 4 inputs x 16 columns, i.e. 64 of the 256 bytes of each step (stride 256).
#if SLMKIT_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>
#define SLMKIT_AMX 1
constexpr int64_t AMX_ROWS = 16, AMX_K = 64;  // a tile: 16 rows x 64 bytes

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static void amx_configure() {  // tiles 0-3: 16 x 16 int32 sums (64 columns); 4: 16 rows x 64 u8 inputs; 5, 6: weights
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
}

// 16 rows (a: stride lda, K4 % 16 == 0 steps of 4 inputs) x one 64-column tile, then the VNNI kernel's epilogue for
// the first `rows` of them
static void block_amx(const uint8_t* a, int64_t lda, const int8_t* wt, int64_t K4, int64_t rows, const int32_t* comp,
                      const float* rs, const float* cs, const float* bias, float* out, int64_t ldo, int64_t n0, int64_t N) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t k = 0; k < K4; k += AMX_K / 4) {
    const int8_t* wk = wt + k * TILE_N * 4;
    _tile_loadd(4, a + 4 * k, lda);
    _tile_loadd(5, wk, TILE_N * 4);
    _tile_loadd(6, wk + 64, TILE_N * 4);
    _tile_dpbusd(0, 4, 5);
    _tile_dpbusd(1, 4, 6);
    _tile_loadd(5, wk + 128, TILE_N * 4);
    _tile_loadd(6, wk + 192, TILE_N * 4);
    _tile_dpbusd(2, 4, 5);
    _tile_dpbusd(3, 4, 6);
  }
  alignas(64) int32_t sums[4][AMX_ROWS][16];
  _tile_stored(0, sums[0], 64); _tile_stored(1, sums[1], 64); _tile_stored(2, sums[2], 64); _tile_stored(3, sums[3], 64);
  for (int64_t r = 0; r < rows; ++r) {
    __m512i acc[1][4] = {{_mm512_load_si512(sums[0][r]), _mm512_load_si512(sums[1][r]), _mm512_load_si512(sums[2][r]),
                          _mm512_load_si512(sums[3][r])}};
    store_vnni<1>(acc, comp, rs + r, cs, bias, out + r * ldo, ldo, n0, N);
  }
}

static bool amx_probe() {  // 16 rows x 64 columns x 64 inputs on the tiles, against the plain loop
  alignas(64) uint8_t a[AMX_ROWS * AMX_K];
  alignas(64) int8_t w[AMX_K / 4 * TILE_N * 4];
  for (int i = 0; i < AMX_ROWS * AMX_K; ++i) a[i] = static_cast<uint8_t>((i * 37 + 11) % 256);
  for (int i = 0; i < AMX_K * TILE_N; ++i) w[i] = static_cast<int8_t>((i * 53 + 7) % 255 - 127);
  int32_t comp[TILE_N] = {};
  float rs[AMX_ROWS], cs[TILE_N], out[AMX_ROWS * TILE_N];
  std::fill(rs, rs + AMX_ROWS, 1.f);
  std::fill(cs, cs + TILE_N, 1.f);
  amx_configure();
  block_amx(a, AMX_K, w, AMX_K / 4, AMX_ROWS, comp, rs, cs, nullptr, out, TILE_N, 0, TILE_N);
  _tile_release();
  for (int r = 0; r < AMX_ROWS; ++r)
    for (int c = 0; c < TILE_N; ++c) {
      int32_t acc = 0;
      for (int k = 0; k < AMX_K; ++k) acc += a[r * AMX_K + k] * w[((k / 4) * TILE_N + c) * 4 + k % 4];
      if (out[r * TILE_N + c] != static_cast<float>(acc)) return false;
    }
  return true;
}

// The CPU has AMX-TILE and AMX-INT8, the OS grants the tile state, the probe agrees, and SLMKIT_AMX is not 0.
static bool amx_ready() {
  static const bool ready = [] {
    const char* env = std::getenv("SLMKIT_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) return false;
    return amx_probe();
  }();
  return ready;
}
#else
#define SLMKIT_AMX 0
static bool amx_ready() { return false; }
#endif
constexpr int64_t AMX_MIN_ROWS = 4;  // fewer rows: VNNI (as fast at 2-3 rows, faster for the 49152-row head)

static bool int8_amx() { return amx_ready(); }

// x (M, K) f32 -> (M, N) f32: quantize each row per token (after x / smooth), multiply by the packed int8 weight on
// the integer units (AMX tiles for 4+ rows where usable, else AVX-512 VNNI), scale back by the row's and the
// column's scale, add the bias. Equal, bit for bit, to quantize_rows + torch._int_mm + dequantize_rows (+ bias).
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
  const bool amx = M >= AMX_MIN_ROWS && K4 % (64 / 4) == 0 && amx_ready();
  const int64_t Ma = amx ? (M + 15) / 16 * 16 : M;  // AMX reads whole 16-row tiles: zero rows past M
  auto qa = amx ? at::zeros({Ma, Kp}, xc.options().dtype(at::kByte)) : at::empty({M, Kp}, xc.options().dtype(at::kByte));
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
#if SLMKIT_AMX
    if (amx) {
      amx_configure();  // per thread: the tile configuration is thread state
      #pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles; ++t)
        for (int64_t m = 0; m < M; m += 16)
          block_amx(ap + m * Kp, Kp, wp + t * K4 * TILE_N * 4, K4, std::min<int64_t>(16, M - m), cmp, rs.data() + m, csp,
                    bp, op + m * N, N, t * TILE_N, N);
      _tile_release();
    }
#endif
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < (amx ? 0 : tiles); ++t) {
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

// ---- W4A8 linear: int8 activations x 4-bit weights, both in groups of the same inputs ----
// w[n][k] = d[n][g] * q[n][k] + m[n][g], q in [0, 15], g = k / group; x[k] = s_g * a[k], a int8, one scale per row
// and group (llama.cpp's Q8_0 activation blocks: a per-row scale lets one outlier coarsen the whole row; per group it
// costs one more multiply per group). The nibbles are vpdpbusd's unsigned operand and the activations its signed one,
// so per group the integer units give acc = sum q a exactly (no offset to take back), and
//   y[n] = sum_g (d s_g acc_g + m s_g asum_g),  asum_g = sum_{k in g} a[k]  (the integer sums exact; float per group).
// Packed once (pack_int4) in the int8 kernel's 64-column tiles:
// for each 4 inputs, 128 bytes: columns 0-15 in the low nibbles of bytes 0-63, 16-31 in their high nibbles, 32-47 and
// 48-63 the same in bytes 64-127 (each 16 columns x 4 inputs as vpdpbusd reads them); per tile and group the 64 scales
// then the 64 minimums as bf16 (as saved: exact). A decode step reads 4 + 32 / group bits per weight.
constexpr int64_t TILE_BYTES4 = TILE_N * 2;  // one K4 step of a tile: 64 columns x 4 inputs x 4 bits

// q (N, K) uint8 in [0, 15], scales and mins (N, G) bf16 -> (packed uint8 (N_pad/64, K/4, 128), dm bf16 (N_pad/64, G, 2, 64))
static std::tuple<at::Tensor, at::Tensor> pack_int4(const at::Tensor& q, const at::Tensor& scales, const at::Tensor& mins) {
  TORCH_CHECK(q.scalar_type() == at::kByte && q.dim() == 2, "pack_int4: q uint8 (N, K) in [0, 15]");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && mins.scalar_type() == at::kBFloat16 && scales.dim() == 2 &&
              scales.sizes() == mins.sizes() && scales.size(0) == q.size(0), "pack_int4: scales and mins bf16 (N, G)");
  auto qc = q.contiguous(), sc = scales.contiguous(), mc = mins.contiguous();
  const int64_t N = qc.size(0), K = qc.size(1), G = sc.size(1);
  TORCH_CHECK(G > 0 && K % G == 0 && (K / G) % 4 == 0, "pack_int4: the group size must divide K and be a multiple of 4");
  const int64_t group = K / G, Np = (N + TILE_N - 1) / TILE_N * TILE_N, K4 = K / 4, tiles = Np / TILE_N;
  auto packed = at::zeros({tiles, K4, TILE_BYTES4}, qc.options());
  auto dm = at::zeros({tiles, G, 2, TILE_N}, sc.options());
  const uint8_t* qp = qc.data_ptr<uint8_t>();
  const at::BFloat16* sp = sc.data_ptr<at::BFloat16>();
  const at::BFloat16* mp = mc.data_ptr<at::BFloat16>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  at::BFloat16* dp = dm.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t t = n / TILE_N, c = n % TILE_N, vec = c / 16, col = c % 16;
      const int64_t half = vec / 2, shift = 4 * (vec % 2);
      for (int64_t k = 0; k < K; ++k)
        pp[(t * K4 + k / 4) * TILE_BYTES4 + half * 64 + col * 4 + k % 4] |= static_cast<uint8_t>((qp[n * K + k] & 0x0F) << shift);
      for (int64_t g = 0; g < G; ++g) {
        dp[((t * G + g) * 2) * TILE_N + c] = sp[n * G + g];
        dp[((t * G + g) * 2 + 1) * TILE_N + c] = mp[n * G + g];
      }
    }
  });
  return {packed, dm};
}

#if SLMKIT_VNNI
static inline __m512 bf16x16(const at::BFloat16* p) {  // 16 bf16 -> 16 float32 (exact: the high halves)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// MR rows x one 64-column tile of the int4 weight (+ bias). gs, gsa: per row and group, s_g and s_g * asum_g
template <int MR>
static void rows_int4(const int8_t* a, int64_t lda, const float* gs, const float* gsa, int64_t G, const uint8_t* wt,
                      const at::BFloat16* dmt, int64_t steps, const float* bias, float* out, int64_t ldo, int64_t n0, int64_t N) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 facc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) facc[r][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t k = g * steps + s;
      const uint8_t* wk = wt + k * TILE_BYTES4;
      const __m512i b0 = _mm512_loadu_si512(wk), b1 = _mm512_loadu_si512(wk + 64);
      const __m512i w[4] = {_mm512_and_si512(b0, low), _mm512_and_si512(_mm512_srli_epi16(b0, 4), low),
                            _mm512_and_si512(b1, low), _mm512_and_si512(_mm512_srli_epi16(b1, 4), low)};
      dot4<MR, true>(reinterpret_cast<const uint8_t*>(a), lda, k, w, acc);
    }
    const at::BFloat16* dg = dmt + g * 2 * TILE_N;
    for (int j = 0; j < 4; ++j) {
      const __m512 d = bf16x16(dg + 16 * j), m = bf16x16(dg + TILE_N + 16 * j);
      for (int r = 0; r < MR; ++r) {
        facc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), _mm512_mul_ps(d, _mm512_set1_ps(gs[r * G + g])), facc[r][j]);
        facc[r][j] = _mm512_fmadd_ps(m, _mm512_set1_ps(gsa[r * G + g]), facc[r][j]);
      }
    }
  }
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + 16 * j;
    if (n >= N) break;
    const __mmask16 mask = N - n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - n)) - 1);
    const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      __m512 y = facc[r][j];
      if (bias != nullptr) y = _mm512_add_ps(y, bv);
      _mm512_mask_storeu_ps(out + r * ldo + n, mask, y);
    }
  }
}
#endif

#if SLMKIT_AVX2_INT4
static inline __m256 bf16x8(const at::BFloat16* p) {  // 8 bf16 -> 8 float32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// MR rows x one half tile (32 columns: bytes 64 * half of each 128-byte step hold them, 16 in the low nibbles and 16
// in the high ones) of the int4 weight (+ bias): as rows_int4, on AVX2's 8-lane registers
template <int MR>
static void rows_int4_avx2(const int8_t* a, int64_t lda, const float* gs, const float* gsa, int64_t G, const uint8_t* wt,
                           const at::BFloat16* dmt, int64_t steps, const float* bias, float* out, int64_t ldo, int64_t n0,
                           int64_t N, int half) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 facc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) facc[r][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t k = g * steps + s;
      const uint8_t* wk = wt + k * TILE_BYTES4 + 64 * half;
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 32));
      // columns 0-7 and 8-15 of this half in the low nibbles, 16-23 and 24-31 in the high ones
      const __m256i w[4] = {_mm256_and_si256(b0, low), _mm256_and_si256(b1, low),
                            _mm256_and_si256(_mm256_srli_epi16(b0, 4), low), _mm256_and_si256(_mm256_srli_epi16(b1, 4), low)};
      for (int r = 0; r < MR; ++r) {
        int32_t a4;
        std::memcpy(&a4, a + r * lda + 4 * k, 4);
        const __m256i av = _mm256_set1_epi32(a4);
        for (int j = 0; j < 4; ++j)
          acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(w[j], av), ones));
      }
    }
    const at::BFloat16* dg = dmt + g * 2 * TILE_N + 32 * half;
    for (int j = 0; j < 4; ++j) {
      const __m256 d = bf16x8(dg + 8 * j), m = bf16x8(dg + TILE_N + 8 * j);
      for (int r = 0; r < MR; ++r) {
        facc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][j]), _mm256_mul_ps(d, _mm256_set1_ps(gs[r * G + g])), facc[r][j]);
        facc[r][j] = _mm256_fmadd_ps(m, _mm256_set1_ps(gsa[r * G + g]), facc[r][j]);
      }
    }
  }
  for (int j = 0; j < 4; ++j) {
    const int64_t n = n0 + 32 * half + 8 * j;
    if (n >= N) break;
    const int64_t valid = std::min<int64_t>(8, N - n);
    for (int r = 0; r < MR; ++r) {
      alignas(32) float y[8];
      _mm256_store_ps(y, facc[r][j]);
      for (int64_t i = 0; i < valid; ++i) out[r * ldo + n + i] = bias != nullptr ? y[i] + bias[n + i] : y[i];
    }
  }
}
#endif

// x (M, K) f32 -> (M, N) f32: each row quantized per group of the weight's inputs (after x / smooth; the int8 kernel's
// grid, scale = max|x| / 127.5 over the group), multiplied by the packed int4 weight on the integer units (AVX-512 VNNI; elsewhere a plain loop computing the same), each group
// scaled back by its scale and minimum.
static at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& dm, int64_t N,
                              const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& smooth) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "int4_linear: x float32 (M, K)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == TILE_BYTES4 &&
              dm.scalar_type() == at::kBFloat16 && dm.dim() == 4 && dm.size(0) == packed.size(0),
              "int4_linear: a weight packed by pack_int4");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), K4 = packed.size(1), tiles = packed.size(0), G = dm.size(1);
  const int64_t steps = K4 / G;
  TORCH_CHECK(K == 4 * K4 && K4 % G == 0 && tiles * TILE_N >= N && N > tiles * TILE_N - TILE_N,
              "int4_linear: x's K or N does not match the packed weight");
  at::Tensor bc, sc;
  if (bias.has_value()) { bc = bias->contiguous(); TORCH_CHECK(bc.scalar_type() == at::kFloat && bc.numel() == N); }
  if (smooth.has_value()) { sc = smooth->contiguous(); TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.numel() == K); }
  auto out = at::empty({M, N}, xc.options());
  auto qa = at::empty({M, K}, xc.options().dtype(at::kChar));
  std::vector<float> gs(M * G), gsa(M * G);
  const float* xp = xc.data_ptr<float>();
  const float* sp = sc.defined() ? sc.data_ptr<float>() : nullptr;
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const at::BFloat16* dmp = dm.data_ptr<at::BFloat16>();
  int8_t* ap = qa.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const int64_t group = K / G;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(tiles, M)));
  #pragma omp parallel num_threads(threads)
  {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t k0 = m * K + g * group;
        const float scale = quantize_row(xp + k0, sp != nullptr ? sp + g * group : nullptr, group, group, false, reinterpret_cast<uint8_t*>(ap + k0));
        int32_t s = 0;
        for (int64_t k = k0; k < k0 + group; ++k) s += ap[k];
        gs[m * G + g] = scale;
        gsa[m * G + g] = scale * static_cast<float>(s);
      }
    }
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const uint8_t* wt = wp + t * K4 * TILE_BYTES4;
      const at::BFloat16* dmt = dmp + t * G * 2 * TILE_N;
      const int64_t n0 = t * TILE_N;
#if SLMKIT_VNNI
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) rows_int4<4>(ap + m * K, K, gs.data() + m * G, gsa.data() + m * G, G, wt, dmt, steps, bp, op + m * N, N, n0, N);
      switch (M - m) {
        case 3: rows_int4<3>(ap + m * K, K, gs.data() + m * G, gsa.data() + m * G, G, wt, dmt, steps, bp, op + m * N, N, n0, N); break;
        case 2: rows_int4<2>(ap + m * K, K, gs.data() + m * G, gsa.data() + m * G, G, wt, dmt, steps, bp, op + m * N, N, n0, N); break;
        case 1: rows_int4<1>(ap + m * K, K, gs.data() + m * G, gsa.data() + m * G, G, wt, dmt, steps, bp, op + m * N, N, n0, N); break;
        default: break;
      }
#elif SLMKIT_AVX2_INT4
      for (int half = 0; half < 2 && n0 + 32 * half < N; ++half) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2)
          rows_int4_avx2<2>(ap + m * K, K, gs.data() + m * G, gsa.data() + m * G, G, wt, dmt, steps, bp, op + m * N, N, n0, N, half);
        if (m < M) rows_int4_avx2<1>(ap + m * K, K, gs.data() + m * G, gsa.data() + m * G, G, wt, dmt, steps, bp, op + m * N, N, n0, N, half);
      }
#else
      for (int64_t r = 0; r < M; ++r) {
        for (int64_t c = 0; c < TILE_N && n0 + c < N; ++c) {
          const int64_t vec = c / 16, col = c % 16, half = vec / 2, shift = 4 * (vec % 2);
          float y = 0.f;
          for (int64_t g = 0; g < G; ++g) {
            int32_t dot = 0;
            for (int64_t k = g * group; k < (g + 1) * group; ++k)
              dot += static_cast<int32_t>(ap[r * K + k]) * ((wt[(k / 4) * TILE_BYTES4 + half * 64 + col * 4 + k % 4] >> shift) & 0x0F);
            const float d = static_cast<float>(dmt[(g * 2) * TILE_N + c]), mn = static_cast<float>(dmt[(g * 2 + 1) * TILE_N + c]);
            y = y + static_cast<float>(dot) * (d * gs[r * G + g]);
            y = y + mn * gsa[r * G + g];
          }
          const int64_t n = n0 + c;
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
  m.def("int8_amx() -> bool", int8_amx);
  m.def("pack_int4(Tensor q, Tensor scales, Tensor mins) -> (Tensor, Tensor)", pack_int4);
  m.def("int4_simd() -> bool", int4_simd);
  m.def("int4_linear(Tensor x, Tensor packed, Tensor dm, int N, Tensor? bias=None, Tensor? smooth=None) -> Tensor", int4_linear);
}
