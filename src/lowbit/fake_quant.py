"""Quantize / dequantize arithmetic and the autograd functions every quantizer is built from.

Numerics (the contract of ``docs/INTERFACES.md``): a tensor ``x`` is quantized onto an integer
grid ``(scale, zero_point, qmin, qmax)`` exactly as PyTorch's fake-quant kernels do::

    q = clamp(round_half_even(x * float32(1 / scale)) + zero_point, qmin, qmax)   # int codes
    x_hat = (q - zero_point) * scale                                               # dequantized

so :func:`fake_quantize` is bit for bit ``torch.fake_quantize_per_tensor_affine`` /
``_per_channel_affine`` (the tests check it); ONNX ``QuantizeLinear`` divides by the scale instead,
which can differ in the last bit of ``x / scale``.  lowbit computes it with four vectorised
elementwise passes rather than with PyTorch's fused kernel: on the CPU build of torch 2.13 that
kernel runs at about 7 ns per element, six times slower than the composite (see
``docs/QUANTIZERS.md``); it stays the reference the tests compare against.  Per-tensor float32
quantizers on the CPU go to lowbit's own fused kernels (:mod:`lowbit.kernels`) when they are
built: the same values, one pass each way.

The functions here give each method its gradient:

* :func:`ste_fake_quantize` / :func:`ste_fake_quantize_scalar` — straight-through estimator
  (gradient 1 everywhere), for weights whose grid is computed from the weight itself;
* :func:`clipped_fake_quantize` / :func:`clipped_fake_quantize_scalar` — clipped STE: gradient 1
  where the input is not clamped, 0 where it is;
* :func:`lsq_fake_quantize` — LSQ (Esser et al. 2020): clip, round, and the paper's step-size
  gradient scaled by ``grad_factor``; with a float ``zero_point`` it also learns the offset (LSQ+),
  rounded to an integer in the forward pass;
* :func:`round_ste` — rounding with a straight-through gradient;
* :func:`quantize_gradient` — identity in the forward pass, DoReFa's k-bit stochastic gradient
  quantization in the backward pass.

The ``*_scalar`` variants take a per-tensor grid as Python numbers (the CPU fast path of the
range quantizers); the others take tensors (per-channel, any device, no host synchronisation).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import kernels

__all__ = [
    "MIN_SCALE",
    "AffineGrid",
    "qrange",
    "affine_qparams",
    "affine_qparams_f32",
    "exact_div",
    "f32",
    "fake_quantize",
    "fusable",
    "on_host",
    "tensor_path",
    "quantize_codes",
    "ste_fake_quantize",
    "clipped_fake_quantize",
    "ste_fake_quantize_scalar",
    "clipped_fake_quantize_scalar",
    "lsq_fake_quantize",
    "round_ste",
    "quantize_gradient",
]

#: the smallest scale any quantizer uses (a zero range would otherwise divide by zero)
MIN_SCALE = 1e-8


def qrange(bits: int, signed: bool, *, narrow: bool = False) -> tuple[int, int]:
    """Integer code range of a ``bits``-bit grid.

    signed: ``[-2^(b-1), 2^(b-1)-1]`` (narrow: ``[-(2^(b-1)-1), 2^(b-1)-1]``, symmetric about 0);
    unsigned: ``[0, 2^b-1]``.
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if not signed:
        return 0, (1 << bits) - 1
    half = 1 << (bits - 1)
    return (-(half - 1) if narrow else -half), half - 1


def _channel_view(t: Tensor, axis: int | None, ndim: int) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` so it broadcasts along ``axis`` of an ``ndim`` tensor."""
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = t.numel()
    return t.reshape(shape)


@dataclass(frozen=True)
class AffineGrid:
    """The integer grid a quantizer's output lies on: ``x_hat = (q - zero_point) * scale``,
    ``q`` an integer in ``[qmin, qmax]``; per-channel along ``axis`` when ``scale`` is a vector."""

    scale: Tensor  # float32, () or (C,)
    zero_point: Tensor  # int64, same shape
    qmin: int
    qmax: int
    axis: int | None = None

    def quantize(self, x: Tensor) -> Tensor:
        """int64 codes of ``x`` on this grid (round half to even, then clamp)."""
        scale = _channel_view(self.scale, self.axis, x.dim())
        zp = _channel_view(self.zero_point, self.axis, x.dim())
        r = torch.round(x.float() * torch.reciprocal(scale))
        return (r + zp).clamp_(self.qmin, self.qmax).to(torch.int64)

    def dequantize(self, q: Tensor) -> Tensor:
        """``(q - zero_point) * scale`` in float32."""
        scale = _channel_view(self.scale, self.axis, q.dim())
        zp = _channel_view(self.zero_point, self.axis, q.dim())
        return (q.to(torch.int64) - zp).to(torch.float32) * scale

    def fake_quantize(self, x: Tensor) -> Tensor:
        return self.dequantize(self.quantize(x))

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def to_dict(self) -> dict:
        """JSON-serialisable form (floats/ints, lists when per-channel)."""
        return {
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.tolist(),
            "qmin": self.qmin,
            "qmax": self.qmax,
            "axis": self.axis,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AffineGrid":
        return cls(
            torch.tensor(d["scale"], dtype=torch.float32),
            torch.tensor(d["zero_point"], dtype=torch.int64),
            int(d["qmin"]),
            int(d["qmax"]),
            d.get("axis"),
        )


@torch.no_grad()
def affine_qparams(
    lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[Tensor, Tensor]:
    """Scale and integer zero point that map the range ``[lo, hi]`` (widened to contain 0) onto
    ``[qmin, qmax]``.

    affine: ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - round(lo / scale)``
    (clamped into ``[qmin, qmax]``), so 0 is exactly representable (Jacob et al. 2018).
    symmetric: ``zero_point = 0``; ``scale = max(|lo|, |hi|) / qmax`` for a signed grid
    (``qmin < 0``) and ``hi / qmax`` for an unsigned one.
    Works elementwise, so per-channel ``lo``/``hi`` vectors give per-channel parameters.
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        amax = torch.maximum(-lo, hi) if qmin < 0 else hi
        scale = exact_div(amax, qmax).clamp_(min=MIN_SCALE)
        return scale, torch.zeros_like(scale, dtype=torch.int64)
    scale = exact_div(hi - lo, qmax - qmin).clamp_(min=MIN_SCALE)
    zp = (qmin - torch.round(lo / scale)).clamp_(qmin, qmax).to(torch.int64)
    return scale, zp


def exact_div(t: Tensor, n: float) -> Tensor:
    """``t / n`` correctly rounded on every device.  (CUDA divides a tensor by a Python number as a
    multiplication by its rounded reciprocal, which can be one float32 ulp off the true quotient:
    a GPU-trained grid would then differ from the CPU's.  A divisor tensor on ``t``'s device takes
    the true division.)"""
    return t / t.new_full((), n)


def f32(v: float) -> float:
    """Round a Python float to the nearest float32 value (round half to even)."""
    return _F32.unpack(_F32.pack(v))[0]


_F32 = struct.Struct("f")


def affine_qparams_f32(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> tuple[float, int]:
    """:func:`affine_qparams` for one tensor with Python numbers, emulating its float32
    arithmetic step by step (each operation rounded to float32), so both give the same scale."""
    lo = min(f32(lo), 0.0)
    hi = max(f32(hi), 0.0)
    if symmetric:
        amax = max(-lo, hi) if qmin < 0 else hi
        return max(f32(amax / qmax), MIN_SCALE_F32), 0
    scale = max(f32(f32(hi - lo) / (qmax - qmin)), MIN_SCALE_F32)
    zp = qmin - round(f32(lo / scale))
    return scale, min(max(zp, qmin), qmax)


MIN_SCALE_F32 = f32(MIN_SCALE)


def _resolve(x: Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None):
    """``(s, inv, lo, hi)``: the scale and its float32 reciprocal, as Python floats for a
    per-tensor grid on the CPU (no tensor ops, exact float32 values) or as broadcastable tensors;
    clamp bounds in code-minus-zero-point space, ``clamp(r + zp, qmin, qmax) - zp ==
    clamp(r, qmin - zp, qmax - zp)`` exactly for integer-valued floats."""
    if not isinstance(scale, Tensor):
        s = float(scale)
        zp = 0 if zero_point is None else int(zero_point)
        return s, f32(1.0 / s), qmin - zp, qmax - zp
    if axis is None and on_host(scale) and on_host(x):
        s = scale.item()
        zp = 0 if zero_point is None else int(zero_point.item())
        return s, f32(1.0 / s), qmin - zp, qmax - zp
    nd = x.dim()
    s = _channel_view(scale, axis, nd)
    inv = torch.reciprocal(s)
    if zero_point is None:
        return s, inv, qmin, qmax
    zp = _channel_view(zero_point, axis, nd).to(s.dtype)
    return s, inv, qmin - zp, qmax - zp


def _clamp(r: Tensor, lo, hi, inplace: bool) -> Tensor:
    if isinstance(lo, Tensor):
        return torch.clamp(r, lo, hi)
    return r.clamp_(lo, hi) if inplace else torch.clamp(r, lo, hi)


def _x_bounds(s, lo, hi) -> tuple:
    """The code range ``(lo, hi)`` (relative to the zero point) in x-space: ``float32(lo * s)``,
    ``float32(hi * s)``, as numbers or broadcastable tensors.  Every path (the fused kernels, the
    Python-number path, per-channel grids, other devices) tests "inside" against these, so a value
    at the very end of its range (a batch's own maximum, which sets the range) gets the same
    gradient on every device and granularity."""
    if isinstance(s, Tensor):
        return lo * s, hi * s  # a float32 product of an integer and s: correctly rounded, as f32()
    return f32(lo * s), f32(hi * s)


def _inside_grad(g: Tensor, x: Tensor, lo_x, hi_x) -> Tensor:
    """``g`` where ``x`` lies strictly inside ``(lo_x, hi_x)``, else 0 (one fused pass, hardtanh's
    backward, when the bounds are numbers)."""
    if isinstance(lo_x, Tensor):
        return torch.where((x > lo_x) & (x < hi_x), g, torch.zeros((), dtype=g.dtype, device=g.device))
    return torch.ops.aten.hardtanh_backward(g, x, lo_x, hi_x)


def fake_quantize(
    x: Tensor,
    scale: Tensor | float,
    zero_point: Tensor | int | None,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> Tensor:
    """``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale`` with the fused kernels' float
    arithmetic (``x * float32(1/scale)``); ``zero_point=None`` means 0.  ``scale``/``zero_point``
    may be tensors (``()`` or ``(C,)`` with ``axis``) or, per-tensor, Python numbers (``scale``
    must then be a float32 value).  The result has ``x``'s dtype (a float16/bfloat16 ``x`` on a
    float32 tensor grid is quantized in float32, then rounded back).  No autograd rule of its own
    (see the functions below)."""
    s, inv, lo, hi = _resolve(x, scale, zero_point, qmin, qmax, axis)
    return _clamp((x * inv).round_(), lo, hi, True).mul_(s).to(x.dtype)


def quantize_codes(
    x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """int64 codes of ``x`` on the grid (see :meth:`AffineGrid.quantize`)."""
    zp = torch.zeros_like(scale, dtype=torch.int64) if zero_point is None else zero_point.to(torch.int64)
    return AffineGrid(scale, zp, qmin, qmax, axis).quantize(x)


class _STEFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        return fake_quantize(x, scale, zero_point, qmin, qmax, axis)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None, None, None, None, None


def ste_fake_quantize(
    x: Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Fake-quantize with a plain straight-through gradient (``dx_hat/dx = 1``); no gradient to
    ``scale``/``zero_point`` (they are statistics, not parameters)."""
    return _STEFakeQuant.apply(x, scale, zero_point, qmin, qmax, axis)


class _ClippedFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        s, inv, lo, hi = _resolve(x, scale, zero_point, qmin, qmax, axis)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x)
            ctx.bounds = _x_bounds(s, lo, hi)
        return _clamp((x * inv).round_(), lo, hi, True).mul_(s).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        lo_x, hi_x = ctx.bounds
        return _inside_grad(g, x, lo_x, hi_x), None, None, None, None, None


def clipped_fake_quantize(
    x: Tensor, scale, zero_point, qmin: int, qmax: int, axis: int | None = None
) -> Tensor:
    """Fake-quantize with the clipped straight-through gradient: 1 where ``x`` lies strictly inside
    the grid's range ``((qmin - zp) scale, (qmax - zp) scale)``, 0 outside.  (The fused kernels also
    pass the gradient of inputs up to half a step beyond either end, whose code rounds onto the
    end; lowbit clips at the range, as the clipped STE is defined.)"""
    return _ClippedFakeQuant.apply(x, scale, zero_point, qmin, qmax, axis)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def wide(t: Tensor) -> Tensor:
    """``t`` in float32 if it is float16/bfloat16 (else ``t``): codes rounded from half-precision
    products move near ties, and a step's gradient (a difference of two sums over the whole
    tensor) would be rounded away, tens of percent off."""
    return t.float() if t.dtype in HALF_DTYPES else t


def float32_codes(forward: Callable[[Any, Tensor], Tensor]) -> Callable[[Any, Tensor], Tensor]:
    """A quantizer's ``forward`` that quantizes a float16/bfloat16 input in float32 and casts the
    output back: its codes are then :meth:`quantize_int`'s and the exported integer model's, on
    every path and granularity (half-precision ``x * (1/s)`` put about 1-4% of codes one off)."""

    @functools.wraps(forward)
    def wrapped(self: Any, x: Tensor) -> Tensor:
        if x.dtype in HALF_DTYPES:
            return forward(self, x.float()).to(x.dtype)
        return forward(self, x)

    return wrapped


def _sum_but(t: Tensor, axis: int | None) -> Tensor:
    if axis is None:
        return t.sum()
    dims = [d for d in range(t.dim()) if d != axis]
    return t.sum(dims) if dims else t


class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_factor, axis):  # type: ignore[override]
        # The step's magnitude is used, so a step pushed through zero by the optimizer flips sign
        # harmlessly instead of collapsing the grid.
        ctx.grad_factor = grad_factor
        ctx.axis = axis
        ctx.learn_zp = zero_point is not None and ctx.needs_input_grad[2]
        ctx.zp_shape = None if zero_point is None else zero_point.shape
        ctx.s_shape = scale.shape
        if axis is None and on_host(x) and on_host(scale):
            # per-tensor on the CPU: grid as Python numbers, one allocation, the in-range mask
            # taken in x-space in the backward pass (hardtanh's fused backward)
            raw = scale.item()
            s = max(f32(abs(raw)), MIN_SCALE_F32)
            zp = 0 if zero_point is None else min(max(round(zero_point.item()), qmin), qmax)
            lo, hi = qmin - zp, qmax - zp
            out = (x * f32(1.0 / s)).round_().clamp_(lo, hi).mul_(s)
            ctx.save_for_backward(x, out)
            # the paper clips before rounding: inside means lo < x / s < hi (strictly)
            ctx.scalar = (s, lo * s, hi * s, -1.0 if raw < 0 else 1.0)
            return out
        ctx.scalar = None
        s_t = scale.abs().clamp_min(MIN_SCALE)
        zp_t = None if zero_point is None else torch.round(zero_point).clamp(qmin, qmax)
        s, inv, lo, hi = _resolve(x, s_t, zp_t, qmin, qmax, axis)
        cs = _clamp((x * inv).round_(), lo, hi, True).mul_(s)  # c * s, c = clamp(round(x / s)), in s's dtype
        out = cs.to(x.dtype)
        # (the step's gradient reads c * s unrounded: a float16/bfloat16 out would cost it percents)
        ctx.save_for_backward(x, cs if ctx.needs_input_grad[1] else out, scale.detach())
        ctx.s = s
        ctx.bounds = _x_bounds(s, lo, hi)
        return out

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        if ctx.scalar is not None:
            x, out = ctx.saved_tensors
            s, lo_x, hi_x, sign = ctx.scalar
            gx = torch.ops.aten.hardtanh_backward(g, x, lo_x, hi_x)
            gs = gzp = None
            if ctx.needs_input_grad[1]:
                # d x_hat / d s = c - [in range] x / s  (Esser et al. 2020, eq. 3), c = out / s
                ga, gxa = wide(g).reshape(-1), wide(gx).reshape(-1)
                gs = torch.dot(ga, wide(out).reshape(-1)) - torch.dot(gxa, wide(x).reshape(-1))
                gs = (gs * (ctx.grad_factor * sign / s)).reshape(ctx.s_shape)
            if ctx.learn_zp:
                # d x_hat / d zp = -s where clamped, 0 inside (straight through the rounding)
                gzp = ((wide(gx).sum() - wide(g).sum()) * (s * ctx.grad_factor)).reshape(ctx.zp_shape)
            return gx, gs, gzp, None, None, None, None
        x, out, scale = ctx.saved_tensors
        s = ctx.s
        lo_x, hi_x = ctx.bounds
        gx = _inside_grad(g, x, lo_x, hi_x)
        gs = gzp = None
        s_vec = s.reshape(-1) if ctx.axis is not None else s
        if ctx.needs_input_grad[1]:
            gs = (_sum_but(wide(g) * wide(out), ctx.axis) - _sum_but(wide(gx) * wide(x), ctx.axis)) / s_vec
            gs = (gs * ctx.grad_factor * torch.where(scale < 0, -1.0, 1.0)).reshape(ctx.s_shape)
        if ctx.learn_zp:
            gzp = -(_sum_but(wide(g), ctx.axis) - _sum_but(wide(gx), ctx.axis)) * s_vec
            gzp = (gzp * ctx.grad_factor).reshape(ctx.zp_shape)
        return gx, gs, gzp, None, None, None, None


def lsq_fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    grad_factor: float = 1.0,
    axis: int | None = None,
) -> Tensor:
    """LSQ fake quantization with a learnable ``scale`` (its magnitude, at least ``MIN_SCALE``, is
    the step) and, if given, a learnable float ``zero_point`` (LSQ+; rounded to an integer and clamped
    into ``[qmin, qmax]`` in the forward pass, straight through in the backward pass).

    Gradients, as in the paper, which clips ``v = x / scale`` to ``[qmin - zp, qmax - zp]`` before
    rounding (``c`` = the clipped, rounded code minus the zero point): "inside" means
    ``float32((qmin - zp) scale) < x < float32((qmax - zp) scale)`` (the same test on every path
    and device); ``dL/dx = g`` inside, 0 outside;
    ``dL/dscale = grad_factor * sum(g * (c - v))`` inside and ``grad_factor * sum(g * c)`` outside
    (c is then ``qmin - zp`` or ``qmax - zp``: the paper's ``-Qn`` / ``Qp``);
    ``dL/dzero_point = -grad_factor * scale * sum(g)`` over the elements outside.
    Values are those of ``torch._fake_quantize_learnable_per_tensor_affine``; its gradients differ
    only for ``v`` within half a step beyond either end, which it counts as inside.
    Per-tensor, without offset, float32 on the CPU: the fused kernel (:mod:`lowbit.kernels`).
    """
    if axis is None and zero_point is None and fusable(x) and fusable(scale) and scale.numel() == 1:
        k = kernels.get()
        if k is not None:
            return k.lsq(x, scale, qmin, qmax, grad_factor, False)
    return _LSQFakeQuant.apply(x, scale, zero_point, qmin, qmax, grad_factor, axis)


_HOST = [True]


def on_host(t: Tensor) -> bool:
    """Whether ``t`` takes the host paths: a per-tensor grid as Python numbers (read from the step or
    range tensors with ``.item()``) and lowbit's fused CPU kernels.  True for CPU tensors, unless
    inside :func:`tensor_path`; other devices always take the tensor path (no host reads)."""
    return _HOST[0] and t.is_cpu


@contextmanager
def tensor_path() -> Iterator[None]:
    """Within this block CPU tensors take the tensor path a GPU takes (grids as tensors, no
    ``.item()``, no fused CPU kernels): the same values, slower — what ``torch.compile`` traces
    without graph breaks, and what the GPU tests run as their CPU stand-in.  The switch is
    process-wide (a plain global, which ``torch.compile`` guards on: run a model compiled inside
    the block inside it too, or it recompiles for the host path)."""
    saved = _HOST[0]
    _HOST[0] = False
    try:
        yield
    finally:
        _HOST[0] = saved


def fusable(t: Tensor) -> bool:
    """Whether lowbit's fused CPU kernels take this tensor (float32, on the host path); where they
    do, DoReFa's tanh is lowbit's exp form too."""
    return t.dtype == torch.float32 and on_host(t)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


def round_ste(x: Tensor) -> Tensor:
    """Round half to even; gradient passes straight through."""
    return _RoundSTE.apply(x)


#: the largest int32 bias code lowbit writes (the largest float32 below 2**31: the codes are
#: computed in float32, as an integer runtime's accumulator scale is)
BIAS_CODE_LIMIT = 2147483520.0


def bias_codes(bias: Tensor, step: Tensor) -> Tensor:
    """A layer's bias as int32 codes at the integer GEMM's accumulator step ``s_in * s_w`` (per
    output channel where the weights are), as float32 integers: ``round(b / step)`` in float32,
    half to even, clamped to int32 — what the ONNX export stores (Jacob et al. 2018, section 2.4)."""
    return torch.round(bias.detach().float() / step).clamp_(-BIAS_CODE_LIMIT, BIAS_CODE_LIMIT)


class _RoundBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, bias, step):  # type: ignore[override]
        return (bias_codes(bias, step) * step).to(bias.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None


def round_bias(bias: Tensor, step: Tensor) -> Tensor:
    """``bias`` on its int32 grid of step ``step`` (:func:`bias_codes` times ``step``); the
    gradient passes straight through to the float bias (the steps get none from it)."""
    return _RoundBias.apply(bias, step)


class _GradQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits, generator):  # type: ignore[override]
        ctx.bits = bits
        ctx.generator = generator
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        levels = (1 << ctx.bits) - 1
        dtype = g.dtype
        g = wide(g)  # (in bfloat16 the sum below rounds before the stochastic rounding: biased)
        if g.dim() > 1:
            m = g.abs().amax(dim=tuple(range(1, g.dim())), keepdim=True)
        else:
            m = g.abs().amax()
        m = m.clamp_min(torch.finfo(g.dtype).tiny)
        noise = torch.rand(g.shape, dtype=g.dtype, device=g.device, generator=ctx.generator) - 0.5
        v = g / (2 * m) + 0.5 + noise / levels
        q = torch.round(v * levels).clamp_(0, levels) / levels
        return (2 * m * (q - 0.5)).to(dtype), None, None


def quantize_gradient(x: Tensor, bits: int, generator: torch.Generator | None = None) -> Tensor:
    """Identity forward; in the backward pass the incoming gradient ``dr`` is replaced by DoReFa's
    k-bit stochastic quantization (Zhou et al. 2016, eq. 12)::

        2 * max0(|dr|) * [quantize_k(dr / (2 * max0(|dr|)) + 1/2 + N(k)) - 1/2]

    with ``N(k) ~ U(-1/2, 1/2) / (2^k - 1)`` and ``max0`` taken per sample (over all axes but the
    first).  The result is clamped into the representable range before rounding."""
    return _GradQuant.apply(x, int(bits), generator)


# ---------------------------------------------------------------------------------------------
# Per-tensor fast paths with Python-number grid parameters (CPU): no custom autograd function,
# the gradient comes from a built-in op whose backward is one fused pass (or none), and the
# rounding is applied in place on the op's output, which that op's backward does not read.


class _STEScalar(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s, inv, lo, hi, clamp):  # type: ignore[override]
        d = (x * inv).round_()
        if clamp:
            d.clamp_(lo, hi)
        return d.mul_(s)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None, None, None, None, None


#: from this many elements on, a Python autograd function (one call) is cheaper than the extra
#: pass over the tensor that the clone-based straight-through path costs
_STE_FUNCTION_NUMEL = 1 << 16


def ste_fake_quantize_scalar(
    x: Tensor, s: float, inv: float, lo: float, hi: float, clamp: bool = True
) -> Tensor:
    """Per-tensor fake quantization with a straight-through gradient, grid given as Python numbers:
    ``s`` (a float32 value), ``inv = f32(1/s)`` and the clamp bounds ``lo = qmin - zp``,
    ``hi = qmax - zp``.  Same values as :func:`fake_quantize` (and the fused kernel).
    ``clamp=False`` skips the clamp when the caller knows no code can leave ``[lo, hi]``.
    float32 CPU tensors take the fused kernel (:mod:`lowbit.kernels`), which always clamps."""
    if fusable(x):
        k = kernels.get()
        if k is not None:
            return k.ste(x, s, lo, hi)
    if x.requires_grad:
        if x.numel() >= _STE_FUNCTION_NUMEL:
            return _STEScalar.apply(x, s, inv, lo, hi, clamp)
        y = x.clone()  # CloneBackward passes the gradient through untouched
        d = y.detach()
        d.mul_(inv)
    else:
        y = d = x * inv
    d.round_()
    if clamp:
        d.clamp_(lo, hi)
    d.mul_(s)
    return y


def clipped_fake_quantize_scalar(x: Tensor, s: float, inv: float, lo: float, hi: float) -> Tensor:
    """Per-tensor fake quantization with the clipped straight-through gradient, grid given as
    Python numbers (see :func:`ste_fake_quantize_scalar`).  ``x`` is clipped to the grid's range
    ``[lo s, hi s]`` first (``hardtanh``, whose fused backward gives the gradient: 1 strictly inside
    the range, 0 outside), then rounded in place — values exactly :func:`fake_quantize`'s, since
    ``round(f32(hi s) * inv)`` is ``hi`` for any grid of up to 16 bits.  float32 CPU tensors take
    the fused kernel (:mod:`lowbit.kernels`), same values and gradient."""
    if fusable(x):
        k = kernels.get()
        if k is not None:
            return k.clipped(x, s, lo, hi)
    if x.requires_grad:
        y = torch.nn.functional.hardtanh(x, lo * s, hi * s)
        d = y.detach()
        d.mul_(inv).round_().mul_(s)
        return y
    return (x * inv).round_().clamp_(lo, hi).mul_(s)
