"""Two versions of lowbit side by side in one process: this checkout's and another checkout's
training step, on the same models and batches, timed in interleaved rounds against fp32.

    git worktree add /tmp/lowbit-old <commit>          # (or any other copy of the repository)
    python benchmarks/ab_versions.py /tmp/lowbit-old --methods lsq,dorefa --threads 2
    python benchmarks/ab_versions.py /tmp/lowbit-old --layers 5 --tiny     # fixed costs only

The other version's package (``<checkout>/src/lowbit``) is copied into a temporary directory and
imported as ``lowbit_other`` (lowbit's modules import each other relatively, so both versions
live side by side; each loads its own build of the fused kernels).  Variants: fp32, then W8A8
with each method from this version and from the other, on the study's four layers or all five,
built from the same float model.  Each round runs ``--steps`` training steps of every variant in
turn (alternating order, the same batches); a round's time divided by fp32's in the same round is
a paired ratio.  Printed: the median ms a step, the median paired ratio with its 95% bootstrap
interval, and the median ms over fp32.  ``--tiny`` makes every layer 8 wide (random 8-pixel
images): only the per-step fixed costs remain.  Needs MNIST in ``LOWBIT_DATA_DIR`` for the real
VAE (else uniform random images).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import lowbit
from lowbit.models.vae import VAE
from lowbit.train import make_optimizer
from lsq_cost_split import TINY, interleaved_rounds, round_options
from quant_overhead import ALL_LAYERS, STUDY_LAYERS, eager_step, load_images, median_interval


def import_other(checkout: Path, into: Path):
    """The lowbit package of another checkout, imported as ``lowbit_other``."""
    src = checkout / "src" / "lowbit"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"{checkout} is not a lowbit checkout: no src/lowbit/__init__.py there")
    shutil.copytree(src, into / "lowbit_other", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(into))
    return importlib.import_module("lowbit_other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (its src/lowbit is timed as 'old')")
    parser.add_argument("--methods", default="lsq,dorefa", help="comma-separated (default lsq,dorefa)")
    parser.add_argument("--layers", type=int, choices=(4, 5), default=4, help="the study's 4 layers or all 5")
    round_options(parser, rounds=24, steps=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        other = import_other(args.other.resolve(), Path(tmp))
        batch, pool = 128, 8 * args.steps
        images = torch.rand(batch * pool, TINY) if args.tiny else load_images(batch * pool)
        batches = [images[i * batch : (i + 1) * batch] for i in range(pool)]
        dims = {"in_features": TINY, "hidden": TINY, "latent": TINY} if args.tiny else {}
        layers = ALL_LAYERS if args.layers == 5 else STUDY_LAYERS
        torch.manual_seed(0)
        base = VAE(**dims)
        models = {}
        for tag in ["fp32"] + [f"{m} {v}" for m in args.methods.split(",") for v in ("new", "old")]:
            m = VAE(**dims)
            m.load_state_dict(base.state_dict())
            opt = make_optimizer(m)
            if tag != "fp32":
                method, version = tag.split()
                lib = lowbit if version == "new" else other
                cfg = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": layers}]
                lib.quantize(m, cfg, method, optimizer=opt)
            for b in batches[:3]:  # warm-up, and the first batch's initialisation
                eager_step(m, opt, b)
            models[tag] = (m, opt)
        times = interleaved_rounds(models, batches, args.rounds, args.steps)
        names = list(models)
        print(f"torch {torch.__version__}, lowbit new {lowbit.__version__} / old {other.__version__} "
              f"({args.other}), {args.threads} thread(s), {args.rounds} rounds of {args.steps} steps (batch 128), "
              f"W8A8 on {', '.join(layers)}" + (f", layers {TINY} wide" if args.tiny else ""))
        print(f"{'variant':16s} {'ms / step':>9s}  {'/ fp32 (paired)':>15s}  {'95% interval':>13s}  {'ms over fp32':>12s}")
        fp32 = times["fp32"]
        for name in names:
            ratios = [a / b for a, b in zip(times[name], fp32)]
            lo, hi = median_interval(ratios)
            over = statistics.median(a - b for a, b in zip(times[name], fp32)) * 1e3
            print(f"{name:16s} {statistics.median(times[name]) * 1e3:9.3f}  {statistics.median(ratios):15.3f}  "
                  f"{lo:6.3f}-{hi:6.3f}  {over:12.3f}")


if __name__ == "__main__":
    main()
