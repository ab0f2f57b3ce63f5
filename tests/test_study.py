import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.presets import REFERENCE
from lowbit.report import paired_stats, t95
from lowbit.study import StudyConfig, plan_runs


def test_default_plan_shares_one_baseline_per_seed():
    plan = plan_runs(StudyConfig(seeds=2))
    kinds = [r.kind for r in plan]
    assert kinds.count("baseline") == 2
    assert kinds.count("control") == 2
    assert kinds.count("quantized") == 2 * 3 * 2  # methods x bits per seed
    assert kinds.count("ptq") == 2 * 2
    for run in plan:
        if run.kind != "baseline":
            seed = run.spec.seed
            assert run.init == f"seed{seed}/fp32-baseline"
            assert plan.index(next(r for r in plan if r.folder == run.init)) < plan.index(run)


def test_reference_configs_are_used_verbatim():
    plan = plan_runs(StudyConfig())
    by_name = {r.folder: r for r in plan}
    for method in ("qat", "dorefa", "lsq"):
        assert by_name[f"seed0/{method}-w8"].spec.config_list == REFERENCE[(method, "C0")]
        assert by_name[f"seed0/{method}-w4"].spec.config_list == REFERENCE[(method, "C1")]


def test_reference_preset_trains_a_fresh_baseline_per_run():
    plan = plan_runs(StudyConfig(preset="reference", control=False, ptq=False))
    baselines = [r for r in plan if r.kind == "baseline"]
    quantized = [r for r in plan if r.kind == "quantized"]
    assert len(baselines) == len(quantized) == 6
    assert len({r.init for r in quantized}) == 6
    assert len({r.spec.seed for r in baselines}) == 6  # each baseline its own initialisation


def test_all_layers_and_low_bits_generalise_the_reference():
    plan = plan_runs(StudyConfig(methods=("lsq",), bits=(3, 2), layers="all", ptq=False))
    cfgs = [r.spec.config_list for r in plan if r.kind == "quantized"]
    assert cfgs[0][0]["quant_bits"] == {"input": 3, "weight": 3}
    assert cfgs[1][0]["op_types"] == ["Linear"] and "op_names" not in cfgs[1][0]


def test_run_key_changes_with_the_configuration():
    a = plan_runs(StudyConfig())
    b = plan_runs(StudyConfig(finetune_epochs=5))
    ka = {r.folder: r.spec.key("x") for r in a}
    kb = {r.folder: r.spec.key("x") for r in b}
    assert ka["seed0/lsq-w4"] != kb["seed0/lsq-w4"]
    assert a[0].spec.key() == b[0].spec.key()  # the baseline did not change
    assert a[1].spec.key("base1") != a[1].spec.key("base2")  # nor is a run reused across baselines
    # evaluation settings do not decide the trained model: such runs are re-evaluated, not retrained
    c = plan_runs(StudyConfig(iwae_k=5))
    assert {r.folder: r.spec.key("x") for r in c} == ka


def test_a_finished_run_is_reevaluated_with_new_evaluation_settings(tmp_path, tiny_images):
    from dataclasses import replace

    from lowbit.experiment import RunSpec, reevaluate, run_experiment
    from lowbit.study import _finished

    spec = RunSpec(name="fp32", epochs=1, batch_size=64, iwae_k=0)
    record = run_experiment(spec, tiny_images[:256], tiny_images[256:], tmp_path, progress=False)
    assert record["after"]["iwae"] is None
    more = replace(spec, iwae_k=4)
    found = _finished(tmp_path, more.key())
    assert found is not None  # the same trained model
    new = reevaluate(more, found, tiny_images[256:], tmp_path)
    assert new["spec"]["iwae_k"] == 4 and new["after"]["iwae"] is not None
    assert new["after"]["loss"] == record["after"]["loss"] and new["train"] == record["train"]
    assert _finished(tmp_path, more.key())["after"]["iwae"] == new["after"]["iwae"]  # written back


def test_run_key_changes_when_a_method_default_changes(monkeypatch):
    from dataclasses import replace

    from lowbit.methods import get_method

    run = next(r for r in plan_runs(StudyConfig()) if r.folder == "seed0/dorefa-w4")
    before = run.spec.key("x")
    dorefa = get_method("dorefa")
    opt = dorefa.options["dorefa_variant"]
    monkeypatch.setitem(dorefa.options, "dorefa_variant", replace(opt, default="scaled"))
    assert run.spec.key("x") != before  # an upgraded lowbit does not reuse the old default's run


@pytest.mark.parametrize(
    "kwargs, message",
    [({"methods": ("nni",)}, "unknown method"), ({"bits": (0,)}, "1..16"), ({"seeds": 0}, "seeds"),
     ({"methods": (), "ptq": False, "control": False}, "nothing to study")],
)
def test_study_config_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StudyConfig(**kwargs)


def test_paired_stats():
    s = paired_stats([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    half = t95(2) * 1.0 / 3**0.5
    assert s["ci95"] == pytest.approx([2 - half, 2 + half])
    assert s["significant"] is False  # t(2) is wide: 2 ± 2.48 includes 0
    assert paired_stats([1.0, 1.1, 0.9])["significant"] is True
    assert paired_stats([-1.0, 1.0])["significant"] is False
    assert paired_stats([0.5])["ci95"] is None
    assert t95(1) == pytest.approx(12.706) and t95(1000) == pytest.approx(1.96)


# ---------------------------------------------------------------------------------------------
# end to end, on real MNIST (slow)
# ---------------------------------------------------------------------------------------------

def _study(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", "study", "--quick", "--threads", "1", "--no-progress",
            "--out", str(out), *extra]


def _losses(summary: dict) -> dict:
    return {c["name"]: (c["loss"]["mean"], c["iwae"]["mean"] if c["iwae"] else None) for c in summary["cells"]}


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, mnist):
    out = tmp_path / "study"
    start = time.perf_counter()
    subprocess.run(_study(out), check=True, env=os.environ.copy(), timeout=600)
    elapsed = time.perf_counter() - start
    report = (out / "report.md").read_text()
    for section in ("## Summary", "## Test loss", "equal-budget fp32 control", "## Model printout",
                    "## Calibration configs", "## Figures", "## Model size"):
        assert section in report, section
    # the reference study's figures are for 10 + 10 epochs: a quick study's 1 + 1 is not compared with them
    assert "Δ vs reference" in report and "| 106.02 |" not in report
    assert "left out here: this study trained 1 + 1 epochs, the reference 10 + 10" in report
    for fig in ("reconstructions.png", "samples.png", "loss_vs_bits.png"):
        assert (out / fig).stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    names = {c["name"] for c in summary["cells"]}
    assert {"fp32-baseline", "fp32-control", "qat-w8", "qat-w4", "dorefa-w8", "dorefa-w4", "lsq-w8", "lsq-w4",
            "ptq-w8", "ptq-w4"} <= names
    rec = json.loads((out / "seed0" / "lsq-w4" / "result.json").read_text())
    assert rec["spec"]["config_list"] == REFERENCE[("lsq", "C1")]
    assert "fc1" in rec["calibration_config"] and rec["calibration_config"]["fc1"]["weight_bits"] == 4
    assert rec["printout_before"] != rec["printout_after"]
    assert len(rec["train"]["epoch_seconds"]) == 1 and rec["after"]["eval_seconds_median3"] > 0
    assert rec["environment"]["torch"] and rec["size_after"]["bytes_quantized"] < rec["size_after"]["bytes_fp32"]
    for c in summary["cells"]:
        assert 90 < c["loss"]["mean"] < 200, c
    print(f"quick study took {elapsed:.1f} s")


@pytest.mark.slow
def test_killed_study_resumes_and_matches_an_uninterrupted_one(tmp_path, mnist):
    args = ("--methods", "lsq", "--bits", "4", "--no-ptq", "--iwae-k", "0", "--no-deploy")
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_study(ref, *args), check=True, timeout=600)
    proc = subprocess.Popen(_study(killed, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "seed0" / "fp32-baseline" / "result.json"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(1.0)  # now inside the next run
    assert proc.poll() is None, "the study ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (killed / "seed0" / "lsq-w4" / "result.json").exists()
    baseline_mtime = first.stat().st_mtime_ns
    done = subprocess.run(_study(killed, *args), check=True, timeout=600, capture_output=True, text=True)
    assert "resumed: 1 finished run" in done.stderr
    assert first.stat().st_mtime_ns == baseline_mtime  # the finished run was not redone
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert _losses(a) == _losses(b)
    # another --iwae-k only re-evaluates the finished runs: same losses, an IWAE bound, no training
    more = [("2" if prev == "--iwae-k" else v) for prev, v in zip(("",) + args, args)]
    weights = killed / "seed0" / "fp32-baseline" / "model.safetensors"
    weights_mtime = weights.stat().st_mtime_ns
    again = subprocess.run(_study(killed, *more), check=True, timeout=600, capture_output=True, text=True)
    assert "0 finished run(s) reused, 3 re-evaluated with the new evaluation settings (not retrained)" in " ".join(
        again.stderr.split())  # rich wraps the line
    assert first.stat().st_mtime_ns != baseline_mtime and weights.stat().st_mtime_ns == weights_mtime
    c = json.loads((killed / "summary.json").read_text())
    assert {k: v[0] for k, v in _losses(c).items()} == {k: v[0] for k, v in _losses(a).items()}
    assert all(v[1] is not None for v in _losses(c).values())


def test_study_options_reach_only_the_methods_that_accept_them():
    cfg = StudyConfig(methods=("qat", "dorefa"), bits=(4,), extra_options={"dorefa_variant": "paper"})
    opts = {r.folder: r.spec.options for r in plan_runs(cfg) if r.spec.method}
    assert opts == {"seed0/qat-w4": {}, "seed0/dorefa-w4": {"dorefa_variant": "paper"}, "seed0/ptq-w4": {}}
    with pytest.raises(ValueError, match=r"belongs to none of the studied methods \(qat, ptq\); their options: .*quant_start_step"):
        StudyConfig(methods=("qat",), extra_options={"lsq_plus": True})
    with pytest.raises(ValueError, match="'learned', 'scaled' or 'paper'"):
        StudyConfig(methods=("dorefa",), extra_options={"dorefa_variant": "max"})


def test_resume_checks_the_weights_and_an_interrupted_rerun_drops_the_old_record(tmp_path, tiny_images, monkeypatch):
    import lowbit.experiment as experiment
    from lowbit.checkpoint import CheckpointError
    from lowbit.experiment import RECORD, RunSpec, run_experiment
    from lowbit.study import _finished

    train, test = tiny_images[:256], tiny_images[256:]
    base = RunSpec(name="fp32", epochs=1, batch_size=64, iwae_k=0)
    record = run_experiment(base, train, test, tmp_path / "fp32", progress=False)
    key = record["key"]
    assert _finished(tmp_path / "fp32", key)["after"] == record["after"]
    weights = tmp_path / "fp32" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + bytes(8))  # damaged on disk: redone, not reused
    assert _finished(tmp_path / "fp32", key) is None
    weights.unlink()
    assert _finished(tmp_path / "fp32", key) is None
    weights.write_bytes(good)
    assert _finished(tmp_path / "fp32", key) is not None
    # so is its optimizer state, which the runs started from it continue
    opt_file = tmp_path / "fp32" / "optimizer.safetensors"
    opt_state = opt_file.read_bytes()
    opt_file.write_bytes(opt_state[:-8] + bytes(8))
    assert _finished(tmp_path / "fp32", key) is None
    opt_file.unlink()
    assert _finished(tmp_path / "fp32", key) is None
    quick = RunSpec(name="q", epochs=1, batch_size=64, iwae_k=0, method="qat", config_list=[
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"]}])
    with pytest.raises(CheckpointError, match="has no optimizer state .optimizer.safetensors.*retrain that run"):
        run_experiment(quick, train, test, tmp_path / "q", init=tmp_path / "fp32", progress=False)
    opt_file.write_bytes(opt_state)
    assert _finished(tmp_path / "fp32", key) is not None
    # and its meta.json, which rebuilds the model (an edited one was reused, and the report then
    # failed on every rerun)
    meta = tmp_path / "fp32" / "meta.json"
    meta_text = meta.read_text()
    edited = json.loads(meta_text)
    edited["model"]["kwargs"] = {"latent": 10}
    meta.write_text(json.dumps(edited))
    assert _finished(tmp_path / "fp32", key) is None
    meta.unlink()
    assert _finished(tmp_path / "fp32", key) is None
    meta.write_bytes(b"\xff\xfe")  # (not UTF-8: a crash of the resumed study, not a redo)
    assert _finished(tmp_path / "fp32", key) is None
    meta.unlink()
    meta.mkdir()
    assert _finished(tmp_path / "fp32", key) is None
    meta.rmdir()
    meta.write_text(meta_text)
    assert _finished(tmp_path / "fp32", key) is not None
    # a run with other settings started in that folder and killed before it finished: the old
    # record must not stay beside files that are no longer its own
    ptq = RunSpec(name="ptq", epochs=1, batch_size=64, iwae_k=0, method="ptq", config_list=[
        {"quant_types": ["weight"], "quant_bits": 8, "op_types": ["Linear"]}])
    run_experiment(ptq, train, test, tmp_path / "ptq", init=tmp_path / "fp32", progress=False)
    assert (tmp_path / "ptq" / RECORD).exists()
    other = RunSpec(name="ptq", epochs=1, batch_size=64, iwae_k=0, method="ptq", config_list=ptq.config_list,
                    options={"calibration": "percentile"})
    monkeypatch.setattr(experiment, "_calibrate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_experiment(other, train, test, tmp_path / "ptq", init=tmp_path / "fp32", progress=False)
    assert not (tmp_path / "ptq" / RECORD).exists()
    # a quantized run is not a starting point for another quantized run
    with pytest.raises(CheckpointError, match="is a quantized run .ptq.; start from a float run"):
        run_experiment(ptq, train, test, tmp_path / "again", init=tmp_path / "ptq", progress=False)


def test_per_channel_studies_plan_weight_granularity_and_are_checked_before_training():
    # (--granularity per_channel set it for the inputs too: every method refused it, after the
    # baseline had trained)
    from lowbit.config import ConfigError
    from lowbit.experiment import RunSpec
    from lowbit.study import PlannedRun, check_plan

    cfg = StudyConfig(methods=("qat", "lsq"), bits=(8, 4), granularity="per_channel", deploy=False)
    plan = plan_runs(cfg)
    check_plan(plan)
    lsq = next(r for r in plan if r.spec.method == "lsq")
    assert lsq.spec.config_list[0]["granularity"] == {"weight": "per_channel"}
    with pytest.raises(ValueError, match="DoReFa's weight grid is per layer.*leave dorefa out"):
        StudyConfig(methods=("dorefa",), granularity="per_channel")
    bad = PlannedRun(RunSpec(name="seed0/x", epochs=1, method="lsq", config_list=[
        {"quant_types": ["input"], "quant_bits": 8, "op_types": ["Linear"], "granularity": "per_channel"}]), "seed0/x")
    with pytest.raises(ConfigError, match="seed0/x: config_list.0.: lsq input quantization cannot be per_channel"):
        check_plan([bad])


def test_model_size_packs_weights_at_their_codes_width():
    # the size counted the config's bits: DoReFa's paper variant at 4 bits has codes -15..15 (5 bits)
    import math

    import lowbit
    from lowbit.experiment import model_size
    from lowbit.models.vae import VAE

    cfg = [{"quant_types": ["weight"], "quant_bits": 4, "op_names": ["fc1"]}]
    sizes = {}
    for method, opts in (("lsq", {}), ("dorefa", {"dorefa_variant": "paper"})):
        m = lowbit.quantize(VAE(), cfg, method, **opts)
        size = model_size(m)
        sizes[method] = size["bytes_quantized"] - (size["bytes_fp32"] - 784 * 400 * 4)  # (fc1's weight)
    assert sizes == {"lsq": math.ceil(784 * 400 * 4 / 8), "dorefa": math.ceil(784 * 400 * 5 / 8)}
