"""The quantize/dequantize arithmetic and its gradients, against the definitions and against
PyTorch's fused fake-quant kernels."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.fake_quant import (
    AffineGrid,
    affine_qparams,
    affine_qparams_f32,
    clipped_fake_quantize,
    clipped_fake_quantize_scalar,
    f32,
    fake_quantize,
    lsq_fake_quantize,
    qrange,
    quantize_codes,
    quantize_gradient,
    round_ste,
    ste_fake_quantize,
    ste_fake_quantize_scalar,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_qrange():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, True, narrow=True) == (-127, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-8, 7)
    assert qrange(2, True, narrow=True) == (-1, 1)
    assert qrange(1, False) == (0, 1)
    with pytest.raises(ValueError):
        qrange(0, True)


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (3, False), (2, True), (16, True)])
def test_fake_quantize_is_the_fused_kernel_bit_for_bit(bits, signed):
    g = _gen(bits)
    qmin, qmax = qrange(bits, signed)
    for _ in range(5):
        x = torch.randn(2000, generator=g) * 3
        scale = torch.rand((), generator=g) * 0.2 + 1e-3
        zp = torch.randint(qmin, qmax + 1, (), generator=g)
        ref = torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), qmin, qmax)
        assert torch.equal(fake_quantize(x, scale, zp, qmin, qmax), ref)
        # the Python-number fast paths give the same values
        s = scale.item()
        lo, hi = qmin - zp.item(), qmax - zp.item()
        assert torch.equal(ste_fake_quantize_scalar(x, s, f32(1 / s), lo, hi), ref)
        assert torch.equal(clipped_fake_quantize_scalar(x.requires_grad_(), s, f32(1 / s), lo, hi), ref)
        x.requires_grad_(False)


def test_fake_quantize_per_channel_is_the_fused_kernel():
    g = _gen(1)
    w = torch.randn(6, 3, 4, 4, generator=g)
    scale = torch.rand(6, generator=g) * 0.1 + 1e-3
    zp = torch.randint(-5, 5, (6,), generator=g)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, -8, 7)
    assert torch.equal(fake_quantize(w, scale, zp, -8, 7, axis=0), ref)
    grid = AffineGrid(scale, zp, -8, 7, axis=0)
    assert torch.equal(grid.dequantize(grid.quantize(w)), ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_at_most_2_to_the_b_values_on_the_grid(bits):
    x = torch.randn(10_000, generator=_gen(bits)) * 5
    qmin, qmax = qrange(bits, True)
    scale, zp = torch.tensor(0.37), torch.tensor(1)
    y = fake_quantize(x, scale, zp, qmin, qmax)
    assert y.unique().numel() <= 2**bits
    codes = y / scale + zp
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    assert torch.equal(quantize_codes(x, scale, zp, qmin, qmax), codes.round().to(torch.int64))


def test_in_range_error_is_at_most_half_a_step():
    x = torch.rand(10_000, generator=_gen(2)) * 2 - 1
    scale, zp = affine_qparams(x.min(), x.max(), -8, 7, symmetric=False)
    y = fake_quantize(x, scale, zp, -8, 7)
    assert ((y - x).abs() <= scale / 2 * (1 + 1e-6)).all()


def test_ties_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    y = fake_quantize(x, torch.tensor(1.0), None, -128, 127)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0]


def test_affine_qparams_contains_zero_and_matches_python_version():
    g = _gen(3)
    for _ in range(50):
        lo, hi = sorted((torch.randn(2, generator=g) * 4).tolist())
        for qmin, qmax in ((-128, 127), (0, 255), (-8, 7)):
            for sym in (False, True):
                s, z = affine_qparams(torch.tensor(lo), torch.tensor(hi), qmin, qmax, sym)
                s2, z2 = affine_qparams_f32(lo, hi, qmin, qmax, sym)
                assert s.item() == s2 and z.item() == z2
                assert qmin <= z.item() <= qmax
                # zero is exactly representable: fake_quantize(0) == 0
                assert fake_quantize(torch.zeros(1), s, z, qmin, qmax).item() == 0.0


def test_affine_qparams_degenerate_range():
    s, z = affine_qparams(torch.tensor(0.0), torch.tensor(0.0), -128, 127, False)
    assert s.item() > 0
    assert fake_quantize(torch.zeros(3), s, z, -128, 127).eq(0).all()


def test_affine_grid_round_trip_and_dict():
    grid = AffineGrid(torch.tensor([0.1, 0.2]), torch.tensor([0, 3]), -8, 7, axis=0)
    q = torch.tensor([[-8, 0, 7], [-8, 3, 7]])
    assert torch.allclose(grid.dequantize(q), torch.tensor([[-0.8, 0.0, 0.7], [-2.2, 0.0, 0.8]]))
    again = AffineGrid.from_dict(grid.to_dict())
    assert torch.equal(again.scale, grid.scale) and torch.equal(again.zero_point, grid.zero_point)
    assert (again.qmin, again.qmax, again.axis, again.levels) == (-8, 7, 0, 16)


def test_ste_gradient_is_identity():
    x = (torch.randn(100, generator=_gen(4)) * 10).requires_grad_()
    ste_fake_quantize(x, torch.tensor(0.1), None, -8, 7).sum().backward()
    assert torch.equal(x.grad, torch.ones(100))
    x.grad = None
    ste_fake_quantize_scalar(x, 0.1, f32(1 / 0.1), -8, 7).sum().backward()
    assert torch.equal(x.grad, torch.ones(100))


def test_clipped_ste_gradient_is_one_inside_the_range_zero_outside():
    g = _gen(5)
    x = (torch.randn(5000, generator=g) * 2).requires_grad_()
    up = torch.randn(5000, generator=g)
    scale, zp = torch.tensor(0.05), torch.tensor(10)
    lo, hi = (-128 - 10) * 0.05, (127 - 10) * 0.05  # the grid's range
    inside = (x.detach() > lo) & (x.detach() < hi)
    assert inside.any() and (~inside).any()
    expected = torch.where(inside, up, torch.zeros(()))
    for fn in (
        lambda: clipped_fake_quantize(x, scale, zp, -128, 127),
        lambda: clipped_fake_quantize_scalar(x, f32(0.05), f32(1 / f32(0.05)), -138, 117),
    ):
        x.grad = None
        y = fn()
        y.backward(up)
        assert torch.equal(x.grad, expected)
        assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x.detach(), scale, 10, -128, 127))
    # the fused kernel agrees except within half a step beyond either end
    x.grad = None
    torch.fake_quantize_per_tensor_affine(x, scale, zp.to(torch.int32), -128, 127).backward(up)
    band = ((x.detach() > lo - 0.025) & (x.detach() <= lo)) | ((x.detach() >= hi) & (x.detach() < hi + 0.025))
    assert torch.equal(x.grad[~band], expected[~band])


def test_clipped_ste_at_the_top_of_a_16_bit_grid():
    # hardtanh clips to hi * s in float32; the rounding must still land on hi
    for s in (f32(0.1), f32(1 / 3), f32(7.3e-5)):
        x = torch.tensor([1e9, -1e9], requires_grad=True)
        y = clipped_fake_quantize_scalar(x, s, f32(1 / s), -32768, 32767)
        assert torch.equal(y.detach(), torch.fake_quantize_per_tensor_affine(x.detach(), s, 0, -32768, 32767))


def test_ste_without_clamp_for_weights_inside_their_range():
    x = torch.randn(100_000, generator=_gen(9)).requires_grad_()  # large: the autograd-function path
    lo, hi = x.min().item(), x.max().item()
    s, zp = affine_qparams_f32(lo, hi, -128, 127, False)
    ref = torch.fake_quantize_per_tensor_affine(x.detach(), s, zp, -128, 127)
    y = ste_fake_quantize_scalar(x, s, f32(1 / s), -128 - zp, 127 - zp, clamp=True)
    assert torch.equal(y, ref)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def _lsq_closed_form(x, s, qn, qp, grad_out, grad_scale):
    """Esser et al. 2020, eq. 3: d x_hat / d s = -x/s + round(x/s) inside, -Qn / Qp outside."""
    v = x / s
    d = torch.where(v <= -qn, torch.tensor(-float(qn)), torch.where(v >= qp, torch.tensor(float(qp)), torch.round(v) - v))
    return (grad_out * d).sum() * grad_scale


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_step_gradient_is_the_papers_closed_form(signed):
    g = _gen(6)
    bits = 3
    qmin, qmax = qrange(bits, signed)
    x = torch.randn(64, generator=g) * (1.0 if signed else 0.5)
    if not signed:
        x = x.abs()
    x.requires_grad_()
    s = torch.tensor(0.21, requires_grad=True)
    up = torch.randn(64, generator=g)
    gscale = 1 / math.sqrt(x.numel() * qmax)
    y = lsq_fake_quantize(x, s, None, qmin, qmax, gscale)
    y.backward(up)
    expected = _lsq_closed_form(x.detach(), 0.21, -qmin, qmax, up, gscale)
    assert torch.allclose(s.grad, expected, rtol=1e-5, atol=1e-6)
    # x gradient: straight through inside the range, zero outside
    v = x.detach() / 0.21
    inside = (v > qmin) & (v < qmax)
    assert torch.equal(x.grad, torch.where(inside, up, torch.zeros(())))


def _away_from_the_ends(x: torch.Tensor, scale: float, lo: int, hi: int) -> torch.Tensor:
    """Move elements out of the half-step bands beyond the grid's ends, where the paper (clip, then
    round) and torch's learnable kernel (round, then clip) disagree about the gradient."""
    v = x / scale
    band = ((v > lo - 0.5) & (v <= lo)) | ((v >= hi) & (v < hi + 0.5))
    return torch.where(band, x.sign() * (abs(lo) + 1) * scale, x)


def test_lsq_matches_the_learnable_fused_kernel():
    g = _gen(7)
    up = torch.randn(400, generator=g)
    for zp0 in (0.0, 2.4):
        zp = round(zp0)
        x = _away_from_the_ends(torch.randn(400, generator=g) * 2, 0.07, -8 - zp, 7 - zp).requires_grad_()
        s = torch.tensor([0.07], requires_grad=True)
        z = torch.tensor([zp0], requires_grad=True)
        torch._fake_quantize_learnable_per_tensor_affine(x, s, z, -8, 7, 0.3).backward(up)
        ref = (x.grad.clone(), s.grad.clone(), z.grad.clone())
        x.grad = None
        s2 = torch.tensor(0.07, requires_grad=True)
        z2 = torch.tensor(zp0, requires_grad=True)
        y = lsq_fake_quantize(x, s2, z2, -8, 7, 0.3)
        y.backward(up)
        assert torch.equal(x.grad, ref[0])
        assert torch.allclose(s2.grad, ref[1][0], rtol=1e-5)
        assert torch.allclose(z2.grad, ref[2][0], rtol=1e-5)
        x.grad = None
    # per channel
    sc = (torch.rand(4, generator=g) + 0.05).requires_grad_()
    w = torch.randn(4, 30, generator=g) * 4
    w = torch.stack([_away_from_the_ends(w[i], sc[i].item(), -8, 7) for i in range(4)]).requires_grad_()
    up = torch.randn(4, 30, generator=g)
    y = torch._fake_quantize_learnable_per_channel_affine(w, sc, torch.zeros(4), 0, -8, 7, 0.3)
    y.backward(up)
    ref = (y.detach(), w.grad.clone(), sc.grad.clone())
    w.grad, sc.grad = None, None
    y2 = lsq_fake_quantize(w, sc, None, -8, 7, 0.3, axis=0)
    y2.backward(up)
    assert torch.equal(y2, ref[0]) and torch.equal(w.grad, ref[1])
    assert torch.allclose(sc.grad, ref[2], rtol=1e-5, atol=1e-6)


def test_lsq_negative_step_acts_as_its_magnitude():
    x = torch.randn(50, generator=_gen(8))
    pos = lsq_fake_quantize(x, torch.tensor(0.1), None, -8, 7)
    s = torch.tensor(-0.1, requires_grad=True)
    neg = lsq_fake_quantize(x, s, None, -8, 7)
    assert torch.equal(pos, neg)
    neg.sum().backward()
    s2 = torch.tensor(0.1, requires_grad=True)
    lsq_fake_quantize(x, s2, None, -8, 7).sum().backward()
    assert torch.allclose(s.grad, -s2.grad)


def test_round_ste():
    x = torch.tensor([0.4, 1.5, 2.5], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0]
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_dorefa_gradient_quantization():
    torch.manual_seed(0)
    bits = 4
    x = torch.randn(8, 16, requires_grad=True)
    up = torch.randn(8, 16)
    y = quantize_gradient(x, bits)
    assert torch.equal(y, x)
    y.backward(up)
    gq = x.grad
    m = up.abs().amax(1, keepdim=True)
    levels = (gq / (2 * m) + 0.5) * (2**bits - 1)
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the k-bit grid per sample
    assert (gq.abs() <= m + 1e-6).all()
    # unbiased: the mean over many stochastic draws approaches the true gradient
    acc = torch.zeros(8, 16)
    for _ in range(400):
        x.grad = None
        quantize_gradient(x, bits).backward(up)
        acc += x.grad
    assert (acc / 400 - up).abs().max() < 0.1 * m.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dorefa_gradient_quantization_stays_unbiased_in_half_precision(dtype):
    # (autocast gives bfloat16 gradients: g/(2m) + 1/2 + noise rounded in bfloat16 before the
    # stochastic rounding moved 0.00195 to 0.0048 on average, 20 standard errors)
    torch.manual_seed(0)
    up = torch.tensor([[1.0, 0.25, 0.001953125, -0.5]], dtype=dtype)
    x = torch.zeros(1, 4, dtype=dtype, requires_grad=True)
    n = 4000
    acc = torch.zeros(4, dtype=torch.float64)
    for _ in range(n):
        x.grad = None
        quantize_gradient(x, 8).backward(up)
        assert x.grad.dtype == dtype
        acc += x.grad[0].double()
    # the spread of one draw is at most half a level (1/255 of 2m): 4 standard errors of the mean,
    # plus the rounding of the levels themselves to the gradient's dtype (2^-8 relative)
    se = (1 / 255) / n ** 0.5
    assert ((acc / n - up[0].double()).abs() <= 4 * se + 2 ** -8 * up[0].double().abs() + 2 ** -8 / 255).all()


def test_exact_div_is_the_correctly_rounded_quotient():
    from lowbit.fake_quant import exact_div

    t = torch.rand(100_000) * 10
    for n in (255, 15, 127, 3.0, 2 ** 0.5):
        want = (t.double() / torch.tensor(n, dtype=torch.float32).double()).float()
        assert torch.equal(exact_div(t, n), want)


@pytest.mark.parametrize("zp", [None, 3])
def test_clipped_gradient_is_the_same_test_on_every_path(zp):
    """Inside means float32(lo s) < x < float32(hi s), on the x itself: the per-tensor path (Python
    numbers), the tensor path (other devices) and per-channel grids agree at the range's ends."""
    s = f32(1 / 255)
    qmin, qmax = 0, 255
    lo_x, hi_x = f32((qmin - (zp or 0)) * s), f32((qmax - (zp or 0)) * s)
    below = torch.nextafter(torch.tensor(hi_x), torch.tensor(0.0)).item()
    above_lo = torch.nextafter(torch.tensor(lo_x), torch.tensor(1.0)).item()
    x = torch.tensor([lo_x, above_lo, 0.5, below, hi_x, hi_x + 0.1])
    want = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0])
    zp_t = None if zp is None else torch.tensor(zp)
    for scale, zero_point, axis in (
        (torch.tensor(s), zp_t, None),                                    # per-tensor (numbers on the CPU)
        (torch.full((6,), s), None if zp is None else torch.full((6,), zp), 0),  # per-channel: tensors
    ):
        xx = (x.reshape(6, 1) if axis == 0 else x).clone().requires_grad_(True)
        clipped_fake_quantize(xx, scale, zero_point, qmin, qmax, axis).sum().backward()
        assert torch.equal(xx.grad.reshape(-1), want), (axis, xx.grad)
        xx = (x.reshape(6, 1) if axis == 0 else x).clone().requires_grad_(True)
        sc = scale.clone().requires_grad_(True)
        lsq_fake_quantize(xx, sc, None if zero_point is None else zero_point.float(), qmin, qmax, 1.0, axis).sum().backward()
        assert torch.equal(xx.grad.reshape(-1), want), ("lsq", axis, xx.grad)
