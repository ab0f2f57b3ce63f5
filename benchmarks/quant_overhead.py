"""Training-time overhead of simulated quantization: one VAE training epoch per method, divided
by the fp32 epoch, measured side by side in one process.

    python benchmarks/quant_overhead.py            # full epochs (60k MNIST images), 3 repetitions
    python benchmarks/quant_overhead.py --images 12800 --reps 5   # quicker

Variants: fp32, then W8A8 (weight and input quantized to 8 bits) with each method on the study's
layers (fc1, fc21, fc22, fc3) and on all five Linear layers.  Repetitions are interleaved
(every variant once per round) so drifting machine load hits all of them alike; the figure is the
median epoch time over rounds, divided by fp32's median.  Run at 1 thread and at 2 threads.
Target: <= 1.15 for every method.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import lowbit
from lowbit.models.vae import VAE

STUDY_LAYERS = ["fc1", "fc21", "fc22", "fc3"]
ALL_LAYERS = ["fc1", "fc21", "fc22", "fc3", "fc4"]
METHODS = ["qat", "dorefa", "lsq", "ptq"]


def load_images(n: int) -> torch.Tensor:
    try:
        from lowbit.data import load_dataset

        images = load_dataset("mnist", "train", download=False, progress=False).images
    except Exception as e:  # no data here: the timing does not depend on pixel values much
        print(f"(MNIST not available: {e.__class__.__name__}; timing on uniform random images)", file=sys.stderr)
        images = torch.rand(60_000, 1, 28, 28)
    return images[:n].contiguous()


def make_variants(seed: int = 0) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    from lowbit.train import make_optimizer

    variants = {}
    torch.manual_seed(seed)
    base = VAE()
    fp32 = VAE()
    fp32.load_state_dict(base.state_dict())
    variants["fp32"] = (fp32, make_optimizer(fp32))
    for layers, tag in ((STUDY_LAYERS, "4 layers"), (ALL_LAYERS, "5 layers")):
        for method in METHODS:
            m = VAE()
            m.load_state_dict(base.state_dict())
            opt = make_optimizer(m)
            cfg = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": layers}]
            lowbit.quantize(m, cfg, method, optimizer=opt)
            variants[f"{method} W8A8 {tag}"] = (m, opt)
    return variants


def epoch_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor, seed: int) -> float:
    from lowbit.train import fit

    return fit(model, images, epochs=1, optimizer=opt, seed=seed, progress=False).epoch_seconds[0]


def run(threads: int, images: torch.Tensor, reps: int) -> None:
    torch.set_num_threads(threads)
    variants = make_variants()
    for model, opt in variants.values():  # warm-up (and first-batch initialisation)
        epoch_seconds(model, opt, images[:1280], seed=0)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(reps):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            model, opt = variants[name]
            times[name].append(epoch_seconds(model, opt, images, seed=r + 1))
    base = statistics.median(times["fp32"])
    print(f"\n{threads} thread(s), {images.shape[0]} images per epoch, median of {reps} interleaved rounds")
    print(f"{'variant':<24} {'epoch s':>9} {'/ fp32':>8}")
    for name, ts in times.items():
        med = statistics.median(ts)
        flag = "" if name == "fp32" or med / base <= 1.15 else "  > 1.15"
        print(f"{name:<24} {med:9.3f} {med / base:8.3f}{flag}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60_000, help="images per epoch (default: all 60,000)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("LOWBIT_DATA_DIR", "/work/shared/data/mnist")
    images = load_images(args.images)
    print(f"torch {torch.__version__}, lowbit {lowbit.__version__}, {os.cpu_count()} CPUs")
    for t in args.threads:
        run(t, images, args.reps)


if __name__ == "__main__":
    main()
