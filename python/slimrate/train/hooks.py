"""Training hooks: objects the loop calls at fixed points of each step.

A hook may define any of these methods (all optional):

- ``after_backward(step)``: after ``loss.backward()`` (under DDP: after the gradients are averaged
  over ranks) and after gradient clipping, before ``optimizer.step()``.  Anything a hook adds to the
  gradients here is not clipped, as in the transformers Trainer, where ``on_pre_optimizer_step``
  runs after clipping.
- ``after_step(step)``: after ``optimizer.step()`` and ``scheduler.step()``.
- ``metrics() -> dict[str, float]``: extra values for each training log record.
- ``state_dict()`` / ``load_state_dict(state)``: saved in and restored from checkpoints.

``step`` is the 0-based index of the step being taken (the one ``get_batch`` was called with).
"""

from __future__ import annotations

from typing import Any

from slimrate.backslash.constraint import RateConstraint

# The same keys as RateConstraintCallback (slimrate.backslash.hf_callback) adds to Trainer logs.
RATE_LOG_KEY = "backslash_rate"
NU_LOG_KEY = "backslash_nu"


class RateConstraintHook:
    """Apply a BackSlash ``RateConstraint`` once per training step of ``slimrate.train.train``.

    mode "grad": ``after_backward`` adds λ·∂R/∂θ to the already clipped gradients, so the LR, its
    schedule and Adam's preconditioning apply to the rate term and the clipping does not.
    mode "decoupled": ``after_step`` does θ ← θ − λ·∂R/∂θ after the optimizer step, with no LR.
    Logs R and ν of the last step as "backslash_rate" and "backslash_nu"; its state (ν, step count,
    λ, ...) is saved in checkpoints.  ``train`` wraps a bare ``RateConstraint`` in ``hooks`` in this.
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


def as_hook(hook: Any) -> Any:
    """``hook`` itself, or a ``RateConstraintHook`` around a bare ``RateConstraint``."""
    return RateConstraintHook(hook) if isinstance(hook, RateConstraint) else hook
