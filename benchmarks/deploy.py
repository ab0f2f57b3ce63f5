"""Real deployment of the quantized VAE, measured side by side in one process.

fp32 torch eager, fp32 ONNX Runtime, int8 ONNX Runtime and int4 ONNX Runtime (packed 4-bit
weights; as lowbit's runtime runs it and as plain ONNX Runtime does), plus the GPU when one is
present: test loss on the 10,000 MNIST test images (fixed noise), throughput at batch 10,000,
median latency at batch 1, file size, threads; and this machine's int8/fp32 GEMM ratio, the
ceiling for int8 throughput.  See docs/EXPORT.md.

    python benchmarks/deploy.py                           # trains its own runs (a few minutes)
    python benchmarks/deploy.py --run runs/w8 --int4-run runs/w4
    python benchmarks/deploy.py --full-range              # also W8A8 with full 8-bit weights

Without ``--run`` it trains an fp32 VAE (``--epochs``), then fine-tunes two QAT copies for one
epoch each with every layer quantized: W8A8 with the 7-bit weight range (``weight_range:
reduced``, which keeps ONNX Runtime's fast u8 x s8 kernel exact on CPUs without VNNI) and W4A8.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from lowbit.bench import bench_run
from lowbit.checkpoint import save_run, write_json
from lowbit.data import load_dataset
from lowbit.models.vae import VAE


def _config(bits_w: int) -> list[dict]:
    return [{"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": bits_w}, "op_types": ["Linear"]}]


def make_runs(out: Path, epochs: int, data_dir, full_range: bool) -> dict[str, Path]:
    """Train the fp32 baseline and the quantized fine-tunes; save each as a run folder."""
    import lowbit
    from lowbit.train import evaluate, fit

    train = load_dataset("mnist", "train", data_dir, progress=False)
    test = load_dataset("mnist", "test", data_dir, progress=False)
    torch.manual_seed(0)
    base = VAE()
    fit(base, train.images, epochs=epochs, progress=True, description="fp32")
    runs = {}
    variants = [("w8a8-7bit", 8, {"weight_range": "reduced"}), ("w4a8", 4, {})]
    if full_range:
        variants.append(("w8a8-8bit", 8, {}))
    for name, bits, options in variants:
        m = VAE()
        m.load_state_dict(base.state_dict())
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        lowbit.quantize(m, _config(bits), "qat", optimizer=opt, **options)
        fit(m, train.images, epochs=1, optimizer=opt, progress=True, description=name)
        loss = evaluate(m, test.images, iwae_k=0).loss
        print(f"{name}: simulated test loss {loss:.3f}")
        runs[name] = save_run(out / name, m, model_spec={"name": "vae", "kwargs": {}},
                              quant={"method": "qat", "config_list": _config(bits), "options": options})
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=None, help="an 8-bit run folder (default: train one)")
    p.add_argument("--int4-run", type=Path, default=None, help="a run with <= 4-bit weights for the int4 rows")
    p.add_argument("--out", type=Path, default=None, help="where to keep trained runs (default: a temp folder)")
    p.add_argument("--epochs", type=int, default=5, help="fp32 epochs when training (default 5)")
    p.add_argument("--full-range", action="store_true", help="also bench W8A8 with full 8-bit weights")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--repeats", type=int, default=7, help="interleaved repetitions at batch 10,000 (default 7)")
    p.add_argument("--latency-iters", type=int, default=1000, help="batch-1 calls per row (default 1000)")
    p.add_argument("--threads", type=int, default=1, help="threads for every backend (default 1)")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as markdown here")
    args = p.parse_args()

    tmp = None
    if args.run is None:
        out = args.out
        if out is None:
            tmp = tempfile.TemporaryDirectory(prefix="lowbit-deploy-")
            out = Path(tmp.name)
        runs = make_runs(out, args.epochs, args.data_dir, args.full_range)
        run8, run4 = runs["w8a8-7bit"], runs["w4a8"]
        extra = [runs["w8a8-8bit"]] if args.full_range else []
    else:
        run8, run4, extra = args.run, args.int4_run, []
    try:
        common = dict(data_dir=args.data_dir, repeats=args.repeats, latency_iters=args.latency_iters,
                      threads=args.threads)
        result = bench_run(run8, int4_run_dir=run4, **common)
        result.print()
        figures = {"main": result.to_dict()}
        md = [result.to_markdown()]
        for run in extra:
            print(f"\n{run.name}: full 8-bit weight range")
            r = bench_run(run, **common)
            r.print()
            figures[run.name] = r.to_dict()
            md += ["", f"### {run.name}", "", r.to_markdown()]
        if args.json:
            write_json(args.json, figures)
        if args.markdown:
            args.markdown.write_text("\n".join(md) + "\n")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
