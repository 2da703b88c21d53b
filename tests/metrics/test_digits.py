"""The shipped digits classifier: its file holds what the training script writes, its recorded held-out accuracy
is what it scores, and its features make a Frechet distance that separates digits from non-digits."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from benchmarks.digits_classifier import accuracy, digits_split, train_digits_classifier
from lightning_ddpm.metrics import DigitsFeatures, load_digits_classifier


@pytest.fixture(scope="module")
def held_out():
    return digits_split("val")


def test_the_shipped_classifier_scores_its_recorded_held_out_accuracy(held_out):
    model, meta = load_digits_classifier()
    assert accuracy(model, *held_out) == meta["held_out_accuracy"] >= 0.98
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_the_training_script_writes_the_shipped_weights():
    """Deterministic training: with the torch and the CPU kernels (AVX2, AVX512, ...) the file was written with,
    bit for bit; elsewhere the same accuracy up to a few held-out images (kernels round differently: the same
    torch on an AVX2-only host gave other weights). A file that does not record its kernels is checked the
    second way."""
    shipped, meta = load_digits_classifier()
    retrained, held_out_accuracy = train_digits_classifier(meta["epochs"], meta["seed"])
    same_kernels = meta.get("cpu_capability") == torch.backends.cpu.get_cpu_capability()
    if str(torch.__version__) == meta["torch"] and same_kernels:
        for (name, a), b in zip(shipped.state_dict().items(), retrained.state_dict().values()):
            assert torch.equal(a, b), name
        assert held_out_accuracy == meta["held_out_accuracy"]
    else:
        assert abs(held_out_accuracy - meta["held_out_accuracy"]) < 0.01


def test_the_training_script_is_deterministic_on_one_host():
    """Two runs of the script with one seed give the same weights bit for bit; another seed gives others."""
    first, second, other = (train_digits_classifier(2, seed)[0] for seed in (0, 0, 1))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.state_dict()["body.0.weight"], other.state_dict()["body.0.weight"])


def test_digits_features_are_fixed_and_check_their_input():
    features = DigitsFeatures()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    features.train()  # torchmetrics may do this: the features stay those of eval mode
    assert not features.training and features(x).shape == (5, 64)
    assert torch.equal(features(x), features(x))
    with pytest.raises(ValueError, match=r"DigitsFeatures takes \(B, 1, 8, 8\) images"):
        features(torch.rand(2, 3, 8, 8))


def _frechet(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = FrechetInceptionDistance(feature=DigitsFeatures())
    metric.update((real + 1) / 2, real=True)
    metric.update((fake + 1) / 2, real=False)
    return float(metric.compute())


def test_the_frechet_distance_separates_digits_from_what_is_not_a_digit(held_out):
    """Equal set sizes (the distance is biased by the count): training digits against held-out digits is the
    floor; the same digits shifted by two pixels, blurred, or replaced by noise of the same pixel statistics
    are far above it."""
    images, _ = held_out
    n = len(images)
    train = digits_split("train")[0][:n]
    floor = _frechet(images, train)
    g = torch.Generator().manual_seed(0)
    noise = (train.mean() + train.std() * torch.randn(train.shape, generator=g)).clamp(-1, 1)
    shifted = torch.roll(train, shifts=(2, 2), dims=(-2, -1))
    blurred = torch.nn.functional.avg_pool2d(train, 3, stride=1, padding=1, count_include_pad=False)
    for name, other in {"noise": noise, "shifted": shifted, "blurred": blurred}.items():
        assert _frechet(images, other) > 5 * floor, name
