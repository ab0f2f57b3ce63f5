"""The verbs: quantize (optimizer hookup), calibrate, calibration_config (NNI format, JSON round
trip, load back), fold (plain float model reproducing the simulated outputs)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings

import pytest
import torch
from torch import nn

import lowbit
from helpers import assert_compiles_like_eager, train_vae
from lowbit.config import ConfigError
from lowbit.models.vae import VAE
from lowbit.modules import QuantWrapper
from lowbit.quantize import quantized_layers

STUDY = ["fc1", "fc21", "fc22", "fc3"]
METHODS = ["qat", "dorefa", "lsq", "ptq"]




def cfg(types=("weight", "input"), bits=8, layers=STUDY, **extra):
    return [{"quant_types": list(types), "quant_bits": bits, "op_names": list(layers), **extra}]


def train(model, opt=None, steps=3, seed=0):
    return train_vae(model, opt, steps, seed)


def float_copy(model: VAE) -> VAE:
    """A float VAE with the (float) weights of a quantized one."""
    out = VAE()
    for name, child in out.named_children():
        src = getattr(model, name)
        child.load_state_dict((src.module if isinstance(src, QuantWrapper) else src).state_dict())
    return out


class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU())
        self.fc = nn.Linear(8 * 3 * 3, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def test_lsq_steps_join_the_given_optimizer_and_train():
    model = VAE()
    opt = torch.optim.Adam(model.parameters(), 1e-3, weight_decay=1e-4)
    lowbit.quantize(model, cfg(), "lsq", optimizer=opt)
    params = lowbit.quantizer_parameters(model)
    assert len(params) == 8  # a step per weight and per input quantizer
    assert len(opt.param_groups) == 2
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in params}
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[1]["lr"] == 1e-3
    before = [p.detach().clone() for p in params]
    train(model, opt)
    assert all(not torch.equal(b, p) for b, p in zip(before, params))  # the steps trained
    # quantizing more layers adds only the new parameters
    lowbit.quantize(model, cfg(layers=["fc4"]), "lsq", optimizer=opt)
    assert len(opt.param_groups) == 3 and len(opt.param_groups[2]["params"]) == 2


@pytest.mark.parametrize("make, impl", [
    (lambda p: torch.optim.Adam(p, 1e-3), "fused"),
    (lambda p: torch.optim.AdamW(p, 1e-3), "fused"),
    (lambda p: torch.optim.SGD(p, 1e-5, momentum=0.9), "fused"),
    (lambda p: torch.optim.Adagrad(p, 1e-3), "fused"),
    (lambda p: torch.optim.RMSprop(p, 1e-3), "foreach"),
    (lambda p: torch.optim.Adam(p, 1e-3, fused=True), "user's fused"),
    (lambda p: torch.optim.Adam(p, 1e-3, fused=False), "foreach"),  # (the user's choice: no fused)
    (lambda p: torch.optim.Adam(p, 1e-3, foreach=False), "loop"),  # (the user's choice: the loop)
    (lambda p: torch.optim.RMSprop(p, 1e-3, foreach=False), "loop"),
])
def test_the_quantizer_group_uses_a_multi_tensor_update_with_the_same_steps(make, impl):
    # a dozen scalar steps cost PyTorch's per-parameter CPU loop ~65 µs each; the group's fused or
    # foreach update does them in a call or two and must move the steps as the default loop does.
    # One training step, then three updates from the same fixed gradients: after the first step a
    # step's own gradient depends on the step (which codes its values round to), so training on
    # would let the implementations' last-bit differences grow chaotically (~1% in four steps)
    def trained(group_flags):
        torch.manual_seed(0)
        model = VAE()
        opt = make(model.parameters())
        lowbit.quantize(model, cfg(), "lsq", optimizer=opt)
        group = opt.param_groups[1]
        flags = {k: group.get(k) for k in ("fused", "foreach")}
        if group_flags is not None:
            group.update(group_flags)
        train(model, opt, steps=1)
        steps = lowbit.quantizer_parameters(model)
        for i in range(3):
            opt.zero_grad(set_to_none=True)
            for j, p in enumerate(steps):
                p.grad = torch.full_like(p, (-1) ** (i + j) * 0.01 * (i + j + 1))
            opt.step()
        return flags, [p.detach().clone() for p in steps]

    flags, steps = trained(None)
    _, default = trained({"fused": None, "foreach": False})
    if impl == "fused":
        assert flags == {"fused": True, "foreach": False}
    elif impl == "foreach":
        assert flags["foreach"] is True and not flags.get("fused")
    elif impl == "loop":
        assert not flags.get("fused") and flags["foreach"] is False
    else:
        assert flags["fused"] is True
    for a, b in zip(steps, default):
        assert torch.isfinite(a).all()
        exact = impl in ("foreach", "loop")
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=0.0), (a.tolist(), b.tolist())


def test_an_optimizer_of_named_parameters_gets_the_steps_with_their_names():
    model = VAE()
    opt = torch.optim.Adam(model.named_parameters(), 1e-3)  # (its groups carry param_names)
    lowbit.quantize(model, cfg(), "lsq", optimizer=opt)
    assert opt.param_groups[1]["param_names"][:2] == ["fc1.weight_quantizer.scale", "fc1.input_quantizer.scale"]
    train(model, opt)
    assert "param_names" in opt.state_dict()["param_groups"][1]


def test_lbfgs_is_refused_before_the_model_changes():
    model = VAE()
    opt = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ConfigError, match="LBFGS keeps a single parameter group.*without optimizer="):
        lowbit.quantize(model, cfg(), "lsq", optimizer=opt)
    assert not quantized_layers(model) and len(opt.param_groups) == 1
    lowbit.quantize(model, cfg(), "qat", optimizer=opt)  # (no parameters to add: nothing in the way)


def test_a_scheduler_built_before_quantize_is_warned_about():
    model = VAE()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)  # (it would fail on the new group)
    with pytest.warns(UserWarning, match="scheduler was built on this optimizer before lowbit.quantize.*after lowbit.quantize"):
        lowbit.quantize(model, cfg(), "lsq", optimizer=opt)
    other = VAE()
    opt = torch.optim.SGD(other.parameters(), 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.quantize(other, cfg(), "lsq", optimizer=opt)  # (none yet: no warning)
        torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch)


@pytest.mark.parametrize("method, options", [("qat", {}), ("dorefa", {"dorefa_variant": "scaled"}), ("ptq", {})])
def test_methods_without_parameters_leave_the_optimizer_alone(method, options):
    model = VAE()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    lowbit.quantize(model, cfg(), method, optimizer=opt, **options)
    assert len(opt.param_groups) == 1 and lowbit.quantizer_parameters(model) == []


def test_dorefa_learned_steps_join_the_optimizer():
    model = VAE()
    opt = torch.optim.SGD(model.parameters(), 0.1)
    lowbit.quantize(model, cfg(("weight",)), "dorefa", optimizer=opt)
    steps = lowbit.quantizer_parameters(model)
    assert len(steps) == 4 and opt.param_groups[1]["params"] == steps  # one learned step per layer


def test_training_a_quantized_vae_reduces_the_loss():
    torch.manual_seed(0)
    model = lowbit.quantize(VAE(), cfg(), "qat", quant_start_step=0)
    losses = train(model, steps=20)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", METHODS)
def test_calibration_config_nni_format_and_json_round_trip(method):
    torch.manual_seed(0)
    types = ("weight",) if method == "dorefa" else ("weight", "input")
    model = lowbit.quantize(VAE(), cfg(types), method)
    train(model, steps=2)
    calib = lowbit.calibration_config(model)
    assert list(calib) == STUDY
    for entry in calib.values():
        assert entry["method"] == method and entry["weight_bits"] == 8
        assert isinstance(entry["weight_scale"], float) and isinstance(entry["weight_zero_point"], int)
        assert entry["weight_scale"] > 0
        if "input" in types:
            assert entry["input_bits"] == 8
            assert entry["tracked_min_input"] <= 0.0 <= entry["tracked_max_input"]
        else:
            assert "input_bits" not in entry
    text = json.dumps(calib)
    assert json.loads(text) == calib
    # loading it into a freshly quantized model (same float weights) reproduces it exactly
    fresh = float_copy(model)
    lowbit.quantize(fresh, cfg(types), method)
    lowbit.load_calibration_config(fresh, json.loads(text))
    assert lowbit.calibration_config(fresh) == calib
    fresh.eval()
    model.eval()
    x, eps = torch.rand(8, 784), torch.zeros(8, 20)
    assert torch.equal(fresh(x, eps)[0], model(x, eps)[0])


def test_calibration_config_lsq_exports_the_learned_weight_step():
    model = lowbit.quantize(VAE(), cfg(), "lsq")
    train(model, steps=2)
    calib = lowbit.calibration_config(model)
    for name, entry in calib.items():
        step = getattr(model, name).weight_quantizer.scale.detach().abs().item()
        assert entry["weight_scale"] == step
        assert entry["tracked_min_input"] == pytest.approx(entry["input_qmin"] * entry["input_scale"])


def test_calibration_config_per_channel_and_output():
    model = lowbit.quantize(SmallConv(), [{"quant_types": ["weight", "output"], "quant_bits": 4, "op_types": ["Conv2d"], "granularity": {"weight": "per_channel"}}], "qat")
    model(torch.rand(2, 1, 8, 8))
    calib = lowbit.calibration_config(model)
    e = calib["features.0"]
    assert len(e["weight_scale"]) == 4 and len(e["weight_zero_point"]) == 4 and e["weight_axis"] == 0
    assert e["output_bits"] == 4 and "tracked_max_output" in e
    assert json.loads(json.dumps(calib)) == calib


def test_load_calibration_config_errors():
    model = lowbit.quantize(VAE(), cfg(), "qat")
    train(model, steps=1)
    calib = lowbit.calibration_config(model)
    other = lowbit.quantize(VAE(), cfg(layers=["fc1"]), "qat")
    with pytest.raises(lowbit.config.ConfigError, match="not quantized"):
        lowbit.load_calibration_config(other, calib)
    bad = {"fc1": {**calib["fc1"], "input_bits": 4}}
    with pytest.raises(lowbit.config.ConfigError, match="input_bits"):
        lowbit.load_calibration_config(other, bad)


def test_load_calibration_config_mismatch_names_the_layer_and_changes_nothing():
    per_channel = lowbit.quantize(VAE(), cfg(granularity={"weight": "per_channel"}), "ptq")
    lowbit.calibrate(per_channel, [torch.rand(8, 784)])
    calib = lowbit.calibration_config(per_channel)
    model = lowbit.quantize(VAE(), cfg(), "ptq")
    lowbit.calibrate(model, [torch.rand(8, 784)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # fc1's input loads before fc1's weight fails: it must be put back
    with pytest.raises(lowbit.config.ConfigError, match="'fc1'.*per-channel .400 values.*per-tensor"):
        lowbit.load_calibration_config(model, calib)
    with pytest.raises(lowbit.config.ConfigError, match="'fc21'.*'input_scale' must be a number"):
        lowbit.load_calibration_config(model, {"fc21": {**calib["fc21"], "weight_scale": 0.1, "weight_zero_point": 0, "input_scale": "x"}})
    # a code range other than the layer's: the quantizer's own message, with the layer named
    wide = {"fc3": {**calib["fc3"], "weight_scale": 0.1, "weight_zero_point": 0, "weight_qmin": -128}}
    with pytest.raises(lowbit.config.ConfigError, match="'fc3' weight.*-128"):
        lowbit.load_calibration_config(model, wide)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_calibration_config_reads_nnis_format():
    # NNI's export: bits, weight scale/zero point, activation ranges; no qmin/qmax, no input scale
    model = lowbit.quantize(VAE(), cfg(layers=["fc1"]), "qat")
    nni = {"fc1": {"weight_bits": 8, "weight_scale": 0.01, "weight_zero_point": 0,
                   "input_bits": 8, "tracked_min_input": 0.0, "tracked_max_input": 2.55}}
    lowbit.load_calibration_config(model, nni)
    g = model.fc1.input_quantizer.grid()
    assert (g.qmin, g.qmax, g.zero_point.item()) == (0, 255, 0)
    assert g.scale.item() == pytest.approx(0.01, rel=1e-6)
    lsq = lowbit.quantize(VAE(), cfg(layers=["fc1"]), "lsq")
    with pytest.raises(lowbit.config.ConfigError, match="no input_scale.*LSQQuantizer"):
        lowbit.load_calibration_config(lsq, {"fc1": {**nni["fc1"]}})


@pytest.mark.parametrize("method", METHODS)
def test_fold_reproduces_the_simulated_outputs_exactly(method):
    torch.manual_seed(0)
    model = lowbit.quantize(VAE(), cfg(("weight",), bits=4, layers=["fc1", "fc21", "fc22", "fc3", "fc4"]), method)
    train(model, steps=2)
    model.eval()
    plain = lowbit.fold(model)
    assert not any(isinstance(m, QuantWrapper) or "lowbit" in type(m).__module__ and type(m).__name__ != "VAE" for m in plain.modules())
    assert all(type(getattr(plain, n)) is nn.Linear for n in ("fc1", "fc21", "fc22", "fc3", "fc4"))
    x, eps = torch.rand(16, 784), torch.randn(16, 20)
    assert torch.equal(plain(x, eps)[0], model(x, eps)[0])
    # the folded weights are the quantized values: at most 2^4 distinct values per layer
    assert plain.fc1.weight.unique().numel() <= 16
    # the original model is untouched
    assert isinstance(model.fc1, QuantWrapper)


def test_fold_after_quant_start_step_holds_the_quantized_weights():
    # (fold copies the model: the copy's start-step count was read from a buffer written only by
    # state_dict(), so it thought it was still in its float warm-up and folded float weights)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8))
    lowbit.quantize(model, [{"quant_types": ["weight"], "quant_bits": 2, "op_types": ["Linear"]}], "qat", quant_start_step=2)
    for _ in range(5):
        model(torch.randn(4, 16))
    model.eval()
    plain = lowbit.fold(model)
    assert plain[0].weight.unique().numel() <= 4
    x = torch.randn(4, 16)
    assert torch.equal(plain(x), model(x))


@pytest.mark.parametrize("bias", [True, False])
def test_fold_is_exact_for_non_contiguous_inputs_without_gradients(bias):
    # PyTorch folds a non-contiguous N-D input into one product only where an operand requires a
    # gradient: the folded layer's weight does, the wrapper's no_grad quantized weight did not
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=bias))
    lowbit.quantize(model, [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Linear"]}], "qat")
    model.eval()
    plain = lowbit.fold(model)
    x = torch.randn(3, 4, 2, 6).permute(0, 2, 3, 1)  # NCHW -> NHWC
    for mode in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(model(x), plain(x)), mode


def _pickled(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "averaged"])
@pytest.mark.parametrize("checkpoints", [0, 2, 4])
def test_a_copy_of_a_trained_model_is_the_same_model(method, how, checkpoints):
    # a copy is made of the buffers, which the range quantizers write lazily: a copy taken between
    # two state_dict() calls lost its ranges (NotCalibratedError) or took the last checkpoint's
    torch.manual_seed(0)
    extra = {"quant_start_step": 2} if method == "qat" else {}  # (its step count is lazy state too)
    model = lowbit.quantize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)),
                            [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"]}], method, **extra)
    for scale in (1.0, 3.0, 10.0):  # checkpoints: 0, 1 or 2 state_dict() calls on the way
        for _ in range(4):
            model(torch.randn(16, 8) * scale)
        if scale < checkpoints:
            model.state_dict()  # (a checkpoint: the buffers written, then training goes on)
    if how == "deepcopy":
        other = copy.deepcopy(model)
    elif how == "pickle":
        other = _pickled(model)
    else:
        other = torch.optim.swa_utils.AveragedModel(model).module
    model.eval()
    other.eval()
    x = torch.randn(16, 8) * 10
    with torch.no_grad():
        assert torch.equal(other(x), model(x))
    mine, theirs = model.state_dict(), other.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("method", ["qat", "ptq"])
def test_averaged_model_updates_take_the_current_ranges(method):
    # AveragedModel.update_parameters copies the model's buffers (model.buffers(), no state_dict()):
    # the range quantizers' lazily written ones were stale, and the average evaluated on old grids
    torch.manual_seed(0)
    model = lowbit.quantize(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)),
                            [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"]}], method)
    model(torch.randn(16, 8))
    swa = torch.optim.swa_utils.AveragedModel(model)
    for scale in (3.0, 10.0):
        for _ in range(3):
            model(torch.randn(16, 8) * scale)
        swa.update_parameters(model)
        lo, hi = model[0].input_quantizer.tracked_range()
        assert swa.module[0].input_quantizer.tracked_range() == (lo, hi)
    # (after the last update the parameters are averages: the ranges are the model's)
    assert [b for b in swa.module.buffers()] and all(
        torch.equal(a, b) for a, b in zip(swa.module.buffers(), model.buffers()))


def test_fold_conv_model_and_drops_activation_quantization():
    torch.manual_seed(0)
    model = lowbit.quantize(SmallConv(), [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["default"], "granularity": {"weight": "per_channel"}}], "lsq")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        loss = model(torch.rand(4, 1, 8, 8)).logsumexp(1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    plain = lowbit.fold(model)
    assert type(plain.features[0]) is nn.Conv2d and type(plain.fc) is nn.Linear
    x = torch.rand(3, 1, 8, 8)
    # weights baked, activations not: close, not equal
    assert torch.allclose(plain(x), model(x), atol=0.2)
    for name, wrapper in quantized_layers(model).items():
        assert torch.equal(plain.get_submodule(name).weight, wrapper.quantized_weight())


def test_calibrate_runs_quantizers_only_and_restores_modes():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    lowbit.quantize(model, [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"]}], "ptq")
    model.train()
    batches = [torch.randn(16, 4) * (i + 1) for i in range(3)]
    lowbit.calibrate(model, batches)
    assert model.training and model[1].training and model[0].input_quantizer.training
    lo, hi = model[0].input_quantizer.tracked_range()
    allx = torch.cat(batches)
    assert lo.item() == allx.min().item() and hi.item() == allx.max().item()
    model.eval()
    y = model(torch.randn(5, 4))
    assert y.shape == (5, 2)


def test_calibrate_with_a_forward_function():
    model = lowbit.quantize(VAE(), cfg(), "ptq")
    lowbit.calibrate(model, [torch.rand(8, 784) for _ in range(2)], forward=lambda m, b: m(b, torch.zeros(8, 20)))
    assert set(lowbit.calibration_config(model)) == set(STUDY)


def test_dorefa_gradient_bits_option_trains():
    torch.manual_seed(0)
    model = lowbit.quantize(VAE(), cfg(("weight",)), "dorefa", gradient_bits=8)
    assert model.fc1.grad_quantizer is not None and "gradient=8b" in str(model)
    losses = train(model, steps=3)
    assert all(map(lambda v: v == v, losses))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qat", "lsq", "dorefa"])
def test_a_quantized_model_compiles_as_one_graph(method):
    """``torch.compile`` traces the tensor path (what a GPU runs; on the CPU inside
    ``lowbit.fake_quant.tensor_path()``) without a graph break, runs training steps without
    recompiling, and gives eager training's losses."""
    from lowbit.fake_quant import tensor_path

    def build():
        torch.manual_seed(0)
        model = VAE()
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        lowbit.quantize(model, cfg(), method, optimizer=opt)
        return model, opt

    with tensor_path():
        assert_compiles_like_eager(build)


def test_a_layer_registered_under_two_names_is_quantized_under_both():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(4, 4)
            self.dec = self.enc  # one layer, two names

        def forward(self, x):
            return self.dec(torch.relu(self.enc(x)))

    model = lowbit.quantize(Tied(), [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Linear"]}], "qat")
    assert isinstance(model.enc, QuantWrapper) and model.dec is model.enc
    assert list(quantized_layers(model)) == ["enc"]
    plain = lowbit.fold(model)
    assert isinstance(plain.dec, nn.Linear) and plain.dec is plain.enc
    # op_names may use either name (it was "the model has no layer named 'dec'")
    named = lowbit.quantize(Tied(), [{"quant_types": ["weight"], "quant_bits": 4, "op_names": ["dec"]}], "qat")
    assert isinstance(named.enc, QuantWrapper) and named.dec is named.enc
    cfg_list = [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Linear"]}, {"exclude": True, "op_names": ["dec"]}]
    with pytest.raises(ConfigError, match="every selected layer is excluded"):
        lowbit.quantize(Tied(), cfg_list, "qat")


@pytest.mark.parametrize("method", METHODS)
def test_a_state_saved_at_other_bits_is_refused_on_load(method):
    # nothing in a quantizer's ranges or steps says which grid they belong to: an 8-bit state loaded
    # into a 4-bit model used to load silently (zero points past the 4-bit codes, steps 16x too fine)
    src = lowbit.quantize(VAE(), cfg(bits=8), method)
    train(src, steps=1)
    state = src.state_dict()
    dst = lowbit.quantize(VAE(), cfg(bits=4), method)
    with pytest.raises(RuntimeError, match=r"fc1\.weight_quantizer: the state was saved from a grid with codes "
                                           r"\[-?\d+, \d+\] and this quantizer's are \[-?\d+, [17]\] \(4b"):
        dst.load_state_dict(state)
    # same grid: loads; a state saved before lowbit recorded the codes (no code_range) loads too
    same = lowbit.quantize(VAE(), cfg(bits=8), method)
    same.load_state_dict(state)
    legacy = {k: v for k, v in state.items() if not k.endswith("code_range")}
    lowbit.quantize(VAE(), cfg(bits=8), method).load_state_dict(legacy)


@pytest.mark.parametrize("method, saved, loaded", [
    ("qat", "uint", "int"), ("qat", "int", "uint"), ("ptq", "uint", "int"), ("lsq", "int", "uint"),
])
def test_a_state_of_other_signedness_is_refused_on_load(method, saved, loaded):
    # same bits, other codes: a uint state's zero point 116 fits [-128, 127] too, and loaded silently
    def make(dtype):
        return lowbit.quantize(VAE(), cfg(quant_dtype={"input": dtype}), method)

    src = make(saved)
    train(src, steps=1)
    if method == "ptq":
        lowbit.calibrate(src, [torch.rand(8, 1, 28, 28)])
    with pytest.raises(RuntimeError, match=r"input_quantizer: the state was saved from a grid with codes"):
        make(loaded).load_state_dict(src.state_dict())
    make(saved).load_state_dict(src.state_dict())


def test_an_old_state_loads_into_a_model_made_on_the_meta_device():
    # a state without code_range (lowbit < 0.3.6) into a model built on "meta": after to_empty the
    # record was uninitialised memory, with assign=True a meta tensor; now a fresh, right one
    src = lowbit.quantize(VAE(), cfg(), "qat")
    train(src, steps=1)
    legacy = {k: v for k, v in src.state_dict().items() if not k.endswith("code_range")}
    for assign in (False, True):
        with torch.device("meta"):
            m = VAE()
        lowbit.quantize(m, cfg(), "qat")
        if not assign:
            m.to_empty(device="cpu")
        m.load_state_dict(legacy, assign=assign)
        m.to("cpu")
        assert m.fc1.input_quantizer.code_range.tolist() == [0, 255]
        assert m.fc1.weight_quantizer.code_range.tolist() == [-128, 127]
        lowbit.quantize(VAE(), cfg(), "qat").load_state_dict(m.state_dict())


def test_a_state_of_another_quant_scheme_is_refused_on_load():
    src = lowbit.quantize(VAE(), cfg(types=("input",)), "qat")
    train(src, steps=1)
    state = src.state_dict()
    assert any(int(v) != 0 for k, v in state.items() if k.endswith("input_quantizer.zero_point"))
    dst = lowbit.quantize(VAE(), cfg(types=("input",), quant_scheme="symmetric", quant_dtype="uint"), "qat")
    # (the same codes [0, 255]: the zero points tell the affine state apart, old states too)
    for st in (state, {k: v for k, v in state.items() if not k.endswith("code_range")}):
        with pytest.raises(RuntimeError, match=r"input_quantizer: the state's zero points .* do not fit"):
            dst.load_state_dict(st)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_channel_weights_of_a_model_cast_to_half_precision_before_quantizing(method, dtype):
    # the quantizers' float32 grid used to turn a bfloat16 weight into float32 (F.linear then refused)
    gran = "per_tensor" if method == "dorefa" else "per_channel"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).to(dtype)
    entry = {"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"], "granularity": {"weight": gran}}
    lowbit.quantize(model, [entry], method)
    x = torch.randn(5, 16, dtype=dtype)
    y = model(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert model[0].module.weight.grad.dtype == dtype
    wq = model[0].weight_quantizer
    assert wq(model[0].module.weight).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_lsq_step_gradient_of_a_half_precision_tensor_is_summed_in_float32(dtype, granularity):
    # the step's gradient is a difference of two whole-tensor sums: in bfloat16 it was ~30% off
    from lowbit.fake_quant import lsq_fake_quantize

    torch.manual_seed(0)
    x = torch.randn(64, 256).to(dtype)
    axis = 0 if granularity == "per_channel" else None
    scale = torch.full((64,) if axis == 0 else (), 0.05, requires_grad=True)
    g = torch.randn(64, 256).to(dtype)
    lsq_fake_quantize(x, scale, None, -8, 7, 1.0, axis).backward(g)
    ref_scale = scale.detach().double().requires_grad_(True)
    lsq_fake_quantize(x.double(), ref_scale, None, -8, 7, 1.0, axis).backward(g.double())
    assert torch.allclose(scale.grad.double(), ref_scale.grad, rtol=2e-2, atol=1e-3)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))


MLP_CFG = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"]}]


def test_lsq_trains_under_bfloat16_autocast():
    # the fused first layer's bfloat16 output sent a bfloat16 gradient into its float32 backward
    from lowbit import kernels

    results = []
    for ctx in (contextlib.nullcontext, kernels.disabled):
        with ctx():
            m = lowbit.quantize(_mlp(), MLP_CFG, "lsq")
            g = torch.Generator().manual_seed(0)
            for _ in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = m(torch.rand(16, 20, generator=g))
                out.float().sum().backward()
            results.append(m[0].input_quantizer.scale.grad.clone())
    assert torch.isfinite(results[0]) and torch.allclose(results[0], results[1], rtol=1e-3)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("method, options", [("qat", {}), ("qat", {"quant_start_step": 2}), ("lsq", {}), ("ptq", {})])
def test_activation_checkpointing_neither_advances_the_state_again_nor_changes_the_grid(method, options, reentrant):
    # the recomputed forward ran in the backward pass as a second training forward: QAT's EMA moved
    # twice, quant_start_step counted twice, the backward used the moved grid, LSQ's first step
    # recomputed on another path (checkpoint refused its saved tensors)
    from torch.utils.checkpoint import checkpoint

    def run(ckpt):
        m = lowbit.quantize(_mlp(), MLP_CFG, method, **options)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x = (torch.rand(16, 20, generator=g) * 3).requires_grad_(reentrant)  # (reentrant needs one)
            h = checkpoint(m[0], x, use_reentrant=reentrant) if ckpt else m[0](x)
            m[2](m[1](h)).square().sum().backward()
        state = {k: v.clone() for k, v in m.state_dict().items()}
        return state, [p.grad.clone() for p in m.parameters()]

    (plain, plain_grads), (ckpt, ckpt_grads) = run(False), run(True)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        assert torch.equal(plain[k], ckpt[k]), k
    for a, b in zip(plain_grads, ckpt_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["qat", "ptq", "lsq"])
def test_a_state_copied_tensor_by_tensor_is_the_one_used(method):
    # an EMA / teacher copy updated in place (timm's ModelEmaV2 style): the quantizers kept using
    # their own Python copy of the ranges (off by 0.29), or raised NotCalibratedError
    m = lowbit.quantize(_mlp(), MLP_CFG, method)
    ema = copy.deepcopy(m)  # before any data: uncalibrated
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        m(torch.rand(16, 20, generator=g) * 5).sum().backward()
        if method == "ptq":
            lowbit.calibrate(m, [torch.rand(16, 20, generator=g) * 5])
        with torch.no_grad():
            for e, v in zip(ema.state_dict().values(), m.state_dict().values()):
                e.copy_(v)
    m.eval()
    ema.eval()
    x = torch.rand(4, 20, generator=g) * 5
    assert torch.equal(ema(x), m(x))
    # a dtype change replaces the buffers (not written in place): the ranges are kept
    m.train()
    m(torch.rand(16, 20, generator=g) * 7)
    m.eval()
    want = m(x)
    m.double()
    assert torch.allclose(m(x.double()).float(), want, atol=1e-5)


def test_calibrate_names_the_fix_for_batches_of_inputs_and_targets():
    model = lowbit.quantize(VAE(), cfg(), "ptq")
    batches = [(torch.rand(8, 784), torch.zeros(8))]  # what a DataLoader over a TensorDataset yields
    with pytest.raises(TypeError, match=r"a tuple of 2 .*forward=lambda model, batch: model\(batch\[0\]\)"):
        lowbit.calibrate(model, batches)
    lowbit.calibrate(model, batches, forward=lambda m, b: m(b[0]))


@pytest.mark.parametrize("variant", ["scaled", "paper", "learned"])
def test_load_calibration_config_reads_nnis_dorefa_export(variant):
    # NNI's DoReFa export holds only the bits: the fixed variants' grids come from the weights
    model = lowbit.quantize(VAE(), cfg(types=("weight",)), "dorefa", dorefa_variant=variant)
    nni = {name: {"weight_bits": 8} for name in STUDY}
    if variant == "learned":
        with pytest.raises(lowbit.config.ConfigError, match="no weight_scale.*dorefa_variant 'paper'"):
            lowbit.load_calibration_config(model, nni)
    else:
        lowbit.load_calibration_config(model, nni)


def test_load_calibration_config_names_dorefas_fix_only_for_dorefa():
    model = lowbit.quantize(VAE(), cfg(types=("weight",)), "lsq")
    with pytest.raises(lowbit.config.ConfigError, match="no weight_scale.*LSQQuantizer") as info:
        lowbit.load_calibration_config(model, {name: {"weight_bits": 8} for name in STUDY})
    assert "dorefa" not in str(info.value).lower()


def test_load_calibration_config_checks_but_does_not_load_weight_grids_from_weights():
    # NNI's QAT export: unsigned weight codes (zero point 162); the layer's grid comes from its weights
    nni = {"fc1": {"weight_bits": 8, "weight_scale": 0.0039, "weight_zero_point": 162.0,
                   "input_bits": 8, "tracked_min_input": 0.0, "tracked_max_input": 1.0}}
    model = lowbit.quantize(VAE(), cfg(layers=["fc1"]), "qat")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lowbit.config.ConfigError, match=r"weight_zero_point 162 lies outside the codes \[-128, 127\].*'uint'"):
        lowbit.load_calibration_config(model, nni)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model = lowbit.quantize(VAE(), cfg(layers=["fc1"], quant_dtype={"weight": "uint"}), "qat")
    wstate = {k: v.clone() for k, v in model.fc1.weight_quantizer.state_dict().items()}
    lowbit.load_calibration_config(model, nni)
    assert all(torch.equal(wstate[k], v) for k, v in model.fc1.weight_quantizer.state_dict().items())
    assert model.fc1.input_quantizer.grid().scale.item() == pytest.approx(1 / 255, rel=1e-6)
    lowbit.quantize(VAE(), cfg(layers=["fc1"], quant_dtype={"weight": "uint"}), "qat").load_state_dict(model.state_dict())


@pytest.mark.parametrize("bad,message", [
    ({"input_scale": 0.0}, "input_scale must be finite and positive"),
    ({"input_scale": -0.01}, "input_scale must be finite and positive"),
    ({"input_scale": float("nan")}, "input_scale must be finite and positive"),
    ({"input_zero_point": 999}, r"input_zero_point 999 lies outside the codes \[-?\d+, \d+\]"),
    ({"input_bits": "8"}, "input_bits must be an integer, got '8'"),
])
@pytest.mark.parametrize("method", ["qat", "lsq"])
def test_load_calibration_config_refuses_invalid_values_and_changes_nothing(method, bad, message):
    model = lowbit.quantize(VAE(), cfg(), method)
    train(model, steps=1)
    calib = lowbit.calibration_config(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lowbit.config.ConfigError, match=message):
        lowbit.load_calibration_config(model, {**calib, "fc3": {**calib["fc3"], **bad}})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_calibration_config_refuses_malformed_calibrations():
    model = lowbit.quantize(VAE(), cfg(layers=["fc1"]), "qat")
    with pytest.raises(lowbit.config.ConfigError, match="a calibration is a mapping.*not list"):
        lowbit.load_calibration_config(model, [{"fc1": {}}])
    with pytest.raises(lowbit.config.ConfigError, match="calibration of 'fc1' must be a mapping.*int 5"):
        lowbit.load_calibration_config(model, {"fc1": 5})
    nni = {"fc1": {"weight_bits": 8, "input_bits": 8, "tracked_min_input": 2.0, "tracked_max_input": 1.0}}
    with pytest.raises(lowbit.config.ConfigError, match="not a finite range"):
        lowbit.load_calibration_config(model, nni)


@pytest.mark.parametrize("reparam", ["weight_norm", "spectral_norm", "prune"])
def test_fold_bakes_a_reparametrized_weight(reparam):
    # the folded copy kept the pre-hook, which then failed to assign over the quantized weight
    # (TypeError); after a training pass deepcopy itself refused the hook's non-leaf weight
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    if reparam == "weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.nn.utils.weight_norm(m[0])
    elif reparam == "spectral_norm":
        torch.nn.utils.spectral_norm(m[0])
    else:
        torch.nn.utils.prune.l1_unstructured(m[0], "weight", amount=0.5)
    lowbit.quantize(m, [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Linear"]}], "qat")
    x = torch.randn(32, 8)
    m(x).sum().backward()  # a training pass (with gradients)
    m.eval()
    with torch.no_grad():
        want = m(x)
    folded = lowbit.fold(m)
    assert isinstance(folded[0], nn.Linear) and isinstance(folded[0]._parameters["weight"], nn.Parameter)
    assert not folded[0]._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(folded(x), want)


def test_transformer_encoder_layers_stay_quantized_in_eval_without_gradients():
    # nn.TransformerEncoderLayer's fused inference path (eval, no grad) read linear1/linear2's weights
    # itself and never called the quantized layers: inference and lowbit.calibrate ran in float
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    cfg = [{"quant_types": ["input", "weight"], "quant_bits": 4, "op_types": ["Linear"]}]
    ref = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    with pytest.warns(UserWarning, match="MultiheadAttention"):  # (its projections stay float)
        m = lowbit.quantize(copy.deepcopy(ref), cfg, "qat")
    m.train()(x)
    m.eval()
    with torch.no_grad():
        fast, plain = m(x), ref(x)
    assert not torch.allclose(fast, plain, atol=1e-3)  # quantized, not the float layer
    assert torch.allclose(fast, m(x).detach(), atol=1e-5)  # as with gradients (the module-by-module path)
    # calibrate (no gradients, eval mode) reaches the quantizers; so does an encoder's padded batch
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        enc = lowbit.quantize(nn.TransformerEncoder(copy.deepcopy(ref), 2, enable_nested_tensor=True), cfg, "ptq")
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.calibrate(enc, [x], forward=lambda model, b: model(b, src_key_padding_mask=mask))
    for layer in enc.layers:
        assert layer.linear2.input_quantizer.grid().scale > 0
    with torch.no_grad():
        out = enc.eval()(x, src_key_padding_mask=mask)
    assert out.shape == x.shape and not out.is_nested


def test_calibrate_warns_about_quantizers_that_saw_no_batch():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x)  # (b: never called)

    cfg = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}]
    model = lowbit.quantize(Branchy(), cfg, "ptq")
    with pytest.warns(UserWarning, match=r"ran 1 batch\(es\).*: b\.input\. Their layers were not called") as caught:
        lowbit.calibrate(model, [torch.randn(8, 4)])
    assert caught[0].filename == __file__  # (the caller's line)
    with pytest.warns(UserWarning, match=r"ran 0 batch.*a\.input, b\.input\. Give it batches"):
        lowbit.calibrate(lowbit.quantize(Branchy(), cfg, "lsq"), iter(()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.calibrate(lowbit.quantize(Branchy(), [{"quant_types": ["input"], "quant_bits": 8, "op_names": ["a"]}], "qat"),
                         [torch.randn(8, 4)])


def test_a_loaded_calibration_quantizes_past_quant_start_step():
    # load_calibration_config restored the grids but not QAT's step count: a fresh copy with
    # quant_start_step kept computing in float (and export refused it)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    c = [{"quant_types": ["input", "weight"], "quant_bits": 4, "op_types": ["Linear"], "quant_start_step": 2}]
    m = lowbit.quantize(copy.deepcopy(base), c, "qat")
    x = torch.randn(32, 8)
    for _ in range(4):
        m.train()(x)
    with torch.no_grad():
        want = m.eval()(x)
    copy_ = lowbit.quantize(copy.deepcopy(base), c, "qat")
    lowbit.load_calibration_config(copy_, json.loads(json.dumps(lowbit.calibration_config(m))))
    assert all(q.float_steps_left() == 0 for w in quantized_layers(copy_).values() for q in w.quantizers().values())
    with torch.no_grad():
        assert torch.equal(copy_.eval()(x), want)
    # (a failed load leaves the step counts as they were too)
    fresh = lowbit.quantize(copy.deepcopy(base), c, "qat")
    bad = {**lowbit.calibration_config(m), "2": {"weight_bits": 3}}
    with pytest.raises(ConfigError):
        lowbit.load_calibration_config(fresh, bad)
    assert fresh[0].input_quantizer.float_steps_left() == 2


def test_fold_adds_the_bias_the_layer_adds():
    torch.manual_seed(0)
    m = lowbit.quantize(nn.Sequential(nn.Linear(8, 6)), [{"quant_types": ["input", "weight"], "quant_bits": 4,
                                                         "op_types": ["Linear"]}], "ptq")
    lowbit.calibrate(m, [torch.rand(16, 8)])
    step = m[0].input_quantizer.grid().scale * m[0].weight_quantizer.grid().scale
    plain = lowbit.fold(m)
    assert torch.equal(plain[0].bias, torch.round(m[0].module.bias / step) * step)
    x = torch.zeros(3, 8)  # (zero inputs: the output is the bias)
    with torch.no_grad():
        assert torch.equal(plain(x), m.eval()(x))


def test_fold_rounds_the_bias_with_the_grids_the_layer_will_use():
    # fold took the input step of the layer's last call: none in train mode right after QAT's float steps
    torch.manual_seed(0)
    c = [{"quant_types": ["input", "weight"], "quant_bits": 4, "op_types": ["Linear"], "quant_start_step": 2}]
    a = lowbit.quantize(nn.Sequential(nn.Linear(8, 6)), c, "qat")
    for _ in range(2):
        a(torch.rand(16, 8) * 3)
    with torch.no_grad():
        a.eval()(torch.rand(4, 8))  # (an evaluation: the weights' grid; the last training call stays a float one)
    for model in (a.train(), a.eval()):
        folded = lowbit.fold(model)
        step = model[0].input_quantizer.grid().scale * model[0].weight_quantizer.grid().scale
        assert torch.equal(folded[0].bias, torch.round(model[0].module.bias / step) * step)
