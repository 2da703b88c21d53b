"""Image metrics that run offline: the shipped digits classifier and its features (torch only)."""

from .digits import WEIGHTS, DigitsClassifier, DigitsFeatures, load_digits_classifier

__all__ = ["WEIGHTS", "DigitsClassifier", "DigitsFeatures", "load_digits_classifier"]
