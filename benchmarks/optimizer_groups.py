"""What the quantizers' parameter group costs the optimizer step on the CPU, and what other layouts
of the same parameters would cost: ``optimizer.step()`` timed alone (gradients set beforehand),
the variants taking turns step by step in one process, medians printed in µs over the first row.

    python benchmarks/optimizer_groups.py                # 2 threads, 2000 steps each
    python benchmarks/optimizer_groups.py --threads 1 --steps 500

Rows: the VAE's own Adam (fused, as ``lowbit.train.make_optimizer`` builds it) with no quantizer,
twice (two copies of the same model and optimizer: how far apart equal variants land);
the same after ``lowbit.quantize(..., "lsq", optimizer=opt)`` on all five layers, W8A8 (its ten
steps in the group :func:`lowbit.quantize.quantizer_param_group` adds); then three layouts lowbit
does not use, the same ten values held differently: one 10-element tensor in its own group, the
ten scalars appended to the model's group, one 10-element tensor appended to the model's group
(each update is elementwise, so every layout computes the same values; what differs is the work
around them: Adam's per-parameter Python, the CPU ``_foreach_add_`` of the step counters, which
runs one tensor at a time, and each group's own pass).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lowbit
from lowbit.models.vae import VAE
from lowbit.train import make_optimizer

LAYERS = ["fc1", "fc21", "fc22", "fc3", "fc4"]


def variants(seed: int = 0) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per layout, every parameter given a zero gradient."""
    torch.manual_seed(seed)
    base = VAE()
    out: dict[str, torch.optim.Optimizer] = {}

    def model() -> VAE:
        m = VAE()
        m.load_state_dict(base.state_dict())
        return m

    out["fp32 model's group"] = make_optimizer(model())
    out["the same, another copy"] = make_optimizer(model())  # (the spread between equal variants)
    m = model()
    opt = make_optimizer(m)
    lowbit.quantize(m, [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": LAYERS}], "lsq", optimizer=opt)
    out["lsq: + steps' group (shipped)"] = opt
    n = len(opt.param_groups[-1]["params"])
    layouts = {
        f"+ one {n}-vector group": lambda g: [g, {"params": [torch.nn.Parameter(torch.ones(n))], "weight_decay": 0.0}],
        f"{n} scalars in model's group": lambda g: [{"params": g["params"] + [torch.nn.Parameter(torch.ones(())) for _ in range(n)]}],
        f"one {n}-vector in model's group": lambda g: [{"params": g["params"] + [torch.nn.Parameter(torch.ones(n))]}],
    }
    for name, groups in layouts.items():
        plain = make_optimizer(model())
        first = {"params": plain.param_groups[0]["params"]}
        out[name] = type(plain)(groups(first), **plain.defaults)
    for o in out.values():
        for g in o.param_groups:
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    opts = variants()
    names = list(opts)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(args.steps + 50):
        for name in names if i % 2 == 0 else reversed(names):
            start = time.perf_counter()
            opts[name].step()
            if i >= 50:  # (the first steps create the optimizer state)
                times[name].append(time.perf_counter() - start)
    print(f"torch {torch.__version__}, lowbit {lowbit.__version__}, {args.threads} thread(s), "
          f"{args.steps} steps each, Adam on the VAE")
    base = statistics.median(times[names[0]])
    print(f"{'layout':<34} {'µs / step':>10} {'over first':>11}")
    for name in names:
        med = statistics.median(times[name])
        print(f"{name:<34} {1e6 * med:10.1f} {1e6 * (med - base):+11.1f}")


if __name__ == "__main__":
    main()
