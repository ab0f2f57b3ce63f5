"""DoReFa (Zhou et al. 2016): the paper's weight transform on 2^k levels in [-1, 1], lowbit's
deployable variants (learned clip, max-scaled), [0, 1] activations, stochastic gradient
quantization."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.methods.dorefa import dorefa_weight_codes




def layer(bits=4, types=("weight",), **extra):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 16))
    cfg = [{"quant_types": list(types), "quant_bits": bits, "op_types": ["Linear"], **extra}]
    return lowbit.quantize(m, cfg, "dorefa")[0]


def paper_reference(w, k):
    t = torch.tanh(w)
    x = t / (2 * t.abs().max()) + 0.5
    n = 2**k - 1
    return 2 * (torch.round(x * n) / n) - 1


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_paper_weights_lie_in_minus1_1_on_2_to_the_k_levels(k):
    w = layer(k, dorefa_variant="paper")
    weight = w.module.weight.detach() * 5
    y = w.weight_quantizer(weight)
    assert y.min() >= -1 and y.max() <= 1
    levels = torch.linspace(-1, 1, 2**k)
    assert torch.isclose(y[..., None], levels, atol=1e-6).any(-1).all()  # every value is a level
    assert y.unique().numel() <= 2**k
    assert torch.allclose(y, paper_reference(weight, k), atol=1e-6)
    g = w.weight_quantizer.grid()
    assert (g.qmin, g.qmax) == (-(2**k - 1), 2**k - 1) and g.scale.item() == pytest.approx(1 / (2**k - 1))
    assert torch.equal(g.dequantize(w.weight_quantizer.quantize_int(weight)), y)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_scaled_variant_keeps_magnitude_on_a_symmetric_integer_grid(k):
    w = layer(k, dorefa_variant="scaled")
    weight = w.module.weight.detach()
    y = w.weight_quantizer(weight)
    n = 2 ** (k - 1) - 1
    assert y.abs().max().item() == pytest.approx(weight.abs().max().item(), rel=1e-6)
    assert y.unique().numel() <= 2**k - 1
    g = w.weight_quantizer.grid()
    assert (g.qmin, g.qmax) == (-n, n) and g.zero_point.item() == 0
    codes = w.weight_quantizer.quantize_int(weight)
    t = torch.tanh(weight)
    assert torch.equal(codes, torch.round(t / t.abs().max() * n).long())
    assert torch.equal(g.dequantize(codes), y)


def test_weight_gradient_goes_through_tanh_straight_through_the_rounding():
    for variant in ("paper", "scaled"):
        w = layer(4, dorefa_variant=variant)
        weight = (w.module.weight.detach() * 3).requires_grad_()
        up = torch.randn_like(weight)
        w.weight_quantizer(weight).backward(up)
        got = weight.grad.clone()
        # reference: autograd through tanh, straight through the rounding, max held constant
        ref_w = weight.detach().clone().requires_grad_()
        t = torch.tanh(ref_w)
        u = t / t.detach().abs().max()
        kappa = 1.0 if variant == "paper" else ref_w.detach().abs().max()
        (u * kappa).backward(up)
        assert torch.allclose(got, ref_w.grad, rtol=1e-4, atol=1e-6), variant


@pytest.mark.parametrize("k", [2, 4, 8])
def test_learned_variant_is_the_learned_step_grid_of_tanh_w(k):
    w = layer(k)  # the default variant
    q = w.weight_quantizer
    weight = w.module.weight.detach() * 20  # large enough that tanh bends and some codes clip
    t = torch.tanh(weight)
    n = 2 ** (k - 1) - 1
    # initialised as LSQ initialises a weight step, on tanh(w) of the layer's weight
    t0 = torch.tanh(w.module.weight.detach())
    assert q.scale.item() == pytest.approx((2 * t0.abs().mean() / math.sqrt(n)).item(), rel=1e-6)
    assert q.scale in set(lowbit.quantizer_parameters(nn.Sequential(w)))
    s = q.scale.item()
    y = q(weight)
    assert torch.equal(y.detach(), torch.fake_quantize_per_tensor_affine(t, s, 0, -n, n))
    assert y.unique().numel() <= 2**k - 1 and y.abs().max().item() <= n * s * (1 + 1e-6)
    g = q.grid()
    assert (g.qmin, g.qmax) == (-n, n) and g.zero_point.item() == 0
    assert torch.equal(g.dequantize(q.quantize_int(weight)), y.detach())


def test_learned_variant_gradients_are_lsqs_through_tanh():
    w = layer(3)
    q = w.weight_quantizer
    weight = (w.module.weight.detach() * 20).requires_grad_()
    up = torch.randn_like(weight)
    q(weight).backward(up)
    t = torch.tanh(weight.detach())
    s, n = q.scale.item(), 3
    v = t / s
    inside = (v > -n) & (v < n)
    c = torch.clamp(torch.round(v), -n, n)
    # Esser et al. 2020: d x_hat/d s = c - v inside, c (= -Qn or Qp) outside; times 1/sqrt(N Qp)
    gs = (up * torch.where(inside, c - v, c)).sum() / math.sqrt(weight.numel() * n)
    assert q.scale.grad.item() == pytest.approx(gs.item(), rel=1e-4)
    # w: clipped straight-through on tanh(w), times tanh's derivative
    assert torch.allclose(weight.grad, up * inside * (1 - t * t), rtol=1e-5, atol=1e-7)


def test_one_bit_is_sign_times_mean_abs():
    w = layer(1)
    weight = w.module.weight.detach()
    y = w.weight_quantizer(weight)
    e = weight.abs().mean()
    assert torch.allclose(y, torch.where(weight >= 0, e, -e))
    g = w.weight_quantizer.grid()
    assert torch.equal(g.dequantize(w.weight_quantizer.quantize_int(weight)), y)


def test_activations_clipped_to_0_1_on_k_bits():
    w = layer(3, types=("weight", "input"))
    iq = w.input_quantizer
    x = torch.linspace(-1, 2, 301, requires_grad=True)
    y = iq(x)
    assert y.min() == 0 and y.max() == 1
    assert torch.allclose(y * 7, (y * 7).round(), atol=1e-5) and y.unique().numel() == 8
    y.sum().backward()
    inside = (x.detach() > 0) & (x.detach() < 1)  # clipped to [0, 1]: no gradient outside
    assert torch.equal(x.grad, inside.float())
    ref = torch.fake_quantize_per_tensor_affine(x.detach(), 1 / 7, 0, 0, 7)
    assert torch.equal(y.detach(), ref)


def test_gradient_bits_quantizes_the_output_gradient():
    torch.manual_seed(0)
    w = layer(8, gradient_bits=2)
    x = torch.randn(4, 32, requires_grad=True)
    out = w(x)
    captured = {}
    out.register_hook(lambda g: captured.setdefault("g", g))
    up = torch.randn(4, 16)
    out.backward(up)
    # the gradient reaching the layer is on a 2-bit grid per sample
    ww = w.weight_quantizer(w.module.weight).detach()
    gq = x.grad @ torch.linalg.pinv(ww)  # recover the quantized output gradient
    m = up.abs().amax(1, keepdim=True)
    lv = (gq / (2 * m) + 0.5) * 3
    assert torch.allclose(lv, lv.round(), atol=1e-3)


def test_codes_function_matches_quantizer():
    w = torch.randn(10, 10)
    codes, scale, *_ = dorefa_weight_codes(w, 4, "scaled")
    assert codes.abs().max() <= 7 and scale.item() == pytest.approx(w.abs().max().item() / 7)


def test_tanh_matches_torch_tanh_and_its_gradient():
    from lowbit.methods.dorefa import tanh

    torch.manual_seed(0)
    x = torch.cat([torch.randn(10_000) * 3, torch.tensor([0.0, 1e-8, -1e-8, 20.0, -20.0, 100.0, -100.0,
                                                            float("inf"), float("-inf")])])
    t = tanh(x)
    assert torch.allclose(t, torch.tanh(x), rtol=0, atol=3e-7)
    assert t.abs().max() <= 1 and t[-4:].tolist() == [1.0, -1.0, 1.0, -1.0]
    assert tanh(torch.tensor([float("nan")])).isnan().all()
    xg = x[:10_000].clone().requires_grad_()
    g = torch.randn(10_000)
    tanh(xg).backward(g)
    xr = x[:10_000].clone().requires_grad_()
    torch.tanh(xr).backward(g)
    # tanh's derivative from a t within 2e-7 of torch's: |g| * 2|t| * 2e-7 at most
    assert ((xg.grad - xr.grad).abs() <= 4e-7 * g.abs() + 1e-7).all()


def test_a_state_loads_only_into_its_own_variant():
    # learned and scaled share their codes and state keys: a scaled state loaded into a learned
    # layer silently took max|w|/n as its learned step (and moved the outputs)
    torch.manual_seed(0)
    states = {}
    for variant in ("learned", "scaled", "paper"):
        m = layer(4, dorefa_variant=variant)
        m(torch.randn(3, 32))
        states[variant] = m.state_dict()
    for saved in states:
        for into in states:
            m = layer(4, dorefa_variant=into)
            if saved == into:
                m.load_state_dict(states[saved])
                continue
            with pytest.raises(RuntimeError, match=f"saved from DoReFa's '{saved}' weight variant.*is '{into}'"):
                m.load_state_dict(states[saved])
    # a state saved before the variant was recorded loads as the layer's own
    old = {k: v for k, v in states["learned"].items() if not k.endswith("variant_id")}
    m = layer(4, dorefa_variant="learned")
    m.load_state_dict(old)
    assert torch.equal(m.weight_quantizer.scale, states["learned"]["weight_quantizer.scale"])


def test_a_quantizer_pickled_before_its_variant_was_recorded_still_loads_states():
    import pickle

    m = layer(4, dorefa_variant="learned")
    m(torch.randn(3, 32))
    state = m.state_dict()
    del m.weight_quantizer._buffers["variant_id"]  # (as lowbit 0.3.8 pickled it)
    old = pickle.loads(pickle.dumps(m))
    old.load_state_dict(state)
    assert int(old.weight_quantizer.variant_id) == 0
