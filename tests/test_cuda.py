"""The quantizers on a GPU: the same grids, gradients and results as on the CPU, state that stays
on the device, and the verbs (calibration_config, fold, save/load, export, fit/evaluate) on a
GPU-trained model.  Skipped without CUDA.

``LOWBIT_TEST_DEVICE=cpu`` runs these tests with the "device" side on the CPU's tensor path
(:func:`lowbit.fake_quant.tensor_path`: no Python-number grids, no fused kernels), which is what a
GPU runs; useful to check the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os

import pytest
import torch
from torch import nn

import lowbit
from helpers import assert_compiles_like_eager, train_vae
from lowbit.fake_quant import tensor_path
from lowbit.methods import Quantizer
from lowbit.models.vae import VAE, vae_loss
from lowbit.modules import QuantWrapper
from lowbit.quantize import quantized_layers

DEVICE = torch.device(os.environ.get("LOWBIT_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")

METHODS = ["qat", "dorefa", "lsq", "ptq"]


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """Full float32 products on the GPU (no TF32), so CPU and GPU results can be compared."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def config(method: str, granularity: str = "per_tensor", bits: int = 4) -> list[dict]:
    types = ["weight"] if method == "dorefa" else ["weight", "input"]
    entry = {"quant_types": types, "quant_bits": bits, "op_types": ["Linear"]}
    if method != "dorefa":
        entry["granularity"] = {"weight": granularity}
    return [entry]


def on_device(model: nn.Module) -> nn.Module:
    """``model`` moved to DEVICE; on the CPU stand-in, its forward passes take the tensor path (the
    paths are chosen in the forward pass; backward passes follow)."""
    model = model.to(DEVICE)
    if DEVICE.type == "cpu":

        open_paths = []

        def enter(module, args):
            open_paths.append(tensor_path())
            open_paths[-1].__enter__()

        def leave(module, args, out):
            open_paths.pop().__exit__(None, None, None)

        model._stand_in_hooks = (model.register_forward_pre_hook(enter), model.register_forward_hook(leave))
    return model


def device_path():
    """A context for calls made outside a model's forward pass: the tensor path on the stand-in."""
    return tensor_path() if DEVICE.type == "cpu" else contextlib.nullcontext()


def back_on_cpu(model: nn.Module) -> nn.Module:
    """``model`` moved to the CPU, its host paths back (on the stand-in too)."""
    for hook in model.__dict__.pop("_stand_in_hooks", ()):
        hook.remove()
    return model.cpu()


def pair(method: str, granularity: str = "per_tensor", bits: int = 4) -> tuple[nn.Module, nn.Module]:
    """The same VAE quantized on the CPU and on DEVICE (quantized after the move, as a user would)."""
    torch.manual_seed(0)
    cpu = VAE()
    dev = copy.deepcopy(cpu).to(DEVICE)
    lowbit.quantize(cpu, config(method, granularity, bits), method)
    lowbit.quantize(dev, config(method, granularity, bits), method)
    return cpu, on_device(dev)


def steps(model: nn.Module, n: int, seed: int = 0) -> list[float]:
    """``n`` Adam steps on seeded random images and noise (drawn on the CPU: the same on every device)."""
    return train_vae(model, steps=n, seed=seed, batch=64, seeded_eps=True)


def assert_on_device(model: nn.Module) -> None:
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == DEVICE.type, f"{name} is on {t.device}, not {DEVICE}"


def assert_same_grid_values(a: torch.Tensor, b: torch.Tensor, step: torch.Tensor) -> None:
    """Two fake-quantized tensors agree: equal, except where the two devices' float rounding put a
    value a hair apart (a tanh, a reduction's order): then one step apart, at rare places."""
    a, b = a.detach().cpu(), b.detach().cpu()
    diff = (a - b).abs()
    assert bool((diff <= step.detach().cpu().abs().max() * 1.001 + 1e-7).all()), f"max difference {diff.max().item()}"
    assert (diff > 1e-7).float().mean().item() <= 2e-3, f"{(diff > 1e-7).sum().item()} of {diff.numel()} values differ"


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("method", METHODS)
def test_training_on_the_device_matches_the_cpu(method, granularity):
    if method == "dorefa" and granularity == "per_channel":
        pytest.skip("DoReFa's weight grid is per layer")
    cpu, dev = pair(method, granularity)
    # the same weights: the same quantized weights (up to a tanh's or a mean's last bit)
    for name, wc in quantized_layers(cpu).items():
        with torch.no_grad():
            wq = wc.quantized_weight()
            assert_same_grid_values(wq, dev.get_submodule(name).quantized_weight(), wc.weight_quantizer.grid().scale)
    # one forward and backward on the same batch: the same loss and gradients, up to summation order
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(64, 784, generator=g), torch.randn(64, 20, generator=g)
    losses = []
    for model, device in ((cpu, "cpu"), (dev, DEVICE)):
        xx = x.to(device)
        logits, mu, logvar = model(xx, eps.to(device))
        loss = vae_loss(logits, xx, mu, logvar).total
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    grads_dev = dict(dev.named_parameters())
    for name, p in cpu.named_parameters():
        gc, gd = p.grad, grads_dev[name].grad.cpu()
        assert gd.shape == gc.shape, name
        # relative to the gradient's norm: summation order, and an activation whose code differs
        # by one where a learned step's initial mean differs in its last bit (LSQ) move a few
        # entries, not the gradient.  A step's gradient is one sum over a whole tensor or channel
        # of terms that such a code moves by a whole step: 5% there (seen: 1% on an H200)
        tol = 5e-2 if "quantizer" in name else 2e-3
        assert (gd - gc).norm() <= tol * gc.norm() + 1e-6, name
    # training goes on alike (Adam: a weight whose tiny gradient changed sign moves the other way,
    # so the losses drift apart slowly)
    cpu.zero_grad(), dev.zero_grad()
    losses_cpu, losses_dev = steps(cpu, 3), steps(dev, 3)
    assert_on_device(dev)
    assert losses_dev == pytest.approx(losses_cpu, rel=2e-3)
    calib_cpu, calib_dev = lowbit.calibration_config(cpu), lowbit.calibration_config(dev)
    assert calib_dev.keys() == calib_cpu.keys()
    for layer, entry in calib_cpu.items():
        assert calib_dev[layer].keys() == entry.keys()
        for key, value in entry.items():
            if not isinstance(value, (float, list)):  # bits, dtypes, granularity: the same
                assert calib_dev[layer][key] == value, (layer, key)


def test_grids_and_fake_quantization_are_the_cpus_bit_for_bit():
    """Scale and zero point from a range, and the fake-quantized values: the same bits on the device
    (CUDA's division by a Python number is a multiplication by its reciprocal: lowbit avoids it)."""
    from lowbit.fake_quant import affine_qparams, fake_quantize

    g = torch.Generator().manual_seed(0)
    lo, hi = -torch.rand(4096, generator=g) * 7, torch.rand(4096, generator=g) * 13
    for qmin, qmax, symmetric in ((-128, 127, False), (0, 255, False), (-127, 127, True), (-8, 7, False)):
        sc, zc = affine_qparams(lo, hi, qmin, qmax, symmetric)
        sd, zd = affine_qparams(lo.to(DEVICE), hi.to(DEVICE), qmin, qmax, symmetric)
        assert torch.equal(sc, sd.cpu()) and torch.equal(zc, zd.cpu()), (qmin, qmax, symmetric)
        x = torch.randn(4096, 64, generator=g) * 5
        yc = fake_quantize(x, sc, zc, qmin, qmax, axis=0)
        yd = fake_quantize(x.to(DEVICE), sd, zd, qmin, qmax, axis=0)
        assert torch.equal(yc, yd.cpu()), (qmin, qmax, symmetric)


@pytest.mark.parametrize("method", ["qat", "ptq", "lsq"])
def test_quantizers_alone_match_the_cpu_bit_for_bit(method):
    """One quantizer, the same grid on both devices: forward equal; gradients equal (x) or equal
    up to summation order (LSQ's step)."""
    torch.manual_seed(1)
    layer = nn.Linear(300, 50)
    x = torch.randn(32, 300) * 3
    cpu = nn.Sequential(copy.deepcopy(layer))
    dev = nn.Sequential(copy.deepcopy(layer).to(DEVICE))
    cfg = [{"quant_types": ["weight", "input"], "quant_bits": 4, "op_types": ["Linear"], "quant_dtype": {"input": "int"}}]
    lowbit.quantize(cpu, cfg, method)
    lowbit.quantize(dev, cfg, method)
    on_device(dev)
    outs = []
    for model, xx, path in ((cpu, x.clone(), contextlib.nullcontext()), (dev, x.to(DEVICE), device_path())):
        xx.requires_grad_(True)
        model(xx)  # the first batch sets the ranges / initialises the steps
        q = model[0].input_quantizer
        with path:
            y = q(xx)
        y.backward(torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape))
        grads = [xx.grad.cpu()] + [p.grad.cpu() for p in q.parameters() if p.grad is not None]
        outs.append((y.detach().cpu(), grads, q.grid().scale.cpu()))
    (yc, gc, sc), (yd, gd, sd) = outs
    assert torch.equal(sc, sd) if method != "lsq" else torch.allclose(sc, sd, rtol=1e-6)
    if method != "lsq":
        assert torch.equal(yc, yd)
        assert torch.equal(gc[0], gd[0])
    else:
        assert_same_grid_values(yc, yd, sc)
        assert torch.allclose(gc[0], gd[0]) and len(gc) == len(gd) == 2
        assert gd[1].item() == pytest.approx(gc[1].item(), rel=1e-4)


def test_quantize_puts_the_quantizer_state_on_the_models_device():
    model = VAE().to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    lowbit.quantize(model, config("lsq"), "lsq", optimizer=opt)
    assert_on_device(model)
    assert all(p.device.type == DEVICE.type for p in opt.param_groups[-1]["params"])
    steps(model, 1)
    assert "LSQ" in str(model) or "lsq" in str(model)


def test_a_cpu_quantized_model_moved_to_the_device_and_back_keeps_its_ranges():
    """Quantize on the CPU, train on the device, go on training on the CPU: QAT's EMA ranges
    continue across both moves (none restarts from one batch)."""
    torch.manual_seed(0)
    model = lowbit.quantize(VAE(), config("qat"), "qat")
    steps(model, 2)
    before = lowbit.calibration_config(model)["fc1"]["tracked_max_input"]
    on_device(model)
    steps(model, 2, seed=1)
    back_on_cpu(model)
    steps(model, 1, seed=2)
    after = lowbit.calibration_config(model)["fc1"]["tracked_max_input"]
    # five EMA updates (decay 0.99) of maxima near 1: within 5% of where it started
    assert after == pytest.approx(before, rel=0.05)


def test_fold_and_calibration_config_of_a_device_model():
    torch.manual_seed(0)
    weights_only = [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Linear"]}]
    model = on_device(lowbit.quantize(VAE().to(DEVICE), weights_only, "lsq"))
    steps(model, 2)
    model.eval()
    plain = lowbit.fold(model)
    assert not any(isinstance(m, (QuantWrapper, Quantizer)) for m in plain.modules())
    assert_on_device(plain)
    x, eps = torch.rand(16, 784, device=DEVICE), torch.randn(16, 20, device=DEVICE)
    assert torch.equal(plain(x, eps)[0], model(x, eps)[0])
    calib = lowbit.calibration_config(model)
    again = json.loads(json.dumps(calib))
    fresh = on_device(lowbit.quantize(VAE().to(DEVICE), weights_only, "lsq"))
    fresh.load_state_dict(model.state_dict())
    lowbit.load_calibration_config(fresh, again)
    fresh.eval()
    assert torch.equal(fresh(x, eps)[0], model(x, eps)[0])


def test_save_and_load_a_device_trained_run(tmp_path):
    from lowbit.checkpoint import load_model, save_run

    torch.manual_seed(0)
    cfg = config("qat")
    model = on_device(lowbit.quantize(VAE().to(DEVICE), cfg, "qat"))
    steps(model, 2)
    save_run(tmp_path, model, model_spec={"name": "vae", "kwargs": {}}, quant={"method": "qat", "config_list": cfg, "options": {}})
    loaded = load_model(tmp_path)  # on the CPU: checkpoints hold CPU tensors
    model.eval()
    x, eps = torch.rand(16, 784), torch.randn(16, 20)
    assert torch.allclose(loaded(x, eps)[0], model(x.to(DEVICE), eps.to(DEVICE))[0].cpu(), atol=1e-4)
    for layer, entry in lowbit.calibration_config(model).items():
        for key, value in entry.items():
            assert lowbit.calibration_config(loaded)[layer][key] == value, (layer, key)


def test_export_a_device_model_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from lowbit.export import runtime as rt
    from lowbit.models.vae import eval_eps

    torch.manual_seed(0)
    model = on_device(lowbit.quantize(VAE().to(DEVICE), config("lsq", bits=8), "lsq"))
    steps(model, 2)
    model.eval()
    path = lowbit.export(model, tmp_path / "m.onnx", format="onnx-int8", vae_graph="eps")
    assert next(model.parameters()).device.type == DEVICE.type  # the user's model stays where it was
    x, eps = torch.rand(100, 784), eval_eps(100, 20)
    out = rt.load_session(path, precision="exact").run(x.numpy(), eps.numpy())
    with torch.no_grad():
        sim = [t.cpu() for t in model(x.to(DEVICE), eps.to(DEVICE))]

    def loss(outs) -> float:  # per image, as the study reports it
        logits, mu, logvar = (torch.as_tensor(o) for o in outs[:3])
        return vae_loss(logits, x, mu, logvar).total.item() / len(x)

    assert abs(loss(out) - loss(sim)) < 0.01


def test_fit_and_evaluate_on_the_device():
    from lowbit.train import evaluate, fit

    torch.manual_seed(0)
    images = torch.rand(256, 1, 28, 28)
    model = on_device(lowbit.quantize(VAE().to(DEVICE), config("qat"), "qat"))
    result = fit(model, images.to(DEVICE), epochs=2, batch_size=64, progress=False)
    assert len(result.epoch_losses) == 2 and all(l == l for l in result.epoch_losses)
    ev_dev = evaluate(model, images.to(DEVICE), iwae_k=4)
    back_on_cpu(model)
    ev_cpu = evaluate(model, images, iwae_k=4)
    assert ev_dev.loss == pytest.approx(ev_cpu.loss, rel=1e-4)
    assert ev_dev.iwae == pytest.approx(ev_cpu.iwae, rel=1e-4)


def test_conv_model_on_the_device():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 13 * 13, 10))
    cfg = [{"quant_types": ["weight", "input"], "quant_bits": 4, "op_types": ["Conv2d", "Linear"],
            "granularity": {"weight": "per_channel"}}]
    for method in ["qat", "lsq"]:
        cpu = copy.deepcopy(net)
        dev = copy.deepcopy(net).to(DEVICE)
        lowbit.quantize(cpu, cfg, method)
        on_device(lowbit.quantize(dev, cfg, method))
        x = torch.rand(16, 1, 28, 28)
        yc, yd = cpu(x), dev(x.to(DEVICE))
        assert torch.allclose(yc, yd.cpu(), atol=1e-3), method
        yd.logsumexp(1).sum().backward()
        assert_on_device(dev)
        assert all(p.grad is not None and p.grad.device.type == DEVICE.type for p in dev.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_training_steps_never_wait_for_the_gpu(method):
    """After the first batch (which initialises ranges and steps), a training step queues its work
    and returns: no quantizer reads a value back to the host (each read stalls the pipeline)."""
    if DEVICE.type != "cuda":
        pytest.skip("host synchronisations exist only on an asynchronous device")
    torch.manual_seed(0)
    for granularity in ("per_tensor", "per_channel"):
        if method == "dorefa" and granularity == "per_channel":
            continue
        model = VAE().to(DEVICE)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        lowbit.quantize(model, config(method, granularity, 8), method, optimizer=opt)
        x = torch.rand(64, 784, device=DEVICE)
        eps = torch.randn(64, 20, device=DEVICE)
        for i in range(3):
            if i == 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                logits, mu, logvar = model(x, eps)
                loss = vae_loss(logits, x, mu, logvar).total
                opt.zero_grad()
                loss.backward()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _graph_data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(64, 784, generator=g).to(DEVICE), torch.randn(64, 20, generator=g).to(DEVICE)) for _ in range(8)]


def _graph_model(method: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = VAE().to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), 1e-3, capturable=True)
    lowbit.quantize(model, config(method, "per_tensor", 8), method, optimizer=opt)
    return model, opt


def _graph_loss(model: nn.Module, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    logits, mu, logvar = model(x, eps)
    return vae_loss(logits, x, mu, logvar).total


def _eager_losses(method: str, data) -> tuple[nn.Module, list[float]]:
    model, opt = _graph_model(method)
    losses = []
    for x, eps in data:
        loss = _graph_loss(model, x, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def _captured_step(model: nn.Module, opt: torch.optim.Optimizer, data, warmup: int = 3):
    """``lowbit.capture_step`` after warm-up on the first batches; returns ``(replay, warm-up
    losses)`` with ``replay(x, eps) -> loss``."""
    step = lowbit.capture_step(model, opt, _graph_loss, data[0], warmup=data[:warmup])
    return (lambda x, eps: step(x, eps).item()), step.warmup_losses


def _assert_same_calibration(a: nn.Module, b: nn.Module) -> None:
    ca, cb = lowbit.calibration_config(a), lowbit.calibration_config(b)
    for layer, entry in ca.items():
        for key, value in entry.items():
            assert cb[layer][key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value), (layer, key)


@pytest.mark.parametrize("method", METHODS)
def test_a_training_step_captured_as_a_cuda_graph_replays_like_eager(method):
    """After warm-up (which initialises ranges and steps), a whole training step — quantizers,
    backward, Adam — can be captured once and replayed: the launch overhead of many small kernels
    goes, and replays give eager training's losses and quantizer states."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    data = _graph_data()
    eager, eager_losses = _eager_losses(method, data)
    model, opt = _graph_model(method)
    replay, losses = _captured_step(model, opt, data)
    losses += [replay(x, eps) for x, eps in data[3:]]
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    _assert_same_calibration(eager, model)


def test_several_models_captured_as_cuda_graphs_replay_in_turn():
    """One graph per quantized model, all captured before any replays (as a benchmark or a
    train-several-models loop holds them), replayed in turn: each replays its own eager training.
    (A graph keeps no reference to the tensors it uses: an optimizer dropped after capture frees
    its state, which the next model's allocations reuse — NaN losses, or an illegal memory access.
    ``lowbit.capture_step`` keeps model and optimizer with the step.)"""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    data = _graph_data(1)
    models, replays, losses = {}, {}, {}
    for method in METHODS:  # (each optimizer lives on only in its replay function)
        models[method], opt = _graph_model(method)
        replays[method], losses[method] = _captured_step(models[method], opt, data)
    del opt
    for x, eps in data[3:]:
        for method in METHODS:
            losses[method].append(replays[method](x, eps))
    for method in METHODS:
        eager, eager_losses = _eager_losses(method, data)
        assert losses[method] == pytest.approx(eager_losses, rel=1e-5), method
        _assert_same_calibration(eager, models[method])


def test_lsq_plus_paper_initialisation_on_the_device_is_the_cpus():
    """LSQ+'s MSE-searched activation range and 3-sigma weight step, initialised on the device,
    pick the CPU's grid (same candidate; float rounding apart)."""
    torch.manual_seed(0)
    x = torch.randn(64, 16) * 0.7 + 0.3
    cfg = [{"quant_types": ["weight", "input"], "quant_bits": 3, "op_types": ["Linear"], "lsq_plus": True}]
    grids = []
    for place in (lambda m: m, on_device):
        torch.manual_seed(0)
        m = place(nn.Sequential(nn.Linear(16, 8)))
        lowbit.quantize(m, cfg, "lsq")
        m(x.to(next(m.parameters()).device))
        w, i = m[0].weight_quantizer, m[0].input_quantizer
        grids.append((w.scale.item(), i.scale.item(), i.zero_point.item()))
    assert grids[1] == pytest.approx(grids[0], rel=1e-6)


def test_a_captured_step_draws_fresh_noise_and_trains():
    """The VAE draws its noise inside the step (``torch.randn``): each replay draws anew, and
    replaying the same batch trains on it."""
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    from lowbit.train import vae_batch_loss

    model, opt = _graph_model("lsq")
    x = _graph_data()[0][0]
    step = lowbit.capture_step(model, opt, vae_batch_loss, x)
    losses = [step(x).item() for _ in range(30)]
    assert len(set(losses)) == len(losses)  # fresh noise every replay
    assert sum(losses[-5:]) < sum(losses[:5])


def test_capture_step_refuses_what_it_cannot_replay():
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    data = _graph_data()
    x, eps = data[0]
    model, _ = _graph_model("qat")
    plain = torch.optim.Adam(model.parameters(), 1e-3)  # not capturable
    before = model.fc1.weight.detach().clone()
    with pytest.raises(lowbit.CaptureError, match="capturable=True"):
        lowbit.capture_step(model, plain, _graph_loss, (x, eps))
    assert torch.equal(model.fc1.weight, before)  # refused before any warm-up step
    torch.manual_seed(0)
    model = VAE().to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), 1e-3, capturable=True)
    lowbit.quantize(model, [dict(config("qat", "per_tensor", 8)[0], quant_start_step=4)], "qat", optimizer=opt)
    with pytest.raises(lowbit.CaptureError, match=r"quant_start_step.*warmup >= 5"):
        lowbit.capture_step(model, opt, _graph_loss, (x, eps), warmup=3)
    step = lowbit.capture_step(model, opt, _graph_loss, (x, eps), warmup=5)
    with pytest.raises(lowbit.CaptureError, match=r"shape \[32, 784\].*captured with \[64, 784\]"):
        step(x[:32], eps[:32])
    assert torch.isfinite(step(x, eps))


def test_the_readme_cuda_graph_example_runs():
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    import re
    from pathlib import Path

    from lowbit.train import vae_batch_loss

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "capture_step" in c)
    torch.manual_seed(0)
    data = [x for x, _ in _graph_data()]
    ns = {"torch": torch, "lowbit": lowbit, "model": VAE().to(DEVICE), "config_list": config("lsq", bits=8),
          "loss_fn": vae_batch_loss, "first_batch": data[0], "batches": data[1:]}
    exec(compile(code, "README.md", "exec"), ns)
    assert torch.isfinite(ns["loss"]) and ns["step"].model is ns["model"]


def test_a_run_trains_and_evaluates_on_the_device(tmp_path):
    """``lowbit train/study --device cuda``: run_experiment moves the model and data there, saves a
    checkpoint that loads on the CPU, and reaches the CPU run's losses (last bits apart)."""
    from lowbit.checkpoint import load_model
    from lowbit.experiment import RunSpec, run_experiment
    from lowbit.train import evaluate

    g = torch.Generator().manual_seed(0)
    train, test = torch.rand(512, 1, 28, 28, generator=g), torch.rand(256, 1, 28, 28, generator=g)
    records = []
    for i, device in enumerate(("cpu", str(DEVICE))):
        base = RunSpec(name="fp32", epochs=1, batch_size=64, iwae_k=4, device=device)
        run_experiment(base, train, test, tmp_path / f"fp32-{i}", progress=False)
        spec = RunSpec(name="lsq", epochs=1, batch_size=64, iwae_k=4, device=device, method="lsq",
                       config_list=config("lsq"))
        records.append(run_experiment(spec, train, test, tmp_path / f"lsq-{i}", init=tmp_path / f"fp32-{i}",
                                      progress=False))
    cpu, dev = records
    assert dev["spec"]["device"] == str(DEVICE)
    if DEVICE.type != "cpu":
        assert dev["key"] != cpu["key"]  # a study never takes one device's run for the other's
    assert dev["before"]["loss"] == pytest.approx(cpu["before"]["loss"], rel=1e-3)
    assert dev["after"]["loss"] == pytest.approx(cpu["after"]["loss"], rel=1e-3)
    loaded = load_model(tmp_path / "lsq-1")  # checkpoints hold CPU tensors
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    assert evaluate(loaded, test, iwae_k=0).loss == pytest.approx(dev["after"]["loss"], rel=1e-4)


def test_the_deployment_bench_adds_gpu_rows_with_the_cpu_losses():
    """``lowbit bench`` on a CUDA machine: an fp32 torch row on the GPU (and ONNX Runtime CUDA /
    TensorRT rows where those providers are installed) whose test losses equal the CPU rows'."""
    if DEVICE.type != "cuda":
        pytest.skip("the bench's GPU rows need a CUDA device")
    from lowbit import bench

    g = torch.Generator().manual_seed(0)
    images = torch.rand(256, 1, 28, 28, generator=g)
    torch.manual_seed(0)
    model = VAE()
    lowbit.quantize(model, [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}], "ptq")
    lowbit.calibrate(model, [images.reshape(256, -1)], forward=lambda m, b: m(b, torch.zeros(len(b), m.latent)))
    result = bench.bench_model(model.eval(), images, batch_size=128, repeats=1, latency_iters=3, native_int4=False)
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays where it was
    gpu = [r for r in result.rows if r.device == "cuda"]
    assert gpu and gpu[0].name == "fp32 torch eager (CUDA)", result.gpu
    assert gpu[0].loss == pytest.approx(result.row(bench.EAGER).loss, rel=1e-5)
    assert gpu[0].throughput > 0 and gpu[0].latency_ms > 0
    on_cpu = {"fp32": result.row(bench.ORT_FP32), "int8": result.row(bench.ORT_INT8)}
    for row in gpu[1:]:  # ONNX Runtime's GPU providers, when installed: the same files, the same losses
        if row.skipped is None:
            assert row.loss == pytest.approx(on_cpu[row.name.split(" ")[0]].loss, abs=0.02), row.name
    assert "CUDA:" in result.gpu["status"]


@pytest.mark.parametrize("method", ["qat", "lsq"])
def test_a_quantized_model_compiles_on_the_device(method):
    """``model.compile()`` on the GPU: one graph, no break, eager's losses (Triton kernels fuse
    the quantizers' elementwise passes).  Measured on an H200 (torch 2.11): the first compiled
    step's loss equal to eager's, then 1.8e-3 and 4.5e-3 apart, with or without inductor's exact
    division (``eager_numerics.division_rounding``) — the backward's order, spread by Adam."""
    if DEVICE.type != "cuda":
        pytest.skip("the CPU's compiled path is tested in test_quantize (inside tensor_path)")

    def build():
        torch.manual_seed(0)
        model = VAE().to(DEVICE)
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        lowbit.quantize(model, config(method, "per_tensor", 8), method, optimizer=opt)
        return model, opt

    assert_compiles_like_eager(build, drift=1e-2)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_a_non_finite_batch_never_poisons_a_tracked_range_on_the_device(granularity):
    """Raising would read every batch's range back to the host: on a GPU a NaN/inf batch end is
    replaced by the tracked one instead (the output keeps the input's NaN, so the loss shows it).
    The CPU stand-in raises, as the host path does."""
    torch.manual_seed(0)
    model = on_device(lowbit.quantize(nn.Sequential(nn.Linear(16, 8)).to(DEVICE), config("qat", granularity, 8), "qat"))
    model(torch.rand(4, 16, device=DEVICE))
    iq = model[0].input_quantizer
    before = [t.detach().cpu().clone() for t in iq.tracked_range()]
    bad = torch.rand(4, 16, device=DEVICE)
    bad[0, 0] = float("inf")
    bad[1, 1] = float("nan")
    if DEVICE.type == "cpu":
        with pytest.raises(ValueError, match="contains"):
            model(bad)
    else:
        assert torch.isnan(model(bad)).any()
    after = [t.detach().cpu() for t in iq.tracked_range()]
    assert all(torch.isfinite(t).all() for t in after)
    if DEVICE.type == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.isfinite(model(torch.rand(4, 16, device=DEVICE))).all()
