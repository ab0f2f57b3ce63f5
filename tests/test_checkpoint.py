import json
import os

import pytest
import torch

from lowbit.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    ensure_dir,
    load_model,
    load_optimizer,
    load_state,
    save_optimizer,
    save_run,
)
from lowbit.models.vae import VAE
from lowbit.train import fit, make_optimizer


def test_save_and_load_round_trip(tmp_path, tiny_images):
    torch.manual_seed(0)
    model = VAE()
    fit(model, tiny_images, epochs=1, batch_size=128, progress=False)
    save_run(tmp_path / "run", model, model_spec={"name": "vae", "kwargs": {}}, extra={"seed": 0})
    loaded = load_model(tmp_path / "run")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert json.loads((tmp_path / "run" / "meta.json").read_text())["seed"] == 0


def test_a_run_keeps_its_meaning_when_a_default_changes(tmp_path, monkeypatch):
    from dataclasses import replace

    import lowbit
    from lowbit.methods import get_method

    cfg = [{"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_types": ["Linear"]}]
    quant = {"method": "dorefa", "config_list": cfg, "options": {}}
    torch.manual_seed(0)
    model = lowbit.quantize(VAE(), cfg, "dorefa")
    save_run(tmp_path / "run", model, model_spec={"name": "vae", "kwargs": {}}, quant=quant)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["quant"]["method_defaults"]["dorefa_variant"] == "learned" and meta["lowbit"] == lowbit.__version__
    # a later lowbit with another default still rebuilds the run as it was trained
    dorefa = get_method("dorefa")
    monkeypatch.setitem(dorefa.options, "dorefa_variant", replace(dorefa.options["dorefa_variant"], default="paper"))
    assert load_model(tmp_path / "run").fc1.weight_quantizer.variant == "learned"
    monkeypatch.undo()
    # a run saved before defaults were recorded (lowbit < 0.2.0) gets that version's default
    old = tmp_path / "old"
    scaled = lowbit.quantize(VAE(), cfg, "dorefa", dorefa_variant="scaled")
    save_run(old, scaled, model_spec={"name": "vae", "kwargs": {}}, quant=quant)
    meta = json.loads((old / "meta.json").read_text())
    del meta["quant"]["method_defaults"], meta["lowbit"], meta["weights_sha256"]  # none of them then
    (old / "meta.json").write_text(json.dumps(meta))
    from safetensors.torch import load_file, save_file

    save_file(load_file(old / "model.safetensors"), old / "model.safetensors")  # no digest in its header
    assert load_model(old).fc1.weight_quantizer.variant == "scaled"


def test_checkpoint_is_not_a_pickle(tmp_path):
    save_run(tmp_path, VAE(), model_spec={"name": "vae", "kwargs": {}})
    head = (tmp_path / "model.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80")  # pickle protocol marker
    header_len = int.from_bytes(head[:8], "little")
    assert json.loads((tmp_path / "model.safetensors").read_bytes()[8 : 8 + header_len])


def test_truncated_checkpoint_is_reported(tmp_path):
    save_run(tmp_path, VAE(), model_spec={"name": "vae", "kwargs": {}})
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state(tmp_path)


def test_missing_run_dir_is_explained(tmp_path):
    with pytest.raises(CheckpointError, match="not a lowbit run directory"):
        load_model(tmp_path / "nothing")


def test_optimizer_state_round_trip(tmp_path, tiny_images):
    torch.manual_seed(0)
    model = VAE()
    opt = make_optimizer(model)
    fit(model, tiny_images, epochs=1, batch_size=128, optimizer=opt, progress=False)
    save_optimizer(tmp_path, opt)
    opt2 = make_optimizer(model)
    assert load_optimizer(tmp_path, opt2)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        for name in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][name]), torch.as_tensor(s2[i][name]))


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"123")
    atomic_write_bytes(tmp_path / "a.bin", b"456")
    assert os.listdir(tmp_path) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"456"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_folder_is_explained(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(CheckpointError, match="not writable"):
        ensure_dir(ro)


def test_output_path_that_is_a_file_is_explained(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        ensure_dir(tmp_path / "f")
    with pytest.raises(CheckpointError, match="cannot create"):
        ensure_dir(tmp_path / "f" / "sub")


def _two_runs(tmp_path):
    import lowbit

    runs = {}
    for bits in (8, 4):
        cfg = [{"quant_types": ["weight"], "quant_bits": bits, "op_types": ["Linear"]}]
        torch.manual_seed(0)
        model = lowbit.quantize(VAE(), cfg, "lsq")
        runs[bits] = save_run(tmp_path / f"w{bits}", model, model_spec={"name": "vae", "kwargs": {}},
                              quant={"method": "lsq", "config_list": cfg, "options": {}})
    return runs


def test_weights_and_meta_vouch_for_each_other(tmp_path):
    import shutil

    runs = _two_runs(tmp_path)
    load_model(runs[4])
    # weights copied from the 8-bit run into the 4-bit one
    bad = tmp_path / "copied"
    shutil.copytree(runs[4], bad)
    shutil.copy(runs[8] / "model.safetensors", bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="not the file this run saved"):
        load_model(bad)
    # ... and with the digest dropped from meta.json, the weights' header still knows their config
    meta = json.loads((bad / "meta.json").read_text())
    del meta["weights_sha256"]
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not describe the model"):
        load_model(bad)
    # meta.json edited to other bits
    edited = tmp_path / "edited"
    shutil.copytree(runs[4], edited)
    meta = json.loads((edited / "meta.json").read_text())
    meta["quant"]["config_list"][0]["quant_bits"] = 2
    (edited / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not describe the model"):
        load_model(edited)
    # a block of the weights zeroed on disk (the header intact)
    damaged = tmp_path / "damaged"
    shutil.copytree(runs[4], damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-4000:-2000] = bytes(2000)
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_model(damaged)
    # meta.json that is not an object
    (damaged / "meta.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_model(damaged)


@pytest.mark.parametrize("field, value, message", [
    ("quant", "qat", "'quant' must be null or"),
    ("quant", {"config_list": []}, "'quant' must be null or"),
    ("model", "vae", "'model' must be"),
    ("model", {"name": "vae", "kwargs": [1]}, "'model' must be"),
    ("quant.options", [1], "'quant'.options must be an object"),
])
def test_a_malformed_meta_entry_is_named(tmp_path, field, value, message):
    # a run saved before 0.3.5 (no digests) is read unchecked: its meta.json's shape is checked
    # (AttributeError / KeyError tracebacks before)
    from safetensors.torch import load_file, save_file

    run = _two_runs(tmp_path)[4]
    save_file(load_file(run / "model.safetensors"), run / "model.safetensors")  # (no digest header)
    meta = json.loads((run / "meta.json").read_text())
    del meta["weights_sha256"]
    if "." in field:
        meta["quant"][field.split(".")[1]] = value
    else:
        meta[field] = value
    (run / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=f"meta.json: {message}.*restore it or retrain the run"):
        load_model(run)


def test_truncated_or_foreign_optimizer_state_is_reported(tmp_path, tiny_images):
    model = VAE()
    opt = make_optimizer(model)
    fit(model, tiny_images[:128], epochs=1, batch_size=64, optimizer=opt, progress=False)
    save_optimizer(tmp_path, opt)
    data = (tmp_path / "optimizer.safetensors").read_bytes()
    (tmp_path / "optimizer.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="unreadable or truncated.*; retrain the run it belongs to$"):
        load_optimizer(tmp_path, make_optimizer(model))
    save_run(tmp_path, model, model_spec={"name": "vae", "kwargs": {}})
    (tmp_path / "optimizer.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="holds no lowbit optimizer state"):
        load_optimizer(tmp_path, make_optimizer(model))


def test_a_run_whose_config_this_lowbit_refuses_is_a_checkpoint_error(tmp_path):
    # e.g. unsigned symmetric PTQ weights, accepted before 0.3.6 (they zeroed every negative weight)
    quant = {"method": "ptq", "config_list": [{"quant_types": ["weight"], "quant_bits": 8, "op_names": ["fc1"],
                                               "quant_dtype": "uint"}], "options": {}}
    save_run(tmp_path / "run", VAE(), model_spec={"name": "vae", "kwargs": {}}, quant=quant)
    with pytest.raises(CheckpointError, match=r"meta.json: this lowbit refuses the run's quantization config .*"
                                              r"quant_dtype 'uint'.*retrain the run"):
        load_model(tmp_path / "run")


def _as_saved_by(run: str, version: str) -> None:
    """Make ``run`` look saved by an older lowbit: its version in meta.json, and no version digest
    in the weights' header (those versions wrote none)."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from lowbit.checkpoint import VERSION_KEY

    weights = os.path.join(run, "model.safetensors")
    with safe_open(weights, framework="pt") as f:
        header = {k: v for k, v in (f.metadata() or {}).items() if k != VERSION_KEY}
    blob = save(load_file(weights), metadata=header)
    with open(weights, "wb") as f:
        f.write(blob)
    path = os.path.join(run, "meta.json")
    with open(path) as f:
        meta = json.load(f)
    meta["lowbit"] = version
    meta["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    with open(path, "w") as f:
        json.dump(meta, f)


def test_an_edited_lowbit_version_in_meta_is_caught(tmp_path):
    # the version says what the run's config meant (see _legacy_config): an edit would rebuild
    # another model than the one trained
    runs = _two_runs(tmp_path)
    load_model(runs[4])
    meta = json.loads((runs[4] / "meta.json").read_text())
    meta["lowbit"] = "0.3.7"
    (runs[4] / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lowbit version '0.3.7' is not the one that saved"):
        load_model(runs[4])


def test_runs_of_0_3_7_load_with_the_meaning_their_config_had(tmp_path):
    import lowbit

    # 0.3.7 made symmetric activations without quant_dtype unsigned (0.3.8: signed) and quantized
    # under 'exclude': False (0.3.8: refused); its runs load as they were trained
    saved = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"],
              "quant_scheme": {"input": "symmetric", "weight": "affine"}, "exclude": False}]
    built = [{**{k: v for k, v in saved[0].items() if k != "exclude"}, "quant_dtype": {"input": "uint"}}]
    model = lowbit.quantize(VAE(), built, "qat")
    lowbit.calibrate(model, [torch.rand(16, 784)])
    run = str(tmp_path / "run")  # (a str path too: its error branch used to fail on str / str)
    save_run(run, model, model_spec={"name": "vae", "kwargs": {}},
             quant={"method": "qat", "config_list": saved, "options": {}})
    with pytest.raises(CheckpointError, match="refuses the run's quantization config"):
        load_model(run)  # (recorded as 0.3.8's own: its config means what 0.3.8 reads)
    _as_saved_by(run, "0.3.7")
    loaded = load_model(run)
    assert loaded.fc1.input_quantizer.spec.dtype == "uint"
    x = torch.rand(4, 784)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x)[0], model.eval().encode(x)[0])


def test_runs_before_0_3_9_load_with_their_float_biases(tmp_path):
    import lowbit

    cfg = [{"quant_types": ["input", "weight"], "quant_bits": 4, "op_types": ["Linear"]}]
    model = lowbit.quantize(VAE(), cfg, "ptq", bias_quant="float")  # (what 0.3.8 simulated)
    lowbit.calibrate(model, [torch.rand(16, 784)])
    run = str(tmp_path / "run")
    save_run(run, model, model_spec={"name": "vae", "kwargs": {}},
             quant={"method": "ptq", "config_list": cfg, "options": {}})
    meta = json.loads(open(os.path.join(run, "meta.json")).read())
    del meta["quant"]["method_defaults"]["bias_quant"]  # (0.3.8 knew no such option)
    with open(os.path.join(run, "meta.json"), "w") as f:
        json.dump(meta, f)
    _as_saved_by(run, "0.3.8")
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    from lowbit.checkpoint import REBUILD_KEY, _rebuild_digest

    weights = os.path.join(run, "model.safetensors")  # (its digest of the edited meta, as 0.3.8 wrote it)
    blob = save(load_file(weights), metadata={REBUILD_KEY: _rebuild_digest(meta["model"], meta["quant"])})
    open(weights, "wb").write(blob)
    meta["weights_sha256"] = __import__("hashlib").sha256(blob).hexdigest()
    meta["lowbit"] = "0.3.8"
    json.dump(meta, open(os.path.join(run, "meta.json"), "w"))
    loaded = load_model(run)
    assert not loaded.fc1._round_bias
    x = torch.rand(4, 784)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x)[0], model.eval().encode(x)[0])


def test_a_null_quant_dtype_of_0_3_7_meant_unsigned_symmetric_activations():
    from lowbit.checkpoint import _legacy_config

    saved = [{"quant_types": ["input", "output", "weight"], "quant_bits": 8, "op_types": ["Linear"],
              "quant_scheme": "symmetric", "quant_dtype": {"input": None, "weight": "int"}}]
    entry = _legacy_config(saved, "qat", (0, 3, 7))[0]
    assert entry["quant_dtype"] == {"input": "uint", "output": "uint", "weight": "int"}
    assert _legacy_config(saved, "qat", (0, 3, 8)) == saved


def test_run_versions_parse_by_their_leading_numbers():
    from lowbit import __version__
    from lowbit.checkpoint import _version

    assert _version("0.3.10") > _version("0.3.8") > _version("0.3.7") > _version(None)
    assert _version("0.3.9rc1") == (0, 3, 9) and _version("0.4.0+cu121") == (0, 4, 0)
    assert _version("dev") == tuple(int(p) for p in __version__.split("."))  # (no number: this version)
