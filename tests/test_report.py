"""The study's summary: best method per bit width, differences to the control, over seeds."""

from __future__ import annotations

from dataclasses import asdict

from lowbit.report import summarize
from lowbit.study import StudyConfig, plan_runs


def _records(cfg: StudyConfig, losses: dict[str, list[float]]) -> dict[str, dict]:
    """Synthetic finished records: ``losses[name][seed]`` is the run's test loss."""
    records = {}
    for run in plan_runs(cfg):
        name = run.folder.split("/", 1)[1]
        loss = losses[name][int(run.folder.split("/", 1)[0][len("seed"):])]  # (the study seed, not the run's)
        calib = None
        if run.spec.method:
            layers = ["fc1", "fc21", "fc22", "fc3", "fc4"] if run.spec.method == "dorefa" else ["fc1", "fc21", "fc22", "fc3"]
            calib = {layer: {} for layer in layers}
        records[run.folder] = {
            "spec": asdict(run.spec), "calibration_config": calib, "size_after": {},
            "before": None if run.kind == "baseline" else {"loss": 105.0},
            "after": {"loss": loss, "iwae": None, "eval_seconds_median3": 0.1},
            "train": None if run.kind == "ptq" else {"seconds": 1.0},
        }
    return records


def test_summary_ranks_methods_and_flags_different_configs():
    cfg = StudyConfig(methods=("dorefa", "lsq"), bits=(4,), seeds=3, deploy=False)
    losses = {"fp32-baseline": [105.0, 105.2, 104.9], "fp32-control": [104.0, 104.1, 103.9],
              "dorefa-w4": [106.0, 106.3, 106.1], "lsq-w4": [107.0, 107.1, 107.3], "ptq-w4": [116.0, 115.0, 117.0]}
    summary = summarize(cfg, plan_runs(cfg), _records(cfg, losses))
    (best,) = summary["best"]
    assert best["best"] == "dorefa-w4" and best["runner_up"] == "lsq-w4"
    assert abs(best["margin"]["mean"] - (1.0 + 0.8 + 1.2) / 3) < 1e-9 and best["margin"]["significant"]
    assert best["differs"] == {"dorefa-w4": "weights of fc1, fc21, fc22, fc3, fc4",
                               "lsq-w4": "weights and inputs of fc1, fc21, fc22, fc3"}
    text = " ".join(summary["text"])
    assert "quantize different tensors" in text and "95% CI" in text
    cells = {c["name"]: c for c in summary["cells"]}
    assert abs(cells["lsq-w4"]["vs_control"]["mean"] - 3.1333333) < 1e-6
    assert "vs_control" not in cells["ptq-w4"]  # PTQ has no fine-tuning budget to compare
    assert cells["dorefa-w4"]["reference"] == 106.02 and cells["ptq-w4"]["reference"] is None


def test_the_reference_preset_counts_study_seeds_not_its_baselines_training_seeds(tmp_path):
    # (each run's own baseline trains with a seed of its own: "95% CI over 7 seeds" for 2 seeds)
    cfg = StudyConfig(methods=("dorefa", "lsq"), bits=(4,), seeds=2, deploy=False, ptq=False, preset="reference")
    losses = {"fp32-control-baseline": [105.0, 105.2], "dorefa-w4-baseline": [105.1, 104.9],
              "lsq-w4-baseline": [105.3, 105.0], "fp32-control": [104.0, 104.1], "dorefa-w4": [106.0, 106.3],
              "lsq-w4": [107.0, 107.1]}
    summary = summarize(cfg, plan_runs(cfg), _records(cfg, losses))
    assert summary["seeds"] == 2
    assert "over 2 seeds" in " ".join(summary["text"])
    # the baselines' row: 6 runs over the 2 study seeds (its seeds column said 6)
    base = next(c for c in summary["cells"] if c["name"] == "fp32-baseline")
    assert (base["seeds"], base["n"]) == (2, 6)
    one = StudyConfig(methods=("lsq",), bits=(4,), seeds=1, deploy=False, ptq=False)
    text = " ".join(summarize(one, plan_runs(one), _records(one, {"fp32-baseline": [105.0], "fp32-control": [104.0],
                                                                   "lsq-w4": [106.1]}))["text"])
    assert "the fine-tuned 4-bit run (lsq-w4) differs by +2.10 nats" in text  # (not "+2.10 (lsq-w4) to +2.10")


def test_terminal_table_shows_the_reference_figure(capsys):
    from rich.console import Console

    from lowbit.report import print_summary_table

    cfg = StudyConfig(methods=("lsq",), bits=(4,), seeds=1, deploy=False, ptq=False)
    losses = {"fp32-baseline": [105.0], "fp32-control": [104.0], "lsq-w4": [106.7]}
    print_summary_table(summarize(cfg, plan_runs(cfg), _records(cfg, losses)), Console(width=200))
    out = capsys.readouterr().out
    assert "NNI study" in out and "108.04" in out


def test_terminal_table_keeps_run_names_whole_in_80_columns(capsys):
    """A log is 80 columns wide: the headers wrap, the run names and figures stay whole."""
    from rich.console import Console

    from lowbit.report import print_summary_table

    cfg = StudyConfig(methods=("qat", "dorefa", "lsq"), bits=(8, 4), seeds=3, deploy=False, ptq=True)
    cells = [r.folder.split("/", 1)[1] for r in plan_runs(cfg)]
    losses = {name: [104.0 + i / 7, 104.1 + i / 7, 104.3 + i / 7] for i, name in enumerate(dict.fromkeys(cells))}
    print_summary_table(summarize(cfg, plan_runs(cfg), _records(cfg, losses)), Console(width=80))
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 80
    table = [line.split() for line in lines]
    for name in ("fp32-baseline", "fp32-control", "dorefa-w8", "ptq-w4"):
        row = next(words for words in table if words and words[0] == name)  # the name whole, first
        assert "…" not in " ".join(row)


def test_same_configs_are_not_flagged():
    cfg = StudyConfig(methods=("qat", "lsq"), bits=(8,), seeds=1, deploy=False, ptq=False)
    losses = {"fp32-baseline": [105.0], "fp32-control": [104.0], "qat-w8": [104.1], "lsq-w8": [104.2]}
    (best,) = summarize(cfg, plan_runs(cfg), _records(cfg, losses))["best"]
    assert best["best"] == "qat-w8" and "differs" not in best and best["margin"]["ci95"] is None


def test_a_diverged_cell_is_never_ranked_best_and_summary_json_stays_strict(tmp_path):
    import json
    import math

    import pytest
    import torch

    from lowbit.report import _strict_json, write_report

    nan = float("nan")
    cfg = StudyConfig(methods=("dorefa", "lsq"), bits=(8,), seeds=3, deploy=False)
    losses = {"fp32-baseline": [105.0, 105.2, 104.9], "fp32-control": [104.0, 104.1, 103.9],
              "dorefa-w8": [106.0, 106.3, 106.1], "lsq-w8": [nan, 103.0, 103.1], "ptq-w8": [116.0, 115.0, 117.0]}
    for methods in (("dorefa", "lsq"), ("lsq", "dorefa")):  # whatever the order of the cells
        cfg = StudyConfig(methods=methods, bits=(8,), seeds=3, deploy=False)
        summary = summarize(cfg, plan_runs(cfg), _records(cfg, losses))
        assert summary["best"][0]["best"] == "dorefa-w8"
        text = " ".join(summary["text"])
        assert "**lsq-w8** has a non-finite test loss" in text and "nan" not in text.lower().replace("nats", "")
    cells = {c["name"]: c for c in summary["cells"]}
    assert math.isnan(cells["lsq-w8"]["loss"]["mean"]) and cells["lsq-w8"]["loss"]["ci95"] is None
    assert json.loads(json.dumps(_strict_json(summary), allow_nan=False))["cells"]
    with pytest.raises(ValueError, match="no finished run to report"):
        write_report(tmp_path, cfg, plan_runs(cfg), {}, torch.zeros(1, 1, 28, 28))
