import math

import pytest
import torch

from lowbit.models.vae import VAE
from lowbit.train import evaluate, fit, make_optimizer


def test_fit_is_reproducible_bit_for_bit(tiny_images):
    torch.set_num_threads(1)
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        model = VAE()
        result = fit(model, tiny_images, epochs=2, batch_size=64, seed=7, progress=False)
        states.append((result.epoch_losses, [p.clone() for p in model.parameters()]))
    assert states[0][0] == states[1][0]
    assert all(torch.equal(a, b) for a, b in zip(states[0][1], states[1][1]))


def test_fit_records_epochs_and_lowers_the_loss(tiny_images):
    torch.manual_seed(0)
    model = VAE()
    result = fit(model, tiny_images, epochs=3, batch_size=64, progress=False)
    assert len(result.epoch_seconds) == 3 and all(t > 0 for t in result.epoch_seconds)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert result.images_per_second > 0


def test_different_seeds_differ(tiny_images):
    losses = []
    for seed in (0, 1):
        torch.manual_seed(0)
        losses.append(fit(VAE(), tiny_images, epochs=1, batch_size=64, seed=seed, progress=False).epoch_losses)
    assert losses[0] != losses[1]


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"epochs": -1}, {"epochs": 1, "batch_size": 0}])
def test_fit_rejects_non_positive_sizes(tiny_images, kwargs):
    with pytest.raises(ValueError, match="positive integer"):
        fit(VAE(), tiny_images, progress=False, **kwargs)


def test_evaluate_parts_add_up_and_are_deterministic(tiny_images):
    torch.manual_seed(0)
    model = VAE()
    a = evaluate(model, tiny_images, iwae_k=4, batch_size=100)
    b = evaluate(model, tiny_images, iwae_k=4, batch_size=512)
    assert a.loss == pytest.approx(a.bce + a.kl)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)  # batch size does not change the fixed-noise loss
    assert a.iwae == pytest.approx(b.iwae, rel=1e-4)
    assert model.training  # mode restored


def test_iwae_bound_is_tighter_than_the_elbo(tiny_images):
    torch.manual_seed(0)
    model = VAE()
    fit(model, tiny_images, epochs=2, batch_size=64, progress=False)
    elbo = evaluate(model, tiny_images, iwae_k=1).iwae
    iwae = evaluate(model, tiny_images, iwae_k=32).iwae
    assert iwae < elbo and math.isfinite(iwae)


def test_make_optimizer_is_adam():
    opt = make_optimizer(VAE(), lr=5e-4)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 5e-4
