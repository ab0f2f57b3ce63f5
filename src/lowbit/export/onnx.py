"""QDQ ONNX export: a model quantized by any lowbit method -> a standard ONNX file with integer weights.

How the graph is made (see ``docs/EXPORT.md`` for the measurements behind each choice):

1. A copy of the model is traced with ``torch.onnx.export`` (TorchScript exporter, opset 21) with
   every quantized layer (:class:`lowbit.modules.QuantWrapper`) replaced by a marker op
   ``lowbit::QLayer``; layers the config left in float are exported as PyTorch writes them.
2. Each marker is rewritten from the layer's quantizer grids (never from re-quantized weights):

   * input quantizer  -> ``QuantizeLinear -> DequantizeLinear`` (uint8; a signed grid is shifted
     by 128, which is exact; a grid with fewer codes than the stored type gets a ``Clip`` of its
     codes to its own range between the two, as the simulation clamps: in float before the
     ``QuantizeLinear`` with ``activations="int8"``, the form TensorRT reads);
   * weights          -> an **integer initializer** (int8, or int4 packed two per byte) ->
     ``DequantizeLinear`` with the weight grid's scale and zero point (per tensor or per channel);
   * bias             -> int32 at scale ``s_in * s_w`` -> ``DequantizeLinear`` (what ONNX Runtime's
     integer GEMM adds; float where the layer has no input grid);
   * the layer        -> ``Gemm`` (int8, 2-D input), ``MatMul + Add`` (int4; N-D input), ``Conv``;
   * output quantizer -> ``QuantizeLinear -> DequantizeLinear`` after it.

   ONNX Runtime fuses the int8 form into ``QGemm`` / ``QLinearConv`` (integer kernels); the tests
   read the optimized graph to check that no float GEMM is left on a quantized layer.
3. The file is written atomically: on any error nothing is left at the output path.

The numbers in the file are the simulation's: the same codes (``quantize_int``), scales, zero
points, rounding (half to even) and clipping.  Nothing is re-quantized at export: a model whose
weights are not on a grid that the format can hold is refused with :class:`ExportError`.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "ExportError",
    "FORMATS",
    "LayerPlan",
    "ActGrid",
    "export",
    "export_onnx_bytes",
    "plan_layers",
    "find_quantized_layers",
    "pack_int4",
    "unpack_int4",
]

FORMATS = ("onnx-int8", "onnx-int4", "onnx-fp32")
OPSET = 21
DOMAIN = "lowbit"
#: no-op nodes that steer ONNX Runtime's fusions; their names say why (see _guard_* below).
#: ``fanout``: keeps a GEMM output that feeds a QuantizeLinear and something else fusable;
#: ``nbits``: keeps an int4 MatMul's activation DequantizeLinear out of the QDQ selector, so plain
#: ONNX Runtime fuses DequantizeLinear(int4) + MatMul into its 4-bit kernel (MatMulNBits);
#: ``bias``: keeps a float bias float; ``float_weight``: keeps a float-weight layer's weights float.
GUARD_PREFIX = "lowbit_guard/"
GUARD_FANOUT = GUARD_PREFIX + "fanout/"
GUARD_NBITS = GUARD_PREFIX + "nbits/"
GUARD_BIAS = GUARD_PREFIX + "bias/"
GUARD_FLOATW = GUARD_PREFIX + "float_weight/"
BIAS_MODES = ("auto", "int32", "float")


class ExportError(ValueError):
    """The model cannot be exported as asked; the message names the layer and the fix."""


# --------------------------------------------------------------------------------------------
# layer discovery and validation
# --------------------------------------------------------------------------------------------


def _is_wrapper(m: nn.Module) -> bool:
    """A lowbit QuantWrapper (or anything honouring its contract: ``module`` + three quantizers)."""
    try:
        from ..modules import QuantWrapper  # type: ignore[attr-defined]

        if isinstance(m, QuantWrapper):
            return True
    except Exception:  # modules.py not there yet / import error: fall back to the contract
        pass
    return all(hasattr(m, a) for a in ("module", "weight_quantizer", "input_quantizer", "output_quantizer"))


def find_quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, wrapper)`` of every quantized layer, outermost first (not nested)."""
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()  # a wrapper registered under two names (tied layers) is one layer

    def walk(mod: nn.Module, prefix: str) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if _is_wrapper(child):
                if id(child) not in seen:
                    seen.add(id(child))
                    found.append((full, child))
            else:
                walk(child, full)

    walk(model, "")
    return found


@dataclass(frozen=True)
class ActGrid:
    """A per-tensor activation grid, as stored in the file: uint8 (or int8) codes.

    ``clip`` is ``(lo, hi)`` in float when the simulated grid has fewer than 256 levels: the
    simulation clamps to ``[qmin, qmax]``, which uint8 saturation alone would not do; ``codes``
    is that range of stored codes (``(0, 255)`` or ``(-128, 127)`` for a full grid).
    """

    scale: float
    zero_point: int  # the stored zero point (the simulated one, shifted with the codes)
    clip: tuple[float, float] | None
    levels: int
    dtype: str = "uint8"  # "uint8" | "int8"
    codes: tuple[int, int] = (0, 255)


@dataclass
class LayerPlan:
    """Everything the file needs about one quantized layer, taken from its quantizers."""

    index: int
    name: str
    kind: str  # "linear" | "conv2d"
    module: nn.Module
    weight_bits: int | None  # bits the weight grid needs (ceil(log2(levels))), None if float
    w_codes: np.ndarray | None  # int64 codes shifted into the stored type's range, weight layout
    w_scale: np.ndarray | None  # float32, () or (C_out,)
    w_zero_point: np.ndarray | None  # int64, shifted like the codes
    w_float: np.ndarray  # the weights the simulation uses (dequantized codes, or the float weight)
    bias: np.ndarray | None
    act_in: ActGrid | None
    act_out: ActGrid | None
    info: dict[str, Any] = field(default_factory=dict)


def _grid(q: nn.Module, what: str, name: str):
    try:
        return q.grid()
    except Exception as e:  # NotCalibratedError and friends: one clear message
        kind = type(e).__name__
        if "NotCalibrated" in kind:
            raise ExportError(
                f"layer {name!r}: its {what} quantizer was never calibrated ({e}); run the model on "
                "calibration data (or train it) before exporting"
            ) from e
        raise ExportError(f"layer {name!r}: cannot read its {what} quantizer's grid ({kind}: {e})") from e


def _check_scale(scale: Tensor, zp: Tensor, what: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    s = scale.detach().to(torch.float32).cpu().numpy()
    z = zp.detach().cpu().numpy()
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        bad = s[~(np.isfinite(s) & (s > 0))].ravel()[:3]
        raise ExportError(
            f"layer {name!r}: {what} scale is not a positive finite number ({bad.tolist()}): the "
            "quantizer's state is broken (NaN from training, or never calibrated); retrain or recalibrate"
        )
    if not np.all(np.isfinite(z.astype(np.float64))) or np.any(z != np.round(z)):
        raise ExportError(f"layer {name!r}: {what} zero point is not an integer ({z.ravel()[:3].tolist()})")
    return s, z.astype(np.int64)


def _act_grid(q: nn.Module, what: str, name: str, act_dtype: str = "uint8") -> ActGrid:
    g = _grid(q, what, name)
    s, z = _check_scale(g.scale, g.zero_point, what, name)
    if g.axis is not None and s.size > 1:
        raise ExportError(
            f"layer {name!r}: per-channel {what} quantization cannot run on integer kernels; use a "
            "per-tensor activation quantizer"
        )
    s, z = float(s.reshape(-1)[0]), int(z.reshape(-1)[0])
    levels = g.qmax - g.qmin + 1
    if levels > 256:
        raise ExportError(
            f"layer {name!r}: its {what} grid has {levels} levels; integer kernels take at most 8-bit "
            "activations"
        )
    lo, hi = (0, 255) if act_dtype == "uint8" else (-128, 127)
    off = _fit_codes(g.qmin, g.qmax, lo, hi)
    assert off is not None  # levels <= 256
    zp = z + off
    if not lo <= zp <= hi:
        raise ExportError(f"layer {name!r}: {what} zero point {z} lies outside its grid [{g.qmin}, {g.qmax}]")
    clip = None
    if (g.qmin + off, g.qmax + off) != (lo, hi):
        # the simulation clamps to [qmin, qmax], narrower than the stored type saturates
        clip = (float(np.float32((g.qmin - z) * np.float32(s))), float(np.float32((g.qmax - z) * np.float32(s))))
    return ActGrid(scale=s, zero_point=zp, clip=clip, levels=levels, dtype=act_dtype,
                   codes=(g.qmin + off, g.qmax + off))


def _fit_codes(qmin: int, qmax: int, lo: int, hi: int) -> int | None:
    """Offset ``off`` with ``[qmin+off, qmax+off]`` inside ``[lo, hi]`` (0 preferred), else None."""
    if qmin >= lo and qmax <= hi:
        return 0
    if qmax - qmin > hi - lo:
        return None
    return lo - qmin  # shift the grid to start at the type's lowest code


def _bits_for(levels: int) -> int:
    return max(1, math.ceil(math.log2(levels)))


def plan_layers(model: nn.Module, fmt: str = "onnx-int8", activations: str = "uint8") -> list[LayerPlan]:
    """Validate every quantized layer of ``model`` for ``fmt`` and collect what the file stores.

    Raises :class:`ExportError` for never-calibrated quantizers, NaN/zero scales, unsupported layer
    types, grids the format cannot hold (e.g. 8-bit weights in ``onnx-int4``) and quantizer states
    whose integer codes do not reproduce their own fake-quantized output.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if activations not in ("uint8", "int8"):
        raise ExportError(f"activations must be 'uint8' or 'int8', got {activations!r}")
    plans = []
    wide: ExportError | None = None  # onnx-int4: the first layer whose weights only int8 holds
    layers = find_quantized_layers(model)
    if not layers and fmt != "onnx-fp32":
        raise ExportError(f"the model is not quantized, so {fmt} has nothing to store in integers; quantize "
                          "(and train or calibrate) it first, or export it as onnx-fp32")
    for index, (name, wrapper) in enumerate(layers):
        layer = wrapper.module
        if isinstance(layer, nn.Linear):
            kind = "linear"
        elif fmt == "onnx-fp32":  # (the float layer is traced as it is: any layer PyTorch exports)
            kind = type(layer).__name__.lower()
        elif isinstance(layer, nn.Conv2d):
            kind = "conv2d"
            if layer.padding_mode != "zeros":
                raise ExportError(
                    f"layer {name!r}: Conv2d with padding_mode={layer.padding_mode!r} is not supported; use "
                    "zero padding (padding_mode='zeros')"
                )
        else:
            raise ExportError(
                f"layer {name!r}: quantized {type(layer).__name__} layers cannot be exported "
                "(supported: Linear, Conv2d)"
            )
        weight = layer.weight.detach().float()
        bias = None if layer.bias is None else layer.bias.detach().float().cpu().numpy()
        if bias is not None and not np.all(np.isfinite(bias)):
            raise ExportError(f"layer {name!r}: its bias holds NaN or inf")
        if not torch.isfinite(weight).all():
            raise ExportError(f"layer {name!r}: its weight holds NaN or inf")
        wq = wrapper.weight_quantizer
        act_in = act_out = None
        w_codes = w_scale = w_zp = None
        weight_bits = None
        info: dict[str, Any] = {"bias_quant": bool(getattr(wrapper, "_round_bias", False))}
        if fmt != "onnx-fp32":
            for what, q in wrapper.quantizers().items():
                left = q.float_steps_left()
                if left:
                    raise ExportError(
                        f"layer {name!r}: its {what} quantizer has run {q.start_step - left} of its "
                        f"{q.start_step} quant_start_step training forward passes, so the model still computes in "
                        "float; train past quant_start_step first (or export format 'onnx-fp32')"
                    )
            if wrapper.input_quantizer is not None:
                act_in = _act_grid(wrapper.input_quantizer, "input", name, activations)
            if wrapper.output_quantizer is not None:
                act_out = _act_grid(wrapper.output_quantizer, "output", name, activations)
        if wq is not None and fmt != "onnx-fp32":
            with torch.no_grad():
                try:
                    # codes first: a quantizer whose range follows the weight (QAT, PTQ, DoReFa)
                    # computes its grid from the current weight here
                    codes = wq.quantize_int(weight).detach().cpu().to(torch.int64)
                except Exception as e:
                    if "NotCalibrated" in type(e).__name__:
                        _grid(wq, "weight", name)  # raises the clear "never calibrated" error
                    raise ExportError(f"layer {name!r}: weight quantizer failed to give integer codes ({e})") from e
            g = _grid(wq, "weight", name)
            s, z = _check_scale(g.scale, g.zero_point, "weight", name)
            with torch.no_grad():
                if codes.shape != weight.shape:
                    raise ExportError(f"layer {name!r}: weight codes have shape {tuple(codes.shape)}, "
                                      f"expected {tuple(weight.shape)}")
                if int(codes.min()) < g.qmin or int(codes.max()) > g.qmax:
                    raise ExportError(f"layer {name!r}: weight codes outside the quantizer's own grid "
                                      f"[{g.qmin}, {g.qmax}]")
                deq = g.dequantize(codes).float()
                sim = wq(weight).detach().float()
            if not torch.isfinite(deq).all() or not torch.equal(deq, sim):
                err = float((deq - sim).abs().max()) if deq.shape == sim.shape else float("nan")
                raise ExportError(
                    f"layer {name!r}: the weight quantizer's codes do not reproduce its own output "
                    f"(max difference {err:.3g}); its state is inconsistent, the export would not match "
                    "the simulation"
                )
            if g.axis is not None and s.size > 1 and g.axis != 0:
                raise ExportError(f"layer {name!r}: per-channel weights must be along the output axis 0, "
                                  f"got axis {g.axis}")
            levels = g.qmax - g.qmin + 1
            weight_bits = _bits_for(levels)
            lo, hi = (-8, 7) if fmt == "onnx-int4" else (-128, 127)
            off = _fit_codes(g.qmin, g.qmax, lo, hi)
            if off is None and fmt == "onnx-int4" and getattr(wq, "variant", None) != "paper":
                # mixed precision (a first and last layer kept at 8 bits): int8 holds these codes as
                # they are; the file stays onnx-int4 where any layer's weights fit 4 bits
                lo, hi = -128, 127
                off = _fit_codes(g.qmin, g.qmax, lo, hi)
                if off is not None:
                    info["weight_storage"] = "int8"
                    wide = wide or ExportError(
                        f"layer {name!r}: its weights use {weight_bits}-bit codes [{g.qmin}, {g.qmax}], as "
                        "do the weights of every quantized layer: onnx-int4 would hold no 4-bit weight (lowbit never "
                        "re-quantizes at export); export with --format onnx-int8, or quantize the weights to 4 bits")
            if off is None:
                if getattr(wq, "variant", None) == "paper":  # (2q - 1: b-bit weights on 2^(b+1) - 1 odd codes)
                    hint = ("DoReFa's paper variant puts b-bit weights on the odd codes of 2q - 1, one bit wider; "
                            "train with dorefa_variant=learned (the default) or scaled"
                            + (", or export with --format onnx-int8" if fmt == "onnx-int4" and g.qmax <= 127 else ""))
                elif fmt == "onnx-int4":
                    hint = "export with --format onnx-int8, or quantize the weights to 4 bits"
                else:
                    hint = "quantize the weights to at most 8 bits"
                raise ExportError(
                    f"layer {name!r}: its weights use {weight_bits}-bit codes [{g.qmin}, {g.qmax}], which "
                    f"{fmt} cannot hold without re-quantizing (lowbit never re-quantizes at export); {hint}"
                )
            w_codes = codes.numpy() + off
            w_zp = z + off
            if np.any(w_zp < lo) or np.any(w_zp > hi):
                raise ExportError(f"layer {name!r}: weight zero point {z.ravel()[:3].tolist()} lies outside "
                                  f"its grid [{g.qmin}, {g.qmax}]")
            w_scale = s.astype(np.float32)
            if w_scale.size == 1:
                w_scale = w_scale.reshape(())
                w_zp = w_zp.reshape(())
            elif w_scale.size != weight.shape[0]:
                raise ExportError(f"layer {name!r}: {w_scale.size} weight scales for {weight.shape[0]} "
                                  "output channels")
            w_float = deq.cpu().numpy()
            info.update(weight_code_min=int(w_codes.min()), weight_code_max=int(w_codes.max()),
                        weight_levels=levels)
        else:
            w_float = weight.cpu().numpy()
        plans.append(LayerPlan(index, name, kind, layer, weight_bits, w_codes, w_scale, w_zp, w_float,
                               bias, act_in, act_out, info))
    if wide is not None and not any(p.w_codes is not None and "weight_storage" not in p.info for p in plans):
        raise wide
    return plans


# --------------------------------------------------------------------------------------------
# tracing with markers
# --------------------------------------------------------------------------------------------


class _QLayerOp(torch.autograd.Function):
    """Marks a quantized layer in the traced graph; its value during tracing is the float layer's."""

    @staticmethod
    def forward(ctx, x, index, out):  # type: ignore[override]
        return out.clone()

    @staticmethod
    def symbolic(g, x, index, out):  # type: ignore[override]
        y = g.op(f"{DOMAIN}::QLayer", x, index_i=index)
        y.setType(out.type())
        return y


class _Marker(nn.Module):
    def __init__(self, layer: nn.Module, index: int, unbatched: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        # the lengths of the 1-D example inputs under dynamic_batch (their one axis becomes the
        # file's batch axis): a Linear fed such a vector takes it as one sample's features
        self.unbatched = unbatched

    def __getattr__(self, name: str) -> Any:
        # the layer's own attributes (in_features, weight, a user's tag), read through the marker as
        # through the wrapper it stands for: code written for the float model keeps tracing
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.layer, nn.Conv2d) and x.dim() == 3:
            raise ExportError(
                f"a quantized Conv2d got an unbatched input of shape {tuple(x.shape)}: ONNX's Conv takes a batch; "
                "give example_inputs with a batch dimension (x[None], or a batch of one)"
            )
        if isinstance(self.layer, nn.Linear) and x.dim() == 1 and x.shape[0] in self.unbatched:
            raise ExportError(
                f"a quantized Linear got an unbatched input of shape {tuple(x.shape)}: the file's first axis is a "
                "batch of any size (dynamic_batch), which would be this layer's features; give example_inputs with "
                "a batch dimension (x[None], or a batch of one), or export with dynamic_batch=False"
            )
        return _QLayerOp.apply(x, self.index, self.layer(x))


class _VAEDeterministic(nn.Module):
    """The VAE's inference path: ``z = mu``; outputs ``(logits, mu, logvar)``."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor):
        mu, logvar = self.vae.encode(x)
        return self.vae.decode_logits(mu), mu, logvar


def _is_vae(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("encode", "decode_logits", "latent", "in_features"))


def _trace(model: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
           dynamic_batch: bool, markers: bool = True) -> "Any":
    import onnx

    buf = io.BytesIO()
    dyn = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, args, buf, dynamo=False, opset_version=OPSET, input_names=input_names,
                              output_names=output_names, dynamic_axes=dyn,
                              custom_opsets={DOMAIN: 1} if markers else None,
                              do_constant_folding=True)
        except Exception as e:
            raise ExportError(f"torch.onnx.export could not trace the model: {type(e).__name__}: {e}") from e
    return onnx.load_from_string(buf.getvalue())


# --------------------------------------------------------------------------------------------
# int4 packing
# --------------------------------------------------------------------------------------------


def pack_int4(codes: np.ndarray) -> bytes:
    """Two 4-bit codes per byte, first element in the low nibble (ONNX INT4/UINT4 layout)."""
    f = (np.asarray(codes).astype(np.int64).ravel() & 0xF).astype(np.uint8)
    if f.size % 2:
        f = np.append(f, np.uint8(0))
    return (f[0::2] | (f[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, n: int, signed: bool = True) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``n`` codes as int8 (signed) or uint8."""
    b = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(b.size * 2, dtype=np.uint8)
    out[0::2] = b & 0xF
    out[1::2] = b >> 4
    out = out[:n]
    if signed:
        return ((out.astype(np.int16) ^ 8) - 8).astype(np.int8)
    return out


# --------------------------------------------------------------------------------------------
# graph rewriting
# --------------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, graph) -> None:
        self.graph = graph
        self.nodes: list = []
        self.inits: list = []
        self.qdq_cache: dict[tuple, str] = {}
        self.param_cache: dict[tuple, Any] = {}  # a layer called twice stores its weights once
        self.names = {i.name for i in graph.initializer} | {v.name for v in graph.input}
        for n in graph.node:
            self.names.update(n.output)

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def init(self, base: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.unique(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def init_int4(self, base: str, codes: np.ndarray) -> str:
        from onnx import TensorProto, helper

        name = self.unique(base)
        codes = np.asarray(codes)
        self.inits.append(helper.make_tensor(name, TensorProto.INT4, list(codes.shape), pack_int4(codes), raw=True))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        from onnx import helper

        out = self.unique(base)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def node_to(self, op: str, inputs: list[str], out: str, base: str, **attrs) -> None:
        """A node writing the given tensor ``out``, named uniquely after ``base`` (a layer called
        twice appears twice in the graph, and ONNX Runtime refuses repeated node names)."""
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [out], name=self.unique(base), **attrs))


def _qdq_act(b: _Builder, x: str, grid: ActGrid, prefix: str) -> str:
    # layers reading one tensor on one grid (the VAE's fc21/fc22 after PTQ) share one
    # QuantizeLinear: half the quantizing work, and ONNX Runtime can then fuse the producer's
    # ReLU and requantization into its integer GEMM
    key = (x, grid.scale, grid.zero_point, grid.clip, grid.dtype)
    if key in b.qdq_cache:
        return b.qdq_cache[key]
    out = _qdq_act_new(b, x, grid, prefix)
    b.qdq_cache[key] = out
    return out


def _qdq_act_new(b: _Builder, x: str, grid: ActGrid, prefix: str) -> str:
    # a narrow grid's clamp: on the uint8 codes (the simulation's own clamp, after rounding), where
    # ONNX Runtime still fuses the layer before into an integer conv / GEMM with requantized output
    # (a float Clip between that layer and its QuantizeLinear kept a conv float); in float before
    # the QuantizeLinear for int8 codes (TensorRT, which wants Q and DQ adjacent)
    codes = np.uint8 if grid.dtype == "uint8" else np.int8
    if grid.clip is not None and grid.dtype != "uint8":
        lo = b.init(f"{prefix}/clip_lo", np.float32(grid.clip[0]))
        hi = b.init(f"{prefix}/clip_hi", np.float32(grid.clip[1]))
        x = b.node("Clip", [x, lo, hi], f"{prefix}/clip")
    s = b.init(f"{prefix}/scale", np.float32(grid.scale))
    z = b.init(f"{prefix}/zero_point", codes(grid.zero_point))
    q = b.node("QuantizeLinear", [x, s, z], f"{prefix}/q")
    if grid.clip is not None and grid.dtype == "uint8":
        lo = b.init(f"{prefix}/clip_lo", codes(grid.codes[0]))
        hi = b.init(f"{prefix}/clip_hi", codes(grid.codes[1]))
        q = b.node("Clip", [q, lo, hi], f"{prefix}/clip")
    return b.node("DequantizeLinear", [q, s, z], f"{prefix}/dq")


def _noop(b: _Builder, x: str, base: str, rank: int | None) -> str:
    """A copy of ``x`` that ONNX Runtime's optimizer keeps (Flatten for 2-D, Reshape to its own shape)."""
    if rank == 2:
        return b.node("Flatten", [x], base, axis=1)
    shape = b.node("Shape", [x], base + "/shape")
    return b.node("Reshape", [x, shape], base)


def _int32_bias(p: LayerPlan) -> tuple[np.ndarray, np.ndarray, float]:
    """``(codes, scale, max rounding error)`` of the bias at the accumulator scale ``s_in * s_w``:
    :func:`lowbit.fake_quant.bias_codes`' float32 arithmetic, so a layer that simulates its bias
    on that grid (``bias_quant: int32``) stores the codes it computed with."""
    from ..fake_quant import BIAS_CODE_LIMIT

    bscale = (np.float32(p.act_in.scale) * np.asarray(p.w_scale, dtype=np.float32)).astype(np.float32)
    with np.errstate(over="ignore"):
        bq = np.clip(np.rint(p.bias.astype(np.float32) / bscale), -BIAS_CODE_LIMIT, BIAS_CODE_LIMIT)
    err = float(np.max(np.abs(bq.astype(np.float64) * bscale.astype(np.float64) - p.bias.astype(np.float64)),
                       initial=0.0))
    return bq.astype(np.int32), bscale, err


def _bias_mode(p: LayerPlan, requested: str) -> str:
    """How a quantized layer's bias is stored.

    ``int32``: codes at the integer GEMM's accumulator step ``s_in * s_w`` -- what every integer
    runtime adds (Jacob et al. 2018); ONNX Runtime then also fuses the ReLU and the next layer's
    requantization into its QGemm / QLinearConv (a float bias keeps a conv float).  Exactly the
    simulation where the layer rounds its bias to that grid (the ``bias_quant`` option ``int32``,
    lowbit's default since 0.3.9); for a layer simulated with its float bias (``bias_quant:
    float``, or a run of an older lowbit) it moves each output by up to ``s_in * s_w / 2``, which
    a downstream grid can turn into whole code steps (a W8A8 LSQ VAE: most of its logits off by
    more than 1e-3; docs/EXPORT.md, "Bias").
    ``float``: added in float after the integer GEMM: the simulation's bias values (rounded
    where it rounds them), exactly, but without the fused integer conv / requantization.
    ``auto`` (default): the layer's simulation -- int32 where it rounds its bias, else float, so
    the file computes what the simulation computed.  The largest rounding of each layer is
    recorded in the file's ``lowbit.layers`` metadata (``bias_max_rounding``).
    """
    if p.act_in is None or p.w_codes is None or requested == "float":
        return "float"
    # the int32 accumulator must hold the bias code plus every product of the sum: a code near
    # int32's end (a bias huge against s_in * s_w, clamped) would wrap around in ONNX Runtime; the
    # bias' values (the simulation's, clamped) then go in float
    bq, _, _ = _int32_bias(p)
    fan_in = int(np.prod(p.w_codes.shape[1:])) if p.w_codes.ndim > 1 else 1
    if float(np.max(np.abs(bq), initial=0)) + fan_in * 255.0 * 255.0 >= 2.0**31:
        return "float"
    if requested == "int32":
        return "int32"
    return "int32" if p.info.get("bias_quant") else "float"


def _layer_weight(b: _Builder, p: LayerPlan, pre: str, weights_first: bool, int4: bool) -> str:
    """The layer's weight tensor: integer codes through a DequantizeLinear, or float.

    A layer called twice shares its initializers but gets a DequantizeLinear per call: ONNX
    Runtime's QDQ fusion fails to load a graph in which one weight DequantizeLinear feeds two GEMMs.
    """
    if p.w_codes is None:
        key = (pre, "weight", weights_first)
        if key not in b.param_cache:
            wf = p.w_float if weights_first else p.w_float.T.copy()
            b.param_cache[key] = b.init(f"{pre}/weight", wf.astype(np.float32))
        return b.param_cache[key]
    key = (pre, "weight_q", weights_first, int4)
    if key not in b.param_cache:
        codes = p.w_codes if weights_first else p.w_codes.T.copy()
        if int4:
            wq = b.init_int4(f"{pre}/weight_q", codes)
            wz = b.init_int4(f"{pre}/weight_zero_point", p.w_zero_point)
        else:
            wq = b.init(f"{pre}/weight_q", codes.astype(np.int8))
            wz = b.init(f"{pre}/weight_zero_point", np.asarray(p.w_zero_point).astype(np.int8))
        b.param_cache[key] = [wq, b.init(f"{pre}/weight_scale", p.w_scale), wz]
    return b.node("DequantizeLinear", b.param_cache[key], f"{pre}/weight", axis=0 if weights_first else 1)


def _layer_bias(b: _Builder, p: LayerPlan, pre: str, bias_mode: str, fused_op: bool) -> tuple[str | None, str | None]:
    """``(late_bias, bias)``: a float bias added after the integer GEMM, or the GEMM's own bias
    input.  Initializers are shared between the calls of a layer, DequantizeLinear nodes are not
    (see :func:`_layer_weight`)."""
    key = (pre, "bias", fused_op)
    if key not in b.param_cache:
        mode = _bias_mode(p, bias_mode)
        p.info["bias"] = mode
        if mode == "int32":
            bq, bscale, err = _int32_bias(p)  # type: ignore[misc]
            p.info["bias_max_rounding"] = err
            b.param_cache[key] = (mode, [b.init(f"{pre}/bias_q", bq), b.init(f"{pre}/bias_scale", bscale),
                                         b.init(f"{pre}/bias_zero_point", np.zeros(bscale.shape, np.int32))])
        else:  # (the bias the simulation adds: on its int32 grid where it rounds it, as float values)
            bias = p.bias.astype(np.float32)
            if p.info.get("bias_quant") and p.act_in is not None and p.w_codes is not None:
                bq, bscale, _ = _int32_bias(p)
                bias = (bq.astype(np.float32) * bscale).astype(np.float32)
            b.param_cache[key] = (mode, b.init(f"{pre}/bias", bias))
    mode, stored = b.param_cache[key]
    if mode == "int32":
        return None, b.node("DequantizeLinear", stored, f"{pre}/bias", axis=0)
    return (stored, None) if mode == "float" and fused_op else (None, stored)


def _rewrite_layer(b: _Builder, p: LayerPlan, x: str, out_name: str, rank: int | None, fmt: str,
                   bias_mode: str = "auto") -> None:
    """Append the nodes of one quantized layer: ``x`` (float) -> ``out_name`` (float)."""
    pre = f"{p.name}"
    conv = p.kind == "conv2d"
    int4 = fmt == "onnx-int4" and p.info.get("weight_storage") != "int8"  # (mixed: an 8-bit layer as in int8)
    if p.act_in is not None:
        x = _qdq_act(b, x, p.act_in, f"{pre}/input")
        if int4 and not conv and p.w_codes is not None:
            x = _noop(b, x, GUARD_NBITS + pre, rank)
        elif p.w_codes is None and not conv:
            # float weights after a quantized input: ONNX Runtime's WeightBiasQuantization would
            # quantize them (int8, per tensor) and the bias (int32) itself, another model than the
            # simulated one; it only looks at a Conv/Gemm fed by a DequantizeLinear.  (A Conv's
            # guard would be a Reshape, which ONNX Runtime moves the DequantizeLinear past:
            # load_session turns the transformer off instead.)
            x = _noop(b, x, GUARD_FLOATW + pre, rank)
    # Form: Gemm for int8 Linear on 2-D input (ONNX Runtime fuses DQ-Gemm-Q into QGemm);
    # MatMul + Add for int4 (ONNX Runtime's 4-bit MatMulNBits needs MatMul) and for N-D input.
    use_gemm = (not conv) and (not int4) and rank == 2 and p.act_in is not None and p.w_codes is not None
    weights_first = conv or use_gemm  # weight layout [out, in, ...]; MatMul needs [in, out]
    w = _layer_weight(b, p, pre, weights_first, int4)
    late_bias, bias = None, None  # late_bias: a float bias added after the integer GEMM (bias mode "float")
    if p.bias is not None:
        late_bias, bias = _layer_bias(b, p, pre, bias_mode, conv or use_gemm)
    final = out_name if p.act_out is None else b.unique(f"{pre}/raw")
    if late_bias is not None:
        end, final = final, b.unique(f"{pre}/nobias")
    if conv:
        m = p.module
        pads = _conv_pads(m)
        attrs = dict(strides=list(m.stride), pads=pads, dilations=list(m.dilation), group=int(m.groups),
                     kernel_shape=list(m.kernel_size))
        b.node_to("Conv", [x, w] + ([bias] if bias else []), final, f"{pre}/Conv", **attrs)
    elif use_gemm:
        b.node_to("Gemm", [x, w] + ([bias] if bias else []), final, f"{pre}/Gemm", transB=1)
    else:
        if bias is None:
            b.node_to("MatMul", [x, w], final, f"{pre}/MatMul")
        else:
            mm = b.node("MatMul", [x, w], f"{pre}/MatMul")
            if p.act_in is not None and p.w_codes is not None and p.info.get("bias") == "float":
                # keep ONNX Runtime's MatMulAddFusion from rounding the float bias to int32
                mm = _noop(b, mm, GUARD_BIAS + pre, rank)
            b.node_to("Add", [mm, bias], final, f"{pre}/Add")
    if late_bias is not None:
        if conv:
            shape = b.init(f"{pre}/bias_shape", np.array([-1, 1, 1], np.int64))
            late_bias = b.node("Reshape", [late_bias, shape], f"{pre}/bias_chw")
        b.node_to("Add", [final, late_bias], end, f"{pre}/bias_add")
        final = end
    if p.act_out is not None:
        y = _qdq_act(b, final, p.act_out, f"{pre}/output")
        b.node_to("Identity", [y], out_name, f"{pre}/out")


def _conv_pads(m: nn.Conv2d) -> list[int]:
    """ONNX ``pads`` (begins, then ends) of a zero-padded Conv2d: its explicit padding, or
    ``"valid"`` (none) and ``"same"`` (PyTorch's split: the larger half at the end)."""
    if m.padding == "valid":
        return [0, 0, 0, 0]
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    return [int(v) for v in m.padding] * 2


def _ranks(model) -> dict[str, int]:
    import onnx

    ranks = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            ranks[vi.name] = len(t.shape.dim)
    return ranks


def _guard_quantize_inputs(graph, producers_of_interest: set[str], ranks: dict[str, int]) -> None:
    """ONNX Runtime does not fuse a quantized GEMM whose float output feeds a QuantizeLinear *and*
    something else (e.g. the VAE's ``mu``: a graph output and fc3's input when z = mu); a no-op
    ``Flatten``/``Reshape`` between the tensor and the QuantizeLinear keeps both fusions."""
    from onnx import helper

    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outputs = {o.name for o in graph.output}
    new_nodes = []
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in producers_of_interest:
            t = n.input[0]
            if consumers.get(t, 0) + (t in outputs) > 1:
                g = GUARD_FANOUT + t
                if ranks.get(t) == 2:
                    new_nodes.append(helper.make_node("Flatten", [t], [g], name=g, axis=1))
                else:
                    shp = g + "/shape"
                    new_nodes.append(helper.make_node("Shape", [t], [shp], name=shp))
                    new_nodes.append(helper.make_node("Reshape", [t, shp], [g], name=g))
                n.input[0] = g
        new_nodes.append(n)
    del graph.node[:]
    graph.node.extend(new_nodes)



_DATA_MOVEMENT = {"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
#: ops that commute with quantizing on a grid holding 0 exactly (q(op(v)) == op(q(v)) for the
#: fake quantization q = DequantizeLinear(QuantizeLinear(.))): data movement; MaxPool, as q is
#: monotone non-decreasing; Relu, as q(0) == 0
_COMMUTES = _DATA_MOVEMENT | {"MaxPool", "Relu"}


def _hoist_quantize(graph, layer_outputs: set[str]) -> None:
    """A layer without an output grid whose output reaches the next layer's QuantizeLinear only
    through ops that commute with quantizing (``conv -> Relu -> MaxPool -> QuantizeLinear``, a
    CNN's ``conv -> Flatten -> QuantizeLinear`` before its classifier) would stay a float conv in
    ONNX Runtime, which has no integer conv with a float output.  A QuantizeLinear /
    DequantizeLinear pair on that grid is added right after the layer (after its Relu, which the
    integer conv then absorbs): the conv fuses into QLinearConv, the ops between run on grid
    values (MaxPool on uint8), and the later pair is the identity on them (ONNX Runtime drops it)."""
    from onnx import helper

    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}

    def only_user(t: str):
        users = consumers.get(t, [])
        return users[0] if len(users) == 1 and t not in outputs else None

    inserts: dict[int, tuple[str, list[str]]] = {}  # id(first op after the pair) -> (tensor, Q args)
    for src in layer_outputs:
        t, n = src, only_user(src)
        if n is not None and n.op_type == "Relu":  # (kept before the pair: the integer conv absorbs it)
            t, n = n.output[0], only_user(n.output[0])
        first, steps = n, 0
        while n is not None and n.op_type in _COMMUTES and n.input and n.input[0] == t and \
                (n.op_type != "MaxPool" or len(n.output) == 1 or not n.output[1]):
            t, n, steps = n.output[0], only_user(n.output[0]), steps + 1
        users = consumers.get(t, [])
        if steps == 0 or t in outputs or not users or any(u.op_type != "QuantizeLinear" for u in users):
            continue
        if len({tuple(u.input[1:]) for u in users}) != 1:
            continue
        inserts[id(first)] = (first.input[0], list(users[0].input[1:]))
    new_nodes = []
    for n in graph.node:
        if id(n) in inserts:
            t, qargs = inserts[id(n)]
            q = helper.make_node("QuantizeLinear", [t, *qargs], [t + "/hoisted_q"], name=t + "/hoisted_q")
            dq = helper.make_node("DequantizeLinear", [t + "/hoisted_q", *qargs], [t + "/hoisted_dq"],
                                  name=t + "/hoisted_dq")
            n.input[0] = t + "/hoisted_dq"
            new_nodes.extend([q, dq])
        new_nodes.append(n)
    del graph.node[:]
    graph.node.extend(new_nodes)


_FUSABLE_ACTIVATIONS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "Elu", "Selu",
                        "Softplus", "Softsign", "ThresholdedRelu", "HardSwish", "Gelu"}


def _guard_activations(graph, layer_outputs: set[str], ranks: dict[str, int]) -> None:
    """ONNX Runtime folds an activation into a float ``Gemm`` (``FusedGemm``) before its QDQ
    fusion looks at it, leaving the layer in float when the activation feeds a float layer (the
    reference config's fc3 -> ReLU -> float fc4).  A no-op between them keeps the integer GEMM;
    where the activation only feeds QuantizeLinear nodes the integer GEMM absorbs it, no guard."""
    from onnx import helper

    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    new_nodes = []
    for n in graph.node:
        if n.op_type in _FUSABLE_ACTIVATIONS and n.input and n.input[0] in layer_outputs:
            users = consumers.get(n.output[0], [])
            feeds_only_q = users and all(u.op_type == "QuantizeLinear" for u in users) and n.output[0] not in outputs
            if not feeds_only_q:
                t = n.input[0]
                g = GUARD_FANOUT + "act/" + t
                if ranks.get(t) == 2:
                    new_nodes.append(helper.make_node("Flatten", [t], [g], name=g, axis=1))
                else:
                    shp = g + "/shape"
                    new_nodes.append(helper.make_node("Shape", [t], [shp], name=shp))
                    new_nodes.append(helper.make_node("Reshape", [t, shp], [g], name=g))
                n.input[0] = g
        new_nodes.append(n)
    del graph.node[:]
    graph.node.extend(new_nodes)


def _rewrite(model, plans: list[LayerPlan], fmt: str, bias_mode: str = "auto"):
    """Replace each ``lowbit::QLayer`` marker by its QDQ subgraph; returns the new ModelProto."""
    graph = model.graph
    by_index = {p.index: p for p in plans}
    ranks = _ranks(model)
    b = _Builder(graph)
    new_nodes = []
    layer_outputs: set[str] = set()
    seen = set()
    for n in graph.node:
        if n.domain == DOMAIN and n.op_type == "QLayer":
            idx = next(a.i for a in n.attribute if a.name == "index")
            p = by_index[idx]
            seen.add(idx)
            b.nodes = []
            _rewrite_layer(b, p, n.input[0], n.output[0], ranks.get(n.input[0]), fmt, bias_mode)
            new_nodes.extend(b.nodes)
            if p.act_out is None:
                layer_outputs.add(n.output[0])
        else:
            new_nodes.append(n)
    missing = set(by_index) - seen
    if missing:
        names = [by_index[i].name for i in sorted(missing)]
        raise ExportError(f"quantized layers {names} are not on the traced path of the model's forward")
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(b.inits)
    _hoist_quantize(graph, layer_outputs)
    _guard_quantize_inputs(graph, layer_outputs, ranks)
    _guard_activations(graph, layer_outputs, ranks)
    # drop initializers nothing reads any more (the float weights of the traced markers)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    # opset: only the default domain is left
    ops = [o for o in model.opset_import if o.domain not in (DOMAIN,)]
    del model.opset_import[:]
    model.opset_import.extend(ops)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, OPSET)
    if model.ir_version < 10:
        model.ir_version = 10
    del model.graph.value_info[:]
    return model


# --------------------------------------------------------------------------------------------
# the public entry points
# --------------------------------------------------------------------------------------------


def _default_inputs(model: nn.Module, vae_graph: str, batch: int = 2):
    if not _is_vae(model):
        return None
    x = torch.rand(batch, model.in_features)
    if vae_graph == "eps":
        return (model, (x, torch.randn(batch, model.latent)), ["x", "eps"], ["logits", "mu", "logvar"])
    if vae_graph == "deterministic":
        return (_VAEDeterministic(model), (x,), ["x"], ["logits", "mu", "logvar"])
    raise ExportError(f"vae_graph must be 'eps' or 'deterministic', got {vae_graph!r}")


def export_onnx_bytes(
    model: nn.Module,
    format: str = "onnx-int8",
    *,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    vae_graph: str = "deterministic",
    dynamic_batch: bool = True,
    activations: str = "uint8",
    bias: str = "auto",
) -> bytes:
    """The serialized ONNX model (see :func:`export`); nothing is written."""
    import onnx

    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if bias not in BIAS_MODES:
        raise ExportError(f"bias must be one of {', '.join(BIAS_MODES)}, got {bias!r}")
    if example_inputs is not None and vae_graph != "deterministic":
        raise ExportError(f"vae_graph={vae_graph!r} chooses the graph of lowbit's VAE traced without example_inputs; "
                          "with example_inputs the graph is model(*example_inputs): leave vae_graph out")
    model = getattr(model, "_orig_mod", model)  # torch.compile(model) wraps the model it compiles
    # everything on a CPU copy: a model trained on a GPU exports as it is, and stays where it was
    work = copy.deepcopy(model).cpu()
    plans = plan_layers(work, format, activations)
    work = work.float().eval()
    from ..modules import module_names, replace_module

    names = module_names(work)
    unbatched = frozenset(int(t.shape[0]) for t in (example_inputs if isinstance(example_inputs, (tuple, list)) else
                                                    (example_inputs,))
                          if dynamic_batch and isinstance(t, (Tensor, np.ndarray)) and t.ndim == 1)
    for p, (_, wrapper) in zip(plans, find_quantized_layers(work)):
        layer = wrapper.module
        if format == "onnx-fp32":
            replace_module(work, wrapper, layer, names)  # the float layer, quantizers dropped
        else:
            replace_module(work, wrapper, _Marker(layer, p.index, unbatched), names)
    if example_inputs is None:
        d = _default_inputs(work, vae_graph)
        if d is None:
            raise ExportError("example_inputs are needed to trace a model that is not a lowbit VAE")
        traced, args, in_names, out_names = d
    else:
        if isinstance(example_inputs, (Tensor, np.ndarray)):  # one input given bare: model(x), not model(*x)
            example_inputs = (example_inputs,)
        if not isinstance(example_inputs, (tuple, list)):
            raise ExportError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")
        example_inputs = tuple(torch.from_numpy(np.ascontiguousarray(t)) if isinstance(t, np.ndarray) else t
                               for t in example_inputs)
        # (the copy is float32, and so are the exported graph's inputs: a float16/bfloat16/float64
        # example is traced as the float32 tensor the graph will take)
        traced, args = work, tuple((t.cpu().float() if t.is_floating_point() else t.cpu()) if isinstance(t, Tensor) else t
                                   for t in example_inputs)
        in_names = list(input_names or [f"input{i}" if i else "x" for i in range(len(args))])
        out_names = list(output_names or [])
        if not out_names:
            try:
                with torch.no_grad():
                    out = work(*args)
            except ExportError:
                raise
            except Exception as e:
                shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in args]
                raise ExportError(f"the model does not run on example_inputs {shapes}: {type(e).__name__}: {e}; "
                                  "give the inputs its forward takes (a tuple, one entry per argument, with a "
                                  "batch dimension)") from e
            k = len(out) if isinstance(out, (tuple, list)) else 1
            out_names = [f"output{i}" for i in range(k)]
    onnx_model = _trace(traced, args, list(in_names), list(out_names), dynamic_batch,
                        markers=format != "onnx-fp32" and bool(plans))
    if format != "onnx-fp32":
        onnx_model = _rewrite(onnx_model, plans, format, bias)
    meta = {
        "lowbit.format": format,
        "lowbit.graph": vae_graph if example_inputs is None else "custom",
        "lowbit.activations": activations,
        "lowbit.layers": json.dumps([
            {"name": p.name, "kind": p.kind, "weight_bits": p.weight_bits,
             "input_quantized": p.act_in is not None, "output_quantized": p.act_out is not None,
             **p.info} for p in plans]),
    }
    try:
        from .. import __version__

        meta["lowbit.version"] = __version__
    except Exception:
        pass
    onnx_model.producer_name = "lowbit"
    for k, v in meta.items():
        e = onnx_model.metadata_props.add()
        e.key, e.value = k, v
    try:
        onnx.checker.check_model(onnx_model, full_check=True)
    except Exception as e:
        raise ExportError(f"the exported graph failed ONNX's checker: {e}") from e
    return onnx_model.SerializeToString()


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx-int8",
    *,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    vae_graph: str = "deterministic",
    dynamic_batch: bool = True,
    activations: str = "uint8",
    bias: str = "auto",
) -> Path:
    """Write ``model`` (quantized by any lowbit method) as a QDQ ONNX file and return its path.

    Args:
        format: ``onnx-int8`` (int8 weights), ``onnx-int4`` (int4 weights packed two per byte,
            opset 21; activations stay 8-bit: no runtime has 4-bit activation kernels) or
            ``onnx-fp32`` (the float model, quantizers dropped: the deployment baseline).
        example_inputs: tensors to trace ``model(*example_inputs)`` with (a single tensor is taken
            as the one input); not needed for a lowbit VAE.
        vae_graph: for a VAE, ``"deterministic"`` (input ``x`` (B, 784); z = mu) or ``"eps"``
            (inputs ``x``, ``eps`` (B, latent); z = mu + exp(logvar/2) * eps, so the test loss of
            the deployed model can be computed exactly as in training).  Both output
            ``(logits, mu, logvar)``.
        dynamic_batch: the first axis of every input and output is symbolic.
        activations: stored type of activation codes.  ``"uint8"`` (default): what ONNX Runtime's
            x86 integer kernels take (u8 x s8); a signed grid is shifted by 128, exactly.
            ``"int8"``: for runtimes that want signed activations (TensorRT, which also needs
            zero points of 0, i.e. symmetric activation grids).
        bias: ``"auto"`` (default), ``"int32"`` or ``"float"``: how a quantized layer's bias is
            stored (see :func:`_bias_mode`): int32 at the accumulator scale (fastest on ONNX
            Runtime, and the only form of an integer conv) or float, added after the integer
            GEMM.  ``auto`` stores what the layer simulated (int32 under the ``bias_quant``
            option's default ``int32``), so the file is the simulation exactly; ``int32`` on a
            float-bias simulation rounds each bias by up to ``s_in * s_w / 2``.

    Raises:
        ExportError: the model cannot be exported faithfully (never calibrated, NaN scales,
            unsupported layer, grid too wide for the format, ...); nothing is written then.
    """
    data = export_onnx_bytes(model, format, example_inputs=example_inputs, input_names=input_names,
                             output_names=output_names, vae_graph=vae_graph, dynamic_batch=dynamic_batch,
                             activations=activations, bias=bias)
    return _atomic_write(path, data)


def _atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write atomically (see :func:`lowbit.checkpoint.atomic_write_bytes`); errors as ExportError."""
    from ..checkpoint import CheckpointError, atomic_write_bytes

    try:
        return atomic_write_bytes(path, data)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
