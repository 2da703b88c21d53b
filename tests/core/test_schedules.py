import math

import pytest
import torch

from lightning_ddpm import NoiseSchedule, make_schedule, register_schedule
from lightning_ddpm.core.schedules import SCHEDULES as SCHEDULE_REGISTRY
from lightning_ddpm.core.schedules import available_schedules
from tests.conftest import SCHEDULES


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_contract(name):
    s = make_schedule(name, num_timesteps=1000)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (1000,)
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    # alpha_bar is the running product, recomputed here by a plain loop.
    prod, expected = 1.0, []
    for b in s.betas.tolist():
        prod *= 1.0 - b
        expected.append(prod)
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    assert (s.alphas_cumprod.diff() < 0).all()
    torch.testing.assert_close(s.snr, s.alphas_cumprod / (1 - s.alphas_cumprod))


def test_linear_matches_ho_et_al():
    s = make_schedule("linear", num_timesteps=1000)
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    torch.testing.assert_close(s.betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_cosine_closed_form():
    T, s_ = 1000, 0.008
    s = make_schedule("cosine", num_timesteps=T)
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2  # Nichol & Dhariwal, eq. 17
    unclipped = int((s.betas < 0.999).sum())
    assert unclipped > 990
    expected = torch.tensor([f(t + 1) / f(0) for t in range(unclipped)], dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod[:unclipped], expected, rtol=1e-10, atol=1e-14)
    assert s.betas.max().item() == pytest.approx(0.999)


def test_scaled_linear_is_linear_in_sqrt_beta():
    s = make_schedule("scaled_linear", num_timesteps=100, beta_start=1e-4, beta_end=0.04)
    root = s.betas.sqrt()
    assert root[0].item() == pytest.approx(0.01) and root[-1].item() == pytest.approx(0.2)
    torch.testing.assert_close(root.diff(), torch.full((99,), 0.19 / 99, dtype=torch.float64))


def test_sigmoid_closed_form():
    T = 200
    s = make_schedule("sigmoid", num_timesteps=T)
    sig = lambda z: 1 / (1 + math.exp(-z))
    f = lambda u: (sig(3.0) - sig(6 * u - 3)) / (sig(3.0) - sig(-3.0))  # Chen 2023, start=-3, end=3, tau=1
    expected = torch.tensor([f((t + 1) / T) for t in range(T - 1)], dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod[: T - 1], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr_rescale(name):
    base = make_schedule(name, num_timesteps=100)
    s = make_schedule(name, num_timesteps=100, rescale_to_zero_terminal_snr=True)
    assert s.alphas_cumprod[-1].item() == 0.0 and s.has_zero_terminal_snr
    assert s.betas[-1].item() == pytest.approx(1.0)
    # Lin et al. 2024, Algorithm 1: sqrt(alpha_bar) is an affine map of the original that keeps the first value.
    a, b = base.alphas_cumprod.sqrt(), s.alphas_cumprod.sqrt()
    torch.testing.assert_close(b[0], a[0])
    scale = a[0] / (a[0] - a[-1])
    torch.testing.assert_close(b, (a - a[-1]) * scale, rtol=1e-10, atol=1e-12)


def test_custom_betas_and_errors():
    s = make_schedule("custom", num_timesteps=3, betas=[0.1, 0.2, 0.3])
    torch.testing.assert_close(s.betas, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    torch.testing.assert_close(NoiseSchedule([0.1, 0.2, 0.3]).alphas_cumprod, s.alphas_cumprod)
    with pytest.raises(ValueError, match="got 2 betas for num_timesteps=3"):
        make_schedule("custom", num_timesteps=3, betas=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"unknown schedule 'quadratic'; choose one of: .*linear.*cosine"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match=r"bad options for schedule 'linear'"):
        make_schedule("linear", beta_max=0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        NoiseSchedule([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="only allowed at the last"):
        NoiseSchedule([0.1, 1.0, 0.2])
    with pytest.raises(ValueError, match="positive integer"):
        make_schedule("linear", num_timesteps=0)


def test_register_schedule_plugs_in_by_name():
    @register_schedule("constant_test")
    def constant(num_timesteps: int, beta: float = 0.05):
        return torch.full((num_timesteps,), beta, dtype=torch.float64)

    try:
        assert "constant_test" in available_schedules()
        s = make_schedule("constant_test", num_timesteps=10, beta=0.1)
        torch.testing.assert_close(s.alphas_cumprod, 0.9 ** torch.arange(1, 11, dtype=torch.float64))
        register_schedule("constant_test")(constant)  # the same definition again (a re-run cell) is fine
        with pytest.raises(ValueError, match="schedule name 'constant_test' is already registered"):
            register_schedule("constant_test")(lambda num_timesteps: torch.full((num_timesteps,), 0.1))
    finally:
        SCHEDULE_REGISTRY.pop("constant_test")


def test_posterior_constants():
    s = make_schedule("linear", num_timesteps=50, beta_end=0.2)
    assert s.posterior_variance[0].item() == 0.0  # q(x_0 | x_1, x0) is a point mass
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1.0) and s.posterior_mean_coef2[0].item() == 0.0
    torch.testing.assert_close(s.posterior_log_variance_clipped[0], s.posterior_variance[1].log())
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log())
    # beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, spelled out at t = 10.
    ab = s.alphas_cumprod
    assert s.posterior_variance[10].item() == pytest.approx(((1 - ab[9]) / (1 - ab[10]) * s.betas[10]).item())


def test_respace_keeps_alpha_bar_at_kept_steps():
    s = make_schedule("cosine", num_timesteps=100)
    kept = [0, 9, 30, 55, 99]
    r = s.respace(kept)
    assert r.num_timesteps == 5
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[kept])
    with pytest.raises(ValueError, match="distinct indices"):
        s.respace([0, 100])


def test_the_math_layer_imports_without_lightning():
    import subprocess
    import sys

    code = (
        "import sys, lightning_ddpm.core.schedules, lightning_ddpm.core.parameterizations, lightning_ddpm.core.diffusion, "
        "lightning_ddpm.samplers, lightning_ddpm.core.guidance, lightning_ddpm.core.likelihood, "
        "lightning_ddpm.core.timestep_sampling, lightning_ddpm.backbones, lightning_ddpm.core.registry, "
        "lightning_ddpm.core.denoiser, lightning_ddpm.core.variances, lightning_ddpm.core.losses, "
        "lightning_ddpm.interop.diffusers, lightning_ddpm.interop.diffusers_unet\n"
        "from lightning_ddpm import GaussianDiffusion, DDIMSampler, make_schedule, build_backbone\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', "
        "'torchmetrics', 'jsonargparse', 'diffusers')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
