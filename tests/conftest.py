"""Shared fixtures: small synthetic image sets (fast tests) and the real MNIST when CI points at it."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def tiny_images() -> torch.Tensor:
    """512 random 'images' in [0, 1] of shape (1, 28, 28), with some structure so a VAE can learn."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(8, 1, 28, 28, generator=g)
    idx = torch.randint(0, 8, (512,), generator=g)
    return (base[idx] * 0.8 + 0.2 * torch.rand(512, 1, 28, 28, generator=g)).clamp(0, 1)


@pytest.fixture(scope="session")
def mnist():
    """The real MNIST (train, test) from $LOWBIT_DATA_DIR; skipped when it is not set."""
    if not os.environ.get("LOWBIT_DATA_DIR"):
        pytest.skip("set LOWBIT_DATA_DIR to the folder with MNIST's IDX files to run real-data tests")
    from lowbit.data import load_dataset

    return load_dataset("mnist", "train", download=False, progress=False), load_dataset(
        "mnist", "test", download=False, progress=False
    )


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread is faster and immune to OpenMP spinning on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
