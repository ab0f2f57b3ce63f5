"""What the fine-tuning benchmarks share: their common flags, MNIST, and the fp32 baseline they
start from (one given with ``--init``, or trained here)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowbit.checkpoint import load_model
from lowbit.data import load_dataset
from lowbit.experiment import RunSpec, run_experiment
from lowbit.train import evaluate


def add_arguments(ap: argparse.ArgumentParser, bits: list[int], finetune_epochs: int) -> None:
    ap.add_argument("--bits", type=int, nargs="+", default=bits)
    ap.add_argument("--init", default=None, help="an fp32 run folder to start from (default: train one)")
    ap.add_argument("--epochs", type=int, default=10, help="fp32 baseline epochs when --init is not given")
    ap.add_argument("--finetune-epochs", type=int, default=finetune_epochs)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=None)


def load_mnist(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the thread count; return the training and test images."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return (load_dataset("mnist", "train", data_dir=args.data_dir).images,
            load_dataset("mnist", "test", data_dir=args.data_dir).images)


def baseline(args: argparse.Namespace, train: torch.Tensor, test: torch.Tensor, tmp: str) -> tuple[Path, dict]:
    """``(run folder, its test metrics)`` of the fp32 baseline: ``--init``, or ``--epochs`` trained
    into ``tmp``; prints its loss."""
    if args.init:
        base_dir = Path(args.init)
        after = {"loss": evaluate(load_model(base_dir), test, iwae_k=0).loss}
        print(f"fp32 baseline ({base_dir}): {after['loss']:.2f} nats")
    else:
        base_dir = Path(tmp) / "fp32"
        after = run_experiment(RunSpec("fp32", args.epochs, iwae_k=0), train, test, base_dir, progress=False)["after"]
        print(f"fp32 baseline ({args.epochs} epochs): {after['loss']:.2f} nats")
    return base_dir, after
