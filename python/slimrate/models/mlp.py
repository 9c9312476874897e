"""The small classifier for scikit-learn's 8×8 digits: an MLP 64 → hidden → hidden → 10."""

from __future__ import annotations

from torch import nn

DIGITS_FEATURES = 64  # 8×8 pixels
DIGITS_CLASSES = 10


class DigitsMLP(nn.Sequential):
    """Linear(64, h), ReLU, Linear(h, h), ReLU, Linear(h, 10): x (B, 64) float32 → logits (B, 10).

    A plain ``nn.Sequential`` underneath, so state-dict keys are ``0.weight`` … ``4.bias`` and a seed
    gives the same weights as the equivalent hand-written ``nn.Sequential``.
    """

    def __init__(self, hidden: int = 256):
        if hidden < 1:
            raise ValueError(f"hidden: expected a positive width, got {hidden}")
        super().__init__(nn.Linear(DIGITS_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, DIGITS_CLASSES))


def build_digits_mlp(hidden: int = 256) -> DigitsMLP:
    """A freshly initialised ``DigitsMLP`` of width ``hidden`` (85,002 parameters at 256)."""
    return DigitsMLP(hidden)
