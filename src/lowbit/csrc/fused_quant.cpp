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
#include <functional>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::tensor_list;

constexpr int64_t kGrain = 1 << 14;  // elements per task in at::parallel_for
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

// a Function's grid, kept for its backward pass
void save_grid(AutogradContext* ctx, double s, double lo, double hi) {
  ctx->saved_data["s"] = s;
  ctx->saved_data["lo"] = lo;
  ctx->saved_data["hi"] = hi;
}

Grid saved_grid(AutogradContext* ctx) {
  return make_grid(ctx->saved_data["s"].toDouble(), ctx->saved_data["lo"].toDouble(),
                   ctx->saved_data["hi"].toDouble());
}

inline float code(float x, const Grid& g) {
  float v = std::nearbyint(x * g.inv);  // round half to even (default rounding mode)
  v = v < g.lo ? g.lo : v;              // NaN passes through, as torch.clamp
  return v > g.hi ? g.hi : v;
}

inline bool inside(float x, const Grid& g) { return x > g.lo_x && x < g.hi_x; }

// exp for the tanh below: Cody-Waite reduction and Cephes' degree-6 polynomial (about 1 ulp),
// written so that the compiler vectorises it (torch's CPU build runs tanh unvectorised).  With
// FMA hardware the reduction and the polynomial use fused multiply-adds (explicitly: the file is
// compiled with -ffp-contract=off); without, separate multiplies and adds.
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

void tanh_span(const float* __restrict__ x, float* __restrict__ t, int64_t n) {
  for (int64_t i = 0; i < n; ++i) t[i] = tanh_approx(x[i]);
}

void tanh_quantize_span(const float* __restrict__ x, float* __restrict__ t, float* __restrict__ out, int64_t n,
                        const Grid g) {
  for (int64_t i = 0; i < n; ++i) {
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

// over a span: the sum of g * dx_hat/ds * s (g (x_hat - x) inside the range, g x_hat outside)
// and the number of elements outside the range
struct StepSum {
  double sum;
  int64_t outside;
};

StepSum step_grad_span(const float* __restrict__ x, const float* __restrict__ gr, int64_t n, const Grid g) {
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
  }
  return r;
}

float* fptr(Tensor& t) { return t.data_ptr<float>(); }
const float* cfptr(const Tensor& t) { return t.data_ptr<float>(); }

Tensor as_f32(const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32,
              "lowbit fused kernels take float32 CPU tensors, got ", t.scalar_type(), " on ", t.device());
  return t.contiguous();
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
  static tensor_list backward(AutogradContext*, tensor_list grads) {
    return {grads[0], Tensor(), Tensor(), Tensor()};
  }
};

struct ClippedFn : public Function<ClippedFn> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, double s, double lo, double hi) {
    Tensor x = as_f32(x_in);
    save_grid(ctx, s, lo, hi);
    ctx->save_for_backward({x});
    return fq_forward(x, make_grid(s, lo, hi));
  }
  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    Tensor x = ctx->get_saved_variables()[0];
    const Grid g = saved_grid(ctx);
    Tensor go = grads[0].contiguous();
    Tensor gx = torch::empty_like(x);
    const float *xp = cfptr(x), *gp = cfptr(go);
    float* gxp = fptr(gx);
    at::parallel_for(0, x.numel(), kGrain, [=](int64_t b, int64_t e) { mask_span(xp + b, gp + b, gxp + b, e - b, g); });
    return {gx.view(grads[0].sizes()), Tensor(), Tensor(), Tensor()};
  }
};

// ---------------------------------------------------------------------------------------------
// LSQ (per-tensor step, zero point 0), optionally on tanh(x) (DoReFa's learned variant)

Grid lsq_grid(const Tensor& scale, int64_t qmin, int64_t qmax, double* sign) {
  const float raw = scale.item<float>();
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
    save_grid(ctx, static_cast<double>(g.s), static_cast<double>(qmin), static_cast<double>(qmax));
    ctx->saved_data["factor"] = grad_factor * sign / static_cast<double>(g.s);
    ctx->saved_data["tanh"] = tanh_first;
    ctx->saved_data["s_shape"] = scale.sizes().vec();
    ctx->save_for_backward({saved});
    return out;
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    Tensor v = ctx->get_saved_variables()[0];  // x, or tanh(x)
    const Grid g = saved_grid(ctx);
    const bool tanh_first = ctx->saved_data["tanh"].toBool();
    const bool want_x = ctx->needs_input_grad(0), want_s = ctx->needs_input_grad(1);
    Tensor go = grads[0].contiguous();
    const float *vp = cfptr(v), *gp = cfptr(go);
    const int64_t n = v.numel();
    Tensor gx;
    float* gxp = nullptr;
    auto alloc_gx = [&]() {
      gx = torch::empty_like(v);
      gxp = fptr(gx);
    };
    auto mask = [&gxp, vp, gp, g, tanh_first](int64_t b, int64_t e) {
      if (tanh_first)
        tanh_mask_span(vp + b, gp + b, gxp + b, e - b, g);
      else
        mask_span(vp + b, gp + b, gxp + b, e - b, g);
    };
    // One read pass for the step's sum and the count of clipped elements.  LSQ on x: when nothing
    // is clipped (the usual case for weights) the input gradient is the incoming one, unwritten.
    // On tanh(x) the input gradient has a factor 1 - t^2 everywhere: written in the same pass.
    if (want_x && tanh_first) alloc_gx();
    StepSum total{0.0, 0};
    if (want_s) {
      total = at::parallel_reduce(
          0, n, kGrain, StepSum{0.0, 0},
          [&](int64_t b, int64_t e, StepSum acc) {
            if (gxp != nullptr) mask(b, e);
            const StepSum part = step_grad_span(vp + b, gp + b, e - b, g);
            return StepSum{acc.sum + part.sum, acc.outside + part.outside};
          },
          [](StepSum a, StepSum b) { return StepSum{a.sum + b.sum, a.outside + b.outside}; });
    }
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
      const double factor = ctx->saved_data["factor"].toDouble();
      scale_grad = torch::full(ctx->saved_data["s_shape"].toIntVector(), static_cast<float>(total.sum) * factor,
                               torch::kFloat32);
    }
    return {gx, scale_grad, Tensor(), Tensor(), Tensor(), Tensor()};
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

inline double f32(double v) { return static_cast<double>(static_cast<float>(v)); }
inline double py_min(double a, double b) { return b < a ? b : a; }  // Python's min(a, b)
inline double py_max(double a, double b) { return b > a ? b : a; }  // Python's max(a, b)
constexpr double kMinScaleF32 = static_cast<double>(kMinScale);

enum Tracking : int64_t { kCurrent = 0, kEma = 1, kMinMaxTracking = 2 };

py::tuple range_quant(const Tensor& x_in, bool has_prev, double prev_lo, double prev_hi, int64_t tracking,
                      double decay, int64_t qmin, int64_t qmax, bool symmetric) {
  TORCH_CHECK(x_in.numel() > 0, "cannot observe the range of an empty tensor");
  Tensor x = as_f32(x_in);
  const MinMax m = minmax(x);
  TORCH_CHECK_VALUE(!m.nan, kNanMessage);
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
  const double lo_c = static_cast<double>(qmin) - zq, hi_c = static_cast<double>(qmax) - zq;
  // weights (current range): straight-through; activations: clipped straight-through
  Tensor out = tracking == kCurrent ? STEFn::apply(x, scale, lo_c, hi_c) : ClippedFn::apply(x, scale, lo_c, hi_c);
  return py::make_tuple(out, tmin, tmax, scale, zp, inv, clamp);
}

Tensor ste(const Tensor& x, double s, double lo, double hi) { return STEFn::apply(x, s, lo, hi); }
Tensor clipped(const Tensor& x, double s, double lo, double hi) { return ClippedFn::apply(x, s, lo, hi); }
Tensor lsq(const Tensor& x, const Tensor& scale, int64_t qmin, int64_t qmax, double grad_factor, bool tanh_first) {
  return LSQFn::apply(x, scale, qmin, qmax, grad_factor, tanh_first);
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
  m.def("ste", &ste, "fake-quantize, straight-through gradient", py::arg("x"), py::arg("s"), py::arg("lo"), py::arg("hi"));
  m.def("clipped", &clipped, "fake-quantize, clipped straight-through gradient", py::arg("x"), py::arg("s"),
        py::arg("lo"), py::arg("hi"));
  m.def("lsq", &lsq, "LSQ fake quantization with a learned per-tensor step", py::arg("x"), py::arg("scale"),
        py::arg("qmin"), py::arg("qmax"), py::arg("grad_factor"), py::arg("tanh_first") = false);
  m.def("range_quant", &range_quant,
        "observe min/max, update the tracked range, quantize (QAT/PTQ per-tensor); returns "
        "(x_hat, tmin, tmax, scale, zero_point, inv, clamp)",
        py::arg("x"), py::arg("has_prev"), py::arg("prev_lo"), py::arg("prev_hi"), py::arg("tracking"),
        py::arg("decay"), py::arg("qmin"), py::arg("qmax"), py::arg("symmetric"));
  m.def("tanh", &tanh_forward, "tanh (no autograd), the kernels' vectorised form");
}
