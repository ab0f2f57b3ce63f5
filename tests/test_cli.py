import json
import subprocess
import sys

import pytest

from lowbit.cli import build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("train", "study", "export", "bench"):
        assert cmd in out
    for cmd in ("train", "study", "export", "bench"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage: lowbit " + cmd in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [(["train", "--epochs", "0"], "positive integer"), (["train", "--batch-size", "-3"], "positive integer"),
     (["train", "--dataset", "cifar"], "invalid choice"), (["study", "--bits", "8,0"], "1..16"),
     (["study", "--seeds", "x"], "positive integer"), (["train", "--option", "dorefa_variant"], "KEY=VALUE"),
     (["train", "--lr", "-1"], "argument --lr: expected a positive number, got -1.0"),
     (["train", "--lr", "0"], "argument --lr: expected a positive number, got 0.0"),
     (["train", "--iwae-k", "-5"], "argument --iwae-k: expected an integer >= 0, got -5"),
     (["study", "--iwae-k", "-1"], "argument --iwae-k: expected an integer >= 0, got -1")],
)
def test_bad_arguments_are_refused_with_a_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "study"])
def test_an_unusable_device_is_refused_before_anything_runs(command, tmp_path, capsys):
    import torch

    bad = ["tpu", "cuda:99"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        assert main([command, "--device", device, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert f"device {device!r}" in err and ("cpu" in err or "cuda:0" in err), err
    assert not (tmp_path / "run").exists()


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--out", str(blocker / "run"), "--data-dir", str(tmp_path)]) == 2
    assert "cannot create output folder" in capsys.readouterr().err


def test_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_MIRROR", "http://127.0.0.1:9/")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)
    assert main(["train", "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "LOWBIT_DATA_DIR" in err
    assert not (tmp_path / "run").exists()  # the failed run left no empty folder


def test_config_without_method_is_refused(tmp_path, capsys):
    assert main(["train", "--config", "C0", "--out", str(tmp_path / "r")]) == 2
    assert "--config needs --method" in capsys.readouterr().err


def test_study_defaults_match_the_reference_protocol():
    from lowbit.study import StudyConfig

    cfg = StudyConfig.from_args(build_parser().parse_args(["study"]))
    assert cfg.methods == ("qat", "dorefa", "lsq") and cfg.bits == (8, 4)
    assert cfg.epochs == cfg.finetune_epochs == 10 and cfg.seeds == 1 and cfg.ptq and cfg.control
    quick = StudyConfig.from_args(build_parser().parse_args(["study", "--quick"]))
    assert quick.epochs == quick.finetune_epochs == 1
    twice = StudyConfig.from_args(build_parser().parse_args(["study", "--methods", "qat,LSQ,qat, lsq"]))
    assert twice.methods == ("qat", "lsq")  # (each planned once: it resumed "5 runs" for 2)
    assert StudyConfig.from_args(build_parser().parse_args(["study", "--bits", "8,4,8"])).bits == (8, 4)
    with pytest.raises(ValueError, match="--methods ',' names no method"):
        StudyConfig.from_args(build_parser().parse_args(["study", "--methods", ","]))
    assert StudyConfig.from_args(build_parser().parse_args(["study", "--methods", "ptq"])).ptq


def test_bench_help_states_its_thread_default(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "(default: 1, for every row alike)" in " ".join(capsys.readouterr().out.split())


def test_options_are_parsed_as_json_values_and_reach_the_study():
    from lowbit.study import StudyConfig

    args = build_parser().parse_args(["study", "--option", "dorefa_variant=paper", "--option", "quant_start_step=200"])
    cfg = StudyConfig.from_args(args)
    assert cfg.extra_options == {"dorefa_variant": "paper", "quant_start_step": 200}
    args = build_parser().parse_args(["train", "--method", "lsq", "--option", "lsq_plus=true"])
    assert args.option == [("lsq_plus", True)]
    args = build_parser().parse_args(["train", "--option", "lsq_plus=True", "--option", "gradient_bits=None"])
    assert args.option == [("lsq_plus", True), ("gradient_bits", None)]  # Python's spelling too


def test_unknown_method_is_named_and_nothing_written(tmp_path, capsys):
    assert main(["train", "--method", "foo", "--out", str(tmp_path / "r")]) == 2
    assert "unknown method 'foo'; known methods: dorefa, lsq, ptq, qat" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_study_option_for_no_studied_method_is_a_clear_error(capsys):
    assert main(["study", "--methods", "qat", "--option", "lsq_plus=true"]) == 2
    assert "belongs to none of the studied methods" in capsys.readouterr().err


def test_train_option_without_method_is_refused(tmp_path, capsys):
    assert main(["train", "--option", "lsq_plus=true", "--out", str(tmp_path / "r")]) == 2
    assert "--option needs --method" in capsys.readouterr().err


def _train(out, epochs):
    cmd = [sys.executable, "-m", "lowbit.cli", "train", "--epochs", str(epochs), "--seed", "0", "--threads", "1",
           "--no-progress", "--iwae-k", "8", "--out", str(out)]
    subprocess.run(cmd, check=True, timeout=900)
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_train_ten_epochs_reaches_the_reference_loss(tmp_path, mnist):
    metrics = _train(tmp_path / "fp32", 10)
    assert 104 <= metrics["after"]["loss"] <= 107, metrics["after"]
    assert metrics["after"]["iwae"] < metrics["after"]["loss"]
    assert len(metrics["train"]["epoch_seconds"]) == 10
    assert (tmp_path / "fp32" / "model.safetensors").is_file()


@pytest.mark.slow
def test_same_seed_same_loss(tmp_path, mnist):
    a = _train(tmp_path / "a", 1)
    b = _train(tmp_path / "b", 1)
    assert a["after"]["loss"] == b["after"]["loss"] and a["train"]["epoch_losses"] == b["train"]["epoch_losses"]
