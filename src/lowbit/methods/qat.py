"""QAT: quantization-aware training with affine ranges (Jacob et al. 2018, "Quantization and
Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference").

* weights: affine per-tensor by default (per-channel and symmetric on request); the range is the
  current weight's min/max (widened to contain 0) at every forward pass; codes signed
  ``[-2^(b-1), 2^(b-1)-1]`` with an integer zero point inside that range (``quant_dtype: uint``
  gives NNI's ``[0, 2^b-1]``);
* activations (``input``/``output``): affine on unsigned codes ``[0, 2^b-1]`` by default; the
  range is an exponential moving average of batch min/max (decay ``ema_decay`` = 0.99, the first
  batch initialises it), tracked in training mode and frozen in eval mode;
* gradient: the clipped straight-through estimator;
* ``quant_start_step``: the first N training forward passes of each layer run in float (the
  activation ranges are tracked meanwhile), as the paper's delayed activation quantization.
"""

from __future__ import annotations

from torch import nn

from ..config import LayerSpec, TensorSpec
from .base import BIAS_QUANT, WEIGHT_RANGE, Method, Option, Quantizer, RangeQuantizer, is_int, is_number, register_method

__all__ = ["QAT"]


@register_method
class QAT(Method):
    name = "qat"
    range_grid = True
    options = {
        "weight_range": WEIGHT_RANGE,
        "bias_quant": BIAS_QUANT,
        "quant_start_step": Option(0, is_int(0), "an integer >= 0", "training forward passes to run in float first"),
        "ema_decay": Option(0.99, is_number(0.0, 1.0), "a number in (0, 1)", "decay of the activation range EMA"),
    }
    schemes = {
        "weight": ("affine", "symmetric"),
        "input": ("affine", "symmetric"),
        "output": ("affine", "symmetric"),
    }

    @classmethod
    def build_quantizer(cls, spec: TensorSpec, layer: LayerSpec, module: nn.Module) -> Quantizer:
        start = layer.options["quant_start_step"]
        if spec.quant_type == "weight":
            return RangeQuantizer(spec, module.weight.shape[0], tracking="current", start_step=start)
        return RangeQuantizer(spec, tracking="ema", decay=layer.options["ema_decay"], start_step=start)
