"""lowbit.capture_step's checks (the captures themselves need CUDA: tests/test_cuda.py)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.graphs import capture_problems
from lowbit.models.vae import VAE
from lowbit.train import vae_batch_loss

W8A8 = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"]}]


def _model(method: str, config=W8A8, capturable: bool = True, **options):
    torch.manual_seed(0)
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), 1e-3, capturable=capturable)
    cfg = [dict(entry, **options) for entry in config]
    lowbit.quantize(model, cfg, method, optimizer=opt)
    return model, opt


def _train(model, _opt, steps: int = 1) -> None:
    """Eager steps (with plain SGD: a capturable Adam steps only on a GPU)."""
    opt = torch.optim.SGD(model.parameters(), 1e-3)
    for _ in range(steps):
        loss = vae_batch_loss(model, torch.rand(16, 784))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_trained_model_with_a_capturable_optimizer_has_no_problem():
    for method in ("qat", "lsq", "dorefa", "ptq"):
        model, opt = _model(method)
        _train(model, opt)
        assert capture_problems(model, opt) == [], method


def test_a_non_capturable_optimizer_is_named_with_the_fix():
    model, opt = _model("qat", capturable=False)
    _train(model, opt)
    problems = capture_problems(model, opt)
    assert len(problems) == 1
    assert "parameter group 0 is not capturable" in problems[0] and "capturable=True" in problems[0]


def test_quantizers_that_have_seen_no_data_need_a_warm_up_step():
    for method in ("lsq", "qat"):
        model, opt = _model(method)
        problems = capture_problems(model, opt)
        assert any(p.startswith("fc1's input quantizer has seen no data") and "warmup >= 1" in p for p in problems), method
        assert capture_problems(model, opt, steps_ahead=1) == [], method  # the warm-up will initialise them


def test_quant_start_step_must_have_passed_before_capture():
    model, opt = _model("qat", quant_start_step=4)
    _train(model, opt, 1)
    problems = capture_problems(model, opt, steps_ahead=2)  # steps 2-4 pass through
    assert len(problems) == 10  # weight and input of the 5 Linear layers
    assert all("quant_start_step" in p and "at step 1" in p for p in problems)
    assert sum("warmup >= 3" in p for p in problems) == 5  # inputs: ranges tracked while passing through
    assert sum("warmup >= 4" in p for p in problems) == 5  # weights: first seen at step 5, quantizing
    assert capture_problems(model, opt, steps_ahead=4) == []
    _train(model, opt, 3)
    problems = capture_problems(model, opt)  # at step 4: the next one is the first to quantize
    assert len(problems) == 5 and all("weight quantizer has seen no data" in p and "warmup >= 1" in p for p in problems)
    _train(model, opt, 1)
    assert capture_problems(model, opt) == []


def test_percentile_calibration_cannot_be_replayed():
    model, opt = _model("ptq", calibration="percentile")
    _train(model, opt)
    problems = capture_problems(model, opt, steps_ahead=5)
    assert any("fc1's input quantizer averages per-batch percentiles" in p for p in problems)


def test_capture_step_needs_cuda():
    model, opt = _model("lsq")
    x = torch.rand(16, 784)
    before = model.fc1.weight.detach().clone()
    with pytest.raises(lowbit.CaptureError, match="on a CUDA device"):
        lowbit.capture_step(model, opt, vae_batch_loss, x)
    assert torch.equal(model.fc1.weight, before)  # nothing ran


def test_a_negative_warm_up_is_refused():
    model, opt = _model("lsq")
    with pytest.raises(lowbit.CaptureError, match="warmup must be >= 0"):
        lowbit.capture_step(model, opt, vae_batch_loss, torch.rand(16, 784), warmup=-1)
