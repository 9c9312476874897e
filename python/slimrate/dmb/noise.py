"""Noise schedules on t ∈ [0, 1]: the rate σ(t) and the total noise σ̄(t) = ∫₀ᵗ σ(s) ds.

The forward process at time t is p_{t|0} = exp(σ̄(t)·Q) (docs/dmb.md §2); the score network is
conditioned on σ̄(t) and the DWDSE weight is σ(t).  Formulas from SEDD's ``noise_lib.py`` (docs/dmb.md §5).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

NOISE_SCHEDULES = ("loglinear", "geometric")


@dataclass(frozen=True)
class LogLinearNoise:
    """σ̄(t) = −log(1 − (1−ε)t), σ(t) = (1−ε)/(1 − (1−ε)t); σ̄(0) = 0, σ̄(1) = −log ε (6.91 at ε = 1e-3).

    For an absorbing chain with unit rate, P(not absorbed at t) = e^{−σ̄(t)} = 1 − (1−ε)t: a linear
    masking schedule.  ε = 1e-3 is DMB's example script and SEDD's default.
    """

    eps: float = 1e-3
    name = "loglinear"

    def __post_init__(self) -> None:
        if not 0 < self.eps < 1:
            raise ValueError(f"eps: expected a number in (0, 1), got {self.eps!r}")

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """σ̄(t), same shape and dtype as t."""
        return -torch.log1p(-(1 - self.eps) * t)

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) = dσ̄/dt, same shape and dtype as t."""
        return (1 - self.eps) / (1 - (1 - self.eps) * t)

    def time_at(self, h: torch.Tensor) -> torch.Tensor:
        """The t with σ̄(t) = h, for h in [σ̄(0), σ̄(1)]."""
        return -torch.expm1(-h) / (1 - self.eps)

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class GeometricNoise:
    """σ̄(t) = σ_min^{1−t}·σ_max^t, σ(t) = σ̄(t)·ln(σ_max/σ_min) (DMB's parser default; SEDD's values).

    σ̄(0) = σ_min > 0: the process starts with a little noise already, so an ELBO integrated over
    t ∈ [0, 1] omits a reconstruction term of order σ_min per token (see ``slimrate.dmb.elbo``).
    """

    sigma_min: float = 1e-4
    sigma_max: float = 20.0
    name = "geometric"

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"sigma_min, sigma_max: expected 0 < sigma_min < sigma_max < inf, got "
                             f"{self.sigma_min!r}, {self.sigma_max!r}")

    def total(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min ** (1 - t) * self.sigma_max ** t

    def rate(self, t: torch.Tensor) -> torch.Tensor:
        return self.total(t) * math.log(self.sigma_max / self.sigma_min)

    def time_at(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log(h / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}


Noise = LogLinearNoise | GeometricNoise


def make_noise(name: str, **kwargs: float) -> Noise:
    """The schedule called ``name`` ("loglinear" or "geometric") with its keyword parameters."""
    if name == "loglinear":
        return LogLinearNoise(**kwargs)
    if name == "geometric":
        return GeometricNoise(**kwargs)
    raise ValueError(f"noise: expected one of {NOISE_SCHEDULES}, got {name!r}")


def noise_from_dict(state: dict) -> Noise:
    """Inverse of ``to_dict``."""
    state = dict(state)
    return make_noise(state.pop("name"), **state)
