"""Helpers shared by the test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import pytest
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


def assert_compiles_like_eager(build, drift: float = 1e-3) -> None:
    """``build()`` returns a fresh ``(model, optimizer)`` (a quantized VAE).  Five training steps
    eagerly, and on a second copy two eager steps (they initialise ranges and steps), then three
    through ``model.compile()``: the same losses (the first compiled step to float rounding, the
    next within ``drift``: the compiled backward sums in another order, and Adam's first steps,
    about lr whatever a gradient's size, spread last bits), no graph break, one forward graph."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, opt = build()
    eager = train_vae(model, opt, 2, seed=0, seeded_eps=True) + train_vae(model, opt, 3, seed=1, seeded_eps=True)
    model, opt = build()
    warm = train_vae(model, opt, 2, seed=0, seeded_eps=True)
    model.compile()
    compiled = train_vae(model, opt, 3, seed=1, seeded_eps=True)
    assert warm == eager[:2]
    assert compiled[0] == pytest.approx(eager[2], rel=1e-5), (compiled, eager[2:])
    assert compiled == pytest.approx(eager[2:], rel=drift), (compiled, eager[2:])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
