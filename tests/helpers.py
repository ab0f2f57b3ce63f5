"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from lowbit.models.vae import vae_loss


def train_vae(model, opt=None, steps: int = 3, seed: int = 0, batch: int = 32, seeded_eps: bool = False) -> list[float]:
    """A few Adam steps of the VAE on seeded random 'images' (drawn on the CPU, then moved to the
    model's device); returns the losses.  ``seeded_eps``: the VAE's noise from the same seeded
    generator (the same on every device) instead of the global one."""
    g = torch.Generator().manual_seed(seed)
    opt = opt or torch.optim.Adam(model.parameters(), 1e-3)
    device = next(model.parameters()).device
    model.train()
    losses = []
    for _ in range(steps):
        x = torch.rand(batch, 784, generator=g).to(device)
        if seeded_eps:
            logits, mu, logvar = model(x, torch.randn(batch, 20, generator=g).to(device))
        else:
            logits, mu, logvar = model(x)
        loss = vae_loss(logits, x, mu, logvar).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
