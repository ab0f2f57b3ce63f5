"""The wrapper that replaces a quantized layer: it holds the original layer and its quantizers.

``forward(x) = output_q(op(input_q(x), weight_q(module.weight), module.bias))`` where ``op`` is the
layer's own ``F.linear`` / ``_conv_forward`` (so padding modes, strides and groups are the
layer's).  The wrapper takes the layer's place under the same attribute name; ``print(model)``
shows the method, the bits and granularity of each quantized tensor and, once known, its range.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LayerSpec
from .fake_quant import on_host, round_bias, tensor_path
from .methods.base import Quantizer, member

__all__ = ["QuantWrapper", "TransformError", "module_names", "replace_module"]


class TransformError(RuntimeError):
    """A quantized layer was called inside a ``torch.func`` transform (``grad``, ``vmap``, ``vjp``,
    ``jacrev``, ...), which lowbit's quantizers do not support."""


class QuantWrapper(nn.Module):
    """A layer (``nn.Linear`` or ``nn.Conv1d/2d/3d``) with fake-quantized weight, input and output.

    Attributes:
        module: the original layer, holding the float weight and bias that train.
        method: the method's registry name.
        weight_quantizer, input_quantizer, output_quantizer: :class:`Quantizer` or ``None``.
        grad_quantizer: a module acting on the output's gradient (DoReFa ``gradient_bits``) or None.
        spec: the parsed :class:`~lowbit.config.LayerSpec`.
    """

    def __init__(
        self,
        module: nn.Module,
        method: str,
        weight_quantizer: Quantizer | None = None,
        input_quantizer: Quantizer | None = None,
        output_quantizer: Quantizer | None = None,
        grad_quantizer: nn.Module | None = None,
        spec: LayerSpec | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise TypeError(f"QuantWrapper wraps Linear and Conv1d/2d/3d layers, not {type(module).__name__}")
        self.module = module
        self.method = method
        self.spec = spec
        self._is_linear = isinstance(module, nn.Linear)
        #: the bias rounded to its int32 grid of step s_in * s_w (the ``bias_quant`` option "int32"):
        #: what the integer GEMM of the exported file adds
        self._round_bias = (spec is not None and spec.options.get("bias_quant") == "int32"
                            and input_quantizer is not None and weight_quantizer is not None)
        # None quantizers stay plain attributes so that print(model) lists only real ones
        for name, q in (
            ("weight_quantizer", weight_quantizer),
            ("input_quantizer", input_quantizer),
            ("output_quantizer", output_quantizer),
            ("grad_quantizer", grad_quantizer),
        ):
            setattr(self, name, q)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
            raise TransformError(
                f"a lowbit-quantized {type(self.module).__name__} was called inside a torch.func transform "
                "(grad, vmap, vjp, jacrev, ...): not supported — its quantizers update their ranges and "
                "steps in place during the forward pass and use custom autograd functions without "
                "functorch rules. Compute gradients with loss.backward() (or torch.autograd.grad); "
                "torch.func.functional_call without a transform works"
            )
        if torch._C._get_tracing_state() is not None:
            return self._traced_forward(x)
        if torch.compiler.is_exporting() and on_host(x):
            raise TransformError(
                "torch.export of a lowbit-quantized model on the CPU: call it inside `with lowbit.tensor_path():` "
                "(the host path's fused kernels and Python-number grids cannot be exported; the tensor path gives "
                "the same values)"
            )
        return self._dispatch(x)

    def _dispatch(self, x: Tensor) -> Tensor:
        m = member(self, "module")
        if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks:
            return self._forward_with_layer_hooks(x)
        return self._forward(x)

    def _traced_forward(self, x: Tensor) -> Tensor:
        """Under ``torch.jit.trace`` (and the TorchScript ONNX exporter) the layer runs the tensor
        path, whose PyTorch operations the tracer records (the fused kernels' calls it would not: a
        traced model returned garbage), with the quantizers' pending state written to their
        buffers first, outside the trace (the tracer fails on those writes)."""
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            for q in self.quantizers().values():
                flush = getattr(q, "_flush", None)
                if flush is not None:
                    flush()
        finally:
            torch._C._set_tracing_state(state)
        with tensor_path():
            return self._dispatch(x)

    def _forward(self, x: Tensor) -> Tensor:
        # (member: the attribute reads of a forward pass without nn.Module.__getattr__'s cost)
        m = member(self, "module")
        wq, iq = member(self, "weight_quantizer"), member(self, "input_quantizer")
        y = None
        # one fused call for the input's quantization, the layer and (where its quantizer has a
        # fused form) the weight's quantization; the quantizers are not called as modules then, so
        # not where hooks are registered on them
        weight, bias = member(m, "weight"), member(m, "bias")
        rb = bias is not None and self.__dict__.get("_round_bias", False)
        fuse = iq is not None and self._is_linear and not (iq._forward_hooks or iq._forward_pre_hooks)
        if fuse and wq is not None and not (wq._forward_hooks or wq._forward_pre_hooks):
            weight_args = wq.fused_weight(weight)
            if weight_args is not None:
                y = iq.linear_input(x, weight, bias, weight_args, round_bias=rb)
        if y is None:
            w = weight if wq is None else wq(weight)
            # (a fused input call does not know a weight grid quantized before it: not with the bias rounded)
            y = iq.linear_input(x, w, bias) if fuse and not rb else None
            if y is None:
                if iq is not None:
                    x = iq(x)
                if rb:
                    bias = self._int32_bias(bias, iq, wq)
                y = _linear(x, w, bias, weight) if self._is_linear else m._conv_forward(x, w, bias)
        oq, gq = member(self, "output_quantizer"), member(self, "grad_quantizer")
        if oq is not None:
            y = oq(y)
        if gq is not None:
            y = gq(y)
        return y

    @staticmethod
    def _int32_bias(bias: Tensor, iq: Quantizer, wq: Quantizer) -> Tensor:
        """``bias`` on its int32 grid of step ``s_in * s_w`` (the grids this call's quantizers used),
        or as it is where one of them passed its tensor through (QAT's ``quant_start_step``)."""
        s_in, s_w = iq.used_scale(), wq.used_scale()
        if s_in is None or s_w is None:
            return bias
        return round_bias(bias, s_in.to(bias.device) * s_w.to(bias.device))

    def _forward_with_layer_hooks(self, x: Tensor) -> Tensor:
        """The layer's own forward pre-hooks and forward hooks (a user's, or ``weight_norm`` /
        ``spectral_norm``, which recompute the weight in a pre-hook) run around the quantized
        computation, as they would around the float layer; so do its backward hooks (full and
        pre-hooks: gradients with respect to the wrapper's input and output, as ``nn.Module`` sets
        them up; the deprecated non-full ones on the output's gradient function)."""
        m = self.module
        args: tuple[Any, ...] = (x,)
        for hid, hook in list(m._forward_pre_hooks.items()):
            if hid in m._forward_pre_hooks_with_kwargs:
                res = hook(m, args, {})
                if res is not None:
                    args = res[0]
            else:
                res = hook(m, args)
                if res is not None:
                    args = res if isinstance(res, tuple) else (res,)
        bw_hook, non_full = None, []
        if m._backward_hooks or m._backward_pre_hooks:  # (set up after the pre-hooks, as nn.Module does)
            full, non_full = m._get_backward_hooks()
            pre = m._get_backward_pre_hooks()
            if full or pre:
                bw_hook = torch.utils.hooks.BackwardHook(m, full, pre)
                args = bw_hook.setup_input_hook(args)
        y = self._forward(*args)
        for hid, hook in list(m._forward_hooks.items()):
            res = hook(m, args, {}, y) if hid in m._forward_hooks_with_kwargs else hook(m, args, y)
            if res is not None:
                y = res
        if bw_hook is not None:
            y = bw_hook.setup_output_hook(y)
        if non_full and isinstance(y, Tensor) and y.grad_fn is not None:
            from torch.nn.modules.module import _WrappedHook

            for hook in non_full:
                y.grad_fn.register_hook(_WrappedHook(hook, m))
        return y

    def __getattr__(self, name: str) -> Any:
        # the layer's own attributes (in_features, kernel_size, a user's tag) read through the
        # wrapper, so code written for the float model keeps working; the wrapper's parameters,
        # buffers and submodules are found first, as for any nn.Module
        modules = self.__dict__["_modules"]
        if name in modules:  # the quantizers and the layer: first, the forward pass reads them
            return modules[name]
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = modules.get("module")
            if layer is None:
                raise
        try:
            return getattr(layer, name)
        except AttributeError:
            raise AttributeError(f"'QuantWrapper' object (wrapping {type(layer).__name__}) has no attribute {name!r}") from None

    @property
    def weight(self) -> Tensor:
        """The float weight (``module.weight``)."""
        return self.module.weight

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    def quantizers(self) -> dict[str, Quantizer]:
        """``{"weight": q, "input": q, "output": q}`` for the tensors that are quantized."""
        out = {}
        for t in ("weight", "input", "output"):
            q = getattr(self, f"{t}_quantizer")
            if q is not None:
                out[t] = q
        return out

    @torch.no_grad()
    def quantized_weight(self) -> Tensor:
        """The weight as the layer uses it in eval mode (dequantized values)."""
        q = self.weight_quantizer
        if q is None:
            return self.module.weight.detach().clone()
        was = q.training
        q.eval()
        try:
            return q(self.module.weight).detach().clone()
        finally:
            q.train(was)

    def extra_repr(self) -> str:
        parts = [f"method={self.method}"]
        for t, q in self.quantizers().items():
            parts.append(f"{t}={q.spec.describe()}")
        if self.grad_quantizer is not None:
            parts.append(f"gradient={self.grad_quantizer.bits}b")
        return ", ".join(parts)


def _linear(x: Tensor, w: Tensor, bias: Tensor | None, weight: Tensor) -> Tensor:
    """``F.linear(x, w, bias)`` computed the way the plain layer, with its float ``weight``, would
    compute it: for an input of 3+ dims whose batch dims are not contiguous, PyTorch folds them into
    one matrix product only where an operand requires a gradient — the layer's weight does; a
    quantized weight computed under ``no_grad`` does not — and the two ways differ in the last bits
    (a folded model, ``lowbit.fold``, would then not reproduce the wrapper's output exactly)."""
    if x.dim() > 2 and weight.requires_grad and not w.requires_grad and not x.requires_grad and not x.is_contiguous():
        y = x.reshape(-1, x.shape[-1]).mm(w.t()).view(*x.shape[:-1], w.shape[0])
        return y if bias is None else y.add_(bias)
    return F.linear(x, w, bias)


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> every name it is registered under in model`` (a tied layer has several)."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            out.setdefault(id(module), []).append(name)
    return out


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module, names: dict[int, list[str]] | None = None) -> None:
    """Put ``new`` in every place ``old`` is registered in ``model`` (under each of its names).

    ``names``: :func:`module_names` of ``model``, when replacing many modules (saves a walk each).
    """
    for name in (names if names is not None else module_names(model)).get(id(old), []):
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
