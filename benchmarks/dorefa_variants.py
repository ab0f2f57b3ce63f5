"""DoReFa's weight variants on the study's VAE: why lowbit's default is the learned clip.

    python benchmarks/dorefa_variants.py                 # 4 bits, 10 + 10 epochs (~4 min at 2 threads)
    python benchmarks/dorefa_variants.py --bits 4 8 --finetune-epochs 3

Trains one fp32 baseline (``--epochs``), then, from that same baseline (weights and Adam state, as
the study does), fine-tunes DoReFa with the reference configuration (weights of every Linear layer
at ``--bits``, activations float) once per ``dorefa_variant``: ``learned`` (lowbit's default),
``scaled`` (max-normalised, per-layer magnitude kept) and ``paper`` (exactly the paper, weights in
[-1, 1]).  Prints the test loss (nats per image, fixed noise) of each, the loss of the quantized
model before fine-tuning, and the training loss per epoch.  Needs MNIST (``LOWBIT_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import lowbit
from lowbit.checkpoint import load_model
from lowbit.data import load_dataset
from lowbit.experiment import RunSpec, run_experiment
from lowbit.train import evaluate

VARIANTS = ("learned", "scaled", "paper")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[4])
    ap.add_argument("--epochs", type=int, default=10, help="fp32 baseline epochs")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_dataset("mnist", "train", data_dir=args.data_dir).images
    test = load_dataset("mnist", "test", data_dir=args.data_dir).images
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "fp32"
        base = run_experiment(RunSpec("fp32", args.epochs, iwae_k=0), train, test, base_dir, progress=False)
        print(f"fp32 baseline ({args.epochs} epochs): {base['after']['loss']:.2f} nats")
        print(f"{'bits':>4}  {'variant':<8} {'quantized, untrained':>20} {'after fine-tuning':>18}  training loss per epoch")
        for bits in args.bits:
            cfg = [{"quant_types": ["weight"], "quant_bits": {"weight": bits}, "op_types": ["Linear"]}]
            for variant in args.variants:
                opts = {"dorefa_variant": variant}
                start = lowbit.quantize(load_model(base_dir), cfg, "dorefa", **opts)
                untrained = evaluate(start, test, iwae_k=0).loss
                spec = RunSpec(f"dorefa-w{bits}-{variant}", args.finetune_epochs, "dorefa", cfg, opts, iwae_k=0)
                rec = run_experiment(spec, train, test, Path(tmp) / spec.name, init=base_dir, before=base["after"],
                                     progress=False)
                losses = " ".join(f"{v:.1f}" for v in rec["train"]["epoch_losses"])
                print(f"{bits:>4}  {variant:<8} {untrained:>20.2f} {rec['after']['loss']:>18.2f}  {losses}", flush=True)


if __name__ == "__main__":
    main()
