"""Learning-rate schedules for a fixed step budget: UBA (docs/uba.md) and the baselines it is compared with.

Every schedule but OneCycle sets each param group's lr at step ``step`` (= ``last_epoch``) to

    lr = min_lr + (max_lr − min_lr) · f(step)

where max_lr is the group's initial lr and min_lr an absolute floor shared by all groups (≤ every max_lr):

- warm-up (a library convenience, not from the UBA paper): for step < warmup_steps, f = step / warmup_steps,
  a linear ramp from min_lr (not 0, so min_lr is a floor everywhere; with min_lr = 0 it is transformers'
  ``get_*_schedule_with_warmup`` ramp) that reaches max_lr at step == warmup_steps;
- decay: f = shape(p), progress p = (step − warmup_steps) / (total_steps − warmup_steps); the decay starts at
  max_lr and ends at step == total_steps (torch's ``CosineAnnealingLR`` convention);
- past the budget (step > total_steps) p is clamped to 1: the lr holds its end value (min_lr for uba, cosine,
  linear and wsd; min_lr + gamma²·(max_lr − min_lr) for step).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR

from slimrate.files import figure_png

# φ = 2 makes UBA exactly cosine annealing. The paper's φ guidance is unknown (docs/uba.md §5), so the
# default is the one value whose behaviour is known and standard: a default UBA is never a regression against
# the cosine baseline; sweep φ (e.g. 0.5, 1, 2, 4, 8) to use it. The third-party default 0.8 is not taken:
# its provenance is unknown and, under the φ = 2κ reading, it would mean a condition number κ < 1.
DEFAULT_PHI = 2.0
# torch's OneCycleLR default ramp share (pct_start), used when OneCycle gets warmup_steps=0.
ONECYCLE_DEFAULT_RAMP = 0.3


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_budget(total_steps: int, warmup_steps: int) -> None:
    if not _is_int(total_steps) or total_steps <= 0:
        raise ValueError(f"total_steps: expected an integer > 0, got {total_steps!r}")
    if not _is_int(warmup_steps) or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps: expected an integer in [0, total_steps={total_steps}), got {warmup_steps!r}")


def _check_phi(phi: float) -> None:
    if isinstance(phi, bool) or not isinstance(phi, numbers.Real) or not math.isfinite(phi) or phi <= 0:
        raise ValueError(f"phi: expected a finite number > 0 (2 = cosine), got {phi!r}")


def _check_lrs(max_lrs: Sequence[float], min_lr: float) -> None:
    if isinstance(min_lr, bool) or not isinstance(min_lr, numbers.Real) or not 0 <= min_lr < math.inf:
        raise ValueError(f"min_lr: expected a finite number >= 0, got {min_lr!r}")
    for i, max_lr in enumerate(max_lrs):
        if not min_lr <= max_lr < math.inf:
            raise ValueError(f"min_lr: expected <= max_lr of every param group, got min_lr={min_lr} and "
                             f"max_lr={max_lr} (param_groups[{i}]); lower min_lr or raise that group's lr")


def uba_shape(progress: float, phi: float = DEFAULT_PHI) -> float:
    """UBA's normalised decay u(p) ∈ [0, 1] at progress p = t/T ∈ [0, 1], from u(0) = 1 to u(1) = 0.

    u = s / (φ/2 + (1 − φ/2)·s),  s = (1 + cos(πp))/2  (the cosine factor), i.e. 1/u = (φ/2)/s + 1 − φ/2.
    φ = 2 is exactly cosine annealing; φ < 2 holds the rate high longer and drops it late (WSD-like);
    φ > 2 decays early with a long low tail. Monotone non-increasing in p; lower at every interior p as φ grows.

    UNVERIFIED: a reconstruction from third-party code (docs/uba.md §1–§4), not checked against Section 3 of
    Tang et al., "Stepsize anything" (NeurIPS 2025, arXiv 2505.24452). Every schedule here calls this one
    function, so a corrected form changes only this body.
    DERIVED link to curvature: with φ = 2κ this is the Chebyshev (minimax) step size for quadratics with
    curvature in [μ, L], κ = L/μ, 1/η(p) = (L+μ)/2 − (L−μ)/2·cos(πp), normalised between η = 1/μ and 1/L.
    """
    _check_phi(phi)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress: expected a number in [0, 1], got {progress!r}")
    s = 0.5 * (1.0 + math.cos(math.pi * progress))
    return s / (0.5 * phi + (1.0 - 0.5 * phi) * s)


def _budget_lr(shape: Callable[[float], float], step: int, total_steps: int, max_lr: float, min_lr: float,
               warmup_steps: int) -> float:
    """The module docstring's lr at ``step``; arguments already checked."""
    if step < warmup_steps:
        return min_lr + (max_lr - min_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (max_lr - min_lr) * shape(progress)


def uba_lr(step: int, total_steps: int, max_lr: float, min_lr: float = 0.0, phi: float = DEFAULT_PHI,
           warmup_steps: int = 0) -> float:
    """UBA's learning rate at ``step`` (0-based) for a budget of ``total_steps`` (module docstring: warm-up
    from min_lr, decay ``uba_shape(p, phi)`` over T = total_steps − warmup_steps, min_lr held past the budget)."""
    _check_budget(total_steps, warmup_steps)
    _check_phi(phi)
    if not _is_int(step) or step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    _check_lrs([max_lr], min_lr)
    return _budget_lr(lambda p: uba_shape(p, phi), step, total_steps, max_lr, min_lr, warmup_steps)


class BudgetLR(LRScheduler):
    """Base of the budget schedules: warm-up, then ``shape(progress)`` between each group's initial lr and the
    absolute floor ``min_lr`` (module docstring). Subclasses define ``shape``; state lives in plain attributes,
    so ``state_dict()`` / ``load_state_dict()`` round-trip it."""

    def __init__(self, optimizer: Optimizer, total_steps: int, min_lr: float = 0.0, warmup_steps: int = 0,
                 last_epoch: int = -1) -> None:
        _check_budget(total_steps, warmup_steps)
        _check_lrs([float(group.get("initial_lr", group["lr"])) for group in optimizer.param_groups], min_lr)
        self.total_steps, self.warmup_steps, self.min_lr = total_steps, warmup_steps, float(min_lr)
        super().__init__(optimizer, last_epoch)

    def shape(self, progress: float) -> float:
        """Decay factor in [0, 1] at progress ∈ [0, 1] after warm-up; 1 at progress 0."""
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        return [_budget_lr(self.shape, self.last_epoch, self.total_steps, float(max_lr), self.min_lr,
                           self.warmup_steps) for max_lr in self.base_lrs]


class UBA(BudgetLR):
    """UBA (Tang et al., NeurIPS 2025): ``uba_shape(progress, phi)``; phi = 2 is cosine annealing."""

    def __init__(self, optimizer: Optimizer, total_steps: int, phi: float = DEFAULT_PHI, min_lr: float = 0.0,
                 warmup_steps: int = 0, last_epoch: int = -1) -> None:
        _check_phi(phi)
        self.phi = float(phi)
        super().__init__(optimizer, total_steps, min_lr, warmup_steps, last_epoch)

    def shape(self, progress: float) -> float:
        return uba_shape(progress, self.phi)


class CosineDecay(BudgetLR):
    """Cosine annealing (Loshchilov & Hutter 2017, SGDR without restarts): (1 + cos(πp))/2."""

    def shape(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class LinearDecay(BudgetLR):
    """Linear decay to min_lr: 1 − p."""

    def shape(self, progress: float) -> float:
        return 1.0 - progress


class StepDecay(BudgetLR):
    """Step decay (MultiStepLR-style): the factor is multiplied by ``gamma`` once progress reaches each
    milestone; defaults ×0.1 at 50% and 75% of the post-warm-up budget, the common ResNet recipe."""

    def __init__(self, optimizer: Optimizer, total_steps: int, min_lr: float = 0.0, warmup_steps: int = 0,
                 milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1, last_epoch: int = -1) -> None:
        if not all(0.0 < m <= 1.0 for m in milestones):
            raise ValueError(f"milestones: expected fractions of the budget in (0, 1], got {milestones!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma: expected a factor in [0, 1], got {gamma!r}")
        self.milestones, self.gamma = tuple(float(m) for m in milestones), float(gamma)
        super().__init__(optimizer, total_steps, min_lr, warmup_steps, last_epoch)

    def shape(self, progress: float) -> float:
        return self.gamma ** sum(progress >= m for m in self.milestones)


class WSD(BudgetLR):
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM, arXiv 2404.06395): hold max_lr, then decay linearly to
    min_lr over the last ``decay_fraction`` of the post-warm-up budget. MiniCPM decays exponentially over
    about 10%; the linear 20% default follows Hägele et al. 2024 (arXiv 2405.18392), who report a 20% linear
    cool-down matching cosine (both recalled, not re-checked here). Equals transformers'
    ``get_wsd_schedule(decay_type="linear")`` when decay_fraction·T is a whole number of steps."""

    def __init__(self, optimizer: Optimizer, total_steps: int, min_lr: float = 0.0, warmup_steps: int = 0,
                 decay_fraction: float = 0.2, last_epoch: int = -1) -> None:
        if not 0.0 < decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction: expected a fraction in (0, 1], got {decay_fraction!r}")
        self.decay_fraction = float(decay_fraction)
        super().__init__(optimizer, total_steps, min_lr, warmup_steps, last_epoch)

    def shape(self, progress: float) -> float:
        return min(1.0, (1.0 - progress) / self.decay_fraction)


class OneCycle(OneCycleLR):
    """torch's ``OneCycleLR`` with max_lr = each group's initial lr, under the budget interface.

    Its conventions, not the module docstring's: a cosine ramp from max_lr/div_factor (floored at min_lr) up
    to max_lr at step ``warmup_steps`` (0 → torch's default, 30% of the budget: the ramp is what defines
    one-cycle), then cosine annealing to min_lr, reached at step total_steps − 1 and held after (torch raises
    instead). min_lr is absolute (torch: initial_lr / final_div_factor). Momentum is not cycled
    (``cycle_momentum=False``): the comparison is of lr schedules alone, and plain SGD has no momentum to cycle.
    Needs total_steps >= 2.
    """

    def __init__(self, optimizer: Optimizer, total_steps: int, min_lr: float = 0.0, warmup_steps: int = 0,
                 div_factor: float = 25.0, last_epoch: int = -1) -> None:
        _check_budget(total_steps, warmup_steps)
        key = "initial_lr" if last_epoch == -1 else "max_lr"  # OneCycleLR keeps max_lr in the group on resume
        max_lrs = [float(group.get(key, group["lr"])) for group in optimizer.param_groups]
        _check_lrs(max_lrs, min_lr)
        if total_steps < 2:
            raise ValueError(f"total_steps: OneCycle needs a ramp and a decay, so total_steps >= 2, got {total_steps}")
        if not 1.0 <= div_factor < math.inf:
            raise ValueError(f"div_factor: expected a finite number >= 1 (the ramp starts at max_lr / div_factor), "
                             f"got {div_factor!r}")
        ramp = warmup_steps or max(1, round(ONECYCLE_DEFAULT_RAMP * total_steps))
        self.min_lr = float(min_lr)
        # torch's ramp ends (max_lr) at step pct_start·total_steps − 1, so +1 puts the peak at step `ramp`
        super().__init__(optimizer, max_lr=max_lrs, total_steps=total_steps, pct_start=(ramp + 1) / total_steps,
                         div_factor=div_factor, cycle_momentum=False, last_epoch=last_epoch)
        for group in self.optimizer.param_groups:  # the ramp's first step (already taken) does not read min_lr
            group["min_lr"] = self.min_lr

    def get_lr(self) -> list[float]:
        if self.last_epoch >= self.total_steps:
            return [self.min_lr for _ in self.optimizer.param_groups]
        return [max(self.min_lr, lr) for lr in super().get_lr()]


def get_uba_schedule(optimizer: Optimizer, num_training_steps: int, num_warmup_steps: int = 0,
                     phi: float = DEFAULT_PHI, min_lr: float = 0.0, last_epoch: int = -1) -> UBA:
    """UBA in the style of transformers' ``get_*_schedule`` helpers; same as ``UBA(...)``."""
    return UBA(optimizer, num_training_steps, phi=phi, min_lr=min_lr, warmup_steps=num_warmup_steps,
               last_epoch=last_epoch)


SCHEDULES: dict[str, type[LRScheduler]] = {
    "uba": UBA, "cosine": CosineDecay, "linear": LinearDecay, "step": StepDecay, "wsd": WSD, "onecycle": OneCycle,
}


def make_schedule(name: str, optimizer: Optimizer, total_steps: int, **kwargs) -> LRScheduler:
    """Build ``SCHEDULES[name](optimizer, total_steps, **kwargs)``: min_lr=, warmup_steps= for all, phi= for uba."""
    if name not in SCHEDULES:
        raise ValueError(f"name: expected one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](optimizer, total_steps, **kwargs)


def lr_curve(name: str, total_steps: int, max_lr: float = 1.0, **kwargs) -> list[float]:
    """The lr of schedule ``name`` at steps 0..total_steps, for one param group starting at ``max_lr``."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=max_lr)
    scheduler = make_schedule(name, optimizer, total_steps, **kwargs)
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(total_steps):
        optimizer.step()  # no gradients: a no-op that keeps torch's step-order check quiet
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def plot_schedules(total_steps: int, phis: Sequence[float], warmup_steps: int = 0) -> bytes:
    """A PNG: UBA for each φ in ``phis`` (left) beside the baselines (right), lr / max_lr against step."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, never opens a display

    steps = range(total_steps + 1)
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    uba_axes, baseline_axes = figure.subplots(1, 2, sharey=True)
    for phi in phis:
        uba_axes.plot(steps, lr_curve("uba", total_steps, phi=phi, warmup_steps=warmup_steps), label=f"φ = {phi:g}")
    uba_axes.set_title("UBA (φ = 2 is cosine)")
    for name in SCHEDULES:
        if name != "uba":
            baseline_axes.plot(steps, lr_curve(name, total_steps, warmup_steps=warmup_steps), label=name)
    baseline_axes.set_title("baselines")
    for axes in (uba_axes, baseline_axes):
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
    uba_axes.legend(loc="lower left")
    baseline_axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: the baselines fill the box
    uba_axes.set_ylabel("lr / max_lr")
    figure.suptitle(f"learning-rate schedules, budget {total_steps} steps, warm-up {warmup_steps}")
    return figure_png(figure, dpi=120)
