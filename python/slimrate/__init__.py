"""slimrate: rate-constrained training, compressed models and the kernels that make them fast."""

from slimrate import backslash, ops
from slimrate.backslash import RateConstraint, estimate_shape, rate

__version__ = "0.1.0"
__all__ = ["RateConstraint", "backslash", "estimate_shape", "ops", "rate", "__version__"]
