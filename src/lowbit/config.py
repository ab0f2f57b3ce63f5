"""NNI-style ``config_list`` -> validated, typed per-layer specs.

A config list is a list of dicts, each selecting layers and saying how to quantize them::

    [{"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8},
      "op_names": ["fc1", "fc21", "fc22", "fc3"]}]

Keys (NNI's): ``quant_types`` (subset of ``weight``, ``input``, ``output``), ``quant_bits`` (an int
for every type, or a dict per type), ``op_types`` (layer class names such as ``Linear``,
``Conv2d``; ``default`` = every layer type lowbit can wrap), ``op_names`` (module names as in
``model.named_modules()``), ``exclude`` (``True``: the selected layers are not quantized),
``quant_scheme`` (``per_tensor_affine``, ``per_tensor_symmetric``, ``per_channel_affine``,
``per_channel_symmetric``, or just ``affine`` / ``symmetric``), ``quant_dtype`` (``int`` signed,
``uint`` unsigned), ``granularity`` (``per_tensor`` / ``per_channel``, weights only) — the last
three as a string for every type or a dict per type.  Anything else must be an option of the
chosen method (``lowbit.methods.<name>.<Class>.options``, e.g. QAT's ``quant_start_step``).

Selection follows NNI: an entry selects the layers whose type is in ``op_types`` *and* whose name
is in ``op_names`` (either may be omitted, not both).  For each layer the **last** entry that
selects it wins, whole (keys are not merged across entries); if that entry has ``exclude: True``
the layer stays float.

Everything is checked here, once, before any training: unknown keys, unknown layer names (the
error lists the valid ones), bits outside 1..16, quant types or schemes the method cannot do,
entries that select nothing.  Errors are :class:`ConfigError` (a ``ValueError``).
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from .methods.base import Method

__all__ = [
    "ConfigError",
    "TensorSpec",
    "LayerSpec",
    "QUANT_TYPES",
    "LAYER_TYPES",
    "NNI_KEYS",
    "parse_config",
    "quantizable_layers",
]

QUANT_TYPES = ("weight", "input", "output")
#: the layer classes lowbit can wrap, by the name used in ``op_types``
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
}
NNI_KEYS = (
    "quant_types",
    "quant_bits",
    "op_types",
    "op_names",
    "exclude",
    "quant_scheme",
    "quant_dtype",
    "granularity",
)
_SCHEMES = {
    "per_tensor_affine": ("per_tensor", "affine"),
    "per_tensor_symmetric": ("per_tensor", "symmetric"),
    "per_channel_affine": ("per_channel", "affine"),
    "per_channel_symmetric": ("per_channel", "symmetric"),
    "affine": (None, "affine"),
    "symmetric": (None, "symmetric"),
}
_DTYPES = ("int", "uint")
_GRANULARITIES = ("per_tensor", "per_channel")
MAX_BITS = 16


class ConfigError(ValueError):
    """An invalid ``config_list`` or method option."""


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor (a layer's weight, input or output) is quantized.

    Attributes:
        quant_type: ``weight``, ``input`` or ``output``.
        bits: storage width, 1..16.
        granularity: ``per_tensor`` or ``per_channel`` (weights only; channel = output channel).
        scheme: ``symmetric`` (zero point 0) or ``affine`` (integer zero point).
        dtype: ``int`` (signed codes), ``uint`` (unsigned codes), or ``None`` = decided on the
            first batch (LSQ activations: unsigned when the first batch has no negative value).
        reduced: weights only; use one bit less of range (8-bit weights on [-64, 63]) for CPUs
            whose int8 dot products saturate in int16 (no VNNI).
    """

    quant_type: str
    bits: int
    granularity: str = "per_tensor"
    scheme: str = "symmetric"
    dtype: str | None = "int"
    reduced: bool = False

    @property
    def range_bits(self) -> int:
        """Bits of code range actually used (``bits - 1`` when ``reduced``)."""
        return self.bits - 1 if self.reduced else self.bits

    def describe(self) -> str:
        parts = [f"{self.bits}b"]
        if self.reduced:
            parts.append("reduced")
        parts.append(self.granularity)
        parts.append(self.scheme)
        parts.append(self.dtype or "auto-signed")
        return " ".join(parts)


@dataclass(frozen=True)
class LayerSpec:
    """One selected layer and how to quantize it (the result of parsing a config list)."""

    name: str
    op_type: str
    method: str
    weight: TensorSpec | None = None
    input: TensorSpec | None = None
    output: TensorSpec | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # method options, defaults filled in
    entry: int = 0  # index of the config entry that selected the layer

    def tensor(self, quant_type: str) -> TensorSpec | None:
        return getattr(self, quant_type)

    @property
    def quant_types(self) -> tuple[str, ...]:
        return tuple(t for t in QUANT_TYPES if getattr(self, t) is not None)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``name -> module`` for every layer of ``model`` that lowbit can wrap, in model order.
    Layers already wrapped (their parent is a ``QuantWrapper``) are skipped."""
    from .modules import QuantWrapper

    out: dict[str, nn.Module] = {}
    wrapped: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantWrapper):
            wrapped.add(id(module.module))
            continue
        if type(module) in LAYER_TYPES.values() and id(module) not in wrapped and name:
            out[name] = module
    return out


def _fmt_names(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _as_str_list(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key!r} must be a non-empty list of strings, got {value!r}")
    return list(value)


def _per_type(value: Any, key: str, types: Sequence[str], where: str, require_all: bool) -> dict[str, Any]:
    """A value given once for every quant type, or as a dict per type."""
    if isinstance(value, Mapping):
        extra = [k for k in value if k not in types]
        if extra:
            raise ConfigError(
                f"{where}: {key!r} names {extra} which are not in this entry's quant_types {list(types)}"
            )
        missing = [t for t in types if t not in value]
        if require_all and missing:
            raise ConfigError(f"{where}: {key!r} gives no value for {missing} (quant_types {list(types)})")
        return dict(value)
    return {t: value for t in types}


def _check_bits(bits: Any, quant_type: str, where: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):  # numpy integers too
        raise ConfigError(f"{where}: quant_bits for {quant_type!r} must be an integer, got {bits!r}")
    if not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"{where}: quant_bits for {quant_type!r} is {bits}; lowbit supports 1 to {MAX_BITS} bits")
    return int(bits)


def _check_options(method_cls: type["Method"], given: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in given.items():
        opt = method_cls.options.get(key)
        if opt is None:  # pragma: no cover - callers filter keys first
            raise ConfigError(f"{where}: unknown option {key!r}")
        if not opt.check(value):
            raise ConfigError(f"{where}: {key!r} must be {opt.expected}, got {value!r}")
        out[key] = value
    return out


def _unknown_key_message(key: str, method_cls: type["Method"], where: str) -> str:
    from .methods import METHODS

    owners = [name for name, cls in METHODS.items() if key in cls.options]
    hint = f" ({key!r} is an option of {', '.join(owners)}, not of {method_cls.name})" if owners else ""
    allowed = list(NNI_KEYS) + sorted(method_cls.options)
    return f"{where}: unknown key {key!r}{hint}; the keys {method_cls.name} accepts are {', '.join(allowed)}"


#: the module types NNI 2.x's ``op_types: ['default']`` quantizes (its ``weighted_modules``)
_NNI_WEIGHTED = frozenset({"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                           "Linear", "Bilinear", "PReLU", "Embedding", "EmbeddingBag"})


def parse_config(
    config_list: Sequence[Mapping[str, Any]],
    model: nn.Module,
    method: str,
    options: Mapping[str, Any] | None = None,
) -> dict[str, LayerSpec]:
    """Validate ``config_list`` against ``model`` and ``method`` and return ``name -> LayerSpec``
    for every layer to quantize, in model order.

    ``options`` are method options applied to every entry (an entry's own keys override them).
    Raises :class:`ConfigError` with a message naming the entry, the layer and the valid choices.
    """
    from .methods import get_method

    method_cls = get_method(method)
    if isinstance(config_list, Mapping) or not isinstance(config_list, (list, tuple)):
        raise ConfigError(f"config_list must be a list of dicts, got {type(config_list).__name__}")
    if not config_list:
        raise ConfigError("config_list is empty: nothing to quantize")
    options = dict(options or {})
    for key in options:
        if key in NNI_KEYS:
            raise ConfigError(
                f"quantize() options: {key!r} belongs in a config_list entry, not in the options "
                f"(which are {method_cls.name}'s method options: {', '.join(sorted(method_cls.options))})"
            )
        if key not in method_cls.options:
            raise ConfigError(_unknown_key_message(key, method_cls, "quantize() options"))
    base_options = {k: opt.default for k, opt in method_cls.options.items()}
    base_options.update(_check_options(method_cls, options, "quantize() options"))

    layers = quantizable_layers(model)
    all_modules = {name: type(m).__name__ for name, m in model.named_modules() if name}
    # a module held under several names (tied layers) is listed under its first; the others name it too
    alias_of: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name:
            alias_of[name] = first.setdefault(id(m), name)
    layer_list = [f"{n} ({type(m).__name__})" for n, m in layers.items()]
    specs: dict[str, LayerSpec] = {}

    for i, entry in enumerate(config_list):
        where = f"config_list[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where} must be a dict, got {type(entry).__name__}")
        for key in entry:
            if key not in NNI_KEYS and key not in method_cls.options:
                raise ConfigError(_unknown_key_message(key, method_cls, where))

        # --- which layers
        exclude_entry = entry.get("exclude") is True
        if "op_types" not in entry and "op_names" not in entry:
            raise ConfigError(f"{where}: give 'op_types' or 'op_names' (or both) to say which layers it selects")
        selected = list(layers)
        if "op_types" in entry:
            op_types = _as_str_list(entry["op_types"], "op_types", where)
            wanted: set[str] = set()
            for t in op_types:
                if t == "default":
                    wanted.update(LAYER_TYPES)
                    left = sorted({v for v in all_modules.values() if v in _NNI_WEIGHTED and v not in LAYER_TYPES})
                    if left and not exclude_entry:
                        warnings.warn(
                            f"{where}: op_types 'default' selects the layer types lowbit quantizes "
                            f"({', '.join(LAYER_TYPES)}); this model's {', '.join(left)} layers, which NNI's "
                            "'default' also took, stay float",
                            stacklevel=3,
                        )
                elif t in LAYER_TYPES:
                    wanted.add(t)
                elif t in all_modules.values():
                    raise ConfigError(
                        f"{where}: lowbit cannot quantize {t!r} layers; it wraps {', '.join(LAYER_TYPES)}"
                    )
                else:
                    raise ConfigError(
                        f"{where}: unknown op type {t!r}; lowbit wraps {', '.join(LAYER_TYPES)} (or 'default' for all)"
                    )
            attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
            if "Linear" in wanted and attention and not exclude_entry and "op_names" not in entry:
                warnings.warn(
                    f"{where}: the projections of this model's MultiheadAttention modules ({_fmt_names(attention)}) "
                    "stay float: PyTorch's attention computes with their weights (in_proj_weight, out_proj.weight) "
                    "directly, never calling a Linear layer; to quantize them, write the attention with nn.Linear "
                    "layers for q, k, v and the output",
                    stacklevel=3,
                )
            selected = [n for n in selected if type(layers[n]).__name__ in wanted]
            if not selected:
                present = sorted({type(m).__name__ for m in layers.values()})
                done = [repr(n) for n, m in model.named_modules() if type(m).__name__ == "QuantWrapper"
                        and type(m.module).__name__ in wanted]
                if done:
                    raise ConfigError(
                        f"{where}: op_types {op_types} match no layer left to quantize: "
                        f"{_fmt_names(done)} {'is' if len(done) == 1 else 'are'} already quantized "
                        "(quantize the float model instead, or select other layers)"
                    )
                raise ConfigError(
                    f"{where}: op_types {op_types} match no layer of the model "
                    f"(its quantizable layer types: {', '.join(present) or 'none'})"
                )
        if "op_names" in entry:
            op_names = [alias_of.get(n, n) for n in _as_str_list(entry["op_names"], "op_names", where)]
            for n in op_names:
                if n not in all_modules:
                    raise ConfigError(
                        f"{where}: the model has no layer named {n!r}; quantizable layers: {_fmt_names(layer_list)}"
                    )
                if all_modules[n] == "QuantWrapper":
                    raise ConfigError(f"{where}: layer {n!r} is already quantized")
                owner = n.rpartition(".")[0]
                if owner in all_modules and all_modules[owner] == "QuantWrapper":
                    raise ConfigError(f"{where}: {n!r} is the layer inside {owner!r}, which is already quantized")
                if n not in layers:
                    raise ConfigError(
                        f"{where}: {n!r} is a {all_modules[n]}, which lowbit cannot quantize; "
                        f"quantizable layers: {_fmt_names(layer_list)}"
                    )
            name_set = set(op_names)
            before = selected
            selected = [n for n in selected if n in name_set]
            if not selected:
                raise ConfigError(
                    f"{where}: op_names {op_names} and op_types {entry.get('op_types')} select no layer together "
                    f"(op_types alone select {before})"
                )

        # --- exclude entries
        exclude = entry.get("exclude", False)
        if not isinstance(exclude, bool):
            raise ConfigError(f"{where}: 'exclude' must be True or False, got {exclude!r}")
        if "exclude" in entry and not exclude:
            raise ConfigError(f"{where}: 'exclude': False is ambiguous: NNI excludes the selected layers whenever the "
                              "key is present, whatever its value; remove the key to quantize them, or set True")
        if exclude:
            extra = [k for k in entry if k not in ("op_types", "op_names", "exclude")]
            if extra:
                raise ConfigError(f"{where}: an exclude entry takes only op_types/op_names, not {extra}")
            for n in selected:
                specs.pop(n, None)
            continue

        # --- what to quantize, how
        if "quant_types" not in entry:
            raise ConfigError(f"{where}: missing 'quant_types' (a list of {', '.join(QUANT_TYPES)})")
        quant_types = _as_str_list(entry["quant_types"], "quant_types", where)
        for t in quant_types:
            if t not in QUANT_TYPES:
                raise ConfigError(f"{where}: unknown quant type {t!r}; choose from {', '.join(QUANT_TYPES)}")
            if t not in method_cls.quant_types:
                raise ConfigError(
                    f"{where}: {method_cls.name} cannot quantize {t!r}; it quantizes {', '.join(method_cls.quant_types)}"
                )
        if len(set(quant_types)) != len(quant_types):
            raise ConfigError(f"{where}: quant_types {quant_types} repeats a type")
        if "quant_bits" not in entry:
            raise ConfigError(f"{where}: missing 'quant_bits' (an int, or a dict per quant type)")
        bits = {t: _check_bits(b, t, where) for t, b in _per_type(entry["quant_bits"], "quant_bits", quant_types, where, True).items()}
        schemes = _per_type(entry.get("quant_scheme", {}), "quant_scheme", quant_types, where, False)
        dtypes = _per_type(entry.get("quant_dtype", {}), "quant_dtype", quant_types, where, False)
        grans = _per_type(entry.get("granularity", {}), "granularity", quant_types, where, False)

        entry_options = dict(base_options)
        entry_options.update(_check_options(method_cls, {k: v for k, v in entry.items() if k in method_cls.options}, where))

        tensors: dict[str, TensorSpec] = {}
        for t in quant_types:
            gran, scheme = None, None
            if t in schemes:
                s = schemes[t]
                if not isinstance(s, str) or s not in _SCHEMES:
                    raise ConfigError(f"{where}: quant_scheme {s!r} for {t!r}; choose from {', '.join(_SCHEMES)}")
                gran, scheme = _SCHEMES[s]
            if t in grans:
                g = grans[t]
                if g not in _GRANULARITIES:
                    raise ConfigError(f"{where}: granularity {g!r} for {t!r}; choose per_tensor or per_channel")
                if gran is not None and gran != g:
                    raise ConfigError(f"{where}: granularity {g!r} contradicts quant_scheme {schemes[t]!r} for {t!r}")
                gran = g
            dtype = dtypes.get(t)
            if dtype is not None and dtype not in _DTYPES:
                raise ConfigError(f"{where}: quant_dtype {dtype!r} for {t!r}; choose 'int' or 'uint'")
            try:
                tensors[t] = method_cls.resolve_tensor(t, bits[t], scheme, dtype, gran, entry_options)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None

        for n in selected:
            spec = LayerSpec(
                name=n,
                op_type=type(layers[n]).__name__,
                method=method_cls.name,
                options=dict(entry_options),
                entry=i,
                **tensors,
            )
            try:
                method_cls.check_layer(spec, layers[n])
            except ConfigError as e:
                raise ConfigError(f"{where}, layer {n!r}: {e}") from None
            specs[n] = spec

    if not specs:
        raise ConfigError("config_list selects no layer to quantize (every selected layer is excluded)")
    return {n: specs[n] for n in layers if n in specs}
