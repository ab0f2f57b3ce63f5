"""ONNX Runtime sessions for lowbit's exported models: integer kernels, exact numerics, inspection.

:func:`load_session` opens an exported file (or any ONNX model) with the options that make the
integer execution match the simulation, and says what it did (:class:`SessionInfo`):

* ``precision="auto"``: on x86 CPUs without VNNI, ONNX Runtime's u8 x s8 GEMM multiplies pairs of
  products into 16 bits with saturation (``vpmaddubsw``); weights whose codes exceed 7 bits
  (|q| > 64) can then overflow.  ``auto`` turns on ONNX Runtime's ``session.x64quantprecision``
  (u8 x u8 kernels that do not saturate) exactly when this CPU lacks VNNI *and* the file holds such
  weights; models trained with 7-bit weights keep the faster u8 x s8 kernel.  ``"fast"`` never
  turns it on, ``"exact"`` always does.
* ``int4="unpack"``: int4 weights (stored packed) are widened to int8 in memory at load, so ONNX
  Runtime runs its integer GEMM on them (no saturation: 4-bit codes cannot overflow 16 bits) with
  exactly the simulated numerics.  ``int4="native"`` leaves the file as it is: ONNX Runtime then
  fuses it into its own 4-bit ``MatMulNBits`` kernel, which re-quantizes activations per block
  (``accuracy_level`` 4) and so differs slightly from the simulation.
* ``weight_only="float"``: layers with quantized weights but float inputs (DoReFa's config) get
  their dequantized weights in float at load (the simulation's numerics, float speed); ``"native"``
  lets ONNX Runtime use ``MatMulNBits`` for them (it re-quantizes the activations).

Also here: :func:`optimized_graph` / :func:`op_type_counts` (what ONNX Runtime really runs),
:func:`cpu_features`, and the VAE's deployed test loss (:func:`vae_test_loss`).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "cpu_features",
    "u8s8_can_saturate",
    "SessionInfo",
    "DeployedModel",
    "load_session",
    "prepare_model",
    "optimized_graph",
    "op_type_counts",
    "vae_test_loss",
    "lowbit_metadata",
    "SATURATION_FREE_CODE",
]

#: u8 x s8 pairs cannot saturate int16 when |weight code| <= 64: 2 * 255 * 64 = 32640 <= 32767
SATURATION_FREE_CODE = 64


@lru_cache(maxsize=1)
def cpu_features() -> dict[str, Any]:
    """This machine's CPU: architecture, model name and the SIMD flags that pick int8 kernels."""
    arch = platform.machine().lower()
    flags: set[str] = set()
    model = platform.processor() or arch
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("flags", "Features") and not flags:
                flags = set(value.split())
            elif key == "model name" and value.strip():
                model = value.strip()
    except OSError:
        pass
    known = bool(flags)
    x86 = arch in ("x86_64", "amd64", "i386", "i686")
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return {
        "arch": arch,
        "model": model,
        "x86": x86,
        "flags_known": known,
        "avx2": "avx2" in flags,
        "fma": "fma" in flags,
        "avx512f": "avx512f" in flags,
        "vnni": vnni,
        "amx": "amx_int8" in flags,
        "cores": os.cpu_count(),
    }


def u8s8_can_saturate() -> bool:
    """True on x86 CPUs without VNNI (or when the flags cannot be read: assume the worst)."""
    f = cpu_features()
    return bool(f["x86"] and (not f["flags_known"] or not f["vnni"]))


@dataclass
class SessionInfo:
    """How a session was made: enough to tell which kernels ran."""

    source: str
    format: str | None
    threads: int
    providers: list[str]
    int8_kernel: str  # "u8s8", "u8u8 (x64quantprecision)", "n/a" (no integer GEMM)
    transforms: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "threads": self.threads,
            "providers": self.providers,
            "int8_kernel": self.int8_kernel,
            "transforms": self.transforms,
            "notes": self.notes,
        }


class DeployedModel:
    """An ONNX Runtime session and what it is: ``run(x, eps)`` returns numpy outputs in order."""

    def __init__(self, session, info: SessionInfo) -> None:
        self.session = session
        self.info = info
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, *inputs: np.ndarray, **named: np.ndarray) -> list[np.ndarray]:
        feeds = dict(zip(self.input_names, inputs))
        feeds.update(named)
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        return self.session.run(None, feeds)

    def __repr__(self) -> str:
        return f"DeployedModel({self.info.source!r}, kernel={self.info.int8_kernel}, threads={self.info.threads})"


def _load_proto(model) -> Any:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    what = "the ONNX bytes given" if isinstance(model, (bytes, bytearray)) else str(model)
    try:
        if isinstance(model, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(model))
        else:
            proto = onnx.load(str(model))
    except OSError:  # (a missing file: its own error names it)
        raise
    except Exception as e:  # (protobuf's DecodeError and kin)
        raise ValueError(f"{what} is not a readable ONNX model ({type(e).__name__}: {e}): truncated or not an ONNX "
                         "file; export it again (lowbit export)") from e
    if not proto.graph.node:
        raise ValueError(f"{what} holds an ONNX model with no graph (an empty or damaged file); export it again")
    return proto


def lowbit_metadata(proto) -> dict[str, Any]:
    """The ``lowbit.*`` metadata of an exported model (``{}`` for a foreign file)."""
    meta = {p.key: p.value for p in proto.metadata_props if p.key.startswith("lowbit.")}
    if "lowbit.layers" in meta:
        try:
            meta["lowbit.layers"] = json.loads(meta["lowbit.layers"])
        except json.JSONDecodeError:
            meta["lowbit.layers"] = []
    return meta


def _int_initializers(proto) -> dict[str, Any]:
    from onnx import TensorProto

    return {i.name: i for i in proto.graph.initializer
            if i.data_type in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT4, TensorProto.UINT4)}


def _to_array(t) -> np.ndarray:
    from onnx import TensorProto, numpy_helper

    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        from .onnx import unpack_int4

        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if t.raw_data:
            arr = unpack_int4(t.raw_data, n, signed=t.data_type == TensorProto.INT4)
        else:  # int32_data holds the packed bytes
            packed = bytes(np.asarray(t.int32_data, dtype=np.uint8))
            arr = unpack_int4(packed, n, signed=t.data_type == TensorProto.INT4)
        return arr.reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


def _unpack_int4(proto) -> int:
    """Widen INT4/UINT4 initializers to INT8/UINT8 (same values) and drop the ``nbits`` guards."""
    from onnx import TensorProto, numpy_helper

    from .onnx import GUARD_NBITS

    count = 0
    inits = list(proto.graph.initializer)
    for i, t in enumerate(inits):
        if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
            arr = _to_array(t)
            dtype = np.int8 if t.data_type == TensorProto.INT4 else np.uint8
            inits[i] = numpy_helper.from_array(arr.astype(dtype), t.name)
            count += 1
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    _drop_nodes(proto, lambda n: n.name.startswith(GUARD_NBITS))
    return count


def _drop_nodes(proto, pred) -> None:
    """Remove single-input pass-through nodes matching ``pred`` (and their Shape helpers)."""
    rename: dict[str, str] = {}
    keep = []
    for n in proto.graph.node:
        if pred(n):
            if n.op_type in ("Flatten", "Reshape", "Identity"):
                rename[n.output[0]] = n.input[0]
            continue  # Shape helpers just disappear
        keep.append(n)
    for n in keep:
        for k, name in enumerate(n.input):
            while name in rename:
                name = rename[name]
            n.input[k] = name
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def _through_noops(producers: dict, name: str):
    """The node producing ``name``, looking through Flatten/Reshape (lowbit's guards)."""
    a = producers.get(name)
    while a is not None and a.op_type in ("Flatten", "Reshape"):
        a = producers.get(a.input[0])
    return a


def _fold_weight_only(proto) -> int:
    """Float weights for DequantizeLinear(int initializer) nodes whose consumer takes a float
    (not DequantizeLinear'd) activation: those layers compute in float in the simulation too."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    ints = _int_initializers(proto)
    folded = 0
    drop = set()
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in ints:
            continue
        users = consumers.get(n.output[0], [])
        if not users or any(u.op_type not in ("MatMul", "Gemm", "Conv") for u in users):
            continue
        if not all(len(u.input) > 1 and u.input[1] == n.output[0] for u in users):
            continue
        acts = [_through_noops(producers, u.input[0]) for u in users]
        if any(a is not None and a.op_type == "DequantizeLinear" for a in acts):
            continue  # an integer layer: leave it to the QDQ fusion
        q = _to_array(ints[n.input[0]]).astype(np.int64)
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        zp = (_to_array(ints[n.input[2]]).astype(np.int64) if len(n.input) > 2 and n.input[2] in ints
              else np.zeros(scale.shape, np.int64))
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        w = (q - zp).astype(np.float32) * scale  # AffineGrid.dequantize's arithmetic
        graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
        drop.add(id(n))
        folded += 1
    keep = [n for n in graph.node if id(n) not in drop]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    keep_i = [i for i in graph.initializer if i.name in used or i.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(keep_i)
    return folded


def _unshare_int_weights(proto) -> int:
    """Give each DequantizeLinear its own copy of a shared integer weight; returns the copies made.

    A layer called twice stores its codes once (two DequantizeLinear nodes read them); ONNX
    Runtime's u8 x u8 path (``x64quantprecision``) converts each fused layer's s8 weight to u8
    under a name derived from the initializer and fails to load when two layers share it.
    """
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    seen: set[str] = set()
    copies = 0
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        if n.input[0] in seen:
            copies += 1
            for k, name in enumerate(n.input):  # codes, scale and zero point
                if name in inits:
                    dup = type(inits[name])()
                    dup.CopyFrom(inits[name])
                    dup.name = f"{name}/copy{copies}"
                    graph.initializer.append(dup)
                    n.input[k] = dup.name
        seen.add(n.input[0])
    return copies


def _max_weight_code(proto) -> int:
    """Largest |code| of int8 weights that feed an integer layer (activation DequantizeLinear'd)."""
    graph = proto.graph
    ints = _int_initializers(proto)
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    worst = 0
    for n in graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in ints:
            continue
        for u in consumers.get(n.output[0], []):
            if u.op_type in ("MatMul", "Gemm", "Conv") and len(u.input) > 1 and u.input[1] == n.output[0]:
                a = _through_noops(producers, u.input[0])
                if a is not None and a.op_type == "DequantizeLinear":
                    q = _to_array(ints[n.input[0]]).astype(np.int64)
                    if q.dtype.kind == "i" and ints[n.input[0]].data_type in (3, 22):  # INT8, INT4
                        worst = max(worst, int(np.abs(q).max()) if q.size else 0)
    return worst


def prepare_model(model, *, int4: str = "unpack", weight_only: str = "float") -> tuple[Any, list[str]]:
    """The ModelProto that :func:`load_session` gives ONNX Runtime, and the transforms applied."""
    import copy

    if int4 not in ("unpack", "native"):
        raise ValueError(f"int4 must be 'unpack' or 'native', got {int4!r}")
    if weight_only not in ("float", "native"):
        raise ValueError(f"weight_only must be 'float' or 'native', got {weight_only!r}")
    proto = copy.deepcopy(_load_proto(model))
    done = []
    if int4 == "unpack":
        n = _unpack_int4(proto)
        if n:
            done.append(f"int4 weights widened to int8 at load ({n} tensors)")
    if weight_only == "float":
        n = _fold_weight_only(proto)
        if n:
            done.append(f"{n} weight-only layer(s) dequantized to float at load")
    return proto, done


def _session_options(threads: int, precise: bool, optimized_path: str | None, extra: dict | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if precise:
        so.add_session_config_entry("session.x64quantprecision", "1")
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    for k, v in (extra or {}).items():
        so.add_session_config_entry(k, str(v))
    return so


def load_session(
    model: str | os.PathLike | bytes | Any,
    *,
    threads: int = 1,
    precision: str = "auto",
    int4: str = "unpack",
    weight_only: str = "float",
    providers: Sequence[str] | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    session_config: dict[str, str] | None = None,
) -> DeployedModel:
    """Open an ONNX model (path, bytes or ModelProto) in ONNX Runtime; see the module docstring.

    Args:
        threads: intra-op threads (1 = the calling thread only).
        precision: ``"auto"`` | ``"exact"`` | ``"fast"``: whether to use the non-saturating u8 x u8
            integer GEMM (see the module docstring).
        int4: ``"unpack"`` | ``"native"``.
        weight_only: ``"float"`` | ``"native"``.
        providers: ONNX Runtime execution providers (default: CPU).
        optimized_model_path: also write the graph ONNX Runtime optimized to this file.
        session_config: extra ``SessionOptions`` config entries.
    """
    import onnxruntime as ort

    if precision not in ("auto", "exact", "fast"):
        raise ValueError(f"precision must be 'auto', 'exact' or 'fast', got {precision!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    source = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    proto, transforms = prepare_model(model, int4=int4, weight_only=weight_only)
    meta = lowbit_metadata(proto)
    worst = _max_weight_code(proto)
    notes = []
    if worst == 0:
        kernel, precise = "n/a", precision == "exact"
    elif precision == "exact" or (precision == "auto" and worst > SATURATION_FREE_CODE and u8s8_can_saturate()):
        kernel, precise = "u8u8 (x64quantprecision)", True
        if precision == "auto":
            notes.append(f"weight codes up to |{worst}| could saturate u8 x s8 on this CPU (no VNNI): "
                         "using ONNX Runtime's non-saturating u8 x u8 kernel; train with 7-bit weights "
                         "to keep the faster one")
    else:
        kernel, precise = "u8s8", False
        if worst > SATURATION_FREE_CODE and u8s8_can_saturate():
            notes.append(f"precision='fast' with weight codes up to |{worst}| on a CPU without VNNI: "
                         "some outputs may saturate")
    if precise:
        n = _unshare_int_weights(proto)
        if n:
            transforms.append(f"{n} shared integer weight(s) copied for the u8 x u8 kernel")
    if kernel != "n/a" and not cpu_features()["x86"]:
        kernel = "int8 (platform kernel)"
    so = _session_options(threads, precise, str(optimized_model_path) if optimized_model_path else None,
                          session_config)
    # WeightBiasQuantization quantizes the float weights (and bias) of a Conv/Gemm fed by a
    # DequantizeLinear on its own: a layer with a quantized input and float weights would then run
    # another model than the simulated one (lowbit's files quantize every weight they mean to)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=list(providers or ["CPUExecutionProvider"]),
                                disabled_optimizers=["WeightBiasQuantization"])
    info = SessionInfo(source=source, format=meta.get("lowbit.format"), threads=threads,
                       providers=sess.get_providers(), int8_kernel=kernel, transforms=transforms, notes=notes)
    return DeployedModel(sess, info)


def optimized_graph(model, **load_kw) -> Any:
    """The graph ONNX Runtime actually runs (after its fusions), as a ModelProto."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        load_session(model, optimized_model_path=path, **load_kw)
        return onnx.load(path)


def op_type_counts(model, **load_kw) -> Counter:
    """``Counter`` of the op types in ONNX Runtime's optimized graph (e.g. ``QGemm``, ``Gemm``)."""
    return Counter(n.op_type for n in optimized_graph(model, **load_kw).graph.node)


def vae_test_loss(deployed: DeployedModel, images: np.ndarray, eps: np.ndarray, batch_size: int = 10_000) -> float:
    """Test loss (BCE + KL, nats per image) of a deployed VAE ``eps`` graph, computed exactly as
    :func:`lowbit.train.evaluate` does, with the runtime's ``(logits, mu, logvar)``."""
    import torch

    from ..models.vae import vae_loss

    x = np.ascontiguousarray(np.asarray(images, dtype=np.float32).reshape(len(images), -1))
    eps = np.ascontiguousarray(np.asarray(eps, dtype=np.float32))
    total = 0.0
    for i in range(0, len(x), batch_size):
        logits, mu, logvar = deployed.run(x[i:i + batch_size], eps[i:i + batch_size])[:3]
        part = vae_loss(torch.from_numpy(logits), torch.from_numpy(x[i:i + batch_size]),
                        torch.from_numpy(mu), torch.from_numpy(logvar))
        total += float(part.total.double())
    return total / len(x)
