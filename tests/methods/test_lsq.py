"""LSQ (Esser et al. 2020): initialisation, signedness, the step-size gradient with its scale,
LSQ+ offsets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit




def layer(bits=4, types=("weight", "input"), in_features=16, **extra):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(in_features, 8))
    cfg = [{"quant_types": list(types), "quant_bits": bits, "op_types": ["Linear"], **extra}]
    return lowbit.quantize(m, cfg, "lsq")[0]


def test_weight_step_initialisation():
    for bits in (2, 4, 8):
        w = layer(bits)
        qp = 2 ** (bits - 1) - 1
        expected = 2 * w.module.weight.abs().mean().item() / math.sqrt(qp)
        assert w.weight_quantizer.scale.item() == pytest.approx(expected, rel=1e-6)
        g = w.weight_quantizer.grid()
        assert (g.qmin, g.qmax) == (-(2 ** (bits - 1)), qp)


def test_per_channel_weight_steps():
    w = layer(granularity={"weight": "per_channel"})
    s = w.weight_quantizer.scale
    assert s.shape == (8,)
    assert torch.allclose(s, 2 * w.module.weight.abs().mean(1) / math.sqrt(7))


def test_activation_initialised_on_first_batch_unsigned_when_non_negative():
    w = layer(types=("input",))
    iq = w.input_quantizer
    assert not iq.initialized
    x = torch.rand(32, 16)
    w(x)
    assert iq.initialized and not bool(iq.signed)
    assert iq.scale.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-6)
    assert (iq.grid().qmin, iq.grid().qmax) == (0, 15)
    # the second batch does not re-initialise
    w(torch.rand(32, 16) * 10)
    assert iq.scale.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-6)


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([[0.5, float("inf")] + [0.0] * 14]), "contains inf"),
    (torch.tensor([[0.5, float("nan")] + [0.0] * 14]), "contains NaN"),
])
def test_activation_step_is_not_initialised_from_a_bad_first_batch(bad, match):
    w = layer(types=("input",))
    with pytest.raises(ValueError, match=match):
        w(bad)
    assert not w.input_quantizer.initialized  # the next (good) batch initialises it
    w(torch.rand(32, 16))
    assert torch.isfinite(w.input_quantizer.scale).all() and w.input_quantizer.initialized


def test_activation_signed_detection_and_override():
    w = layer(types=("input",))
    w(torch.randn(32, 16))
    assert bool(w.input_quantizer.signed) and (w.input_quantizer.qmin, w.input_quantizer.qmax) == (-8, 7)
    w = layer(types=("input",), quant_dtype="int")
    w(torch.rand(32, 16))
    assert (w.input_quantizer.qmin, w.input_quantizer.qmax) == (-8, 7)
    w = layer(types=("input",), quant_dtype="uint")
    w(torch.randn(32, 16))
    assert (w.input_quantizer.qmin, w.input_quantizer.qmax) == (0, 15)
    # the detected sign survives a state dict round trip
    src = layer(types=("input",))
    src(torch.randn(8, 16))
    dst = layer(types=("input",))
    dst.load_state_dict(src.state_dict())
    dst.eval()
    assert (dst.input_quantizer.qmin, dst.input_quantizer.qmax) == (-8, 7)


def _closed_form(v, s, qn, qp, up):
    r = v / s
    d = torch.where(r <= -qn, torch.tensor(-float(qn)), torch.where(r >= qp, torch.tensor(float(qp)), torch.round(r) - r))
    return (up * d).sum()


def test_weight_step_gradient_is_the_papers_closed_form_with_its_scale():
    w = layer(bits=3)
    wq = w.weight_quantizer
    weight = w.module.weight.detach()
    with torch.no_grad():
        wq.scale.fill_(0.05)  # some weights clip at 3 bits
    up = torch.randn_like(weight)
    wq(weight).backward(up)
    qn, qp = 4, 3
    expected = _closed_form(weight, 0.05, qn, qp, up) / math.sqrt(weight.numel() * qp)
    assert wq.scale.grad.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_activation_step_gradient_scale_uses_features_per_sample():
    w = layer(bits=4, types=("input",), in_features=6)
    iq = w.input_quantizer
    x = torch.randn(5, 3, 6)  # rank 3: features per sample = 18
    iq(x)  # initialise (signed)
    iq.scale.grad = None
    up = torch.randn(5, 3, 6)
    iq(x).backward(up)
    s = iq.scale.item()
    expected = _closed_form(x, s, 8, 7, up) / math.sqrt(18 * 7)
    assert iq.scale.grad.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_values_on_the_grid_and_at_most_2_to_the_b():
    w = layer(bits=3)
    y = w.weight_quantizer(w.module.weight)
    s = w.weight_quantizer.scale.item()
    codes = y / s
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert y.unique().numel() <= 8 and codes.round().min() >= -4 and codes.round().max() <= 3


def test_lsq_plus_learns_an_integer_offset():
    w = layer(bits=4, types=("input",), lsq_plus=True, lsq_plus_init="minmax")
    iq = w.input_quantizer
    x = torch.rand(64, 16) * 3 - 1  # [-1, 2]
    y = w(x)
    assert isinstance(iq.zero_point, nn.Parameter)
    g = iq.grid()
    assert (g.qmin, g.qmax) == (0, 15) and 0 < g.zero_point.item() < 15
    assert g.scale.item() == pytest.approx(3 / 15, rel=0.05)
    y.sum().backward()
    assert iq.zero_point.grad is not None and iq.scale.grad is not None
    params = lowbit.quantizer_parameters(w)
    assert any(p is iq.zero_point for p in params)


def test_steps_train_with_the_users_optimizer():
    w = layer(bits=4)
    opt = torch.optim.SGD(w.module.parameters(), lr=0.1)
    opt.add_param_group({"params": lowbit.quantizer_parameters(w)})
    x = torch.rand(32, 16)
    before = w.weight_quantizer.scale.item()
    for _ in range(3):
        loss = (w(x) - 1).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert w.weight_quantizer.scale.item() != before


def _grid_mse(x, lo, hi, qmin, qmax):
    """MSE of x fake-quantized on the affine grid of [lo, hi] the way LSQ+'s forward pass does it."""
    from lowbit.fake_quant import affine_qparams, lsq_fake_quantize

    scale, zp = affine_qparams(torch.as_tensor(lo), torch.as_tensor(hi), qmin, qmax, symmetric=False)
    y = lsq_fake_quantize(x, scale, zp.float(), qmin, qmax)
    return (y - x).square().mean().item()


def test_mse_range_is_the_best_of_its_candidates():
    from lowbit.methods.lsq import MSE_GRID, mse_range

    torch.manual_seed(0)
    x = torch.cat([torch.randn(4000) * 0.5 + 0.3, torch.tensor([-4.0, 9.0])])  # two outliers
    lo, hi = mse_range(x, 0, 15)
    lo0, hi0 = x.min().item(), x.max().item()
    best = _grid_mse(x, lo, hi, 0, 15)
    for a in range(1, MSE_GRID + 1):
        for b in range(1, MSE_GRID + 1):
            cand = _grid_mse(x, lo0 * a / MSE_GRID, hi0 * b / MSE_GRID, 0, 15)
            assert best <= cand * (1 + 1e-5), (a, b)
    assert hi < 9.0 and lo > -4.0  # the outliers are clipped ...
    assert best < 0.5 * _grid_mse(x, lo0, hi0, 0, 15)  # ... which halves the error at least here


def test_mse_range_of_nonnegative_data_starts_at_zero_and_draws_no_random_numbers():
    from lowbit.methods.lsq import MSE_SAMPLE, mse_range

    x = torch.relu(torch.randn(300, 400))  # more than MSE_SAMPLE elements: a strided subsample
    assert x.numel() > MSE_SAMPLE
    state = torch.get_rng_state()
    lo, hi = mse_range(x, 0, 255)
    assert torch.equal(state, torch.get_rng_state())
    assert lo.item() == 0.0 and 0 < hi.item() <= x.max().item()


def test_lsq_plus_initialises_activations_by_mse_and_weights_by_three_sigma():
    from lowbit.fake_quant import affine_qparams
    from lowbit.methods.lsq import mse_range

    for granularity in ("per_tensor", "per_channel"):
        w = layer(bits=4, lsq_plus=True, granularity={"weight": granularity})
        wt = w.module.weight.detach()
        v = wt.reshape(1, -1) if granularity == "per_tensor" else wt
        mu, sigma = v.mean(1), v.std(1, correction=0)
        expected = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 8
        assert torch.allclose(w.weight_quantizer.scale.detach().reshape(-1), expected, rtol=1e-6)
    torch.manual_seed(1)
    x = torch.randn(64, 16) * 0.5 + 0.2
    w(x)  # the first training batch initialises the input grid
    iq = w.input_quantizer
    scale, zp = affine_qparams(*mse_range(x, 0, 15), 0, 15, symmetric=False)
    assert iq.scale.item() == scale.item()
    assert iq.grid().zero_point.item() == zp.item()


def test_lsq_plus_init_needs_lsq_plus():
    with pytest.raises(lowbit.config.ConfigError, match="needs lsq_plus: True"):
        layer(lsq_plus_init="minmax")
    with pytest.raises(lowbit.config.ConfigError, match="'paper' or 'minmax'"):
        layer(lsq_plus=True, lsq_plus_init="mse")


def test_an_lsq_plus_state_loads_into_either_initialisation():
    """State saved from a min/max-initialised LSQ+ layer (lowbit <= 0.3.3) loads into a layer
    built with the paper's initialisation: the loaded steps and offsets win, nothing re-initialises."""
    old = layer(bits=4, lsq_plus=True, lsq_plus_init="minmax")
    x = torch.randn(32, 16) * 0.5 + 0.2
    old(x)
    new = layer(bits=4, lsq_plus=True)
    new.load_state_dict(old.state_dict())
    y = torch.randn(32, 16)
    assert torch.equal(new(y), old(y))
    assert new.input_quantizer.scale.item() == old.input_quantizer.scale.item()
    assert new.weight_quantizer.scale.item() == old.weight_quantizer.scale.item()


def test_an_empty_batch_passes_through_and_initialises_nothing():
    w = layer()
    y = w(torch.empty(0, 16))  # nothing to initialise the input step from: it waits for data
    assert y.shape == (0, 8) and not w.input_quantizer.initialized
    w(torch.rand(32, 16))
    assert w.input_quantizer.initialized
    y = w(torch.empty(0, 16))  # (the gradient scale divided by the batch's zero size)
    assert y.shape == (0, 8)
    y.sum().backward()


def test_an_integer_input_is_quantized_as_its_float_values():
    w = layer(types=("input",))
    x = torch.randint(0, 4, (32, 16))
    y = w(x)  # (the step's initialisation took a mean of integers)
    assert torch.equal(y, w(x.float()))
    assert w.input_quantizer.scale.item() == pytest.approx(2 * x.float().mean().item() / math.sqrt(15), rel=1e-6)


def test_gradient_scale_counts_one_unbatched_conv_input_as_one_sample():
    torch.manual_seed(0)
    m = lowbit.quantize(nn.Sequential(nn.Conv2d(3, 4, 3)),
                        [{"quant_types": ["input"], "quant_bits": 4, "op_types": ["Conv2d"]}], "lsq")
    iq = m[0].input_quantizer
    x = torch.rand(3, 6, 5)
    m(x)
    want = 1 / math.sqrt(3 * 6 * 5 * iq._qp)  # N: the features of the sample, C*H*W
    assert iq._grad_factor(x) == pytest.approx(want)
    assert iq._grad_factor(x[None]) == pytest.approx(want)
    assert iq._grad_factor(torch.rand(7, 3, 6, 5)) == pytest.approx(want)
