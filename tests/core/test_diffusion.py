import math

import pytest
import torch
from torch import nn

from lightning_ddpm import GaussianDiffusion, make_schedule
from lightning_ddpm.core.likelihood import LN2
from tests.conftest import oracle, small_schedule

T = 20


def _diffusion(schedule_name="linear", **kw):
    return GaussianDiffusion(small_schedule(schedule_name, T), **kw)


def test_q_sample_monte_carlo_moments(schedule_name):
    d = _diffusion(schedule_name)
    g = torch.Generator().manual_seed(1)
    n = 200_000
    for step in (0, T // 2, T - 1):
        x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
        x_t = d.q_sample(x0, torch.full((n,), step), generator=g)
        ab = d.schedule.alphas_cumprod[step].item()
        se = math.sqrt((1 - ab) / n)
        assert abs(x_t.mean().item() - math.sqrt(ab) * 0.7) < 5 * se
        assert x_t.var().item() == pytest.approx(1 - ab, rel=0.02)
        mean, var, _ = d.q_mean_variance(x0[:1], torch.tensor([step]))
        assert mean.item() == pytest.approx(math.sqrt(ab) * 0.7) and var.item() == pytest.approx(1 - ab)


def test_posterior_is_the_product_of_gaussians(schedule_name):
    """q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), computed by completing the square."""
    d = _diffusion(schedule_name)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(T, 5, dtype=torch.float64, generator=g)
    x_t = torch.randn(T, 5, dtype=torch.float64, generator=g)
    t = torch.arange(T)
    mean, var, log_var = d.q_posterior(x0, x_t, t)
    s = d.schedule
    for step in range(1, T):
        ab_prev, alpha, beta = s.alphas_cumprod[step - 1], s.alphas[step], s.betas[step]
        precision = 1 / (1 - ab_prev) + alpha / beta
        expected_mean = (ab_prev.sqrt() * x0[step] / (1 - ab_prev) + alpha.sqrt() * x_t[step] / beta) / precision
        torch.testing.assert_close(mean[step], expected_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var[step], (1 / precision).expand(5), rtol=1e-10, atol=0)
        torch.testing.assert_close(log_var[step], (1 / precision).log().expand(5), rtol=1e-10, atol=0)
    torch.testing.assert_close(mean[0], x0[0])  # at the first step the posterior mean is x0


def test_p_mean_variance_with_the_oracle(schedule_name, parameterization, variance):
    d = _diffusion(schedule_name, parameterization=parameterization, variance=variance)
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(1, 2, 4, 4, dtype=torch.float64, generator=g) * 2 - 1
    t = torch.arange(T)
    x_t = d.q_sample(x0.expand(T, -1, -1, -1), t, generator=g)
    out = oracle(d, x0)(x_t, t)
    p = d.p_mean_variance(out, x_t, t)
    true_mean, true_var, _ = d.q_posterior(x0.expand_as(x_t), x_t, t)
    torch.testing.assert_close(p.mean, true_mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(p.pred_x0, x0.expand_as(x_t), rtol=1e-8, atol=1e-8)
    s = d.schedule
    expected = {
        "fixed_small": s.posterior_variance,
        "fixed_large": torch.cat([s.posterior_variance[1:2], s.betas[1:]]),
        # output 0 on the variance channels: the geometric mean of beta and the clipped beta_tilde
        "learned_range": (0.5 * s.betas.log() + 0.5 * s.posterior_log_variance_clipped).exp(),
    }[variance]
    torch.testing.assert_close(p.variance[:, 0, 0, 0], expected, rtol=1e-10, atol=1e-14)


def test_learned_range_interpolates_between_the_bounds():
    d = _diffusion(variance="learned_range")
    x_t = torch.zeros(T, 1, 2, 2, dtype=torch.float64)
    t = torch.arange(T)
    s = d.schedule
    _, log_hi = d.reverse_variance(torch.ones_like(x_t), t, x_t)  # variance_frac 1: beta_t
    _, log_lo = d.reverse_variance(torch.zeros_like(x_t), t, x_t)  # variance_frac 0: beta_tilde_t
    torch.testing.assert_close(log_hi[:, 0, 0, 0], s.betas.log())
    torch.testing.assert_close(log_lo[:, 0, 0, 0], s.posterior_log_variance_clipped)


def test_wrong_output_channels_is_a_clear_error():
    d = _diffusion(variance="learned_range")
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"expected \(2, 6, 4, 4\) for variance='learned_range'"):
        d.p_mean_variance(torch.zeros(2, 3, 4, 4), x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(2, 3, 4, 4\) for variance='fixed_small'"):
        _diffusion().training_losses(lambda x, t: torch.cat([x, x], 1), x, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"parameterization": "score"}, r"unknown parameterization 'score'; choose one of: eps, x0, mu, v"),
        (
            {"variance": "learned"},
            r"unknown variance 'learned'; choose one of: fixed_small, fixed_large, learned_range",
        ),
        ({"loss": "l1"}, r"unknown loss 'l1'; choose one of: simple, vlb, hybrid"),
        ({"loss_weighting": "snr"}, r"unknown loss_weighting 'snr'; choose one of: none, elbo, min_snr"),
        ({"loss": "hybrid", "variance": "fixed_small"}, r"needs variance='learned_range'"),
        ({"min_snr_gamma": 0.0}, r"min_snr_gamma must be > 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _diffusion(**kwargs)


def test_zero_terminal_snr_needs_v_or_x0():
    s = make_schedule("linear", num_timesteps=T, rescale_to_zero_terminal_snr=True)
    with pytest.raises(ValueError, match="use parameterization='x0' or 'v'"):
        GaussianDiffusion(s, parameterization="eps")
    d = GaussianDiffusion(s, parameterization="v")
    x0 = torch.rand(4, 2, dtype=torch.float64)
    x_t = d.q_sample(x0, torch.full((4,), T - 1), generator=torch.Generator().manual_seed(0))
    out = oracle(d, x0)(x_t, torch.full((4,), T - 1))
    torch.testing.assert_close(d.p_mean_variance(out, x_t, torch.full((4,), T - 1)).pred_x0, x0)


def test_oracle_has_zero_loss(parameterization):
    d = _diffusion(parameterization=parameterization)
    x0 = torch.rand(1, 3, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.arange(T)
    losses = d.training_losses(
        oracle(d, x0), x0.expand(T, -1, -1, -1).clone(), t, generator=torch.Generator().manual_seed(0)
    )
    assert losses["loss"].abs().max().item() < 1e-18


def test_elbo_weight_turns_the_mse_into_the_kl_term(parameterization):
    """With a fixed variance and t > 0, lambda_t * MSE on the target equals the VLB KL term (Ho et al. eq. 8-12)."""
    for variance in ("fixed_small", "fixed_large"):
        d = _diffusion(parameterization=parameterization, variance=variance, loss_weighting="elbo")
        g = torch.Generator().manual_seed(4)
        t = torch.arange(1, T)
        x0 = torch.rand(T - 1, 2, 3, 3, dtype=torch.float64, generator=g) * 2 - 1
        noise = torch.randn(x0.shape, dtype=torch.float64, generator=g)
        wrong = torch.randn(x0.shape, dtype=torch.float64, generator=g)  # an arbitrary model output
        losses = d.training_losses(lambda x, t, wrong=wrong: wrong, x0, t, noise)
        x_t = d.q_sample(x0, t, noise)
        kl_bits = d.vlb_terms(wrong, x0, x_t, t)
        # The variance mismatch constant: the KL term of a model with the right mean.
        right = d.param.from_x0_eps(x0, noise, x_t, d.coefficients(t, x_t))
        const_bits = d.vlb_terms(right, x0, x_t, t)
        torch.testing.assert_close(losses["loss"], (kl_bits - const_bits) * LN2, rtol=1e-8, atol=1e-12)


def test_min_snr_weights_match_hang_et_al():
    gamma = 5.0
    t = torch.arange(T)
    snr = small_schedule("linear", T).snr
    x = torch.zeros(T, 1, dtype=torch.float64)
    published = {
        "eps": snr.clamp(max=gamma) / snr,
        "x0": snr.clamp(max=gamma),
        "v": snr.clamp(max=gamma) / (snr + 1),
    }
    for name, expected in published.items():
        d = _diffusion(parameterization=name, loss_weighting="min_snr", min_snr_gamma=gamma)
        torch.testing.assert_close(d.mse_weight(t, x), expected, rtol=1e-10, atol=0)


def test_hybrid_vlb_term_trains_only_the_variance():
    d = _diffusion(variance="learned_range", loss="hybrid")
    x0 = torch.rand(4, 2, 3, 3, dtype=torch.float64) * 2 - 1
    out = torch.randn(4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    losses = d.training_losses(
        lambda x, t: out, x0, torch.tensor([0, 3, 9, 19]), generator=torch.Generator().manual_seed(0)
    )
    (grad,) = torch.autograd.grad(losses["vlb"].sum(), out)
    assert grad[:, :2].abs().max().item() == 0.0 and grad[:, 2:].abs().max().item() > 0
    expected = losses["mse"] + 1e-3 * T * losses["vlb"]
    torch.testing.assert_close(losses["loss"], expected)


def _normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_bits_per_dim_of_a_point_mass_by_hand():
    """Data = one 8-bit point, model = the exact denoiser: every KL term is 0 and the bound is
    prior + decoder, both computable with math.erf."""
    d = _diffusion(variance="fixed_small")
    pixels = torch.tensor([0, 37, 128, 200, 255], dtype=torch.float64)
    x0 = (pixels / 127.5 - 1).reshape(1, 5)
    bpd = d.bits_per_dim_terms(oracle(d, x0), x0, generator=torch.Generator().manual_seed(0))
    assert bpd.terms[:, 1:].abs().max().item() < 1e-10
    s = d.schedule
    ab_T = s.alphas_cumprod[-1].item()
    sigma = math.sqrt(s.posterior_variance[1].item())  # clipped log-variance at t = 0
    nats = 0.0
    for x in x0.flatten().tolist():
        nats += 0.5 * (-math.log(1 - ab_T) + (1 - ab_T) + ab_T * x * x - 1)  # KL(q(x_T|x0) || N(0,1))
        half = 1 / 255 / sigma
        p = _normal_cdf(half) if abs(x) == 1 else _normal_cdf(half) - _normal_cdf(-half)
        nats -= math.log(p)
    expected = nats / 5 / math.log(2)
    assert bpd.total.item() == pytest.approx(expected, rel=1e-9)
    assert bpd.total.item() == pytest.approx(bpd.prior.item() + bpd.terms.sum().item())


def test_bits_per_dim_terms_against_an_independent_computation():
    """A zero eps-model: every KL term spelled out from the paper's formulas, same noise draws."""
    d = _diffusion(variance="fixed_small")
    g = torch.Generator().manual_seed(5)
    x0 = (torch.randint(0, 256, (3, 6), generator=g).double() / 127.5) - 1
    bpd = d.bits_per_dim(lambda x, t: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(7))
    s, g = d.schedule, torch.Generator().manual_seed(7)
    total = torch.zeros(3, dtype=torch.float64)
    for step in reversed(range(T)):
        ab, ab_prev, beta, alpha = (s.alphas_cumprod[step], s.alphas_cumprod_prev[step], s.betas[step], s.alphas[step])
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        # with eps_theta = 0: mu_theta = x_t / sqrt(alpha) (Ho et al. eq. 11)
        mu_theta = x_t / alpha.sqrt()
        if step > 0:
            var = (1 - ab_prev) / (1 - ab) * beta
            mu_true = ab_prev.sqrt() * beta / (1 - ab) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab) * x_t
            total += ((mu_true - mu_theta) ** 2 / (2 * var)).mean(1) / math.log(2)
        else:
            sigma = s.posterior_variance[1].sqrt()
            ncdf = lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
            up = torch.where(x0 > 0.999, torch.ones_like(x0), ncdf((x0 + 1 / 255 - mu_theta) / sigma))
            lo = torch.where(x0 < -0.999, torch.zeros_like(x0), ncdf((x0 - 1 / 255 - mu_theta) / sigma))
            total += -torch.log((up - lo).clamp(min=1e-300)).mean(1) / math.log(2)
    ab_T = s.alphas_cumprod[-1]
    total += (0.5 * (-(1 - ab_T).log() + (1 - ab_T) + ab_T * x0**2 - 1)).mean(1) / math.log(2)
    torch.testing.assert_close(bpd, total, rtol=1e-7, atol=1e-9)


class _TinyDenoiser(nn.Module):
    def __init__(self, dim: int = 2, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, dim)
        )

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype) / T], dim=1))


def test_elbo_decreases_during_a_short_optimisation():
    torch.manual_seed(0)  # only for the network's initial weights
    d = _diffusion(variance="fixed_small")
    g = torch.Generator().manual_seed(6)
    data = (torch.tensor([[40, 200], [200, 40], [128, 128], [30, 30]]).double() / 127.5 - 1).repeat(16, 1)
    model = _TinyDenoiser().double()
    bpd = lambda: d.bits_per_dim(model, data, generator=torch.Generator().manual_seed(0)).mean().item()
    before = bpd()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        t = torch.randint(0, T, (data.shape[0],), generator=g)
        loss = d.training_losses(model, data, t, generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bpd()
    assert after < before - 0.5, (before, after)


def test_mean_bits_per_dim_averages_batches():
    d = _diffusion()
    x0 = torch.rand(6, 4, dtype=torch.float64) * 2 - 1
    zero = lambda x, t: torch.zeros_like(x)
    # unequal batches (1 and 5 examples): the mean over examples differs from the mean of the batch means
    got = d.mean_bits_per_dim(zero, [x0[:1], x0[1:]], generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)  # replay the same noise stream batch by batch
    first, rest = d.bits_per_dim(zero, x0[:1], generator=g), d.bits_per_dim(zero, x0[1:], generator=g)
    assert got == pytest.approx(torch.cat([first, rest]).mean().item(), rel=1e-12)
    assert got != pytest.approx((first.mean() + rest.mean()).item() / 2, rel=1e-3)
    with pytest.raises(ValueError, match="no data"):
        d.mean_bits_per_dim(zero, [])


def test_constants_stay_float64_under_half_precision():
    d = _diffusion().to(torch.bfloat16)
    assert d.betas.dtype == torch.float64
    torch.testing.assert_close(d.betas, d.schedule.betas)
