"""Sample-quality distances between two sets of points: sliced Wasserstein-2 and kernel MMD."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def sliced_w2(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2: the root mean squared W2 over random 1-D projections (equal sample sizes).

    In 1-D, W2 between two equal-size empirical distributions pairs the sorted samples.
    """
    directions = torch.randn(a.shape[1], projections, generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=0, keepdim=True)
    pa, pb = (a.float() @ directions).sort(dim=0).values, (b.float() @ directions).sort(dim=0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def mmd_rbf(a: Tensor, b: Tensor, bandwidth: float, n: int | None = None) -> float:
    """Unbiased squared MMD with the kernel exp(-|x - y|^2 / (2 h^2)) between two sets of vectors
    (flattened), on the first ``n`` of each when given (the cost is quadratic)."""
    a, b = a[:n].flatten(1).double(), b[:n].flatten(1).double()

    def kernel(x: Tensor, y: Tensor) -> Tensor:
        return torch.exp(-(torch.cdist(x, y) ** 2) / (2 * bandwidth**2))

    def off_diagonal_mean(k: Tensor) -> Tensor:
        m = k.shape[0]
        return (k.sum() - k.diagonal().sum()) / (m * (m - 1))

    return float(off_diagonal_mean(kernel(a, a)) + off_diagonal_mean(kernel(b, b)) - 2 * kernel(a, b).mean())


def median_bandwidth(x: Tensor) -> float:
    """The median pairwise distance of ``x``: the usual heuristic bandwidth for an RBF kernel."""
    flat = x.flatten(1).double()
    d = torch.cdist(flat, flat)
    i, j = torch.triu_indices(len(x), len(x), 1)
    return float(d[i, j].median())


class DigitsScores:
    """Image-quality scores of 8x8 digits in the shipped classifier's features, against fixed ``reference``
    digits ([-1, 1]): the Frechet distance (biased by the sample count: compare equal counts), KID (unbiased)
    and the share of images the classifier is confident about (max softmax > 0.9)."""

    def __init__(self, reference: Tensor, kid_subset_size: int = 100) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        from lightning_ddpm.metrics import DigitsFeatures, load_digits_classifier

        self.classifier, _ = load_digits_classifier()
        self.fid = FrechetInceptionDistance(feature=DigitsFeatures(), reset_real_features=False)
        self.kid = KernelInceptionDistance(
            feature=DigitsFeatures(), reset_real_features=False, subset_size=kid_subset_size
        )
        self.kid_subset_size = kid_subset_size
        for metric in (self.fid, self.kid):
            metric.update((reference.float() + 1) / 2, real=True)

    def __call__(self, images: Tensor, seed: int = 0) -> dict[str, float]:
        images = (images.float().clamp(-1, 1) + 1) / 2
        self.fid.reset()
        self.fid.update(images, real=False)
        self.kid.reset()
        self.kid.subset_size = min(self.kid_subset_size, len(images))
        self.kid.update(images, real=False)
        torch.manual_seed(seed)  # KID draws its subsets from the global generator
        kid_mean, _ = self.kid.compute()
        with torch.no_grad():
            confidence = self.classifier(images * 2 - 1).softmax(1).max(1).values
        return {
            "frechet": float(self.fid.compute()),
            "kid": float(kid_mean),
            "confident": float((confidence > 0.9).float().mean()),
        }


def digits_frechet(a: Tensor, b: Tensor) -> float:
    """The Frechet distance between two sets of 8x8 digits ([-1, 1]) in the shipped classifier's features
    (biased by the sample count: compare sets of equal sizes)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from lightning_ddpm.metrics import DigitsFeatures

    fid = FrechetInceptionDistance(feature=DigitsFeatures())
    fid.update((b.float().clamp(-1, 1) + 1) / 2, real=True)
    fid.update((a.float().clamp(-1, 1) + 1) / 2, real=False)
    return float(fid.compute())


def mean_sd(
    runs: Sequence[Mapping[str, float]], keys: Sequence[str] = ("frechet", "kid", "confident")
) -> dict[str, float]:
    """``{key}_mean`` and ``{key}_sd`` of each key over ``runs`` (one score dict per seed); the standard deviation
    only from two runs on."""
    out = {}
    for key in keys:
        values = torch.tensor([r[key] for r in runs], dtype=torch.float64)
        out[f"{key}_mean"] = float(values.mean())
        if len(runs) > 1:
            out[f"{key}_sd"] = float(values.std())
    return out
