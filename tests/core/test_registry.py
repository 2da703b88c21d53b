"""Every name -> object table is one Registry: the same wording for unknown and taken names."""

import pytest
import torch

from lightning_ddpm.backbones import registry as backbones
from lightning_ddpm.core.losses import LOSSES
from lightning_ddpm.core.parameterizations import PARAMETERIZATIONS
from lightning_ddpm.core.registry import Registry
from lightning_ddpm.core.schedules import SCHEDULES
from lightning_ddpm.core.timestep_sampling import TIMESTEP_SAMPLERS
from lightning_ddpm.core.variances import VARIANCES, get_variance
from lightning_ddpm.core.weightings import LOSS_WEIGHTINGS
from lightning_ddpm.data.images import IMAGE_DATASETS
from lightning_ddpm.data.toy2d import TOY_DISTRIBUTIONS
from lightning_ddpm.samplers import SAMPLERS

REGISTRIES = {
    "schedule": SCHEDULES,
    "parameterization": PARAMETERIZATIONS,
    "sampler": SAMPLERS,
    "timestep_sampler": TIMESTEP_SAMPLERS,
    "backbone": backbones.BACKBONES,
    "distribution": TOY_DISTRIBUTIONS,
    "dataset": IMAGE_DATASETS,
    "variance": VARIANCES,
    "loss": LOSSES,
    "loss_weighting": LOSS_WEIGHTINGS,
}


@pytest.mark.parametrize("kind", sorted(REGISTRIES))
def test_every_registry_words_unknown_and_taken_names_alike(kind):
    registry = REGISTRIES[kind]
    assert isinstance(registry, Registry) and registry.kind == kind and len(registry) >= 2
    with pytest.raises(ValueError, match=rf"^unknown {kind} 'nope'; choose one of: {', '.join(registry.names())}"):
        registry.get("nope")
    taken = registry.names()[0]
    with pytest.raises(ValueError, match=rf"^{kind} name '{taken}' is already registered .*registered: "):
        registry.copy().register(taken, object())


@pytest.mark.parametrize("kind", sorted(set(REGISTRIES) - {"distribution", "dataset"}))  # those two are data tables
def test_every_built_in_entry_is_a_definition_registered_by_decorator(kind):
    """One way to extend: a class or function under ``@X.register("name")``, never a hand-built instance."""
    import inspect

    for name, entry in REGISTRIES[kind].items():
        assert inspect.isclass(entry) or inspect.isfunction(entry), f"{kind} {name!r} is {entry!r}"


def test_registering_the_same_definition_again_replaces_it():
    registry = Registry("thing")
    namespace = {"__name__": "__main__"}
    for _ in range(2):  # a notebook cell run twice
        exec("def make():\n    return 1\n", namespace)
        registry.register("make", namespace["make"])
    assert registry.get("make") is namespace["make"] and registry.names() == ["make"]
    with pytest.raises(ValueError, match="already registered"):
        registry.register("make", lambda: 2)


@pytest.mark.parametrize("name", TIMESTEP_SAMPLERS.names())
def test_every_timestep_sampler_draws_valid_timesteps_with_unbiased_weights(name):
    sampler = TIMESTEP_SAMPLERS.get(name)(10)
    # A loss-aware sampler is uniform (weights 1) until every t has a full history: warm it up on losses that
    # grow with t, so that the unbiasedness check below sees a non-uniform p and weights that are not 1.
    for _ in range(getattr(sampler, "history", 1)):
        sampler.update(torch.arange(10), 1.0 + torch.arange(10, dtype=torch.float64))
    p = sampler.probabilities()
    assert p.sum().item() == pytest.approx(1.0)
    if name != "uniform":
        assert p.max() > 5 * p.min()
    t, weights = sampler.sample(20_000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.shape == weights.shape == (20_000,) and t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 10
    assert (weights > 0).all()
    per_t = torch.arange(10, dtype=torch.float32)  # E_p[w * L(t)] must equal the uniform mean of L
    assert (weights * per_t[t]).mean().item() == pytest.approx(per_t.mean().item(), rel=0.03)


@pytest.mark.parametrize("name", VARIANCES.names())
def test_every_variance_lies_between_the_bounds_and_matches_the_posterior_at_its_ends(name):
    """sigma_t^2 of every variance lies in [beta_tilde_t, beta_t] for t >= 1 (Ho et al.'s two choices are the
    ends; a learned one interpolates), and is shaped like x_t."""
    from lightning_ddpm import GaussianDiffusion, make_schedule

    d = GaussianDiffusion(make_schedule("cosine", num_timesteps=20), variance=name)
    x = torch.zeros(19, 3, dtype=torch.float64)
    t = torch.arange(1, 20)
    frac = torch.rand(19, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    var = get_variance(name)
    variance, log_variance = var(d, frac if var.learned else None, t, x)
    assert variance.shape == log_variance.shape == x.shape
    torch.testing.assert_close(variance.log(), log_variance)
    low, high = d.schedule.posterior_variance[1:, None], d.schedule.betas[1:, None]
    assert (variance >= low * (1 - 1e-9)).all() and (variance <= high * (1 + 1e-9)).all()
    # The ends: fixed_small is beta_tilde (the posterior's variance), fixed_large beta; a learned variance
    # reaches them at v = 0 and v = 1.
    ends = {"fixed_small": {None: low}, "fixed_large": {None: high}}.get(name, {0.0: low, 1.0: high})
    for v, expected in ends.items():
        at_v = None if v is None else torch.full_like(frac, v)
        end, log_end = var(d, at_v, t, x)
        torch.testing.assert_close(end, expected.expand_as(x), rtol=1e-12, atol=0)
        torch.testing.assert_close(log_end, expected.log().expand_as(x), rtol=1e-12, atol=0)


def test_a_registered_variance_and_loss_plug_in_by_name():
    """A user-registered variance (half-way between the bounds) and loss (L1 on the target) train and sample."""
    from lightning_ddpm import DDIMSampler, DDPMSampler, GaussianDiffusion, make_schedule
    from lightning_ddpm.core.likelihood import mean_flat
    from lightning_ddpm.core.losses import Loss
    from lightning_ddpm.core.variances import Variance

    class Midway(Variance):
        name = "midway"

        def __call__(self, diffusion, variance_frac, t, x_t):
            log_variance = 0.5 * (
                diffusion.gather("log_betas", t, x_t) + diffusion.gather("posterior_log_variance_clipped", t, x_t)
            ).expand_as(x_t)
            return log_variance.exp(), log_variance

    class L1(Loss):
        name = "l1"

        def __call__(self, diffusion, output, x0, noise, x_t, t):
            target = diffusion.param.from_x0_eps(x0, noise, x_t, diffusion.coefficients(t, x_t))
            return {"loss": mean_flat((output - target).abs())}

    try:
        VARIANCES.register("midway", Midway())
        LOSSES.register("l1", L1())
        d = GaussianDiffusion(make_schedule("linear", num_timesteps=20, beta_end=0.3), variance="midway", loss="l1")
        x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
        t = torch.randint(0, 20, (8,), generator=torch.Generator().manual_seed(1))
        noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(2))
        terms = d.training_losses(lambda x, t: noise, x0, t, noise=noise)  # the exact eps: zero L1
        assert terms["loss"].abs().max() == 0
        _, log_var = d.reverse_variance(None, t, x0)
        torch.testing.assert_close(
            log_var,
            0.5 * (d.schedule.betas.log() + d.schedule.posterior_log_variance_clipped)[t, None].expand(8, 2).float(),
        )
        out = DDPMSampler().sample(lambda x, t: 0.1 * x, d, torch.randn(4, 2))
        assert torch.isfinite(out).all() and DDIMSampler(num_steps=5).sample(lambda x, t: 0.1 * x, d, out).shape == (
            4,
            2,
        )
    finally:
        for registry, name in ((VARIANCES, "midway"), (LOSSES, "l1")):
            if name in registry:
                registry.pop(name)
