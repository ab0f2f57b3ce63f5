"""PTQ: min/max and percentile calibration over a few batches, no training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import ConfigError




def model(**extra):
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    cfg = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"], **extra}]
    return lowbit.quantize(m, cfg, "ptq")


def test_minmax_calibration_over_batches_then_frozen():
    m = model()
    assert lowbit.quantizer_parameters(m) == []
    batches = [torch.randn(32, 16) * s for s in (1.0, 3.0, 0.5)]
    lowbit.calibrate(m, batches)
    iq = m[0].input_quantizer
    lo, hi = iq.tracked_range()
    allx = torch.cat(batches)
    assert (lo.item(), hi.item()) == (allx.min().item(), allx.max().item())
    g = iq.grid()
    assert (g.qmin, g.qmax) == (0, 255)
    assert g.scale.item() == pytest.approx((hi - lo).item() / 255, rel=1e-6)
    m.eval()
    m(torch.randn(4, 16) * 100)
    assert iq.tracked_range()[1].item() == hi.item()
    # the second layer's input is a ReLU output: its range starts at 0
    assert m[2].input_quantizer.tracked_range()[0].item() == 0.0


def test_symmetric_weights_on_the_narrow_signed_grid():
    m = model()
    wq = m[0].weight_quantizer
    w = m[0].module.weight.detach()
    q = wq.quantize_int(w)
    g = wq.grid()
    assert (g.qmin, g.qmax) == (-127, 127) and g.zero_point.item() == 0
    assert g.scale.item() == pytest.approx(w.abs().max().item() / 127, rel=1e-6)
    assert q.abs().max().item() == 127


def test_percentile_calibration_ignores_outliers():
    m = model(calibration="percentile", percentile=99.0)
    x = torch.rand(64, 16)
    x[0, 0] = 1000.0
    lowbit.calibrate(m, [x])
    lo, hi = m[0].input_quantizer.tracked_range()
    assert hi.item() < 2.0
    ref = torch.quantile(x.flatten(), 0.99).item()
    assert hi.item() == pytest.approx(ref, rel=0.02)
    # the mean over batches of the per-batch percentile
    lowbit.calibrate(m, [torch.rand(64, 16) * 3])
    assert m[0].input_quantizer.tracked_range()[1].item() > hi.item()
    assert m[0].input_quantizer.state_dict()["batches"].item() == 2


def test_per_channel_affine_weights():
    m = model(quant_scheme={"weight": "per_channel_affine"})
    wq = m[0].weight_quantizer
    w = m[0].module.weight.detach()
    y = wq(w)
    g = wq.grid()
    assert g.scale.shape == (8,) and g.zero_point.shape == (8,)
    assert torch.equal(g.dequantize(wq.quantize_int(w)), y)
    assert ((y - w).abs() <= g.scale[:, None] / 2 * 1.0001).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_at_most_2_to_the_b_levels(bits):
    m = nn.Sequential(nn.Linear(16, 8))
    lowbit.quantize(m, [{"quant_types": ["weight", "output"], "quant_bits": bits, "op_types": ["Linear"]}], "ptq")
    lowbit.calibrate(m, [torch.randn(64, 16)])
    m.eval()
    y = m(torch.randn(256, 16))
    assert y.unique().numel() <= 2**bits
    assert m[0].weight_quantizer(m[0].module.weight).unique().numel() <= 2**bits - 1


@pytest.mark.parametrize("method,entry,opts", [
    ("ptq", {"quant_types": ["weight"], "quant_bits": 1}, {}),
    ("ptq", {"quant_types": ["weight"], "quant_bits": 2}, {"weight_range": "reduced"}),
    ("qat", {"quant_types": ["input"], "quant_bits": 1, "quant_scheme": "symmetric", "quant_dtype": "int"}, {}),
])
def test_single_level_symmetric_grid_is_refused(method, entry, opts):
    # a signed symmetric grid at 1 bit of range is {0}: every value would quantize to 0
    m = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ConfigError, match="single level.*quant_scheme 'affine'"):
        lowbit.quantize(m, [{**entry, "op_types": ["Linear"]}], method, **opts)
    assert isinstance(m[0], nn.Linear)


def test_one_bit_affine_weights_take_two_levels():
    torch.manual_seed(0)
    m = lowbit.quantize(nn.Sequential(nn.Linear(16, 8)),
                        [{"quant_types": ["weight"], "quant_bits": 1, "quant_scheme": "affine", "op_types": ["Linear"]}],
                        "ptq")
    w = m[0].module.weight.detach()
    wq = m[0].weight_quantizer(w)
    g = m[0].weight_quantizer.grid()
    assert (g.qmin, g.qmax) == (-1, 0)
    assert torch.isfinite(wq).all() and len(torch.unique(wq)) == 2


@pytest.mark.parametrize("method", ["ptq", "qat"])
def test_unsigned_symmetric_weights_are_refused(method):
    # an unsigned symmetric grid has no negative codes: every negative weight would become 0
    m = nn.Sequential(nn.Linear(16, 8))
    entry = {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"],
             "quant_scheme": "symmetric", "quant_dtype": "uint"}
    with pytest.raises(ConfigError, match="symmetric with quant_dtype 'uint'.*quant_scheme {'weight': 'affine'}"):
        lowbit.quantize(m, [entry], method)
    assert isinstance(m[0], nn.Linear)
    # unsigned affine weights (NNI's grid) and unsigned symmetric activations stay allowed
    lowbit.quantize(m, [{**entry, "quant_scheme": "affine"}], method)
    lowbit.quantize(nn.Sequential(nn.Linear(16, 8)), [{**entry, "quant_types": ["input"]}], method)


def test_percentile_calibration_refuses_nan():
    # kthvalue sorts NaN last: the 99.99th percentile skipped a few NaNs silently
    m = lowbit.quantize(nn.Sequential(nn.Linear(16, 8)), [{"quant_types": ["input"], "quant_bits": 8,
                                                          "op_types": ["Linear"], "calibration": "percentile"}], "ptq")
    x = torch.rand(4096, 16)
    x[5, 3] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        lowbit.calibrate(m, [x])


@pytest.mark.parametrize("method", ["ptq", "qat"])
@pytest.mark.parametrize("quant_type", ["input", "output"])
def test_symmetric_activations_without_a_dtype_keep_negative_values(method, quant_type):
    # NNI's per_tensor_symmetric activations keep negatives (a mid-range zero point on unsigned
    # codes); lowbit's unsigned symmetric grid has zero point 0, so unasked it turned every
    # negative value into 0.  Without quant_dtype a symmetric activation grid is signed.
    m = nn.Sequential(nn.Linear(4, 4))
    entry = {"quant_types": [quant_type], "quant_bits": 8, "op_names": ["0"], "quant_scheme": "per_tensor_symmetric"}
    lowbit.quantize(m, [entry], method)
    q = getattr(m[0], f"{quant_type}_quantizer")
    assert q.spec.dtype == "int"
    x = torch.tensor([[-1.0, -0.5, 0.5, 1.0]])
    m.train()
    lowbit.calibrate(m, [x]) if method == "ptq" else m(x)
    g = q.grid()
    assert (g.qmin, g.qmax, int(g.zero_point)) == (-127, 127, 0)
    if quant_type == "input":
        m.eval()
        out = q(x)
        assert torch.allclose(out, x, atol=float(g.scale) / 2) and (out < 0).sum() == 2
    # asked for explicitly, unsigned codes stay (all 256 codes for non-negative data)
    m2 = lowbit.quantize(nn.Sequential(nn.Linear(4, 4)), [{**entry, "quant_dtype": "uint"}], method)
    assert getattr(m2[0], f"{quant_type}_quantizer").spec.dtype == "uint"
