"""In-memory trainer and evaluator.

The whole data set lives in one tensor; each epoch draws a seeded permutation and gathers
batches by index (no DataLoader, no worker processes).  Under the same seed and thread count a
run on the CPU is reproducible bit for bit.  The loss is any ``loss_fn(model, batch) -> Tensor``
that returns the batch's *summed* loss; the default is the VAE loss of the reference study.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .models.vae import VAE, eval_eps, iwae_nll, vae_loss
from rich.progress import Progress

from .progress import TrainProgress

__all__ = ["TrainResult", "EvalResult", "fit", "evaluate", "time_eval", "vae_batch_loss", "make_optimizer"]

LossFn = Callable[[nn.Module, Tensor], Tensor]


def vae_batch_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Summed VAE loss (BCE + KL) of one batch, eps drawn from the global generator."""
    logits, mu, logvar = model(batch)
    return vae_loss(logits, batch, mu, logvar).total


@dataclass
class TrainResult:
    """What :func:`fit` measured."""

    epochs: int
    images: int
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)  # mean loss per image, per epoch

    @property
    def seconds(self) -> float:
        return float(sum(self.epoch_seconds))

    @property
    def images_per_second(self) -> float:
        return self.images * self.epochs / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "seconds": self.seconds, "images_per_second": self.images_per_second}


def make_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Optimizer:
    """Adam as in the reference study; the fused CPU kernel (one pass over all parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # a torch or device without the fused kernel
        return torch.optim.Adam(params, lr=lr)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def fit(
    model: nn.Module,
    images: Tensor,
    *,
    epochs: int,
    batch_size: int = 128,
    optimizer: torch.optim.Optimizer | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    loss_fn: LossFn = vae_batch_loss,
    progress: "bool | Progress" = True,
    description: str = "train",
) -> TrainResult:
    """Train ``model`` on ``images`` (shape ``(N, ...)``) for ``epochs`` epochs of shuffled batches.

    The model and ``images`` may live on any device (both on the same one); the shuffling is drawn
    on the CPU, so a seed gives the same batches everywhere.

    Args:
        optimizer: the optimizer to step; by default a fresh Adam(lr) over the model's parameters.
            Pass the one you gave :func:`lowbit.quantize` so quantizer parameters train too.
        seed: seeds the shuffling and the global generator (the VAE's noise).
        loss_fn: returns the batch's summed loss; the reported loss is per image.
        progress: show a progress bar (True), none (False), or add one to this rich ``Progress``.

    Returns:
        per-epoch wall seconds and mean losses.
    """
    _check_positive(epochs=epochs, batch_size=batch_size)
    n = images.shape[0]
    if n == 0:
        raise ValueError("cannot train on an empty data set")
    if optimizer is None:
        optimizer = make_optimizer(model, lr)
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    result = TrainResult(epochs=epochs, images=n)
    steps = (n + batch_size - 1) // batch_size
    model.train()
    shared = progress if isinstance(progress, Progress) else None
    with TrainProgress(description, epochs, steps, enabled=bool(progress), progress=shared) as bar:
        for _epoch in range(epochs):
            total = torch.zeros((), dtype=torch.float64, device=images.device)
            start = time.perf_counter()
            perm = torch.randperm(n, generator=shuffle).to(images.device)
            for step in range(steps):
                batch = images.index_select(0, perm[step * batch_size : (step + 1) * batch_size])
                loss = loss_fn(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach()
                bar.step(step + 1, total, min((step + 1) * batch_size, n))
            mean_loss = float(total) / n  # (waits for an asynchronous device before the clock is read)
            result.epoch_seconds.append(time.perf_counter() - start)
            result.epoch_losses.append(mean_loss)
            bar.end_epoch(result.epoch_losses[-1], result.epoch_seconds[-1])
    return result


@dataclass
class EvalResult:
    """Test metrics per image (nats): loss = bce + kl; iwae = importance-weighted bound on -log p(x)."""

    loss: float
    bce: float
    kl: float
    iwae: float | None
    iwae_k: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 10_000,
    iwae_k: int = 64,
    seed: int = 0,
) -> EvalResult:
    """Test loss (BCE + KL, per image) of a VAE-like model over ``images`` with fixed noise
    (:func:`lowbit.models.vae.eval_eps`), and its IWAE bound with ``iwae_k`` samples (0 skips it).

    The model is put in eval mode (quantizers frozen) and restored to its previous mode.
    """
    _check_positive(batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        n = images.shape[0]
        latent = getattr(model, "latent", None)
        start = time.perf_counter()
        sums = torch.zeros(3, dtype=torch.float64, device=images.device)
        eps_all = eval_eps(n, latent, seed).to(images.device) if latent is not None else None
        for i in range(0, n, batch_size):
            x = images[i : i + batch_size]
            eps = eps_all[i : i + batch_size] if eps_all is not None else None
            logits, mu, logvar = model(x, eps) if eps is not None else model(x)
            part = vae_loss(logits, x, mu, logvar)
            sums += torch.stack([part.total, part.bce, part.kl]).double()
        sums = sums.cpu()  # (waits for an asynchronous device before the clock is read)
        seconds = time.perf_counter() - start
        iwae = None
        if iwae_k > 0:
            if not isinstance(model, VAE):
                raise TypeError("the IWAE bound needs a lowbit VAE (encode/decode_logits); pass iwae_k=0")
            g = torch.Generator().manual_seed(seed + 1)
            chunk = max(1, 8_000_000 // (iwae_k * images[0].numel()))
            iwae = float(sum(iwae_nll(model, images[i : i + chunk], iwae_k, g).sum().double() for i in range(0, n, chunk))) / n
        loss, bce, kl = (float(v) / n for v in sums)
        return EvalResult(loss, bce, kl, iwae, iwae_k, seconds)
    finally:
        model.train(was_training)


def time_eval(model: nn.Module, images: Tensor, *, repeats: int = 3, batch_size: int = 10_000) -> float:
    """Median wall seconds of one test-loss pass (no IWAE) over ``images``."""
    times = sorted(evaluate(model, images, batch_size=batch_size, iwae_k=0).seconds for _ in range(repeats))
    return times[len(times) // 2]
