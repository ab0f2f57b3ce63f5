"""Real-deployment benchmark: the same VAE as fp32 torch eager, fp32 ONNX Runtime, int8 and int4
ONNX Runtime (and the GPU when there is one), side by side in one process.

Every row is measured on the same test images with the same fixed noise (``eval_eps``): its test
loss (nats per image, as ``lowbit.train.evaluate`` computes it), its throughput at batch 10,000 and
its median latency at batch 1, its file size and the threads it used.  Repetitions are interleaved
(row A, row B, ..., row A, row B, ...) and medians reported, so the machine's load drifts into
every row alike.  The bench also measures this machine's int8/fp32 GEMM ratio on the model's own
layer shapes (ONNX Runtime ``MatMulInteger`` against ``torch.mm``): that is the ceiling an int8
model can reach here, and the int8 row is judged against it.

    result = bench_run("runs/lsq-all-c0")            # -> BenchResult
    result.print()                                   # rich table
    result.to_dict(), result.to_markdown()
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "BenchRow",
    "BenchResult",
    "bench_run",
    "bench_model",
    "bench_cli",
    "gemm_ratio",
    "float_model",
    "study_deployment",
    "TARGETS",
]

#: the acceptance targets of the deployment issue (W8A8 on all five VAE layers, 1 thread)
TARGETS = {
    "int8_parity_nats": 0.05,
    "int4_parity_nats": 0.3,
    "int8_size_vs_fp32_onnx": 0.27,
    "int4_size_vs_fp32_onnx": 0.17,
    "int8_latency_vs_eager": 0.4,
    "int8_latency_vs_ort_fp32": 0.75,
    "int8_throughput_vs_eager": 1.1,
    "int8_throughput_vs_gemm_ratio": 0.9,
}


@dataclass
class BenchRow:
    """One way of running the model."""

    name: str
    backend: str  # "torch" | "onnxruntime" | "tensorrt"
    device: str = "cpu"
    loss: float | None = None
    reference_loss: float | None = None  # the simulated model this row deploys (parity)
    batch_seconds: float | None = None  # median seconds for one batch of `batch_size`
    throughput: float | None = None  # images per second at `batch_size`
    latency_ms: float | None = None  # median milliseconds at batch 1
    file_bytes: int | None = None
    threads: int | None = None
    kernel: str | None = None
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    @property
    def parity(self) -> float | None:
        if self.loss is None or self.reference_loss is None:
            return None
        return self.loss - self.reference_loss


@dataclass
class BenchResult:
    """All rows, the GEMM ceiling, the machine, and the target checks."""

    rows: list[BenchRow]
    settings: dict[str, Any]
    machine: dict[str, Any]
    gemm: dict[str, Any]
    gpu: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> BenchRow | None:
        return next((r for r in self.rows if r.name == name), None)

    # -- derived figures --------------------------------------------------------------------
    def ratios(self) -> dict[str, float | None]:
        """Speed and size ratios against the baselines (None where a row is missing)."""
        eager, ortf = self.row(EAGER), self.row(ORT_FP32)
        out: dict[str, float | None] = {}
        for r in self.rows:
            if r.skipped:
                continue
            key = r.name
            out[f"{key}: throughput vs eager"] = _div(r.throughput, eager.throughput if eager else None)
            out[f"{key}: latency vs eager"] = _div(r.latency_ms, eager.latency_ms if eager else None)
            out[f"{key}: latency vs ORT fp32"] = _div(r.latency_ms, ortf.latency_ms if ortf else None)
            out[f"{key}: size vs fp32 ONNX"] = _div(r.file_bytes, ortf.file_bytes if ortf else None)
        return out

    def checks(self) -> list[dict[str, Any]]:
        """The issue's acceptance targets, each with its measured value and pass/fail."""
        eager, ortf, i8, i4 = self.row(EAGER), self.row(ORT_FP32), self.row(ORT_INT8), self.row(ORT_INT4)
        checks = []

        def add(name: str, value: float | None, op: str, target: float, note: str = "") -> None:
            ok = None if value is None else (value <= target if op == "<=" else value >= target)
            checks.append({"check": name, "value": value, "op": op, "target": target, "pass": ok, "note": note})

        if i8 and not i8.skipped:
            add("int8 test-loss gap to the simulation (nats)", None if i8.parity is None else abs(i8.parity), "<=",
                TARGETS["int8_parity_nats"])
            add("int8 file / fp32 ONNX", _div(i8.file_bytes, ortf and ortf.file_bytes), "<=",
                TARGETS["int8_size_vs_fp32_onnx"])
            # (a model without quantized activations, weight-only layers, runs float GEMMs: its speed
            # is not an integer GEMM's, and is not scored against the integer targets)
            integer = bool(i8.kernel) and i8.kernel != "n/a"
            na = "" if integer else "not scored: no integer GEMM (weight-only layers run float GEMMs)"

            def speed_check(name: str, value: float | None, op: str, target: float, note: str = "") -> None:
                add(name, value if integer else None, op, target, note if integer else na)

            speed_check("int8 latency b=1 / fp32 torch eager", _div(i8.latency_ms, eager and eager.latency_ms), "<=",
                        TARGETS["int8_latency_vs_eager"])
            speed_check("int8 latency b=1 / fp32 ONNX Runtime", _div(i8.latency_ms, ortf and ortf.latency_ms), "<=",
                        TARGETS["int8_latency_vs_ort_fp32"])
            speed = _div(i8.throughput, eager and eager.throughput)
            speed_check(f"int8 throughput b={self.settings.get('batch_size')} / fp32 torch eager", speed, ">=",
                        TARGETS["int8_throughput_vs_eager"])
            ceiling = self.gemm.get("ratio_used")
            speed_check("int8 throughput gain / int8:fp32 GEMM ratio", _div(speed, ceiling), ">=",
                        TARGETS["int8_throughput_vs_gemm_ratio"],
                        f"GEMM ratio {ceiling:.2f}x ({self.gemm.get('kernel_used')})" if ceiling else "")
        if i4 and not i4.skipped:
            add("int4 test-loss gap to the simulation (nats)", None if i4.parity is None else abs(i4.parity), "<=",
                TARGETS["int4_parity_nats"])
            add("int4 file / fp32 ONNX", _div(i4.file_bytes, ortf and ortf.file_bytes), "<=",
                TARGETS["int4_size_vs_fp32_onnx"])
        return checks

    # -- output -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        rows = []
        for r in self.rows:
            d = asdict(r)
            d["parity"] = r.parity
            rows.append(d)
        return {"rows": rows, "settings": self.settings, "machine": self.machine, "gemm": self.gemm,
                "gpu": self.gpu, "source": self.source, "ratios": self.ratios(), "checks": self.checks()}

    def table_rows(self) -> list[list[str]]:
        """One list of cells per row (see :attr:`HEADERS`); skipped rows say why in the last cell."""
        eager, ortf = self.row(EAGER), self.row(ORT_FP32)
        out = []
        for r in self.rows:
            if r.skipped:
                out.append([r.name] + ["—"] * (len(self.HEADERS) - 2) + [f"skipped: {r.skipped}"])
                continue
            out.append([
                r.name,
                _f(r.loss, 3),
                "—" if r.parity is None else f"{r.parity:+.4f}",
                _f(r.throughput, 0),
                _x(_div(r.throughput, eager and eager.throughput)),
                _f(r.latency_ms, 3),
                _x(_div(r.latency_ms, eager and eager.latency_ms)),
                _x(_div(r.latency_ms, ortf and ortf.latency_ms)),
                "—" if r.file_bytes is None else f"{r.file_bytes / 1e6:.3f}",
                _x(_div(r.file_bytes, ortf and ortf.file_bytes)),
                "—" if r.threads is None else str(r.threads),
                "; ".join(x for x in [r.kernel or "", *r.notes] if x),
            ])
        return out

    HEADERS = ["backend", "test loss", "Δ vs sim", "img/s @B", "× eager", "ms @1", "× eager", "× ORT fp32",
               "MB", "× fp32 ONNX", "threads", "kernel / notes"]

    def _headers(self) -> list[str]:
        h = list(self.HEADERS)
        h[3] = f"img/s @{self.settings.get('batch_size', 10000)}"
        return h

    def to_markdown(self) -> str:
        lines = [
            f"Machine: {self.machine.get('cpu')} ({self.machine.get('cores')} cores; "
            f"{', '.join(self.machine.get('simd', [])) or 'no SIMD flags read'}); "
            f"{self.settings.get('images')} test images, eps = eval_eps(seed 0); "
            f"{self.settings.get('repeats')} interleaved repetitions, medians; "
            f"{self.settings.get('threads')} thread(s); onnxruntime {self.machine.get('onnxruntime')}, "
            f"torch {self.machine.get('torch')}.",
            "",
        ]
        head = self._headers()
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for row in self.table_rows():
            lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
        g = self.gemm
        if g.get("ratio_u8s8"):
            lines += ["", f"int8/fp32 GEMM ratio on this machine (the model's layer shapes at batch "
                          f"{g.get('batch')}, ONNX Runtime MatMulInteger vs torch.mm fp32, {g.get('threads')} "
                          f"thread): u8×s8 {g['ratio_u8s8']:.2f}x, u8×u8 {g['ratio_u8u8']:.2f}x"
                          + (f"; the int8 model used {g['kernel_used']}." if g.get("kernel_used") else ".")]
        lines += ["", f"GPU: {self.gpu.get('status')}"]
        checks = self.checks()
        if checks:
            lines += ["", "| target | measured | goal | met |", "|---|---|---|---|"]
            for c in checks:
                v = "—" if c["value"] is None else f"{c['value']:.3f}"
                met = "—" if c["pass"] is None else ("yes" if c["pass"] else "**no**")
                note = f" ({c['note']})" if c["note"] else ""
                lines.append(f"| {(c['check'] + note).replace('|', '/')} | {v} | {c['op']} {c['target']} | {met} |")
        notes = self.settings.get("notes") or []
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
        return "\n".join(lines)

    def print(self, console=None) -> None:
        """A rich table of the rows, the GEMM ceiling and the target checks."""
        from rich import box
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        head = self._headers()
        rows = self.table_rows()
        # two narrower tables rather than one of eleven columns, which a terminal (or a log, 80
        # columns) squeezes until the row names vanish
        for title, cols in (("loss and size", (1, 2, 8, 9, 10)), ("speed", (3, 4, 5, 6, 7))):
            t = Table(title=f"lowbit bench — {self.source.get('run_dir', 'model')}: {title}", box=box.SIMPLE_HEAD)
            t.add_column(head[0], min_width=18, ratio=1)
            for i in cols:
                t.add_column(head[i], justify="right", no_wrap=True)
            for row in rows:
                t.add_row(row[0], *(row[i] for i in cols))
            console.print(t)
        notes = [f"{row[0]}: {row[-1]}" for row in rows if row[-1] and row[-1] != "—"]
        for n in notes:
            console.print(f"  {n}", highlight=False)
        m = self.machine
        console.print(f"machine: {m.get('cpu')}, {m.get('cores')} cores, SIMD: {', '.join(m.get('simd', []))}; "
                      f"{self.settings.get('threads')} thread(s), {self.settings.get('repeats')} interleaved repetitions")
        g = self.gemm
        if g.get("ratio_u8s8"):
            console.print(f"int8/fp32 GEMM ratio here: u8×s8 {g['ratio_u8s8']:.2f}x, u8×u8 {g['ratio_u8u8']:.2f}x "
                          f"(model shapes, batch {g.get('batch')})"
                          + (f"; int8 model used {g['kernel_used']}" if g.get("kernel_used") else ""))
        console.print(f"GPU: {self.gpu.get('status')}")
        checks = self.checks()
        if checks:
            c = Table(title="the deployment targets (set for W8A8 on all five VAE layers, 1 thread)")
            for h in ("target", "measured", "goal", "met"):
                c.add_column(h)
            for ch in checks:
                v = "—" if ch["value"] is None else f"{ch['value']:.3f}"
                met = "—" if ch["pass"] is None else ("[green]yes[/green]" if ch["pass"] else "[red]no[/red]")
                c.add_row(ch["check"] + (f" ({ch['note']})" if ch["note"] else ""), v, f"{ch['op']} {ch['target']}", met)
            console.print(c)
        for n in self.settings.get("notes") or []:
            console.print(f"[dim]- {n}[/dim]")


EAGER = "fp32 torch eager"
SIM = "simulated quant, torch eager"
ORT_FP32 = "fp32 ONNX Runtime"
ORT_INT8 = "int8 ONNX Runtime"
ORT_INT4 = "int4 ONNX Runtime"
ORT_INT4_NATIVE = "int4 ONNX Runtime, MatMulNBits"


def _div(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _f(v, nd):
    return "—" if v is None else f"{v:,.{nd}f}"


def _x(v):
    return "—" if v is None else f"{v:.2f}x"


# ------------------------------------------------------------------------------------------------
# models and timing
# ------------------------------------------------------------------------------------------------


def float_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantized layer replaced by its float layer (quantizers dropped)."""
    import copy

    from .export.onnx import find_quantized_layers
    from .modules import replace_module

    work = copy.deepcopy(model).eval()
    for _, wrapper in find_quantized_layers(work):
        replace_module(work, wrapper, wrapper.module)
    return work


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int, inner: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, measured round-robin ``repeats`` times: each round runs
    ``inner`` calls of every function in turn, each call timed on its own."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up (allocations, prepacking, caches)
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            for _ in range(inner):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
    return times


def _torch_loss(model: nn.Module, x: torch.Tensor, eps: torch.Tensor, batch: int) -> float:
    from .models.vae import vae_loss

    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            logits, mu, logvar = model(x[i:i + batch], eps[i:i + batch])
            total += float(vae_loss(logits, x[i:i + batch], mu, logvar).total.double())
    return total / len(x)


def _gemm_fns(shapes: Sequence[tuple[int, int]], batch: int, threads: int) -> dict[str, Callable[[], Any]]:
    """One GEMM per layer shape as ``nn.Linear`` runs it in fp32 (``x @ W.T``) and as ONNX Runtime's
    ``MatMulInteger`` runs it with u8 activations and s8 / u8 constant (prepacked) weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def mmi(k: int, n: int, signed: bool):
        b = rng.integers(-128, 128, (k, n)) if signed else rng.integers(0, 256, (k, n))
        dt = np.int8 if signed else np.uint8
        inits = [numpy_helper.from_array(b.astype(dt), "b"), numpy_helper.from_array(np.uint8(3), "az"),
                 numpy_helper.from_array(np.array(0, dt), "bz")]
        g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
        m.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.log_severity_level = 3
        return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

    fns: dict[str, Callable[[], Any]] = {}
    for i, (k, n) in enumerate(shapes):
        a8 = rng.integers(0, 256, (batch, k)).astype(np.uint8)
        af = torch.rand(batch, k)
        wf = torch.randn(n, k)
        s1, s2 = mmi(k, n, True), mmi(k, n, False)
        fns[f"gemm/fp32/{i}"] = (lambda a, w: lambda: torch.mm(a, w.t()))(af, wf)
        fns[f"gemm/u8s8/{i}"] = (lambda s, a: lambda: s.run(None, {"a": a}))(s1, a8)
        fns[f"gemm/u8u8/{i}"] = (lambda s, a: lambda: s.run(None, {"a": a}))(s2, a8)
    return fns


def _gemm_summary(med: dict[str, float], shapes, batch: int, threads: int) -> dict[str, Any]:
    tot = {kind: sum(v for k, v in med.items() if k.startswith(f"gemm/{kind}/")) for kind in ("fp32", "u8s8", "u8u8")}
    return {
        "batch": batch,
        "threads": threads,
        "shapes": [list(s) for s in shapes],
        "seconds": tot,
        "ratio_u8s8": tot["fp32"] / tot["u8s8"],
        "ratio_u8u8": tot["fp32"] / tot["u8u8"],
    }


def gemm_ratio(shapes: Sequence[tuple[int, int]], batch: int, threads: int = 1, repeats: int = 5) -> dict[str, Any]:
    """This machine's int8/fp32 GEMM speed ratio on ``shapes`` (``(in, out)`` per layer) at ``batch``:
    ONNX Runtime ``MatMulInteger`` (u8×s8 and u8×u8) against ``torch.mm`` in fp32, interleaved."""
    fns = _gemm_fns(shapes, batch, threads)
    with _torch_threads(threads):
        times = _interleaved(fns, repeats)
    return _gemm_summary({k: statistics.median(v) for k, v in times.items()}, shapes, batch, threads)


def _linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    shapes = []
    for m in float_model(model).modules():
        if isinstance(m, nn.Linear):
            shapes.append((m.in_features, m.out_features))
    return shapes


def _machine() -> dict[str, Any]:
    import onnxruntime as ort

    from .export.runtime import cpu_features

    f = cpu_features()
    simd = [k for k in ("avx2", "fma", "avx512f", "vnni", "amx") if f.get(k)]
    if f["x86"] and not f["vnni"]:
        simd.append("no VNNI")
    return {"cpu": f["model"], "arch": f["arch"], "cores": f["cores"], "simd": simd,
            "onnxruntime": ort.__version__, "torch": torch.__version__.split("+")[0]}


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


def _gpu_rows(fp32_path: Path | None, int8_path: Path | None, fmodel: nn.Module, x: np.ndarray,
              eps: np.ndarray, batch: int, repeats: int, latency_iters: int) -> tuple[list[BenchRow], dict]:
    """fp32 torch on CUDA and ONNX Runtime's TensorRT / CUDA providers on the same files, when present."""
    rows: list[BenchRow] = []
    status = []
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception:  # pragma: no cover
        providers = []
    cuda = torch.cuda.is_available()
    if not cuda and not {"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(providers):
        try:
            import tensorrt  # noqa: F401

            trt = "importable, but no CUDA device"
        except Exception:
            trt = "not importable"
        return rows, {"status": f"skipped: no CUDA device (torch.cuda.is_available() is False; TensorRT {trt}; "
                                f"ONNX Runtime providers: {', '.join(providers)})"}
    from .models.vae import vae_loss

    if cuda:  # pragma: no cover - needs a GPU
        dev = torch.device("cuda")
        gm = fmodel.to(dev).eval()
        xt, et = torch.from_numpy(x).to(dev), torch.from_numpy(eps).to(dev)

        def run_b():
            with torch.inference_mode():
                gm(xt[:batch], et[:batch])
            torch.cuda.synchronize()

        def run_1():
            with torch.inference_mode():
                gm(xt[:1], et[:1])
            torch.cuda.synchronize()

        total = 0.0
        with torch.inference_mode():
            for i in range(0, len(xt), batch):
                logits, mu, logvar = gm(xt[i:i + batch], et[i:i + batch])
                total += float(vae_loss(logits, xt[i:i + batch], mu, logvar).total.double())
        total /= len(xt)
        tb = statistics.median(_interleaved({"b": run_b}, repeats)["b"])
        t1 = statistics.median(_interleaved({"1": run_1}, repeats, latency_iters)["1"])
        rows.append(BenchRow("fp32 torch eager (CUDA)", "torch", "cuda", loss=total, batch_seconds=tb,
                             throughput=batch / tb, latency_ms=t1 * 1e3, kernel=torch.cuda.get_device_name()))
        status.append(f"CUDA: {torch.cuda.get_device_name()}")
    for prov, label in (("TensorrtExecutionProvider", "TensorRT"), ("CUDAExecutionProvider", "ONNX Runtime CUDA")):
        if prov not in providers:
            status.append(f"{label}: provider not available")
            continue
        for path, what in ((fp32_path, "fp32"), (int8_path, "int8")):  # pragma: no cover - needs a GPU
            if path is None:
                continue
            try:
                from .export.runtime import load_session, vae_test_loss

                s = load_session(path, providers=[prov, "CPUExecutionProvider"])
                loss = vae_test_loss(s, x, eps, batch)
                tb = statistics.median(_interleaved({"b": lambda: s.run(x[:batch], eps[:batch])}, repeats)["b"])
                t1 = statistics.median(_interleaved({"1": lambda: s.run(x[:1], eps[:1])}, repeats, latency_iters)["1"])
                rows.append(BenchRow(f"{what} {label}", "onnxruntime", "cuda", loss=loss, batch_seconds=tb,
                                     throughput=batch / tb, latency_ms=t1 * 1e3,
                                     file_bytes=Path(path).stat().st_size, kernel=", ".join(s.info.providers)))
            except Exception as e:
                rows.append(BenchRow(f"{what} {label}", "onnxruntime", "cuda", skipped=f"{type(e).__name__}: {e}"))
    return rows, {"status": "; ".join(status) or "GPU rows above"}


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------


def _test_images(images, dataset: str, data_dir, progress: bool) -> np.ndarray:
    if images is None:
        from .data import load_dataset

        images = load_dataset(dataset, "test", data_dir, progress=progress).images
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(images, dtype=np.float32).reshape(len(images), -1))


def bench_model(
    model: nn.Module,
    images=None,
    *,
    int4_model: nn.Module | None = None,
    dataset: str = "mnist",
    data_dir=None,
    batch_size: int = 10_000,
    repeats: int = 5,
    latency_iters: int = 500,
    threads: int = 1,
    precision: str = "auto",
    native_int4: bool = True,
    gpu: bool = True,
    workdir: str | os.PathLike | None = None,
    progress: bool = False,
    source: dict | None = None,
) -> BenchResult:
    """Benchmark a (quantized) VAE in memory; see :func:`bench_run`."""
    from .export.onnx import ExportError, _is_vae, export
    from .export.runtime import load_session, vae_test_loss
    from .models.vae import eval_eps

    if not _is_vae(model):
        raise ValueError(f"bench measures lowbit's VAE (test loss needs its outputs); got {type(model).__name__}")
    if repeats < 1 or latency_iters < 1 or batch_size < 1 or threads < 1:
        raise ValueError("repeats, latency_iters, batch_size and threads must be positive")
    model = model.eval()
    x = _test_images(images, dataset, data_dir, progress)
    n = len(x)
    batch = min(batch_size, n)
    eps = eval_eps(n, model.latent, seed=0).numpy()
    notes: list[str] = []
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-bench-")
        workdir = tmp.name
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        fmodel = float_model(model)
        xt, et = torch.from_numpy(x), torch.from_numpy(eps)
        rows: list[BenchRow] = []
        runners: dict[str, tuple[Callable, Callable]] = {}

        # torch eager: the float model, and the simulated model (the parity reference)
        with _torch_threads(threads):
            sim_loss = _torch_loss(model, xt, et, batch)
            fp32_loss = _torch_loss(fmodel, xt, et, batch)
        rows.append(BenchRow(EAGER, "torch", loss=fp32_loss, threads=threads, kernel="torch.mm fp32"))

        def eager(m, b):
            def f():
                with torch.inference_mode():
                    m(xt[:b], et[:b])
            return f

        runners[EAGER] = (eager(fmodel, batch), eager(fmodel, 1))
        has_quant = bool(_quant_layers(model))
        if has_quant:
            rows.append(BenchRow(SIM, "torch", loss=sim_loss, reference_loss=sim_loss, threads=threads,
                                 kernel="fake quant in fp32", notes=["the loss every deployed row must match"]))
            runners[SIM] = (eager(model, batch), eager(model, 1))

        # ONNX files (the eps graph: the same computation as the eager rows)
        files: dict[str, Path | None] = {}

        def do_export(m, fmt, name):
            path = workdir / f"{name}.eps.onnx"
            try:
                export(m, path, fmt, vae_graph="eps")
                return path, None
            except ExportError as e:
                return None, str(e)

        files["fp32"], err = do_export(model, "onnx-fp32", "fp32")
        if err:
            raise ExportError(err)
        sessions = {}
        s = load_session(files["fp32"], threads=threads)
        sessions[ORT_FP32] = s
        rows.append(BenchRow(ORT_FP32, "onnxruntime", file_bytes=files["fp32"].stat().st_size, threads=threads,
                             kernel="sgemm"))
        int8_ref = sim_loss if has_quant else fp32_loss
        if has_quant:
            files["int8"], err = do_export(model, "onnx-int8", "int8")
            if err:
                rows.append(BenchRow(ORT_INT8, "onnxruntime", skipped=err))
            else:
                s = load_session(files["int8"], threads=threads, precision=precision)
                sessions[ORT_INT8] = s
                rows.append(BenchRow(ORT_INT8, "onnxruntime", reference_loss=int8_ref,
                                     file_bytes=files["int8"].stat().st_size, threads=threads,
                                     kernel=s.info.int8_kernel, notes=list(s.info.transforms)))
                notes += s.info.notes
        else:
            rows.append(BenchRow(ORT_INT8, "onnxruntime", skipped="the model is not quantized"))
        m4 = int4_model if int4_model is not None else model
        ref4 = None
        if int4_model is not None:
            with _torch_threads(threads):
                ref4 = _torch_loss(int4_model.eval(), xt, et, batch)
        elif has_quant:
            ref4 = sim_loss
        if _quant_layers(m4):
            files["int4"], err = do_export(m4, "onnx-int4", "int4")
            if err:
                if "never re-quantizes at export" in err and "paper variant" not in err:
                    err = ("the run's weights are wider than 4 bits and lowbit never re-quantizes at export; "
                           "bench a run quantized to <= 4-bit weights (int4_run_dir / --int4-run)")
                rows.append(BenchRow(ORT_INT4, "onnxruntime", skipped=err))
            else:
                s = load_session(files["int4"], threads=threads, precision=precision, int4="unpack")
                sessions[ORT_INT4] = s
                rows.append(BenchRow(ORT_INT4, "onnxruntime", reference_loss=ref4,
                                     file_bytes=files["int4"].stat().st_size, threads=threads,
                                     kernel=s.info.int8_kernel,
                                     notes=[_int4_note(m4)] + list(s.info.transforms)))
                if native_int4:
                    s = load_session(files["int4"], threads=threads, int4="native", weight_only="native")
                    sessions[ORT_INT4_NATIVE] = s
                    rows.append(BenchRow(ORT_INT4_NATIVE, "onnxruntime", reference_loss=ref4,
                                         file_bytes=files["int4"].stat().st_size, threads=threads,
                                         kernel="MatMulNBits (ONNX Runtime as-is)",
                                         notes=["the same file without lowbit's load-time widening"]))
        else:
            rows.append(BenchRow(ORT_INT4, "onnxruntime", skipped="the model is not quantized"))

        feeds_b = {"x": np.ascontiguousarray(x[:batch]), "eps": np.ascontiguousarray(eps[:batch])}
        feeds_1 = {"x": np.ascontiguousarray(x[:1]), "eps": np.ascontiguousarray(eps[:1])}
        for name, s in sessions.items():
            runners[name] = ((lambda o, f: lambda: o.run(None, f))(s.session, feeds_b),
                             (lambda o, f: lambda: o.run(None, f))(s.session, feeds_1))
            row = next(r for r in rows if r.name == name)
            row.loss = vae_test_loss(s, x, eps, batch)

        # timings: interleaved, medians
        # the GEMM ceiling is timed in the same rounds as the models, under the same load
        shapes = _linear_shapes(model)
        gemm_fns = _gemm_fns(shapes, batch, threads)
        with _torch_threads(threads):
            tb = _interleaved({**{k: v[0] for k, v in runners.items()}, **gemm_fns}, repeats)
            # batch 1: short bursts (steady state per model) over many rounds, so that load from
            # other processes lands on every row alike
            chunk = min(25, latency_iters)
            t1 = _interleaved({k: v[1] for k, v in runners.items()}, math.ceil(latency_iters / chunk), chunk)
        for r in rows:
            if r.name in tb:
                r.batch_seconds = statistics.median(tb[r.name])
                r.throughput = batch / r.batch_seconds
                r.latency_ms = statistics.median(t1[r.name]) * 1e3
        gemm = _gemm_summary({k: statistics.median(v) for k, v in tb.items() if k.startswith("gemm/")},
                             shapes, batch, threads)
        i8 = next((r for r in rows if r.name == ORT_INT8 and not r.skipped), None)
        # (no int8 row, a float run: no kernel to name)
        used = (None if i8 is None or not i8.kernel or i8.kernel == "n/a"  # (no integer GEMM: weight-only layers)
                else "u8u8" if i8.kernel.startswith("u8u8") else "u8s8")
        gemm["kernel_used"] = used
        gemm["ratio_used"] = gemm.get(f"ratio_{used}") if used else None
        gpu_rows, gpu_info = ([], {"status": "not requested"})
        if gpu:
            gpu_rows, gpu_info = _gpu_rows(files.get("fp32"), files.get("int8"), fmodel, x, eps, batch, repeats,
                                           latency_iters)
        rows += gpu_rows
        layers = [{"name": name, "weight_bits": getattr(w.weight_quantizer, "bits", None) if w.weight_quantizer is not None else None,
                   "input": w.input_quantizer is not None, "output": w.output_quantizer is not None}
                  for name, w in _quant_layers(model)]
        quantized = {name for name, w in _quant_layers(model) if w.input_quantizer is not None}
        float_layers = [name for name, mod in fmodel.named_modules()
                        if isinstance(mod, (nn.Linear, nn.Conv2d)) and name not in quantized]
        if float_layers:
            notes.append(f"the acceptance targets were set for W8A8 on every layer; this model keeps "
                         f"{', '.join(float_layers)} in float (no integer kernel), so its size and speed "
                         "rows are for reference against them")
        settings = {"images": n, "batch_size": batch, "repeats": repeats, "latency_iters": latency_iters,
                    "threads": threads, "precision": precision, "layers": layers, "float_layers": float_layers,
                    "notes": notes}
        return BenchResult(rows, settings, _machine(), gemm, gpu_info, dict(source or {}))
    finally:
        if tmp is not None:
            tmp.cleanup()


def _int4_note(model: nn.Module) -> str:
    """What the int4 row deploys: 4-bit weights, with 8-bit activations where layers quantize them."""
    with_input = [w.input_quantizer is not None for _, w in _quant_layers(model)]
    if all(with_input):
        return "4-bit weights packed in the file, 8-bit activations"
    if not any(with_input):
        return "4-bit weights packed in the file; float activations (weight-only layers run float GEMMs)"
    return "4-bit weights packed in the file; 8-bit activations where a layer quantizes its input, float elsewhere"


def _quant_layers(model: nn.Module):
    from .export.onnx import find_quantized_layers

    return find_quantized_layers(model)


def bench_run(
    run_dir: str | os.PathLike,
    *,
    int4_run_dir: str | os.PathLike | None = None,
    images=None,
    dataset: str = "mnist",
    data_dir=None,
    batch_size: int = 10_000,
    repeats: int = 5,
    latency_iters: int = 500,
    threads: int = 1,
    precision: str = "auto",
    gpu: bool = True,
    workdir: str | os.PathLike | None = None,
    progress: bool = False,
) -> BenchResult:
    """Benchmark the VAE saved in ``run_dir`` as deployed, side by side in one process.

    Rows: fp32 torch eager (the run's float weights, quantizers dropped), the simulated quantized
    model in torch (the parity reference), fp32 ONNX Runtime, int8 ONNX Runtime (the run exported
    with ``onnx-int8``), int4 ONNX Runtime (``onnx-int4`` of ``int4_run_dir`` if given, else of
    ``run_dir`` when its weights fit 4 bits; both as lowbit's runtime runs it and as plain ONNX
    Runtime does), and GPU rows when a CUDA device / TensorRT is present (else ``gpu.status`` says
    why not).  ``images``: the test images (default: ``load_dataset(dataset, "test", data_dir)``).
    """
    from .checkpoint import load_model

    model = load_model(run_dir)
    m4 = load_model(int4_run_dir) if int4_run_dir is not None else None
    src = {"run_dir": str(run_dir), "int4_run_dir": None if int4_run_dir is None else str(int4_run_dir)}
    return bench_model(model, images, int4_model=m4, dataset=dataset, data_dir=data_dir, batch_size=batch_size,
                       repeats=repeats, latency_iters=latency_iters, threads=threads, precision=precision,
                       gpu=gpu, workdir=workdir, progress=progress, source=src)


def bench_cli(args) -> BenchResult:
    """``lowbit bench RUN_DIR``: run :func:`bench_run`, print the table, optionally write JSON."""
    from .checkpoint import CheckpointError, ensure_dir, write_json

    if getattr(args, "json", None):  # a bad --json fails now, not after the whole benchmark
        if Path(args.json).is_dir():
            raise CheckpointError(f"--json {args.json} is a folder; give a file name")
        ensure_dir(Path(args.json).parent, option="--json")
    result = bench_run(
        args.run_dir,
        int4_run_dir=getattr(args, "int4_run", None),
        dataset=getattr(args, "dataset", "mnist"),
        data_dir=getattr(args, "data_dir", None),
        repeats=getattr(args, "repeats", 5),
        threads=getattr(args, "threads", None) or 1,
        progress=not getattr(args, "no_progress", False),
    )
    result.print()
    if getattr(args, "json", None):
        write_json(args.json, result.to_dict())
    return result


def study_deployment(cfg, plan, records, out: Path, test, *, repeats: int = 3, latency_iters: int = 300,
                     gpu: bool = True) -> dict | None:
    """The study report's "real deployment" table: the first seed's 8-bit run (one with quantized
    inputs: LSQ, QAT or PTQ) exported to int8, its 4-bit counterpart to int4, benchmarked."""
    from .checkpoint import write_json

    def pick(bits: int):
        order = {"lsq": 0, "qat": 1, "ptq": 2, "dorefa": 3}
        cands = [r for r in plan if r.bits == bits and r.kind in ("quantized", "ptq") and r.folder in records
                 and (Path(out) / r.folder / "model.safetensors").is_file()]
        cands.sort(key=lambda r: (not r.folder.startswith("seed0"), order.get(getattr(r.spec, "method", ""), 9)))
        return cands[0] if cands else None

    r8, r4 = pick(8), pick(4)
    base = r8 or r4
    if base is None:
        return None
    result = bench_run(Path(out) / base.folder, int4_run_dir=(Path(out) / r4.folder) if (r4 and r8) else None,
                       images=test.images, repeats=repeats, latency_iters=latency_iters, gpu=gpu)
    write_json(Path(out) / "deployment.json", result.to_dict())
    md = (f"int8 from `{base.folder}`" + (f", int4 from `{r4.folder}`" if (r4 and r8) else "") + ". "
          + result.to_markdown())
    return {"markdown": md, "result": result.to_dict()}
