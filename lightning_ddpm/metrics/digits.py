"""A small classifier of scikit-learn's 8x8 digits, shipped with its weights: the Inception of a machine that
cannot download Inception. Its 64 penultimate features make a Frechet distance and a KID for the digits
configs (``FIDCallback(feature_extractor=DigitsFeatures())``); its predictions tell whether an edited or
generated digit is the digit it should be.

The weights (``digits_classifier.pt`` beside this file) are written by ``python -m benchmarks.digits_classifier
--write``: trained on the training split of ``ImageDataModule("digits")`` (the split ``configs/digits.yaml``
trains on), deterministically, and scored on the held-out split; the file records that accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["WEIGHTS", "DigitsClassifier", "DigitsFeatures", "load_digits_classifier"]

WEIGHTS = Path(__file__).with_name("digits_classifier.pt")


class DigitsClassifier(nn.Module):
    """Two 3x3 convolutions, a 64-unit hidden layer (the features) and a linear head; 1 x 8 x 8 images in [-1, 1]."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features),
            nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.num_features, 10))

    def features(self, x: Tensor) -> Tensor:
        """(B, 64) penultimate features of (B, 1, 8, 8) images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """(B, 10) logits."""
        return self.head(self.body(x))


def load_digits_classifier(path: str | Path = WEIGHTS) -> tuple[DigitsClassifier, dict[str, Any]]:
    """The shipped classifier (eval mode, frozen) and what its file records (``held_out_accuracy``, ``seed``, ...)."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"digits classifier weights {str(path)!r} do not exist; write them with "
            "`python -m benchmarks.digits_classifier --write`"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsClassifier()
    model.load_state_dict({k: v.float() for k, v in saved["state_dict"].items()})
    model.eval().requires_grad_(False)
    return model, saved["meta"]


class DigitsFeatures(nn.Module):
    """FIDCallback's ``feature_extractor`` for 8x8 digits: float images in [0, 1], (B, 1, 8, 8) -> (B, 64).

    Always in eval mode (torchmetrics may call ``train()`` on its metrics; the features never change).
    """

    num_features = DigitsClassifier.num_features

    def __init__(self, weights_path: str | None = None) -> None:
        super().__init__()
        self.classifier, self.meta = load_digits_classifier(weights_path or WEIGHTS)

    def train(self, mode: bool = True) -> DigitsFeatures:
        return super().train(False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1:] != (1, 8, 8):
            raise ValueError(f"DigitsFeatures takes (B, 1, 8, 8) images (the 8x8 digits), got {tuple(x.shape)}")
        return self.classifier.features(x.float() * 2 - 1)
