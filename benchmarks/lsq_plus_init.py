"""LSQ+'s initialisation on the study's VAE: how good each starting grid is, and what it is worth
after fine-tuning.

    python benchmarks/lsq_plus_init.py                         # 8/4/3/2 bits, initial grids only (~2 min)
    python benchmarks/lsq_plus_init.py --bits 4 3 --finetune-epochs 5   # and fine-tuned, 3 seeds each
    python benchmarks/lsq_plus_init.py --init runs/study/seed0/fp32-baseline   # reuse an fp32 run

From one fp32 baseline (``--init``, or trained here for ``--epochs``), weights and inputs of fc1,
fc21, fc22 and fc3 are quantized at each of ``--bits`` with LSQ (its own initialisation), LSQ+
with ``lsq_plus_init: minmax`` (first batch's min/max; lowbit <= 0.3.3) and LSQ+ with
``lsq_plus_init: paper`` (MSE-optimal activation ranges, 3-sigma weight steps).  For each seed the
quantizers are initialised on one shuffled training batch of 128 and the model's test loss (nats
per image, fixed noise, no training) is measured; with ``--finetune-epochs`` each is then
fine-tuned from the baseline (weights and Adam state, as the study does) with that seed.  Prints
the mean, standard deviation and range over ``--seeds``.  Needs MNIST (``LOWBIT_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

import lowbit
from lowbit.checkpoint import load_model
from lowbit.experiment import RunSpec, run_experiment
from lowbit.train import evaluate

import _finetune

VARIANTS = {
    "lsq": {},
    "lsq+ minmax": {"lsq_plus": True, "lsq_plus_init": "minmax"},
    "lsq+ paper": {"lsq_plus": True, "lsq_plus_init": "paper"},
}


def config(bits: int) -> list[dict]:
    return [{"quant_types": ["input", "weight"], "quant_bits": bits, "op_names": ["fc1", "fc21", "fc22", "fc3"]}]


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):8.2f} ± {sd:4.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _finetune.add_arguments(ap, bits=[8, 4, 3, 2], finetune_epochs=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    train, test = _finetune.load_mnist(args)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, base = _finetune.baseline(args, train, test, tmp)
        print(f"seeds {args.seeds}; --finetune-epochs 0 (the default) skips fine-tuning")
        head = f"{'bits':>4}  {'variant':<12} {'quantized, untrained':>32}"
        print(head + (f"  {'after ' + str(args.finetune_epochs) + ' epochs':>32}" if args.finetune_epochs else ""))
        for bits in args.bits:
            for name, opts in VARIANTS.items():
                untrained, tuned = [], []
                for seed in args.seeds:
                    model = lowbit.quantize(load_model(base_dir), config(bits), "lsq", **opts)
                    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
                    torch.manual_seed(seed)  # (the VAE's noise in that forward pass sets fc3's input grid)
                    lowbit.calibrate(model, [train[order[:128]]])
                    untrained.append(evaluate(model, test, iwae_k=0).loss)
                    if args.finetune_epochs:
                        spec = RunSpec(f"w{bits}-{name}-{seed}".replace(" ", "_").replace("+", "p"),
                                       args.finetune_epochs, "lsq", config(bits), opts, seed=seed, iwae_k=0)
                        rec = run_experiment(spec, train, test, Path(tmp) / spec.name, init=base_dir,
                                             before=base, progress=False)
                        tuned.append(rec["after"]["loss"])
                line = f"{bits:>4}  {name:<12} {summary(untrained):>32}"
                print(line + (f"  {summary(tuned):>32}" if tuned else ""), flush=True)


if __name__ == "__main__":
    main()
