"""lowbit: quantization-aware training for PyTorch with a real integer export.

The public API (see README):

    model = lowbit.quantize(model, config_list, method="lsq", optimizer=optimizer)
    calib = lowbit.calibration_config(model)
    plain = lowbit.fold(model)
    lowbit.export(model, "model.onnx", format="onnx-int8")
"""

from __future__ import annotations

__version__ = "0.3.9"

from .models import VAE, build_model  # noqa: E402

__all__ = ["__version__", "VAE", "build_model"]

from .quantize import calibrate, calibration_config, fold, load_calibration_config, quantize, quantizer_parameters  # noqa: E402

__all__ += ["quantize", "calibration_config", "fold", "calibrate", "load_calibration_config", "quantizer_parameters"]

from .fake_quant import tensor_path  # noqa: E402  (CPU training under torch.compile: see docs/QUANTIZERS.md)

__all__ += ["tensor_path"]

from .graphs import CaptureError, capture_step  # noqa: E402  (a training step as one CUDA graph replay)

__all__ += ["capture_step", "CaptureError"]

from .modules import TransformError  # noqa: E402  (a quantized layer inside a torch.func transform)

__all__ += ["TransformError"]

from . import export  # noqa: E402  (a callable module: lowbit.export(model, path, format="onnx-int8"))

__all__ += ["export"]
