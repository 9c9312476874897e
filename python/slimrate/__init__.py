"""slimrate: rate-constrained training, compressed models and the kernels that make them fast."""

from slimrate import ops

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
