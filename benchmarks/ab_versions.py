"""Two versions of lowbit side by side in one process: this checkout's and another checkout's
training step, on the same models and batches, timed in interleaved rounds against fp32.

    git worktree add /tmp/lowbit-old <commit>          # (or any other copy of the repository)
    python benchmarks/ab_versions.py /tmp/lowbit-old --methods lsq,dorefa --threads 2
    python benchmarks/ab_versions.py /tmp/lowbit-old --layers 5 --tiny     # fixed costs only
    python benchmarks/ab_versions.py /tmp/lowbit-old --weight-quantizer    # one kernel call, not training

The other version's package (``<checkout>/src/lowbit``) is copied into a temporary directory and
imported as ``lowbit_other`` (lowbit's modules import each other relatively, so both versions
live side by side; each loads its own build of the fused kernels).  Variants: fp32, then W8A8
with each method from this version and from the other, on the study's four layers or all five,
built from the same float model.  Each round runs ``--steps`` training steps of every variant in
turn (alternating order, the same batches); a round's time divided by fp32's in the same round is
a paired ratio.  Printed: the median ms a step, the median paired ratio with its 95% bootstrap
interval, and the median ms over fp32.  ``--tiny`` makes every layer 8 wide (random 8-pixel
images): only the per-step fixed costs remain.  Needs MNIST in ``LOWBIT_DATA_DIR`` for the real
VAE (else uniform random images).  ``--weight-quantizer`` times instead the backward pass of
each method's fused weight quantizer alone (``kernels.lsq`` on a 400 x 784 weight: LSQ's, and
DoReFa's on tanh) in the two versions, alternating call by call, medians of ``--rounds`` x
``--steps`` calls in µs.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
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


def weight_quantizer_backward(new, old, methods: list[str], calls: int) -> None:
    """Median µs of the backward pass of each method's fused weight quantizer, new and old, the
    same weight and incoming gradients for both, alternating call by call."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(400, 784, generator=gen) * 0.3
    grads = [torch.randn(400, 784, generator=gen) for _ in range(4)]
    kernels = {"new": new.kernels.get(), "old": old.kernels.get()}
    if None in kernels.values():
        raise SystemExit("the fused kernels are needed (LOWBIT_KERNELS=1) for --weight-quantizer")
    for method in methods:
        on_tanh = {"lsq": False, "dorefa": True}.get(method)
        if on_tanh is None:
            continue  # (QAT's and PTQ's weights take the straight-through gradient: no backward work)
        times: dict[str, list[float]] = {"new": [], "old": []}
        for i in range(calls):
            for version in ("new", "old") if i % 2 == 0 else ("old", "new"):
                x, s = w.clone().requires_grad_(), torch.tensor(0.03, requires_grad=True)
                y = kernels[version].lsq(x, s, -128, 127, 0.01, on_tanh)
                g = grads[i % len(grads)].clone()
                start = time.perf_counter()
                y.backward(g)
                times[version].append(time.perf_counter() - start)
        med = {v: statistics.median(t[len(t) // 20 :]) * 1e6 for v, t in times.items()}
        print(f"{method:8s} weight quantizer backward, 400 x 784: new {med['new']:8.1f} µs, old {med['old']:8.1f} µs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (its src/lowbit is timed as 'old')")
    parser.add_argument("--methods", default="lsq,dorefa", help="comma-separated (default lsq,dorefa)")
    parser.add_argument("--layers", type=int, choices=(4, 5), default=4, help="the study's 4 layers or all 5")
    parser.add_argument("--weight-quantizer", action="store_true",
                        help="time the fused weight quantizers' backward pass alone, not training")
    round_options(parser, rounds=24, steps=25)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        other = import_other(args.other.resolve(), Path(tmp))
        if args.weight_quantizer:
            print(f"torch {torch.__version__}, lowbit new {lowbit.__version__} / old {other.__version__} "
                  f"({args.other}), {args.threads} thread(s), {args.rounds * args.steps} calls each")
            weight_quantizer_backward(lowbit, other, args.methods.split(","), args.rounds * args.steps)
            return
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
