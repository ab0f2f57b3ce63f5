"""QAT (Jacob et al. 2018): affine ranges, EMA tracking, quant_start_step, clipped STE."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import TensorSpec
from lowbit.methods.base import RangeQuantizer




def layer(bits=8, types=("weight", "input"), **extra):
    model = nn.Sequential(nn.Linear(16, 8))
    cfg = [{"quant_types": list(types), "quant_bits": bits, "op_types": ["Linear"], **extra}]
    return lowbit.quantize(model, cfg, "qat")[0]


def test_weight_range_is_the_current_weight_affine_signed():
    wrapper = layer()
    wq = wrapper.weight_quantizer
    w = wrapper.module.weight.detach()
    y = wq(w)
    g = wq.grid()
    assert (g.qmin, g.qmax) == (-128, 127) and g.qmin <= g.zero_point.item() <= g.qmax
    lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
    assert g.scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert (y - w).abs().max() <= g.scale / 2 * 1.0001
    assert y.unique().numel() <= 256
    # the range follows the weight at every call
    with torch.no_grad():
        wrapper.module.weight.mul_(2)
    wq(wrapper.module.weight)
    assert wq.grid().scale.item() == pytest.approx(2 * g.scale.item(), rel=1e-5)


def test_uint_weights_reproduce_nnis_grid():
    wq = layer(quant_dtype={"weight": "uint"}).weight_quantizer
    wq(torch.tensor([[-0.3, 0.0, 0.1]]))
    g = wq.grid()
    assert (g.qmin, g.qmax) == (0, 255)
    assert g.zero_point.item() == round(0.3 / (0.4 / 255))


def test_range_always_includes_zero():
    wrapper = layer(types=("input",))
    wrapper(torch.rand(4, 16) + 1.0)  # all inputs in [1, 2]
    lo, hi = wrapper.input_quantizer.tracked_range()
    g = wrapper.input_quantizer.grid()
    assert lo.item() == 0.0 and g.zero_point.item() == 0
    assert wrapper.input_quantizer(torch.zeros(3)).eq(0).all()


def test_activation_ema_tracking():
    q = layer(types=("input",)).input_quantizer
    a = torch.tensor([-1.0, 2.0])
    b = torch.tensor([-3.0, 4.0])
    q(a)  # the first batch initialises
    assert q.tracked_range()[0].item() == -1.0 and q.tracked_range()[1].item() == 2.0
    q(b)
    lo, hi = q.tracked_range()
    assert lo.item() == pytest.approx(0.99 * -1.0 + 0.01 * -3.0, rel=1e-6)
    assert hi.item() == pytest.approx(0.99 * 2.0 + 0.01 * 4.0, rel=1e-6)
    # frozen in eval mode
    q.eval()
    q(torch.tensor([-100.0, 100.0]))
    assert q.tracked_range()[1].item() == hi.item()
    # and the buffers hold the same state (state_dict)
    sd = q.state_dict()
    assert sd["tracked_max"].item() == hi.item() and sd["initialized"].item()


def test_ema_decay_option_and_tensor_path_agree():
    q = layer(types=("input",), ema_decay=0.5).input_quantizer
    q(torch.tensor([0.0, 2.0]))
    q(torch.tensor([0.0, 4.0]))
    assert q.tracked_range()[1].item() == 3.0
    # the tensor path (used off the CPU) computes the same EMA and grid
    spec = TensorSpec("input", 8, "per_tensor", "affine", "uint")
    t = RangeQuantizer(spec, tracking="ema", decay=0.5)
    for x in (torch.tensor([0.0, 2.0]), torch.tensor([0.0, 4.0])):
        lo, hi = torch.aminmax(x)
        t._observe_tensor(lo, hi)
    assert t.grid().scale.item() == q.grid().scale.item()


def test_clipped_ste_for_activations():
    q = layer(types=("input",)).input_quantizer
    q(torch.tensor([0.0, 1.0]))  # range [0, 1]
    x = torch.tensor([-0.5, 0.25, 0.75, 1.5], requires_grad=True)
    q.eval()
    q(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_weight_gradient_is_straight_through():
    wrapper = layer(types=("weight",))
    w = wrapper.module.weight
    wrapper.weight_quantizer(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_quant_start_step_counts_training_forward_passes():
    wrapper = layer(quant_start_step=3)
    x = torch.randn(4, 16)
    float_out = nn.functional.linear(x, wrapper.module.weight, wrapper.module.bias)
    for _ in range(3):
        assert torch.equal(wrapper(x), float_out)
    assert not torch.equal(wrapper(x), float_out)  # the 4th pass is quantized
    assert wrapper.weight_quantizer.state_dict()["step"].item() == 3
    # ranges were tracked during the delay
    assert wrapper.input_quantizer.tracked_range()[1].item() > 0
    # a fresh model loading the state continues where it stopped
    fresh = layer(quant_start_step=3)
    fresh.load_state_dict(wrapper.state_dict())
    assert not torch.equal(fresh(x), float_out)


def test_quant_start_step_in_eval_mode_before_start_is_float():
    wrapper = layer(quant_start_step=10)
    x = torch.randn(2, 16)
    wrapper(x)
    wrapper.eval()
    assert torch.equal(wrapper(x), nn.functional.linear(x, wrapper.module.weight, wrapper.module.bias))


def test_per_channel_weights():
    wrapper = layer(bits=4, granularity={"weight": "per_channel"})
    wq = wrapper.weight_quantizer
    w = wrapper.module.weight.detach()
    y = wq(w)
    g = wq.grid()
    assert g.scale.shape == (8,) and g.axis == 0
    for c in range(8):
        assert y[c].unique().numel() <= 16
        lo, hi = min(w[c].min().item(), 0.0), max(w[c].max().item(), 0.0)
        assert g.scale[c].item() == pytest.approx((hi - lo) / 15, rel=1e-5)


def test_reduced_weight_range():
    wq = layer(weight_range="reduced").weight_quantizer
    wq(torch.randn(8, 16))
    g = wq.grid()
    assert (g.qmin, g.qmax) == (-64, 63)


def test_weight_values_are_the_fused_kernels_including_a_tie_at_the_top():
    wq = layer(types=("weight",)).weight_quantizer
    # this range gives zero point 4 and max(w) / scale = 123.50001 -> 124 + 4 = 128, one past the
    # top code (the zero point's own rounding lets the top end overshoot): the clamp is needed
    w = torch.tensor([[-0.5548074841499329, 0.3, 0.5210549831390381]])
    y = wq(w)
    g = wq.grid()
    assert g.zero_point.item() == 4
    assert torch.equal(y, torch.fake_quantize_per_tensor_affine(w, g.scale, g.zero_point.int(), -128, 127))
    assert wq.quantize_int(w).max().item() == 127
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        w = torch.randn(4, 9, generator=gen) * torch.rand((), generator=gen) + torch.randn((), generator=gen)
        y = wq(w)
        g = wq.grid()
        assert torch.equal(y, torch.fake_quantize_per_tensor_affine(w, g.scale, g.zero_point.int(), -128, 127))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_affine_weights_in_other_float_dtypes_stay_within_the_codes(dtype):
    # whether the clamp can be skipped was decided in float32; in x's own arithmetic a tie could
    # round one code past the top (2^b + 1 values)
    g = torch.Generator().manual_seed(0)
    for bits in (2, 4):
        q = RangeQuantizer(TensorSpec("weight", bits, "per_tensor", "affine", "int", False), tracking="current")
        for _ in range(400):
            w = (torch.randn(64, generator=g) * torch.rand(1, generator=g) * 3 + torch.randn(1, generator=g)).to(dtype)
            assert q(w).unique().numel() <= 2 ** bits


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_a_non_finite_weight_is_refused_on_every_path(granularity):
    from lowbit.fake_quant import tensor_path

    for path in (contextlib.nullcontext, tensor_path):
        wrapper = layer(types=("weight", "input"), granularity={"weight": granularity})
        wrapper(torch.rand(4, 16))
        before = {k: v.clone() for k, v in wrapper.input_quantizer.state_dict().items()}
        for bad, what in ((float("inf"), "contains inf"), (float("nan"), "contains NaN")):
            with path(), pytest.raises(ValueError, match=what):
                wrapper(torch.full((2, 16), bad))  # the input's EMA range
            with torch.no_grad():
                saved = wrapper.module.weight[0, 0].item()
                wrapper.module.weight[0, 0] = bad
            with path(), pytest.raises(ValueError, match=what):
                wrapper(torch.rand(2, 16))
            with torch.no_grad():
                wrapper.module.weight[0, 0] = saved
        after = wrapper.input_quantizer.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert torch.isfinite(wrapper(torch.rand(2, 16))).all()


def test_off_the_host_a_non_finite_batch_end_is_replaced_by_the_tracked_one(monkeypatch):
    # (a GPU, or torch.compile, cannot raise without a host read: there each NaN/inf end of a batch
    # range gives way to the tracked end, and every finite end is observed as it is)
    q = RangeQuantizer(TensorSpec("weight", 8, "per_channel", "affine", "int", False), channels=5, tracking="ema")
    q.tracked_min.copy_(torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]))
    q.tracked_max.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    inf, nan = float("inf"), float("nan")
    lo = torch.tensor([-inf, nan, inf, -0.5, -3.4e38])
    hi = torch.tensor([inf, 0.5, nan, -inf, 3.4e38])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    new_lo, new_hi = q._finite_range(lo, hi)
    assert new_lo.tolist() == [-1.0, -2.0, -3.0, -0.5, torch.tensor(-3.4e38).item()]
    assert new_hi.tolist() == [1.0, 0.5, 3.0, 4.0, torch.tensor(3.4e38).item()]
    q.tracking = "current"  # (each call's own range: nothing carries over, nothing to guard)
    assert all(a is b for a, b in zip(q._finite_range(lo, hi), (lo, hi)))


@pytest.mark.parametrize("method", ["qat", "ptq"])
def test_an_empty_batch_passes_through_as_through_the_plain_layer(method):
    from lowbit import kernels

    for ctx in (contextlib.nullcontext, kernels.disabled):
        with ctx():
            m = lowbit.quantize(nn.Sequential(nn.Linear(16, 8)),
                                [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"]}], method)
            assert m(torch.empty(0, 16)).shape == (0, 8)  # (observing its range raised)
            assert not m[0].input_quantizer._initialized
            m(torch.rand(4, 16))
            before = m[0].input_quantizer.grid().to_dict()
            assert m(torch.empty(0, 16)).shape == (0, 8)
            assert m[0].input_quantizer.grid().to_dict() == before


@pytest.mark.parametrize("method,extra", [("qat", {}), ("ptq", {"calibration": "percentile"})])
def test_tensor_path_tracks_the_host_paths_range_bit_for_bit(method, extra):
    # the tensor path (GPUs, torch.compile) moved its EMA / running mean with a float32 lerp_, one
    # ulp off the host path's now and then (51 of 200 steps here): another grid than the CPU's
    def run(tensor_path: bool) -> list:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(30, 8))
        lowbit.quantize(m, [{"quant_types": ["input"], "quant_bits": 8, "op_names": ["0"], **extra}], method)
        q, out = m[0].input_quantizer, []
        for i in range(200):
            x = torch.randn(16, 30) * (1 + (i % 7)) + 0.37 * i / 50
            with torch.no_grad(), (lowbit.tensor_path() if tensor_path else contextlib.nullcontext()):
                m.train()(x) if method == "qat" else lowbit.calibrate(m, [x])
            lo, hi = q.tracked_range()
            out.append((lo.item(), hi.item(), q.grid().scale.item()))
        return out

    assert run(False) == run(True)


@pytest.mark.parametrize("key,value,message", [
    ("scale", 0.0, r"scale 0\.0 is not finite and positive"),
    ("scale", float("nan"), "is not finite and positive"),
    ("scale", -0.5, "is not finite and positive"),
    ("tracked_min", 5.0, "tracked range .* is not a finite range"),
    ("tracked_max", float("inf"), "is not a finite range"),
])
def test_a_damaged_range_in_a_state_is_refused_by_name(key, value, message):
    # a zero scale died in a bare ZeroDivisionError; NaN / negative scales and inverted ranges loaded
    def make():
        return lowbit.quantize(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                               [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}], "qat")
    a = make()
    a(torch.randn(4, 8))
    state = a.state_dict()
    state[f"2.input_quantizer.{key}"] = torch.tensor(value)
    with pytest.raises(RuntimeError, match=rf"2\.input_quantizer: the state's .*{message}"):
        make().load_state_dict(state)
