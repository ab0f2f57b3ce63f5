"""QuantWrapper: in-place replacement, printing, state dicts, the quantizer contract of
docs/INTERFACES.md, repeated calls and inputs of any rank."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn

import lowbit
from helpers import train_vae
from lowbit import kernels
from lowbit.fake_quant import AffineGrid, f32, tensor_path
from lowbit.methods import NotCalibratedError, Quantizer
from lowbit.models.vae import VAE
from lowbit.modules import QuantWrapper

STUDY = ["fc1", "fc21", "fc22", "fc3"]


METHODS = ["qat", "dorefa", "lsq", "ptq"]


def w8a8(layers=STUDY, bits=8, **extra):
    return [{"quant_types": ["weight", "input"], "quant_bits": bits, "op_names": layers, **extra}]


class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding_mode="reflect", padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def train_steps(model, steps=3, seed=0, batch=32):
    train_vae(model, steps=steps, seed=seed, batch=batch)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_wrapper_replaces_the_layer_in_place(method):
    model = VAE()
    fc1 = model.fc1
    weight = fc1.weight
    out = lowbit.quantize(model, w8a8(), method)
    assert out is model
    assert isinstance(model.fc1, QuantWrapper) and model.fc1.module is fc1 and model.fc1.weight is weight
    assert model.fc1.method == method and isinstance(model.fc4, nn.Linear)
    assert isinstance(model.fc1.weight_quantizer, Quantizer) and isinstance(model.fc1.input_quantizer, Quantizer)
    assert model.fc1.output_quantizer is None
    assert "fc1.module.weight" in model.state_dict()


def test_wrapper_reads_the_layers_attributes_through():
    model = lowbit.quantize(nn.Sequential(nn.Linear(4, 8), nn.Conv2d(1, 3, 5, stride=2)),
                            [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear", "Conv2d"]}], "qat")
    model[0].module.tag = "mine"
    assert (model[0].in_features, model[0].out_features, model[0].tag) == (4, 8, "mine")
    assert (model[1].kernel_size, model[1].stride, model[1].out_channels) == ((5, 5), (2, 2), 3)
    with pytest.raises(AttributeError, match="'QuantWrapper' object .wrapping Linear. has no attribute 'nope'"):
        model[0].nope


@pytest.mark.parametrize("method", METHODS)
def test_the_layers_own_hooks_still_run(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    model[0].register_forward_hook(lambda mod, args, out: seen.append((args[0].shape, out.shape)))
    model[0].register_forward_pre_hook(lambda mod, args: (args[0] * 2,))  # a hook may change the input
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(model[2])  # recomputes the weight from g and v in a forward pre-hook
    lowbit.quantize(model, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"]}], method)
    x = torch.randn(5, 4)
    y = model(x)
    assert seen == [((5, 4), (5, 8))]
    y.pow(2).sum().backward()
    last = model[2].module
    assert last.weight_g.grad is not None and last.weight_v.grad is not None  # g and v train
    with torch.no_grad():  # the pre-hook doubled fc's input
        h = model[1](model[0]._forward(2 * x))
    assert torch.equal(model[2](h), y.detach())


@pytest.mark.parametrize("method", METHODS)
def test_a_forward_pass_reads_no_attribute_through_module_getattr(method, monkeypatch):
    """The wrapper and its quantizers read their layer, quantizers, weight, bias and steps from
    nn.Module's dictionaries (lowbit.methods.base.member): on Python 3.11 a read that falls to
    nn.Module.__getattr__ first raises (and catches) an AttributeError, a cost paid by every layer
    of every step.  (The fused path: without the kernels the quantizers' own forward passes run.)"""
    if kernels.get() is None:
        pytest.skip("the fused kernels are off (LOWBIT_KERNELS=0) or did not build here")
    model = lowbit.quantize(VAE(), w8a8(), method)
    train_steps(model, 1)
    ours = {id(m) for w in model.modules() if isinstance(w, QuantWrapper) for m in w.modules()}  # (layers too)
    reads = []
    real, wrapper_own = nn.Module.__getattr__, QuantWrapper.__getattr__

    def counting(real):
        def getattr_(self, name):
            if id(self) in ours:
                reads.append((type(self).__name__, name))
            return real(self, name)
        return getattr_

    monkeypatch.setattr(nn.Module, "__getattr__", counting(real))
    monkeypatch.setattr(QuantWrapper, "__getattr__", counting(wrapper_own))
    model(torch.rand(8, 1, 28, 28))
    assert reads == []


def test_print_shows_method_bits_granularity_and_ranges():
    model = lowbit.quantize(VAE(), w8a8(granularity={"weight": "per_channel"}), "qat")
    text = str(model)
    assert text.count("QuantWrapper(") == 4 and "(fc4): Linear(" in text
    assert "method=qat" in text and "weight=8b per_channel affine int" in text and "input=8b per_tensor affine uint" in text
    assert "uncalibrated" in text
    train_steps(model, 1)
    text = str(model)
    assert "uncalibrated" not in text and "scale=" in text and "range=[" in text


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_loads_into_a_freshly_quantized_model(method, tmp_path):
    torch.manual_seed(0)
    model = train_steps(lowbit.quantize(VAE(), w8a8(), method))
    model.eval()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    fresh = lowbit.quantize(VAE(), w8a8(), method)
    fresh.load_state_dict(load_file(tmp_path / "m.safetensors"))
    fresh.eval()
    x = torch.rand(16, 784)
    eps = torch.zeros(16, 20)
    assert torch.equal(model(x, eps)[0], fresh(x, eps)[0])
    assert lowbit.calibration_config(fresh) == lowbit.calibration_config(model)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cfg", ["w8a8", "w4a4_per_channel", "w3_reduced"])
def test_quantizer_contract(method, cfg):
    """grid().dequantize(quantize_int(x)) == forward(x) in eval mode, bit for bit; activation
    quantizers are torch.fake_quantize_per_tensor_affine on their grid."""
    if cfg == "w8a8":
        config = w8a8()
    elif cfg == "w4a4_per_channel":
        if method == "dorefa":
            pytest.skip("DoReFa weights are per-tensor")
        config = w8a8(bits=4, granularity={"weight": "per_channel"})
    else:
        config = w8a8(bits=3, weight_range="reduced")
    torch.manual_seed(1)
    model = train_steps(lowbit.quantize(VAE(), config, method), steps=2)
    model.eval()
    x = torch.rand(64, 784)
    for name, wrapper in _wrappers(model):
        wq = wrapper.weight_quantizer
        w = wrapper.module.weight.detach()
        q = wq.quantize_int(w)
        g = wq.grid()
        assert isinstance(g, AffineGrid) and q.dtype == torch.int64
        assert int(q.min()) >= g.qmin and int(q.max()) <= g.qmax
        assert torch.equal(g.dequantize(q), wq(w)), name
        assert g.zero_point.dtype == torch.int64 and g.scale.dtype == torch.float32
        if cfg == "w3_reduced":
            assert g.qmax <= 3  # one bit less of range
        iq = wrapper.input_quantizer
        a = torch.randn(64, wrapper.module.in_features) * 2
        ga = iq.grid()
        ref = torch.fake_quantize_per_tensor_affine(a, ga.scale, ga.zero_point.to(torch.int32), ga.qmin, ga.qmax)
        assert torch.equal(iq(a), ref)
        assert torch.equal(ga.dequantize(iq.quantize_int(a)), ref)
    assert model(x, torch.zeros(64, 20))[0].isfinite().all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_quantizer_contract_in_half_precision(method, dtype, granularity):
    """A float16/bfloat16 tensor is quantized in float32 (then cast back) on every path: its codes
    are quantize_int's (half-precision x * (1/s) used to put 1-4% of the codes one off, per-tensor)."""
    if method == "dorefa" and granularity == "per_channel":
        pytest.skip("DoReFa weights are per-tensor")
    for path in (contextlib.nullcontext, tensor_path):
        torch.manual_seed(0)
        extra = {} if method == "dorefa" else {"granularity": {"weight": granularity}}
        model = lowbit.quantize(nn.Sequential(nn.Linear(64, 64)).to(dtype), [{"quant_types": ["weight", "input"], "quant_bits": 8,
                                                                            "op_types": ["Linear"], **extra}], method)
        x = torch.randn(256, 64, dtype=dtype)
        x = x.relu() if method == "dorefa" else x  # (DoReFa's activations are on [0, 1])
        with path():
            model(x)
            model.eval()
            for q, v in ((model[0].weight_quantizer, model[0].module.weight.detach()), (model[0].input_quantizer, x)):
                with torch.no_grad():
                    y = q(v)
                    assert y.dtype == dtype
                    assert torch.equal(q.grid().dequantize(q.quantize_int(v)).to(dtype), y)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_model_cast_after_quantizing_keeps_float32_grids(method, dtype, tmp_path):
    # (.half() after quantize made steps and scales half precision: codes one step off quantize_int,
    # "its state is inconsistent" at export)
    torch.manual_seed(0)
    types = ["weight"] if method == "dorefa" else ["weight", "input"]
    model = lowbit.quantize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)),
                            [{"quant_types": types, "quant_bits": 8, "op_types": ["Linear"]}], method)
    model(torch.rand(16, 8))
    steps = lowbit.quantizer_parameters(model)
    model = model.to(dtype)
    assert all(t.dtype == torch.float32 for n, t in model.state_dict().items() if "quantizer" in n and t.is_floating_point())
    assert all(a is b for a, b in zip(lowbit.quantizer_parameters(model), steps))  # (the optimizer's objects)
    assert model[0].module.weight.dtype == dtype
    model.eval()
    x = torch.rand(16, 8, dtype=dtype)
    with torch.no_grad():
        assert model(x).dtype == dtype
        for wrapper in (model[0], model[2]):
            q, w = wrapper.weight_quantizer, wrapper.module.weight.detach()
            y = q(w)
            codes = q.quantize_int(w)
            assert torch.equal(torch.round(y.double() / q.grid().scale.double()) + q.grid().zero_point, codes.double())
    lowbit.export(model, tmp_path / "m.onnx", example_inputs=x[:2])


def _wrappers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantWrapper)]


@pytest.mark.parametrize("method", ["qat", "lsq", "ptq"])
def test_eval_before_any_data_raises_not_calibrated(method):
    model = lowbit.quantize(VAE(), w8a8(), method).eval()
    with pytest.raises(NotCalibratedError):
        model(torch.rand(2, 784))
    with pytest.raises(NotCalibratedError):
        lowbit.calibration_config(model)


class Twice(nn.Module):
    """Calls the same layer twice and feeds it inputs of rank 3."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):  # x: (B, T, 6)
        return self.out(torch.relu(self.shared(torch.relu(self.shared(x)))))


@pytest.mark.parametrize("method", METHODS)
def test_layers_called_twice_and_inputs_of_any_rank(method):
    torch.manual_seed(0)
    model = lowbit.quantize(Twice(), [{"quant_types": ["weight", "input", "output"], "quant_bits": 6, "op_types": ["Linear"]}], method)
    opt = torch.optim.SGD(list(model.parameters()), lr=1e-2)
    for _ in range(3):
        x = torch.randn(4, 5, 6)
        loss = model(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    y = model(torch.randn(3, 5, 6))
    assert y.shape == (3, 5, 2)
    # a 1-D input (no batch axis) works too
    assert model(torch.randn(6)).shape == (2,)


def test_qat_ema_sees_both_calls_of_a_shared_layer():
    model = lowbit.quantize(Twice(), [{"quant_types": ["input"], "quant_bits": 8, "op_names": ["shared"]}], "qat")
    iq = model.shared.input_quantizer
    x = torch.full((2, 1, 6), -3.0)
    model(x)  # first call sees -3 (initialises), second call sees relu(...) >= 0
    lo, hi = iq.tracked_range()
    assert lo.item() == pytest.approx(-3.0 * 0.99, rel=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_conv_model_per_tensor_and_per_channel(method):
    torch.manual_seed(0)
    gran = "per_tensor" if method == "dorefa" else "per_channel"
    cfg = [{"quant_types": ["weight", "input"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"], "granularity": {"weight": gran}}]
    model = lowbit.quantize(SmallConv(), cfg, method)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        loss = model(torch.rand(8, 1, 8, 8)).logsumexp(1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    y = model(torch.rand(2, 1, 8, 8))
    assert y.shape == (2, 10)
    wq = model.conv2.weight_quantizer
    g = wq.grid()
    assert g.axis == (0 if gran == "per_channel" else None)
    if gran == "per_channel":
        assert g.scale.shape == (8,)
    w = model.conv2.module.weight.detach()
    assert torch.equal(g.dequantize(wq.quantize_int(w)), wq(w))
    # the wrapper runs the layer's own convolution (reflect padding, stride)
    plain = nn.Conv2d(4, 8, 3, stride=2, padding_mode="reflect", padding=1)
    plain.weight.data.copy_(wq(w))
    # ... adding its bias rounded to the int32 grid of step s_in * s_w (bias_quant's default)
    step = model.conv2.input_quantizer.grid().scale * g.scale
    plain.bias.data.copy_(torch.round(model.conv2.module.bias.detach() / step) * step)
    assert not torch.equal(plain.bias, model.conv2.module.bias)
    a = torch.rand(2, 4, 8, 8) * 0  # exactly representable input: zero
    model.conv2.input_quantizer.eval()
    assert torch.equal(model.conv2(a), plain(a))


@pytest.mark.parametrize("method", ["qat", "ptq"])
def test_cpu_fast_path_and_tensor_path_agree(method):
    """Per-tensor range quantizers keep their grid as Python numbers on the CPU; the tensor path
    (used on other devices) must give the same grids and outputs."""

    models, grads = [], []
    for path in (contextlib.nullcontext, tensor_path):
        torch.manual_seed(0)
        model = lowbit.quantize(VAE(), w8a8(bits=4, quant_dtype={"input": "int"}), method)
        # four observed batches of growing range, gradients but no optimizer step: training would
        # amplify last-bit differences of the EMA into different weights (Adam's first steps are
        # +-lr whatever the gradient's size), and this test is about the quantizers' arithmetic
        g = torch.Generator().manual_seed(0)
        for i in range(4):
            x = torch.rand(32, 784, generator=g) * (1 + i)
            with path():
                logits, mu, logvar = model(x, torch.randn(32, 20, generator=g))
            (logits.square().mean() + mu.sum() + logvar.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        models.append(model.eval())
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6), name
    a, b = (lowbit.calibration_config(m) for m in models)
    for name in a:
        for key, value in a[name].items():
            assert value == (b[name][key] if isinstance(value, str) else pytest.approx(b[name][key], rel=1e-6)), (name, key)
    x = torch.rand(8, 784)
    assert torch.allclose(models[0](x, torch.zeros(8, 20))[0], models[1](x, torch.zeros(8, 20))[0], atol=1e-4)


@pytest.mark.parametrize("tracking_method", ["qat", "ptq"])
def test_range_tracking_goes_on_when_the_cpu_fast_path_takes_over(tracking_method):
    """A model observed on another device (the tensor path) and then trained on the CPU keeps its
    tracked range: QAT's EMA continues, PTQ's min/max keeps the earlier extremes."""
    m = nn.Sequential(nn.Linear(4, 4))
    lowbit.quantize(m, [{"quant_types": ["input"], "quant_bits": 8, "op_types": ["Linear"]}], tracking_method)
    with tensor_path():  # as on a GPU
        m(torch.full((2, 4), 10.0))
    m(torch.tensor([[0.0, 1.0, 1.0, 1.0]]))  # back on the CPU's host path
    expected = f32(10.0 + 0.01 * (1.0 - 10.0)) if tracking_method == "qat" else 10.0
    assert lowbit.calibration_config(m)["0"]["tracked_max_input"] == pytest.approx(expected, rel=1e-6)
    assert lowbit.calibration_config(m)["0"]["tracked_min_input"] == 0.0


@pytest.mark.parametrize("method", ["qat", "ptq", "lsq", "dorefa"])
def test_a_torch_func_transform_gets_a_clear_error(method):
    """Inside torch.func.grad / vmap a quantized layer raises lowbit's TransformError naming the
    problem and loss.backward() (PyTorch's own errors there named a data pointer or a C++
    Function); functional_call without a transform still runs."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4))
    lowbit.quantize(m, [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"]}], method)
    x = torch.randn(16, 8)
    lowbit.calibrate(m, [x])
    params = {k: v.detach() for k, v in m.named_parameters()}
    with pytest.raises(lowbit.TransformError, match=r"torch\.func transform.*loss\.backward\(\)"):
        grad(lambda p: functional_call(m, p, (x,)).sum())(params)
    m.eval()
    with pytest.raises(lowbit.TransformError, match="torch.func transform"):
        vmap(m)(x[:, None])
    assert torch.equal(functional_call(m, params, (x,)), m(x))


@pytest.mark.parametrize("method", ["qat", "lsq"])
def test_a_layers_backward_hooks_fire_on_the_quantized_layer(method):
    # they never fired once the layer was quantized (the wrapper runs the layer's computation itself)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    seen = {}

    def pre_hook(mod, gout):
        seen["pre"] = gout[0].clone()

    def hook(mod, gin, gout):
        seen["gin"] = gin[0].clone()
        return (gin[0] * 0,)

    m[0].register_full_backward_pre_hook(pre_hook)
    m[0].register_full_backward_hook(hook)
    lowbit.quantize(m, [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}], method)
    x = torch.randn(32, 8, requires_grad=True)
    h = m[0](x)
    h.retain_grad()
    m[2](torch.relu(h)).sum().backward()
    assert torch.equal(seen["pre"], h.grad)  # dL/d(layer output)
    assert seen["gin"].shape == x.shape and seen["gin"].abs().sum() > 0  # dL/dx, as the layer's input
    assert torch.equal(x.grad, torch.zeros_like(x))  # the hook's returned gradient is the one used


@pytest.mark.parametrize("method", ["qat", "ptq", "lsq", "dorefa"])
def test_torch_jit_trace_records_the_quantized_computation(method):
    # the fused kernels' calls are not recorded by the tracer: a traced model returned garbage
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lowbit.quantize(m, [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}], method)
    x = torch.randn(32, 8)
    if method == "ptq":
        lowbit.calibrate(m, [x])
    else:
        m(x)  # a training batch
    m.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tracer's warnings about Python values)
        traced = torch.jit.trace(m, (x,))
        x2 = torch.randn(16, 8)
        assert torch.equal(traced(x2), m(x2))


def test_torch_export_on_the_cpu_asks_for_the_tensor_path():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4))
    lowbit.quantize(m, [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}], "lsq")
    x = torch.randn(4, 8)
    m(x)
    m.eval()
    with pytest.raises(Exception, match="inside `with lowbit.tensor_path\\(\\):`"):
        torch.export.export(m, (x,))
    with lowbit.tensor_path():
        exported = torch.export.export(m, (x,))
    assert torch.equal(exported.module()(x), m(x))


def test_a_layers_backward_hook_sees_the_input_its_forward_pre_hooks_made():
    # as nn.Module: grad_input is the gradient with respect to the pre-hooks' output
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 4))
    seen = {}
    m[0].register_forward_pre_hook(lambda mod, args: (2 * args[0],))

    def hook(mod, gin, gout):
        seen["gin"] = gin[0].clone()

    m[0].register_full_backward_hook(hook)
    lowbit.quantize(m, [{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"]}], "qat")
    x = torch.randn(16, 8, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(seen["gin"] * 2, x.grad)  # dL/dx = 2 dL/d(2x)


@pytest.mark.parametrize("method", ["qat", "ptq", "lsq", "dorefa"])
def test_the_bias_is_added_on_its_int32_grid_in_every_path(method):
    # bias_quant "int32" (the default): a layer with quantized input and weights adds round(b / (s_in *
    # s_w)) * s_in * s_w, what the integer GEMM of its exported file adds; the fused kernel, PyTorch's
    # code and the tensor path give it bit for bit, and the bias' gradient is the float bias' one
    from lowbit.fake_quant import round_bias

    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.bias.mul_(3.0)
    m = lowbit.quantize(nn.Sequential(layer), [{"quant_types": ["input", "weight"], "quant_bits": 4,
                                               "op_types": ["Linear"]}], method)[0]
    x = torch.rand(32, 16)
    m(x)  # (ranges, steps)
    m.eval()
    s_in, s_w = m.input_quantizer.grid().scale, m.weight_quantizer.grid().scale
    want_b = torch.round(m.module.bias.detach() / (s_in * s_w)) * (s_in * s_w)
    assert not torch.equal(want_b, m.module.bias.detach())  # (the rounding is visible at 4 bits)
    with torch.no_grad():
        want = F.linear(m.input_quantizer(x), m.weight_quantizer(m.module.weight), want_b)
    outs = []
    for ctx in (contextlib.nullcontext(), kernels.disabled(), lowbit.tensor_path()):
        m.module.bias.grad = None
        with ctx:
            y = m(x)
        y.sum().backward()
        outs.append(y.detach())
        assert torch.equal(m.module.bias.grad, torch.full((8,), 32.0))  # (straight through)
    for y in outs:
        assert torch.equal(y, want)
    assert torch.equal(round_bias(m.module.bias, s_in * s_w), want_b)
    # bias_quant "float": the float bias, as NNI simulates it
    f = lowbit.quantize(nn.Sequential(copy.deepcopy(layer)), [{"quant_types": ["input", "weight"], "quant_bits": 4,
                                                              "op_types": ["Linear"], "bias_quant": "float"}], method)[0]
    f.train()(x)
    f.eval()
    with torch.no_grad():
        assert torch.equal(f(x), F.linear(f.input_quantizer(x), f.weight_quantizer(f.module.weight), f.module.bias))


def test_no_bias_rounding_while_qat_runs_in_float():
    torch.manual_seed(0)
    m = lowbit.quantize(nn.Sequential(nn.Linear(6, 4)), [{"quant_types": ["input", "weight"], "quant_bits": 4,
                                                         "op_types": ["Linear"], "quant_start_step": 2}], "qat")[0]
    x = torch.rand(8, 6)
    y = m(x)  # (a float step: the layer as it is)
    assert torch.equal(y, F.linear(x, m.module.weight, m.module.bias))
