"""λ schedules for ``RateConstraint(..., lam_schedule=...)``: the λ applied at the constraint's step k
(0-based) is ``lam * schedule(k)`` (docs/backslash.md §5).

Each ready-made schedule is a small frozen dataclass: callable as ``schedule(k) -> factor`` in [0, 1],
picklable, and described by ``state_dict()`` (plain values: its name and settings), from which
``schedule_from_state`` rebuilds it, so ``RateConstraint.state_dict()`` saves it.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Any

from slimrate.schedules import _check_budget, _check_phi, uba_lr


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step: expected an integer >= 0 (the constraint's step count), got {step!r}")
    return int(step)


class _Schedule:
    """State as plain values: {"name": ..., **settings}."""

    name = ""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}


@dataclass(frozen=True)
class Constant(_Schedule):
    """λ factor 1 at every step."""

    name = "constant"

    def __call__(self, step: int) -> float:
        _check_step(step)
        return 1.0


@dataclass(frozen=True)
class LinearWarmup(_Schedule):
    """λ factor min(1, k / warmup_steps): 0 at step 0, 1 from step ``warmup_steps`` on (1 throughout for 0),
    the same ramp as the learning-rate warm-up of ``slimrate.schedules``."""

    warmup_steps: int
    name = "linear_warmup"

    def __post_init__(self) -> None:
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, numbers.Integral) \
                or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected an integer >= 0, got {self.warmup_steps!r}")

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        return 1.0 if step >= self.warmup_steps else step / self.warmup_steps


@dataclass(frozen=True)
class UBAShape(_Schedule):
    """λ factor following the UBA learning-rate schedule (``slimrate.schedules.uba_lr`` with max_lr 1,
    min_lr 0): a linear warm-up over ``warmup_steps``, then UBA's decay from 1 to 0 at ``total_steps``,
    0 after it."""

    total_steps: int
    phi: float
    warmup_steps: int = 0
    name = "uba_shape"

    def __post_init__(self) -> None:
        _check_budget(self.total_steps, self.warmup_steps)
        _check_phi(self.phi)

    def __call__(self, step: int) -> float:
        return uba_lr(_check_step(step), self.total_steps, 1.0, 0.0, self.phi, self.warmup_steps)


def constant() -> Constant:
    """λ unchanged at every step."""
    return Constant()


def linear_warmup(warmup_steps: int) -> LinearWarmup:
    """λ ramped linearly from 0 at step 0 to its full value at step ``warmup_steps``, then held."""
    return LinearWarmup(warmup_steps)


def uba_shape(total_steps: int, phi: float, warmup_steps: int = 0) -> UBAShape:
    """λ following the UBA schedule's shape over ``total_steps`` constraint steps, peak 1 (φ = 2: cosine)."""
    return UBAShape(total_steps, phi, warmup_steps)


SCHEDULES = {cls.name: cls for cls in (Constant, LinearWarmup, UBAShape)}


def schedule_from_state(state: dict[str, Any]) -> _Schedule:
    """The ready-made schedule described by ``state`` (a schedule's ``state_dict()``)."""
    if not isinstance(state, dict) or state.get("name") not in SCHEDULES:
        raise ValueError(f"lam_schedule: expected the state_dict() of one of the schedules {sorted(SCHEDULES)}, "
                         f"got {state!r:.120}")
    settings = {k: v for k, v in state.items() if k != "name"}
    try:
        return SCHEDULES[state["name"]](**settings)
    except TypeError as error:
        raise ValueError(f"lam_schedule: state {state!r:.120} does not match {state['name']}'s settings "
                         f"({error})") from None


def is_saved_schedule(schedule: object) -> bool:
    """True for the ready-made schedules, whose settings a state_dict records."""
    return isinstance(schedule, _Schedule)
