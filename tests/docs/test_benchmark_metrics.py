"""The distances and the profile bookkeeping the benchmarks report, against closed forms."""

import math

import pytest
import torch

from benchmarks.metrics import median_bandwidth, mmd_rbf, sliced_w2
from benchmarks.profile_step import category


def gaussian(n: int, mean: list[float], std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(mean) + std * torch.randn(n, len(mean), generator=g, dtype=torch.float64)


def test_sliced_w2_of_a_shift_is_its_length_over_sqrt2_in_2d():
    # Projecting N(0, I) and N(m, I) on a unit direction u gives 1-D Gaussians m.u apart, whose W2 is
    # |m.u|; averaged over uniform directions in 2-D, E[(m.u)^2] = |m|^2 / 2.
    a, b = gaussian(20_000, [0.0, 0.0], 1.0, 0), gaussian(20_000, [3.0, 4.0], 1.0, 1)
    assert sliced_w2(a, b, projections=2000) == pytest.approx(5 / math.sqrt(2), rel=0.03)
    assert sliced_w2(a, a) == 0.0


def test_mmd_rbf_matches_the_gaussian_closed_form():
    # For N(mu1, s^2 I) and N(mu2, s^2 I) in d dims with kernel exp(-|x-y|^2 / (2 h^2)):
    # E k(x, x') = c = (h^2 / (h^2 + 2 s^2))^(d/2) within a set, c * exp(-|mu1-mu2|^2 / (2 (h^2 + 2 s^2)))
    # across, so MMD^2 = 2 c (1 - exp(-|d_mu|^2 / (2 (h^2 + 2 s^2)))).
    h, s, shift, d = 1.0, 0.5, 0.8, 3
    a, b = gaussian(3000, [0.0] * d, s, 2), gaussian(3000, [shift, 0.0, 0.0], s, 3)
    c = (h**2 / (h**2 + 2 * s**2)) ** (d / 2)
    expected = 2 * c * (1 - math.exp(-(shift**2) / (2 * (h**2 + 2 * s**2))))
    assert mmd_rbf(a, b, h) == pytest.approx(expected, rel=0.05)
    # Unbiased: two draws of the same distribution give ~0, on either side.
    same = mmd_rbf(a, gaussian(3000, [0.0] * d, s, 4), h)
    assert abs(same) < 0.05 * expected
    assert mmd_rbf(a, b, h, n=500) == pytest.approx(mmd_rbf(a[:500], b[:500], h), rel=1e-12, abs=0)  # n takes a prefix


def test_median_bandwidth_is_the_median_pairwise_distance():
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # distances 3, 4, 5
    assert median_bandwidth(x) == pytest.approx(4.0)
    assert median_bandwidth(x.view(3, 1, 2)) == pytest.approx(4.0)  # images are flattened


@pytest.mark.parametrize(
    "op, expected",
    [
        ("aten::convolution_backward", "convolution"),
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::native_group_norm_backward", "group norm"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::addmm", "matmul"),
        ("aten::mm", "matmul"),
        ("aten::bernoulli_", "dropout RNG"),
        ("aten::silu_backward", "activation"),
        ("aten::copy_", "copy / layout"),
        ("aten::add_", "elementwise"),
        ("aten::empty_strided", "other"),
    ],
)
def test_profile_categories(op, expected):
    assert category(op) == expected


def test_digits_scores_are_zero_for_the_reference_and_grow_away_from_it():
    """The digits scores of the benchmarks: the reference against itself has Frechet distance 0 (to float
    rounding); other digits of the same split have KID near 0 (unbiased); noise is far on both; the
    classifier is confident about nearly all held-out digits and few noise images."""
    from benchmarks.digits_classifier import digits_split
    from benchmarks.metrics import DigitsScores

    train, held_out = digits_split("train")[0], digits_split("val")[0]
    scores = DigitsScores(train[:400])
    assert abs(scores(train[:400])["frechet"]) < 1e-2
    other = scores(train[400:800])
    real = scores(held_out)
    noise = scores(torch.rand(len(held_out), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert noise["frechet"] > 10 * max(real["frechet"], other["frechet"])
    assert abs(other["kid"]) < 0.05 * noise["kid"] and abs(real["kid"]) < 0.05 * noise["kid"]
    assert real["confident"] > 0.95 > noise["confident"]


def test_mean_sd_over_seeds():
    """The benchmarks' spread over sampling seeds: mean and sample standard deviation per key; no standard
    deviation from a single run."""
    from benchmarks.metrics import mean_sd

    out = mean_sd([{"frechet": 1.0, "kid": 2.0}, {"frechet": 3.0, "kid": 2.0}], keys=("frechet", "kid"))
    assert out == pytest.approx({"frechet_mean": 2.0, "frechet_sd": 2**0.5, "kid_mean": 2.0, "kid_sd": 0.0})
    assert mean_sd([{"frechet": 5.0}], keys=("frechet",)) == {"frechet_mean": 5.0}


def test_digits_frechet_is_the_scores_frechet_distance_against_any_reference():
    """sampler_quality's digits metric: the Frechet distance of DigitsScores with the second set as reference,
    0 for a set against itself, and the closed form of two Gaussians' Frechet distance on the features."""
    from benchmarks.digits_classifier import digits_split
    from benchmarks.metrics import DigitsScores, digits_frechet
    from lightning_ddpm.metrics import DigitsFeatures

    train, held_out = digits_split("train")[0], digits_split("val")[0]
    a, b = held_out, train[:500]
    assert digits_frechet(a, b) == pytest.approx(DigitsScores(b)(a)["frechet"], rel=1e-4)
    assert abs(digits_frechet(b, b)) < 1e-2
    features = DigitsFeatures()
    fa, fb = (features((x + 1) / 2).double() for x in (a, b))
    ma, mb, ca, cb = fa.mean(0), fb.mean(0), fa.T.cov(), fb.T.cov()
    eig = torch.linalg.eigvals(ca @ cb).real.clamp(min=0).sqrt().sum()
    closed = float((ma - mb).square().sum() + ca.trace() + cb.trace() - 2 * eig)
    assert digits_frechet(a, b) == pytest.approx(closed, rel=1e-3)


def test_noise_rules_draw_zero_keeps_the_documented_seeds_and_other_draws_are_disjoint():
    # docs/benchmarks.md quotes draw 0's figures: its seeds must not move; a draw's sets are other noise
    import numpy as np

    from benchmarks.noise_rules import noise, per_sample

    rng = np.random.default_rng(0)
    torch.testing.assert_close(noise("seed+i", 2, 5, rng), per_sample(range(300_037, 300_042)), rtol=0, atol=0)
    batch = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(9_000_000 + 7919 * 2))
    torch.testing.assert_close(noise("batch", 2, 5, rng), batch, rtol=0, atol=0)
    firsts = {
        rule: {float(noise(rule, k, 1, rng, draw=d)[0, 0, 0, 0]) for k in range(3) for d in range(2)}
        for rule in ("batch", "seed+i")
    }
    assert all(len(values) == 6 for values in firsts.values())
