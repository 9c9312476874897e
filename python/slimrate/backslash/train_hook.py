"""RateConstraintHook: run a BackSlash RateConstraint inside slimrate's training loop; the hook
methods it defines are the ones ``slimrate.train.train`` documents."""

from __future__ import annotations

from typing import Any

from slimrate.backslash.constraint import RateConstraint

# Keys of R and ν in log records, here and in RateConstraintCallback's Trainer logs.
RATE_LOG_KEY = "backslash_rate"
NU_LOG_KEY = "backslash_nu"


class RateConstraintHook:
    """Apply a BackSlash ``RateConstraint`` once per training step of ``slimrate.train.train``.

    mode "grad": ``after_backward`` adds λ·∂R/∂θ to the already clipped gradients, so the LR, its
    schedule and Adam's preconditioning apply to the rate term and the clipping does not.
    mode "decoupled": ``after_step`` does θ ← θ − λ·∂R/∂θ after the optimizer step, with no LR.
    Logs R and ν of the last step as "backslash_rate" and "backslash_nu"; its state (ν, step count,
    λ, ...) is saved in checkpoints.  ``train`` wraps a bare ``RateConstraint`` in ``hooks`` in this
    (through ``RateConstraint.as_train_hook``).
    """

    def __init__(self, constraint: RateConstraint) -> None:
        if not isinstance(constraint, RateConstraint):
            raise TypeError(f"constraint: expected a RateConstraint, got {type(constraint).__name__}")
        self.constraint = constraint

    def after_backward(self, step: int) -> None:
        if self.constraint.mode == "grad":
            self.constraint.step()

    def after_step(self, step: int) -> None:
        if self.constraint.mode == "decoupled":
            self.constraint.step()

    def metrics(self) -> dict[str, float]:
        if self.constraint.steps == 0:
            return {}
        return {RATE_LOG_KEY: self.constraint.last_rate, NU_LOG_KEY: self.constraint.nu}

    def state_dict(self) -> dict[str, Any]:
        return self.constraint.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.constraint.load_state_dict(state)
