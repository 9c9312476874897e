"""slimrate: rate-constrained training, compressed models and the kernels that make them fast."""

from slimrate import backslash, ops, runtime, sparse
from slimrate.backslash import (
    RateConstraint,
    SlimFile,
    SlimWriter,
    estimate_shape,
    load_slim,
    load_slim_into,
    rate,
    save_slim,
)
from slimrate.schedules import UBA, get_uba_schedule, make_schedule, uba_lr

__version__ = "0.1.0"
__all__ = ["UBA", "RateConstraint", "SlimFile", "SlimWriter", "backslash", "estimate_shape", "get_uba_schedule",
           "load_slim", "load_slim_into", "make_schedule", "ops", "rate", "runtime", "save_slim", "sparse", "uba_lr",
           "__version__"]
