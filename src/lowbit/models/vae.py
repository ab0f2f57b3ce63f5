"""The MLP VAE of the reference study (PyTorch's MNIST example), its loss and its metrics.

The model is a plain :class:`torch.nn.Module` with no globals, so it can be quantized, trained
and exported like any other model.  ``forward`` returns the decoder's *logits*: the loss uses
``binary_cross_entropy_with_logits``, which equals ``BCE(sigmoid(logits), x)`` without the
``log`` clamp at -100 that the float ``BCE`` applies, and is faster and numerically exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VAE", "VAELoss", "vae_loss", "iwae_nll", "eval_eps"]


class VAE(nn.Module):
    """``fc1 Linear(784,400) -> relu -> fc21/fc22 Linear(400,20)``; ``fc3 Linear(20,400) -> relu -> fc4``.

    Args:
        in_features: flattened input size (784 for 28x28 images).
        hidden: hidden layer width.
        latent: latent dimension.
    """

    def __init__(self, in_features: int = 784, hidden: int = 400, latent: int = 20) -> None:
        super().__init__()
        self.in_features = in_features
        self.latent = latent
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc21 = nn.Linear(hidden, latent)
        self.fc22 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, in_features)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(mu, logvar)`` of q(z|x) for images of any shape ``(B, ...)``."""
        h = F.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.fc21(h), self.fc22(h)

    def decode_logits(self, z: Tensor) -> Tensor:
        """Bernoulli logits of p(x|z), shape ``(B, in_features)``."""
        return self.fc4(F.relu(self.fc3(z)))

    def decode(self, z: Tensor) -> Tensor:
        """Pixel means of p(x|z) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(logits, mu, logvar)``; ``z = mu + exp(logvar/2) * eps`` with ``eps ~ N(0, I)``
        drawn from the global generator unless given (pass zeros for the deterministic z = mu)."""
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decode_logits(z), mu, logvar


@dataclass(frozen=True)
class VAELoss:
    """Summed loss over a batch and its two parts (nats)."""

    total: Tensor
    bce: Tensor
    kl: Tensor


def vae_loss(logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> VAELoss:
    """``BCE(recon, x, reduction='sum') + KL`` as in the reference study, summed over the batch."""
    target = x.reshape(logits.shape)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return VAELoss(bce + kl, bce, kl)


def eval_eps(n: int, latent: int, seed: int = 0) -> Tensor:
    """The fixed noise used to evaluate test loss: the same for every model, so losses compare
    exactly (and a deployed model fed the same ``eps`` must give the same loss)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, latent, generator=g)


@torch.no_grad()
def iwae_nll(model: VAE, x: Tensor, k: int = 64, generator: torch.Generator | None = None) -> Tensor:
    """Importance-weighted bound on ``-log p(x)`` per image (nats), with ``k`` samples (Burda et al.).

    Returns a tensor of shape ``(B,)``.  ``k = 1`` gives the ELBO; the bound tightens as ``k`` grows.
    """
    b = x.shape[0]
    target = x.reshape(b, -1)
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    # drawn on the CPU generator whatever the model's device: the same noise, so the same bound
    eps = torch.randn((k, *mu.shape), generator=generator, dtype=mu.dtype).to(mu.device)
    z = mu + std * eps  # (k, B, latent)
    logits = model.decode_logits(z.reshape(k * b, -1)).reshape(k, b, -1)
    # log Bernoulli(x | sigmoid(l)) summed over pixels = x.l - softplus(l): the x.l part as one
    # batched matmul, so no (k, B, D) temporaries beyond the logits and their softplus
    x_dot_l = torch.bmm(logits.transpose(0, 1), target.unsqueeze(-1)).squeeze(-1).transpose(0, 1)
    log_px_z = x_dot_l - F.softplus(logits).sum(-1)
    log_2pi = math.log(2 * math.pi)
    log_pz = -0.5 * (z.pow(2) + log_2pi).sum(-1)
    log_qz = -0.5 * (eps.pow(2) + log_2pi + logvar).sum(-1)
    log_w = log_px_z + log_pz - log_qz  # (k, B)
    return -(torch.logsumexp(log_w, dim=0) - math.log(k))
