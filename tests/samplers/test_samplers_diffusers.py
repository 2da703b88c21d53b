"""Every sampler against an independent implementation: diffusers' schedulers, configured equivalently.

Two models: the exact denoiser of Gaussian data (eps-prediction) and a small random network
(v-prediction). The betas are handed to diffusers as ``trained_betas`` so both sides share the
schedule; grids that diffusers spells differently are handed over as explicit timesteps.
diffusers computes its coefficients in float32, we in float64: trajectories agree to float32
precision (relative 1e-4 of the sample scale), not bit for bit.
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
# diffusers builds numpy arrays from torch tensors in a way numpy 2 deprecates; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

from lightning_ddpm import GaussianDiffusion, make_schedule  # noqa: E402
from lightning_ddpm.samplers import make_sampler  # noqa: E402

T = 1000
MU, STD = 0.3, 0.6  # the Gaussian data's mean and standard deviation


def _diffusion(parameterization: str, schedule: str = "linear") -> GaussianDiffusion:
    return GaussianDiffusion(make_schedule(schedule, num_timesteps=T), parameterization=parameterization)


def _gaussian_eps(d: GaussianDiffusion):
    """E[eps | x_t] for x0 ~ N(MU, STD^2) per dimension, at integer or fractional t."""

    def model(x, t):
        ab = d.alpha_bar_at(t.to(torch.float64) if t.is_floating_point() else t).to(x.dtype).reshape(-1, 1)
        x0 = MU + ab.sqrt() * STD**2 / (ab * STD**2 + 1 - ab) * (x - ab.sqrt() * MU)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    return model


def _random_net(channels: int = 3):
    g = torch.Generator().manual_seed(0)
    w1, w2, b = (
        torch.randn(channels, 16, generator=g),
        torch.randn(16, channels, generator=g) * 0.3,
        torch.randn(16, generator=g),
    )

    def model(x, t):
        return torch.tanh(x.float() @ w1 + (t.float() / T)[:, None] * b) @ w2

    return model


MODELS = {"gaussian": ("eps", _gaussian_eps), "random_net": ("v", lambda d: _random_net())}
PREDICTION_TYPE = {"eps": "epsilon", "v": "v_prediction"}


def _scheduler(cls, d: GaussianDiffusion, **config):
    return cls(
        num_train_timesteps=T,
        trained_betas=d.schedule.betas.numpy(),
        prediction_type=PREDICTION_TYPE[d.parameterization],
        **config,
    )


def _run_diffusers(scheduler, model, x_T, num_steps, timesteps=None, noises=None, generator=None):
    if timesteps is None:
        scheduler.set_timesteps(num_steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    x = x_T * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        t_batch = torch.full((x.shape[0],), float(t)) if t.is_floating_point() else torch.full((x.shape[0],), int(t))
        output = model(scheduler.scale_model_input(x, t), t_batch)
        extra = {"variance_noise": noises[i]} if noises is not None else {}
        if generator is not None:
            extra["generator"] = generator
        x = scheduler.step(output, t, x, **extra).prev_sample
    return x


def _x_T():
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(1))


def _close(ours, theirs):
    scale = float(theirs.abs().max())
    assert scale > 0.05  # a trajectory that collapsed to zero would agree trivially
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * scale)


def _ours(name, d, model, num_steps, spacing, generator=None, **options):
    sampler = make_sampler({"name": name, "init_args": {"num_steps": num_steps, "spacing": spacing, **options}})
    return sampler, sampler.sample(model, d, _x_T(), generator=generator)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("num_steps", [5, 10, 20])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_dpmpp_2m_matches_dpm_solver_multistep(model_name, num_steps, spacing):
    parameterization, make_model = MODELS[model_name]
    d = _diffusion(parameterization)
    model = make_model(d)
    sampler, ours = _ours("dpmpp_2m", d, model, num_steps, spacing)
    scheduler = _scheduler(
        diffusers.DPMSolverMultistepScheduler,
        d,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing=spacing,
    )  # the same name means the same grid
    _close(ours, _run_diffusers(scheduler, model, _x_T(), num_steps))


GRID_SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
}


@pytest.mark.parametrize("name", sorted(GRID_SCHEDULERS))
@pytest.mark.parametrize("num_timesteps", [50, 100])
def test_every_spacing_name_is_diffusers_grid(name, num_timesteps):
    """A spacing name diffusers users know gives diffusers' timesteps (its scheduler of the same method), for
    every N where diffusers' own grid has N distinct points in [0, T); ours also covers the rest."""
    from lightning_ddpm.samplers import SAMPLERS

    cls = getattr(diffusers, GRID_SCHEDULERS[name])
    compared = 0
    for spacing in ("leading", "trailing", "linspace"):
        if spacing not in SAMPLERS.get(name).spacings:
            continue
        scheduler = cls(num_train_timesteps=num_timesteps, timestep_spacing=spacing)
        for n in range(1, num_timesteps + 1):
            scheduler.set_timesteps(n)
            theirs = [int(t) for t in scheduler.timesteps.tolist()]
            if name == "heun":  # HeunDiscreteScheduler repeats each timestep but the first for its corrector
                theirs = theirs[:1] + theirs[1::2]
            if len(set(theirs)) != n or min(theirs) < 0:  # diffusers' own grid breaks (overshoot, duplicates)
                continue
            ours = make_sampler({"name": name, "init_args": {"num_steps": n, "spacing": spacing}})
            assert ours.timesteps(num_timesteps).tolist() == theirs, (spacing, n)
            compared += 1
    assert compared >= 2 * num_timesteps - 5  # most of every spacing was compared


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("num_steps", [5, 10])
def test_dpmpp_2m_sde_matches_sde_dpm_solver_multistep_given_the_same_noise(model_name, num_steps):
    parameterization, make_model = MODELS[model_name]
    d = _diffusion(parameterization)
    model = make_model(d)
    _, ours = _ours("dpmpp_2m_sde", d, model, num_steps, "trailing", generator=torch.Generator().manual_seed(5))
    # our sampler draws one standard normal of the batch's shape per step but the last (whose noise is
    # multiplied by sigma = 0), in order, from the generator
    g = torch.Generator().manual_seed(5)
    noises = [torch.randn(8, 3, generator=g) for _ in range(num_steps - 1)] + [torch.zeros(8, 3)]
    scheduler = _scheduler(
        diffusers.DPMSolverMultistepScheduler,
        d,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        timestep_spacing="trailing",
    )
    _close(ours, _run_diffusers(scheduler, model, _x_T(), num_steps, noises=noises))


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("num_steps", [5, 10, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_unipc_multistep(model_name, num_steps, order):
    parameterization, make_model = MODELS[model_name]
    d = _diffusion(parameterization)
    model = make_model(d)
    _, ours = _ours("unipc", d, model, num_steps, "trailing", order=order)
    scheduler = _scheduler(
        diffusers.UniPCMultistepScheduler,
        d,
        solver_order=order,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        timestep_spacing="trailing",
    )
    _close(ours, _run_diffusers(scheduler, model, _x_T(), num_steps))


def test_unipc_without_corrector_matches_disable_corrector():
    d = _diffusion("v")
    model = _random_net()
    _, ours = _ours("unipc", d, model, 10, "trailing", order=3, corrector=False)
    scheduler = _scheduler(
        diffusers.UniPCMultistepScheduler,
        d,
        solver_order=3,
        timestep_spacing="trailing",
        disable_corrector=list(range(10)),
    )
    _close(ours, _run_diffusers(scheduler, model, _x_T(), 10))


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("num_steps", [5, 10, 20])
@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_euler_and_heun_match_the_discrete_schedulers(name, model_name, num_steps, spacing):
    parameterization, make_model = MODELS[model_name]
    d = _diffusion(parameterization)
    model = make_model(d)
    _, ours = _ours(name, d, model, num_steps, spacing)
    cls = diffusers.EulerDiscreteScheduler if name == "euler" else diffusers.HeunDiscreteScheduler
    # diffusers' Karras sigmas span its spacing's sigmas; "linspace" spans the schedule's first to last
    config = (
        {"use_karras_sigmas": True, "timestep_spacing": "linspace"}
        if spacing == "karras"
        else {"timestep_spacing": "trailing"}
    )
    _close(ours, _run_diffusers(_scheduler(cls, d, **config), model, _x_T(), num_steps))


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_ddim_scheduler(model_name, spacing):
    parameterization, make_model = MODELS[model_name]
    d = _diffusion(parameterization, schedule="cosine")
    model = make_model(d)
    _, ours = _ours("ddim", d, model, 10, spacing)
    scheduler = _scheduler(
        diffusers.DDIMScheduler, d, clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing
    )
    _close(ours, _run_diffusers(scheduler, model, _x_T(), 10))


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_ddpm_matches_ddpm_scheduler_given_the_same_generator(model_name):
    """Both draw one normal of the batch's shape per step but the last from the generator, in order."""
    parameterization, make_model = MODELS[model_name]
    d = _diffusion(parameterization)
    model = make_model(d)
    _, ours = _ours("ddpm", d, model, None, "leading", generator=torch.Generator().manual_seed(3))
    scheduler = _scheduler(diffusers.DDPMScheduler, d, clip_sample=False, variance_type="fixed_small")
    theirs = _run_diffusers(scheduler, model, _x_T(), T, generator=torch.Generator().manual_seed(3))
    _close(ours, theirs)


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_capped_karras_sigmas_match_diffusers_sigma_max(name, model_name):
    """sigma_max caps the Karras grid as diffusers' ``sigma_max`` config does (EDM's 80), x_T scaled alike."""
    parameterization, make_model = MODELS[model_name]
    d = _diffusion(parameterization, schedule="cosine")  # sigma_max 2e4 uncapped
    model = make_model(d)
    sampler, ours = _ours(name, d, model, 10, "karras", sigma_max=80.0)
    grid = sampler.grid(d)
    assert ((1 - grid.alpha_bar[0]) / grid.alpha_bar[0]).sqrt().item() == pytest.approx(80.0)
    cls = diffusers.EulerDiscreteScheduler if name == "euler" else diffusers.HeunDiscreteScheduler
    scheduler = _scheduler(cls, d, use_karras_sigmas=True, timestep_spacing="linspace")
    scheduler.register_to_config(sigma_max=80.0)  # Heun's constructor lacks the option its Karras code reads
    _close(ours, _run_diffusers(scheduler, model, _x_T(), 10))


@pytest.mark.parametrize(
    "name, cls, config",
    [
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("unipc", "UniPCMultistepScheduler", {"solver_order": 2}),
        ("euler", "EulerDiscreteScheduler", {}),
    ],
)
def test_zero_terminal_snr_starts_where_diffusers_does(name, cls, config):
    """README: on a zero-terminal-SNR schedule the solvers start at alpha_bar = 2^-24, as diffusers does."""
    d = GaussianDiffusion(
        make_schedule("linear", num_timesteps=T, rescale_to_zero_terminal_snr=True), parameterization="v"
    )
    assert float(d.schedule.alphas_cumprod[-1]) == 0.0
    model = _random_net()
    _, ours = _ours(name, d, model, 10, "trailing")
    scheduler = _scheduler(
        getattr(diffusers, cls), d, timestep_spacing="trailing", rescale_betas_zero_snr=True, **config
    )
    _close(ours, _run_diffusers(scheduler, model, _x_T(), 10))
