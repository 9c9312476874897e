"""RateConstraintHook: run a BackSlash RateConstraint inside slimrate's training loop; the hook
methods it defines are the ones ``slimrate.train.train`` documents."""

from __future__ import annotations

from typing import Any

from slimrate.backslash.constraint import RateConstraint

# Keys of R, ν and the applied λ in log records, here and in RateConstraintCallback's Trainer logs.
RATE_LOG_KEY = "backslash_rate"
NU_LOG_KEY = "backslash_nu"
LAM_LOG_KEY = "backslash_lam"


def log_entries(constraint: RateConstraint) -> dict[str, float]:
    """R, ν and λ of the constraint's last step, under their log keys ({} before the first step)."""
    if constraint.steps == 0:
        return {}
    return {RATE_LOG_KEY: constraint.last_rate, NU_LOG_KEY: constraint.nu, LAM_LOG_KEY: constraint.last_lam}


class RateConstraintHook:
    """Apply a BackSlash ``RateConstraint`` once per training step of ``slimrate.train.train``.

    mode "loss": ``after_backward`` adds λ·∂R/∂θ to the already clipped gradients, so the LR, its
    schedule and Adam's preconditioning apply to the rate term and the clipping does not.
    mode "decoupled": ``after_step`` does θ ← θ − λ·∂R/∂θ after the optimizer step, with no LR.
    Logs R, ν and the λ applied (``last_lam``, after ``lam_schedule``) of the last step as "backslash_rate",
    "backslash_nu" and "backslash_lam"; its state (ν, step count,
    λ, ...) is saved in checkpoints.  ``train`` wraps a bare ``RateConstraint`` in ``hooks`` in this
    (through ``RateConstraint.as_train_hook``).
    """

    def __init__(self, constraint: RateConstraint) -> None:
        if not isinstance(constraint, RateConstraint):
            raise TypeError(f"constraint: expected a RateConstraint, got {type(constraint).__name__}")
        self.constraint = constraint

    def after_backward(self, step: int) -> None:
        if self.constraint.mode == "loss":
            self.constraint.step()

    def after_step(self, step: int) -> None:
        if self.constraint.mode == "decoupled":
            self.constraint.step()

    def metrics(self) -> dict[str, float]:
        return log_entries(self.constraint)

    def state_dict(self) -> dict[str, Any]:
        return self.constraint.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.constraint.load_state_dict(state)
