"""fp32 VAE training throughput against this machine's GEMM peak, measured in one process.

For each thread count: the peak of a large ``torch.mm`` (best of several), then lowbit's trainer
(``lowbit.train.fit``) on MNIST-sized data at batch 128, interleaved with the peak measurement,
and the model's achieved GFLOP/s (forward + backward FLOPs of its five Linear layers; fc1's input
gradient is not computed) as a fraction of the peak.

    python benchmarks/train_speed.py [--threads 1,2] [--images 30000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lowbit.models.vae import VAE
from lowbit.train import fit


def gemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-``repeats`` GFLOP/s of an n x n x n float32 matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def vae_train_flops_per_image(model: VAE) -> int:
    """Forward (2·in·out per Linear) + backward (weight grad, and input grad except for fc1)."""
    total = 0
    for name, layer in model.named_children():
        macs = layer.in_features * layer.out_features
        total += 2 * macs * (2 if name == "fc1" else 3)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--images", type=int, default=30_000, help="training images per measured epoch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.rand(args.images, 1, 28, 28)
    flops = vae_train_flops_per_image(VAE())
    print(f"VAE training FLOPs per image: {flops / 1e6:.2f} M (batch 128, Adam)")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        model = VAE()
        fit(model, images[:2048], epochs=1, progress=False)  # warm-up
        peaks, rates = [], []
        for _ in range(args.repeats):  # interleaved: peak, epoch, peak, epoch ...
            peaks.append(gemm_gflops())
            result = fit(model, images, epochs=1, progress=False)
            rates.append(result.images_per_second)
        peak, rate = max(peaks), statistics.median(rates)
        achieved = rate * flops / 1e9
        print(f"threads={threads}: GEMM peak {peak:6.1f} GFLOP/s | training {rate:8.0f} img/s = "
              f"{achieved:5.1f} GFLOP/s = {achieved / peak:5.1%} of peak "
              f"(epoch of 60k images: {60_000 / rate:.2f} s)")


if __name__ == "__main__":
    main()
