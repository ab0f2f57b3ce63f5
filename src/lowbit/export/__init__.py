"""Real integer export: QDQ ONNX with int8 or packed int4 weights, and ONNX Runtime sessions for it.

    lowbit.export(model, "vae.onnx", format="onnx-int8")        # this module is callable
    lowbit.export.export_run("runs/lsq-c0", "vae.onnx", "onnx-int4")
    sess = lowbit.export.load_session("vae.eps.onnx")

See ``docs/EXPORT.md`` for the graph forms, the numerics and the measurements.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

__all__ = [
    "ExportError",
    "FORMATS",
    "export",
    "export_run",
    "eps_path",
    "load_session",
    "op_type_counts",
    "optimized_graph",
    "vae_test_loss",
    "cpu_features",
]

FORMATS = ("onnx-int8", "onnx-int4", "onnx-fp32")


def __getattr__(name: str) -> Any:  # lazy: importing lowbit must not import onnx / onnxruntime
    if name in ("ExportError", "plan_layers", "find_quantized_layers", "export_onnx_bytes"):
        from . import onnx as _onnx

        return getattr(_onnx, name)
    if name in ("load_session", "op_type_counts", "optimized_graph", "vae_test_loss", "cpu_features",
                "DeployedModel", "SessionInfo", "prepare_model", "u8s8_can_saturate"):
        from . import runtime as _runtime

        return getattr(_runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def export(model, path: str | os.PathLike, format: str = "onnx-int8", **kwargs: Any) -> Path:
    """Write ``model`` as a QDQ ONNX file; see :func:`lowbit.export.onnx.export` for the options."""
    from .onnx import export as _export

    return _export(model, path, format, **kwargs)


def eps_path(path: str | os.PathLike) -> Path:
    """Where :func:`export_run` puts a VAE's eps graph next to ``path``: ``vae.onnx`` -> ``vae.eps.onnx``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.eps{p.suffix}") if p.suffix else p.with_name(f"{p.name}.eps.onnx")


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, format: str = "onnx-int8") -> Path:
    """Export the model saved in ``run_dir`` to ``out`` and return ``out``.

    For a VAE, ``out`` is the deterministic inference graph (input ``x`` (B, 784), z = mu; outputs
    logits, mu, logvar) and :func:`eps_path` (``<out stem>.eps.onnx``) the graph with ``eps`` as a
    second input, for the deployed test loss.  Both are validated before either is written.
    """
    from ..checkpoint import load_model
    from .onnx import ExportError, _atomic_write, _is_vae, export_onnx_bytes

    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if not Path(out).name:
        raise ExportError(f"{str(out)!r} names no file; give a file name (e.g. model.onnx)")
    model = load_model(run_dir)
    out = Path(out)
    if _is_vae(model):
        det = export_onnx_bytes(model, format, vae_graph="deterministic")
        eps = export_onnx_bytes(model, format, vae_graph="eps")
        for path in (out, eps_path(out)):  # both paths usable before either file is written
            if path.is_dir():
                raise ExportError(f"{path} is a folder; give a file name (e.g. {path / 'model.onnx'})")
        _atomic_write(eps_path(out), eps)
        return _atomic_write(out, det)
    raise ExportError(f"{run_dir}: export_run knows how to trace lowbit's VAE; for a "
                      f"{type(model).__name__} call lowbit.export(model, path, example_inputs=...)")


class _CallableModule(types.ModuleType):
    """``lowbit.export(model, path, ...)`` works whether ``lowbit.export`` is this module or the function."""

    def __call__(self, model, path, format: str = "onnx-int8", **kwargs: Any) -> Path:
        return export(model, path, format, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
