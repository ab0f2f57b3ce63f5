// Fused CPU kernels for lowbit's per-tensor fake quantizers (float32).
//
// Each quantizer is one pass over the tensor forward and one backward, with its autograd rule in
// C++ (no Python per call).  The values are exactly those of lowbit.fake_quant.fake_quantize:
//     code = clamp(round_half_even(x * inv), lo, hi),  x_hat = code * s
// with s a float32 step, inv = float32(1 / s) and [lo, hi] the code range minus the zero point.
// Gradients follow lowbit.fake_quant (straight-through, clipped straight-through, LSQ), with the
// LSQ step gradient accumulated per element as g * (x_hat - x) inside the range and g * x_hat
// outside (the paper's (c - v) s and c s), in double across chunks.
// lowbit.kernels compiles this file on first use; lowbit falls back to its PyTorch code when it
// cannot (no compiler), with the same values.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
#include <atomic>
#include <functional>
#include <vector>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::tensor_list;

constexpr int64_t kGrain = 1 << 14;  // elements per task in at::parallel_for
constexpr float kBiasCodeLimit = 2147483520.0f;  // the largest float32 below 2^31 (fake_quant.BIAS_CODE_LIMIT)
constexpr int kLanes = 16;           // independent float accumulators (vectorisable reduction)
constexpr float kMinScale = 1e-8f;

struct Grid {
  float s, inv, lo, hi;  // step, float32(1/step), code bounds
  float lo_x, hi_x;      // float32(lo * s), float32(hi * s): the range in x-space (strict inside)
};

Grid make_grid(double s, double lo, double hi) {
  Grid g;
  g.s = static_cast<float>(s);
  g.inv = static_cast<float>(1.0 / static_cast<double>(g.s));
  g.lo = static_cast<float>(lo);
  g.hi = static_cast<float>(hi);
  g.lo_x = static_cast<float>(lo * static_cast<double>(g.s));
  g.hi_x = static_cast<float>(hi * static_cast<double>(g.s));
  return g;
}

// The numbers a Function's backward pass needs (grids, factors, flags, the steps' shapes), kept
// as one list under one saved_data key: each saved_data entry is a string-keyed map insert in the
// forward pass and a lookup in the backward pass, which together cost more than a small layer's
// arithmetic.  The backward pass reads them in the order the forward pass added them.
class SaveNumbers {
 public:
  SaveNumbers& add(double v) {
    v_.push_back(v);
    return *this;
  }
  SaveNumbers& grid(double s, double lo, double hi) { return add(s).add(lo).add(hi); }  // make_grid's arguments
  SaveNumbers& shape(at::IntArrayRef dims) {
    add(static_cast<double>(dims.size()));
    for (const int64_t d : dims) add(static_cast<double>(d));
    return *this;
  }
  void into(AutogradContext* ctx) { ctx->saved_data["n"] = v_; }

 private:
  std::vector<double> v_;
};

class SavedNumbers {
 public:
  explicit SavedNumbers(AutogradContext* ctx) : v_(ctx->saved_data["n"].toDoubleList()) {}
  double next() { return v_.get(i_++); }
  bool flag() { return next() != 0.0; }
  Grid grid() {
    const double s = next(), lo = next(), hi = next();
    return make_grid(s, lo, hi);
  }
  std::vector<int64_t> shape() {
    std::vector<int64_t> dims(static_cast<size_t>(next()));
    for (int64_t& d : dims) d = static_cast<int64_t>(next());
    return dims;
  }

 private:
  c10::List<double> v_;
  size_t i_ = 0;
};

inline float code(float x, const Grid& g) {
  float v = std::nearbyint(x * g.inv);  // round half to even (default rounding mode)
  v = v < g.lo ? g.lo : v;              // NaN passes through, as torch.clamp
  return v > g.hi ? g.hi : v;
}

inline bool inside(float x, const Grid& g) { return x > g.lo_x && x < g.hi_x; }

// exp for the tanh below: Cody-Waite reduction and Cephes' degree-6 polynomial (about 1 ulp),
// written so that the compiler vectorises it (torch's CPU build runs tanh unvectorised).  With
// FMA hardware the reduction and the polynomial use fused multiply-adds (explicitly: the file is
// compiled with -ffp-contract=off); without, separate multiplies and adds.  tanh_block (below)
// repeats these steps on 4 vectors at once: change both (test_kernels pins them to the same bits).
#ifdef __FMA__
inline float mul_add(float a, float b, float c) { return std::fma(a, b, c); }
#else
inline float mul_add(float a, float b, float c) { return a * b + c; }
#endif

inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = mul_add(n, -0.693359375f, x);
  r = mul_add(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = mul_add(p, r, 1.3981999507e-3f);
  p = mul_add(p, r, 8.3334519073e-3f);
  p = mul_add(p, r, 4.1665795894e-2f);
  p = mul_add(p, r, 1.6666665459e-1f);
  p = mul_add(p, r, 5.0000001201e-1f);
  p = mul_add(p, r * r, r) + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float tanh_approx(float x) { return 1.0f - 2.0f / (exp_approx(2.0f * x) + 1.0f); }

// the loops, with restrict pointers and the grid by value so that they vectorise
void quantize_span(const float* __restrict__ x, float* __restrict__ out, int64_t n, const Grid g) {
  for (int64_t i = 0; i < n; ++i) out[i] = code(x[i], g) * g.s;
}

#if defined(__AVX2__) && defined(__FMA__)
// tanh_approx (and code) on kTanhVectors vectors of 8 at once, each operation applied to all of
// them before the next: the same operations on each element as the scalar functions (so the same
// bits), interleaved.  The compiler's vectorisation of the scalar loop runs one vector's chain of
// ~25 dependent operations at a time and was latency-bound: 3.3 cycles an element.
constexpr int kTanhVectors = 4;
struct TanhBlock {
  __m256 v[kTanhVectors];
};

inline TanhBlock tanh_block(const float* x) {
  TanhBlock b;
  __m256 p[kTanhVectors], r[kTanhVectors], n[kTanhVectors];
  for (int u = 0; u < kTanhVectors; ++u) {  // exp_approx(2 x), its steps in order
    __m256 y = _mm256_mul_ps(_mm256_set1_ps(2.0f), _mm256_loadu_ps(x + 8 * u));
    y = _mm256_max_ps(_mm256_set1_ps(-87.0f), y);  // (x < -87 ? -87 : x: NaN passes, as max(c, x) does)
    y = _mm256_min_ps(_mm256_set1_ps(88.0f), y);
    n[u] = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_CUR_DIRECTION);
    r[u] = _mm256_fmadd_ps(n[u], _mm256_set1_ps(-0.693359375f), y);
  }
  for (int u = 0; u < kTanhVectors; ++u) r[u] = _mm256_fmadd_ps(n[u], _mm256_set1_ps(2.12194440e-4f), r[u]);
  for (int u = 0; u < kTanhVectors; ++u)
    p[u] = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500e-4f), r[u], _mm256_set1_ps(1.3981999507e-3f));
  for (const float c : {8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    for (int u = 0; u < kTanhVectors; ++u) p[u] = _mm256_fmadd_ps(p[u], r[u], _mm256_set1_ps(c));
  for (int u = 0; u < kTanhVectors; ++u) {
    p[u] = _mm256_add_ps(_mm256_fmadd_ps(p[u], _mm256_mul_ps(r[u], r[u]), r[u]), _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n[u]), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p[u], _mm256_castsi256_ps(bits));
    b.v[u] = _mm256_sub_ps(_mm256_set1_ps(1.0f),
                           _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  }
  return b;
}

inline __m256 code_times_step(__m256 v, const Grid& g) {  // code(v, g) * g.s
  __m256 c = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(g.inv)), _MM_FROUND_CUR_DIRECTION);
  c = _mm256_max_ps(_mm256_set1_ps(g.lo), c);  // (c < lo ? lo : c, NaN passes)
  c = _mm256_min_ps(_mm256_set1_ps(g.hi), c);
  return _mm256_mul_ps(c, _mm256_set1_ps(g.s));
}
constexpr int64_t kTanhBlock = 8 * kTanhVectors;
#else
constexpr int64_t kTanhBlock = 0;
#endif

void tanh_span(const float* __restrict__ x, float* __restrict__ t, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + kTanhBlock <= n; i += kTanhBlock) {
    const TanhBlock b = tanh_block(x + i);
    for (int u = 0; u < kTanhVectors; ++u) _mm256_storeu_ps(t + i + 8 * u, b.v[u]);
  }
#endif
  for (; i < n; ++i) t[i] = tanh_approx(x[i]);
}

void tanh_quantize_span(const float* __restrict__ x, float* __restrict__ t, float* __restrict__ out, int64_t n,
                        const Grid g) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + kTanhBlock <= n; i += kTanhBlock) {
    const TanhBlock b = tanh_block(x + i);
    for (int u = 0; u < kTanhVectors; ++u) {
      _mm256_storeu_ps(t + i + 8 * u, b.v[u]);
      _mm256_storeu_ps(out + i + 8 * u, code_times_step(b.v[u], g));
    }
  }
#endif
  for (; i < n; ++i) {
    const float v = tanh_approx(x[i]);
    t[i] = v;
    out[i] = code(v, g) * g.s;
  }
}

void mask_span(const float* __restrict__ x, const float* __restrict__ gr, float* __restrict__ gx, int64_t n,
               const Grid g) {
  for (int64_t i = 0; i < n; ++i) gx[i] = inside(x[i], g) ? gr[i] : 0.0f;
}

void tanh_mask_span(const float* __restrict__ t, const float* __restrict__ gr, float* __restrict__ gx, int64_t n,
                    const Grid g) {
  for (int64_t i = 0; i < n; ++i) gx[i] = inside(t[i], g) ? gr[i] * (1.0f - t[i] * t[i]) : 0.0f;
}

// the same two, on the incoming gradient in place
void mask_span_inplace(const float* __restrict__ x, float* __restrict__ gr, int64_t n, const Grid g) {
  for (int64_t i = 0; i < n; ++i) gr[i] = inside(x[i], g) ? gr[i] : 0.0f;
}

void tanh_mask_span_inplace(const float* __restrict__ t, float* __restrict__ gr, int64_t n, const Grid g) {
  for (int64_t i = 0; i < n; ++i) gr[i] = inside(t[i], g) ? gr[i] * (1.0f - t[i] * t[i]) : 0.0f;
}

// the mask of the gradient, gx = mask(gr), where gx == gr is allowed (then in place)
inline void mask_into(bool tanh_first, const float* v, const float* gr, float* gx, int64_t n, const Grid& g) {
  if (gx == gr) {
    if (tanh_first)
      tanh_mask_span_inplace(v, gx, n, g);
    else
      mask_span_inplace(v, gx, n, g);
  } else if (tanh_first) {
    tanh_mask_span(v, gr, gx, n, g);
  } else {
    mask_span(v, gr, gx, n, g);
  }
}

// over a span: the sum of g * dx_hat/ds * s (g (x_hat - x) inside the range, g x_hat outside)
// and the number of elements outside the range
struct StepSum {
  double sum;
  int64_t outside;
};

// With TanhMask, also DoReFa's gradient of w through t = tanh(w) (x holds t), tanh_mask_span's
// gx = inside(t) ? gr (1 - t^2) : 0, into gx (which may be gr itself), block by block after each
// block's sum, while the block is in L1.
template <bool TanhMask>
StepSum step_grad_span(const float* __restrict__ x, const float* gr, float* gx, int64_t n, const Grid g) {
  StepSum r{0.0, 0};
  for (int64_t blk = 0; blk < n; blk += 4096) {
    const int64_t end = std::min(n, blk + 4096);
    float acc[kLanes] = {0}, out[kLanes] = {0};
    int64_t i = blk;
    for (; i + kLanes <= end; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = x[i + l];
        const float q = code(v, g) * g.s;
        const float in = inside(v, g) ? 1.0f : 0.0f;  // (arithmetic, not branches: it vectorises)
        acc[l] += gr[i + l] * (q - v * in);
        out[l] += 1.0f - in;
      }
    }
    for (; i < end; ++i) {
      const float q = code(x[i], g) * g.s;
      const bool in = inside(x[i], g);
      r.sum += gr[i] * (in ? q - x[i] : q);
      r.outside += !in;
    }
    for (int l = 0; l < kLanes; ++l) {
      r.sum += acc[l];
      r.outside += static_cast<int64_t>(out[l]);
    }
    if (TanhMask) {
      if (gx == gr)
        tanh_mask_span_inplace(x + blk, gx + blk, end - blk, g);
      else
        tanh_mask_span(x + blk, gr + blk, gx + blk, end - blk, g);
    }
  }
  return r;
}

// step_grad_span over a whole tensor in parallel chunks; with gx given, DoReFa's masked tanh
// gradient written into it in the same pass
StepSum step_sum(const float* x, const float* gr, int64_t n, const Grid& g, float* gx = nullptr) {
  return at::parallel_reduce(
      0, n, kGrain, StepSum{0.0, 0},
      [&](int64_t b, int64_t e, StepSum acc) {
        const StepSum part = gx != nullptr ? step_grad_span<true>(x + b, gr + b, gx + b, e - b, g)
                                           : step_grad_span<false>(x + b, gr + b, nullptr, e - b, g);
        return StepSum{acc.sum + part.sum, acc.outside + part.outside};
      },
      [](StepSum a, StepSum b) { return StepSum{a.sum + b.sum, a.outside + b.outside}; });
}

float* fptr(Tensor& t) { return t.data_ptr<float>(); }
const float* cfptr(const Tensor& t) { return t.data_ptr<float>(); }

Tensor as_f32(const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32,
              "lowbit fused kernels take float32 CPU tensors, got ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
}

std::atomic<int64_t> g_reused_grads{0};  // gradients written in place (reused_grads(), for the tests)

// The incoming gradient grads[i], when this backward pass may write its result into it (as PyTorch's
// AccumulateGrad steals a gradient): nobody else holds the tensor or its memory (a tensor hook that
// kept it, or a gradient shared with another node, holds a reference; a view counts its base),
// float32, contiguous, on the CPU, x's shape.  Else an undefined tensor.  Call it before taking
// any other reference.  (grads is the backward's list taken by reference: PyTorch's CppNode moves
// the engine's buffer into the list it passes.)
Tensor writable_grad(tensor_list& grads, size_t i, const Tensor& x) {
  const Tensor& gr = grads[i];
  if (!gr.defined() || gr.use_count() != 1) return Tensor();
  // a view (a Linear weight's gradient arrives as one) whose base only the view itself keeps
  const bool alone = gr.is_view() ? gr._base().use_count() == 1 && gr.storage().use_count() == 2
                                  : gr.storage().use_count() == 1;
  if (alone && gr.device().is_cpu() && gr.scalar_type() == torch::kFloat32 && gr.is_contiguous() && !gr.requires_grad() &&
      gr.sizes().equals(x.sizes()))
    return gr;
  return Tensor();
}

// the tensor a backward pass writes x's gradient into: own (from writable_grad) where defined
Tensor grad_output(const Tensor& own, const Tensor& x) {
  if (!own.defined()) return torch::empty_like(x);
  g_reused_grads.fetch_add(1, std::memory_order_relaxed);
  return own;
}

// The kernels' backward passes are first-order: their gradients are computed, not recorded.  In a
// backward pass that builds a graph (create_graph=True: a gradient penalty, a Hessian-vector
// product), that would silently cut the second-order path; raise instead, naming the fix.
void first_order_only() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "lowbit's fused CPU kernels compute first-order gradients only, and this backward pass builds a "
              "graph for a second-order one (create_graph=True, e.g. a gradient penalty): run the model inside "
              "`with lowbit.tensor_path():` (PyTorch's differentiable operations, the same values) or set "
              "LOWBIT_KERNELS=0");
}

// ---------------------------------------------------------------------------------------------
// straight-through (weights of QAT/PTQ) and clipped straight-through (activations)

Tensor fq_forward(const Tensor& x, const Grid& g) {
  Tensor out = torch::empty_like(x);
  const float* xp = cfptr(x);
  float* op = fptr(out);
  at::parallel_for(0, x.numel(), kGrain, [=](int64_t b, int64_t e) { quantize_span(xp + b, op + b, e - b, g); });
  return out;
}

struct STEFn : public Function<STEFn> {
  static Tensor forward(AutogradContext*, const Tensor& x, double s, double lo, double hi) {
    return fq_forward(as_f32(x), make_grid(s, lo, hi));
  }
  static tensor_list backward(AutogradContext*, tensor_list& grads) {
    return {grads[0], Tensor(), Tensor(), Tensor()};
  }
};

struct ClippedFn : public Function<ClippedFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, double s, double lo, double hi) {
    Tensor x = as_f32(x_in);
    SaveNumbers().grid(s, lo, hi).into(ctx);
    ctx->save_for_backward({x});
    return fq_forward(x, make_grid(s, lo, hi));
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list& grads) {
    first_order_only();
    Tensor x = ctx->get_saved_variables()[0];
    const Grid g = SavedNumbers(ctx).grid();
    const Tensor own = writable_grad(grads, 0, x);
    Tensor go = own.defined() ? own : grads[0].contiguous();
    Tensor gx = grad_output(own, x);
    const float *xp = cfptr(x), *gp = cfptr(go);
    float* gxp = fptr(gx);
    at::parallel_for(0, x.numel(), kGrain,
                     [=](int64_t b, int64_t e) { mask_into(false, xp + b, gp + b, gxp + b, e - b, g); });
    return {gx.view(grads[0].sizes()), Tensor(), Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// LSQ (per-tensor step, zero point 0), optionally on tanh(x) (DoReFa's learned variant)

// a one-element step's value: read in place from a float32 CPU tensor (item() dispatches an
// operator: more than the quantization of a small layer costs)
float step_value(const Tensor& scale) {
  if (scale.is_cpu() && scale.scalar_type() == at::kFloat && scale.numel() == 1) return *scale.const_data_ptr<float>();
  return scale.item<float>();
}

Grid lsq_grid(const Tensor& scale, int64_t qmin, int64_t qmax, double* sign) {
  const float raw = step_value(scale);
  float s = std::fabs(raw);
  s = s < kMinScale ? kMinScale : s;
  *sign = raw < 0 ? -1.0 : 1.0;
  return make_grid(s, static_cast<double>(qmin), static_cast<double>(qmax));
}

struct LSQFn : public Function<LSQFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& scale, int64_t qmin, int64_t qmax,
                        double grad_factor, bool tanh_first) {
    Tensor x = as_f32(x_in);
    double sign = 1.0;
    const Grid g = lsq_grid(scale, qmin, qmax, &sign);
    Tensor out = torch::empty_like(x);
    const float* xp = cfptr(x);
    float* op = fptr(out);
    Tensor saved = x;
    if (tanh_first) {
      saved = torch::empty_like(x);  // t = tanh(x), needed by the backward pass
      float* tp = fptr(saved);
      at::parallel_for(0, x.numel(), kGrain,
                       [=](int64_t b, int64_t e) { tanh_quantize_span(xp + b, tp + b, op + b, e - b, g); });
    } else {
      at::parallel_for(0, x.numel(), kGrain, [=](int64_t b, int64_t e) { quantize_span(xp + b, op + b, e - b, g); });
    }
    SaveNumbers()
        .grid(g.s, static_cast<double>(qmin), static_cast<double>(qmax))
        .add(grad_factor * sign / static_cast<double>(g.s))
        .add(tanh_first)
        .shape(scale.sizes())
        .into(ctx);
    ctx->save_for_backward({saved});
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list& grads) {
    first_order_only();
    Tensor v = ctx->get_saved_variables()[0];  // x, or tanh(x)
    SavedNumbers saved(ctx);
    const Grid g = saved.grid();
    const double factor = saved.next();
    const bool tanh_first = saved.flag();
    const std::vector<int64_t> s_shape = saved.shape();
    const bool want_x = ctx->needs_input_grad(0), want_s = ctx->needs_input_grad(1);
    Tensor own = want_x ? writable_grad(grads, 0, v) : Tensor();  // x's gradient may go into it
    Tensor go = own.defined() ? own : grads[0].contiguous();
    const float *vp = cfptr(v), *gp = cfptr(go);
    const int64_t n = v.numel();
    Tensor gx;
    float* gxp = nullptr;
    auto alloc_gx = [&]() {
      gx = grad_output(own, v);
      gxp = fptr(gx);
    };
    auto mask = [&gxp, vp, gp, g, tanh_first](int64_t b, int64_t e) {
      mask_into(tanh_first, vp + b, gp + b, gxp + b, e - b, g);
    };
    // One read pass for the step's sum and the count of clipped elements.  LSQ on x: when nothing
    // is clipped (the usual case for weights) the input gradient is the incoming one, unwritten.
    // On tanh(x) the input gradient has a factor 1 - t^2 everywhere: written in the same pass (in
    // place into the incoming gradient where that is ours to write).
    if (want_x && tanh_first) alloc_gx();
    StepSum total{0.0, 0};
    if (want_s) total = step_sum(vp, gp, n, g, gxp);  // (gxp set: tanh_first's gradient, written too)
    if (want_x) {
      if (!tanh_first && want_s && total.outside == 0) {
        gx = grads[0];
      } else {
        if (!tanh_first) alloc_gx();
        if (!tanh_first || !want_s) at::parallel_for(0, n, kGrain, mask);
        gx = gx.view(grads[0].sizes());
      }
    }
    Tensor scale_grad;
    if (want_s) {
      scale_grad = torch::full(s_shape, static_cast<float>(total.sum) * factor, torch::kFloat32);
    }
    return {gx, scale_grad, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// The sparse step sum of QuantLinearFn (below) for a first layer's LSQ input.

constexpr double kSparseMaxDensity = 0.5;  // above this fraction of nonzero d: the dense product
constexpr int kChunkVectors = 8;           // 8 floats a vector: chunks of at most 64 rows of W

struct Residuals {  // the nonzero d, row by row: row m holds count[m] entries from m * n on
  int64_t rows = 0, n = 0, nnz = 0;
  const int32_t *count = nullptr, *col = nullptr;
  const float* val = nullptr;
};

// scratch memory kept per thread across calls (no allocation, no fresh pages, per backward pass)
template <typename T>
T* scratch(std::vector<T>& v, size_t size) {
  if (v.size() < size) v.resize(size);
  return v.data();
}

#ifdef __AVX2__
struct PackTable {  // for each 8-bit mask, the lanes that are set, first: a left-pack permutation
  alignas(32) int32_t lanes[256][8];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int b = 0; b < 8; ++b)
        if ((m >> b) & 1) lanes[m][k++] = b;
      while (k < 8) lanes[m][k++] = 0;
    }
  }
};
const PackTable kPack;
#endif

// the nonzero d of one row: d = x_hat - x inside the range, x_hat outside
int32_t row_residuals(const float* __restrict__ xr, const float* __restrict__ qr, int64_t n, const Grid& g,
                      int32_t* __restrict__ col, float* __restrict__ val) {
  int32_t k = 0;
  int64_t j = 0;
#ifdef __AVX2__
  const __m256 lo = _mm256_set1_ps(g.lo_x), hi = _mm256_set1_ps(g.hi_x), zero = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 xv = _mm256_loadu_ps(xr + j);
    const __m256 in = _mm256_and_ps(_mm256_cmp_ps(xv, lo, _CMP_GT_OQ), _mm256_cmp_ps(xv, hi, _CMP_LT_OQ));
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(qr + j), _mm256_and_ps(xv, in));  // q - x, or q - 0
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(d, zero, _CMP_NEQ_UQ));
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.lanes[mask]));
    _mm256_storeu_ps(val + k, _mm256_permutevar8x32_ps(d, lanes));  // (k + 8 <= j + 8 <= n)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(col + k),
                        _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(j)), lanes));
    k += __builtin_popcount(static_cast<unsigned>(mask));
  }
#endif
  for (; j < n; ++j) {
    const float d = inside(xr[j], g) ? qr[j] - xr[j] : qr[j];
    col[k] = static_cast<int32_t>(j);
    val[k] = d;
    k += d != 0.0f;
  }
  return k;
}

Residuals step_residuals(const float* x, const float* xh, int64_t rows, int64_t n, const Grid& g) {
  thread_local std::vector<int32_t> counts, cols;
  thread_local std::vector<float> vals;
  int32_t *cnt = scratch(counts, rows), *col = scratch(cols, rows * n);
  float* val = scratch(vals, rows * n);
  at::parallel_for(0, rows, 16, [=](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) cnt[m] = row_residuals(x + m * n, xh + m * n, n, g, col + m * n, val + m * n);
  });
  Residuals r{rows, n, 0, cnt, col, val};
  for (int64_t m = 0; m < rows; ++m) r.nnz += cnt[m];
  return r;
}

// buf[j * width + c] = w[(k0 + c) * n + j] for c < rows, 0 for rows <= c < width
void transpose_rows(const float* w, int64_t n, int64_t k0, int64_t rows, int64_t width, float* buf) {
  const float* src = w + k0 * n;
  int64_t j = 0;
#ifdef __AVX2__
  const int64_t rows8 = rows / 8 * 8;
  for (; j + 8 <= n; j += 8) {  // 8 columns of w at a time: 8 whole rows of buf
    for (int64_t c = 0; c < rows8; c += 8) {
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (c + i) * n + j);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int h = 0; h < 8; h += 4) {
        u[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);
        u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);
        u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
        u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(buf + (j + i) * width + c, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(buf + (j + i + 4) * width + c, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
    for (int64_t i = 0; i < 8; ++i) {
      float* b = buf + (j + i) * width;
      for (int64_t c = rows8; c < rows; ++c) b[c] = src[c * n + j + i];
      for (int64_t c = rows; c < width; ++c) b[c] = 0.0f;
    }
  }
#endif
  for (; j < n; ++j) {
    float* b = buf + j * width;
    for (int64_t c = 0; c < rows; ++c) b[c] = src[c * n + j];
    for (int64_t c = rows; c < width; ++c) b[c] = 0.0f;
  }
}

// sum over rows m of G[m, k0:k0+rows] . (sum_i val_i buf[col_i]), V vectors of 8 floats wide
template <int V>
double chunk_step_sum(const Residuals& d, const float* buf, const float* go, int64_t k, int64_t k0, int64_t rows) {
  constexpr int W = 8 * V;
  double total = 0.0;
  for (int64_t m = 0; m < d.rows; ++m) {
    const int32_t* col = d.col + m * d.n;
    const float* val = d.val + m * d.n;
    const int32_t cnt = d.count[m];
    float acc[W] = {0}, gpad[W] = {0};
    for (int64_t c = 0; c < rows; ++c) gpad[c] = go[m * k + k0 + c];
#ifdef __AVX2__
    __m256 a[V];
    for (int v = 0; v < V; ++v) a[v] = _mm256_setzero_ps();
    for (int32_t i = 0; i < cnt; ++i) {
      const float* b = buf + static_cast<int64_t>(col[i]) * W;
      const __m256 s = _mm256_set1_ps(val[i]);
      for (int v = 0; v < V; ++v) a[v] = _mm256_fmadd_ps(s, _mm256_loadu_ps(b + 8 * v), a[v]);
    }
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(acc + 8 * v, a[v]);
#else
    for (int32_t i = 0; i < cnt; ++i) {
      const float* b = buf + static_cast<int64_t>(col[i]) * W;
      for (int c = 0; c < W; ++c) acc[c] += val[i] * b[c];
    }
#endif
    float dot = 0.0f;
    for (int c = 0; c < W; ++c) dot += acc[c] * gpad[c];
    total += dot;
  }
  return total;
}

using ChunkFn = double (*)(const Residuals&, const float*, const float*, int64_t, int64_t, int64_t);
constexpr ChunkFn kChunkFns[kChunkVectors] = {chunk_step_sum<1>, chunk_step_sum<2>, chunk_step_sum<3>,
                                              chunk_step_sum<4>, chunk_step_sum<5>, chunk_step_sum<6>,
                                              chunk_step_sum<7>, chunk_step_sum<8>};

// sum_{m,j} d_mj (G W)_mj for G [rows, k], W [k, n]; chunks of W's rows run in parallel
double sparse_step_sum(const Residuals& d, const Tensor& go, const Tensor& w) {
  const int64_t k = w.size(0), n = w.size(1);
  const int64_t vectors = (k + 7) / 8;
  int64_t chunks = (vectors + kChunkVectors - 1) / kChunkVectors;
  const int64_t threads = at::get_num_threads();
  chunks = std::min(vectors, (chunks + threads - 1) / threads * threads);  // whole rounds of threads
  const float *gp = cfptr(go), *wp = cfptr(w);
  return at::parallel_reduce(
      0, chunks, 1, 0.0,
      [&](int64_t b, int64_t e, double acc) {
        thread_local std::vector<float> store;
        for (int64_t c = b; c < e; ++c) {
          // chunk c covers vectors [v0, v1): the first (vectors % chunks) chunks get one more
          const int64_t base = vectors / chunks, extra = vectors % chunks;
          const int64_t v0 = c * base + std::min(c, extra), v1 = v0 + base + (c < extra ? 1 : 0);
          const int64_t k0 = 8 * v0, rows = std::min(k, 8 * v1) - k0, width = 8 * (v1 - v0);
          float* buf = scratch(store, n * width);
          transpose_rows(wp, n, k0, rows, width, buf);
          acc += kChunkFns[v1 - v0 - 1](d, buf, gp, k, k0, rows);
        }
        return acc;
      },
      std::plus<double>());
}

// LSQ's backward pass written into gr, the gradient of x_hat (this pass's own tensor), for v = x
// (or tanh(x)): x's gradient where want_grad (masked outside the range, times 1 - t^2 on tanh),
// and the step's sum where want_s.  The same arithmetic as LSQFn's backward.
double lsq_backward_into(const Tensor& v, Tensor& gr, bool want_grad, bool want_s, bool tanh_first, const Grid& g) {
  const float* vp = cfptr(v);
  float* gp = fptr(gr);
  const int64_t n = v.numel();
  auto mask = [=](int64_t b, int64_t e) { mask_into(tanh_first, vp + b, gp + b, gp + b, e - b, g); };
  const bool mask_in_sum = want_grad && tanh_first;  // (1 - t^2 everywhere: written by the sum's pass)
  StepSum total{0.0, 0};
  if (want_s) total = step_sum(vp, gp, n, g, mask_in_sum ? gp : nullptr);
  // LSQ on x with nothing clipped (the usual case for weights): the gradient passes unchanged
  if (want_grad && !(want_s && (tanh_first || total.outside == 0))) at::parallel_for(0, n, kGrain, mask);
  return total.sum;
}

// A Linear layer on fake-quantized operands in one autograd node: y = x_hat W_hat^T + b.
// Input: LSQ (a learned per-tensor step: x_scale given, codes [x_lo, x_hi]) or a fixed grid
// (step x_s, codes [x_lo, x_hi], the clipped straight-through gradient: DoReFa's activations).
// Weight: LSQ (w_scale given; on tanh(W) with w_tanh: DoReFa's learned variant), a fixed grid (step
// w_s > 0, codes [w_qmin, w_qmax], straight-through: QAT's and PTQ's current range) or as it is.
// Values and gradients are those of the quantizers' own functions followed by F.linear (the
// same kernels, the same products: G^T x_hat for W_hat, G W_hat for x_hat), bit for bit, except
// the input step's gradient when the input needs no gradient (a model's first layer, fed with
// data): the step's sum
//     sum_{m,j} d_mj (G W_hat)_mj,   d = x_hat - x inside the range, x_hat outside,  G = dL/dy
// then does not need the dense product G W_hat (as large as the layer's forward GEMM): d is zero
// wherever x is 0 or on the grid, so only its nonzeros are visited (MNIST: ~19% of the pixels).
// The sum is regrouped as sum_m G_m . (sum_j d_mj W_hat[:, j]) over chunks of W_hat's rows; each
// chunk is transposed into a buffer that stays in L2 while every row m visits its nonzeros: the
// same sum in another order (float32 partial sums per row and chunk, a double total).  Dense
// inputs take the dense product.
struct QuantLinearFn : public Function<QuantLinearFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& weight_in,
                        const c10::optional<Tensor>& bias, const c10::optional<Tensor>& x_scale, double x_s, double x_lo,
                        double x_hi, double x_gf, const c10::optional<Tensor>& w_scale, int64_t w_qmin, int64_t w_qmax,
                        double w_gf, bool w_tanh, double w_s, bool round_bias) {
    Tensor x = as_f32(x_in);
    TORCH_CHECK(x.dim() == 2 && weight_in.dim() == 2 && weight_in.size(1) == x.size(1),
                "quantized linear takes x [rows, in] and weight [out, in]");
    const bool learn_x = x_scale.has_value() && x_scale->defined();
    double sign = 1.0;
    const Grid g = learn_x ? lsq_grid(*x_scale, static_cast<int64_t>(x_lo), static_cast<int64_t>(x_hi), &sign)
                           : make_grid(x_s, x_lo, x_hi);
    Tensor xh = fq_forward(x, g);
    // saved: the input's grid, learn_x, [its factor and step shape], quant_w, [the weight's grid,
    // factor, tanh, step shape], has_bias
    SaveNumbers numbers;
    numbers.grid(g.s, x_lo, x_hi).add(learn_x);
    if (learn_x) numbers.add(x_gf * sign / static_cast<double>(g.s)).shape(x_scale->sizes());
    const bool quant_w = w_scale.has_value() && w_scale->defined();
    numbers.add(quant_w);
    Tensor wh = weight_in, wv;  // wv: W, or tanh(W), what the weight's backward pass reads
    float w_step = 0.0f;        // the weight grid's step (0: the weight is not quantized)
    if (quant_w) {
      Tensor w = as_f32(weight_in);
      double w_sign = 1.0;
      const Grid gw = lsq_grid(*w_scale, w_qmin, w_qmax, &w_sign);
      w_step = gw.s;
      wh = torch::empty_like(w);
      const float* wp = cfptr(w);
      float* op = fptr(wh);
      wv = w;
      if (w_tanh) {
        wv = torch::empty_like(w);
        float* tp = fptr(wv);
        at::parallel_for(0, w.numel(), kGrain,
                         [=](int64_t b, int64_t e) { tanh_quantize_span(wp + b, tp + b, op + b, e - b, gw); });
      } else {
        at::parallel_for(0, w.numel(), kGrain, [=](int64_t b, int64_t e) { quantize_span(wp + b, op + b, e - b, gw); });
      }
      numbers.grid(gw.s, static_cast<double>(w_qmin), static_cast<double>(w_qmax))
          .add(w_gf * w_sign / static_cast<double>(gw.s))
          .add(w_tanh)
          .shape(w_scale->sizes());
    }
    if (!quant_w && w_s > 0.0) {  // (its backward passes the gradient straight through: nothing saved)
      const Grid gw = make_grid(w_s, static_cast<double>(w_qmin), static_cast<double>(w_qmax));
      wh = fq_forward(as_f32(weight_in), gw);
      w_step = gw.s;
    }
    const bool has_bias = bias.has_value() && bias->defined();
    numbers.add(has_bias).into(ctx);
    ctx->save_for_backward({x, xh, wh, wv});
    if (round_bias && has_bias && w_step > 0.0f) {
      // the bias on its int32 grid of step s_in * s_w, what an integer GEMM adds (gradient: straight
      // through, the backward pass's sum of G as for the float bias); lowbit.fake_quant.round_bias's
      // float32 arithmetic, operation by operation
      Tensor b = as_f32(*bias).contiguous();
      Tensor bh = torch::empty_like(b);
      const float step = g.s * w_step;
      const float* bp = cfptr(b);
      float* hp = fptr(bh);
      for (int64_t i = 0; i < b.numel(); ++i) {
        float q = std::nearbyint(bp[i] / step);
        q = q < -kBiasCodeLimit ? -kBiasCodeLimit : (q > kBiasCodeLimit ? kBiasCodeLimit : q);
        hp[i] = q * step;
      }
      return torch::linear(xh, wh, bh);
    }
    return torch::linear(xh, wh, bias);  // what F.linear computes, unfused
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    first_order_only();
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &xh = saved[1], &wh = saved[2];
    SavedNumbers numbers(ctx);
    const Grid g = numbers.grid();
    const bool learn_x = numbers.flag();
    const double factor = learn_x ? numbers.next() : 0.0;
    const std::vector<int64_t> s_shape = learn_x ? numbers.shape() : std::vector<int64_t>();
    const bool quant_w = numbers.flag();
    Grid gwg{};
    double w_factor = 0.0;
    bool w_tanh = false;
    std::vector<int64_t> ws_shape;
    if (quant_w) {
      gwg = numbers.grid();
      w_factor = numbers.next();
      w_tanh = numbers.flag();
      ws_shape = numbers.shape();
    }
    const bool has_bias = numbers.flag();
    // (needs_input_grad counts the tensor arguments that are given: x, weight, [bias], [x_scale], [w_scale])
    const size_t s_edge = 2 + has_bias, ws_edge = s_edge + learn_x;
    const bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1);
    const bool want_b = has_bias && ctx->needs_input_grad(2);
    const bool want_s = learn_x && ctx->needs_input_grad(s_edge), want_ws = quant_w && ctx->needs_input_grad(ws_edge);
    Tensor go = grads[0].contiguous();
    Tensor gx, gw, gb, gs, gws;
    if (want_w || want_ws) {
      gw = at::mm(go.t(), xh);  // as linear's autograd computes it (G^T x_hat)
      if (quant_w) {
        const double sum = lsq_backward_into(saved[3], gw, want_w, want_ws, w_tanh, gwg);
        if (want_ws) gws = torch::full(ws_shape, static_cast<float>(sum) * w_factor, torch::kFloat32);
        if (!want_w) gw = Tensor();
      }
    }
    if (want_b) gb = go.sum(0);
    if (want_x || want_s) {
      double sum = 0.0;
      Residuals d;
      bool sparse = false;
      if (!want_x) {
        d = step_residuals(cfptr(x), cfptr(xh), x.size(0), x.size(1), g);
        sparse = static_cast<double>(d.nnz) <= kSparseMaxDensity * static_cast<double>(x.numel());
      }
      if (sparse) {
        sum = sparse_step_sum(d, go, wh.contiguous());
      } else {  // the unfused path: dL/dx_hat = G W_hat, then the quantizer's backward on it
        gx = at::mm(go, wh);
        if (learn_x) {
          sum = lsq_backward_into(x, gx, want_x, want_s, false, g);
        } else {
          const float* xp = cfptr(x);
          float* gp = fptr(gx);
          at::parallel_for(0, x.numel(), kGrain,
                           [=](int64_t b, int64_t e) { mask_span_inplace(xp + b, gp + b, e - b, g); });
        }
        if (!want_x) gx = Tensor();
      }
      if (want_s) gs = torch::full(s_shape, static_cast<float>(sum) * factor, torch::kFloat32);
    }
    return {gx, gw, gb, gs, Tensor(), Tensor(), Tensor(), Tensor(), gws, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// range quantizers (QAT, PTQ): observe the tensor's min/max, update the tracked range, compute the
// grid and quantize, in one call.  The arithmetic mirrors lowbit.methods.base.RangeQuantizer's
// Python path (_observe_py and fake_quant.affine_qparams_f32) operation by operation: doubles
// rounded to float32 where that code calls f32(), Python's min/max argument order, round half
// to even.  This file is compiled with -ffp-contract=off so no multiply-add is fused.

struct MinMax {
  float lo, hi;
  bool nan;
};

MinMax minmax_span(const float* __restrict__ x, int64_t n) {
  MinMax r{INFINITY, -INFINITY, false};
  int64_t i = 0;
#ifdef __AVX2__
  // (gcc does not vectorise a NaN-exact min/max; AVX's min/max with a separate unordered test)
  __m256 lo = _mm256_set1_ps(INFINITY), hi = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    lo = _mm256_min_ps(lo, v);
    hi = _mm256_max_ps(hi, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  alignas(32) float l8[8], h8[8], b8[8];
  _mm256_store_ps(l8, lo);
  _mm256_store_ps(h8, hi);
  _mm256_store_ps(b8, bad);
  for (int l = 0; l < 8; ++l) {
    r.lo = l8[l] < r.lo ? l8[l] : r.lo;
    r.hi = h8[l] > r.hi ? h8[l] : r.hi;
    r.nan = r.nan || b8[l] != 0.0f;
  }
#endif
  for (; i < n; ++i) {
    r.lo = x[i] < r.lo ? x[i] : r.lo;
    r.hi = x[i] > r.hi ? x[i] : r.hi;
    r.nan = r.nan || x[i] != x[i];
  }
  return r;
}

MinMax minmax(const Tensor& x) {
  const float* xp = cfptr(x);
  MinMax r = at::parallel_reduce(
      0, x.numel(), kGrain, MinMax{INFINITY, -INFINITY, false},
      [=](int64_t b, int64_t e, MinMax acc) {
        MinMax m = minmax_span(xp + b, e - b);
        return MinMax{m.lo < acc.lo ? m.lo : acc.lo, m.hi > acc.hi ? m.hi : acc.hi, m.nan || acc.nan};
      },
      [](MinMax a, MinMax b) { return MinMax{a.lo < b.lo ? a.lo : b.lo, a.hi > b.hi ? a.hi : b.hi, a.nan || b.nan}; });
  if (r.nan) r.lo = r.hi = NAN;
  return r;
}

constexpr const char* kNanMessage =
    "the tensor to quantize contains NaN: training has diverged (lower the learning rate, or check the input data)";
constexpr const char* kInfMessage =
    "the tensor to quantize contains inf: its range would be infinite and every later output NaN "
    "(training has diverged, or the input holds inf: lower the learning rate, or check the input data)";

inline double f32(double v) { return static_cast<double>(static_cast<float>(v)); }
inline double py_min(double a, double b) { return b < a ? b : a; }  // Python's min(a, b)
inline double py_max(double a, double b) { return b > a ? b : a; }  // Python's max(a, b)
constexpr double kMinScaleF32 = static_cast<double>(kMinScale);

enum Tracking : int64_t { kCurrent = 0, kEma = 1, kMinMaxTracking = 2 };

struct RangeState {  // what range_quant returns to Python besides its output, and the grid's codes
  double tmin, tmax, scale;
  int64_t zp;
  double inv;
  bool clamp;
  double lo_c, hi_c;  // the grid's codes relative to the zero point: [qmin - zp, qmax - zp]
};

RangeState range_observe(const Tensor& x, bool has_prev, double prev_lo, double prev_hi, int64_t tracking,
                         double decay, int64_t qmin, int64_t qmax, bool symmetric) {
  TORCH_CHECK(x.numel() > 0, "cannot observe the range of an empty tensor");
  const MinMax m = minmax(x);
  TORCH_CHECK_VALUE(!m.nan, kNanMessage);
  TORCH_CHECK_VALUE(std::isfinite(m.lo) && std::isfinite(m.hi), kInfMessage);
  const double lo = m.lo, hi = m.hi;
  double tmin = lo, tmax = hi;
  if (has_prev && tracking == kEma) {
    const double w = 1.0 - decay;
    tmin = f32(prev_lo + w * (lo - prev_lo));
    tmax = f32(prev_hi + w * (hi - prev_hi));
  } else if (has_prev && tracking == kMinMaxTracking) {
    tmin = py_min(prev_lo, lo);
    tmax = py_max(prev_hi, hi);
  }
  // affine_qparams_f32
  const double l = py_min(f32(tmin), 0.0), h = py_max(f32(tmax), 0.0);
  double scale;
  int64_t zp = 0;
  if (symmetric) {
    const double amax = qmin < 0 ? py_max(-l, h) : h;
    scale = py_max(f32(amax / static_cast<double>(qmax)), kMinScaleF32);
  } else {
    scale = py_max(f32(f32(h - l) / static_cast<double>(qmax - qmin)), kMinScaleF32);
    zp = qmin - static_cast<int64_t>(std::nearbyint(f32(l / scale)));
    zp = std::min(std::max(zp, qmin), qmax);
  }
  const double inv = f32(1.0 / scale);
  bool clamp = true;
  if (tracking == kCurrent) {
    const int64_t zpc = symmetric ? 0 : zp;
    clamp = static_cast<int64_t>(std::nearbyint(f32(lo * inv))) + zpc < qmin ||
            static_cast<int64_t>(std::nearbyint(f32(hi * inv))) + zpc > qmax;
  }
  const double zq = symmetric ? 0.0 : static_cast<double>(zp);
  return RangeState{tmin, tmax, scale, zp, inv, clamp, static_cast<double>(qmin) - zq, static_cast<double>(qmax) - zq};
}

py::tuple range_quant(const Tensor& x_in, bool has_prev, double prev_lo, double prev_hi, int64_t tracking,
                      double decay, int64_t qmin, int64_t qmax, bool symmetric) {
  Tensor x = as_f32(x_in);
  const RangeState r = range_observe(x, has_prev, prev_lo, prev_hi, tracking, decay, qmin, qmax, symmetric);
  // weights (current range): straight-through; activations: clipped straight-through
  Tensor out = tracking == kCurrent ? STEFn::apply(x, r.scale, r.lo_c, r.hi_c)
                                    : ClippedFn::apply(x, r.scale, r.lo_c, r.hi_c);
  return py::make_tuple(out, r.tmin, r.tmax, r.scale, r.zp, r.inv, r.clamp);
}

// range_quant's observation alone (for a fused layer call, which quantizes on this grid)
py::tuple range_grid(const Tensor& x_in, bool has_prev, double prev_lo, double prev_hi, int64_t tracking,
                     double decay, int64_t qmin, int64_t qmax, bool symmetric) {
  const RangeState r = range_observe(as_f32(x_in), has_prev, prev_lo, prev_hi, tracking, decay, qmin, qmax, symmetric);
  return py::make_tuple(r.tmin, r.tmax, r.scale, r.zp, r.inv, r.clamp);
}

Tensor ste(const Tensor& x, double s, double lo, double hi) { return STEFn::apply(x, s, lo, hi); }
Tensor clipped(const Tensor& x, double s, double lo, double hi) { return ClippedFn::apply(x, s, lo, hi); }
Tensor lsq(const Tensor& x, const Tensor& scale, int64_t qmin, int64_t qmax, double grad_factor, bool tanh_first) {
  return LSQFn::apply(x, scale, qmin, qmax, grad_factor, tanh_first);
}
Tensor lsq_linear(const Tensor& x, const Tensor& scale, const Tensor& weight, const c10::optional<Tensor>& bias,
                  int64_t qmin, int64_t qmax, double grad_factor, const c10::optional<Tensor>& w_scale, int64_t w_qmin,
                  int64_t w_qmax, double w_grad_factor, bool w_tanh, double w_s, bool round_bias) {
  return QuantLinearFn::apply(x, weight, bias, scale, 0.0, static_cast<double>(qmin), static_cast<double>(qmax),
                              grad_factor, w_scale, w_qmin, w_qmax, w_grad_factor, w_tanh, w_s, round_bias);
}
Tensor clipped_linear(const Tensor& x, double s, double lo, double hi, const Tensor& weight,
                      const c10::optional<Tensor>& bias, const c10::optional<Tensor>& w_scale, int64_t w_qmin,
                      int64_t w_qmax, double w_grad_factor, bool w_tanh, double w_s, bool round_bias) {
  return QuantLinearFn::apply(x, weight, bias, c10::nullopt, s, lo, hi, 0.0, w_scale, w_qmin, w_qmax, w_grad_factor,
                              w_tanh, w_s, round_bias);
}
Tensor tanh_forward(const Tensor& x_in) {
  Tensor x = as_f32(x_in);
  Tensor out = torch::empty_like(x);
  const float* xp = cfptr(x);
  float* op = fptr(out);
  at::parallel_for(0, x.numel(), kGrain, [=](int64_t b, int64_t e) { tanh_span(xp + b, op + b, e - b); });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit's fused CPU fake-quantization kernels (float32, per-tensor)";
  m.def("reused_grads", []() { return g_reused_grads.load(); },
        "how many backward passes have written their input gradient into the incoming one");
  m.def("ste", &ste, "fake-quantize, straight-through gradient", py::arg("x"), py::arg("s"), py::arg("lo"), py::arg("hi"));
  m.def("clipped", &clipped, "fake-quantize, clipped straight-through gradient", py::arg("x"), py::arg("s"),
        py::arg("lo"), py::arg("hi"));
  m.def("lsq", &lsq, "LSQ fake quantization with a learned per-tensor step", py::arg("x"), py::arg("scale"),
        py::arg("qmin"), py::arg("qmax"), py::arg("grad_factor"), py::arg("tanh_first") = false);
  m.def("lsq_linear", &lsq_linear,
        "linear(x_hat, w_hat, bias) in one autograd node, x_hat the LSQ fake quantization of x [rows, in] "
        "(per-tensor step), w_hat the weight's LSQ fake quantization when w_scale is given, its straight-through "
        "fake quantization on the fixed grid (w_s, codes [w_qmin, w_qmax]) when w_s > 0, else the weight; "
        "the step's gradient skips the dense dL/dx_hat when x needs no gradient",
        py::arg("x"), py::arg("scale"), py::arg("weight"), py::arg("bias"), py::arg("qmin"), py::arg("qmax"),
        py::arg("grad_factor"), py::arg("w_scale") = py::none(), py::arg("w_qmin") = 0, py::arg("w_qmax") = 0,
        py::arg("w_grad_factor") = 0.0, py::arg("w_tanh") = false, py::arg("w_s") = 0.0,
        py::arg("round_bias") = false);
  m.def("clipped_linear", &clipped_linear,
        "linear(x_hat, w_hat, bias) in one autograd node, x_hat on the fixed grid (step s, codes [lo, hi]) with "
        "the clipped straight-through gradient, w_hat as for lsq_linear",
        py::arg("x"), py::arg("s"), py::arg("lo"), py::arg("hi"), py::arg("weight"), py::arg("bias"),
        py::arg("w_scale") = py::none(), py::arg("w_qmin") = 0, py::arg("w_qmax") = 0, py::arg("w_grad_factor") = 0.0,
        py::arg("w_tanh") = false, py::arg("w_s") = 0.0, py::arg("round_bias") = false);
  m.def("range_quant", &range_quant,
        "observe min/max, update the tracked range, quantize (QAT/PTQ per-tensor); returns "
        "(x_hat, tmin, tmax, scale, zero_point, inv, clamp)",
        py::arg("x"), py::arg("has_prev"), py::arg("prev_lo"), py::arg("prev_hi"), py::arg("tracking"),
        py::arg("decay"), py::arg("qmin"), py::arg("qmax"), py::arg("symmetric"));
  m.def("range_grid", &range_grid,
        "range_quant's observation and grid without quantizing: (tmin, tmax, scale, zero_point, inv, clamp)",
        py::arg("x"), py::arg("has_prev"), py::arg("prev_lo"), py::arg("prev_hi"), py::arg("tracking"),
        py::arg("decay"), py::arg("qmin"), py::arg("qmax"), py::arg("symmetric"));
  m.def("tanh", &tanh_forward, "tanh (no autograd), the kernels' vectorised form");
}
