"""PTQ: post-training quantization by range calibration, no training.

Quantize the model, then run a few batches through it with :func:`lowbit.calibrate` (or in
training mode under ``torch.no_grad()``): activation quantizers record the range of what they
see, weight quantizers take the range of the weights.  In eval mode the ranges are frozen.

* weights: symmetric on the narrow signed grid ``[-(2^(b-1)-1), 2^(b-1)-1]``, scale
  ``max|w| / (2^(b-1)-1)``, per-tensor by default (per-channel, affine on request);
* activations: affine on unsigned codes ``[0, 2^b-1]`` by default; ``calibration``:
  ``"minmax"`` (running min and max over all calibration batches) or ``"percentile"`` (mean over
  batches of the batch's ``percentile``-th / ``(100-percentile)``-th percentile, robust to
  outliers).  The range always contains 0.
"""

from __future__ import annotations

from torch import nn

from ..config import LayerSpec, TensorSpec
from .base import BIAS_QUANT, WEIGHT_RANGE, Method, Option, Quantizer, RangeQuantizer, is_number, one_of, register_method

__all__ = ["PTQ"]


@register_method
class PTQ(Method):
    name = "ptq"
    range_grid = True
    options = {
        "weight_range": WEIGHT_RANGE,
        "bias_quant": BIAS_QUANT,
        "calibration": Option("minmax", one_of("minmax", "percentile"), "'minmax' or 'percentile'", "activation range estimator"),
        "percentile": Option(99.99, is_number(50.0, 100.0, open_hi=False), "a number in (50, 100]", "for calibration 'percentile'"),
    }

    @classmethod
    def build_quantizer(cls, spec: TensorSpec, layer: LayerSpec, module: nn.Module) -> Quantizer:
        if spec.quant_type == "weight":
            return RangeQuantizer(spec, module.weight.shape[0], tracking="current")
        return RangeQuantizer(spec, tracking=layer.options["calibration"], percentile=layer.options["percentile"])
