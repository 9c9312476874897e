"""BackSlash rate-constrained training (docs/backslash.md): shape estimation, the rate proxy R,
RateConstraint with its hook for slimrate's training loop and its transformers Trainer callback, and the
.slim model file (save_slim / SlimWriter to write it as a stream; load_slim / SlimFile / load_slim_into to read it).

``RateConstraintCallback`` is loaded on first use, so importing slimrate never imports transformers.
"""

from slimrate.backslash.constraint import RateConstraint
from slimrate.backslash.rate import rate
from slimrate.backslash.shape import estimate_shape, shape_from_moments
from slimrate.backslash.slim_coding import SlimFormatError
from slimrate.backslash.slim_file import SlimFile, load_slim, slim_report
from slimrate.backslash.slim_load_into import load_slim_into
from slimrate.backslash.slim_writer import SlimWriter, save_slim
from slimrate.backslash.train_hook import RateConstraintHook

__all__ = ["RateConstraint", "RateConstraintCallback", "RateConstraintHook", "SlimFile", "SlimFormatError",
           "SlimWriter", "estimate_shape", "load_slim", "load_slim_into", "rate", "save_slim", "shape_from_moments",
           "slim_report"]


def __getattr__(name: str):
    if name == "RateConstraintCallback":
        from slimrate.backslash.hf_callback import RateConstraintCallback

        return RateConstraintCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
