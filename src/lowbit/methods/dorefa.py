"""DoReFa-Net (Zhou et al. 2016): tanh-normalised weights, [0, 1]-clipped activations, and
optionally k-bit stochastic gradients.

Weights, ``dorefa_variant``:

* ``"learned"`` (default, deployable) — DoReFa's ``tanh`` reparametrisation, then a learned clip:
  ``w_q = clamp(round(tanh(w) / s), -n, n) * s`` with ``n = 2^(k-1) - 1`` (codes ``[-n, n]``, zero
  point 0: an int8 grid at 8 bits) and ``s`` a learned step per layer, trained as LSQ trains its
  step (initialised ``2 mean|tanh(w)| / sqrt(n)``, gradient scale ``1 / sqrt(numel * n)``, the
  paper's step gradient, clipped straight-through for ``w``).  The paper normalises by
  ``max|tanh(w)|`` instead, so one outlier weight sets the grid: on the study's VAE, fc1's largest
  weight is ten times its typical one and at 4 bits nearly all of fc1 rounds to 0 — from the same
  fp32 start, 10 epochs of 4-bit fine-tuning end at 116.0 nats max-normalised (``"scaled"``) and
  106.5 with the learned clip (``python benchmarks/dorefa_variants.py``; docs/QUANTIZERS.md).
* ``"scaled"`` — ``u = tanh(w) / max|tanh(w)|`` in ``[-1, 1]``, rounded onto the symmetric signed
  grid ``[-n, n]``, times a per-layer scale ``max|w| / n`` (``max|w|`` of the float weights,
  recomputed at every step, no gradient through it) so the layer keeps its output magnitude.
* ``"paper"`` — exactly the paper: ``w_q = 2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1``
  with ``quantize_k(v) = round((2^k - 1) v) / (2^k - 1)``: ``2^k`` levels in ``[-1, 1]``.  The
  magnitude of the layer's weights is lost (the paper relies on a batch norm after each layer).
  As an integer grid: codes ``c = 2q - (2^k - 1)`` (odd integers in ``[-(2^k-1), 2^k-1]``), scale
  ``1/(2^k - 1)``, zero point 0 — it fits int8 only for ``k <= 7``, so 8-bit paper DoReFa cannot be
  exported exactly.

``"scaled"`` and ``"paper"``: the gradient goes straight through the rounding and through ``tanh``;
the normalising ``max|tanh(w)|`` (and the scaled variant's ``max|w|``) is treated as a constant
(stop-gradient).  The paper's reference code also differentiates through the max, which changes
the gradient of the single largest weight only; lowbit skips it because finding that element costs
two more passes over the weight on every step.
1 bit (every variant): ``w_q = E|w| * sign(w)`` as in the paper, straight-through gradient.

Activations (``input``/``output``): clipped to ``[0, 1]`` and quantized to ``k`` bits, codes
``[0, 2^k - 1]``, scale ``1/(2^k-1)``; the gradient is zero outside the range.

``gradient_bits: k``: the layer's output gradient is quantized to ``k`` bits stochastically in the
backward pass (the paper's eq. 12; off by default).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import ConfigError, LayerSpec, TensorSpec
from ..fake_quant import (
    MIN_SCALE,
    AffineGrid,
    exact_div,
    float32_codes,
    clipped_fake_quantize,
    clipped_fake_quantize_scalar,
    f32,
    fusable,
    lsq_fake_quantize,
    on_host,
    qrange,
    quantize_gradient,
    wide,
)
from .base import (BIAS_QUANT, WEIGHT_RANGE, FusedWeight, Method, NotCalibratedError, Option, Quantizer, _state_name,
                   is_int, member, one_of, register_method)

__all__ = ["DoReFa", "DoReFaWeightQuantizer", "DoReFaActivationQuantizer", "GradientQuantizer", "dorefa_weight_codes"]


def _exp_tanh(x: Tensor) -> Tensor:
    return torch.mul(x, 2.0).exp_().add_(1.0).reciprocal_().mul_(-2.0).add_(1.0)


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        k = kernels.get()
        t = _exp_tanh(x) if k is None else k.tanh(x)
        ctx.save_for_backward(t)
        return t

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (t,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(g, t)


def tanh(x: Tensor) -> Tensor:
    """DoReFa's ``tanh``.  On the CPU, for float32, computed as ``1 - 2 / (exp(2x) + 1)``: torch
    2.13's CPU wheel runs ``torch.tanh`` unvectorised, about twice as slow as ``exp`` plus four
    in-place passes, and lowbit's fused kernel (:mod:`lowbit.kernels`, its own vectorised exp) is
    twice as fast again (``python benchmarks/quantizer_kernels.py``); the values agree with
    ``torch.tanh`` within 2.5e-7 absolute (tested) and the gradient is tanh's own,
    ``g (1 - t^2)``."""
    if not fusable(x):
        return torch.tanh(x)
    if x.requires_grad and torch.is_grad_enabled():
        return _Tanh.apply(x)
    k = kernels.get()
    return _exp_tanh(x) if k is None else k.tanh(x)


def dorefa_weight_codes(w: Tensor, range_bits: int, variant: str) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """``(codes, scale, tanh(w), max|tanh(w)|, kappa)`` of DoReFa's weight transform;
    ``codes * scale`` is the quantized weight and ``kappa`` the slope of the codes with respect to
    ``u = tanh(w) / max|tanh(w)|`` through the rounding (straight through): ``n`` for the scaled
    variant, ``2^k - 1`` for the paper's.  Codes are float tensors holding integers."""
    t = tanh(w)
    mn, mx = torch.aminmax(t)
    m = torch.maximum(-mn, mx).clamp_min(torch.finfo(t.dtype).tiny)
    if variant == "paper":
        levels = (1 << range_bits) - 1
        q = (t / (2 * m)).add_(0.5).mul_(levels).round_()
        codes = q.mul_(2).sub_(levels)
        scale = torch.tensor(1.0 / levels, dtype=t.dtype)
        return codes, scale, t, m, float(levels)  # codes ~ levels * t / m
    n = (1 << (range_bits - 1)) - 1
    wmn, wmx = torch.aminmax(w)
    scale = exact_div(torch.maximum(-wmn, wmx), n).clamp_min(MIN_SCALE)
    codes = (t * (n / m)).round_()
    return codes, scale, t, m, float(n)


class _DoReFaWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, range_bits, variant):  # type: ignore[override]
        codes, scale, t, m, kappa = dorefa_weight_codes(w, range_bits, variant)
        # slope of the output with respect to u = t / m (straight through the rounding)
        ctx.save_for_backward(t, m, scale)
        ctx.kappa = kappa
        ctx.mark_non_differentiable(scale)
        return codes.mul_(scale), scale

    @staticmethod
    def backward(ctx, g, _gscale):  # type: ignore[override]
        t, m, scale = ctx.saved_tensors
        k = scale * ctx.kappa  # d out / d u, u = t / m, straight through the rounding
        # d out / d w = (k / m) (1 - t^2); the max is a constant here (stop-gradient)
        gw = torch.addcmul(g, g * t, t, value=-1.0)
        return gw.mul_(k / m), None, None


class _Binary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):  # type: ignore[override]
        e = w.abs().mean().clamp_min(MIN_SCALE)
        codes = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        ctx.mark_non_differentiable(e)
        return codes.mul_(e), e

    @staticmethod
    def backward(ctx, g, _ge):  # type: ignore[override]
        return g


#: the number a DoReFa weight quantizer's state records for its variant (its ``variant_id`` buffer)
VARIANT_IDS = {"learned": 0, "scaled": 1, "paper": 2}


class DoReFaWeightQuantizer(Quantizer):
    """DoReFa weight quantizer (``variant`` ``"learned"``, ``"scaled"`` or ``"paper"``); see the
    module docstring.  ``weight`` (needed by ``"learned"``) initialises the learned step."""

    def __init__(self, spec: TensorSpec, variant: str = "learned", weight: Tensor | None = None) -> None:
        super().__init__(spec)
        rb = spec.range_bits
        self.variant = variant = "scaled" if variant == "learned" and rb == 1 else variant
        if rb == 1:
            self.qmin, self.qmax = -1, 1
        elif variant == "paper":
            self.qmin, self.qmax = -((1 << rb) - 1), (1 << rb) - 1
        else:
            self.qmin, self.qmax = qrange(rb, True, narrow=True)
        self._record_codes()
        # (the learned and scaled variants share their codes and their state's keys: the state
        # says which it is, so that one loads only into its own variant)
        self.register_buffer("variant_id", torch.tensor(VARIANT_IDS[variant]))
        self.learned = variant == "learned"
        if self.learned:
            if weight is None:
                raise ValueError("the learned DoReFa step is initialised from the layer's weight: pass it")
            t = tanh(weight.detach().float())
            self.scale = nn.Parameter(exact_div(2 * t.abs().mean(), math.sqrt(self.qmax)).clamp(min=MIN_SCALE).reshape(()))
            self._grad_factor = 1.0 / math.sqrt(weight.numel() * self.qmax)
            self.register_buffer("initialized", torch.tensor(True))
            self._initialized = True
            return
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False

    def _sync(self) -> None:
        self._initialized = bool(self.initialized)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "variant_id" not in self._buffers:  # (a whole model pickled by lowbit < 0.3.9)
            self.register_buffer("variant_id", torch.tensor(VARIANT_IDS[self.variant], device=self.initialized.device))

    def _state_problem(self, state: dict[str, Any], prefix: str) -> str | None:
        saved = state.get(prefix + "variant_id")
        if isinstance(saved, Tensor) and saved.numel() == 1 and saved.device.type != "meta":
            names = {v: k for k, v in VARIANT_IDS.items()}
            got = names.get(int(saved), f"unknown ({int(saved)})")
            if got != self.variant:
                return (f"{_state_name(prefix)}: the state was saved from DoReFa's {got!r} weight "
                        f"variant and this quantizer is {self.variant!r}: its scale means another thing there; "
                        f"quantize with dorefa_variant={got!r} (the config the state was saved with)")
        return super()._state_problem(state, prefix)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        key = prefix + "variant_id"
        if key not in state_dict and self._state_problem(state_dict, prefix) is None:
            # a state saved by lowbit < 0.3.9, which did not record it: taken as this variant's
            state_dict = {**state_dict, key: self.variant_id.detach().clone()}
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _store(self, scale: Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(scale)
            if not self._initialized:
                self.initialized.fill_(True)
                self._initialized = True

    @float32_codes
    def forward(self, w: Tensor) -> Tensor:
        if self.learned:
            k = kernels.get() if fusable(w) else None
            if k is not None:  # tanh and the learned clip in one pass each way
                return k.lsq(w, self.scale, self.qmin, self.qmax, self._grad_factor, True)
            return lsq_fake_quantize(tanh(w), self.scale, None, self.qmin, self.qmax, self._grad_factor)
        if self.spec.range_bits == 1:
            out, scale = _Binary.apply(w)
        else:
            out, scale = _DoReFaWeight.apply(w, self.spec.range_bits, self.variant)
        self._store(scale)
        return out

    def fused_weight(self, weight: Tensor) -> FusedWeight | None:
        if self.learned:
            scale = member(self, "scale")
            if fusable(weight) and fusable(scale):
                return scale, self.qmin, self.qmax, self._grad_factor, True
        return None

    def quantize_int(self, w: Tensor) -> Tensor:
        w = wide(w)  # (as forward computes it)
        with torch.no_grad():
            if self.learned:
                return self.grid().quantize(tanh(w))
            if self.spec.range_bits == 1:
                codes = torch.where(w >= 0, 1, -1)
                self._store(w.abs().mean().clamp_min(MIN_SCALE))
                return codes.to(torch.int64)
            codes, scale, *_ = dorefa_weight_codes(w, self.spec.range_bits, self.variant)
            self._store(scale)
            return codes.to(torch.int64)

    def grid(self) -> AffineGrid:
        if not self._initialized:
            raise NotCalibratedError("this DoReFa weight quantizer has not seen its weight yet")
        scale = self.scale.detach().abs().clamp_min(MIN_SCALE) if self.learned else self.scale.detach().clone()
        return AffineGrid(scale, torch.zeros((), dtype=torch.int64), self.qmin, self.qmax, None)

    @torch.no_grad()
    def load_grid(self, grid: AffineGrid, tracked: Any = None) -> None:
        if (grid.qmin, grid.qmax) != (self.qmin, self.qmax):
            raise ValueError(f"grid codes [{grid.qmin}, {grid.qmax}] do not match [{self.qmin}, {self.qmax}]")
        self.scale.copy_(grid.scale.reshape(()))
        self.initialized.fill_(True)
        self._sync()

    @property
    def grid_from_weight(self) -> bool:
        return not self.learned

    missing_scale_hint = ("; DoReFa's learned weight scale is not in NNI's export: quantize with dorefa_variant "
                          "'paper' (NNI's DoReFa) or 'scaled', whose grids come from the weights")

    def _describe_codes(self) -> str:
        return f"{self.variant}, codes [{self.qmin}, {self.qmax}]"


class DoReFaActivationQuantizer(Quantizer):
    """``x`` clipped to [0, 1] and quantized to ``k`` bits: a fixed grid, no state."""

    def __init__(self, spec: TensorSpec) -> None:
        super().__init__(spec)
        self.qmin, self.qmax = 0, (1 << spec.bits) - 1
        self._record_codes()
        self.register_buffer("scale", torch.tensor(1.0 / self.qmax), persistent=False)
        self._s = self.scale.item()
        self._inv = f32(1.0 / self._s)

    @float32_codes
    def forward(self, x: Tensor) -> Tensor:
        if on_host(x):
            return clipped_fake_quantize_scalar(x, self._s, self._inv, self.qmin, self.qmax)
        return clipped_fake_quantize(x, self.scale, None, self.qmin, self.qmax)

    def linear_input(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, weight_args: FusedWeight | None = None,
        round_bias: bool = False,
    ) -> Tensor | None:
        """``F.linear(self(x), w, bias)`` in one fused call (one autograd node; ``w``: see
        :meth:`Quantizer.linear_input`) for float32 CPU tensors: the same values and gradients."""
        if (
            torch.is_autocast_enabled("cpu")
            or x.dim() < 2
            or x.shape[-1] != weight.shape[-1]  # (F.linear's own error message then)
            or not (fusable(x) and fusable(weight))
        ):
            return None
        k = kernels.get()
        if k is None:
            return None
        s, lo, hi = self._s, self.qmin, self.qmax
        return self._on_rows(lambda rows: k.clipped_linear(rows, s, lo, hi, weight, bias, *(weight_args or ()),
                                                           round_bias=round_bias), x)

    def used_scale(self) -> Tensor | None:
        return self.scale

    def grid(self) -> AffineGrid:
        return AffineGrid(self.scale.clone(), torch.zeros((), dtype=torch.int64), self.qmin, self.qmax, None)

    def load_grid(self, grid: AffineGrid, tracked: Any = None) -> None:
        if (grid.qmin, grid.qmax) != (self.qmin, self.qmax) or not torch.equal(grid.scale.reshape(()), self.scale):
            raise ValueError("a DoReFa activation grid is fixed by its bits; this calibration does not match")

    def _describe_codes(self) -> str:
        return f"clip [0, 1], codes [{self.qmin}, {self.qmax}]"


class GradientQuantizer(nn.Module):
    """Identity forward; DoReFa's k-bit stochastic quantization of the gradient in training mode."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, x: Tensor) -> Tensor:
        return quantize_gradient(x, self.bits) if self.training and x.requires_grad else x

    def extra_repr(self) -> str:
        return f"gradient {self.bits}b stochastic"


def _optional_bits(v: Any) -> bool:
    return v is None or is_int(1, 16)(v)


@register_method
class DoReFa(Method):
    name = "dorefa"
    options = {
        "weight_range": WEIGHT_RANGE,
        "bias_quant": BIAS_QUANT,
        "dorefa_variant": Option(
            "learned",
            one_of("learned", "scaled", "paper"),
            "'learned', 'scaled' or 'paper'",
            "weight transform (see lowbit.methods.dorefa)",
        ),
        "gradient_bits": Option(None, _optional_bits, "None or an integer 1..16", "quantize output gradients (paper eq. 12)"),
    }
    schemes = {"weight": ("symmetric",), "input": ("symmetric",), "output": ("symmetric",)}
    dtypes = {"weight": ("int",), "input": ("uint",), "output": ("uint",)}
    granularities = {"weight": ("per_tensor",), "input": ("per_tensor",), "output": ("per_tensor",)}

    @classmethod
    def check_layer(cls, layer: LayerSpec, module: nn.Module) -> None:
        if layer.weight is not None and layer.weight.reduced and layer.options["dorefa_variant"] == "paper":
            raise ConfigError("weight_range 'reduced' needs dorefa_variant 'learned' or 'scaled' (the paper's grid is fixed)")

    @classmethod
    def build_quantizer(cls, spec: TensorSpec, layer: LayerSpec, module: nn.Module) -> Quantizer:
        if spec.quant_type == "weight":
            return DoReFaWeightQuantizer(spec, layer.options["dorefa_variant"], module.weight)
        return DoReFaActivationQuantizer(spec)

    @classmethod
    def build_grad_quantizer(cls, layer: LayerSpec, module: nn.Module) -> nn.Module | None:
        bits = layer.options["gradient_bits"]
        return GradientQuantizer(bits) if bits else None
