"""Losses and loss weightings as registered objects: a contract over every registered one, each owning its
hyperparameters, and a weighting a user registers working end to end (by name, respaced, in a DiffusionModule)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_ddpm import DiffusionModule, GaussianDiffusion, make_schedule
from lightning_ddpm.core.losses import LOSSES, HybridLoss
from lightning_ddpm.core.weightings import LOSS_WEIGHTINGS, LossWeighting, MinSNRWeighting

T = 20


def _diffusion(**kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(make_schedule("linear", num_timesteps=T, beta_end=0.3), **kwargs)


def _batch(channels: int = 2):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(T, channels, 3, 3, dtype=torch.float64, generator=g) * 2 - 1
    return x0, torch.arange(T), torch.randn(x0.shape, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("name", LOSS_WEIGHTINGS.names())
@pytest.mark.parametrize("parameterization", ["eps", "x0", "mu", "v"])
def test_every_weighting_gives_one_positive_finite_weight_per_example_and_survives_respacing(name, parameterization):
    d = _diffusion(parameterization=parameterization, loss_weighting=name)
    x0, t, _ = _batch()
    w = d.mse_weight(t, x0)
    assert w.shape == (T,) and torch.isfinite(w).all() and (w > 0).all()
    r = d.respace([0, 5, 10, 19])
    assert r.weighting is d.weighting and r.loss_weighting == name
    assert r.mse_weight(torch.arange(4), x0[:4]).shape == (4,)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_returns_a_per_example_loss_and_its_parts(name):
    variance = "learned_range" if LOSSES.build(name).needs_learned_variance else "fixed_small"
    d = _diffusion(variance=variance, loss=name)
    x0, t, noise = _batch()
    out = torch.randn(T, 2 * d.output_channels_factor, 3, 3, dtype=torch.float64)
    terms = d.training_losses(lambda x, t: out, x0, t, noise)
    assert terms["loss"].shape == (T,) and torch.isfinite(terms["loss"]).all()
    assert set(terms) - {"loss"} and all(v.shape == (T,) for v in terms.values())
    assert d.respace([0, 9, 19]).loss_fn is d.loss_fn


def test_losses_and_weightings_own_their_hyperparameters():
    d = _diffusion(
        variance="learned_range", loss="hybrid", hybrid_lambda=0.25, loss_weighting="min_snr", min_snr_gamma=2.0
    )
    assert isinstance(d.loss_fn, HybridLoss) and d.loss_fn.hybrid_lambda == 0.25 == d.hybrid_lambda
    assert isinstance(d.weighting, MinSNRWeighting) and d.weighting.min_snr_gamma == 2.0 == d.min_snr_gamma
    r = d.respace([0, 7, 19])  # the respaced process keeps them without anything copied by hand
    assert (r.hybrid_lambda, r.min_snr_gamma) == (0.25, 2.0)
    # an object passed in is used as it is
    w = MinSNRWeighting(min_snr_gamma=3.0)
    assert _diffusion(loss_weighting=w).weighting is w
    with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
        MinSNRWeighting(min_snr_gamma=0.0)


class Truncated(LossWeighting):
    """A user's weighting: L_simple on the upper half of the timesteps only."""

    def __call__(self, diffusion, t, x):
        return (t >= diffusion.num_timesteps // 2).to(x.dtype)


def test_a_registered_weighting_works_end_to_end(tmp_path):
    LOSS_WEIGHTINGS.register("upper_half")(Truncated)
    try:
        d = _diffusion(loss_weighting="upper_half")
        x0, t, noise = _batch()
        out = torch.randn_like(x0)
        terms = d.training_losses(lambda x, t: out, x0, t, noise)
        assert (terms["loss"][: T // 2] == 0).all() and torch.equal(terms["loss"][T // 2 :], terms["mse"][T // 2 :])
        r = d.respace([0, 4, 12, 19])  # respaced: 4 steps, its own upper half
        assert torch.equal(r.mse_weight(torch.arange(4), x0[:4]), torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=x0.dtype))

        m = DiffusionModule(
            backbone={"name": "mlp", "init_args": {"hidden_dim": 16, "num_blocks": 1}},
            data_shape=[2],
            num_timesteps=T,
            loss_weighting="upper_half",
        )
        assert isinstance(m.diffusion.weighting, Truncated)
        trainer = Trainer(
            max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
        )
        loader = torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=32)
        trainer.fit(m, loader)
        trainer.save_checkpoint(tmp_path / "w.ckpt")
        back = DiffusionModule.load_from_checkpoint(tmp_path / "w.ckpt")
        assert isinstance(back.diffusion.weighting, Truncated) and back.hparams.loss_weighting == "upper_half"
    finally:
        LOSS_WEIGHTINGS.pop("upper_half")
