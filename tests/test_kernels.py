"""The fused CPU kernels (lowbit.kernels) against lowbit's PyTorch code and the definitions: same
values bit for bit, same input gradients, LSQ's step gradient equal to the paper's sum; and the
loader's modes (off, auto with a warning when the build fails, required)."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

import lowbit
from helpers import train_vae
from lowbit import kernels
from lowbit.fake_quant import (
    clipped_fake_quantize_scalar,
    f32,
    fake_quantize,
    lsq_fake_quantize,
    qrange,
    ste_fake_quantize_scalar,
)
from lowbit.methods.dorefa import tanh as dorefa_tanh


@pytest.fixture(scope="module")
def k():
    mod = kernels.get()
    if mod is None:
        if kernels.mode() == "1":  # pragma: no cover - get() raises first
            pytest.fail("LOWBIT_KERNELS=1 but the kernels are not available")
        pytest.skip("the fused kernels are off (LOWBIT_KERNELS=0) or did not build here; LOWBIT_KERNELS=1 requires them")
    return mod


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(fn, x: torch.Tensor, scale: torch.Tensor | None, g: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    s = None if scale is None else scale.detach().clone().requires_grad_()
    y = fn(x, s)
    y.backward(g)
    return y.detach(), x.grad, None if s is None else s.grad


# sizes below and above one parallel task (16384 elements), shapes of any rank, 1 and 2 threads
SHAPES = [(7,), (300, 41), (400, 784), (8, 3, 17, 19)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_ste_and_clipped_equal_the_pytorch_code(k, shape, threads):
    torch.set_num_threads(threads)
    gen = _gen(len(shape))
    x = torch.randn(shape, generator=gen) * 2
    g = torch.randn(shape, generator=gen)
    for qmin, qmax, zp in ((-128, 127, 3), (0, 255, 17), (-8, 7, 0), (0, 15, 0)):
        s = f32(0.013)
        inv = f32(1 / s)
        lo, hi = qmin - zp, qmax - zp
        for fn in (ste_fake_quantize_scalar, clipped_fake_quantize_scalar):
            fused = _grads(lambda t, _: fn(t, s, inv, lo, hi), x, None, g)
            with kernels.disabled():
                ref = _grads(lambda t, _: fn(t, s, inv, lo, hi), x, None, g)
            assert torch.equal(fused[0], ref[0]), fn.__name__
            assert torch.equal(fused[1], ref[1]), fn.__name__
            # and the values are the grid's
            assert torch.equal(fused[0], fake_quantize(x, torch.tensor(s), torch.tensor(zp), qmin, qmax))


def test_non_contiguous_input(k):
    x = torch.randn(64, 50, generator=_gen(1)).t()
    s = f32(0.05)
    y = ste_fake_quantize_scalar(x, s, f32(1 / s), -128, 127)
    assert y.shape == x.shape
    assert torch.equal(y, fake_quantize(x, torch.tensor(s), None, -128, 127))


def _paper_step_grad(x: torch.Tensor, s: float, qmin: int, qmax: int, g: torch.Tensor, gf: float) -> float:
    """Esser et al. 2020, eq. 3, in float64: d x_hat / d s = -Qn, Qp outside, round(v) - v inside.
    "Inside" as lowbit decides it, ``float32(qmin s) < x < float32(qmax s)``: the paper's
    ``qmin < x / s < qmax`` but for a value within float32 rounding of a range end (e.g. a pixel
    of exactly 1.0 with a step of float32(1/255): the range ends at 1.00000006, rounded to 1.0)."""
    v = x.double() / s
    inside = (x > f32(qmin * s)) & (x < f32(qmax * s))
    code = torch.clamp(torch.round(x * f32(1 / s)), qmin, qmax).double()  # float32 x * (1/s), as the grid
    d = torch.where(inside, code - v, code)
    return float((g.double() * d).sum() * gf)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_equals_the_pytorch_code_and_the_paper(k, shape, signed, threads):
    torch.set_num_threads(threads)
    gen = _gen(len(shape) + signed)
    qmin, qmax = qrange(4, signed)
    x = torch.randn(shape, generator=gen) * 0.3
    if not signed:
        x = x.abs()
    g = torch.randn(shape, generator=gen)
    gf = 1 / math.sqrt(x.numel() * qmax)
    # a negative step acts by its magnitude; a tiny one is clamped; with 1.0 nothing is clipped
    for raw in (0.05, -0.05, 1e-12, 1.0):
        scale = torch.tensor(raw)
        fused = _grads(lambda t, s: lsq_fake_quantize(t, s, None, qmin, qmax, gf), x, scale, g)
        with kernels.disabled():
            ref = _grads(lambda t, s: lsq_fake_quantize(t, s, None, qmin, qmax, gf), x, scale, g)
        assert torch.equal(fused[0], ref[0])
        assert torch.equal(fused[1], ref[1])
        assert fused[2].shape == scale.shape
        step = max(f32(abs(raw)), f32(1e-8))
        want = _paper_step_grad(x, step, qmin, qmax, g, gf) * (-1 if raw < 0 else 1)
        assert fused[2].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_lsq_scale_of_shape_one_and_no_input_grad(k):
    x = torch.randn(1000, generator=_gen(3))
    s = torch.tensor([0.1], requires_grad=True)
    y = lsq_fake_quantize(x, s, None, -8, 7, 0.5)  # x needs no gradient: only the step's
    y.sum().backward()
    assert s.grad.shape == (1,)
    assert s.grad.item() == pytest.approx(_paper_step_grad(x, f32(0.1), -8, 7, torch.ones(1000), 0.5), rel=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_dorefa_learned_fused_equals_the_composed_form(k, threads):
    """DoReFa's learned variant runs tanh and LSQ in one kernel: same output as tanh() then LSQ,
    gradient dL/dw = (clipped STE of the codes) * (1 - tanh(w)^2)."""
    torch.set_num_threads(threads)
    gen = _gen(5)
    w = torch.randn(400, 784, generator=gen) * 0.2
    g = torch.randn(400, 784, generator=gen)
    qmin, qmax, gf = -7, 7, 1e-3
    scale = torch.tensor(0.06)
    fused = _grads(lambda t, s: k.lsq(t, s, qmin, qmax, gf, True), w, scale, g)
    composed = _grads(lambda t, s: lsq_fake_quantize(dorefa_tanh(t), s, None, qmin, qmax, gf), w, scale, g)
    assert torch.equal(fused[0], composed[0])
    torch.testing.assert_close(fused[1], composed[1], rtol=0, atol=1e-6)
    assert fused[2].item() == pytest.approx(composed[2].item(), rel=1e-5)


def test_tanh_matches_torch(k):
    x = torch.linspace(-50, 50, 200_001)
    t = dorefa_tanh(x)
    torch.testing.assert_close(t, torch.tanh(x), rtol=0, atol=2.5e-7)
    assert t.min() == -1 and t.max() == 1
    assert torch.equal(t, -dorefa_tanh(-x)) or (t + dorefa_tanh(-x)).abs().max() < 2.5e-7


def test_tanh_blocks_give_the_scalar_code_s_bits(k):
    """The kernels run tanh (and its quantization, DoReFa's learned variant) on blocks of 32
    elements as interleaved vector operations and on the rest with the scalar code: the same
    operations, so every value gets the same bits either way — NaN and infinities, the exp's
    clamp, the rounding of the codes.  (One element alone takes the scalar code.)"""
    torch.manual_seed(0)
    inf, nan = float("inf"), float("nan")
    special = [nan, inf, -inf, 0.0, -0.0, 1e-40, -1e-40, 1e-8, 0.5, -0.5, 43.6, 43.9, 44.0, -43.6, 88.0, 3.4e38, -3.4e38]
    vals = torch.cat([torch.tensor(special), torch.randn(200) * 3, torch.randn(100) * 0.01])
    step = torch.tensor(0.013)
    blocks = (k.tanh(vals), k.lsq(vals, step, -7, 7, 0.1, True))
    alone = [torch.cat([k.tanh(v.reshape(1)) for v in vals]),
             torch.cat([k.lsq(v.reshape(1), step, -7, 7, 0.1, True) for v in vals])]
    for got, want in zip(blocks, alone):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        finite = want == want
        assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))  # (-0.0 too)


def test_quantized_training_is_the_same_with_and_without_kernels(k):
    """A few LSQ and QAT training steps of the VAE: the fused and the PyTorch paths give the same
    weights up to float summation order (the step gradients' sums)."""
    from lowbit.models.vae import VAE

    for method in ("qat", "lsq", "dorefa"):
        results = []
        for use in (True, False):
            torch.manual_seed(0)
            m = VAE()
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            # (float biases: the two paths' step gradients differ in their last bits, summation order,
            # and a bias rounded to s_in * s_w can turn that into a code step within three steps)
            lowbit.quantize(m, [{"quant_types": ["weight", "input"], "quant_bits": 4, "op_types": ["Linear"]}], method,
                            optimizer=opt, bias_quant="float")
            with kernels.disabled() if not use else contextlib.nullcontext():
                train_vae(m, opt, steps=3, seed=7, batch=64)
            results.append(m.state_dict())
        for name, v in results[0].items():
            torch.testing.assert_close(v, results[1][name], rtol=1e-4, atol=1e-5, msg=f"{method} {name}")


# -- backward passes that write the input gradient into the incoming one -------------------------

# (name, quantizer of x, x's scale): DoReFa's tanh LSQ (gradient always written), LSQ with clipped
# elements (masked), the clipped straight-through estimator of activations
IN_PLACE_CASES = {
    "dorefa": (lambda k, x, s: k.lsq(x, s, -127, 127, 0.01, True), 0.3),
    "lsq clipped": (lambda k, x, s: k.lsq(x, s, -8, 7, 0.01, False), 2.0),
    "clipped": (lambda k, x, s: k.clipped(x, 0.05, -8.0, 7.0), 1.0),
}


def _in_place_inputs(case: str):
    gen = _gen(len(case))
    _, mag = IN_PLACE_CASES[case]
    x = torch.randn(40, 500, generator=gen) * mag  # (20000 elements: two parallel tasks at 2 threads)
    return x, torch.tensor(0.05), torch.randn(7, 500, generator=gen), torch.randn(40, 500, generator=gen)


def _quantizer_grads(k, case, x, s, upstream):
    """x's and the step's gradients with ``upstream(y)`` the loss of the quantized ``y``."""
    fn, _ = IN_PLACE_CASES[case]
    x, s = x.clone().requires_grad_(), s.clone().requires_grad_()
    upstream(fn(k, x, s)).backward()
    return x.grad, s.grad


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("downstream", ["mul", "linear"])
@pytest.mark.parametrize("case", list(IN_PLACE_CASES))
def test_an_unshared_incoming_gradient_takes_the_input_gradient(k, case, downstream, threads):
    """Where nothing else holds the incoming gradient (a Linear weight's arrives as a view of a
    fresh product: also taken) the input gradient is written into it instead of a new tensor;
    the values are those of the allocating path, bit for bit."""
    torch.set_num_threads(threads)
    x, s, a, c = _in_place_inputs(case)
    if downstream == "mul":
        upstream = lambda y: (y * c).sum()  # noqa: E731
    else:  # y as a Linear layer's weight [out=40, in=500]
        upstream = lambda y: torch.nn.functional.linear(a, y).square().sum()  # noqa: E731
    before = k.reused_grads()
    got = _quantizer_grads(k, case, x, s, upstream)
    assert k.reused_grads() == before + 1
    # the same incoming gradient, held by the caller: the allocating path
    fn, _ = IN_PLACE_CASES[case]
    y = fn(k, x, s).detach().requires_grad_()
    g_in = torch.autograd.grad(upstream(y), y)[0]
    xr, sr = x.clone().requires_grad_(), s.clone().requires_grad_()
    fn(k, xr, sr).backward(g_in)
    assert k.reused_grads() == before + 1
    assert torch.equal(got[0], xr.grad)
    assert (got[1] is None and sr.grad is None) or torch.equal(got[1], sr.grad)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("case", list(IN_PLACE_CASES))
def test_a_shared_or_kept_incoming_gradient_is_not_overwritten(k, case, keep):
    """Two quantizers summed receive the same gradient tensor (PyTorch's add passes it to both);
    a retained gradient keeps it too: each input gradient is its own and the kept one unchanged."""
    fn, _ = IN_PLACE_CASES[case]
    x1, s, _, c = _in_place_inputs(case)
    x2 = x1.flip(0) * 0.7
    want1 = _quantizer_grads(k, case, x1, s, lambda y: (y * c).sum())[0]
    want2 = _quantizer_grads(k, case, x2, s, lambda y: (y * c).sum())[0]
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    ya, yb = fn(k, a, s), fn(k, b, s)
    both = ya + yb
    if keep:
        both.retain_grad()
    (both * c).sum().backward()
    assert not keep or torch.equal(both.grad, c)
    assert torch.equal(a.grad, want1) and torch.equal(b.grad, want2)


# -- LSQ input fused with its Linear layer (a model's first layer) -----------------------------


def _sparse_images(rows: int, n: int, seed: int, density: float = 0.2) -> torch.Tensor:
    """MNIST-like inputs: mostly exact zeros, the rest on a 1/255 grid (as the pixels are)."""
    gen = _gen(seed)
    keep = torch.rand(rows, n, generator=gen) < density
    return torch.where(keep, torch.randint(1, 256, (rows, n), generator=gen) / 255.0, torch.zeros(()))


def _linear_grads(fn, x, scale, w, b, g, x_grad: bool):
    x = x.detach().clone().requires_grad_(x_grad)
    s, w, b = (t.detach().clone().requires_grad_() if t is not None else None for t in (scale, w, b))
    y = fn(x, s, w, b)
    y.backward(g)
    return y.detach(), x.grad, s.grad, w.grad, None if b is None else b.grad


def _lsq_then_linear(qmin, qmax, gf):
    return lambda x, s, w, b: torch.nn.functional.linear(lsq_fake_quantize(x, s, None, qmin, qmax, gf), w, b)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,n,out", [(128, 784, 400), (5, 30, 37), (64, 96, 130), (1, 8, 8), (33, 17, 3)])
@pytest.mark.parametrize("signed", [False, True])
def test_lsq_linear_equals_lsq_then_linear(k, rows, n, out, signed, threads):
    """Forward and weight/bias gradients bit for bit; the step gradient (sparse: only nonzero
    x_hat - x) equals the paper's float64 sum; with x's gradient asked, everything bit for bit."""
    torch.set_num_threads(threads)
    gen = _gen(rows + n + out)
    qmin, qmax = qrange(8, signed)
    x = _sparse_images(rows, n, seed=rows + signed)
    if signed:
        x = x * torch.where(torch.rand(rows, n, generator=gen) < 0.5, -1.0, 1.0)
    w = torch.randn(out, n, generator=gen) * 0.05
    b = torch.randn(out, generator=gen) * 0.1
    g = torch.randn(rows, out, generator=gen)
    gf = 1 / math.sqrt(n * qmax)
    for raw in (0.0041, 1 / 255, -0.002, 1e-4):  # 1e-4: most pixels clipped at qmax
        scale = torch.tensor(raw)
        ref = _linear_grads(_lsq_then_linear(qmin, qmax, gf), x, scale, w, b, g, False)
        fused = _linear_grads(lambda x, s, w, b: k.lsq_linear(x, s, w, b, qmin, qmax, gf), x, scale, w, b, g, False)
        assert torch.equal(fused[0], ref[0]) and fused[1] is None
        assert torch.equal(fused[3], ref[3]) and torch.equal(fused[4], ref[4])
        step = max(f32(abs(raw)), f32(1e-8))
        gxh = g.double() @ w.double()  # dL/dx_hat, in float64
        want = _paper_step_grad(x, step, qmin, qmax, gxh, gf) * (-1 if raw < 0 else 1)
        # float32 x_hat - x is exact to about 2^-24 |x| (with s = 1/255 every d is that small and
        # the sum nearly cancels), whence the absolute tolerance
        tol = 2.0**-22 * gf * float((gxh.abs() * x.double().abs()).sum()) / step
        assert fused[2].item() == pytest.approx(want, rel=1e-5, abs=tol)
        assert fused[2].item() == pytest.approx(ref[2].item(), rel=1e-5, abs=tol)
        # x's gradient asked for: the dense product, the unfused path's values exactly
        ref = _linear_grads(_lsq_then_linear(qmin, qmax, gf), x, scale, w, b, g, True)
        fused = _linear_grads(lambda x, s, w, b: k.lsq_linear(x, s, w, b, qmin, qmax, gf), x, scale, w, b, g, True)
        for a, r in zip(fused, ref):
            assert torch.equal(a, r)


def test_lsq_linear_dense_inputs_take_the_dense_product(k):
    """Above half nonzero, the step gradient is the unfused path's, bit for bit; no bias works."""
    gen = _gen(11)
    x, w, g = torch.rand(64, 200, generator=gen), torch.randn(50, 200, generator=gen), torch.randn(64, 50, generator=gen)
    scale = torch.tensor(0.01)
    ref = _linear_grads(_lsq_then_linear(0, 255, 0.01), x, scale, w, None, g, False)
    fused = _linear_grads(lambda x, s, w, b: k.lsq_linear(x, s, w, b, 0, 255, 0.01), x, scale, w, None, g, False)
    for a, r in zip(fused, ref):
        assert (a is None and r is None) or torch.equal(a, r)


def _layer_grads(fn, tensors: dict, wanted: set, g: torch.Tensor):
    """y and the gradients of fn(**tensors) for the named tensors in wanted (None: not asked)."""
    ts = {n: None if t is None else t.detach().clone().requires_grad_(n in wanted) for n, t in tensors.items()}
    y = fn(**ts)
    y.backward(g)
    return [y.detach()] + [None if t is None else t.grad for t in ts.values()]


def _layer_inputs(seed: int, sparse: bool, bias: bool, wide: bool = False):
    gen = _gen(seed)
    rows, n, out = (128, 784, 400) if wide else (33, 70, 45)
    x = _sparse_images(rows, n, seed=seed) if sparse else torch.randn(rows, n, generator=gen) * 0.6 + 0.4
    w = torch.randn(out, n, generator=gen) * 0.3
    w[0, :5] = torch.tensor([4.0, -4.0, 3.0, -3.0, 2.5])  # (clipped by the weight's step below)
    tensors = {"x": x, "w": w, "b": torch.randn(out, generator=gen) * 0.1 if bias else None}
    return tensors, torch.randn(rows, out, generator=gen)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tanh", [False, True])
@pytest.mark.parametrize("wanted", ["all", "no x", "steps frozen", "weights frozen"])
def test_lsq_linear_with_its_weight_quantizer_equals_the_unfused_calls(k, wanted, tanh, bias, threads):
    """One node for the input's LSQ, the weight's LSQ (or DoReFa's on tanh) and the layer: values
    and every gradient bit for bit as the quantizers' own calls then F.linear, whichever of them
    are asked; where x needs no gradient the input step's sum is regrouped (sparse): equal to
    float32 rounding."""
    torch.set_num_threads(threads)
    tensors, g = _layer_inputs(7, sparse=wanted == "no x", bias=bias, wide=threads == 2)
    n, (wq0, wq1) = tensors["x"].shape[1], qrange(4, True, narrow=tanh)
    tensors.update(xs=torch.tensor(0.013), ws=torch.tensor(0.09 if tanh else 0.21))
    gx, gw = 1 / math.sqrt(n * 255), 1 / math.sqrt(tensors["w"].numel() * wq1)
    asked = {"all": {"x", "w", "b", "xs", "ws"}, "no x": {"w", "b", "xs", "ws"}, "steps frozen": {"x", "w", "b"},
             "weights frozen": {"x", "xs", "ws"}}[wanted]

    def unfused(x, w, b, xs, ws):
        return torch.nn.functional.linear(k.lsq(x, xs, 0, 255, gx, False), k.lsq(w, ws, wq0, wq1, gw, tanh), b)

    def fused(x, w, b, xs, ws):
        return k.lsq_linear(x, xs, w, b, 0, 255, gx, ws, wq0, wq1, gw, tanh)

    ref, got = _layer_grads(unfused, tensors, asked, g), _layer_grads(fused, tensors, asked, g)
    names = ["y", "x", "w", "b", "xs", "ws"]
    for name, a, r in zip(names, got, ref):
        if name == "xs" and wanted == "no x":
            torch.testing.assert_close(a, r, rtol=1e-5, atol=0.0)
        else:
            assert (a is None and r is None) or torch.equal(a, r), name
    assert got[1] is None or got[1].abs().sum() > 0  # (gradients really flowed)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("weight", ["lsq on tanh", "fixed grid", "as given"])
@pytest.mark.parametrize("x_grad", [True, False])
def test_clipped_linear_equals_the_unfused_calls(k, x_grad, weight, threads):
    """DoReFa's, QAT's and PTQ's layer in one node: the input on a fixed grid (clipped STE: DoReFa's
    [0, 1], an observed range), the weight's LSQ on tanh (DoReFa), on a fixed grid with the plain
    STE (an affine one, as QAT's current range gives) or as given: bit for bit as the unfused calls."""
    torch.set_num_threads(threads)
    tensors, g = _layer_inputs(8, sparse=False, bias=True, wide=threads == 2)
    tensors["x"] = tensors["x"] * 1.5 - 0.2  # (some below 0, some above 1)
    lsq_w = weight == "lsq on tanh"
    tensors["ws"] = torch.tensor(0.1) if lsq_w else None
    s, gw = 1 / 15, 1 / math.sqrt(tensors["w"].numel() * 7)
    w_s, w_lo, w_hi = 0.02, -120, 135  # (codes relative to a zero point of -7; the 4.0 weight clips)
    asked = {"w", "b", "ws"} | ({"x"} if x_grad else set())

    def unfused(x, w, b, ws):
        wh = {"lsq on tanh": lambda: k.lsq(w, ws, -7, 7, gw, True), "fixed grid": lambda: k.ste(w, w_s, w_lo, w_hi),
              "as given": lambda: w}[weight]()
        return torch.nn.functional.linear(clipped_fake_quantize_scalar(x, s, f32(15.0), 0, 15), wh, b)

    def fused(x, w, b, ws):
        w_args = {"lsq on tanh": (ws, -7, 7, gw, True), "fixed grid": (None, w_lo, w_hi, 0.0, False, w_s),
                  "as given": ()}[weight]
        return k.clipped_linear(x, s, 0, 15, w, b, *w_args)

    ref, got = _layer_grads(unfused, tensors, asked, g), _layer_grads(fused, tensors, asked, g)
    for name, a, r in zip(["y", "x", "w", "b", "ws"], got, ref):
        assert (a is None and r is None) or torch.equal(a, r), name
    assert not x_grad or bool((got[1] == 0).any() and (got[1] != 0).any())  # (masked where clipped)


@pytest.mark.parametrize("method, options", [("lsq", {}), ("dorefa", {}), ("qat", {}), ("qat", {"quant_start_step": 2}),
                                             ("ptq", {})])
def test_the_wrapper_fuses_every_linear_layer(k, method, options, monkeypatch):
    """Every Linear layer of an LSQ, DoReFa, QAT or PTQ VAE takes one fused call (input, weight and
    layer), a 3-D input too, and trains as the unfused calls do (the ranges too): bit for bit where
    the input needs its gradient, and LSQ's fc1 (fed with data: its step sum regrouped) to float32
    rounding."""
    from lowbit.models.vae import VAE
    from lowbit.train import vae_batch_loss

    calls = []
    input_cls, weight_cls = (type(_quantizer(method, t)) for t in ("input", "weight"))
    original = input_cls.linear_input

    def spy(self, x, w, b, weight_args=None, round_bias=False):
        y = original(self, x, w, b, weight_args, round_bias)
        calls.append((y is not None, weight_args is not None))
        return y

    monkeypatch.setattr(input_cls, "linear_input", spy)

    def train(fuse: bool, x_grad: bool):
        torch.manual_seed(0)
        m = VAE()
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        lowbit.quantize(m, [{"quant_types": ["weight", "input"], "quant_bits": 4, "op_types": ["Linear"], **options}],
                        method, optimizer=opt)
        gen = _gen(3)
        ctx = contextlib.nullcontext() if fuse else monkeypatch.context()
        with ctx as mp:
            if not fuse:
                mp.setattr(weight_cls, "fused_weight", lambda self, w: None)
                mp.setattr(input_cls, "linear_input", lambda self, x, w, b, weight_args=None, round_bias=False: None)
            for _ in range(3):
                x = _sparse_images(32, 784, seed=int(torch.randint(0, 1000, (), generator=gen))).requires_grad_(x_grad)
                loss = vae_batch_loss(m, x)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return m

    fused, unfused = train(True, True), train(False, True)
    # every layer, its weight's quantization in the call (QAT's float steps: unfused, unquantized, and
    # with the bias rounded no input-only fused call)
    assert calls[:5] == [(True, True)] * 5
    for name, v in fused.state_dict().items():
        assert torch.equal(v, unfused.state_dict()[name]), name
    fused, unfused = train(True, False), train(False, False)
    for name, v in fused.state_dict().items():
        torch.testing.assert_close(v, unfused.state_dict()[name], rtol=1e-4, atol=1e-6, msg=name)
    fused.eval()  # (ranges then stay put: the two calls below see the same grid)
    x3 = _sparse_images(6, 784, seed=9).reshape(2, 3, 784)
    y3 = fused.fc1(x3)
    assert calls[-1] == (True, True) and y3.shape == (2, 3, 400)
    n = len(calls)
    with kernels.disabled():
        assert torch.equal(y3, fused.fc1(x3))
    assert not any(done for done, _ in calls[n:])  # (no fused form without kernels)
    # a forward hook on a quantizer sees every call: the wrapper does not fuse that quantizer (and
    # with the bias rounded to s_in * s_w, no input-only call either: it would not know the weight's grid)
    seen = []
    fused.fc1.weight_quantizer.register_forward_hook(lambda mod, inp, out: seen.append(("w", out.shape)))
    n = len(calls)
    fused.fc1(_sparse_images(4, 784, seed=5))
    assert seen == [("w", (400, 784))] and calls[n:] == []
    fused.fc1.input_quantizer.register_forward_hook(lambda mod, inp, out: seen.append(("x", out.shape)))
    n_calls = len(calls)
    fused.fc1(_sparse_images(4, 784, seed=5))
    assert seen[1:] == [("w", (400, 784)), ("x", (4, 784))] and len(calls) == n_calls


def _quantizer(method: str, quant_type: str):
    """A layer's quantizer of a method, as lowbit.quantize builds it (for its class)."""
    m = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lowbit.quantize(m, [{"quant_types": ["weight", "input"], "quant_bits": 4, "op_types": ["Linear"]}], method)
    return m[0].quantizers()[quant_type]


# -- the loader --------------------------------------------------------------------------------


def test_mode_values(monkeypatch):
    for raw, want in (("", "auto"), ("AUTO", "auto"), ("0", "0"), ("off", "0"), ("1", "1"), ("true", "1")):
        monkeypatch.setenv("LOWBIT_KERNELS", raw)
        assert kernels.mode() == want
    monkeypatch.setenv("LOWBIT_KERNELS", "maybe")
    with pytest.raises(ValueError, match="LOWBIT_KERNELS must be auto, 0 or 1"):
        kernels.mode()


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader with nothing loaded, building into a temporary folder; restored afterwards."""
    monkeypatch.setattr(kernels, "_module", kernels._UNSET)
    monkeypatch.setenv("LOWBIT_KERNELS_DIR", str(tmp_path / "build"))
    return tmp_path


def test_off_means_the_pytorch_code(fresh_loader, monkeypatch):
    monkeypatch.setenv("LOWBIT_KERNELS", "0")
    assert kernels.in_use() is None  # nothing asked yet: nothing built
    assert kernels.get() is None and not kernels.available()
    assert kernels.in_use() is False


def test_a_failed_build_warns_once_and_falls_back(fresh_loader, monkeypatch):
    bad = fresh_loader / "broken.cpp"
    bad.write_text("#error this is not a kernel\n")
    monkeypatch.setattr(kernels, "_SOURCE", bad)
    monkeypatch.setenv("LOWBIT_KERNELS", "auto")
    with pytest.warns(RuntimeWarning, match="could not be built.*LOWBIT_KERNELS=0"):
        assert kernels.get() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.get() is None  # decided once: no second warning, no second build
    # lowbit still quantizes, with the PyTorch code
    x = torch.randn(100)
    assert torch.equal(ste_fake_quantize_scalar(x, 0.5, 2.0, -8, 7), fake_quantize(x, torch.tensor(0.5), None, -8, 7))


def test_a_failed_build_is_an_error_when_required(fresh_loader, monkeypatch):
    bad = fresh_loader / "broken.cpp"
    bad.write_text("#error this is not a kernel\n")
    monkeypatch.setattr(kernels, "_SOURCE", bad)
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    with pytest.raises(kernels.KernelBuildError, match="LOWBIT_KERNELS=1"):
        kernels.get()


# -- the range quantizers (QAT, PTQ): observation, tracked range, grid and output in one call ----


def _range_quantizer(quant_type: str, tracking: str, scheme: str, dtype: str | None, bits: int):
    from lowbit.config import TensorSpec
    from lowbit.methods.base import RangeQuantizer

    spec = TensorSpec(quant_type, bits, "per_tensor", scheme, dtype, False)
    return RangeQuantizer(spec, tracking=tracking, decay=0.9)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "quant_type,tracking",
    [("weight", "current"), ("input", "ema"), ("input", "minmax")],
)
@pytest.mark.parametrize("scheme,dtype", [("affine", None), ("affine", "uint"), ("symmetric", None), ("symmetric", "uint")])
def test_range_quant_equals_the_python_path(k, quant_type, tracking, scheme, dtype, threads):
    """Same tracked range, scale, zero point (exact Python numbers) and output, step after step,
    and the same input gradient, as RangeQuantizer's Python code."""
    torch.set_num_threads(threads)
    gen = _gen(threads)
    fused = _range_quantizer(quant_type, tracking, scheme, dtype, 4)
    plain = _range_quantizer(quant_type, tracking, scheme, dtype, 4)
    for step in range(6):
        shift = 0.5 if dtype == "uint" and quant_type != "weight" else 0.0
        x = torch.randn(300, 97, generator=gen) * (0.5 + step) + shift  # ranges that move
        if step == 3:
            x = x.abs()  # a batch whose range does not straddle 0 (the range is widened to 0)
        g = torch.randn(x.shape, generator=gen)
        y1, gx1, _ = _grads(lambda t, _: fused(t), x, None, g)
        with kernels.disabled():
            y2, gx2, _ = _grads(lambda t, _: plain(t), x, None, g)
        assert fused._st[4] == plain._st[4], step
        assert torch.equal(y1, y2), step
        assert torch.equal(gx1, gx2), step
    # the state reaches the buffers the same way
    assert fused.grid().to_dict() == plain.grid().to_dict()
    assert [t.item() for t in fused.tracked_range()] == [t.item() for t in plain.tracked_range()]


def test_range_quant_edge_cases(k):
    q = _range_quantizer("weight", "current", "affine", None, 8)
    zero = torch.zeros(10, 10)
    assert torch.equal(q(zero), zero)  # a zero range gets the smallest scale, not a division by 0
    x = torch.randn(64, 48).t()  # non-contiguous
    with kernels.disabled():
        want = _range_quantizer("weight", "current", "affine", None, 8)(x)
    assert torch.equal(q(x), want)
    nan = torch.tensor([0.5, float("nan"), -1.0])
    with pytest.raises(ValueError, match="contains NaN: training has diverged"):
        q(nan)
    with kernels.disabled(), pytest.raises(ValueError, match="contains NaN: training has diverged"):
        _range_quantizer("weight", "current", "symmetric", None, 8)(nan)
    # an inf would make the EMA range infinite, and every later output NaN: refused, state kept
    for fused in (True, False):
        with contextlib.ExitStack() as stack:
            if not fused:
                stack.enter_context(kernels.disabled())
            ema = _range_quantizer("input", "ema", "affine", "uint", 8)
            ema(torch.rand(8, 8))
            before = ema.grid().to_dict()
            with pytest.raises(ValueError, match="contains inf: its range would be infinite"):
                ema(torch.tensor([[0.5, float("inf")]]))
            assert ema.grid().to_dict() == before
            assert torch.isfinite(ema(torch.rand(8, 8))).all()


def test_a_stale_build_lock_is_removed(fresh_loader, monkeypatch):
    """A build killed hard leaves PyTorch's lock file, on which every later build would wait
    forever: one older than STALE_LOCK_SECONDS is removed (here the build then fails fast)."""
    import os
    import time

    bad = fresh_loader / "broken.cpp"
    bad.write_text("#error this is not a kernel\n")
    monkeypatch.setattr(kernels, "_SOURCE", bad)
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    build = kernels._build_dir(kernels._extension_name(kernels._flags()))
    lock = build / "lock"
    lock.write_text("")
    old = time.time() - kernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with pytest.raises(kernels.KernelBuildError):
        kernels.get()
    assert not lock.exists()


def test_the_build_compiles_a_copy_in_its_own_folder(fresh_loader, monkeypatch):
    """The build rules name the source's path: compiling each checkout's own file would rebuild
    whenever another checkout or venv loads the kernels; the copy in the build folder is stable."""
    from torch.utils import cpp_extension

    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setenv("LOWBIT_KERNELS", "1")
    assert kernels.get() == "module"
    (src,) = seen["sources"]
    assert src.startswith(seen["build_directory"])
    assert open(src, "rb").read() == kernels._SOURCE.read_bytes()


def _penalty_grads(method: str, context) -> list:
    """The weights' gradients of a gradient penalty ||d out / d x||^2 (create_graph=True)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    lowbit.quantize(m, [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}], method)
    x = torch.randn(32, 8)
    with context():
        m(x)  # (a training batch: ranges and steps set)
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
    return [p.grad for p in m.parameters()]


@pytest.mark.parametrize("method", ["qat", "ptq", "lsq", "dorefa"])
def test_second_order_gradients_raise_on_the_kernels_and_work_on_the_tensor_path(k, method):
    # the kernels' backward passes are not recorded: a gradient penalty's second-order path was cut
    # silently (the weights' gradients came out smaller, the last layer's None)
    with pytest.raises(RuntimeError, match="first-order gradients only.*lowbit.tensor_path"):
        _penalty_grads(method, contextlib.nullcontext)
    on_tensor_path = _penalty_grads(method, lowbit.tensor_path)
    with kernels.disabled():
        plain = _penalty_grads(method, contextlib.nullcontext)
    assert on_tensor_path[0] is not None and on_tensor_path[0].norm() > 0
    for a, b in zip(on_tensor_path, plain):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-7)
