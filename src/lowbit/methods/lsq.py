"""LSQ: learned step size quantization (Esser et al. 2020), with LSQ+'s learned offset as an option
(Bhalgat et al. 2020).

* every quantizer has a learned step ``s`` (the ``scale`` parameter): ``x_hat = clamp(round(x/s),
  -Qn, Qp) * s``; weights use the signed grid ``Qn = 2^(b-1)``, ``Qp = 2^(b-1)-1`` (full range,
  like the paper), per-tensor or per-channel;
* activations are signed (``Qn = 2^(b-1)``, ``Qp = 2^(b-1)-1``) or unsigned (``Qn = 0``,
  ``Qp = 2^b-1``): ``quant_dtype`` ``int`` / ``uint`` sets it, otherwise it is detected on the
  first training batch (unsigned when that batch has no negative value);
* initialisation: ``s = 2 * mean|v| / sqrt(Qp)`` — from the weights at :func:`lowbit.quantize`,
  from the first training batch for activations;
* gradients: clipped STE for ``x``; for the step, the paper's
  ``d x_hat / d s = round(x/s) - x/s`` inside the range and ``-Qn`` / ``Qp`` outside, times the
  gradient scale ``g = 1 / sqrt(N * Qp)`` with ``N`` the number of weights of the layer (per
  channel: of the channel) or the number of features of one sample (``numel / batch``) for
  activations;
* ``lsq_plus: True``: activations get a learned offset too, as an integer zero point on unsigned
  codes ``[0, 2^b-1]`` (learned as a float, rounded in the forward pass, straight-through), so the
  grid stays exportable.  Weights stay symmetric, as in LSQ+.  Initialisation, ``lsq_plus_init``:
  ``"paper"`` (default) as LSQ+ — activations: the range ``[lo, hi]`` whose grid gives the least
  mean squared error on the first batch (:func:`mse_range`), weights: ``s = max(|mu - 3 sigma|,
  |mu + 3 sigma|) / 2^(b-1)``; ``"minmax"``: activations from the first batch's min/max, weights as
  LSQ.

The steps (and offsets) are ``nn.Parameter`` s: :func:`lowbit.quantize` adds them to the optimizer
you pass as a new parameter group (no weight decay), or see :func:`lowbit.quantizer_parameters`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import ConfigError, LayerSpec, TensorSpec
from ..fake_quant import (MIN_SCALE, AffineGrid, affine_qparams, exact_div, float32_codes, fusable, lsq_fake_quantize,
                          qrange)
from .base import (BIAS_QUANT, WEIGHT_RANGE, FusedWeight, Method, NotCalibratedError, Option, Quantizer, all_reduce_, check_finite,
                   ddp_group, in_backward, is_bool, member, one_of, register_method)

__all__ = ["LSQ", "LSQQuantizer", "mse_range"]


#: candidates per end of the range in :func:`mse_range` (a grid of MSE_GRID**2 ranges)
MSE_GRID = 20
#: elements of the batch that :func:`mse_range` evaluates (an evenly strided subsample beyond this)
MSE_SAMPLE = 1 << 16


def mse_range(x: Tensor, qmin: int, qmax: int, grid: int = MSE_GRID) -> tuple[Tensor, Tensor]:
    """LSQ+'s initialisation of an affine activation grid: of the ranges ``[a * min(x, 0),
    b * max(x, 0)]`` with ``a, b`` in ``{1, (grid-1)/grid, ..., 1/grid}``, the one whose grid
    (:func:`lowbit.fake_quant.affine_qparams`: integer zero point, codes ``[qmin, qmax]``)
    fake-quantizes ``x`` with the least mean squared error; ties go to the wider range.  Evaluated
    on at most ``MSE_SAMPLE`` elements (an evenly strided subsample: no random numbers drawn).
    Returns ``(lo, hi)`` as 0-d float32 tensors on ``x``'s device."""
    v = x.detach().reshape(-1).float()
    if v.numel() > MSE_SAMPLE:
        v = v[:: -(-v.numel() // MSE_SAMPLE)]
    lo0, hi0 = v.min().clamp(max=0.0), v.max().clamp(min=0.0)
    fractions = torch.arange(grid, 0, -1, device=v.device, dtype=torch.float32) / grid  # 1 first
    his = hi0 * fractions  # [grid]
    best = (torch.tensor(float("inf"), device=v.device), lo0, hi0)
    for a in fractions:
        lo = (lo0 * a).expand(grid)
        scale, zp = affine_qparams(lo, his, qmin, qmax, symmetric=False)
        scale, zp = scale[:, None], zp[:, None].to(torch.float32)
        q = torch.clamp(torch.round(v[None, :] / scale) + zp, qmin, qmax)
        err = ((q - zp) * scale - v[None, :]).square_().mean(1)  # [grid]
        i = torch.argmin(err)  # (the first of equal minima: the widest)
        better = err[i] < best[0]
        best = (torch.where(better, err[i], best[0]), torch.where(better, lo[i], best[1]),
                torch.where(better, his[i], best[2]))
        if lo0 == 0:  # (every a gives the same ranges)
            break
    return best[1], best[2]


class LSQQuantizer(Quantizer):
    """A learned-step quantizer (see the module docstring).  ``plus_init`` (with ``lsq_plus``, or
    for a weight of an LSQ+ layer): ``"paper"`` or ``"minmax"``."""

    def __init__(
        self, spec: TensorSpec, weight: Tensor | None = None, *, lsq_plus: bool = False, plus_init: str = "minmax"
    ) -> None:
        channels = weight.shape[0] if weight is not None else None
        super().__init__(spec, channels)
        self.is_weight = spec.quant_type == "weight"
        self.learn_offset = bool(lsq_plus) and not self.is_weight
        self.plus_init = plus_init if lsq_plus else None
        self.scale = nn.Parameter(torch.ones(self._shape))
        if self.learn_offset:
            self.zero_point = nn.Parameter(torch.zeros(self._shape))
        else:
            self.zero_point = None
        # signedness of the codes: fixed for weights and when quant_dtype is given
        self.register_buffer("signed", torch.tensor(spec.dtype != "uint"))
        self.register_buffer("initialized", torch.tensor(False))
        self._auto_sign = spec.dtype is None
        self._initialized = False
        self._set_range(spec.dtype != "uint")
        self._record_codes()
        self._weight_gf = 1.0
        #: the rank of one unbatched sample of the layer's activations (Conv2d: 3, Linear: 1): a tensor
        #: of this rank or less is one sample for the gradient scale, a larger one a batch
        self.sample_rank = 1
        if weight is not None:
            with torch.no_grad():
                self._init_from(weight.detach())
            per = weight[0].numel() if self.axis is not None else weight.numel()
            self._weight_gf = 1.0 / math.sqrt(per * self._qp)

    def _loadable_codes(self) -> set[tuple[int, int]]:
        if self._auto_sign:  # (the state's own `signed` decides)
            return {qrange(self.spec.range_bits, True), qrange(self.spec.range_bits, False)}
        return {self._codes()}

    def _set_range(self, signed: bool) -> None:
        self.qmin, self.qmax = qrange(self.spec.range_bits, signed)
        # Qp of the paper: the number of positive levels (all levels above the zero point for LSQ+)
        self._qp = self.qmax - self.qmin if self.learn_offset else self.qmax

    def _sync(self) -> None:
        self._initialized = bool(self.initialized)
        self._set_range(bool(self.signed))

    @torch.no_grad()
    def _init_from(self, x: Tensor) -> None:
        # in a DDP forward pass (activations: DDP broadcasts the weights' steps), every process
        # starts from the same step: the sign of all first batches, the mean of their steps (and
        # offsets); a process with an empty batch takes part with neutral values
        group = None if self.is_weight else ddp_group()
        empty = x.numel() == 0
        if empty and group is None:
            raise ValueError(f"this LSQ {self.quant_type} quantizer initialises its step from its first batch, "
                             "which is empty: start training (or lowbit.calibrate) with a non-empty batch")
        if not empty:
            check_finite(x)
        if not x.is_floating_point():  # (an integer input: its values are what the grid sees)
            x = x.float()
        if self._auto_sign:
            lowest = torch.full((), math.inf, device=self.scale.device) if empty else x.min().float()
            if group is not None:
                all_reduce_(lowest, "min", group)
            if lowest == math.inf:  # (every process's batch was empty: a later one initialises)
                return
            signed = bool(lowest < 0)
            self.signed.fill_(signed)
            self._set_range(signed)
        if not empty:
            self._init_step(x)
        if group is not None:
            parts = [self.scale.data.reshape(()), torch.zeros((), device=self.scale.device)]
            if self.zero_point is not None:
                parts[1] = self.zero_point.data.reshape(())
            v = torch.stack([*parts, torch.ones((), device=self.scale.device)]) * (0.0 if empty else 1.0)
            all_reduce_(v, "sum", group)
            if v[2] == 0:
                return
            self.scale.copy_((v[0] / v[2]).reshape(self.scale.shape))
            if self.zero_point is not None:
                self.zero_point.copy_((v[1] / v[2]).reshape(self.zero_point.shape))
        self.initialized.fill_(True)
        self._initialized = True

    def _init_step(self, x: Tensor) -> None:
        """The step (and offset) from the tensor ``x`` alone (see the module docstring)."""
        if self.learn_offset:
            if self.plus_init == "paper":
                lo, hi = mse_range(x, self.qmin, self.qmax)
            else:
                lo, hi = torch.aminmax(x.float())
            scale, _ = affine_qparams(lo, hi, self.qmin, self.qmax, symmetric=False)
            zp = (self.qmin - torch.clamp(lo, max=0.0) / scale).clamp(self.qmin, self.qmax)
            self.scale.copy_(scale)
            self.zero_point.copy_(zp)
        elif self.is_weight and self.plus_init == "paper":  # LSQ+: max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)
            v = x.float().reshape(x.shape[0], -1) if self.axis is not None else x.float().reshape(1, -1)
            mu, sigma = v.mean(1), v.std(1, correction=0)
            bound = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs())
            self.scale.copy_(exact_div(bound, -self.qmin).clamp(min=MIN_SCALE).reshape(self.scale.shape))
        else:
            if self.axis is not None:
                mean_abs = x.abs().reshape(x.shape[0], -1).mean(1)
            else:
                mean_abs = x.abs().mean()
            self.scale.copy_(exact_div(2 * mean_abs, math.sqrt(self._qp)).clamp(min=MIN_SCALE))

    @float32_codes
    def forward(self, x: Tensor) -> Tensor:
        if not self._initialized and bool(self.initialized):  # the buffers were written in place (a copy)
            self._sync()
        if not self._initialized:
            if x.numel() == 0:  # an empty batch: nothing to initialise from, nothing to quantize
                if self.training and not self.is_weight and not in_backward() and ddp_group() is not None:
                    self._init_from(x)  # (its part in the processes' initialisation)
                if not self._initialized:
                    return x
            elif not self.training:
                raise NotCalibratedError(
                    f"this LSQ {self.quant_type} quantizer has seen no data: its step is initialised "
                    "from the first training batch (or lowbit.calibrate(model, batches))"
                )
            else:
                self._init_from(x.detach())
        return lsq_fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax, self._grad_factor(x), self.axis)

    def replay_problem(self, steps_ahead: int = 0) -> str | None:
        return self._unseen_problem(steps_ahead)

    def _grad_factor(self, x: Tensor) -> float:
        if self.is_weight:
            return self._weight_gf
        # N of the paper: the features of one sample (an unbatched input is one sample)
        n = math.prod(x.shape[1:]) if x.dim() > self.sample_rank else x.numel()
        return 1.0 / math.sqrt(max(n, 1) * self._qp)

    def fused_weight(self, weight: Tensor) -> FusedWeight | None:
        scale = member(self, "scale")
        if (
            not self.is_weight
            or not self._initialized
            or self.axis is not None
            or not (fusable(weight) and fusable(scale))
        ):
            return None
        return scale, self.qmin, self.qmax, self._weight_gf, False

    def linear_input(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, weight_args: FusedWeight | None = None,
        round_bias: bool = False,
    ) -> Tensor | None:
        """``F.linear(self(x), w, bias)`` in one fused call (one autograd node; ``w``: see
        :meth:`Quantizer.linear_input`) where it applies: a per-tensor input step, float32 on the
        CPU.  Same values and gradients as the unfused calls, and where ``x`` needs no gradient (a
        model's first layer) the step's gradient visits only the nonzero ``x_hat - x`` instead of
        forming the dense ``dL/dx_hat`` (a GEMM as large as the layer's forward; on MNIST ~80% of it
        is multiplied by zero pixels) — :mod:`lowbit.kernels`: the same sum in another order."""
        if not self._initialized and self.training and not self.is_weight and x.numel() and not in_backward():
            # initialise here, not in forward: a recomputed forward (activation checkpointing) then
            # takes the same (fused) path as the first one did
            self._init_from(x.detach())
        scale = member(self, "scale")
        if (
            self.is_weight
            or not self._initialized
            or torch.is_autocast_enabled("cpu")  # (its bfloat16 output's gradient meets float32 saves)
            or self.axis is not None
            or self.zero_point is not None
            or x.dim() < 2
            or x.shape[-1] != weight.shape[-1]  # (F.linear's own error message then)
            or not (fusable(x) and fusable(weight) and fusable(scale))
        ):
            return None
        k = kernels.get()
        if k is None:
            return None
        qmin, qmax, gf = self.qmin, self.qmax, self._grad_factor(x)
        return self._on_rows(lambda rows: k.lsq_linear(rows, scale, weight, bias, qmin, qmax, gf, *(weight_args or ()),
                                                       round_bias=round_bias), x)

    def used_scale(self) -> Tensor | None:
        if not self._initialized:
            return None
        return self.scale.detach().abs().clamp_min(MIN_SCALE)  # (as grid() and the kernels take it)

    def grid(self) -> AffineGrid:
        if not self._initialized:
            raise NotCalibratedError(f"this LSQ {self.quant_type} quantizer has not been initialised")
        scale = self.scale.detach().abs().clamp_min(MIN_SCALE)
        if self.zero_point is None:
            zp = torch.zeros_like(scale, dtype=torch.int64)
        else:
            zp = torch.round(self.zero_point.detach()).clamp(self.qmin, self.qmax).to(torch.int64)
        return AffineGrid(scale, zp, self.qmin, self.qmax, self.axis)

    @torch.no_grad()
    def load_grid(self, grid: AffineGrid, tracked: Any = None) -> None:
        signed = grid.qmin < 0
        if qrange(self.spec.range_bits, signed) != (grid.qmin, grid.qmax):
            raise ValueError(f"grid codes [{grid.qmin}, {grid.qmax}] do not fit this {self.spec.bits}-bit LSQ quantizer")
        if self.zero_point is None and bool((grid.zero_point != 0).any()):
            raise ValueError("this LSQ quantizer has no offset (set lsq_plus to load a zero point)")
        self.scale.copy_(grid.scale.reshape(self.scale.shape))
        if self.zero_point is not None:
            self.zero_point.copy_(grid.zero_point.to(torch.float32).reshape(self.zero_point.shape))
        self.signed.fill_(signed)
        self.initialized.fill_(True)
        self._sync()

    def _describe_codes(self) -> str:
        if not self._initialized and self._auto_sign:
            return "codes signed/unsigned decided on the first batch"
        return f"codes [{self.qmin}, {self.qmax}]" + (", learned offset" if self.learn_offset else "")


@register_method
class LSQ(Method):
    name = "lsq"
    options = {
        "weight_range": WEIGHT_RANGE,
        "bias_quant": BIAS_QUANT,
        "lsq_plus": Option(False, is_bool, "True or False", "learn an offset (integer zero point) for activations"),
        "lsq_plus_init": Option(
            "paper", one_of("paper", "minmax"), "'paper' or 'minmax'",
            "with lsq_plus: LSQ+'s initialisation (MSE-optimal activation range, 3-sigma weight step) or min/max",
        ),
    }
    schemes = {
        "weight": ("symmetric",),
        "input": ("symmetric", "affine"),
        "output": ("symmetric", "affine"),
    }
    dtypes = {
        "weight": ("int",),
        "input": (None, "int", "uint"),
        "output": (None, "int", "uint"),
    }
    min_range_bits = 2

    @classmethod
    def resolve_tensor(cls, quant_type, bits, scheme, dtype, granularity, options) -> TensorSpec:  # type: ignore[override]
        if options["lsq_plus_init"] != "paper" and not options["lsq_plus"]:
            raise ConfigError("lsq_plus_init chooses LSQ+'s initialisation: it needs lsq_plus: True")
        if quant_type != "weight":
            if options["lsq_plus"]:
                if scheme == "symmetric":
                    raise ConfigError("lsq_plus learns an offset: its activations are affine, not symmetric")
                scheme = "affine"
                dtype = dtype or "uint"
            elif scheme == "affine":
                raise ConfigError("LSQ activations are symmetric (zero point 0); set lsq_plus: True to learn an offset")
        return super().resolve_tensor(quant_type, bits, scheme, dtype, granularity, options)

    @classmethod
    def build_quantizer(cls, spec: TensorSpec, layer: LayerSpec, module: nn.Module) -> Quantizer:
        plus, init = layer.options["lsq_plus"], layer.options["lsq_plus_init"]
        if spec.quant_type == "weight":
            return LSQQuantizer(spec, module.weight, lsq_plus=plus, plus_init=init)
        q = LSQQuantizer(spec, lsq_plus=plus, plus_init=init)
        if isinstance(module, nn.modules.conv._ConvNd):  # (C, *spatial) unbatched: a Conv2d's is 3-D
            q.sample_rank = 1 + len(module.kernel_size)
        return q
