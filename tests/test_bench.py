"""The deployment benchmark: rows, parity, ratios and checks, output formats, run dirs, CLI, study hook.
Timings here are smoke-sized (a few hundred images, a few calls): only the structure is tested."""

from __future__ import annotations

import argparse
import io
import json
from types import SimpleNamespace

import pytest
import torch

import lowbit
from lowbit import bench
from lowbit.checkpoint import CheckpointError, save_run
from lowbit.models.vae import VAE

N = 256


def _images(n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(8, 1, 28, 28, generator=g)
    idx = torch.randint(0, 8, (n,), generator=g)
    return (base[idx] * 0.8 + 0.2 * torch.rand(n, 1, 28, 28, generator=g)).clamp(0, 1)


def _cfg(bits_w: int, bits_in: int = 8) -> list[dict]:
    return [{"quant_types": ["input", "weight"], "quant_bits": {"input": bits_in, "weight": bits_w},
             "op_types": ["Linear"]}]


def _vae(bits_w: int, seed: int = 0, **opts) -> VAE:
    torch.manual_seed(seed)
    m = VAE()
    lowbit.quantize(m, _cfg(bits_w), "ptq", **opts)
    x = _images(256, seed + 1).reshape(256, -1)
    lowbit.calibrate(m, [x], forward=lambda mm, b: mm(b, torch.zeros(len(b), mm.latent)))
    return m.eval()


def _small(model, **kw):
    kw.setdefault("repeats", 1)
    kw.setdefault("latency_iters", 3)
    return bench.bench_model(model, _images(), batch_size=N, **kw)


@pytest.fixture(scope="module")
def result():
    return _small(_vae(8, weight_range="reduced"), int4_model=_vae(4))


def test_rows_losses_and_parity(result):
    names = [r.name for r in result.rows]
    assert names[:6] == [bench.EAGER, bench.SIM, bench.ORT_FP32, bench.ORT_INT8, bench.ORT_INT4, bench.ORT_INT4_NATIVE]
    eager, sim, ortf, i8, i4 = (result.row(n) for n in names[:5])
    assert abs(ortf.loss - eager.loss) < 1e-3  # the same float model in both runtimes
    assert abs(i8.parity) < 0.05 and abs(i4.parity) < 0.3
    assert i4.reference_loss != i8.reference_loss  # each deployed row is compared with its own simulation
    for r in (eager, sim, ortf, i8, i4):
        assert r.throughput > 0 and r.latency_ms > 0 and r.threads == 1
    assert i8.file_bytes < 0.27 * ortf.file_bytes and i4.file_bytes < 0.17 * ortf.file_bytes
    assert i8.kernel == "u8s8"  # 7-bit weights: the fast kernel is exact on every CPU


def test_gemm_ratio_and_checks(result):
    g = result.gemm
    assert g["ratio_u8s8"] > 0 and g["ratio_u8u8"] > 0 and g["kernel_used"] in ("u8s8", "u8u8")
    assert len(g["shapes"]) == 5 and g["batch"] == N
    checks = {c["check"]: c for c in result.checks()}
    assert len(checks) == 8
    assert checks["int8 test-loss gap to the simulation (nats)"]["pass"] is True
    assert checks["int4 file / fp32 ONNX"]["pass"] is True
    assert all(c["pass"] in (True, False) for c in checks.values())


def test_outputs_json_markdown_rich(result):
    d = result.to_dict()
    text = json.dumps(d)  # JSON-serialisable as is
    assert "ratio_u8s8" in text and d["machine"]["cores"] >= 1
    md = result.to_markdown()
    assert "| backend |" in md and bench.ORT_INT8 in md and "GEMM ratio" in md and "| target |" in md
    from rich.console import Console

    buf = io.StringIO()
    result.print(Console(file=buf, width=200))
    out = buf.getvalue()
    assert bench.ORT_INT4 in out and "GPU:" in out


def test_the_printed_tables_fit_a_log_80_columns_wide(result):
    """A pipe or CI log gets 80 columns: every row's name and every figure stays readable (one
    table of eleven columns squeezed the names to nothing there)."""
    from rich.console import Console

    buf = io.StringIO()
    result.print(Console(file=buf, width=80))
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = " ".join(" ".join(line.split()) for line in lines)
    for r in result.rows:
        assert r.name.split(",")[0] in text, r.name
        for cell in result.table_rows()[result.rows.index(r)][1:11]:
            assert cell in text, (r.name, cell)


def test_gpu_path_reports_why_it_skipped(result):
    if torch.cuda.is_available():
        assert any(r.device == "cuda" for r in result.rows)
    else:
        assert result.gpu["status"].startswith("skipped")
        assert not any(r.device == "cuda" for r in result.rows)


def test_int4_row_skipped_for_an_8bit_run_with_reason():
    r = _small(_vae(8), gpu=False)
    i4 = r.row(bench.ORT_INT4)
    assert i4.skipped and "re-quantizes" in i4.skipped
    assert r.gpu["status"] == "not requested"
    assert r.row(bench.ORT_INT8).kernel  # the int8 row ran


def test_unquantized_model_benches_float_rows_only():
    torch.manual_seed(0)
    r = _small(VAE().eval(), gpu=False)
    assert r.row(bench.ORT_INT8).skipped and r.row(bench.SIM) is None
    assert r.row(bench.ORT_FP32).loss == pytest.approx(r.row(bench.EAGER).loss, abs=1e-3)
    assert r.gemm["kernel_used"] is None  # (no int8 model: none is said to have used u8s8)


def test_a_weight_only_model_is_not_labelled_or_scored_as_integer_gemms():
    # DoReFa's config quantizes weights only: its int8/int4 files run float GEMMs, yet the int4 row
    # said "8-bit activations", the GEMM line "u8s8", and the int8 speed targets were scored
    torch.manual_seed(0)
    m = lowbit.quantize(VAE(), [{"quant_types": ["weight"], "quant_bits": 4, "op_types": ["Linear"]}], "dorefa")
    r = _small(m.eval(), gpu=False)
    assert r.row(bench.ORT_INT8).kernel == "n/a" and r.gemm["kernel_used"] is None
    assert "float activations" in r.row(bench.ORT_INT4).notes[0]
    checks = {c["check"]: c for c in r.checks()}
    speed = [c for name, c in checks.items() if name.startswith("int8 ") and ("latency" in name or "throughput" in name)]
    assert len(speed) == 4 and all(c["pass"] is None and "no integer GEMM" in c["note"] for c in speed)
    assert checks["int8 file / fp32 ONNX"]["pass"] is True


def test_bench_run_and_cli(tmp_path, monkeypatch):
    run8, run4 = tmp_path / "w8", tmp_path / "w4"
    save_run(run8, _vae(8), model_spec={"name": "vae", "kwargs": {}},
             quant={"method": "ptq", "config_list": _cfg(8), "options": {}})
    save_run(run4, _vae(4), model_spec={"name": "vae", "kwargs": {}},
             quant={"method": "ptq", "config_list": _cfg(4), "options": {}})
    r = bench.bench_run(run8, int4_run_dir=run4, images=_images(), batch_size=N, repeats=1, latency_iters=2, gpu=False)
    assert r.source["run_dir"] == str(run8) and not r.row(bench.ORT_INT4).skipped
    # the CLI entry point: reads the test set itself (patched here), prints, writes JSON
    monkeypatch.setattr(bench, "_test_images", lambda images, dataset, data_dir, progress: _images().reshape(N, -1).numpy())
    monkeypatch.setattr(bench, "bench_run", _shrunk(bench.bench_run))
    args = argparse.Namespace(run_dir=run8, repeats=1, json=tmp_path / "out" / "bench.json", dataset="mnist",
                              data_dir=None, threads=None, no_progress=True, int4_run=run4)
    bench.bench_cli(args)
    d = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [row["name"] for row in d["rows"]][:3] == [bench.EAGER, bench.SIM, bench.ORT_FP32]
    # a --json that cannot be written is refused before the benchmark runs, naming --json
    monkeypatch.setattr(bench, "bench_run", lambda *a, **kw: pytest.fail("benchmarked before checking --json"))
    (tmp_path / "blocker").write_text("a file where a folder should be")
    for bad, message in ((tmp_path / "out", "is a folder"), (tmp_path / "blocker" / "b.json", "choose another --json")):
        with pytest.raises(CheckpointError, match=message):
            bench.bench_cli(argparse.Namespace(**{**vars(args), "json": bad}))


def _shrunk(fn):
    def run(*a, **kw):
        kw.update(batch_size=N, latency_iters=2, gpu=False)
        return fn(*a, **kw)
    return run


def test_study_deployment_picks_8_and_4_bit_runs(tmp_path):
    out = tmp_path / "study"
    for folder, bits in (("seed0/ptq-8", 8), ("seed0/ptq-4", 4)):
        save_run(out / folder, _vae(bits), model_spec={"name": "vae", "kwargs": {}},
                 quant={"method": "ptq", "config_list": _cfg(bits), "options": {}})
    plan = [SimpleNamespace(folder="seed0/ptq-8", bits=8, kind="ptq", spec=SimpleNamespace(method="ptq")),
            SimpleNamespace(folder="seed0/ptq-4", bits=4, kind="ptq", spec=SimpleNamespace(method="ptq")),
            SimpleNamespace(folder="seed0/fp32", bits=None, kind="baseline", spec=SimpleNamespace(method=None))]
    records = {p.folder: {} for p in plan}
    dep = bench.study_deployment(SimpleNamespace(), plan, records, out, SimpleNamespace(images=_images()),
                                 repeats=1, latency_iters=2, gpu=False)
    assert "seed0/ptq-8" in dep["markdown"] and "seed0/ptq-4" in dep["markdown"]
    assert (out / "deployment.json").is_file()
    assert bench.study_deployment(SimpleNamespace(), plan[2:], records, out, SimpleNamespace(images=_images())) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="VAE"):
        bench.bench_model(torch.nn.Linear(3, 3), _images())
    with pytest.raises(ValueError, match="positive"):
        bench.bench_model(VAE(), _images(), repeats=0)
