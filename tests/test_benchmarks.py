"""The benchmark scripts run (tiny settings: this checks they work, not their figures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, with_stderr: bool = False, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, str(BENCH / script), *args], check=True, capture_output=True, text=True,
                         timeout=600, env=None if env is None else {**os.environ, **env})
    return out.stdout + out.stderr if with_stderr else out.stdout


@pytest.mark.slow
def test_quant_overhead_runs():
    out = _run("quant_overhead.py", "--images", "512", "--reps", "1", "--chunks", "1", "--threads", "1")
    for row in ("fp32 + fc1 input grad", "lsq W8A8 4 layers", "dorefa W8A8 5 layers", "lsq 4L, fc1 step frozen",
                "95% interval"):
        assert row in out


def test_quant_overhead_median_interval():
    """The bootstrap interval of a median: around it, within the data, a point for one value or a
    constant sample, narrower with more slices, the same on every call (fixed seed)."""
    sys.path.insert(0, str(BENCH))
    try:
        from quant_overhead import median_interval
    finally:
        sys.path.remove(str(BENCH))
    assert median_interval([1.2]) == (1.2, 1.2)
    assert median_interval([1.1] * 7) == (1.1, 1.1)
    few = [1.0, 1.3, 1.1, 1.4, 1.2]
    lo, hi = median_interval(few)
    assert 1.0 <= lo <= 1.2 <= hi <= 1.4 and lo < hi
    lo_many, hi_many = median_interval(few * 20)
    assert lo <= lo_many <= 1.2 <= hi_many <= hi and hi_many - lo_many < hi - lo
    assert median_interval(few) == (lo, hi)


@pytest.mark.slow
def test_quantizer_kernels_runs():
    out = _run("quantizer_kernels.py", "--calls", "2", "--reps", "1")
    assert "lowbit tanh" in out and "dorefa weight quantizer" in out


@pytest.mark.slow
def test_dorefa_variants_runs(mnist):
    out = _run("dorefa_variants.py", "--epochs", "1", "--finetune-epochs", "1", "--variants", "learned", "paper",
               "--threads", "1")
    assert "learned" in out and "paper" in out and "fp32 baseline" in out


@pytest.mark.slow
def test_quant_overhead_compiled_runs_without_graph_breaks():
    out = _run("quant_overhead.py", "--compile", "--variants", "lsq W8A8 4", "--images", "512", "--reps", "1",
               "--chunks", "1", "--threads", "1", with_stderr=True, env={"TORCH_LOGS": "graph_breaks,recompiles"})
    assert "models compiled" in out and "lsq W8A8 4 layers" in out and "qat W8A8" not in out
    # (one compilation per model structure: fp32's forward and the quantized one's; none per step)
    assert "Graph break" not in out and "recompile_limit" not in out
    assert out.count("Recompiling function") <= 1


@pytest.mark.slow
def test_lsq_plus_init_runs(mnist):
    out = _run("lsq_plus_init.py", "--epochs", "1", "--bits", "4", "--seeds", "0", "--finetune-epochs", "1",
               "--threads", "1")
    assert "fp32 baseline" in out and "lsq+ paper" in out and "lsq+ minmax" in out and "after 1 epochs" in out


@pytest.mark.slow
def test_lsq_cost_split_runs():
    out = _run("lsq_cost_split.py", "--rounds", "2", "--steps", "1")
    for row in ("fp32", "lsq, steps' Adam as a loop", "lsq, fc1 input step frozen", "lsq, every step frozen"):
        assert row in out
    assert "ms over fp32" in out
    tiny = _run("lsq_cost_split.py", "--rounds", "2", "--steps", "1", "--tiny")
    assert "layers 8 wide" in tiny and "lsq, every step frozen" in tiny


@pytest.mark.slow
def test_ab_versions_runs():
    """Two copies of lowbit side by side (here this checkout against itself)."""
    out = _run("ab_versions.py", str(BENCH.parent), "--rounds", "2", "--steps", "1", "--tiny", "--methods", "lsq")
    for row in ("fp32", "lsq new", "lsq old", "95% interval"):
        assert row in out
    with pytest.raises(subprocess.CalledProcessError) as err:
        _run("ab_versions.py", str(BENCH), "--rounds", "1")
    assert "not a lowbit checkout" in err.value.stderr
    from lowbit import kernels

    if kernels.get() is not None:
        calls = _run("ab_versions.py", str(BENCH.parent), "--weight-quantizer", "--rounds", "1", "--steps", "2",
                     "--methods", "lsq,dorefa,qat")
        assert "lsq      weight quantizer backward" in calls and "dorefa   weight quantizer backward" in calls
        assert "qat" not in calls.split("calls each")[1]


@pytest.mark.slow
def test_optimizer_groups_runs():
    out = _run("optimizer_groups.py", "--steps", "3", "--threads", "1")
    for row in ("fp32 model's group", "lsq: + steps' group (shipped)", "one 10-vector in model's group"):
        assert row in out
