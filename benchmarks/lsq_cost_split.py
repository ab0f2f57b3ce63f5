"""What LSQ's training overhead on the CPU is made of: the W8A8 LSQ VAE (the study's four layers)
as shipped, with its steps' Adam group updated by PyTorch's default per-parameter loop instead of
the fused update lowbit asks for, with the first layer's input step frozen, and with every step
frozen, timed against fp32 side by side in one process.

    python benchmarks/lsq_cost_split.py                 # 100 rounds of 10 steps, 1 thread
    python benchmarks/lsq_cost_split.py --threads 2 --rounds 40
    python benchmarks/lsq_cost_split.py --tiny          # the same VAE with 8-wide layers

The variants take turns round by round (alternating order), each round being ``--steps`` training
steps on the same batches for every variant; a round's time divided by fp32's time in the same
round cancels the slow drifts of a shared machine's load.  Printed: the median of those paired
ratios and their interquartile range.  The frozen variants are measures, not methods (LSQ learns
every step): the gap between them says what learning fc1's input step (the sparse step sum of
``lowbit.kernels``) and the other steps cost; the loop variant shows what the fused update of
the steps' group saves (:func:`lowbit.quantize.quantizer_param_group`).  With ``--tiny`` every layer is 8 wide (random
8-pixel "images"): the arithmetic vanishes and what is left, printed in ms over fp32, is LSQ's
fixed cost per training step (module calls, autograd nodes, the steps' gradients and Adam's group
for them), the part that does not shrink with the work.  Needs MNIST in ``LOWBIT_DATA_DIR`` (else uniform
random images, whose dense first-layer input takes the dense product instead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowbit
from quant_overhead import STUDY_LAYERS, eager_step, load_images
from lowbit.models.vae import VAE
from lowbit.train import make_optimizer

TINY = 8  # layer width of --tiny
LOOP = "lsq, steps' Adam as a loop"


def variants(seed: int = 0, width: int | None = None) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    torch.manual_seed(seed)
    dims = {} if width is None else {"in_features": width, "hidden": width, "latent": width}
    base = VAE(**dims)
    out = {}
    for tag in ("fp32", "lsq", LOOP, "lsq, fc1 input step frozen", "lsq, every step frozen"):
        m = VAE(**dims)
        m.load_state_dict(base.state_dict())
        opt = make_optimizer(m)
        if tag != "fp32":
            cfg = [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": STUDY_LAYERS}]
            lowbit.quantize(m, cfg, "lsq", optimizer=opt)
        if tag == LOOP:  # the steps' group updated as PyTorch's CPU default: one Python loop step per parameter
            opt.param_groups[-1].update(fused=None, foreach=False)
        if tag == "lsq, fc1 input step frozen":
            m.fc1.input_quantizer.scale.requires_grad_(False)
        if tag == "lsq, every step frozen":
            for p in lowbit.quantizer_parameters(m):
                p.requires_grad_(False)
        out[tag] = (m, opt)
    return out


def round_options(parser: argparse.ArgumentParser, rounds: int, steps: int) -> None:
    """The command-line options of a benchmark timed in interleaved rounds."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=steps, help=f"training steps a round (default {steps})")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="8-wide layers: only the per-step fixed costs remain")


def interleaved_rounds(
    models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]], batches: list[torch.Tensor], rounds: int, steps: int
) -> dict[str, list[float]]:
    """Seconds a training step, per round, for every variant: each round runs ``steps`` steps of
    every variant in turn on the same batches (the order alternating from round to round)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for r in range(rounds):
        first = (r * steps) % len(batches)
        round_batches = [batches[(first + i) % len(batches)] for i in range(steps)]
        for name in names if r % 2 == 0 else reversed(names):
            m, opt = models[name]
            start = time.perf_counter()
            for b in round_batches:
                eager_step(m, opt, b)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    round_options(parser, rounds=100, steps=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch, pool = 128, 100
    images = torch.rand(batch * pool, TINY) if args.tiny else load_images(batch * pool)
    batches = [images[i * batch : (i + 1) * batch] for i in range(pool)]
    models = variants(width=TINY if args.tiny else None)
    for m, opt in models.values():  # warm-up, and the first batch's initialisation
        for b in batches[:5]:
            eager_step(m, opt, b)
    times = interleaved_rounds(models, batches, args.rounds, args.steps)
    print(f"torch {torch.__version__}, lowbit {lowbit.__version__}, {args.threads} thread(s), "
          f"{args.rounds} rounds of {args.steps} steps (batch {batch}), W8A8 LSQ on {', '.join(STUDY_LAYERS)}"
          + (f", layers {TINY} wide" if args.tiny else ""))
    print(f"{'variant':<28} {'ms / step':>10} {'/ fp32 (paired)':>16} {'IQR':>13} {'ms over fp32':>13}")
    for name, ts in times.items():
        paired = [a / b for a, b in zip(ts, times["fp32"])]
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        extra = statistics.median(1e3 * (a - b) for a, b in zip(ts, times["fp32"]))
        print(f"{name:<28} {1e3 * statistics.median(ts):10.3f} {q[1]:16.3f} {q[0]:6.3f}-{q[2]:.3f} {extra:13.3f}")


if __name__ == "__main__":
    main()
