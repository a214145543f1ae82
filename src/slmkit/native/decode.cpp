// slmkit's CPU kernels for the lean forward's decode step (built on first use by slmkit/native/__init__.py;
// compiled with -ffast-math for vectorized expf and sums: results within ~1e-6 of torch's operations): attention over
// the slot cache (with the rotary embedding and the cache write of the new token on the way), RMSNorm with the
// residual add before it, and the SiLU gate of the MLP.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <algorithm>
#include <cfloat>
#include <tuple>
#include <utility>
#include <cmath>
#include <cstring>
#include <vector>

// A cache element as float: float32 as it is, bfloat16 by its 16 high bits (exact)
static inline float as_float(float x) { return x; }
static inline float as_float(at::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
static inline void store_as(float x, float* out) { *out = x; }
static inline void store_as(float x, at::BFloat16* out) { *out = at::BFloat16(x); }  // round to nearest even

// One KV head of one row: the G queries sharing it against its L cached keys and values (T: the cache's float32 or
// bfloat16). q: (G, D); kb, vb: (>= L, D) rows of the cache; s: scratch for G * L scores; out: (G, D)
template <typename T>
static void attend(const float* q, const T* kb, const T* vb, int64_t L, int64_t G, int64_t D, float sc,
                   std::vector<float>& s, float* out) {
  s.assign(G * L, 0.f);
  for (int64_t t = 0; t < L; ++t) {
    const T* kr = kb + t * D;
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = q + g * D;
      float acc = 0.f;
      #pragma omp simd reduction(+:acc)
      for (int64_t d = 0; d < D; ++d) acc += qr[d] * as_float(kr[d]);
      s[g * L + t] = acc * sc;
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s.data() + g * L;
    float m = -FLT_MAX;
    #pragma omp simd reduction(max:m)
    for (int64_t t = 0; t < L; ++t) m = fmaxf(m, sg[t]);  // (fmaxf: a vector max; std::max's reference keeps it scalar)
    float z = 0.f;
    #pragma omp simd reduction(+:z)
    for (int64_t t = 0; t < L; ++t) { sg[t] = expf(sg[t] - m); z += sg[t]; }
    const float inv = 1.f / z;
    for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
    float* o = out + g * D;
    for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
  }
  for (int64_t t = 0; t < L; ++t) {
    const T* vr = vb + t * D;
    for (int64_t g = 0; g < G; ++g) {
      const float p = s[g * L + t];
      float* o = out + g * D;
      #pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += p * as_float(vr[d]);
    }
  }
}

// k, v: one layer's slot cache (S, Hkv, C, D) f32 or bf16 (written rounded to nearest even, read exactly), rows of D contiguous; lens (B,) int64 in 1..C: each row's length
// after its token; slots (B,) int64: the slot each row writes and reads (several rows may share one: the consecutive
// tokens of one sequence, a speculative check, each at its own length)
static void check_cache(const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens, const at::Tensor& slots, int64_t B) {
  TORCH_CHECK((k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16) && v.scalar_type() == k.scalar_type(),
              "k, v: float32 or bfloat16, both the same");
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "k, v: (slots, Hkv, capacity, D)");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == k.size(3) && v.stride(2) == v.size(3), "k, v: rows of D contiguous");
  TORCH_CHECK(lens.scalar_type() == at::kLong && lens.numel() == B && lens.is_contiguous(), "lens: (B,) int64");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == B && slots.is_contiguous(), "slots: (B,) int64");
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= k.size(2), "lens must be in 1..capacity");
    TORCH_CHECK(sp[b] >= 0 && sp[b] < k.size(0), "slots must be slots of the cache");
  }
}

// Rotary embedding, rotate-half layout (as transformers' Llama): out = x * cos + (-x[half:], x[:half]) * sin
static inline void rotate(const float* x, const float* c, const float* sn, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = x[d] * c[d] - x[d + half] * sn[d];
  for (int64_t d = half; d < D; ++d) out[d] = x[d] * c[d] + x[d - half] * sn[d];
}

// rope_decode_attention's work on a cache of T (float32 or bfloat16): every row's rotated key and its value written
// first, then each row's queries attend over its own length.
template <typename T>
static void attend_rows(const at::Tensor& qc, const at::Tensor& cc, const at::Tensor& sc, T* kp, T* vp, at::IntArrayRef kst,
                        at::IntArrayRef vst, const at::Tensor& lens, const at::Tensor& slots, int64_t heads, int64_t Hkv,
                        int64_t G, int64_t D, float scale, int64_t window, at::Tensor& out) {
  const int64_t B = qc.size(0), W = (heads + 2 * Hkv) * D;
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* slp = slots.data_ptr<int64_t>();
  const float* qp = qc.data_ptr<float>();
  const float* cp = cc.data_ptr<float>();
  const float* sp = sc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ks0 = kst[0], ks1 = kst[1], vs0 = vst[0], vs1 = vst[1];
  std::vector<float> rotated(D);
  for (int64_t b = 0; b < B; ++b) {  // the writes first (B * Hkv rotations of D: a few microseconds at most)
    const int64_t L = lp[b];
    const float* row = qp + b * W;
    for (int64_t h = 0; h < Hkv; ++h) {
      rotate(row + (heads + h) * D, cp + b * D, sp + b * D, D, rotated.data());
      T* kd = kp + slp[b] * ks0 + h * ks1 + (L - 1) * D;
      T* vd = vp + slp[b] * vs0 + h * vs1 + (L - 1) * D;
      const float* vsrc = row + (heads + Hkv + h) * D;
      for (int64_t d = 0; d < D; ++d) { store_as(rotated[d], kd + d); store_as(vsrc[d], vd + d); }
    }
  }
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, q(G * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv, L = lp[b];
      const float* row = qp + b * W;
      const float *c = cp + b * D, *sn = sp + b * D;
      const T* kb = kp + slp[b] * ks0 + h * ks1;
      const T* vb = vp + slp[b] * vs0 + h * vs1;
      for (int64_t g = 0; g < G; ++g) rotate(row + (h * G + g) * D, c, sn, D, q.data() + g * D);
      const int64_t from = window > 0 ? std::max<int64_t>(0, L - window) : 0;
      attend(q.data(), kb + from * D, vb + from * D, L - from, G, D, scale, s, op + b * heads * D + h * G * D);
    }
  });
}

// A decode step's attention from the fused q/k/v projection's output: qkv (B, (H + 2 Hkv) D) f32 (queries, keys,
// values of each row's new token side by side); cos, sin (B, D) at each row's position. Rotates the queries and the
// key, writes the key and value at position lens - 1 of each row's slot, attends over that row's lens positions.
// Every row's key and value are written before any row attends, so rows of one slot (consecutive positions) see each
// other's as a causal forward would. Returns (B, H D): the heads' outputs side by side (head h = kv head h / G).
// window > 0: a sliding-window layer, whose query sees only the last `window` positions (itself included).
static at::Tensor rope_decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens, const at::Tensor& slots,
                                        double scale, int64_t heads, int64_t window) {
  TORCH_CHECK(qkv.scalar_type() == at::kFloat && qkv.dim() == 2, "qkv: (B, (H + 2 Hkv) D) float32");
  const int64_t B = qkv.size(0);
  check_cache(k, v, lens, slots, B);
  const int64_t Hkv = k.size(1), D = k.size(3);
  TORCH_CHECK(heads % Hkv == 0 && qkv.size(1) == (heads + 2 * Hkv) * D && D % 2 == 0, "qkv: (B, (heads + 2 Hkv) D) for this cache");
  auto qc = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  TORCH_CHECK(cc.scalar_type() == at::kFloat && sc.scalar_type() == at::kFloat && cc.numel() == B * D && sc.numel() == B * D,
              "cos, sin: (B, D) float32");
  const int64_t G = heads / Hkv;
  auto out = at::empty({B, heads * D}, qc.options());
  if (k.scalar_type() == at::kBFloat16) {
    attend_rows(qc, cc, sc, k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), k.strides(), v.strides(), lens, slots,
                heads, Hkv, G, D, static_cast<float>(scale), window, out);
  } else {
    attend_rows(qc, cc, sc, k.data_ptr<float>(), v.data_ptr<float>(), k.strides(), v.strides(), lens, slots, heads, Hkv, G,
                D, static_cast<float>(scale), window, out);
  }
  return out;
}

// h += delta (in place, when given), then RMSNorm: h * rsqrt(mean(h^2) + eps) * weight. h, delta: (M, E); weight (E,)
static at::Tensor add_rms_norm(const at::Tensor& h, const c10::optional<at::Tensor>& delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous(), "h: contiguous float32");
  const int64_t E = h.size(-1), M = h.numel() / E;
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == E, "weight: (E,) float32");
  at::Tensor dc;
  if (delta.has_value()) {
    dc = delta->contiguous();
    TORCH_CHECK(dc.scalar_type() == at::kFloat && dc.numel() == h.numel(), "delta: h's shape, float32");
  }
  auto wc = weight.contiguous();
  auto out = at::empty_like(h);
  float* hp = h.data_ptr<float>();
  const float* dp = dc.defined() ? dc.data_ptr<float>() : nullptr;
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / E), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float* x = hp + m * E;
      if (dp != nullptr) {
        #pragma omp simd
        for (int64_t i = 0; i < E; ++i) x[i] += dp[m * E + i];
      }
      float ss = 0.f;
      #pragma omp simd reduction(+:ss)
      for (int64_t i = 0; i < E; ++i) ss += x[i] * x[i];
      const float r = 1.f / std::sqrt(ss / static_cast<float>(E) + static_cast<float>(eps));
      float* o = op + m * E;
      #pragma omp simd
      for (int64_t i = 0; i < E; ++i) o[i] = wp[i] * (x[i] * r);
    }
  });
  return out;
}

// The MLP's gate: y (M, 2F) = [gate, up] -> act(gate) * up (M, F)
template <typename Act>
static at::Tensor gate_mul(const at::Tensor& y, Act act) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && y.dim() == 2 && y.size(1) % 2 == 0, "y: (M, 2F) float32");
  auto yc = y.contiguous();
  const int64_t M = yc.size(0), F = yc.size(1) / 2;
  auto out = at::empty({M, F}, yc.options());
  const float* yp = yc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / F), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* g = yp + m * 2 * F;
      const float* u = g + F;
      float* o = op + m * F;
      #pragma omp simd
      for (int64_t i = 0; i < F; ++i) o[i] = act(g[i]) * u[i];
    }
  });
  return out;
}

// SwiGLU's gate: silu(x) = x / (1 + e^-x)
static at::Tensor silu_mul(const at::Tensor& y) {
  return gate_mul(y, [](float x) { return x / (1.f + expf(-x)); });
}

// Gemma's GeGLU gate: gelu_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as torch's gelu(approximate="tanh")
static at::Tensor gelu_tanh_mul(const at::Tensor& y) {
  return gate_mul(y, [](float x) { return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))); });
}

// ---- A whole decode step of a w8a8 or w4a8 model in one call (Llama's block and the variations below) ----
// slmkit's int8 and int4 linears live in the slmkit_quantize library (built without fast-math: bit-identical to torch's
// ops); they are called through torch's dispatcher (~0.3 us, against ~3 us per op from Python).
using Int8Linear = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&,
                              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&);
using Int4Linear = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&);

// w: four tensors per linear (layers/integer.py's step_tensors). int8 (W8A8): packed tiles, 128 * row sums, scales
// (N,), bias (N,) or empty; int4 (W4A8, packed as uint8): packed nibbles, scales and minimums, an (N, 0) tensor, bias.
static at::Tensor int8_linear(const at::Tensor& x, const at::Tensor* w) {
  const c10::optional<at::Tensor> bias = w[3].numel() ? c10::optional<at::Tensor>(w[3]) : c10::nullopt;
  if (w[0].scalar_type() == at::kByte) {
    static auto op4 = c10::Dispatcher::singleton().findSchemaOrThrow("slmkit_quantize::int4_linear", "").typed<Int4Linear>();
    return op4.call(x, w[0], w[1], w[2].size(0), bias, c10::nullopt);
  }
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("slmkit_quantize::int8_linear", "").typed<Int8Linear>();
  return op.call(x, w[0], w[1], w[2].numel(), w[2], bias, c10::nullopt);
}

// Block variations (engine/families.py), as bits of `flags`:
constexpr int64_t HEAD_NORMS = 1;  // an RMSNorm on each query and key head before the rotation (Qwen3, Gemma 3)
constexpr int64_t SANDWICH = 2;    // norms on the attention's and the MLP's outputs too (Gemma 2/3)
constexpr int64_t GELU_TANH = 4;   // the MLP's gate is GeGLU (tanh approximation) instead of SiLU

static int64_t per_layer(int64_t flags) {  // 18: norm1, qkv (4), o (4), norm2, gate_up (4), down (4); + q/k norms; + 2 out norms
  return 18 + ((flags & HEAD_NORMS) ? 2 : 0) + ((flags & SANDWICH) ? 2 : 0);
}

// RMSNorm of heads h0..h0+n-1 of each row of y (B, W), D wide, in place
static void norm_heads(at::Tensor& y, const at::Tensor& weight, int64_t h0, int64_t n, int64_t D, double eps) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == D, "head norm weight: (D,) float32");
  const int64_t B = y.size(0), W = y.size(1);
  float* yp = y.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  at::parallel_for(0, B * n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      float* x = yp + (bh / n) * W + (h0 + bh % n) * D;
      float ss = 0.f;
      #pragma omp simd reduction(+:ss)
      for (int64_t d = 0; d < D; ++d) ss += x[d] * x[d];
      const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
      #pragma omp simd
      for (int64_t d = 0; d < D; ++d) x[d] = wp[d] * (x[d] * r);
    }
  });
}

// h (B, E): the new tokens' embeddings. weights: per_layer(flags) tensors per block in the order above (each linear
// as its four tensors above; norm weights as the forward multiplies by them). k, v: the slot cache (layers, S, Hkv,
// C, D). lens (B,): each row's length after this token, slots (B,) its slot (as rope_decode_attention's); cos, sin
// (B, D) at its position, cos_local, sin_local the same from the local rope table that layers with local[i] != 0 use
// (Gemma 3's sliding layers). windows: per layer, the positions a query sees (0: all; empty: none anywhere).
// Returns h after every block (the final norm and the output head are the caller's), the new keys and values written.
static at::Tensor decode_step(const at::Tensor& h, at::TensorList weights, const at::Tensor& cos, const at::Tensor& sin,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& lens, const at::Tensor& slots,
                              double scale, int64_t heads, double eps, int64_t flags,
                              const c10::optional<at::Tensor>& cos_local, const c10::optional<at::Tensor>& sin_local,
                              at::IntArrayRef windows, at::IntArrayRef local) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() == 2, "h: (B, E) float32");
  const int64_t L = k.size(0), P = per_layer(flags);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == P * L && k.dim() == 5 && v.sizes() == k.sizes(),
              "weights: per_layer(flags) per block; k, v: (layers, slots, Hkv, capacity, D)");
  TORCH_CHECK(windows.empty() || static_cast<int64_t>(windows.size()) == L, "windows: one per layer, or none");
  TORCH_CHECK(local.empty() || (static_cast<int64_t>(local.size()) == L && cos_local.has_value() && sin_local.has_value()),
              "local: one per layer, with cos_local and sin_local");
  const int64_t Hkv = k.size(2), D = k.size(4);
  auto x = h.contiguous().clone();
  at::Tensor out;
  for (int64_t i = 0; i < L; ++i) {
    const at::Tensor* w = weights.data() + i * P;
    at::Tensor n = add_rms_norm(x, out.defined() ? c10::optional<at::Tensor>(out) : c10::nullopt, w[0], eps);
    at::Tensor y = int8_linear(n, w + 1);
    int64_t j = 5;
    if (flags & HEAD_NORMS) {
      norm_heads(y, w[j], 0, heads, D, eps);
      norm_heads(y, w[j + 1], heads, Hkv, D, eps);
      j += 2;
    }
    const bool loc = !local.empty() && local[i] != 0;
    at::Tensor o = rope_decode_attention(y, loc ? *cos_local : cos, loc ? *sin_local : sin, k[i], v[i], lens, slots, scale,
                                         heads, windows.empty() ? 0 : windows[i]);
    at::Tensor a = int8_linear(o, w + j);
    j += 4;
    if (flags & SANDWICH) a = add_rms_norm(a, c10::nullopt, w[j++], eps);
    n = add_rms_norm(x, a, w[j++], eps);
    at::Tensor y2 = int8_linear(n, w + j);
    j += 4;
    out = int8_linear((flags & GELU_TANH) ? gelu_tanh_mul(y2) : silu_mul(y2), w + j);
    j += 4;
    if (flags & SANDWICH) out = add_rms_norm(out, c10::nullopt, w[j++], eps);
  }
  if (out.defined()) x.add_(out);
  return x;
}

// ---- What sampling reads of each row of logits, in passes over the row instead of copies and sorts of it ----
// logits (B, V) float32 -> the m largest values of each row and their token ids, largest first (ties: the lower id
// first), (B, m) and (B, m) int64; each row's logsumexp (B,); and whether every value of the row is a finite number
// (B,) bool, tested on the bits (-ffast-math lets the compiler assume finite floats, so isfinite would not test).
static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_logsumexp(const at::Tensor& logits, int64_t m) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat, "top_logsumexp: logits must be (B, V) float32");
  const at::Tensor x = logits.contiguous();
  const int64_t B = x.size(0), V = x.size(1);
  TORCH_CHECK(m > 0 && m <= V, "top_logsumexp: m must be in 1..V");
  at::Tensor values = at::empty({B, m}, x.options()), ids = at::empty({B, m}, x.options().dtype(at::kLong));
  at::Tensor lse = at::empty({B}, x.options()), finite = at::empty({B}, x.options().dtype(at::kBool));
  const float* px = x.data_ptr<float>();
  float* pv = values.data_ptr<float>();
  int64_t* pi = ids.data_ptr<int64_t>();
  float* pl = lse.data_ptr<float>();
  bool* pf = finite.data_ptr<bool>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<std::pair<float, int64_t>> heap;  // the m best so far, the worst on top (a min-heap by value, then id)
    auto worse = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = px + b * V;
      const uint32_t* bits = reinterpret_cast<const uint32_t*>(row);
      uint32_t exponent = 0;  // the largest exponent field: all ones where some value is inf or NaN
      float mx = -FLT_MAX;
      #pragma omp simd reduction(max:exponent) reduction(max:mx)
      for (int64_t i = 0; i < V; ++i) {
        const uint32_t e = bits[i] & 0x7f800000u;
        exponent = e > exponent ? e : exponent;
        mx = fmaxf(mx, row[i]);
      }
      pf[b] = exponent != 0x7f800000u;
      float z = 0.f;
      #pragma omp simd reduction(+:z)
      for (int64_t i = 0; i < V; ++i) z += expf(row[i] - mx);
      pl[b] = mx + logf(z);
      heap.clear();
      for (int64_t i = 0; i < m; ++i) heap.emplace_back(row[i], i);
      std::make_heap(heap.begin(), heap.end(), worse);
      float floor = heap.front().first;  // a value must beat it to enter (equal ones lose: their id is higher)
      for (int64_t c0 = m; c0 < V; c0 += 64) {  // blocks of 64: one vector max each, read one by one only when it beats the floor
        const int64_t c1 = std::min(V, c0 + 64);
        float block = -FLT_MAX;
        #pragma omp simd reduction(max:block)
        for (int64_t i = c0; i < c1; ++i) block = fmaxf(block, row[i]);
        if (block <= floor) continue;
        for (int64_t i = c0; i < c1; ++i) {
          if (row[i] > floor) {
            std::pop_heap(heap.begin(), heap.end(), worse);
            heap.back() = {row[i], i};
            std::push_heap(heap.begin(), heap.end(), worse);
            floor = heap.front().first;
          }
        }
      }
      std::sort_heap(heap.begin(), heap.end(), worse);  // best first
      for (int64_t j = 0; j < m; ++j) {
        pv[b * m + j] = heap[j].first;
        pi[b * m + j] = heap[j].second;
      }
    }
  });
  return {values, ids, lse, finite};
}

TORCH_LIBRARY(slmkit_decode, m) {
  m.def("top_logsumexp(Tensor logits, int m) -> (Tensor, Tensor, Tensor, Tensor)", top_logsumexp);
  m.def("rope_decode_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k, Tensor(b!) v, Tensor lens, Tensor slots, "
        "float scale, int heads, int window=0) -> Tensor", rope_decode_attention);
  m.def("add_rms_norm(Tensor(a!) h, Tensor? delta, Tensor weight, float eps) -> Tensor", add_rms_norm);
  m.def("silu_mul(Tensor y) -> Tensor", silu_mul);
  m.def("gelu_tanh_mul(Tensor y) -> Tensor", gelu_tanh_mul);
  m.def("decode_step(Tensor h, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!) k, Tensor(b!) v, Tensor lens, Tensor slots, "
        "float scale, int heads, float eps, int flags=0, Tensor? cos_local=None, Tensor? sin_local=None, int[] windows=[], "
        "int[] local=[]) -> Tensor", decode_step);
}
