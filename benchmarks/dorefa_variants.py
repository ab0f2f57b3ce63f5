"""DoReFa's weight variants on the study's VAE: why lowbit's default is the learned clip.

    python benchmarks/dorefa_variants.py                 # 4 bits, 10 + 10 epochs (~4 min at 2 threads)
    python benchmarks/dorefa_variants.py --bits 4 8 --finetune-epochs 3
    python benchmarks/dorefa_variants.py --init runs/study/seed0/fp32-baseline   # reuse an fp32 run

Trains one fp32 baseline (``--epochs``; or starts from ``--init``), then, from that same baseline (weights and Adam state, as
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

import lowbit
from lowbit.checkpoint import load_model
from lowbit.experiment import RunSpec, run_experiment
from lowbit.train import evaluate

import _finetune

VARIANTS = ("learned", "scaled", "paper")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _finetune.add_arguments(ap, bits=[4], finetune_epochs=10)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    args = ap.parse_args()
    train, test = _finetune.load_mnist(args)
    with tempfile.TemporaryDirectory() as tmp:
        base_dir, base = _finetune.baseline(args, train, test, tmp)
        print(f"{'bits':>4}  {'variant':<8} {'quantized, untrained':>20} {'after fine-tuning':>18}  training loss per epoch")
        for bits in args.bits:
            cfg = [{"quant_types": ["weight"], "quant_bits": {"weight": bits}, "op_types": ["Linear"]}]
            for variant in args.variants:
                opts = {"dorefa_variant": variant}
                start = lowbit.quantize(load_model(base_dir), cfg, "dorefa", **opts)
                untrained = evaluate(start, test, iwae_k=0).loss
                spec = RunSpec(f"dorefa-w{bits}-{variant}", args.finetune_epochs, "dorefa", cfg, opts, iwae_k=0)
                rec = run_experiment(spec, train, test, Path(tmp) / spec.name, init=base_dir, before=base,
                                     progress=False)
                losses = " ".join(f"{v:.1f}" for v in rec["train"]["epoch_losses"])
                print(f"{bits:>4}  {variant:<8} {untrained:>20.2f} {rec['after']['loss']:>18.2f}  {losses}", flush=True)


if __name__ == "__main__":
    main()
