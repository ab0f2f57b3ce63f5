"""NNI config lists -> validated LayerSpecs, and every error a user can make."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import ConfigError, LayerSpec, TensorSpec, parse_config, quantizable_layers
from lowbit.methods import METHODS, Method
from lowbit.models.vae import VAE

STUDY_LAYERS = ["fc1", "fc21", "fc22", "fc3"]

# the six config lists of the reference study, verbatim (docs in ../shared/SEED_STUDY.md)
SEED_CONFIGS = {
    ("qat", "C0"): [{"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}, "op_names": ["fc1", "fc21", "fc22", "fc3"]}],
    ("qat", "C1"): [{"quant_types": ["input", "weight"], "quant_bits": {"input": 4, "weight": 4}, "op_names": ["fc1", "fc21", "fc22", "fc3"]}],
    ("dorefa", "C0"): [{"quant_types": ["weight"], "quant_bits": {"weight": 8}, "op_types": ["Linear"]}],
    ("dorefa", "C1"): [{"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_types": ["Linear"]}],
    ("lsq", "C0"): [{"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8}, "op_names": ["fc1", "fc21", "fc22", "fc3"]}],
    ("lsq", "C1"): [{"quant_types": ["input", "weight"], "quant_bits": {"input": 4, "weight": 4}, "op_names": ["fc1", "fc21", "fc22", "fc3"]}],
}


class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 3 * 3, 10))

    def forward(self, x):
        return self.head(self.conv2(self.act(self.conv1(x))))


@pytest.mark.parametrize("key", sorted(SEED_CONFIGS))
def test_the_six_seed_configs_parse_verbatim(key):
    method, name = key
    bits = 8 if name == "C0" else 4
    specs = parse_config(SEED_CONFIGS[key], VAE(), method)
    if method == "dorefa":
        assert list(specs) == ["fc1", "fc21", "fc22", "fc3", "fc4"]
        assert all(s.input is None for s in specs.values())
    else:
        assert list(specs) == STUDY_LAYERS
        assert all(s.input.bits == bits for s in specs.values())
    for s in specs.values():
        assert isinstance(s, LayerSpec) and isinstance(s.weight, TensorSpec)
        assert s.weight.bits == bits and s.method == method and s.op_type == "Linear"
        assert s.output is None


def test_defaults_per_method():
    cfg = SEED_CONFIGS[("qat", "C0")]
    qat = parse_config(cfg, VAE(), "qat")["fc1"]
    assert (qat.weight.scheme, qat.weight.dtype, qat.weight.granularity) == ("affine", "int", "per_tensor")
    assert (qat.input.scheme, qat.input.dtype) == ("affine", "uint")
    assert qat.options == {"weight_range": "full", "bias_quant": "int32", "quant_start_step": 0, "ema_decay": 0.99}
    lsq = parse_config(cfg, VAE(), "lsq")["fc1"]
    assert (lsq.weight.scheme, lsq.input.scheme, lsq.input.dtype) == ("symmetric", "symmetric", None)
    ptq = parse_config(cfg, VAE(), "ptq")["fc1"]
    assert (ptq.weight.scheme, ptq.input.scheme) == ("symmetric", "affine")


def test_op_types_default_and_conv_model():
    model = SmallConv()
    assert list(quantizable_layers(model)) == ["conv1", "conv2", "head.1"]
    specs = parse_config([{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["default"]}], model, "qat")
    assert list(specs) == ["conv1", "conv2", "head.1"]
    specs = parse_config([{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Conv2d"]}], model, "lsq")
    assert list(specs) == ["conv1", "conv2"] and specs["conv1"].op_type == "Conv2d"


def test_later_entries_override_and_exclude():
    cfg = [
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"]},
        {"quant_types": ["weight", "input"], "quant_bits": {"weight": 4, "input": 6}, "op_names": ["fc1"]},
        {"exclude": True, "op_names": ["fc4"]},
    ]
    specs = parse_config(cfg, VAE(), "qat")
    assert list(specs) == STUDY_LAYERS
    assert specs["fc1"].weight.bits == 4 and specs["fc1"].input.bits == 6 and specs["fc1"].entry == 1
    assert specs["fc21"].weight.bits == 8 and specs["fc21"].input is None
    # a later entry can bring an excluded layer back
    specs = parse_config(cfg + [{"quant_types": ["weight"], "quant_bits": 2, "op_names": ["fc4"]}], VAE(), "qat")
    assert specs["fc4"].weight.bits == 2


def test_per_type_scheme_dtype_granularity_and_options():
    cfg = [
        {
            "quant_types": ["weight", "input", "output"],
            "quant_bits": {"weight": 4, "input": 8, "output": 8},
            "quant_scheme": {"weight": "per_channel_symmetric", "input": "per_tensor_affine"},
            "quant_dtype": {"output": "int"},
            "op_names": ["fc1"],
            "quant_start_step": 5,
            "weight_range": "reduced",
        }
    ]
    s = parse_config(cfg, VAE(), "qat", {"ema_decay": 0.9})["fc1"]
    assert (s.weight.granularity, s.weight.scheme, s.weight.reduced, s.weight.range_bits) == ("per_channel", "symmetric", True, 3)
    assert (s.input.scheme, s.output.dtype) == ("affine", "int")
    assert s.options["quant_start_step"] == 5 and s.options["ema_decay"] == 0.9
    s = parse_config([{**cfg[0], "quant_scheme": "affine", "granularity": {"weight": "per_channel"}}], VAE(), "qat")["fc1"]
    assert s.weight.granularity == "per_channel" and s.weight.scheme == "affine"


def _err(cfg, method="qat", model=None, **options):
    with pytest.raises(ConfigError) as e:
        parse_config(cfg, model if model is not None else VAE(), method, options)
    return str(e.value)


W8 = {"quant_types": ["weight"], "quant_bits": 8}


def test_error_unknown_key_lists_the_accepted_keys():
    msg = _err([{**W8, "op_types": ["Linear"], "quant_start": 3}])
    assert "'quant_start'" in msg and "quant_start_step" in msg and "op_names" in msg
    msg = _err([{**W8, "op_types": ["Linear"], "quant_start_step": 3}], "lsq")
    assert "option of qat" in msg
    assert "unknown" in _err([{**W8, "op_types": ["Linear"]}], "qat", bogus=1)
    # a config-list key given as a method option says where it belongs
    msg = _err([{**W8, "op_types": ["Linear"]}], "qat", quant_bits=4)
    assert "'quant_bits' belongs in a config_list entry" in msg and "quant_start_step" in msg


def test_error_layer_name_that_does_not_exist_lists_valid_names():
    msg = _err([{**W8, "op_names": ["fc5"]}])
    assert "'fc5'" in msg and "fc1 (Linear)" in msg and "fc4 (Linear)" in msg
    msg = _err([{**W8, "op_names": ["act"]}], model=SmallConv())
    assert "ReLU" in msg and "conv1 (Conv2d)" in msg


@pytest.mark.parametrize("bits", [0, 17, -1, 8.0, True, "8"])
def test_error_bits_outside_1_to_16(bits):
    msg = _err([{"quant_types": ["weight"], "quant_bits": bits, "op_names": ["fc1"]}])
    assert "quant_bits" in msg


def test_numpy_integer_bits_are_integers():
    import numpy as np

    specs = parse_config([{"quant_types": ["weight"], "quant_bits": np.int64(4), "op_names": ["fc1"]}], VAE(), "qat")
    assert specs["fc1"].weight.bits == 4 and type(specs["fc1"].weight.bits) is int


def test_error_quant_types():
    assert "'bias'" in _err([{"quant_types": ["bias"], "quant_bits": 8, "op_names": ["fc1"]}])
    assert "missing 'quant_types'" in _err([{"quant_bits": 8, "op_names": ["fc1"]}])
    assert "missing 'quant_bits'" in _err([{"quant_types": ["weight"], "op_names": ["fc1"]}])
    msg = _err([{"quant_types": ["weight", "input"], "quant_bits": {"weight": 8}, "op_names": ["fc1"]}])
    assert "['input']" in msg
    msg = _err([{"quant_types": ["weight"], "quant_bits": {"weight": 8, "input": 8}, "op_names": ["fc1"]}])
    assert "not in this entry's quant_types" in msg


def test_error_quant_type_the_method_cannot_do():
    class WeightOnly(Method):
        name = "weight_only_test"
        quant_types = ("weight",)

    METHODS[WeightOnly.name] = WeightOnly
    try:
        msg = _err([{"quant_types": ["input"], "quant_bits": 8, "op_names": ["fc1"]}], WeightOnly.name)
        assert "cannot quantize 'input'" in msg
    finally:
        del METHODS[WeightOnly.name]
    # schemes / granularities / widths a method cannot do
    assert "cannot be per_channel" in _err([{**W8, "op_names": ["fc1"], "granularity": "per_channel"}], "dorefa")
    assert "lsq_plus" in _err([{"quant_types": ["input"], "quant_bits": 8, "op_names": ["fc1"], "quant_scheme": "affine"}], "lsq")
    assert "at least 2 bits" in _err([{"quant_types": ["weight"], "quant_bits": 1, "op_names": ["fc1"]}], "lsq")
    assert "cannot be per_channel" in _err([{"quant_types": ["input"], "quant_bits": 8, "op_names": ["fc1"], "granularity": "per_channel"}])
    assert "quant_dtype" in _err([{**W8, "op_names": ["fc1"], "quant_dtype": "uint"}], "lsq")
    assert "weight_range" in _err([{**W8, "op_names": ["fc1"], "dorefa_variant": "paper", "weight_range": "reduced"}], "dorefa")
    assert "contradicts" in _err([{**W8, "op_names": ["fc1"], "quant_scheme": "per_tensor_affine", "granularity": "per_channel"}])


def test_error_op_types():
    assert "match no layer" in _err([{**W8, "op_types": ["Conv2d"]}])
    assert "unknown op type 'Linearr'" in _err([{**W8, "op_types": ["Linearr"]}])
    assert "cannot quantize 'ReLU'" in _err([{**W8, "op_types": ["ReLU"]}], model=SmallConv())
    assert "select no layer together" in _err([{**W8, "op_types": ["Conv2d"], "op_names": ["head.1"]}], model=SmallConv())
    assert "give 'op_types' or 'op_names'" in _err([W8])


def test_error_shapes_and_options():
    assert "list of dicts" in _err({"quant_types": ["weight"]})
    assert "empty" in _err([])
    assert "must be a dict" in _err(["fc1"])
    assert "excluded" in _err([{**W8, "op_names": ["fc1"]}, {"exclude": True, "op_names": ["fc1"]}])
    assert "exclude entry takes only" in _err([{**W8, "op_names": ["fc1"], "exclude": True}])
    assert "quant_start_step" in _err([{**W8, "op_names": ["fc1"], "quant_start_step": -1}])
    assert "ema_decay" in _err([{**W8, "op_names": ["fc1"], "ema_decay": 1.0}])
    assert "gradient_bits" in _err([{**W8, "op_names": ["fc1"], "gradient_bits": 0}], "dorefa")
    assert "unknown method 'nni'" in _err([{**W8, "op_names": ["fc1"]}], "nni")
    # a list where a scheme name belongs (it used to be a raw TypeError: unhashable type)
    assert "quant_scheme ['affine'] for 'weight'; choose from" in _err([{**W8, "op_names": ["fc1"], "quant_scheme": ["affine"]}])
    assert "quant_scheme ['affine'] for 'weight'" in _err([{**W8, "op_names": ["fc1"], "quant_scheme": {"weight": ["affine"]}}])


def test_error_already_quantized():
    model = lowbit.quantize(VAE(), [{**W8, "op_names": ["fc1"]}], "qat")
    assert "already quantized" in _err([{**W8, "op_names": ["fc1"]}], model=model)
    # the remaining layers can still be quantized, the wrapped one is not offered again
    assert "fc1" not in quantizable_layers(model)
    lowbit.quantize(model, [{**W8, "op_types": ["Linear"]}], "qat")
    assert sum(isinstance(m, lowbit.modules.QuantWrapper) for m in model.modules()) == 5
    # selecting by type on a model whose layers of that type are all quantized says so
    msg = _err([{**W8, "op_types": ["Linear"]}], model=model)
    assert "already quantized" in msg and "'fc1', 'fc21', 'fc22', 'fc3', 'fc4' are" in msg
    # the float layer inside a wrapper is not a layer to quantize again
    assert "'fc1.module' is the layer inside 'fc1', which is already quantized" in _err(
        [{**W8, "op_names": ["fc1.module"]}], model=model)


def test_config_errors_come_before_any_change_to_the_model():
    model = VAE()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):
        lowbit.quantize(model, [{**W8, "op_names": ["fc1"]}, {**W8, "op_names": ["nope"]}], "qat")
    assert isinstance(model.fc1, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_exclude_false_is_ambiguous():
    # NNI excludes a layer whenever the key is present (even False); lowbit quantized it
    assert "'exclude': False is ambiguous" in _err([{**W8, "op_names": ["fc1"], "exclude": False}])


def test_default_op_types_warn_about_the_layers_nni_would_also_take():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 4), nn.ConvTranspose1d(4, 4, 3))
    with pytest.warns(UserWarning, match="ConvTranspose1d, Embedding layers, which NNI's 'default' also took, stay float"):
        specs = parse_config([{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]}], model, "qat")
    assert list(specs) == ["1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_config([{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["default"]}], nn.Sequential(nn.Linear(8, 4)), "qat")


def test_attention_projections_left_float_are_named():
    # nn.MultiheadAttention's projections are weights its forward uses directly (out_proj, a Linear
    # subclass, is never called): op_types Linear quantized the feed-forward layers only, silently
    model = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    for types in (["Linear"], ["default"]):
        with pytest.warns(UserWarning, match=r"MultiheadAttention modules \(self_attn\) stay float"):
            specs = parse_config([{"quant_types": ["weight"], "quant_bits": 8, "op_types": types}], model, "qat")
        assert list(specs) == ["linear1", "linear2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (layers named: the attention is not among them, nothing to say)
        parse_config([{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"], "op_names": ["linear1"]}],
                     model, "qat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no attention in the layers it selects: nothing to say)
        parse_config([{"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Conv2d"]}],
                     nn.Sequential(nn.Conv2d(1, 1, 1), nn.MultiheadAttention(4, 1)), "qat")
