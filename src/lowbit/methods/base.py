"""The interface every method implements, the method registry, and the range-tracking quantizer
that QAT and PTQ share.

A *method* (:class:`Method` subclass, registered by name) declares what it can quantize and the
config keys it accepts, and builds one :class:`Quantizer` per quantized tensor of a layer.  A
*quantizer* is an ``nn.Module``::

    forward(x) -> fake-quantized x            (deterministic in eval mode)
    grid() -> AffineGrid                      (raises NotCalibratedError before it has one)
    quantize_int(x) -> int64 codes            (grid().dequantize(codes) == forward(x) in eval mode)

All state lives in parameters and buffers whose shapes are fixed at construction, so a state dict
loads into a freshly quantized model.  Python-side copies of that state (kept so that ``forward``
never reads a tensor back with ``.item()``) are refreshed after ``load_state_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from .. import kernels
from ..config import QUANT_TYPES, ConfigError, LayerSpec, TensorSpec
from ..fake_quant import (
    AffineGrid,
    affine_qparams,
    affine_qparams_f32,
    f32,
    float32_codes,
    fusable,
    on_host,
    clipped_fake_quantize,
    clipped_fake_quantize_scalar,
    qrange,
    ste_fake_quantize,
    ste_fake_quantize_scalar,
)

#: a weight quantizer's arguments for the kernels' fused layer call (:meth:`Quantizer.fused_weight`):
#: ``(scale, qmin, qmax, grad_factor, tanh_first)`` for a learned LSQ step (on tanh(w) for DoReFa),
#: ``(None, lo, hi, 0.0, False, step)`` for a fixed grid (codes [lo, hi], straight-through)
FusedWeight = tuple[Any, ...]

__all__ = [
    "NotCalibratedError",
    "Option",
    "Method",
    "Quantizer",
    "RangeQuantizer",
    "METHODS",
    "register_method",
    "get_method",
    "is_bool",
    "is_int",
    "is_number",
    "one_of",
    "code_range",
    "check_finite",
    "in_backward",
    "member",
]


class NotCalibratedError(RuntimeError):
    """A quantizer was asked for its grid (or to run in eval mode) before it saw any data."""


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def is_int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)

    return check


def one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: any(v == c and type(v) is type(c) for c in choices)


@dataclass(frozen=True)
class Option:
    """A per-method config key: its default, a validity check, and what a valid value looks like."""

    default: Any
    check: Callable[[Any], bool]
    expected: str
    doc: str = ""


BIAS_QUANT = Option(
    "int32",
    one_of("int32", "float"),
    "'int32' or 'float'",
    "'int32': a layer with quantized input and weights adds its bias rounded to the int32 grid of step "
    "s_in * s_w, as the integer GEMM of the exported file does (Jacob et al. 2018), so the export is the "
    "simulation exactly; 'float': the float bias (NNI's simulation; the integer file then adds a float bias)",
)
WEIGHT_RANGE = Option(
    "full",
    one_of("full", "reduced"),
    "'full' or 'reduced'",
    "'reduced': weight codes use one bit less of range (8-bit weights on [-64, 63]) so u8 x s8 "
    "products cannot saturate int16 accumulators on CPUs without VNNI",
)


class Quantizer(nn.Module):
    """Base class: a fake quantizer for one tensor of one layer."""

    def __init__(self, spec: TensorSpec, channels: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.quant_type = spec.quant_type
        self.bits = spec.bits
        self.axis: int | None = 0 if spec.granularity == "per_channel" else None
        if self.axis is not None and not channels:
            raise ValueError("a per-channel quantizer needs the number of channels")
        self._shape: tuple[int, ...] = (channels,) if self.axis is not None else ()
        # the grid's codes [qmin, qmax], kept in the state so that a state saved from another grid
        # (other bits, signedness, scheme or weight_range) is refused on load: written from
        # self.qmin/qmax (set by the subclass) whenever the state is saved or loaded
        self.register_buffer("code_range", torch.zeros(2, dtype=torch.int64))

    # -- the contract -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def grid(self) -> AffineGrid:  # pragma: no cover - abstract
        raise NotImplementedError

    def linear_input(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, weight_args: FusedWeight | None = None,
        round_bias: bool = False,
    ) -> Tensor | None:
        """For an input quantizer: ``F.linear(self(x), w, bias)`` as one fused call (one autograd
        node, :mod:`lowbit.kernels`), ``w`` being ``weight`` or, with ``weight_args`` (from the weight
        quantizer's :meth:`fused_weight`), its fake quantization; or ``None`` where this quantizer
        has no fused call for these tensors (the default): the wrapper then quantizes ``x`` and
        calls ``F.linear`` itself.  ``round_bias`` (with ``weight_args``): the bias on its int32
        grid of step ``s_in * s_w`` (:func:`lowbit.fake_quant.round_bias`), inside the call."""
        return None

    def used_scale(self) -> Tensor | None:
        """The step of the grid this quantizer's last call quantized on (a detached float32 tensor,
        ``()`` or per channel), or ``None`` where that call passed its input through (QAT's
        ``quant_start_step``) or it has no grid yet: a layer's bias is rounded to ``s_in * s_w``
        with it (``bias_quant``)."""
        try:
            return self.grid().scale
        except NotCalibratedError:
            return None

    @staticmethod
    def _on_rows(call: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``call`` (a fused layer call on ``[rows, in]``) on ``x [..., in]``'s rows, its output
        shaped ``[..., out]``."""
        if x.dim() == 2:
            return call(x)
        y = call(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def fused_weight(self, weight: Tensor) -> FusedWeight | None:
        """For a weight quantizer whose fake quantization of ``weight`` the kernels can do inside the
        layer's fused call (:meth:`linear_input`): its arguments (:data:`FusedWeight`), after any
        state update its own call would make (an idempotent one: the current range); ``None``
        otherwise (the default)."""
        return None

    def replay_problem(self, steps_ahead: int = 0) -> str | None:
        """Why replaying this quantizer's training steps as a captured CUDA graph would not do what
        eager steps do, with ``steps_ahead`` eager training steps still to run first; ``None``
        when nothing stands in the way (the default: a stateless or tensor-only quantizer)."""
        return None

    def _unseen_problem(self, steps_ahead: int) -> str | None:
        """The :meth:`replay_problem` of a quantizer initialised from its first batch with reads
        back to the host (which a capture cannot contain)."""
        if not self._initialized and steps_ahead == 0:
            return ("has seen no data: it initialises on its first training batch, reading values back "
                    "to the host — train a step before capturing (warmup >= 1)")
        return None

    def quantize_int(self, x: Tensor) -> Tensor:
        """Integer codes of ``x`` (the default: on :meth:`grid`, no transform)."""
        with torch.no_grad():
            return self.grid().quantize(x)

    # -- reporting ----------------------------------------------------------------------------
    def tracked_range(self) -> tuple[Tensor, Tensor]:
        """The range the quantizer represents (NNI's ``tracked_min/max``): by default the grid's
        clipping range ``[(qmin - zp) * scale, (qmax - zp) * scale]``."""
        g = self.grid()
        zp = g.zero_point.to(torch.float32)
        return (g.qmin - zp) * g.scale, (g.qmax - zp) * g.scale

    def load_grid(self, grid: AffineGrid, tracked: tuple[Tensor, Tensor] | None = None) -> None:
        """Set the quantizer's state from an exported grid (see ``lowbit.load_calibration_config``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load a calibration")

    @property
    def grid_from_weight(self) -> bool:
        """Whether this (weight) quantizer derives its grid from the weight it quantizes at every
        call (QAT's and PTQ's current range, DoReFa's fixed variants): it has no state of its own
        to load (``lowbit.load_calibration_config``)."""
        return False

    #: what ``lowbit.load_calibration_config`` adds to its error when an entry has no scale for
    #: this quantizer ("; ..." naming the fix), "" when it has nothing to add
    missing_scale_hint: str = ""

    def float_steps_left(self) -> int:
        """Training steps still to run before this quantizer quantizes (QAT's ``quant_start_step``);
        until then its output is its float input."""
        return 0

    def skip_float_steps(self) -> None:
        """Count the float steps (:meth:`float_steps_left`) as run: the quantizer quantizes from its
        next call (``lowbit.load_calibration_config`` loaded the grid it is to use)."""

    def _sync(self) -> None:
        """Refresh Python-side mirrors of buffer state (after load_state_dict / load_grid)."""

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "Quantizer":
        # a model cast after quantizing (.half(), .to(torch.bfloat16), .double()) moves its weights,
        # not its grids: scales and steps stay float32, as under autocast (a half-precision step
        # moved codes off quantize_int's and the export's); device moves apply as usual
        super()._apply(fn, recurse)
        for p in self._parameters.values():
            if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()
        for name, b in self._buffers.items():
            if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                self._buffers[name] = b.float()
        return self

    def _codes(self) -> tuple[int, int]:
        """This grid's ``(qmin, qmax)`` (``(0, 0)`` for a subclass that keeps none)."""
        return int(getattr(self, "qmin", 0)), int(getattr(self, "qmax", 0))

    def _loadable_codes(self) -> set[tuple[int, int]]:
        """The code ranges a loaded state may come from: this grid's (LSQ with its sign decided on
        the first batch: either sign's)."""
        return {self._codes()}

    @torch.no_grad()
    def _record_codes(self) -> None:
        self.code_range.copy_(torch.tensor(self._codes(), dtype=torch.int64))

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self._record_codes()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _state_problem(self, state: dict[str, Any], prefix: str) -> str | None:
        """Why the entries of a state dict (under ``prefix``) cannot be this quantizer's state, or
        ``None``: by default, a state saved from a grid of other codes."""
        saved = state.get(prefix + "code_range")
        if isinstance(saved, Tensor) and saved.numel() == 2 and saved.device.type != "meta":
            got = tuple(int(v) for v in saved.tolist())
            if got not in self._loadable_codes():
                qmin, qmax = self._codes()
                return (f"{_state_name(prefix)}: the state was saved from a grid with codes [{got[0]}, {got[1]}] and "
                        f"this quantizer's are [{qmin}, {qmax}] ({self.spec.describe()}): its ranges or steps "
                        "belong to the other grid; quantize with the config_list the state was saved with (bits, "
                        "quant_dtype, quant_scheme, weight_range), or load only the float layers' weights")
        return None

    def _load_from_state_dict(self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        problem = self._state_problem(state_dict, prefix)
        if problem is not None:  # (load_state_dict raises with it once every module is visited)
            error_msgs.append(problem)
            return
        key = prefix + "code_range"
        if key not in state_dict:  # a state saved by lowbit < 0.3.6, which did not record it: a fresh
            # record, on the device of the state's other entries (assign=True takes the tensor itself)
            device = next((v.device for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, Tensor)),
                          torch.device("cpu"))
            state_dict = {**state_dict, key: torch.tensor(self._codes(), dtype=torch.int64, device=device)}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._sync()
        self._record_codes()

    def _describe_grid(self) -> str:
        try:
            g = self.grid()
        except NotCalibratedError:
            return "uncalibrated"
        lo, hi = self.tracked_range()
        if g.scale.dim() == 0:
            return (
                f"scale={g.scale.item():.4g}, zero_point={g.zero_point.item()}, "
                f"range=[{lo.item():.4g}, {hi.item():.4g}]"
            )
        return (
            f"scale=[{g.scale.min().item():.3g}..{g.scale.max().item():.3g}] over {g.scale.numel()} channels, "
            f"range=[{lo.min().item():.4g}, {hi.max().item():.4g}]"
        )

    def _describe_codes(self) -> str:
        return ""

    def extra_repr(self) -> str:
        codes = self._describe_codes()
        return f"{self.quant_type}, {self.spec.describe()}{', ' + codes if codes else ''}, {self._describe_grid()}"


# ---------------------------------------------------------------------------------------------
# methods


METHODS: dict[str, type["Method"]] = {}


def register_method(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make ``cls`` available to ``quantize(..., method=cls.name)``."""
    METHODS[cls.name] = cls
    return cls


def get_method(name: str | type["Method"]) -> type["Method"]:
    if isinstance(name, type) and issubclass(name, Method):
        return name
    try:
        return METHODS[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


class Method:
    """What a quantization method can do and how it builds its quantizers.

    Subclasses set the class attributes and implement :meth:`build_quantizer`.
    ``schemes``/``dtypes``/``granularities`` map a quant type to the allowed values, the first
    being the default.
    """

    name: ClassVar[str] = ""
    quant_types: ClassVar[tuple[str, ...]] = QUANT_TYPES
    options: ClassVar[dict[str, Option]] = {"weight_range": WEIGHT_RANGE}
    schemes: ClassVar[dict[str, tuple[str, ...]]] = {
        "weight": ("symmetric", "affine"),
        "input": ("affine", "symmetric"),
        "output": ("affine", "symmetric"),
    }
    dtypes: ClassVar[dict[str, tuple[str | None, ...]]] = {
        "weight": ("int", "uint"),
        "input": ("uint", "int"),
        "output": ("uint", "int"),
    }
    granularities: ClassVar[dict[str, tuple[str, ...]]] = {
        "weight": ("per_tensor", "per_channel"),
        "input": ("per_tensor",),
        "output": ("per_tensor",),
    }
    min_range_bits: ClassVar[int] = 1
    #: quantizers on :func:`code_range`'s grid (QAT, PTQ): a spec whose grid has one level is refused
    range_grid: ClassVar[bool] = False

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """``{option: default}`` — what an unset per-method key means in this lowbit version."""
        return {k: o.default for k, o in cls.options.items()}

    @classmethod
    def resolve_tensor(
        cls,
        quant_type: str,
        bits: int,
        scheme: str | None,
        dtype: str | None,
        granularity: str | None,
        options: dict[str, Any],
    ) -> TensorSpec:
        """Fill in defaults for one tensor and check the method can do it (raises ConfigError)."""
        schemes = cls.schemes[quant_type]
        if scheme is None:
            scheme = schemes[0]
        elif scheme not in schemes:
            raise ConfigError(f"{cls.name} {quant_type} quantization cannot be {scheme}; it can be {', '.join(schemes)}")
        dtypes = cls.dtypes[quant_type]
        if dtype is None:
            dtype = dtypes[0]
            if quant_type != "weight" and scheme == "symmetric" and dtype == "uint" and "int" in dtypes:
                # a symmetric activation grid on unsigned codes has zero point 0 and no negative
                # codes: unasked, it would turn every negative value into 0 (NNI's symmetric
                # unsigned grid keeps them with a mid-range zero point); signed codes keep them.
                # Ask for quant_dtype 'uint' to use all codes on non-negative data (ReLU outputs).
                dtype = "int"
        elif dtype not in dtypes:
            allowed = ", ".join(repr(d) for d in dtypes if d is not None)
            raise ConfigError(f"{cls.name} {quant_type} quantization cannot use quant_dtype {dtype!r}; allowed: {allowed}")
        if quant_type == "weight" and scheme == "symmetric" and dtype == "uint":
            raise ConfigError(
                f"{cls.name} weight quantization cannot be symmetric with quant_dtype 'uint': an unsigned symmetric "
                "grid has no negative codes, so every negative weight would quantize to 0; use quant_dtype "
                "{'weight': 'int'} (or leave it unset) or quant_scheme {'weight': 'affine'}"
            )
        grans = cls.granularities[quant_type]
        if granularity is None:
            granularity = grans[0]
        elif granularity not in grans:
            raise ConfigError(
                f"{cls.name} {quant_type} quantization cannot be {granularity}; it can be {', '.join(grans)}"
            )
        reduced = quant_type == "weight" and options.get("weight_range") == "reduced"
        spec = TensorSpec(quant_type, bits, granularity, scheme, dtype, reduced)
        if spec.range_bits < cls.min_range_bits:
            extra = " (weight_range 'reduced' uses one bit less)" if reduced else ""
            raise ConfigError(f"{cls.name} needs at least {cls.min_range_bits + reduced} bits for {quant_type}{extra}, got {bits}")
        if cls.range_grid and len(set(code_range(spec))) == 1:
            how = f"{bits} bits with weight_range 'reduced'" if reduced else f"{bits} bit"
            raise ConfigError(
                f"{cls.name} {quant_type}: a signed symmetric grid of {how} has a single level (0), so every "
                f"value would quantize to 0; use {bits + 1}+ bits or quant_scheme 'affine'"
            )
        return spec

    @classmethod
    def check_layer(cls, layer: LayerSpec, module: nn.Module) -> None:
        """Extra per-layer checks (raise ConfigError)."""

    @classmethod
    def build_quantizer(cls, spec: TensorSpec, layer: LayerSpec, module: nn.Module) -> Quantizer:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def build_grad_quantizer(cls, layer: LayerSpec, module: nn.Module) -> nn.Module | None:
        """An optional module applied to the layer's output that acts on its gradient."""
        return None


# ---------------------------------------------------------------------------------------------
# the range-tracking quantizer (QAT, PTQ)


def code_range(spec: TensorSpec) -> tuple[int, int]:
    """Code range of a spec: signed or unsigned by dtype, narrow (symmetric about 0) for a signed
    symmetric grid, one bit less when ``reduced``."""
    signed = spec.dtype != "uint"
    return qrange(spec.range_bits, signed, narrow=signed and spec.scheme == "symmetric")


#: the error for a NaN in a tensor whose range is observed (the fused kernel says the same)
NAN_MESSAGE = (
    "the tensor to quantize contains NaN: training has diverged (lower the learning rate, or check the input data)"
)
#: the error for an infinite value there: a range or step from it would be infinite (NaN codes) for good
INF_MESSAGE = (
    "the tensor to quantize contains inf: its range would be infinite and every later output NaN "
    "(training has diverged, or the input holds inf: lower the learning rate, or check the input data)"
)


_MISSING = object()


def member(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)``, read first from the module's own dictionaries of parameters and
    submodules.  On Python 3.11 a read that ``nn.Module.__getattr__`` answers first formats and
    raises an AttributeError inside the interpreter (it is caught there): a few µs a read, and a
    quantized layer's forward pass makes eight of them.  Names in neither dictionary (buffers,
    plain attributes, such as the weight that ``weight_norm``'s hook recomputes) take ``getattr``."""
    v = module._parameters.get(name, _MISSING)
    if v is _MISSING:
        v = module._modules.get(name, _MISSING)
        if v is _MISSING:
            return getattr(module, name)
    return v


def ddp_group() -> Any | None:
    """The process group of the ``DistributedDataParallel`` forward pass running now, over which a
    quantizer reduces the statistics it takes from a batch, so every process quantizes on the same
    grid (DDP keeps parameters equal, not statistics; BatchNorm needs SyncBatchNorm for this).
    ``None`` outside a DDP forward pass (a model called directly, ``lowbit.calibrate``: the batch's
    own statistics), inside ``torch.compile``, and under DDP's ``join()`` (uneven inputs), whose
    shadow collectives cover only DDP's own."""
    if torch.compiler.is_compiling() or not torch.distributed.is_available():
        return None
    ddp = getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None)
    if ddp is None or ddp._join_config.enable:
        return None
    return ddp.process_group


def all_reduce_(t: Tensor, op: str, group: Any) -> Tensor:
    """``t`` reduced in place over ``group``: ``"max"``, ``"min"`` or ``"sum"``."""
    d = torch.distributed
    d.all_reduce(t, op={"max": d.ReduceOp.MAX, "min": d.ReduceOp.MIN, "sum": d.ReduceOp.SUM}[op], group=group)
    return t


def in_backward() -> bool:
    """Whether this call runs inside a backward pass: a forward recomputed by activation
    checkpointing (``torch.utils.checkpoint``), which must neither advance a quantizer's state
    again nor quantize on another grid than the first forward did."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _state_name(prefix: str) -> str:
    return prefix.rstrip(".") or "the quantizer"


def check_finite(x: Tensor) -> None:
    """Raise ValueError (:data:`NAN_MESSAGE` / :data:`INF_MESSAGE`) unless every value of ``x`` is finite."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(NAN_MESSAGE if bool(torch.isnan(x).any()) else INF_MESSAGE)

#: lowbit.kernels' range_quant codes of the trackings it implements (percentile stays in Python)
_FUSED_TRACKING = {"current": 0, "ema": 1, "minmax": 2}


class RangeQuantizer(Quantizer):
    """Min/max-range quantizer on an affine or symmetric integer grid.

    ``tracking``:
      * ``"current"`` (weights): the range is the tensor's own min/max at every call;
      * ``"ema"`` (QAT activations): exponential moving average of batch min/max
        (``decay``; the first batch initialises it);
      * ``"minmax"`` (PTQ): running min and max over all observed batches;
      * ``"percentile"`` (PTQ): mean over observed batches of the batch's ``percentile``-th and
        ``(100 - percentile)``-th percentiles.

    The range always includes 0.  Activation ranges are observed only in training mode (and
    frozen in eval mode).  The gradient is the clipped straight-through estimator (plain STE for
    weights, whose range contains every element by construction).

    ``start_step`` > 0 (QAT's ``quant_start_step``): the first ``start_step`` training forward
    passes return ``x`` unquantized (ranges are still tracked); counted in the ``step`` buffer.

    Per-tensor quantizers of CPU tensors keep their range and grid as Python numbers (exact
    float32 values) and write them to the buffers lazily — whenever the state is read through
    :meth:`grid`, :meth:`tracked_range`, ``state_dict()`` or a switch to the tensor path — which
    saves a dozen tiny tensor operations per call.  Read the state through those, not by peeking
    at the buffers mid-training.  Elsewhere (per-channel, GPU) everything stays in tensors with no
    host synchronisation.  With lowbit's fused kernels (:mod:`lowbit.kernels`), a per-tensor
    float32 CPU call with ``current``, ``ema`` or ``minmax`` tracking observes, updates the range and
    quantizes in one C++ call that computes the same Python numbers.
    """

    def __init__(
        self,
        spec: TensorSpec,
        channels: int | None = None,
        *,
        tracking: str = "ema",
        decay: float = 0.99,
        percentile: float = 99.99,
        start_step: int = 0,
    ) -> None:
        super().__init__(spec, channels)
        if tracking not in ("current", "ema", "minmax", "percentile"):
            raise ValueError(f"unknown tracking {tracking!r}")
        self.tracking = tracking
        self.decay = float(decay)
        self.percentile = float(percentile)
        self.start_step = int(start_step)
        self.symmetric = spec.scheme == "symmetric"
        self.qmin, self.qmax = code_range(spec)
        self._record_codes()
        shape = self._shape
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int64))
        self.register_buffer("tracked_min", torch.zeros(shape))
        self.register_buffer("tracked_max", torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if tracking == "percentile":
            self.register_buffer("batches", torch.zeros((), dtype=torch.int64))
        if self.start_step > 0:
            self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # Python-side state, mutated in place (no nn.Module.__setattr__ in the hot path):
        # [initialized, steps, batches, dirty, py, last_float] with py = (tmin, tmax, scale, zp, inv,
        # clamp) or None, last_float: whether the last training pass returned its input unquantized
        self._st: list[Any] = [False, 0, 0, False, None, False]
        #: buffers whose in-place writes tell a state copied in (a copy writes them all; an average of
        #: the float ones writes tracked_min): their (tensor, version) when last read or written here
        self._watched = [n for n in ("tracked_min", "initialized", "step") if n in self._buffers]
        self._note_buffers()
        #: the fused kernel's code for this tracking (per-tensor only), None where it has none
        self._fused_tracking = None if self.axis is not None else _FUSED_TRACKING.get(tracking)
        self.__dict__["_buffers"] = _FlushingBuffers(self._buffers, self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not isinstance(self._buffers, _FlushingBuffers):  # (a whole model pickled by lowbit < 0.3.9)
            self.__dict__["_buffers"] = _FlushingBuffers(self._buffers, self)

    @property
    def _initialized(self) -> bool:
        return self._st[0]

    def float_steps_left(self) -> int:
        return max(0, self.start_step - self._st[1]) if self.start_step > 0 else 0

    @torch.no_grad()
    def skip_float_steps(self) -> None:
        if self.float_steps_left() > 0:
            self._flush()
            self.step.fill_(self.start_step)
            self._sync()

    def replay_problem(self, steps_ahead: int = 0) -> str | None:
        if self.tracking == "percentile":
            return ("averages per-batch percentiles over a count of batches kept in Python, which a replay "
                    "would not advance: calibrate percentile PTQ eagerly (it does not train)")
        done = self._st[1]
        if self.start_step > 0 and done < self.start_step:
            # weights ("current") are first seen by the first step that quantizes, after the start
            needed = self.start_step - done + (1 if self.tracking == "current" else 0)
            if steps_ahead < needed:
                return (f"passes its input through unquantized for its first {self.start_step} training steps "
                        f"(quant_start_step), counted in Python: at step {done}, replays would never pass "
                        f"{self.start_step} — warm up past it (warmup >= {needed})")
            return None
        return self._unseen_problem(steps_ahead)

    def _note_buffers(self) -> None:
        b = self._buffers
        self._seen = [(n, b[n], b[n]._version) for n in self._watched]

    def _buffers_written(self) -> bool:
        """Whether a mirrored buffer was written in place since this quantizer last read or wrote
        it (a state copied tensor by tensor); a buffer replaced by another tensor (``.to(dtype)``,
        ``.half()``) is noted, not read: the Python copy may be newer than it."""
        b = self._buffers
        replaced = False
        for n, t, v in self._seen:
            cur = b[n]
            if cur is not t:
                replaced = True
            elif cur._version != v:
                return True
        if replaced:
            self._note_buffers()
        return False

    def _sync(self) -> None:
        st = self._st
        st[0] = bool(self.initialized)
        st[1] = int(self.step) if self.start_step > 0 else 0
        st[2] = int(self.batches) if self.tracking == "percentile" else 0
        st[3] = False
        st[4] = None
        if st[0] and self.axis is None:
            s = self.scale.item()
            st[4] = (self.tracked_min.item(), self.tracked_max.item(), s, int(self.zero_point.item()), f32(1.0 / s), True)
        self._note_buffers()

    @torch.no_grad()
    def _flush(self) -> None:
        """Write the Python-side state into the buffers."""
        st = self._st
        if not st[3]:
            return
        if st[4] is not None:
            tmin, tmax, s, zp = st[4][:4]
            self.tracked_min.fill_(tmin)
            self.tracked_max.fill_(tmax)
            self.scale.fill_(s)
            self.zero_point.fill_(zp)
        self.initialized.fill_(st[0])
        if self.start_step > 0:
            self.step.fill_(st[1])
        if self.tracking == "percentile":
            self.batches.fill_(st[2])
        st[3] = False
        self._note_buffers()

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self._flush()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def __getstate__(self) -> dict[str, Any]:
        # a copy (copy.deepcopy, pickling, torch.save of a whole model, AveragedModel, fold) is
        # made of the buffers: write the Python-side state into them first (a copy whose buffers
        # lagged re-read them, and lost its ranges or took an older checkpoint's)
        self._flush()
        return super().__getstate__()

    def _state_problem(self, state: dict[str, Any], prefix: str) -> str | None:
        problem = super()._state_problem(state, prefix)
        zp = state.get(prefix + "zero_point")
        if problem is None and isinstance(zp, Tensor) and zp.numel() and (
            int(zp.min()) < self.qmin or int(zp.max()) > self.qmax or (self.symmetric and bool((zp != 0).any()))
        ):
            problem = (f"{_state_name(prefix)}: the state's zero points [{int(zp.min())}, {int(zp.max())}] do not fit this quantizer's "
                       f"grid (codes [{self.qmin}, {self.qmax}], {self.spec.scheme}): it was saved from another "
                       f"quant_scheme or quant_dtype; quantize with the config_list the state was saved with")
        if problem is None:
            problem = self._range_problem(state, prefix)
        return problem

    def _range_problem(self, state: dict[str, Any], prefix: str) -> str | None:
        """Why a calibrated state's grid is not one (a scale not finite and positive, a tracked
        range not finite or inverted: a damaged or hand-edited file), or ``None``."""
        got = [state.get(prefix + k) for k in ("initialized", "scale", "tracked_min", "tracked_max")]
        if not all(isinstance(t, Tensor) and t.device.type != "meta" for t in got) or not bool(got[0].all()):
            return None
        _, scale, lo, hi = (t.detach().double() for t in got)
        if scale.shape != lo.shape or lo.shape != hi.shape:
            return None  # (the shapes' own error follows)

        def shown(t: Tensor) -> Any:
            return t.item() if t.numel() == 1 else t.flatten()[:4].tolist()

        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            return (f"{_state_name(prefix)}: the state's scale {shown(scale)} is not finite and positive "
                    "(a damaged or edited state): restore it, or recalibrate the model")
        if not bool((torch.isfinite(lo) & torch.isfinite(hi) & (lo <= hi)).all()):
            return (f"{_state_name(prefix)}: the state's tracked range [{shown(lo)}, {shown(hi)}] is not a finite "
                    "range (min <= max) (a damaged or edited state): restore it, or recalibrate the model")
        return None

    # -- observation --------------------------------------------------------------------------
    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """The batch's range (per channel, or percentiles); over every process's batch in a DDP
        forward pass (:func:`ddp_group`): the range of all of them (ema, minmax), the mean of their
        percentiles, one collective for both ends, an empty batch taking part with neutral values.
        ``None``: no process had a value."""
        group = self._reduce_group()
        if group is None:
            return self._local_range(x)
        empty = x.numel() == 0
        if self.tracking == "percentile":
            v = torch.zeros(3, device=x.device) if empty else torch.stack([*(t.float() for t in self._local_range(x)),
                                                                           torch.ones((), device=x.device)])
            all_reduce_(v, "sum", group)
            return None if v[2] == 0 else (v[0] / v[2], v[1] / v[2])
        if empty:
            v = torch.full((2,), -math.inf, device=x.device)
        else:
            lo, hi = self._local_range(x)
            v = torch.stack([-lo.float(), hi.float()])
        all_reduce_(v, "max", group)
        return None if v[1] == -math.inf else (-v[0], v[1])

    def _reduce_group(self) -> Any | None:
        """The process group this quantizer's observations are reduced over (:func:`ddp_group`):
        tracked activation ranges; a weight's current range is the same in every process."""
        return ddp_group() if self.tracking != "current" and self.axis is None else None

    def _reduced(self) -> bool:
        return self._reduce_group() is not None

    def _local_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.detach()
        if self.axis is not None:
            return torch.aminmax(x.reshape(x.shape[0], -1), dim=1)
        if self.tracking == "percentile":
            flat = x.reshape(-1).float()
            if flat.device.type == "cpu" and not torch.compiler.is_compiling() and bool(torch.isnan(flat).any()):
                raise ValueError(NAN_MESSAGE)  # (kthvalue sorts NaN last: a percentile would skip a few)
            n = flat.numel()
            k_hi = min(n, max(1, math.ceil(self.percentile * n / 100)))
            k_lo = max(1, n + 1 - k_hi)
            return flat.kthvalue(k_lo).values, flat.kthvalue(k_hi).values
        return torch.aminmax(x)

    def observe(self, x: Tensor) -> None:
        """Update the tracked range with ``x`` and recompute scale and zero point."""
        both = self._batch_range(x)
        if both is None:
            return
        lo_t, hi_t = both
        if self.axis is None and on_host(x):
            self._observe_py(lo_t.item(), hi_t.item())
        else:
            self._observe_tensor(lo_t, hi_t)
        if self._reduced():
            # DDP broadcasts process 0's buffers to the others before each forward pass (they are
            # read there as a copied state): keep them current, not lazily written
            self._flush()

    def _observe_py(self, lo: float, hi: float) -> None:
        if lo != lo or hi != hi:
            raise ValueError(NAN_MESSAGE)
        if math.isinf(lo) or math.isinf(hi):
            raise ValueError(INF_MESSAGE)
        st = self._st
        py = st[4]
        tracking = self.tracking
        if py is None or tracking == "current":
            tmin, tmax = lo, hi
        elif tracking == "ema":
            w = 1.0 - self.decay
            tmin, tmax = f32(py[0] + w * (lo - py[0])), f32(py[1] + w * (hi - py[1]))
        elif tracking == "minmax":
            tmin, tmax = min(py[0], lo), max(py[1], hi)
        else:  # percentile: running mean of per-batch percentiles
            w = 1.0 / (st[2] + 1)
            tmin, tmax = f32(py[0] + w * (lo - py[0])), f32(py[1] + w * (hi - py[1]))
        if tracking == "percentile":
            st[2] += 1
        scale, zp = affine_qparams_f32(tmin, tmax, self.qmin, self.qmax, self.symmetric)
        inv = f32(1.0 / scale)
        clamp = True
        if tracking == "current":
            # whether rounding can push a code of this very tensor out of range (only its extremes
            # can, by a tie at the affine top end); rounding is monotone, so lo and hi decide it
            zpc = 0 if self.symmetric else zp
            clamp = round(f32(lo * inv)) + zpc < self.qmin or round(f32(hi * inv)) + zpc > self.qmax
        st[4] = (tmin, tmax, scale, zp, inv, clamp)
        st[0] = True
        st[3] = True

    @torch.no_grad()
    def _observe_tensor(self, lo_t: Tensor, hi_t: Tensor) -> None:
        self._flush()
        st = self._st
        lo_t, hi_t = self._finite_range(lo_t, hi_t)
        if not st[0] or self.tracking == "current":
            self.tracked_min.copy_(lo_t)
            self.tracked_max.copy_(hi_t)
        elif self.tracking == "minmax":
            torch.minimum(self.tracked_min, lo_t, out=self.tracked_min)
            torch.maximum(self.tracked_max, hi_t, out=self.tracked_max)
        else:  # ema, or percentile's running mean
            w = 1.0 - self.decay if self.tracking == "ema" else 1.0 / (st[2] + 1)
            self._move_toward(self.tracked_min, lo_t, w)
            self._move_toward(self.tracked_max, hi_t, w)
        if self.tracking == "percentile":
            st[2] += 1
            self.batches.fill_(st[2])
        scale, zp = affine_qparams(self.tracked_min, self.tracked_max, self.qmin, self.qmax, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        if not st[0]:
            self.initialized.fill_(True)
            st[0] = True
        st[4] = None
        self._note_buffers()

    @staticmethod
    def _move_toward(t: Tensor, v: Tensor, w: float) -> None:
        """``t <- t + w (v - t)`` as the host path computes it (in float64, rounded to float32
        once), so a GPU's tracked range is the CPU's bit for bit (a float32 ``lerp_`` was one ulp
        off it now and then); MPS, which has no float64, takes ``lerp_``."""
        if t.device.type == "mps":
            t.lerp_(v, w)
            return
        d = t.double()
        t.copy_(d + w * (v.double() - d))

    def _finite_range(self, lo_t: Tensor, hi_t: Tensor) -> tuple[Tensor, Tensor]:
        """A batch range to observe, with a NaN/inf in it handled: on the CPU, the same ValueError as
        the host path; elsewhere (a GPU, where raising would cost a host synchronisation every call,
        or inside ``torch.compile``) every non-finite end is replaced by the tracked one (0 before
        the first batch), so the tracked range is never poisoned — the output still carries the
        NaN of its input, so the loss shows it.  With ``tracking="current"`` (weights) nothing
        carries over to poison: the range is each call's own, kept as it is (no extra kernels)."""
        if lo_t.device.type == "cpu" and not torch.compiler.is_compiling():
            if not bool((torch.isfinite(lo_t) & torch.isfinite(hi_t)).all()):
                raise ValueError(NAN_MESSAGE if bool((torch.isnan(lo_t) | torch.isnan(hi_t)).any()) else INF_MESSAGE)
            return lo_t, hi_t
        if self.tracking == "current":
            return lo_t, hi_t
        # (|v| < inf is isfinite in two kernels; torch.isfinite launches four on a GPU)
        return (torch.where(lo_t.abs() < math.inf, lo_t, self.tracked_min),
                torch.where(hi_t.abs() < math.inf, hi_t, self.tracked_max))

    def _fused_grid(self, x: Tensor) -> tuple[float, int, int] | None:
        """The grid ``(step, lo, hi)`` (codes relative to the zero point) that :meth:`forward` would
        quantize ``x`` on, after observing ``x`` as it would (one C++ call, the same numbers), for a
        fused layer call: per-tensor, float32 on the host path with the kernels, past
        ``quant_start_step``, state not copied in; ``None`` otherwise (then :meth:`forward` does it
        all).  A forward recomputed in the backward pass (activation checkpointing) gets the grid
        without a second observation, as :meth:`forward` does, so it takes the fused path exactly
        where the first forward did."""
        st = self._st
        if (
            self._fused_tracking is None
            or x.numel() == 0
            or not fusable(x)
            or torch.compiler.is_compiling()
            or self._buffers_written()
            or (st[4] is None and st[0])  # (the tensor path ran last: forward reads its state back)
        ):
            return None
        again = in_backward()
        if self.start_step > 0 and (
            (st[5] if self.training else st[1] < self.start_step) if again else st[1] < self.start_step
        ):
            return None  # (a float pass: forward's)
        k = kernels.get()
        if k is None:
            return None
        if not again and (self.tracking == "current" or self.training):
            if self.tracking != "current" and self._reduced():
                return None  # (forward observes, reduced over the processes)
            if self.start_step > 0 and self.training:
                st[5] = False
            py = st[4]
            has_prev = py is not None
            st[4] = tuple(k.range_grid(x, has_prev, py[0] if has_prev else 0.0, py[1] if has_prev else 0.0,
                                       self._fused_tracking, self.decay, self.qmin, self.qmax, self.symmetric))
            st[0] = st[3] = True
        py = st[4]
        if py is None:  # (evaluated before it saw data: forward says so)
            return None
        zp = 0 if self.symmetric else py[3]
        return py[2], self.qmin - zp, self.qmax - zp

    def fused_weight(self, weight: Tensor) -> FusedWeight | None:
        if self.tracking != "current":
            return None
        grid = self._fused_grid(weight)
        if grid is None:
            return None
        s, lo, hi = grid
        return None, lo, hi, 0.0, False, s

    def linear_input(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, weight_args: FusedWeight | None = None,
        round_bias: bool = False,
    ) -> Tensor | None:
        """``F.linear(self(x), w, bias)`` in one fused call (one autograd node; ``w``: see
        :meth:`Quantizer.linear_input`) where :meth:`_fused_grid` gives the grid: the same values,
        range updates and gradients (clipped straight-through) as the unfused calls."""
        if (
            self.tracking == "current"
            or torch.is_autocast_enabled("cpu")
            or x.dim() < 2
            or x.shape[-1] != weight.shape[-1]  # (F.linear's own error message then)
            or not fusable(weight)
        ):
            return None
        grid = self._fused_grid(x)
        if grid is None:
            return None
        k = kernels.get()
        s, lo, hi = grid
        return self._on_rows(lambda rows: k.clipped_linear(rows, s, lo, hi, weight, bias, *(weight_args or ()),
                                                           round_bias=round_bias), x)

    # -- the contract -------------------------------------------------------------------------
    @float32_codes
    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:  # an empty batch: nothing to observe, nothing to quantize
            if self.training and not in_backward() and self._reduced():
                self.observe(x)  # (its part in the processes' reduction: the others' range)
            return x
        st = self._st
        if not torch.compiler.is_compiling() and self._buffers_written():
            self._sync()  # (written in place: a copied state, e.g. an EMA / teacher model's; it wins)
        elif st[4] is None and st[0] and self.axis is None and on_host(x):
            # the tensor path ran last (the model was on a GPU, or is back from one): read its state
            # into the Python-number copy, or the fast path would start the range tracking afresh
            self._flush()
            self._sync()
        again = in_backward()  # a forward recomputed by activation checkpointing: same grid, no update
        if self.start_step > 0:
            if again:
                if st[5] if self.training else st[1] < self.start_step:
                    return x
            elif st[1] < self.start_step:
                if self.training:
                    st[1] += 1
                    st[3] = st[5] = True
                    if self.tracking != "current":
                        self.observe(x)
                return x
            elif self.training:
                st[5] = False
        current = self.tracking == "current"
        observing = (current or self.training) and not again
        if observing and self._fused_tracking is not None and not self._reduced():
            k = kernels.get() if fusable(x) else None
            if k is not None:  # observe, update the range, quantize: one C++ call, same numbers
                py = st[4]
                has_prev = py is not None
                out, *state = k.range_quant(
                    x,
                    has_prev,
                    py[0] if has_prev else 0.0,
                    py[1] if has_prev else 0.0,
                    self._fused_tracking,
                    self.decay,
                    self.qmin,
                    self.qmax,
                    self.symmetric,
                )
                st[4] = tuple(state)
                st[0] = st[3] = True
                return out
        if observing:
            self.observe(x)
        elif not st[0]:
            raise NotCalibratedError(
                f"this {self.quant_type} quantizer has seen no data: train a few batches or run "
                "lowbit.calibrate(model, batches) before evaluating"
            )
        py = st[4]
        if py is not None and on_host(x):
            zp = 0 if self.symmetric else py[3]
            if current:
                # the clamp may be skipped only where _observe_py's float32 test holds for x's own
                # arithmetic: in float16/bfloat16/float64 a tie can round one code past the end
                clamp = py[5] or x.dtype != torch.float32
                return ste_fake_quantize_scalar(x, py[2], py[4], self.qmin - zp, self.qmax - zp, clamp)
            return clipped_fake_quantize_scalar(x, py[2], py[4], self.qmin - zp, self.qmax - zp)
        self._flush()
        zp_t = None if self.symmetric else self.zero_point
        if current:
            return ste_fake_quantize(x, self.scale, zp_t, self.qmin, self.qmax, self.axis)
        return clipped_fake_quantize(x, self.scale, zp_t, self.qmin, self.qmax, self.axis)

    def used_scale(self) -> Tensor | None:
        st = self._st
        if not st[0] or self.start_step > 0 and (st[5] if self.training else st[1] < self.start_step):
            return None
        if st[4] is not None and self.axis is None:  # (the host path's Python number, exact float32)
            return torch.full((), st[4][2], dtype=torch.float32, device=self.scale.device)
        return self.scale.detach()

    def quantize_int(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            if self.tracking == "current":
                self.observe(x)
            return self.grid().quantize(x)

    def grid(self) -> AffineGrid:
        if not self._st[0]:
            raise NotCalibratedError(f"this {self.quant_type} quantizer has no range yet (it has seen no data)")
        self._flush()
        return AffineGrid(self.scale.detach().clone(), self.zero_point.clone(), self.qmin, self.qmax, self.axis)

    def tracked_range(self) -> tuple[Tensor, Tensor]:
        if not self._st[0]:
            raise NotCalibratedError("no range tracked yet")
        self._flush()
        return self.tracked_min.clamp(max=0.0), self.tracked_max.clamp(min=0.0)

    @torch.no_grad()
    def load_grid(self, grid: AffineGrid, tracked: tuple[Tensor, Tensor] | None = None) -> None:
        if (grid.qmin, grid.qmax) != (self.qmin, self.qmax):
            raise ValueError(f"grid codes [{grid.qmin}, {grid.qmax}] do not match this quantizer's [{self.qmin}, {self.qmax}]")
        self._flush()
        self.scale.copy_(grid.scale.reshape(self.scale.shape))
        self.zero_point.copy_(grid.zero_point.reshape(self.zero_point.shape))
        if tracked is not None:
            self.tracked_min.copy_(tracked[0].reshape(self.tracked_min.shape))
            self.tracked_max.copy_(tracked[1].reshape(self.tracked_max.shape))
        self.initialized.fill_(True)
        self._sync()

    @property
    def grid_from_weight(self) -> bool:
        return self.tracking == "current"

    def _describe_codes(self) -> str:
        extra = f", starts after {self.start_step} steps" if self.start_step else ""
        return f"codes [{self.qmin}, {self.qmax}], {self.tracking}{extra}"


class _FlushingBuffers(dict):
    """A :class:`RangeQuantizer`'s ``_buffers``: going through them (``model.buffers()``,
    ``named_buffers()``, ``.to()``, what ``AveragedModel.update_parameters`` reads) first writes the
    quantizer's Python-side state into them, so whoever reads the buffers that way reads the
    current range (before 0.3.9 ``AveragedModel`` copied stale ones).  Lookups by name (the
    training path) do not."""

    __slots__ = ("owner",)

    def __init__(self, items: dict, owner: "RangeQuantizer") -> None:
        super().__init__(items)
        self.owner = owner

    def _write(self) -> None:
        # (not inside a torch.func transform, which refuses the writes: the layer says what is wrong)
        if not torch._C._are_functorch_transforms_active():
            self.owner._flush()

    def items(self):  # type: ignore[override]
        self._write()
        return super().items()

    def values(self):  # type: ignore[override]
        self._write()
        return super().values()

    def __reduce__(self):  # (a plain dict in pickles and copies; the quantizer's __setstate__ wraps it again)
        return (dict, (dict(self),))


def is_number(lo: float, hi: float, *, open_lo: bool = True, open_hi: bool = True) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        return (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)

    return check

