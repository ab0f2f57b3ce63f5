"""The verbs: :func:`quantize` a model in place, :func:`calibrate` it, read its
:func:`calibration_config`, :func:`fold` it back into a plain float model.

    model = lowbit.quantize(model, config_list, method="lsq", optimizer=optimizer)
    # ... the user's own training loop, unchanged ...
    calib = lowbit.calibration_config(model)      # NNI's export format, JSON-serialisable
    plain = lowbit.fold(model)                    # nn.Linear/Conv layers holding quantized weights
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .config import QUANT_TYPES, ConfigError, parse_config
from .fake_quant import AffineGrid, round_bias
from .methods import NotCalibratedError, Quantizer, RangeQuantizer, get_method
from .modules import QuantWrapper, module_names, replace_module

__all__ = [
    "quantize",
    "quantizer_parameters",
    "quantized_layers",
    "calibrate",
    "calibration_config",
    "load_calibration_config",
    "fold",
]


def quantize(
    model: nn.Module,
    config_list: Sequence[Mapping[str, Any]],
    method: str = "qat",
    optimizer: torch.optim.Optimizer | None = None,
    **options: Any,
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    Each layer selected by ``config_list`` (NNI's format, see :mod:`lowbit.config`) is replaced,
    under the same attribute name, by a :class:`~lowbit.modules.QuantWrapper` holding the layer and
    the method's quantizers.  ``options`` are method options applied to every config entry (an
    entry's own keys override them), e.g. ``quantize(m, cfg, "qat", quant_start_step=100)``.

    If ``optimizer`` is given, the new quantizer parameters (LSQ steps and offsets) are added to
    it as one new parameter group with ``weight_decay=0`` (its other hyper-parameters are the
    optimizer's defaults).  Without an optimizer, add :func:`quantizer_parameters` yourself.
    The model's own parameters are unchanged objects, so an optimizer built before keeps working.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise ConfigError(
            "quantize the model before wrapping it in DistributedDataParallel: DDP broadcasts and averages the "
            "parameters it finds when it is built, so the quantizers' new steps would train apart in each "
            "process; lowbit.quantize(model, ...), then DistributedDataParallel(model)"
        )
    method_cls = get_method(method)
    specs = parse_config(config_list, model, method_cls.name, options)
    names = module_names(model)
    built: list[tuple[nn.Module, QuantWrapper]] = []
    for name, spec in specs.items():
        layer = model.get_submodule(name)
        qs = {t: (method_cls.build_quantizer(getattr(spec, t), spec, layer) if getattr(spec, t) else None) for t in QUANT_TYPES}
        wrapper = QuantWrapper(
            layer,
            method_cls.name,
            weight_quantizer=qs["weight"],
            input_quantizer=qs["input"],
            output_quantizer=qs["output"],
            grad_quantizer=method_cls.build_grad_quantizer(spec, layer),
            spec=spec,
        )
        ref = layer.weight
        for q in wrapper.quantizers().values():
            q.to(device=ref.device)
        wrapper.train(layer.training)
        built.append((layer, wrapper))
    new: list[nn.Parameter] = []
    if optimizer is not None:  # checked before the model changes
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        new = [p for _, w in built for p in quantizer_parameters(w) if id(p) not in known]
        if new and isinstance(optimizer, torch.optim.LBFGS):
            raise ConfigError(
                f"torch.optim.LBFGS keeps a single parameter group, so the {len(new)} quantizer parameters of "
                f"{method_cls.name} cannot join it as a group of their own: quantize without optimizer=, then build "
                "LBFGS over model.parameters() (which then include them)"
            )
    for layer, wrapper in built:
        replace_module(model, layer, wrapper, names)  # a layer registered under several names: under all of them
    _keep_fast_paths_off(model)
    if new:
        param_name = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        optimizer.add_param_group(quantizer_param_group(optimizer, new, [param_name[id(p)] for p in new]))
        if hasattr(optimizer.step, "_wrapped_by_lr_sched"):  # (how an LRScheduler marks its optimizer)
            warnings.warn(
                f"an LR scheduler was built on this optimizer before lowbit.quantize, which has just added a group "
                f"of {len(new)} quantizer parameters that the scheduler never saw: some schedulers fail on it "
                "(LambdaLR, CyclicLR: ValueError; OneCycleLR: KeyError), some schedule it differently from the "
                "others (LinearLR). Build the scheduler after lowbit.quantize",
                stacklevel=2,
            )
    return model


def _no_fast_path(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing: its presence turns off PyTorch's fused inference path
    of the module it is on (see :func:`_keep_fast_paths_off`)."""
    return None


def _keep_fast_paths_off(model: nn.Module) -> None:
    """PyTorch's ``nn.TransformerEncoderLayer`` (in eval mode without gradients) runs one fused
    kernel that reads ``linear1.weight`` / ``linear2.weight`` itself and never calls those layers,
    so their quantizers would not run: the model would infer (and calibrate) in float.  Such a
    layer holding a quantized layer gets a forward pre-hook that does nothing, which PyTorch's own
    check takes as a reason to run the layer module by module; an ``nn.TransformerEncoder`` over
    them stops turning padded batches into nested tensors (``use_nested_tensor = False``), which
    the quantizers do not take."""
    for m in model.modules():
        if not any(isinstance(c, QuantWrapper) for c in m.modules()):
            continue
        if isinstance(m, nn.TransformerEncoderLayer) and _no_fast_path not in m._forward_pre_hooks.values():
            m.register_forward_pre_hook(_no_fast_path)
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False


def quantizer_param_group(
    optimizer: torch.optim.Optimizer, params: list[nn.Parameter], names: list[str] | None = None
) -> dict[str, Any]:
    """The parameter group :func:`quantize` adds to ``optimizer`` for the quantizer parameters
    ``params`` (LSQ steps and offsets, DoReFa's learned scales): no weight decay, and for CPU
    parameters PyTorch's ``fused`` implementation where the optimizer has one (Adam, AdamW, SGD,
    Adagrad), else ``foreach``.  The parameters are a dozen scalars (or one value per channel):
    the CPU default, a Python loop of about eight tensor operations per parameter, costs tens of
    µs each — on the VAE more than some quantizers' arithmetic (``benchmarks/lsq_cost_split.py``)
    — and the fused update does them all in one call.  Fused updates compute the same formula in another order (the
    last bits differ from the loop's); ``foreach`` ones are bit for bit the loop's.  Only an
    unset choice is made: an optimizer built with ``fused=...`` keeps it (``fused=False``:
    ``foreach``, bit for bit the loop), one built with ``foreach=False`` or ``differentiable`` keeps
    the loop; parameters off the CPU keep PyTorch's own choice (``foreach`` on a GPU).  Where the
    optimizer's groups carry parameter names (built from ``named_parameters()``), so does this one
    (``names``: the parameters' names in the model)."""
    group: dict[str, Any] = {"params": params}
    defaults = optimizer.defaults
    if "weight_decay" in defaults:
        group["weight_decay"] = 0.0
    if names is not None and any("param_names" in g for g in optimizer.param_groups):
        group["param_names"] = list(names)
    if defaults.get("differentiable") or not all(p.device.type == "cpu" for p in params):
        return group
    fused, foreach = defaults.get("fused"), defaults.get("foreach")
    if "fused" in defaults and fused is None and foreach is None:
        group["fused"], group["foreach"] = True, False
    elif "foreach" in defaults and foreach is None and not fused:
        group["foreach"] = True
    return group


def quantized_layers(model: nn.Module) -> dict[str, QuantWrapper]:
    """``name -> QuantWrapper`` for every quantized layer, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantWrapper)}


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable quantizer parameters (LSQ steps, LSQ+ offsets) of ``model``, to give to an
    optimizer when :func:`quantize` was not given one."""
    seen: set[int] = set()
    out = []
    for m in model.modules():
        if isinstance(m, Quantizer):
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> nn.Module:
    """Run ``batches`` through ``model`` without gradients, with the model in eval mode (dropout,
    batch norm frozen) but its quantizers observing: PTQ ranges, QAT's EMA ranges and LSQ's
    first-batch initialisation come from these batches.  ``forward(model, batch)`` defaults to
    ``model(batch)``.  Modes are restored afterwards.  (QAT quantizers count these passes towards
    ``quant_start_step``.)
    """
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.train()
    seen = 0
    try:
        for batch in batches:
            seen += 1
            if forward is not None:
                forward(model, batch)
            elif isinstance(batch, (list, tuple)):
                try:
                    model(batch)
                except Exception as e:  # (the model's own error, about a list it was not made for)
                    raise TypeError(
                        f"calibrate called model(batch) with a {type(batch).__name__} of {len(batch)} (a DataLoader "
                        f"of (inputs, targets)?) and the model refused it ({type(e).__name__}: {e}): pass "
                        "forward=lambda model, batch: model(batch[0]), or batches of inputs"
                    ) from e
            else:
                model(batch)
    finally:
        for m, mode in modes.items():
            m.training = mode
    idle = [f"{name}.{t}" for name, w in quantized_layers(model).items() for t, q in w.quantizers().items()
            if t != "weight" and not _has_grid(q)]
    if idle:
        warnings.warn(
            f"lowbit.calibrate ran {seen} batch(es) but these quantizers saw none and are still uncalibrated: "
            f"{', '.join(idle)}. " + ("Give it batches (an empty iterable, or an exhausted iterator?)" if not seen else
            "Their layers were not called, or only with empty batches: check that the model's forward (or "
            "forward=) reaches them with data"),
            stacklevel=3,  # (the caller's line: calibrate runs inside torch.no_grad's wrapper)
        )
    return model


def _has_grid(q: Quantizer) -> bool:
    """Whether ``q`` has a grid (is calibrated)."""
    try:
        q.grid()
    except NotCalibratedError:
        return False
    return True


def _value(t: Tensor) -> Any:
    """A float32/int tensor as a JSON value: a Python number, or a list when per-channel."""
    return t.item() if t.dim() == 0 else t.tolist()


def calibration_config(model: nn.Module) -> dict[str, dict[str, Any]]:
    """NNI's calibration export for every quantized layer, JSON-serialisable.

    Per layer: ``weight_bits``, ``weight_scale``, ``weight_zero_point`` (numbers, or lists per
    output channel) — for every method, including LSQ's learned weight step; for activations
    ``input_bits``, ``tracked_min_input``, ``tracked_max_input`` and the ``output_*`` twins (the
    tracked range for QAT/PTQ, the grid's clipping range for LSQ/DoReFa).  lowbit adds what an
    exporter needs to rebuild each grid exactly: ``method``, ``<type>_scale``,
    ``<type>_zero_point``, ``<type>_qmin``, ``<type>_qmax`` (and ``weight_axis`` per-channel).
    Weight grids are refreshed from the current weights first.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, wrapper in quantized_layers(model).items():
        entry: dict[str, Any] = {"method": wrapper.method}
        for t, q in wrapper.quantizers().items():
            try:
                if t == "weight":
                    q.quantize_int(wrapper.module.weight.detach())
                grid = q.grid()
                lo, hi = q.tracked_range()
            except NotCalibratedError as e:
                raise NotCalibratedError(f"layer {name!r}, {t}: {e}") from None
            entry[f"{t}_bits"] = q.bits
            entry[f"{t}_scale"] = _value(grid.scale)
            entry[f"{t}_zero_point"] = _value(grid.zero_point)
            entry[f"{t}_qmin"] = grid.qmin
            entry[f"{t}_qmax"] = grid.qmax
            if grid.axis is not None:
                entry[f"{t}_axis"] = grid.axis
            if t != "weight":
                entry[f"tracked_min_{t}"] = _value(lo)
                entry[f"tracked_max_{t}"] = _value(hi)
        out[name] = entry
    return out


def load_calibration_config(model: nn.Module, calib: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Set the quantizers of an already quantized ``model`` from :func:`calibration_config`'s
    output (e.g. read back from JSON) or from NNI's export format.

    Weight grids of QAT/PTQ and DoReFa's ``scaled`` / ``paper`` variants come from the weights: the
    entry's weight grid, where it has one, is checked against the layer's (bits, granularity, code
    range) but not loaded; LSQ steps, DoReFa's learned weight scale and all activation ranges are
    restored.  An entry in NNI's format (no ``<type>_qmin`` /
    ``<type>_qmax``; activations as ``tracked_min_<type>`` / ``tracked_max_<type>`` only) takes the
    layer's own code range, and QAT/PTQ activation grids are recomputed from the tracked range.
    The layers given quantize from their next call: QAT's ``quant_start_step`` counts as run.

    Raises:
        ConfigError: the calibration does not fit the model (unknown layer, other bits, per-channel
            values for a per-tensor quantizer, a missing or non-numeric value, another code
            range, a scale that is not finite and positive, a zero point outside the codes); it
            names the layer and the value.  On any error the model is left as it was.
    """
    layers = quantized_layers(model)
    if not isinstance(calib, Mapping):
        raise ConfigError(f"a calibration is a mapping layer name -> entry (calibration_config's output), "
                          f"not {type(calib).__name__}")
    plan: list[tuple[Quantizer, AffineGrid, tuple[Tensor, Tensor] | None, str]] = []
    touched: list[Quantizer] = []
    for name, entry in calib.items():
        if name not in layers:
            raise ConfigError(f"calibration names layer {name!r}, which is not quantized in this model; quantized: {list(layers)}")
        if not isinstance(entry, Mapping):
            raise ConfigError(f"calibration of {name!r} must be a mapping (e.g. {{'weight_bits': 8, ...}}), "
                              f"got {type(entry).__name__} {entry!r}")
        for t, q in layers[name].quantizers().items():
            touched.append(q)
            item = _calibration_item(name, t, q, entry)
            if item is not None:
                plan.append((q, *item, f"{name!r} {t}"))
    saved = [(q, copy.deepcopy(q.state_dict())) for q in touched]
    try:
        for q, grid, tracked, where in plan:
            try:
                q.load_grid(grid, tracked)
            except ValueError as e:
                raise ConfigError(f"calibration of {where}: {e}") from None
        for q in touched:  # (a calibrated layer quantizes: QAT's quant_start_step is behind it)
            q.skip_float_steps()
    except BaseException:  # (whatever failed: the model is left as it was)
        for q, state in saved:
            q.load_state_dict(state)
        raise
    return model


def _calibration_item(
    name: str, t: str, q: Quantizer, entry: Mapping[str, Any]
) -> tuple[AffineGrid, tuple[Tensor, Tensor] | None] | None:
    """The grid (and tracked range) one quantizer gets from a calibration entry; None: nothing
    to load (a QAT/PTQ weight grid given without scale, recomputed from the weights anyway)."""
    from .fake_quant import affine_qparams_f32

    where = f"calibration of {name!r}"

    def number(key: str) -> Tensor:
        if key not in entry:
            raise ConfigError(f"{where} has no {key!r}, which its {t} quantizer ({type(q).__name__}) needs")
        try:
            return torch.tensor(entry[key], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {key!r} must be a number or a list of numbers, got {entry[key]!r}") from None

    if f"{t}_bits" not in entry:
        raise ConfigError(f"{where} has no {t}_bits but the layer quantizes its {t}")
    bits = entry[f"{t}_bits"]
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits != int(bits):
        raise ConfigError(f"{where}: {t}_bits must be an integer, got {bits!r}")
    if bits != q.bits:
        raise ConfigError(f"{where} has {t}_bits {bits}, the layer {q.bits}")
    from_weight = t == "weight" and q.grid_from_weight  # (checked against the layer, not loaded)
    if from_weight and f"{t}_scale" not in entry:  # (NNI's DoReFa export holds only the bits)
        return None
    qmin = int(number(f"{t}_qmin").item()) if f"{t}_qmin" in entry else int(q.qmin)
    qmax = int(number(f"{t}_qmax").item()) if f"{t}_qmax" in entry else int(q.qmax)
    range_q = isinstance(q, RangeQuantizer)
    tracked = None
    if t != "weight" and range_q:
        tracked = (number(f"tracked_min_{t}").float(), number(f"tracked_max_{t}").float())
        if not (bool(torch.isfinite(tracked[0]).all() and torch.isfinite(tracked[1]).all())
                and bool((tracked[0] <= tracked[1]).all())):
            raise ConfigError(f"{where}: tracked_min_{t} {tracked[0].tolist()} and tracked_max_{t} "
                              f"{tracked[1].tolist()} are not a finite range (min <= max)")
    if f"{t}_scale" in entry:
        scale, zp = number(f"{t}_scale").float(), number(f"{t}_zero_point").round().long()
    elif tracked is not None and tracked[0].dim() == 0:  # NNI's activation entry: the grid from the range
        s, z = affine_qparams_f32(tracked[0].item(), tracked[1].item(), qmin, qmax, q.symmetric)
        scale, zp = torch.tensor(s, dtype=torch.float32), torch.tensor(z, dtype=torch.int64)
    else:
        raise ConfigError(f"{where} has no {t}_scale, which its {t} quantizer ({type(q).__name__}) needs "
                          f"(lowbit.calibration_config writes it; NNI's export has none for learned steps)"
                          f"{q.missing_scale_hint}")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ConfigError(f"{where}: {t}_scale must be finite and positive, got {scale.tolist()}")
    if not bool(((zp >= qmin) & (zp <= qmax)).all()):
        hint = ""
        if t == "weight" and qmin < 0 and bool((zp >= 0).all() and (zp < 1 << q.bits).all()):
            hint = " (unsigned weight codes, as NNI's QAT uses: quantize with quant_dtype {'weight': 'uint'})"
        raise ConfigError(f"{where}: {t}_zero_point {zp.tolist()} lies outside the codes [{qmin}, {qmax}]{hint}")
    want = q.scale.numel()
    if zp.numel() != scale.numel():
        raise ConfigError(f"{where}: {t}_zero_point has {zp.numel()} values, {t}_scale {scale.numel()}")
    if scale.numel() != want:
        kind = lambda n: "per-tensor (one value)" if n == 1 else f"per-channel ({n} values)"  # noqa: E731
        raise ConfigError(f"{where}: {t}_scale is {kind(scale.numel())} but the layer's {t} quantizer is "
                          f"{kind(want)}; quantize with the granularity the calibration was made with")
    axis = entry.get(f"{t}_axis", 0 if want > 1 else None)
    if from_weight:
        if (qmin, qmax) != q._codes():
            raise ConfigError(f"calibration of {name!r} weight: grid codes [{qmin}, {qmax}] do not match this "
                              f"quantizer's [{q.qmin}, {q.qmax}]")
        return None
    return AffineGrid(scale, zp, qmin, qmax, axis), tracked


@torch.no_grad()
def _plain_weight(layer: nn.Module, name: str) -> None:
    """Make ``layer.weight`` a plain parameter holding its current value where a reparametrization
    computes it (``weight_norm``, ``spectral_norm``, ``torch.nn.utils.prune``): the folded layer
    must not recompute it over the quantized weight fold puts there.  (``parametrize``'s layers are
    of another class, which ``quantize`` does not wrap.)"""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in list(layer._forward_pre_hooks.values()):
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            torch.nn.utils.remove_weight_norm(layer)
        elif isinstance(hook, SpectralNorm) and hook.name == "weight":
            torch.nn.utils.remove_spectral_norm(layer)
        elif isinstance(hook, prune.BasePruningMethod) and getattr(hook, "_tensor_name", None) == "weight":
            prune.remove(layer, "weight")
    if not isinstance(layer._parameters.get("weight"), nn.Parameter):
        hooks = [type(h).__name__ for h in layer._forward_pre_hooks.values()]
        raise ValueError(f"cannot fold layer {name!r}: its weight is recomputed by forward pre-hooks lowbit does "
                         f"not know ({', '.join(hooks) or 'none left'}); remove them (bake the weight) first")


@torch.no_grad()
def fold(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :class:`QuantWrapper` replaced by its plain layer
    (``nn.Linear`` / ``nn.Conv*d``) whose weight holds the quantized (dequantized float) values the
    wrapper uses in eval mode — what NNI's export saved.  No lowbit class is left.

    Only weights are baked in: input/output (activation) quantization is dropped, so the folded
    model reproduces the simulated model's outputs exactly when only weights are quantized, and
    approximately otherwise.  ``model`` itself is not changed.  Before QAT's ``quant_start_step``
    the simulated model is float, and so are the folded weights (``calibration_config`` then
    reports the grids the quantizers will start from; the export refuses such a model).  A weight
    that ``weight_norm``, ``spectral_norm`` or pruning computes is folded from its current value,
    and the folded layer holds it as a plain parameter (the reparametrization removed).  A layer
    that rounds its bias to the int32 grid ``s_in * s_w`` (``bias_quant: int32``, with quantized
    inputs) gets that rounded bias, the one it adds.
    """
    # a weight recomputed by a pre-hook (weight_norm, pruning) is a plain attribute with a grad_fn
    # after a training pass, which deepcopy refuses: the copy takes its value
    memo = {id(v): v.detach().clone() for m in model.modules() for v in vars(m).values()
            if isinstance(v, Tensor) and v.grad_fn is not None}
    folded = copy.deepcopy(model, memo)
    names = module_names(folded)
    for name, wrapper in quantized_layers(folded).items():
        layer = wrapper.module
        _plain_weight(layer, name)
        wq = wrapper.quantized_weight()
        layer.weight = nn.Parameter(wq, requires_grad=layer.weight.requires_grad)
        iq, wq_ = wrapper.input_quantizer, wrapper.weight_quantizer
        if (wrapper.__dict__.get("_round_bias") and layer.bias is not None  # (the bias the layer adds next call)
                and iq.float_steps_left() == 0 and wq_.float_steps_left() == 0):
            with torch.no_grad():
                rounded = round_bias(layer.bias, iq.grid().scale * wq_.grid().scale)
            layer.bias = nn.Parameter(rounded.detach().clone(), requires_grad=layer.bias.requires_grad)
        replace_module(folded, wrapper, layer, names)
    return folded
