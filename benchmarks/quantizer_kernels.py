"""Per-quantizer cost: forward + backward of each method's weight quantizer on the VAE's largest
weight (400 x 784), and of the activation quantizers on a batch of fc1's input (128 x 784), plus
DoReFa's tanh and an LSQ-quantized fc1 as a whole (input, weight, matmul; on MNIST-like images,
which need no gradient: the fused path skips ``dL/dx_hat``) — each with lowbit's fused CPU kernels (``lowbit.kernels``) and with its PyTorch
code (the fallback where the kernels cannot be built), side by side.  Microseconds per call:
median of ``--reps`` rounds of ``--calls`` calls, the best of ``--rounds`` alternating rounds of
the two modes, in one process; 1 thread by default.

    python benchmarks/quantizer_kernels.py
    python benchmarks/quantizer_kernels.py --threads 2

For scale: one fp32 VAE training step (batch 128) takes about 8 ms at 1 thread on the 2-core EPYC
these figures were taken on (``benchmarks/quant_overhead.py`` times whole epochs).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch import nn

import lowbit
from lowbit import kernels
from lowbit.methods.dorefa import tanh as lowbit_tanh


def per_call_us(fn, calls: int, reps: int) -> float:
    for _ in range(10):
        fn()
    rounds = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


W = (torch.randn(400, 784, generator=torch.Generator().manual_seed(0)) * 0.05).requires_grad_()
G = torch.randn(400, 784, generator=torch.Generator().manual_seed(1))
# MNIST-like images: 19% nonzero pixels on the 1/255 grid (as MNIST's), the rest exact zeros
_gen = torch.Generator().manual_seed(4)
IMAGES = torch.where(torch.rand(128, 784, generator=_gen) < 0.19,
                     torch.randint(1, 256, (128, 784), generator=_gen) / 255.0, torch.zeros(()))


def measure(calls: int, reps: int) -> dict[str, float]:
    """The per-call times of DoReFa's tanh and of every method's weight and input quantizer."""
    timings: dict[str, float] = {}
    timings["lowbit tanh, forward"] = per_call_us(lambda: lowbit_tanh(W.detach()), calls, reps)
    timings["lowbit tanh, forward + backward"] = per_call_us(lambda: lowbit_tanh(W).backward(G), calls, reps)
    x = torch.rand(128, 784, generator=torch.Generator().manual_seed(2))
    for method in ("qat", "ptq", "lsq", "dorefa"):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(784, 400))
        lowbit.quantize(m, [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_types": ["Linear"]}], method)
        layer = m[0]
        if method == "ptq":
            lowbit.calibrate(m, [x])
        else:
            layer(x)  # first batch: initialises activation ranges / steps
        wq, iq = layer.weight_quantizer, layer.input_quantizer
        timings[f"{method} weight quantizer, fwd + bwd"] = per_call_us(
            lambda: wq(layer.module.weight).backward(G), calls, reps)
        xg = x.clone().requires_grad_()
        gx = torch.randn_like(x)
        timings[f"{method} input quantizer, fwd + bwd"] = per_call_us(lambda: iq(xg).backward(gx), calls, reps)
        if method == "lsq":  # the whole first layer on images: the input's step without dL/dx_hat
            gy = torch.randn(128, 400, generator=torch.Generator().manual_seed(3))
            timings["lsq first layer on images, fwd + bwd"] = per_call_us(lambda: layer(IMAGES).backward(gy), calls, reps)
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both modes (best kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # alternate the two modes and keep each entry's best round: the first thing measured in a
    # process also pays for warming the allocator, which would otherwise fall on one column
    fused: dict[str, float] = {}
    plain: dict[str, float] = {}
    for _ in range(args.rounds):
        for target, ctx in ((fused, contextlib.nullcontext()), (plain, kernels.disabled())):
            with ctx:
                for name, us in measure(args.calls, args.reps).items():
                    target[name] = min(us, target.get(name, us))
    plain["torch.tanh, forward"] = per_call_us(lambda: torch.tanh(W.detach()), args.calls, args.reps)
    plain["torch.tanh, forward + backward"] = per_call_us(lambda: torch.tanh(W).backward(G), args.calls, args.reps)

    print(f"torch {torch.__version__}, {args.threads} thread(s), microseconds per call (median of {args.reps})")
    if not kernels.available():
        print("(the fused kernels are not available here: LOWBIT_KERNELS=0 or they did not build)")
    print(f"{'':<42} {'PyTorch':>9} {'fused':>9} {'ratio':>7}")
    for name in plain:
        a, b = plain[name], fused.get(name)
        if b is None or not kernels.available():
            print(f"{name:<42} {a:9.0f}")
        else:
            print(f"{name:<42} {a:9.0f} {b:9.0f} {a / b:7.2f}")


if __name__ == "__main__":
    main()
