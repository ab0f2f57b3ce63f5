"""Models that lowbit knows by name, so a checkpoint can store ``{"name", "kwargs"}`` and be rebuilt
without pickles or code execution."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .vae import VAE

__all__ = ["VAE", "MODELS", "build_model", "register_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {"vae": VAE}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``factory`` buildable by ``build_model(name, **kwargs)`` (and so loadable from checkpoints)."""
    MODELS[name] = factory


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; an unknown name lists the known ones."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return factory(**kwargs)
