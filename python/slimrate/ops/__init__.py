"""slimrate ops: one Python face per op (check → pick backend → call); see ops/backend.py."""

from slimrate.ops.backend import BACKENDS, extension_available
from slimrate.ops.rate import rate_grad_, rate_stats

__all__ = ["BACKENDS", "extension_available", "rate_grad_", "rate_stats"]
