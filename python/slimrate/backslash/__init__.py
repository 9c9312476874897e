"""BackSlash rate-constrained training (papers/backslash.md): shape estimation, the rate proxy R,
RateConstraint and its transformers Trainer callback.

``RateConstraintCallback`` is loaded on first use, so importing slimrate never imports transformers.
"""

from slimrate.backslash.constraint import RateConstraint
from slimrate.backslash.rate import rate
from slimrate.backslash.shape import estimate_shape, shape_from_moments

__all__ = ["RateConstraint", "RateConstraintCallback", "estimate_shape", "rate", "shape_from_moments"]


def __getattr__(name: str):
    if name == "RateConstraintCallback":
        from slimrate.backslash.hf_callback import RateConstraintCallback

        return RateConstraintCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
